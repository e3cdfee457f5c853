"""Where the host memory of the bench_ref train step goes, stage by stage; prints one JSON line.

  python benchmarks/host_memory.py --config=configs/unet3d.py:bench_ref [--steps=2]

For each stage (imports, state init, FLOP count, compile, trim, steps): the process's resident set
after it and its peak during it (`VmHWM`, reset between stages through /proc/self/clear_refs),
and XLA's memory analysis of the compiled step (arguments, outputs, temporaries, aliased). The
step's peak minus the RSS before it is what the step itself adds.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/unet3d.py:bench_ref',
                                          'Experiment config file (path[:args]).',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 2, 'Steps run after compiling.')


def _status_mb(key: str) -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(key + ':'):
        return int(line.split()[1]) / 1024
  return float('nan')


def _reset_peak() -> bool:
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


class _Stages:
  """Records (rss after, peak during) per stage."""

  def __init__(self):
    self.rows = []
    _reset_peak()

  def done(self, name: str) -> None:
    self.rows.append({'stage': name, 'rss_mb': round(_status_mb('VmRSS'), 1),
                      'peak_mb': round(_status_mb('VmHWM'), 1)})
    _reset_peak()


def main(argv):
  del argv
  from unet_ds.models import ops  # pylint: disable=g-import-not-at-top
  ops.configure_xla_flags()
  stages = _Stages()
  stages.rows.append({'stage': 'start', 'rss_mb': round(_status_mb('VmRSS'), 1),
                      'modules': len(sys.modules)})
  import jax  # pylint: disable=g-import-not-at-top
  from unet_ds import bench  # pylint: disable=g-import-not-at-top
  from unet_ds import hostmem  # pylint: disable=g-import-not-at-top
  stages.done('import bench')
  config = _CONFIG.value
  t = time.perf_counter()
  step = bench.prepare_train(config)
  prepare_s = time.perf_counter() - t
  stages.done('prepare_train (imports, init, FLOP count, compile, trim)')
  heavy = sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'grain', 'orbax', 'torch',
                             'nibabel', 'scipy', 'PIL') if m in sys.modules)
  mem = step.compiled.memory_analysis()
  analysis = {k: round(getattr(mem, k) / 2**20, 1) for k in (
      'argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
      'temp_size_in_bytes', 'generated_code_size_in_bytes') if hasattr(mem, k)}
  hostmem.trim_host_heap()
  stages.done('trim')
  for i in range(_STEPS.value):
    jax.block_until_ready(step())
    stages.done(f'step {i + 1}')
  print(json.dumps({'stages': stages.rows, 'memory_analysis_mb': analysis,
                    'heavy_modules_imported': heavy, 'prepare_s': round(prepare_s, 1),
                    'ru_maxrss_mb': round(hostmem.peak_rss_mb(), 1)}))


if __name__ == '__main__':
  app.run(main)
