"""Training and evaluation: pure jitted `train_step` / `eval_step` and `train_and_evaluate`.

The step is written against a ('data', 'space') mesh from the start: the batch is sharded over
`data` (and optionally the first spatial axis over `space`), the state is replicated, and the
same code runs on 1 or N devices, one host or many.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterator, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from unet_ds import checkpoint
from unet_ds import config_lib
from unet_ds import logs
from unet_ds import losses
from unet_ds import metrics
from unet_ds import models
from unet_ds import optim
from unet_ds import sharding
from unet_ds.data import datasets
from unet_ds.data import pipeline
from unet_ds.models import layers


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key: checkpoints as a plain array

  def variables(self) -> dict[str, Any]:
    v = {'params': self.params}
    if self.batch_stats:
      v['batch_stats'] = self.batch_stats
    return v


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
        ignore_index=None if lc.ignore_index < 0 else int(lc.ignore_index))

  def weights(self, step: jax.Array) -> jax.Array:
    return losses.scheduled_weights(np.asarray(self.base_weights), step, schedule=self.schedule,
                                    decay_steps=self.decay_steps, floor=self.floor)



def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int,
                       input_shape: tuple[int, ...]) -> TrainState:
  """Initial state from `seed` (pure; jit it with a replicated out-sharding)."""
  # Parameters are drawn with the RngBitGenerator PRNG: XLA:CPU compiles a U-Net's init ~8x
  # faster than with threefry (seconds instead of a minute for a tiny model).
  init_rng = jax.random.key(seed, impl='rbg')
  state_rng = jax.random.PRNGKey(seed)  # dropout stream
  variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=state_rng)


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
        ignore_index=ds_loss.ignore_index)
    return loss, (aux, updates)

  (loss, (aux, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  deltas, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, deltas),
                            batch_stats=updates.get('batch_stats', state.batch_stats),
                            opt_state=opt_state)
  return new_state, {'loss': loss, 'level_losses': aux['level_losses'],
                     'ds_weights': aux['ds_weights'], 'grad_norm': optax.global_norm(grads)}


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
              num_classes: int) -> jax.Array:
  """`[1 + n_heads, 3, K]` confusion counts of the batch's real (masked-in) examples."""
  final, intermediates = model.apply(state.variables(), batch['image'], train=False)
  return metrics.output_counts(final, intermediates, batch['label'], num_classes,
                               batch.get('mask'))


@dataclasses.dataclass
class Experiment:
  """Everything built from a config before the loop (no compute yet beyond state init)."""
  config: ml_collections.ConfigDict
  workdir: str
  model: nn.Module
  mesh: jax.sharding.Mesh
  sources: dict[str, Any]
  tx: optax.GradientTransformation
  lr: optax.Schedule
  ds_loss: DSLoss
  num_classes: int

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, workdir: str) -> 'Experiment':
    model_cfg = config_lib.validate(config)  # every config error before any compute
    sharding.maybe_initialize_distributed(config.mesh)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(mesh, config.train.batch_size, 'batch_size')
    sharding.check_batch_size(mesh, config.train.eval_batch_size, 'eval_batch_size')
    tx, lr = optim.make_optimizer(config.optim, config.train.steps)
    return cls(config=config, workdir=os.path.abspath(workdir), model=models.get_model(model_cfg),
               mesh=mesh, sources=datasets.get_sources(config.data), tx=tx, lr=lr,
               ds_loss=DSLoss.from_config(config, model_cfg),
               num_classes=max(int(config.data.num_classes), 2))

  @property
  def input_shape(self) -> tuple[int, ...]:
    c = self.config
    return (c.train.batch_size, *datasets.training_shape(c.data), c.data.in_channels)

  def _init_fn(self) -> Callable[[jax.Array], TrainState]:
    # The seed is an argument, not a constant: runs that differ only in seed share one compiled
    # init (in a process, and through the persistent compilation cache).
    return lambda seed: create_train_state(self.model, self.tx, seed, self.input_shape)

  def _seed(self) -> np.int32:
    return np.int32(self.config.seed)  # validate() checked it is in [0, 2**31)

  def init_state(self) -> TrainState:
    return jax.jit(self._init_fn(), out_shardings=sharding.replicated(self.mesh))(self._seed())

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(self._init_fn(), self._seed())
    repl = sharding.replicated(self.mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)

  def jit_train_step(self) -> Callable:
    repl = sharding.replicated(self.mesh)
    step = functools.partial(train_step, model=self.model, tx=self.tx, ds_loss=self.ds_loss)
    # Batch shardings come from the global arrays; the state is replicated and donated.
    return jax.jit(step, out_shardings=(repl, repl), donate_argnums=0)

  def jit_eval_step(self) -> Callable:
    step = functools.partial(eval_step, model=self.model, num_classes=self.num_classes)
    return jax.jit(step, out_shardings=sharding.replicated(self.mesh))

  def train_loader(self):
    c = self.config
    return pipeline.make_train_loader(
        self.sources['train'], batch_size=c.train.batch_size // jax.process_count(),
        seed=int(c.seed) % 2**32, shard_index=jax.process_index(),
        shard_count=jax.process_count(), transforms=datasets.train_transforms(c.data),
        batch_fn=datasets.train_batch_fn(c.data), worker_count=int(c.data.worker_count))

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

  def evaluate(self, state: TrainState, eval_fn: Callable | None = None) -> dict[str, Any]:
    """Scores on the whole validation split, from summed confusion counts."""
    return metrics.summarize_outputs(self.eval_counts(state, eval_fn))


