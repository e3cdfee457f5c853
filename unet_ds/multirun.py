"""One-program multi-run training: K runs of one architecture trained together by `jax.vmap`.

The runs share the model, optimiser, data and loss form; they differ in seed (initial parameters,
dropout and the order of their data) and in the DS loss weights, schedule and floor, set per run by
`config.multirun` (`k`, `seeds`, `ds_weights`, `ds_schedule`, `ds_floor`). Their train states are
stacked along a leading run axis, their batches too (`[K, B, ...]`, each from its own loader seeded
as its single run would be), and one jitted step vmaps `train.train_step` over them, with each run's
DS weights computed inside the step from its step count and its own arrays. So K small runs fill a
device that one of them would leave idle, with one compilation instead of K.

`config.multirun.vectorize='map'` runs the same step as a loop over the runs inside the program
instead (`lax.map`): one compilation and the same results, at about the speed of the runs one by
one. That is the better choice on XLA:CPU for 3D models, where vmapped convolutions (different
kernels per run) become grouped convolutions that run several times slower than K plain ones.

Each run writes `WORKDIR/<run name>/{config.json,metrics.jsonl,eval.jsonl,summary.json}` exactly as
`train.train_and_evaluate` would for that run alone (its config has its own seed and DS settings and
multi-run off), so `experiments.report WORKDIR` reads them as ordinary runs. The stacked state and
the K data-iterator positions are checkpointed together in `WORKDIR/checkpoints`; a rerun resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from unet_ds import checkpoint
from unet_ds import config_lib
from unet_ds import logs
from unet_ds import losses
from unet_ds import metrics
from unet_ds import sharding
from unet_ds import train

_UNSAFE_CHARS = re.compile(r'[^A-Za-z0-9._+=,-]')


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass(frozen=True)
class Run:
  """One member run: its directory name and its resolved single-run config (multi-run off)."""
  name: str
  config: ml_collections.ConfigDict


def _format(value: Any) -> str:
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return '_'.join(_format(v) for v in value)
  return str(value).replace(',', '_')


def _weights_string(spec: Any) -> str:
  """A per-run `ds_weights` value as `loss.ds_weights` holds it (a scheme or 'a,b,c')."""
  return spec if isinstance(spec, str) else ','.join(repr(float(w)) for w in spec)


def member_runs(config: ml_collections.ConfigDict) -> list[Run]:
  """The K runs of `config.multirun` (validated), named by seed and the per-run DS settings.

  A name lists `seed` and every setting given per run, in the order seeds, ds_weights,
  ds_schedule, ds_floor: e.g. `seed=1` or `seed=0,ds_weights=1_0.5_0.25` (commas inside a value
  become `_`). Names are deterministic and, as runs must differ, unique.
  """
  config_lib.validate(config)
  mr = config.multirun
  k = int(mr.k)
  if k < 2:
    raise ValueError(f'config.multirun.k={k}: multi-run needs k >= 2 (train.train_and_evaluate '
                     'trains a single run)')
  runs = []
  for i in range(k):
    c = copy.deepcopy(config)
    c.seed = int(mr.seeds[i]) if mr.seeds else int(config.seed) + i
    parts = {'seed': c.seed}
    if mr.ds_weights:
      c.loss.ds_weights = _weights_string(mr.ds_weights[i])
      parts['ds_weights'] = c.loss.ds_weights
    if mr.ds_schedule:
      c.loss.ds_schedule = mr.ds_schedule[i]
      parts['ds_schedule'] = c.loss.ds_schedule
    if mr.ds_floor:
      c.loss.ds_floor = float(mr.ds_floor[i])
      parts['ds_floor'] = c.loss.ds_floor
    c.multirun.k, c.multirun.vectorize = 0, 'vmap'  # the single run's config: multi-run off
    for key in config_lib.MULTIRUN_LISTS:
      c.multirun[key] = ()
    name = _UNSAFE_CHARS.sub('_', ','.join(f'{key}={_format(v)}' for key, v in parts.items()))
    runs.append(Run(name=name, config=c))
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'config.multirun: runs share a directory name: {names}')
  return runs


# ----------------------------------------------------------------------------- the step

@flax.struct.dataclass
class RunWeights:
  """Per-run DS weight settings, stacked `[K, ...]` (one run's slice inside the vmapped step)."""
  base: jax.Array      # [K, 1 + n_heads] base weights
  schedule: jax.Array  # [K] int32: index into losses.SCHEDULES
  floor: jax.Array     # [K] float32

  @classmethod
  def from_losses(cls, ds_losses: Sequence[train.DSLoss]) -> 'RunWeights':
    return cls(base=jnp.asarray([l.base_weights for l in ds_losses], jnp.float32),
               schedule=jnp.asarray([losses.SCHEDULES.index(l.schedule) for l in ds_losses],
                                    jnp.int32),
               floor=jnp.asarray([l.floor for l in ds_losses], jnp.float32))


def scheduled_weights(run: RunWeights, step: jax.Array, *, decay_steps: int) -> jax.Array:
  """One run's DS weights at `step`: `losses.scheduled_weights` with a traced schedule choice.

  Every schedule's side-weight scale is computed and the run's is picked with jnp ops, so runs
  with different schedules stay in one program.
  """
  scales = jnp.stack([
      losses.side_weight_scale(step, schedule=s, decay_steps=decay_steps, floor=run.floor)
      for s in losses.SCHEDULES])
  return run.base.at[1:].multiply(scales[run.schedule])


def create_train_states(model: Any, tx: optax.GradientTransformation, seeds: jax.Array, *,
                        input_shape: tuple[int, ...]) -> train.TrainState:
  """`train.create_train_state` of each seed in `seeds [K]` (int32), stacked (pure; jit it).

  A loop (`lax.map`), not `vmap`: the parameters are drawn with the 'rbg' PRNG, whose bits under
  vmap differ from the unbatched ones, and each run must start exactly as its single run would.
  """
  return jax.lax.map(lambda seed: train.create_train_state(model, tx, seed, input_shape), seeds)


def _over_runs(fn: Callable[..., Any], vectorize: str, *args: Any) -> Any:
  """`fn` applied to each run's slice of `args` (stacked on axis 0): vmapped, or a loop."""
  if vectorize == 'vmap':
    return jax.vmap(fn)(*args)
  if vectorize == 'map':  # one run after another inside the program: each run's ops unbatched
    return jax.lax.map(lambda a: fn(*a), args)
  raise ValueError(f"config.multirun.vectorize: must be 'vmap' or 'map', got {vectorize!r}")


def multi_train_step(states: train.TrainState, batches: dict[str, jax.Array],
                     run_weights: RunWeights, *, model: Any, tx: optax.GradientTransformation,
                     ds_loss: train.DSLoss, vectorize: str = 'vmap'
                     ) -> tuple[train.TrainState, dict[str, jax.Array]]:
  """`train.train_step` over stacked states, batches `[K, B, ...]` and run weights."""
  def one(state, batch, run):
    weights = scheduled_weights(run, state.step, decay_steps=ds_loss.decay_steps)
    return train.train_step(state, batch, model=model, tx=tx, ds_loss=ds_loss, weights=weights)
  return _over_runs(one, vectorize, states, batches, run_weights)


def multi_eval_step(states: train.TrainState, batch: dict[str, jax.Array], *, model: Any,
                    num_classes: int, vectorize: str = 'vmap') -> jax.Array:
  """`[K, 1 + n_heads, 3, C]` confusion counts: every run scores the same batch."""
  def one(state):
    return train.eval_step(state, batch, model=model, num_classes=num_classes)
  return _over_runs(one, vectorize, states)


def shard_stacked(mesh: jax.sharding.Mesh, batches: Sequence[dict[str, np.ndarray]]
                  ) -> dict[str, jax.Array]:
  """K host-local batches -> global `[K, B, ...]` arrays, B sharded as in a single run."""
  out = {}
  for key in batches[0]:
    value = np.stack([np.asarray(b[key]) for b in batches])
    spec = sharding.batch_spec(value.ndim - 1, spatial=value.ndim > 2)
    out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, P(None, *spec)), value)
  return out


