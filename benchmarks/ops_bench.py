"""Micro-benchmark: `ops.xla_cpu` and `ops.onednn` vs the native XLA ops, per U-Net-sized op.

Times forward and forward+backward (grads w.r.t. input and kernel) of each op, interleaving the
implementations so that load from other processes hits them alike; prints the min over repeats
(wall and process CPU time) and the speed-ups over native. CPU time is the steadier figure on a
shared machine. `onednn` is timed where it applies (float32; transposed convs with k == s).

  python benchmarks/ops_bench.py [--repeats=3] [--only=conv3x3] [--skip_native_slow]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
from jax import lax
import jax.numpy as jnp

from unet_ds.models import ops
from unet_ds.models.ops import common
from unet_ds.models.ops import onednn
from unet_ds.models.ops import xla_cpu

# name, kind, x shape, kernel shape, strides: the ops of a 4-level 16-128 filter U-Net, batch 2.
CASES = (
    ('conv3_s1_64^3_16-16', 'conv', (2, 64, 64, 64, 16), (3, 3, 3, 16, 16), (1, 1, 1)),
    ('conv3_s1_64^3_32-16', 'conv', (2, 64, 64, 64, 32), (3, 3, 3, 32, 16), (1, 1, 1)),
    ('conv3_s1_32^3_32-32', 'conv', (2, 32, 32, 32, 32), (3, 3, 3, 32, 32), (1, 1, 1)),
    ('conv3_s1_16^3_64-64', 'conv', (2, 16, 16, 16, 64), (3, 3, 3, 64, 64), (1, 1, 1)),
    ('conv3_s1_8^3_128-128', 'conv', (2, 8, 8, 8, 128), (3, 3, 3, 128, 128), (1, 1, 1)),
    ('conv3_s2_64^3_16-32', 'conv', (2, 64, 64, 64, 16), (3, 3, 3, 16, 32), (2, 2, 2)),
    ('conv1_s1_64^3_16-3', 'conv', (2, 64, 64, 64, 16), (1, 1, 1, 16, 3), (1, 1, 1)),
    ('convT2_32^3_32-16', 'transpose', (2, 32, 32, 32, 32), (2, 2, 2, 32, 16), (2, 2, 2)),
    ('convT2_8^3_128-64', 'transpose', (2, 8, 8, 8, 128), (2, 2, 2, 128, 64), (2, 2, 2)),
    ('conv3_s1_2d_256^2_32-32', 'conv', (8, 256, 256, 32), (3, 3, 32, 32), (1, 1)),
)


def _ops(kind, strides):
  if kind == 'conv':
    native = lambda x, k: lax.conv_general_dilated(
        x, k, strides, 'SAME', dimension_numbers=common.dimension_numbers(x.ndim - 2))
    fast = lambda x, k: xla_cpu.conv(x, k, strides=strides, padding='SAME')
  else:
    native = lambda x, k: lax.conv_transpose(
        x, k, strides, 'VALID', dimension_numbers=common.dimension_numbers(x.ndim - 2))
    fast = lambda x, k: xla_cpu.conv_transpose(x, k, strides=strides)
  impls = {'native': native, 'xla_cpu': fast}
  if onednn.available():
    impls['onednn'] = ((lambda x, k: onednn.conv(x, k, strides=strides, padding='SAME'))
                       if kind == 'conv' else
                       (lambda x, k: onednn.conv_transpose(x, k, strides=strides)))
  return impls


def _timed(fn, *args):
  t, c = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t, time.process_time() - c


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--only', default='', help='substring of the case names to run')
  parser.add_argument('--skip_native', default='',
                      help='comma-separated substrings of cases whose native grad is skipped')
  args = parser.parse_args()
  ops.configure_xla_flags()
  for name, kind, xs, ks, strides in CASES:
    if args.only not in name:
      continue
    x = jax.random.normal(jax.random.key(0), xs)
    k = jax.random.normal(jax.random.key(1), ks) * 0.1
    fns = {}
    for impl, op in _ops(kind, strides).items():
      fns[f'{impl}_fwd'] = jax.jit(op)
      if not (impl == 'native' and args.skip_native and
              any(s and s in name for s in args.skip_native.split(','))):
        fns[f'{impl}_grad'] = jax.jit(jax.grad(lambda x, k, op=op: jnp.sum(op(x, k) ** 2),
                                               argnums=(0, 1)))
    for fn in fns.values():
      jax.block_until_ready(fn(x, k))
    times = {n: [] for n in fns}
    for _ in range(args.repeats):
      for n, fn in fns.items():
        times[n].append(_timed(fn, x, k))
    best = {n: (min(w for w, _ in ts), min(c for _, c in ts)) for n, ts in times.items()}
    row = {'case': name}
    for n, (w, c) in best.items():
      row[f'{n}_ms'] = round(w * 1e3, 1)
      row[f'{n}_cpu_ms'] = round(c * 1e3, 1)
    for part in ('fwd', 'grad'):
      for impl in ('xla_cpu', 'onednn'):
        if f'native_{part}' in best and f'{impl}_{part}' in best:
          row[f'speedup_{impl}_{part}'] = round(
              best[f'native_{part}'][1] / best[f'{impl}_{part}'][1], 2)
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