# ----------------------------------------------------------------------------- loop pieces
# Shared by this single-run trainer and `multirun` (K runs stacked on a leading axis).

def last_step(config: ml_collections.ConfigDict) -> int:
  """The step this invocation trains to: `train.steps`, or `train.stop_at_step` when earlier."""
  t = config.train
  return t.steps if t.stop_at_step <= 0 else min(t.stop_at_step, t.steps)


def check_finite(step: int, loss: Any, grad_norm: Any, *, run: str = '',
                 num_runs: int = 1) -> None:
  """Raises `FloatingPointError` naming the step (and `run`, of `num_runs`) at a non-finite loss."""
  if np.isfinite(loss) and np.isfinite(grad_norm):
    return
  of_run = f' of run {run}' if run else ''
  stopped = 'training' if num_runs == 1 else f'training of all {num_runs} runs'
  raise FloatingPointError(
      f'non-finite loss {float(loss)} (grad norm {float(grad_norm)}){of_run} at step {step}; '
      f'{stopped} stopped, the last good checkpoint is kept')


def train_record(step: int, m: dict[str, np.ndarray], *, lr: float,
                 steps_per_s: float) -> dict[str, Any]:
  """One `metrics.jsonl` line from one run's host-side step metrics."""
  return {'step': step, 'loss': float(m['loss']), 'level_losses': m['level_losses'],
          'ds_weights': m['ds_weights'], 'lr': lr, 'grad_norm': float(m['grad_norm']),
          'steps_per_s': steps_per_s}


def summary_record(last_eval: dict[str, Any], config: ml_collections.ConfigDict, *,
                   train_seconds: float, num_params: int) -> dict[str, Any]:
  """`summary.json`: the last eval plus the run's facts."""
  return {**last_eval, 'train_seconds': train_seconds, 'num_params': num_params,
          'ds_mode': config.model.ds.mode, 'backend': jax.default_backend(),
          'devices': jax.device_count(),
          'conv_impl': layers.resolve_impl(config.model.conv_impl)}


def run_loop(config: ml_collections.ConfigDict, state: Any, start: int, *,
             step_fn: Callable[[Any, Any], tuple[Any, Any]], next_batch: Callable[[], Any],
             save: Callable[[int, Any], None], evaluate: Callable[[Any], list[dict[str, Any]]],
             writers: Sequence[logs.Writer], lr: optax.Schedule,
             run_names: Sequence[str] | None = None
             ) -> tuple[Any, list[dict[str, Any]] | None, float]:
  """Trains steps `start + 1 .. last_step(config)`; `(state, last evals, seconds)`.

  The loop of one run or of K stacked runs (`run_names`, one writer each). `evaluate(state)`
  gives one score dict per run; they are written to each run's `eval.jsonl` every `eval_every`
  steps and at `train.steps`, and returned with their step (`None` when `train.stop_at_step`
  stopped the loop first). `save(step, state)` runs every `checkpoint_every` steps and at the
  last one. Metrics are fetched one step late so dispatch stays async, except that a state is
  never saved or scored before its step's loss was checked finite.
  """
  c = config
  t0 = time.time()
  log = _StepLogger(c, lr, writers, start, run_names)
  pending = None  # (step, device metrics)
  last = last_step(c)
  for step in range(start + 1, last + 1):
    state, m = step_fn(state, next_batch())
    if pending is not None:
      log(*pending)
    pending = (step, m)
    saving = step % c.train.checkpoint_every == 0 or step == last
    scoring = step % c.train.eval_every == 0 or step == c.train.steps
    if saving or scoring:
      log(*pending)
      pending = None
    if saving:
      save(step, state)
    if scoring:
      log.last_evals = [{'step': step, **e} for e in evaluate(state)]
      for writer, record in zip(writers, log.last_evals):
        writer.write_eval(record)
  log.close()
  if last < c.train.steps:
    return state, None, time.time() - t0
  if log.last_evals is None:  # resumed a finished run: score the restored state
    step = int(np.ravel(state.step)[0])
    log.last_evals = [{'step': step, **e} for e in evaluate(state)]
  return state, log.last_evals, time.time() - t0