# ----------------------------------------------------------------------------- the experiment

@dataclasses.dataclass
class MultiExperiment:
  """The shared experiment (model, optimiser, mesh, data) and the K runs trained with it."""
  exp: train.Experiment
  runs: list[Run]
  run_weights: RunWeights

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, workdir: str) -> 'MultiExperiment':
    runs = member_runs(config)  # every config error before any compute
    exp = train.Experiment.build(runs[0].config, workdir)
    model_cfg = config_lib.validate(runs[0].config)
    ds_losses = [train.DSLoss.from_config(r.config, model_cfg) for r in runs]
    return cls(exp=exp, runs=runs, run_weights=RunWeights.from_losses(ds_losses))

  @property
  def k(self) -> int:
    return len(self.runs)

  def run_experiment(self, index: int) -> train.Experiment:
    """The shared experiment seen with run `index`'s config (its seed, its DS loss)."""
    run = self.runs[index]
    model_cfg = config_lib.validate(run.config)
    return dataclasses.replace(self.exp, config=run.config,
                               workdir=os.path.join(self.exp.workdir, run.name),
                               ds_loss=train.DSLoss.from_config(run.config, model_cfg))

  def _init_fn(self) -> Callable[[jax.Array], train.TrainState]:
    return functools.partial(create_train_states, self.exp.model, self.exp.tx,
                             input_shape=self.exp.input_shape)

  def _seeds(self) -> jax.Array:
    return jnp.asarray([int(r.config.seed) for r in self.runs], jnp.int32)

  def init_state(self) -> train.TrainState:
    return jax.jit(self._init_fn(), out_shardings=sharding.replicated(self.exp.mesh))(self._seeds())

  def abstract_state(self) -> train.TrainState:
    shapes = jax.eval_shape(self._init_fn(), self._seeds())
    repl = sharding.replicated(self.exp.mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)

  def jit_train_step(self) -> Callable:
    exp = self.exp
    repl = sharding.replicated(exp.mesh)
    step = functools.partial(multi_train_step, model=exp.model, tx=exp.tx, ds_loss=exp.ds_loss,
                             vectorize=exp.config.multirun.vectorize)
    return jax.jit(step, out_shardings=(repl, repl), donate_argnums=0)

  def jit_eval_step(self) -> Callable:
    step = functools.partial(multi_eval_step, model=self.exp.model,
                             num_classes=self.exp.num_classes,
                             vectorize=self.exp.config.multirun.vectorize)
    return jax.jit(step, out_shardings=sharding.replicated(self.exp.mesh))

  def train_loaders(self) -> list[Any]:
    """Each run's loader, exactly as its single run builds it (seeded with the run's seed)."""
    return [self.run_experiment(i).train_loader() for i in range(self.k)]

  def shard_batches(self, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    return shard_stacked(self.exp.mesh, batches)

  def evaluate(self, states: train.TrainState, eval_fn: Callable | None = None
               ) -> list[dict[str, Any]]:
    """Each run's scores on the whole validation split (`train.Experiment.evaluate` per run)."""
    counts = self.exp.eval_counts(states, eval_fn or self.jit_eval_step())
    return [metrics.summarize_outputs(c) for c in counts]


# ----------------------------------------------------------------------------- the loop

class _Iterators:
  """The K data iterators; their positions checkpoint as one JSON list (bytes)."""

  def __init__(self, loaders: Sequence[Any], names: Sequence[str]):
    self._iters = [iter(l) for l in loaders]
    self._names = list(names)

  def __next__(self) -> list[dict[str, np.ndarray]]:
    return [next(it) for it in self._iters]

  def get_state(self) -> bytes:
    return json.dumps([{'run': n, 'iterator': it.get_state().decode()}
                       for n, it in zip(self._names, self._iters)]).encode()

  def set_state(self, state: bytes, where: str) -> None:
    saved = json.loads(state.decode())
    names = [s['run'] for s in saved]
    if names != self._names:
      raise ValueError(f'{where} holds the runs {names}, but config.multirun gives {self._names}; '
                       'use a new workdir for different runs')
    for it, s in zip(self._iters, saved):
      it.set_state(s['iterator'].encode())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the K runs of `config.multirun` together (resuming), evaluates, writes per-run logs.

  Returns `{'step', 'runs': {name: summary}}` (or `{'step', 'stopped_early': True}` when
  `train.stop_at_step` stopped it), each summary as `train.train_and_evaluate` returns it.
  """
  mexp = MultiExperiment.build(config, workdir)
  exp = mexp.exp
  writers = [logs.Writer(os.path.join(exp.workdir, r.name)) for r in mexp.runs]
  for run, writer in zip(mexp.runs, writers):
    if writer.enabled:
      with open(writer.path('config.json'), 'w') as f:
        f.write(config_lib.to_json(run.config))
  config_json = config_lib.to_json(config)
  if jax.process_index() == 0:  # what the workdir holds: the runs and the config that made them
    with open(os.path.join(exp.workdir, 'multirun.json'), 'w') as f:
      json.dump({'runs': [r.name for r in mexp.runs], 'config': json.loads(config_json)}, f,
                indent=2)
  ckpts = checkpoint.Checkpoints(os.path.join(exp.workdir, 'checkpoints'),
                                 config.train.max_to_keep)
  data_iter = _Iterators(mexp.train_loaders(), [r.name for r in mexp.runs])
  if ckpts.latest_step() is not None:
    states, data_state, start = ckpts.restore(mexp.abstract_state())
    if data_state is not None:
      data_iter.set_state(data_state, f'checkpoint {start} in {ckpts.directory}')
    for writer in writers:
      writer.truncate_after(start)
  else:
    states, start = mexp.init_state(), 0

  try:
    return _train_loop(mexp, states, start, data_iter, ckpts, writers, config_json)
  finally:  # on any error too: finish the async saves, so the last good checkpoint is complete
    ckpts.wait()
    ckpts.close()
    for writer in writers:
      writer.close()


def _train_loop(mexp: MultiExperiment, states: train.TrainState, start: int,
                data_iter: _Iterators, ckpts: checkpoint.Checkpoints,
                writers: Sequence[logs.Writer], config_json: str) -> dict[str, Any]:
  c = mexp.exp.config
  step_fn, eval_fn = mexp.jit_train_step(), mexp.jit_eval_step()
  states, evals, seconds = train.run_loop(
      c, states, start, step_fn=lambda s, b: step_fn(s, b, mexp.run_weights),
      next_batch=lambda: mexp.shard_batches(next(data_iter)),
      save=lambda step, s: ckpts.save(step, s, data_iter.get_state(), config_json),
      evaluate=lambda s: mexp.evaluate(s, eval_fn), writers=writers, lr=mexp.exp.lr,
      run_names=[r.name for r in mexp.runs])
  if evals is None:
    return {'step': train.last_step(c), 'stopped_early': True}
  num_params = int(sum(p[0].size for p in jax.tree.leaves(states.params)))
  summaries = {}
  for i, (run, writer) in enumerate(zip(mexp.runs, writers)):
    summaries[run.name] = {
        **train.summary_record(evals[i], c, train_seconds=seconds, num_params=num_params),
        'multirun': {'k': mexp.k, 'index': i, 'name': run.name}}
    writer.write_json('summary.json', summaries[run.name])
  return {'step': evals[0]['step'], 'runs': summaries}
