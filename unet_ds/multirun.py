"""One-program multi-run training: K runs of one architecture trained together by `jax.vmap`.

The runs share the model, optimiser, data and loss form; they differ in seed (initial parameters,
dropout and the order of their data) and in the DS loss weights, schedule and floor, set per run by
`config.multirun` (`k`, `seeds`, `ds_weights`, `ds_schedule`, `ds_floor`). Their train states are
stacked along a leading run axis, their batches too (`[K, B, ...]`, each from its own loader seeded
as its single run would be), and one jitted step vmaps `train.train_step` over them, with each run's
DS weights computed inside the step from its step count and its own arrays. So K small runs fill a
device that one of them would leave idle, with one compilation instead of K.

On CPU with `conv_impl` onednn (the single-device default), each vmapped convolution stays one
custom call that runs the K runs' convolutions side by side, one per core (`models.ops.onednn`),
and the norms, activations and optimiser update run as K-times larger XLA ops
(`benchmarks/multirun_throughput.py` measures it against the runs one by one; docs/results.md).
`config.multirun.vectorize='map'` runs the same step as a loop over the runs inside the program
instead (`lax.map`): one compilation and the same results (the fallback where vmapped
convolutions are slow: XLA's own, `conv_impl` cpu_fast/native, turn them into grouped
convolutions, which XLA:CPU runs slower than K plain ones).

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
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from unet_ds import budget
from unet_ds import config_lib
from unet_ds import dirnames
from unet_ds import logs
from unet_ds import loop
from unet_ds import losses
from unet_ds import metrics
from unet_ds import sharding
from unet_ds import state as state_lib
from unet_ds import train
from unet_ds import workdir as workdir_lib


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
    name = dirnames.safe_name(','.join(f'{key}={_format(v)}' for key, v in parts.items()))
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
                        input_shape: tuple[int, ...]) -> state_lib.TrainState:
  """`state.create` of each seed in `seeds [K]` (int32), stacked (pure; jit it).

  A loop (`lax.map`), not `vmap`: the parameters are drawn with the 'rbg' PRNG, whose bits under
  vmap differ from the unbatched ones, and each run must start exactly as its single run would.
  """
  return jax.lax.map(lambda seed: state_lib.create(model, tx, seed, input_shape), seeds)


def _over_runs(fn: Callable[..., Any], vectorize: str, *args: Any) -> Any:
  """`fn` applied to each run's slice of `args` (stacked on axis 0): vmapped, or a loop."""
  if vectorize == 'vmap':
    return jax.vmap(fn)(*args)
  if vectorize == 'map':  # one run after another inside the program: each run's ops unbatched
    return jax.lax.map(lambda a: fn(*a), args)
  raise ValueError(f"config.multirun.vectorize: must be 'vmap' or 'map', got {vectorize!r}")


