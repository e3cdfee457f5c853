"""Where a train step's time goes: traces one jitted step, prints the top ops by total duration.

  python benchmarks/profile_step.py --config=configs/unet3d.py:bench_ref [--top=30]
      [--config.model.dtype=bfloat16] [--trace_dir=/tmp/unet_ds_trace]

Works on CPU and GPU (a perfetto trace from `jax.profiler`; no TensorBoard needed). Each row:
total ms, count, name, and the framework op (`jvp(...)` forward, `transpose(jvp(...))` backward)
when the compiled HLO names it.
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


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unet_ds import config_lib  # pylint: disable=g-import-not-at-top
  from unet_ds import models  # pylint: disable=g-import-not-at-top
  from unet_ds import optim  # pylint: disable=g-import-not-at-top
  from unet_ds import train  # pylint: disable=g-import-not-at-top
  from unet_ds.data import datasets  # pylint: disable=g-import-not-at-top

  c = _CONFIG.value
  model_cfg = config_lib.validate(c)
  model = models.get_model(model_cfg)
  tx, _ = optim.make_optimizer(c.optim, int(c.train.steps))
  ds_loss = train.DSLoss.from_config(c, model_cfg)
  shape = tuple(datasets.training_shape(c.data))
  input_shape = (int(c.train.batch_size), *shape, int(c.data.in_channels))
  state = jax.jit(functools.partial(train.create_train_state, model, tx, int(c.seed),
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
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e['name'].startswith(('$', 'ThunkExecutor')):  # host-side wrappers of everything
      continue
    total[e['name']] += e.get('dur', 0)
    count[e['name']] += 1
  for name, dur in total.most_common(_TOP.value):
    print(f'{dur / 1e3:9.2f} ms {count[name]:5d}  {name[:70]:70s} {op_names.get(name, "")[-90:]}')


if __name__ == '__main__':
  app.run(main)
