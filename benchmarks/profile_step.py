"""Where a train step's time goes: traces one jitted step, prints the top ops by total duration.

  python benchmarks/profile_step.py --config=configs/unet3d.py:bench_ref [--top=30]
      [--config.model.dtype=bfloat16] [--trace_dir=/tmp/unet_ds_trace]

Works on CPU and GPU (a perfetto trace from `jax.profiler`; no TensorBoard needed). Each row:
total ms, count, name, and the framework op (`jvp(...)` forward, `transpose(jvp(...))` backward)
when the compiled HLO names it. Then the same time grouped by pass (fwd / bwd / other) and
model scope (`enc_l0`, `dec_l1/ConvNormAct_0/Conv_0`, ...: `--group_depth` path components).
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import os
import re
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/unet3d.py:bench_ref',
                                          'Experiment config file (path[:args]).',
                                          lock_config=True)
_TOP = flags.DEFINE_integer('top', 30, 'Rows to print.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '/tmp/unet_ds_trace', 'Where the trace goes.')
_GROUP_DEPTH = flags.DEFINE_integer('group_depth', 1, 'Scope components to group by (0: none).')
_DUMP = flags.DEFINE_string('dump', '', 'If set, a JSON file of every traced op: name, op_name, '
                            'thread, start and duration (us).')


def _group(op_name: str, depth: int) -> str:
  """'bwd enc_l0/ConvNormAct_1' for depth 2, from a jax op_name (pass and module scope)."""
  if not op_name:
    return 'other (no op_name)'
  phase = 'bwd' if 'transpose(' in op_name else ('fwd' if 'jvp(' in op_name else 'other')
  parts = op_name.split('/')
  start = next((i + 1 for i, p in enumerate(parts) if '(UNet)' in p), None)
  if start is None:
    return f'{phase} (outside the model: loss, optimizer)'
  scope = [p for p in parts[start:start + depth] if not p.startswith(('jit(', 'while'))]
  return f'{phase} {"/".join(scope)}'


def main(argv):
  del argv
  from unet_ds.models import ops  # pylint: disable=g-import-not-at-top
  ops.configure_xla_flags()  # before the first jax computation
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unet_ds import config_lib  # pylint: disable=g-import-not-at-top
  from unet_ds import models  # pylint: disable=g-import-not-at-top
  from unet_ds import optim  # pylint: disable=g-import-not-at-top
  from unet_ds import state as state_lib  # pylint: disable=g-import-not-at-top
  from unet_ds import train  # pylint: disable=g-import-not-at-top
  from unet_ds.data import datasets  # pylint: disable=g-import-not-at-top

  c = _CONFIG.value
  model_cfg = config_lib.validate(c)
  model = models.get_model(model_cfg)
  tx, _ = optim.make_optimizer(c.optim, int(c.train.steps))
  ds_loss = train.DSLoss.from_config(c, model_cfg)
  shape = tuple(datasets.training_shape(c.data))
  input_shape = (int(c.train.batch_size), *shape, int(c.data.in_channels))
  state = jax.jit(functools.partial(state_lib.create, model, tx, int(c.seed),
                                    input_shape))()
  rng = np.random.default_rng(0)
  batch = {'image': jax.numpy.asarray(rng.standard_normal(input_shape, dtype=np.float32)),
           'label': jax.numpy.asarray(rng.integers(0, max(int(c.data.num_classes), 2),
                                                   input_shape[:-1], dtype=np.int32))}
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, ds_loss=ds_loss))
  compiled = step.lower(state, batch).compile()
  for _ in range(2):
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
  t = time.perf_counter()
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  print(f'step {time.perf_counter() - t:.4f} s (untraced)')

  run_dir = os.path.join(_TRACE_DIR.value, str(int(time.time())))
  jax.profiler.start_trace(run_dir, create_perfetto_trace=True)
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  jax.profiler.stop_trace()

  op_names = {}
  for line in compiled.as_text().split('\n'):
    found = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', line)
    if found:
      op_names[found.group(1)] = found.group(2)
  path = sorted(glob.glob(os.path.join(run_dir, '**', '*.trace.json.gz'), recursive=True))[-1]
  events = [e for e in json.load(gzip.open(path))['traceEvents'] if e.get('ph') == 'X']
  if _DUMP.value:
    with open(_DUMP.value, 'w') as f:
      json.dump([{'name': e['name'], 'op_name': op_names.get(e['name'], ''), 'tid': e.get('tid'),
                  'ts': e.get('ts'), 'dur': e.get('dur', 0)} for e in events], f)
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e['name'].startswith(('$', 'ThunkExecutor')):  # host-side wrappers of everything
      continue
    total[e['name']] += e.get('dur', 0)
    count[e['name']] += 1
  for name, dur in total.most_common(_TOP.value):
    print(f'{dur / 1e3:9.2f} ms {count[name]:5d}  {name[:70]:70s} {op_names.get(name, "")[-90:]}')
  if _GROUP_DEPTH.value:
    groups = collections.Counter()
    for name, dur in total.items():
      if name in op_names or not name[:1].isupper():  # HLO ops, not runtime wrappers
        groups[_group(op_names.get(name, ''), _GROUP_DEPTH.value)] += dur
    print(f'\nby pass and scope (sum {sum(groups.values()) / 1e3:.1f} ms):')
    for key, dur in sorted(groups.items(), key=lambda kv: -kv[1]):
      print(f'{dur / 1e3:9.2f} ms  {key}')


if __name__ == '__main__':
  app.run(main)
