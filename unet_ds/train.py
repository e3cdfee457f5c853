"""Training of one run: the pure jitted `train_step` / `eval_step`, the `Experiment` they run in,
and `train_and_evaluate` (the loop itself is `unet_ds.loop.fit`, shared with multi-run training).

The step is written against a ('data', 'space') mesh from the start: the batch is sharded over
`data` (and optionally the first spatial axis over `space`), the state is replicated, and the
same code runs on 1 or N devices, one host or many.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from unet_ds import budget
from unet_ds import config_lib
from unet_ds import evaluate as evaluate_lib
from unet_ds import logs
from unet_ds import loop
from unet_ds import losses
from unet_ds import metrics
from unet_ds import models
from unet_ds import sharding
from unet_ds import state as state_lib
from unet_ds.data import cases as cases_lib
from unet_ds.data import datasets
from unet_ds.data import pipeline
from unet_ds.models import layers

TrainState = state_lib.TrainState


@dataclasses.dataclass(frozen=True)
class DSLoss:
  """The configured DS loss: per-level loss, resolution matching and the weight schedule."""
  base_weights: tuple[float, ...]
  level_loss: Callable[..., jax.Array]
  num_classes: int
  schedule: str = 'constant'
  decay_steps: int = 1
  floor: float = 0.0
  target: str = 'downsample'
  downsample: str = 'nearest'
  ignore_index: int | None = None
  resize_impl: str = 'native'  # `target='upsample'`'s resizes: the model's conv_impl

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, model_cfg: models.UNetConfig) -> 'DSLoss':
    lc = c.loss
    weights = losses.output_weights(config_lib.weights_spec(lc.ds_weights), model_cfg.head_levels,
                                    side_losses=config_lib.side_losses(c))
    return cls(
        base_weights=tuple(float(w) for w in weights),
        level_loss=losses.make_level_loss(lc.name, include_background=lc.include_background,
                                          batch_dice=lc.batch_dice),
        num_classes=max(int(c.data.num_classes), 2),
        schedule=lc.ds_schedule, decay_steps=int(lc.ds_decay_steps or c.train.steps),
        floor=float(lc.ds_floor), target=lc.target, downsample=lc.downsample,
        ignore_index=None if lc.ignore_index < 0 else int(lc.ignore_index),
        resize_impl=layers.resolve_impl(model_cfg.conv_impl))

  def weights(self, step: jax.Array) -> jax.Array:
    return losses.scheduled_weights(np.asarray(self.base_weights), step, schedule=self.schedule,
                                    decay_steps=self.decay_steps, floor=self.floor)




def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, ds_loss: DSLoss,
               weights: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on the coefficient-weighted DS loss.

  The DS weights follow the step through `ds_loss`'s schedule, unless `weights` ([1 + n_heads])
  are given (vmapped multi-run training passes each run's own).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  if weights is None:
    weights = ds_loss.weights(state.step)

  def loss_fn(params):
    variables = {**state.variables(), 'params': params}
    (final, intermediates), updates = model.apply(
        variables, batch['image'], train=True, mutable=['batch_stats'],
        rngs={'dropout': dropout_rng})
    loss, aux = losses.deep_supervision_loss(
        final, intermediates, batch['label'], weights, level_loss=ds_loss.level_loss,
        num_classes=ds_loss.num_classes, target=ds_loss.target, downsample=ds_loss.downsample,
        ignore_index=ds_loss.ignore_index, resize_impl=ds_loss.resize_impl)
    return loss, (aux, updates)

  (loss, (aux, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  deltas, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, deltas)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=updates.get('batch_stats', state.batch_stats),
                            opt_state=opt_state)
  # param_norm: a non-finite update is caught at its own step, before it can be checkpointed.
  return new_state, {'loss': loss, 'level_losses': aux['level_losses'],
                     'ds_weights': aux['ds_weights'], 'grad_norm': optax.global_norm(grads),
                     'param_norm': optax.global_norm(params)}


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
              num_classes: int, ignore_index: int | None = None,
              regions: metrics.Regions = ()) -> jax.Array:
  """`[1 + n_heads, 3, K + R]` confusion counts of the batch's real (masked-in) examples."""
  final, intermediates = model.apply(state.variables(), batch['image'], train=False)
  return metrics.output_counts(final, intermediates, batch['label'], num_classes,
                               batch.get('mask'), ignore_index=ignore_index, regions=regions)


