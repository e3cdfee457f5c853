"""Throughput of K runs trained together (one vmapped step) vs the same K runs one by one.

  python -m benchmarks.multirun_throughput [--config=configs/unet3d.py] [--k=4]
      [--steps=5] [--warmup=1] [--repeats=3] [--config.multirun.ds_weights="('exp','same',...)"]

Prints one JSON line. Batches are random (like `unet_ds.bench`), built once on the host, so no
dataset is read. The K runs are `config.multirun`'s (seeds `seed, seed+1, ...` unless given; any
per-run DS settings apply). "Together" times the jitted `multirun.multi_train_step` on stacked
`[K, B, ...]` batches, both ways (`together_vmap`: batched ops; `together_map`: a loop over the
runs in the program; `config.multirun.vectorize`); "one by one" times each run's own jitted
`train.train_step` (the program `train.train_and_evaluate` runs). The two are interleaved `--repeats` times, so load from other
processes hits both alike, and the best repeat is reported: `run_steps_per_s` counts one step of
one run (a together step is K run-steps). Compilation is timed apart: once per together program, once per
distinct run program one by one. Process CPU seconds are reported too (steadier on a shared CPU),
and `cpu_util`, CPU seconds per wall second (how many cores the way kept busy).

The default config is the default 3D one (`configs/unet3d.py`: 32^3, 4 levels 8..64, batch 2),
the size whose single run leaves most of a 2-core CPU idle.
"""

from __future__ import annotations

import functools
import json
import resource
import time
from typing import Any, Callable

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/unet3d.py',
                                          'Experiment config file (path[:args]).',
                                          lock_config=True)
_K = flags.DEFINE_integer('k', 4, 'Runs trained together (overrides config.multirun.k).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per repeat, per run.')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved repeats; the best is reported.')

VECTORIZE = ('vmap', 'map')  # config.multirun.vectorize


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
  """(wall, process CPU) seconds of `fn()` (which blocks until its results are ready)."""
  t, c = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t, time.process_time() - c