class _StepLogger:
  """Checks every step's loss is finite; writes every `log_every`-th step; drives the bar.

  One writer per run. With `run_names` (multi-run) the metrics carry a leading run axis, and
  errors name the run.
  """

  def __init__(self, config: ml_collections.ConfigDict, lr: optax.Schedule,
               writers: Sequence[logs.Writer], start: int,
               run_names: Sequence[str] | None = None):
    self.config, self.lr, self.writers, self.run_names = config, lr, writers, run_names
    self.last_evals: list[dict[str, Any]] | None = None  # one per run
    self._clock = (time.time(), start)
    desc = 'train' if run_names is None else f'train x{len(run_names)}'
    self._bar = tqdm.tqdm(total=config.train.steps, initial=start,
                          disable=not writers[0].enabled, dynamic_ncols=True, desc=desc)

  def _per_run(self, step: int, m: Any) -> list[dict[str, np.ndarray]]:
    """Each run's host-side metrics, checked finite."""
    m = jax.tree.map(np.asarray, m)
    if self.run_names is None:
      check_finite(step, m['loss'], m['grad_norm'])
      return [m]
    per_run = [jax.tree.map(lambda x, i=i: x[i], m) for i in range(len(self.run_names))]
    for i, (name, r) in enumerate(zip(self.run_names, per_run)):
      check_finite(step, r['loss'], r['grad_norm'],
                   run=f'{name!r} (multirun index {i})', num_runs=len(self.run_names))
    return per_run

  def __call__(self, step: int, m: Any) -> None:
    per_run = self._per_run(step, m)
    self._bar.update(step - self._bar.n)
    c = self.config
    if step % c.train.log_every and step != c.train.steps:
      return
    now = time.time()
    t, s = self._clock
    self._clock = (now, step)
    lr = float(self.lr(step - 1))
    steps_per_s = (step - s) / max(now - t, 1e-9)  # each run advances every step
    for writer, r in zip(self.writers, per_run):
      writer.write_train(train_record(step, r, lr=lr, steps_per_s=steps_per_s))
    postfix = {'loss': ' '.join(f'{float(r["loss"]):.4f}' for r in per_run)}
    if self.last_evals is not None:
      postfix['dice'] = ' '.join(f'{e["mean_foreground_dice"]:.3f}' for e in self.last_evals)
    self._bar.set_postfix(postfix)

  def close(self) -> None:
    self._bar.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from the workdir's latest checkpoint), evaluates, writes logs and summary."""
  exp = Experiment.build(config, workdir)
  c = config
  writer = logs.Writer(exp.workdir)
  config_json = config_lib.to_json(c)
  if writer.enabled:
    with open(writer.path('config.json'), 'w') as f:
      f.write(config_json)
    if c.data.name in ('msd', 'folder2d'):
      from unet_ds import predict  # pylint: disable=g-import-not-at-top
      if not os.path.exists(writer.path(predict.SPLIT_FILE)):
        # The held-out case ids, so that a later --mode=eval scores exactly these cases.
        writer.write_json(predict.SPLIT_FILE, predict.case_split(c.data))
  ckpts = checkpoint.Checkpoints(os.path.join(exp.workdir, 'checkpoints'), c.train.max_to_keep)
  data_iter = iter(exp.train_loader())
  if ckpts.latest_step() is not None:
    state, data_state, start = ckpts.restore(exp.abstract_state())
    if data_state is not None:
      data_iter.set_state(data_state)
    writer.truncate_after(start)
  else:
    state, start = exp.init_state(), 0

  step_fn, eval_fn = exp.jit_train_step(), exp.jit_eval_step()
  try:
    return _train_loop(exp, state, start, data_iter, step_fn, eval_fn, ckpts, writer,
                       config_json)
  finally:  # on any error too: finish the async saves, so the last good checkpoint is complete
    ckpts.wait()
    ckpts.close()
    writer.close()


def _train_loop(exp: Experiment, state: TrainState, start: int, data_iter: Iterator,
                step_fn: Callable, eval_fn: Callable, ckpts: checkpoint.Checkpoints,
                writer: logs.Writer, config_json: str) -> dict[str, Any]:
  c = exp.config
  state, evals, seconds = run_loop(
      c, state, start, step_fn=step_fn,
      next_batch=lambda: sharding.shard_batch(exp.mesh, next(data_iter)),
      save=lambda step, state: ckpts.save(step, state, data_iter.get_state(), config_json),
      evaluate=lambda state: [exp.evaluate(state, eval_fn)], writers=[writer], lr=exp.lr)
  if evals is None:
    return {'step': last_step(c), 'stopped_early': True}
  summary = summary_record(evals[0], c, train_seconds=seconds,
                           num_params=int(sum(p.size for p in jax.tree.leaves(state.params))))
  writer.write_json('summary.json', summary)
  return summary


def restore_state(config: ml_collections.ConfigDict, workdir: str
                  ) -> tuple[Experiment, TrainState]:
  """The experiment of `config` and the latest checkpointed state of `workdir`."""
  exp = Experiment.build(config, workdir)
  directory = os.path.join(exp.workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoints in {directory}: train first (--mode=train)')
  ckpts = checkpoint.Checkpoints(directory, config.train.max_to_keep)
  state, _, _ = ckpts.restore(exp.abstract_state())
  ckpts.close()
  return exp, state


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`--mode=eval`: scores the workdir's latest checkpoint on the validation split."""
  exp, state = restore_state(config, workdir)
  result = {'step': int(state.step), **exp.evaluate(state)}
  logs.Writer(exp.workdir).write_json('eval_summary.json', result)
  return result
