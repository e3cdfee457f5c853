"""Step time and FLOPs of each deep-supervision form on one config (default: 3D bench_ref).

  python benchmarks/ds_cost.py [--config=configs/unet3d.py:bench_ref] [--steps=3] [--rounds=3]
      [--forms=none,deep,additive,hypercolumn,hypercolumn:conv1x1_norm_act]

A form is `mode[:fusion]` (`model.ds.mode`, `model.ds.fusion`). Every form's train step is
compiled first; the timed rounds then alternate the forms (each round times `--steps` steps of
every form), so load from other processes hits all forms alike. Prints one JSON line: per form
the median step time over all timed steps, process CPU seconds per step, GFLOP per step (XLA's
cost analysis of the step with native ops) and both relative to `none`, and the load average.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/unet3d.py:bench_ref',
                                          'Experiment config file (path[:args]).',
                                          lock_config=False)
_FORMS = flags.DEFINE_list('forms', ['none', 'deep', 'additive', 'hypercolumn'],
                           'DS forms to time: mode[:fusion].')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per form per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Alternating rounds.')


def form_config(config, form: str):
  """A copy of `config` with `model.ds.mode` (and `model.ds.fusion`) set from `mode[:fusion]`."""
  mode, _, fusion = form.partition(':')
  c = config.copy_and_resolve_references()
  c.model.ds.mode = mode
  if fusion:
    c.model.ds.fusion = fusion
  return c


def main(argv):
  del argv
  from unet_ds.models import ops  # pylint: disable=g-import-not-at-top
  ops.configure_xla_flags()  # before the first jax computation
  import jax  # pylint: disable=g-import-not-at-top
  from unet_ds import bench  # pylint: disable=g-import-not-at-top

  forms = list(dict.fromkeys(_FORMS.value))
  steps = {form: bench.prepare_train(form_config(_CONFIG.value, form)) for form in forms}
  for step in steps.values():  # first call and one warm-up step
    jax.block_until_ready(step())
    jax.block_until_ready(step())
  wall = {form: [] for form in forms}
  cpu = {form: [] for form in forms}
  for _ in range(_ROUNDS.value):
    for form, step in steps.items():
      for _ in range(_STEPS.value):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(step())
        wall[form].append(time.perf_counter() - t)
        cpu[form].append(time.process_time() - c)
  record = {'config': config_flags.get_config_filename(flags.FLAGS['config']), 'load_avg_1min': os.getloadavg()[0],
            'conv_impl': next(iter(steps.values())).impl, 'forms': {}}
  base = forms[0]
  for form in forms:
    row = {'step_s_median': statistics.median(wall[form]), 'step_s_min': min(wall[form]),
           'step_cpu_s_median': statistics.median(cpu[form]),
           'gflop_per_step': (steps[form].flops or 0) / 1e9, 'compile_s': steps[form].compile_s}
    record['forms'][form] = row
  for form in forms:
    row, ref = record['forms'][form], record['forms'][base]
    row[f'time_vs_{base}'] = row['step_s_median'] / ref['step_s_median']
    row[f'cpu_vs_{base}'] = row['step_cpu_s_median'] / ref['step_cpu_s_median']
    if ref['gflop_per_step']:
      row[f'flops_vs_{base}'] = row['gflop_per_step'] / ref['gflop_per_step']
  print(json.dumps(record))


if __name__ == '__main__':
  app.run(main)