def run(config: Any, k: int, steps: int = 5, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
  """Times K runs of `config` together and one by one; returns the JSON record."""
  import jax  # pylint: disable=g-import-not-at-top  (after flags)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unet_ds import config_lib  # pylint: disable=g-import-not-at-top
  from unet_ds import models  # pylint: disable=g-import-not-at-top
  from unet_ds import multirun  # pylint: disable=g-import-not-at-top
  from unet_ds import optim  # pylint: disable=g-import-not-at-top
  from unet_ds import sharding  # pylint: disable=g-import-not-at-top
  from unet_ds import train  # pylint: disable=g-import-not-at-top
  from unet_ds.data import datasets  # pylint: disable=g-import-not-at-top

  if k < 2 or steps < 1 or warmup < 0 or repeats < 1:
    raise ValueError(f'need k >= 2, steps >= 1, warmup >= 0, repeats >= 1; got {k}, {steps}, '
                     f'{warmup}, {repeats}')
  config.multirun.k = k
  runs = multirun.member_runs(config)  # validates every run's config
  model_cfg = config_lib.validate(runs[0].config)
  mesh = sharding.make_mesh(config.mesh)
  model = models.get_model(model_cfg)
  tx, _ = optim.make_optimizer(config.optim, int(config.train.steps))
  ds_losses = [train.DSLoss.from_config(r.config, model_cfg) for r in runs]
  batch_size = int(config.train.batch_size)
  shape = tuple(datasets.training_shape(config.data))
  input_shape = (batch_size, *shape, int(config.data.in_channels))
  num_classes = max(int(config.data.num_classes), 2)
  rng = np.random.default_rng(0)
  host_batches = [{'image': rng.standard_normal(input_shape, dtype=np.float32),
                   'label': rng.integers(0, num_classes, input_shape[:-1], dtype=np.int32)}
                  for _ in runs]
  repl = sharding.replicated(mesh)
  seeds = np.asarray([r.config.seed for r in runs], np.int32)

  # Together: one program for the K runs, vmapped (batched ops) or a loop over the runs.
  run_weights = multirun.RunWeights.from_losses(ds_losses)
  stacked = multirun.shard_stacked(mesh, host_batches)
  init = functools.partial(multirun.create_train_states, model, tx, input_shape=input_shape)
  first = jax.jit(init, out_shardings=repl)(seeds)
  together, compile_s, holder = {}, {}, {}  # holder: the states, replaced as steps donate them
  for vectorize in VECTORIZE:
    holder[vectorize] = jax.tree.map(jnp.copy, first)
    step = jax.jit(functools.partial(multirun.multi_train_step, model=model, tx=tx,
                                     ds_loss=ds_losses[0], vectorize=vectorize),
                   out_shardings=(repl, repl), donate_argnums=0)
    t = time.perf_counter()
    together[vectorize] = step.lower(first, stacked, run_weights).compile()
    compile_s[vectorize] = time.perf_counter() - t

  # One by one: each run's own program (runs with equal DS settings share one).
  batches = [sharding.shard_batch(mesh, b) for b in host_batches]
  singles, compile_singles = [], 0.0
  compiled_for: dict[tuple[Any, ...], Any] = {}
  for i, ds_loss in enumerate(ds_losses):
    key = (ds_loss.base_weights, ds_loss.schedule, ds_loss.floor)
    # Run i's own initial state (create_train_state of its seed) is slice i of the stacked one.
    holder[i] = jax.tree.map(lambda x, i=i: jax.device_put(x[i], repl), first)
    if key not in compiled_for:
      fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, ds_loss=ds_loss),
                   out_shardings=(repl, repl), donate_argnums=0)
      t = time.perf_counter()
      compiled_for[key] = fn.lower(holder[i], batches[i]).compile()
      compile_singles += time.perf_counter() - t
    singles.append(compiled_for[key])

  def run_together(n: int, vectorize: str) -> None:
    m = None
    for _ in range(n):
      holder[vectorize], m = together[vectorize](holder[vectorize], stacked, run_weights)
    jax.block_until_ready(m)

  def run_one_by_one(n: int) -> None:
    m = None
    for i, fn in enumerate(singles):
      for _ in range(n):
        holder[i], m = fn(holder[i], batches[i])
      jax.block_until_ready(m)

  timers = {f'together_{v}': functools.partial(run_together, vectorize=v) for v in VECTORIZE}
  timers['one_by_one'] = run_one_by_one
  best = {name: (float('inf'), 0.0) for name in timers}
  for fn in timers.values():
    fn(warmup)
  for _ in range(repeats):
    for name, fn in timers.items():
      best[name] = min(best[name], _timed(lambda fn=fn: fn(steps)))

  run_steps = k * steps
  dev = jax.devices()[0]
  record = {
      'k': k, 'runs': [r.name for r in runs], 'backend': jax.default_backend(),
      'device_kind': dev.device_kind, 'num_devices': jax.device_count(),
      'batch_size': batch_size, 'shape': list(shape), 'timed_steps_per_run': steps,
      'repeats': repeats,
  }
  for name, (seconds, cpu_seconds) in best.items():
    record[name] = {'seconds': seconds, 'cpu_seconds': cpu_seconds,
                    'cpu_util': cpu_seconds / seconds, 'run_steps_per_s': run_steps / seconds,
                    'cpu_seconds_per_run_step': cpu_seconds / run_steps}
  for v in VECTORIZE:
    record[f'together_{v}']['compile_s'] = compile_s[v]
    record[f'speedup_{v}'] = (record[f'together_{v}']['run_steps_per_s']
                              / record['one_by_one']['run_steps_per_s'])
  record['one_by_one'].update(compile_s=compile_singles, programs=len(compiled_for))
  record['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  record['config'] = json.loads(config_lib.to_json(config))
  return record


def main(argv):
  del argv
  from unet_ds.models import ops  # pylint: disable=g-import-not-at-top
  ops.configure_xla_flags()  # before the first jax computation
  print(json.dumps(run(_CONFIG.value, _K.value, steps=_STEPS.value, warmup=_WARMUP.value,
                       repeats=_REPEATS.value)))


if __name__ == '__main__':
  app.run(main)
