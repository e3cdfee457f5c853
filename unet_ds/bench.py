"""Times the jitted train step and inference forward of any config; prints one JSON line.

  python -m unet_ds.bench --config=configs/unet3d.py:bench_ref [--steps=10] [--warmup=2]
      [--config.model.conv_impl=native] [--config.model.dtype=bfloat16] [--mode=train|infer|both]

The batch is random (image ~ N(0, 1), labels uniform over the classes), built on the host once
and placed like the trainer places its batches, so no dataset is prepared or read. Compile time
is reported apart from the step times (median / min / max over `--steps` after `--warmup`).
FLOPs are the model's: XLA's cost analysis of the same step lowered with the native ops for the
CPU backend (the fast path computes the same math, but the analysis counts a scan body once; GPU
plugins have no such analysis and their compiled one skips cuDNN convolutions).
Memory: peak host RSS (of the whole process: imports, compile, steps; the compiler's freed heap
is trimmed before the first step), XLA's temporary buffer of the step (`step_temp_mb`: saved
activations and the backward's working set), and the device's peak bytes in use where reported.
`benchmarks/host_memory.py` breaks the host's peak down by stage.

Compare with MONAI's DynUNet on the same shapes with `benchmarks/monai_dynunet.py` (optional
extra: torch and monai in their own venv); run both under the same allocator (README).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
from ml_collections import config_flags

# Dense peaks (FLOP/s) of devices we have measured on, by (device_kind substring, dtype).
_KNOWN_PEAKS = {
    ('H100', 'bfloat16'): 989e12,   # SXM, dense tensor cores
    ('H100', 'float32'): 67e12,     # SXM, non-tensor fp32
    ('H200', 'bfloat16'): 989e12,
    ('H200', 'float32'): 67e12,
}


def known_peak(device_kind: str, dtype: str) -> float | None:
  for (kind, dt), peak in _KNOWN_PEAKS.items():
    if kind in device_kind and dt == dtype:
      return peak
  return None


def _stats(seconds: list[float], prefix: str) -> dict[str, float]:
  return {f'{prefix}_median': statistics.median(seconds), f'{prefix}_min': min(seconds),
          f'{prefix}_max': max(seconds)}


def _time_calls(fn: Callable[[], Any], steps: int, warmup: int
                ) -> tuple[float, list[float], list[float]]:
  """(first call seconds, wall seconds and process CPU seconds of `steps` calls after `warmup`).

  CPU seconds (all threads) are the steadier figure on a machine shared with other jobs.
  """
  import jax  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times, cpu_times = [], []
  for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
    cpu_times.append(time.process_time() - c)
  return first, times, cpu_times


def _flops(lowered_or_compiled: Any) -> float | None:
  try:
    cost = lowered_or_compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (backends without an analysis)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def temp_mb(compiled: Any) -> float | None:
  """XLA's temporary buffer of a compiled computation (MiB): what its live intermediates take at
  their peak (a train step's saved activations and backward working set), beside its arguments
  and outputs; None where the backend has no memory analysis."""
  try:
    return compiled.memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except  (backends without an analysis)
    return None


def model_flops(fn: Callable[..., Any], *args: Any) -> float | None:
  """XLA's FLOP count of `fn(*args)` lowered for the CPU backend, whatever the default one.

  The count is the model's (backend independent). GPU plugins have no pre-compilation analysis,
  and their compiled one leaves out cuDNN convolutions (custom calls), so count on CPU.
  """
  import jax  # pylint: disable=g-import-not-at-top
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args)
  try:
    return _flops(jax.jit(fn).lower(*abstract))
  except Exception:  # pylint: disable=broad-except
    return None


@dataclasses.dataclass
class TrainStep:
  """A compiled, donating train step of a config on one fixed random batch."""
  compiled: Any
  state: Any
  batch: dict[str, Any]
  impl: str                 # the resolved conv_impl
  flops: float | None       # XLA's count of the same step with the native ops
  compile_s: float
  setup: Any                # state.Setup: model, model config, optimiser
  native_model: Any         # the same model with the native ops (FLOP counts)

  def __call__(self) -> Any:
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics


def prepare_train(config: Any) -> TrainStep:
  """Builds the model, optimiser and DS loss of `config`, a random batch, and compiles the step.

  The batch is built on the host once and placed like the trainer places its batches; the state
  is donated to each step, as in training.
  """
  import jax  # pylint: disable=g-import-not-at-top  (after flags)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unet_ds import hostmem  # pylint: disable=g-import-not-at-top
  from unet_ds import models  # pylint: disable=g-import-not-at-top
  from unet_ds import sharding  # pylint: disable=g-import-not-at-top
  from unet_ds import state as state_lib  # pylint: disable=g-import-not-at-top
  from unet_ds import train  # pylint: disable=g-import-not-at-top
  from unet_ds.data import datasets  # pylint: disable=g-import-not-at-top
  from unet_ds.models import layers  # pylint: disable=g-import-not-at-top

  setup = state_lib.Setup.from_config(config)
  model_cfg = setup.model_config
  sharding.maybe_initialize_distributed(config.mesh)
  mesh = sharding.make_mesh(config.mesh)
  batch_size = int(config.train.batch_size)
  sharding.check_batch_size(mesh, batch_size, 'batch_size')
  shape = tuple(datasets.training_shape(config.data))
  num_classes = max(int(config.data.num_classes), 2)
  ds_loss = train.DSLoss.from_config(config, model_cfg)
  input_shape = (batch_size, *shape, int(config.data.in_channels))

  rng = np.random.default_rng(0)
  host_batch = {
      'image': rng.standard_normal(input_shape, dtype=np.float32),
      'label': rng.integers(0, num_classes, (batch_size, *shape), dtype=np.int32),
  }
  batch = sharding.shard_batch(mesh, host_batch)
  del host_batch

  def step_fn(model):
    return functools.partial(train.train_step, model=model, tx=setup.tx, ds_loss=ds_loss)

  repl = sharding.replicated(mesh)
  init = functools.partial(state_lib.create, setup.model, setup.tx, int(config.seed), input_shape)
  state = jax.jit(init, out_shardings=repl)()
  native_model = models.get_model(dataclasses.replace(model_cfg, conv_impl='native'))
  flops = model_flops(step_fn(native_model), state, batch)
  train_fn = jax.jit(step_fn(setup.model), out_shardings=(repl, repl), donate_argnums=0)
  t = time.perf_counter()
  compiled = train_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  del train_fn, init  # with their traces: garbage for the trim's collection
  hostmem.trim_host_heap()  # the compiler's freed heap, before the steps' peak comes on top
  return TrainStep(compiled=compiled, state=state, batch=batch,
                   impl=layers.resolve_impl(model_cfg.conv_impl), flops=flops,
                   compile_s=compile_s, setup=setup, native_model=native_model)


def run(config: Any, steps: int = 10, warmup: int = 2, mode: str = 'both',
        peak_flops: float = 0.0) -> dict[str, Any]:
  """Builds the model, optimiser and DS loss of `config`, times them; returns the JSON record."""
  import jax  # pylint: disable=g-import-not-at-top  (after flags)
  from unet_ds import config_lib  # pylint: disable=g-import-not-at-top
  from unet_ds import hostmem  # pylint: disable=g-import-not-at-top

  if steps < 1 or warmup < 0:
    raise ValueError(f'bench: need steps >= 1 and warmup >= 0, got {steps}, {warmup}')
  baseline_rss = hostmem.peak_rss_mb()
  train_step = prepare_train(config)
  model_cfg = train_step.setup.model_config
  shape = list(train_step.batch['label'].shape[1:])
  batch_size = int(train_step.batch['label'].shape[0])

  dev = jax.devices()[0]
  record: dict[str, Any] = {
      'backend': jax.default_backend(), 'device_kind': dev.device_kind,
      'num_devices': jax.device_count(), 'conv_impl': train_step.impl, 'dtype': model_cfg.dtype,
      'remat': model_cfg.remat, 'batch_size': batch_size, 'shape': shape,
      'timed_steps': steps, 'threads': len(os.sched_getaffinity(0)),
  }
  voxels = batch_size * math.prod(shape)
  peak = peak_flops or known_peak(dev.device_kind, model_cfg.dtype)

  if mode in ('train', 'both'):
    record['train_flops_per_step'] = train_step.flops
    record['compile_s'] = train_step.compile_s
    first, times, cpu_times = _time_calls(train_step, steps, warmup)
    record['first_step_s'] = first
    record.update(_stats(times, 'step_s'))
    record['step_cpu_s_median'] = statistics.median(cpu_times)
    record['voxels_per_s'] = voxels / record['step_s_median']
    if record['train_flops_per_step']:
      record['achieved_flops_per_s'] = record['train_flops_per_step'] / record['step_s_median']
      if peak:
        record['fraction_of_peak'] = record['achieved_flops_per_s'] / peak
    record['train_peak_rss_mb'] = hostmem.peak_rss_mb()
    record['step_temp_mb'] = temp_mb(train_step.compiled)

  if mode in ('infer', 'both'):
    def forward(m, variables, x):
      return m.apply(variables, x, train=False)

    variables = train_step.state.variables()
    image = train_step.batch['image']
    record['infer_flops'] = model_flops(functools.partial(forward, train_step.native_model),
                                        variables, image)
    infer_fn = jax.jit(functools.partial(forward, train_step.setup.model))
    t = time.perf_counter()
    compiled_infer = infer_fn.lower(variables, image).compile()
    record['infer_compile_s'] = time.perf_counter() - t
    _, times, cpu_times = _time_calls(lambda: compiled_infer(variables, image), steps, warmup)
    record.update(_stats(times, 'infer_s'))
    record['infer_cpu_s_median'] = statistics.median(cpu_times)
    record['infer_voxels_per_s'] = voxels / record['infer_s_median']
    if record['infer_flops']:
      record['infer_achieved_flops_per_s'] = record['infer_flops'] / record['infer_s_median']

  if peak:
    record['peak_flops_per_s'] = peak
  record['load_avg_1min'] = os.getloadavg()[0]  # other jobs on the machine skew the timings
  record['baseline_rss_mb'] = baseline_rss  # after imports, before any model work
  record['peak_rss_mb'] = hostmem.peak_rss_mb()
  try:
    mem = dev.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    mem = {}
  if 'peak_bytes_in_use' in mem:
    record['device_peak_mb'] = mem['peak_bytes_in_use'] / 2**20
  record['config'] = json.loads(config_lib.to_json(config))
  return record


def _define_flags() -> dict[str, Any]:
  """The command line's flags (defined only when run as a program: others import `run`)."""
  return {
      'config': config_flags.DEFINE_config_file('config', 'configs/unet3d.py:bench_ref',
                                                'Experiment config file (path[:args]).',
                                                lock_config=True),
      'steps': flags.DEFINE_integer('steps', 10, 'Timed steps (after warm-up).'),
      'warmup': flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.'),
      'mode': flags.DEFINE_enum('mode', 'both', ['train', 'infer', 'both'], 'What to time.'),
      'peak_flops': flags.DEFINE_float('peak_flops', 0.0, 'Device peak FLOP/s for '
                                       '`fraction_of_peak`; 0: a known value for the device '
                                       'kind and dtype, if any.'),
  }


def main(argv):
  del argv
  from unet_ds.models import ops  # pylint: disable=g-import-not-at-top
  ops.configure_xla_flags()  # before the first jax computation
  record = run(_FLAGS['config'].value, steps=_FLAGS['steps'].value,
               warmup=_FLAGS['warmup'].value, mode=_FLAGS['mode'].value,
               peak_flops=_FLAGS['peak_flops'].value)
  print(json.dumps(record))


if __name__ == '__main__':
  _FLAGS = _define_flags()
  app.run(main)
