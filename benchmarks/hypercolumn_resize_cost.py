"""What the `conv1x1_norm_act` hypercolumn fusion's resizes cost, forward + backward, in isolation.

  python benchmarks/hypercolumn_resize_cost.py [--ndim=3] [--size=64] [--batch=2] [--channels=16]
      [--levels=3] [--rounds=5] [--impl=native]

Defaults are 3D bench_ref's fusion: the projections of its 3 decoder levels (64^3, 32^3, 16^3;
16 channels, batch 2) summed at full resolution. Two ways, timed in alternating rounds (process CPU
seconds):

- `per_level`: what `ds.DSOutput` computes, each level resized to full size, then summed.
- `coarse_to_fine`: an FPN top-down path, `acc = p_l + up2(acc)` from the coarsest level. Not the
  same function: linear upsampling with half-pixel centres does not compose (two x2 steps differ
  from one x4), so the JSON gives its largest difference too.

Prints one JSON line: per way the median CPU s, compile s and GFLOP (XLA cost analysis).
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app
from absl import flags

_NDIM = flags.DEFINE_integer('ndim', 3, 'Spatial dimensions.')
_SIZE = flags.DEFINE_integer('size', 64, 'Full-resolution size per axis.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Batch size.')
_CHANNELS = flags.DEFINE_integer('channels', 16, 'Fusion features (model.ds fusion width).')
_LEVELS = flags.DEFINE_integer('levels', 3, 'Decoder levels in the column (resolution 1/2^l).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Alternating timed rounds.')
_IMPL = flags.DEFINE_string('impl', 'native',
                            'conv_impl of the resizes (onednn: oneDNN resampling).')


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unet_ds.models import layers  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  shapes = [(_BATCH.value, *(_SIZE.value >> l,) * _NDIM.value, _CHANNELS.value)
            for l in range(_LEVELS.value)]
  projections = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
  cotangent = jnp.asarray(rng.standard_normal(shapes[0]), jnp.float32)
  full = shapes[0][1:-1]

  def per_level(ps):
    return sum(layers.resize(p, full, impl=_IMPL.value) for p in ps)

  def coarse_to_fine(ps):
    acc = ps[-1]
    for p in reversed(ps[:-1]):
      acc = p + layers.resize(acc, p.shape[1:-1], impl=_IMPL.value)
    return acc

  ways = {'per_level': per_level, 'coarse_to_fine': coarse_to_fine}
  compiled, record = {}, {'shapes': shapes, 'impl': _IMPL.value, 'ways': {}}
  for name, fn in ways.items():
    step = jax.jit(jax.value_and_grad(lambda ps, g, fn=fn: jnp.sum(fn(ps) * g)))
    t = time.perf_counter()
    compiled[name] = step.lower(projections, cotangent).compile()
    cost = compiled[name].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    record['ways'][name] = {'compile_s': time.perf_counter() - t,
                            'gflop': (cost or {}).get('flops', 0) / 1e9}
    jax.block_until_ready(compiled[name](projections, cotangent))
  cpu = {name: [] for name in ways}
  for _ in range(_ROUNDS.value):
    for name, step in compiled.items():
      c = time.process_time()
      jax.block_until_ready(step(projections, cotangent))
      cpu[name].append(time.process_time() - c)
  for name in ways:
    record['ways'][name]['cpu_s_median'] = statistics.median(cpu[name])
  record['coarse_to_fine_max_abs_diff'] = float(
      jnp.max(jnp.abs(per_level(projections) - coarse_to_fine(projections))))
  print(json.dumps(record))


if __name__ == '__main__':
  app.run(main)