def multi_train_step(states: state_lib.TrainState, batches: dict[str, jax.Array],
                     run_weights: RunWeights, *, model: Any, tx: optax.GradientTransformation,
                     ds_loss: train.DSLoss, vectorize: str = 'vmap'
                     ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """`train.train_step` over stacked states, batches `[K, B, ...]` and run weights."""
  def one(state, batch, run):
    weights = scheduled_weights(run, state.step, decay_steps=ds_loss.decay_steps)
    return train.train_step(state, batch, model=model, tx=tx, ds_loss=ds_loss, weights=weights)
  return _over_runs(one, vectorize, states, batches, run_weights)


def multi_eval_step(states: state_lib.TrainState, batch: dict[str, jax.Array], *, model: Any,
                    num_classes: int, vectorize: str = 'vmap', ignore_index: int | None = None,
                    regions: metrics.Regions = ()) -> jax.Array:
  """`[K, 1 + n_heads, 3, C]` confusion counts: every run scores the same batch."""
  def one(state):
    return train.eval_step(state, batch, model=model, num_classes=num_classes,
                           ignore_index=ignore_index, regions=regions)
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
  def build(cls, config: ml_collections.ConfigDict, workdir: str, quiet: bool = False
            ) -> 'MultiExperiment':
    runs = member_runs(config)  # every config error before any compute
    exp = train.Experiment.build(runs[0].config, workdir, quiet=True)
    ds_losses = [train.DSLoss.from_config(r.config, exp.setup.model_config) for r in runs]
    if not quiet:
      for run, ds_loss in zip(runs, ds_losses):
        train.warn_if_heads_inert(run.config, ds_loss, run.name)
    return cls(exp=exp, runs=runs, run_weights=RunWeights.from_losses(ds_losses),
               config=config)

  config: ml_collections.ConfigDict = None  # the multi-run config (checkpointed with the state)

  @property
  def k(self) -> int:
    return len(self.runs)

  @property
  def workdir(self) -> str:
    return self.exp.workdir

  @property
  def lr(self) -> optax.Schedule:
    return self.exp.lr

  @property
  def run_names(self) -> list[str]:
    return [r.name for r in self.runs]

  def run_experiment(self, index: int) -> train.Experiment:
    """The shared experiment seen with run `index`'s config (its seed, its DS loss)."""
    run = self.runs[index]
    return dataclasses.replace(self.exp, config=run.config,
                               workdir=os.path.join(self.exp.workdir, run.name),
                               ds_loss=train.DSLoss.from_config(run.config,
                                                                self.exp.setup.model_config))

  def _init_fn(self) -> Callable[[jax.Array], state_lib.TrainState]:
    return functools.partial(create_train_states, self.exp.model, self.exp.tx,
                             input_shape=self.exp.input_shape)

  def _seeds(self) -> jax.Array:
    return jnp.asarray([int(r.config.seed) for r in self.runs], jnp.int32)

  def init_state(self) -> state_lib.TrainState:
    return jax.jit(self._init_fn(), out_shardings=sharding.replicated(self.exp.mesh))(self._seeds())

  def abstract_state(self) -> state_lib.TrainState:
    return state_lib.abstract(self.exp.setup, self.exp.input_shape,
                              sharding.replicated(self.exp.mesh), num_runs=self.k)

  def jit_train_step(self) -> Callable:
    exp = self.exp
    repl = sharding.replicated(exp.mesh)
    step = functools.partial(multi_train_step, model=exp.model, tx=exp.tx, ds_loss=exp.ds_loss,
                             vectorize=exp.config.multirun.vectorize)
    jitted = jax.jit(step, out_shardings=(repl, repl), donate_argnums=0)
    return lambda states, batches: jitted(states, batches, self.run_weights)

  @functools.cached_property
  def _eval_fn(self) -> Callable:
    step = functools.partial(multi_eval_step, model=self.exp.model,
                             num_classes=self.exp.num_classes,
                             vectorize=self.exp.config.multirun.vectorize,
                             ignore_index=self.exp.ds_loss.ignore_index, regions=self.exp.regions)
    return jax.jit(step, out_shardings=sharding.replicated(self.exp.mesh))

  def train_loaders(self) -> list[Any]:
    """Each run's loader, exactly as its single run builds it (seeded with the run's seed)."""
    return [self.run_experiment(i).train_loader() for i in range(self.k)]

  # -- loop.Trainer
  def writers(self) -> list[logs.Writer]:
    return [logs.Writer(os.path.join(self.workdir, r.name)) for r in self.runs]

  def write_run_files(self, fresh: bool) -> None:
    """Each run's config.json (its single-run config), and `multirun.json` naming the runs."""
    for i in range(self.k):
      self.run_experiment(i).write_run_files(fresh)
    if jax.process_index() == 0:
      workdir_lib.write_json(os.path.join(self.workdir, state_lib.MULTIRUN_FILE),
                             {'runs': self.run_names,
                              'config': json.loads(config_lib.to_json(self.config))})

  def data_iterator(self) -> '_Iterators':
    return _Iterators(self.train_loaders(), self.run_names)

  def shard(self, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    return shard_stacked(self.exp.mesh, batches)

  def evaluate(self, states: state_lib.TrainState) -> list[dict[str, Any]]:
    """Each run's in-training scores on the validation split (pooled counts)."""
    counts = self.exp.eval_counts(states, self._eval_fn)
    return [metrics.summarize_outputs(c, self.exp.regions) for c in counts]

  def final_eval(self, states: state_lib.TrainState, step: int) -> list[dict[str, Any]]:
    """Each run's whole-image eval of the held-out cases (as `--mode=eval` in its folder)."""
    return [self.run_experiment(i).final_eval(jax.tree.map(lambda x, i=i: x[i], states), step)[0]
            for i in range(self.k)]

  def num_params(self, states: state_lib.TrainState) -> int:
    return state_lib.num_params(states.params, stacked=True)


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

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state.decode())
    names = [s['run'] for s in saved]
    if names != self._names:
      raise ValueError(f'the checkpoint holds the runs {names}, but config.multirun gives '
                       f'{self._names}; use a new workdir for different runs')
    for it, s in zip(self._iters, saved):
      it.set_state(s['iterator'].encode())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_changes: Sequence[str] = ()) -> dict[str, Any]:
  """Trains the K runs of `config.multirun` together (resuming), scores them, writes per-run logs.

  Returns `{'step', 'runs': {name: summary}}` (or `{'step', 'stopped_early': True}` when
  `train.stop_at_step` stopped it), each summary as `train.train_and_evaluate` returns it.
  """
  mexp, out, plan, t0 = loop.fit_config(config, workdir, MultiExperiment.build, allow_changes)
  if out.get('stopped_early'):
    return out
  config = mexp.config
  conv_impl = train.layers.resolve_impl(config.model.conv_impl)
  wall_s = time.time() - t0
  budget_record = budget.summary_budget(plan, config, mexp.workdir, wall_s=wall_s,
                                        steps_run=out['steps_run'], train_s=out['seconds'])
  summaries = {}
  for i, run in enumerate(mexp.runs):
    summaries[run.name] = {
        **loop.summary_record(out['evals'][i], out['in_training'][i], run.config,
                              step=out['step'], seconds=out['seconds'],
                              seconds_total=out['seconds_total'],
                              num_params=out['num_params'], conv_impl=conv_impl),
        'multirun': {'k': mexp.k, 'index': i, 'name': run.name},
        'wall_seconds': wall_s,
        'budget': budget_record}
    logs.Writer(os.path.join(mexp.workdir, run.name), tensorboard=False).write_json(
        'summary.json', summaries[run.name])
  return {'step': out['step'], 'runs': summaries}