def warn_if_heads_inert(config: ml_collections.ConfigDict, ds_loss: DSLoss, run: str = '') -> bool:
  """Warns (and returns True) when `deep` weights every head 0, e.g. nnU-Net's weights, which
  drop the lowest head, on a model with one head: such a run trains like ds.mode=none."""
  if config.model.ds.mode != 'deep' or any(ds_loss.base_weights[1:]):
    return False
  logging.warning('%smodel.ds.mode=deep with loss.ds_weights=%s weights every head 0 (%s): '
                  'this run trains like ds.mode=none', f'{run}: ' if run else '',
                  config.loss.ds_weights, list(ds_loss.base_weights))
  return True


@dataclasses.dataclass
class Experiment:
  """One run built from a config (no compute yet): what `loop.fit` trains and scores."""
  config: ml_collections.ConfigDict
  workdir: str
  setup: state_lib.Setup
  mesh: jax.sharding.Mesh
  sources: dict[str, Any]
  ds_loss: DSLoss
  num_classes: int
  run_names = None  # one run (`loop.Trainer`)

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, workdir: str, quiet: bool = False
            ) -> 'Experiment':
    """The run of `config` in `workdir`; `quiet`: no warnings (a rebuild of a built config)."""
    setup = state_lib.Setup.from_config(config)  # validates: every config error before compute
    sharding.maybe_initialize_distributed(config.mesh)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(mesh, config.train.batch_size, 'batch_size')
    sharding.check_batch_size(mesh, config.train.eval_batch_size, 'eval_batch_size')
    ds_loss = DSLoss.from_config(config, setup.model_config)
    if not quiet:
      warn_if_heads_inert(config, ds_loss)
    return cls(config=config, workdir=os.path.abspath(workdir), setup=setup, mesh=mesh,
               sources=datasets.get_sources(config.data), ds_loss=ds_loss,
               num_classes=max(int(config.data.num_classes), 2))

  @property
  def model(self) -> nn.Module:
    return self.setup.model

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.setup.tx

  @property
  def lr(self) -> optax.Schedule:
    return self.setup.lr

  @property
  def input_shape(self) -> tuple[int, ...]:
    c = self.config
    return (c.train.batch_size, *datasets.training_shape(c.data), c.data.in_channels)

  def init_state(self) -> TrainState:
    # The seed is an argument, not a constant: runs that differ only in seed share one compiled
    # init (in a process, and through the persistent compilation cache).
    init = lambda seed: state_lib.create(self.model, self.tx, seed, self.input_shape)  # noqa
    return jax.jit(init, out_shardings=sharding.replicated(self.mesh))(
        np.int32(self.config.seed))  # validate() checked it is in [0, 2**31)

  def abstract_state(self) -> TrainState:
    return state_lib.abstract(self.setup, self.input_shape, sharding.replicated(self.mesh))

  def jit_train_step(self) -> Callable:
    repl = sharding.replicated(self.mesh)
    step = functools.partial(train_step, model=self.model, tx=self.tx, ds_loss=self.ds_loss)
    # Batch shardings come from the global arrays; the state is replicated and donated.
    return jax.jit(step, out_shardings=(repl, repl), donate_argnums=0)

  @property
  def regions(self) -> metrics.Regions:
    """`eval.regions` (unions of labels scored beside the classes; softmax outputs only)."""
    if self.setup.model_config.num_classes == 1:
      return ()
    return metrics.parse_regions(self.config.get('eval', {}).get('regions', ''), self.num_classes)

  def jit_eval_step(self) -> Callable:
    step = functools.partial(eval_step, model=self.model, num_classes=self.num_classes,
                             ignore_index=self.ds_loss.ignore_index, regions=self.regions)
    return jax.jit(step, out_shardings=sharding.replicated(self.mesh))

  def train_loader(self):
    c = self.config
    return pipeline.make_train_loader(
        self.sources['train'], batch_size=c.train.batch_size // jax.process_count(),
        seed=int(c.seed) % 2**32, shard_index=jax.process_index(),
        shard_count=jax.process_count(), transforms=datasets.train_transforms(c.data),
        batch_fn=datasets.train_batch_fn(c.data), worker_count=int(c.data.worker_count))

  # -- loop.Trainer
  def writers(self) -> list[logs.Writer]:
    return [logs.Writer(self.workdir)]

  def write_run_files(self, fresh: bool) -> None:
    """config.json, and for real data the held-out case ids (split.json) that eval scores.

    A resumed run keeps its split even if files were added to the data folder since.
    """
    writer = logs.Writer(self.workdir, tensorboard=False)
    writer.write_text('config.json', config_lib.to_json(self.config))
    if self.config.data.name in cases_lib.FILE_KINDS and (
        fresh or not os.path.exists(writer.path(cases_lib.SPLIT_FILE))):
      split = cases_lib.case_split(self.config.data)
      writer.write_json(cases_lib.SPLIT_FILE, split)
      if self.config.data.name == 'msd':  # what predict compares its inputs with
        writer.write_json(cases_lib.GEOMETRY_FILE,
                          cases_lib.training_geometry(self.config.data, split['train']))
    writer.close()

  def data_iterator(self) -> loop.DataIterator:
    return iter(self.train_loader())

  def shard(self, batch: Any) -> Any:
    return sharding.shard_batch(self.mesh, batch)

  def eval_counts(self, state: Any, eval_fn: Callable | None = None) -> np.ndarray:
    """`eval_fn`'s confusion counts summed over the whole validation split (int64).

    `[1 + n_heads, 3, K]` from this experiment's eval step; a multi-run eval step over stacked
    states adds a leading run axis.
    """
    eval_fn = eval_fn or self.jit_eval_step()
    c = self.config
    source = datasets.eval_source(c.data, self.sources['validation'])
    total = None
    for batch in pipeline.make_eval_batches(
        source, batch_size=c.train.eval_batch_size // jax.process_count(),
        shard_index=jax.process_index(), shard_count=jax.process_count()):
      counts = np.asarray(eval_fn(state, sharding.shard_batch(self.mesh, batch)), np.int64)
      total = counts if total is None else total + counts
    return total

  @functools.cached_property
  def _eval_fn(self) -> Callable:
    return self.jit_eval_step()

  def evaluate(self, state: TrainState) -> list[dict[str, Any]]:
    """In-training scores on the validation split, from pooled confusion counts."""
    return [metrics.summarize_outputs(self.eval_counts(state, self._eval_fn), self.regions)]

  def final_eval(self, state: TrainState, step: int) -> list[dict[str, Any]]:
    """The whole-image eval of the held-out cases, as `--mode=eval` gives it."""
    variables = state.variables()
    predict_fn = lambda x: self.model.apply(variables, x, train=False)[0]  # noqa: E731
    return [evaluate_lib.evaluate_run(self.config, self.workdir, predict_fn, step,
                                      log=logging.info)]

  def num_params(self, state: TrainState) -> int:
    return state_lib.num_params(state.params)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_changes: Sequence[str] = ()) -> dict[str, Any]:
  """Trains one run (resuming from the workdir's latest checkpoint), scores it, writes summary.json.

  `allow_changes`: config keys that may differ from the checkpoint's (see `unet_ds.loop`).
  """
  exp, out, plan, t0 = loop.fit_config(config, workdir, Experiment.build, allow_changes)
  if 'finished' in out:
    return out['finished']
  if out.get('stopped_early'):
    return out
  config = exp.config
  summary = loop.summary_record(out['evals'][0], out['in_training'][0], config, step=out['step'],
                                seconds=out['seconds'], seconds_total=out['seconds_total'],
                                num_params=out['num_params'],
                                conv_impl=layers.resolve_impl(config.model.conv_impl))
  summary['wall_seconds'] = time.time() - t0
  summary['budget'] = budget.summary_budget(plan, config, exp.workdir,
                                            wall_s=summary['wall_seconds'],
                                            steps_run=out['steps_run'], train_s=out['seconds'])
  logs.Writer(exp.workdir, tensorboard=False).write_json(loop.SUMMARY_FILE, summary)
  return summary
