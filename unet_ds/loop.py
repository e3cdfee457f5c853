"""The training loop, one for a single run (`train.Experiment`) and for K stacked runs
(`multirun.MultiExperiment`): resume, step, log, evaluate, checkpoint, score, stop cleanly.

What it guarantees about the workdir:
* one trainer at a time (`workdir.WorkdirLock`, naming the holder);
* a resume continues only the run its checkpoint holds: the checkpoint's config is compared with
  this launch's before anything in the workdir is touched, and any change beyond
  `workdir.SAFE_CHANGES` is refused naming the keys (`allow_changes` accepts them by name);
* an eval due at step N is written before checkpoint N is saved, so a resume from N never skips it;
* a non-finite step never leaves a checkpoint behind: the loss of step N + 1 is the first to see
  the parameters saved at N, so when it is not finite, checkpoints from N on are moved aside
  (`checkpoints-unreadable/`), and a resume starts from the one before;
* SIGTERM / SIGINT (cluster preemption, Ctrl-C) checkpoint the current step and raise
  `Interrupted`, which `unet_ds.main` turns into a one-line message and exit status 128 + signal.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
from typing import Any, Callable, Iterator, Protocol, Sequence

import jax
import ml_collections
import numpy as np
import optax
import tqdm

from unet_ds import budget
from unet_ds import checkpoint
from unet_ds import config_lib
from unet_ds import hostmem
from unet_ds import logs
from unet_ds import state as state_lib
from unet_ds import workdir as workdir_lib
from unet_ds.data import cases as cases_lib


SUMMARY_FILE = 'summary.json'


class Interrupted(Exception):
  """Training stopped by a signal after checkpointing; `signum` says which."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


class NonFiniteError(FloatingPointError):
  """A step's loss or norms are not finite; `step` says which."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


class DataIterator(Protocol):
  def __next__(self) -> Any: ...
  def get_state(self) -> bytes: ...
  def set_state(self, state: bytes) -> None: ...


class Trainer(Protocol):
  """What the loop needs from an experiment (single run or K stacked runs)."""
  config: ml_collections.ConfigDict
  workdir: str
  lr: optax.Schedule
  run_names: Sequence[str] | None  # None: one run; else the K runs (metrics carry a run axis)

  def writers(self) -> list[logs.Writer]: ...
  def write_run_files(self, fresh: bool) -> None: ...
  def init_state(self) -> Any: ...
  def abstract_state(self) -> Any: ...
  def jit_train_step(self) -> Callable[[Any, Any], tuple[Any, Any]]: ...
  def data_iterator(self) -> DataIterator: ...
  def shard(self, batch: Any) -> Any: ...
  def evaluate(self, state: Any) -> list[dict[str, Any]]: ...
  def final_eval(self, state: Any, step: int) -> list[dict[str, Any]]: ...
  def num_params(self, state: Any) -> int: ...


def last_step(config: ml_collections.ConfigDict) -> int:
  """The step this invocation trains to: `train.steps`, or `train.stop_at_step` when earlier."""
  t = config.train
  return t.steps if t.stop_at_step <= 0 else min(t.stop_at_step, t.steps)


def check_finite(step: int, m: dict[str, np.ndarray], *, run: str = '', num_runs: int = 1) -> None:
  """Raises `NonFiniteError` naming the step (and `run`) at a non-finite loss or norm."""
  values = {k: float(m[k]) for k in ('loss', 'grad_norm', 'param_norm') if k in m}
  if all(np.isfinite(v) for v in values.values()):
    return
  of_run = f' of run {run}' if run else ''
  stopped = 'training' if num_runs == 1 else f'training of all {num_runs} runs'
  shown = ', '.join(f'{k} {v}' for k, v in values.items())
  raise NonFiniteError(step, f'non-finite {shown}{of_run} at step {step}; {stopped} stopped')


def train_record(step: int, m: dict[str, np.ndarray], *, lr: float,
                 steps_per_s: float) -> dict[str, Any]:
  """One `metrics.jsonl` line from one run's host-side step metrics."""
  return {'step': step, 'loss': float(m['loss']), 'level_losses': m['level_losses'],
          'ds_weights': m['ds_weights'], 'lr': lr, 'grad_norm': float(m['grad_norm']),
          'steps_per_s': steps_per_s}


def eval_record(step: int, scores: dict[str, Any]) -> dict[str, Any]:
  """One `eval.jsonl` line: the in-training score under its own name."""
  return {'step': step, 'pooled_foreground_dice': scores['mean_foreground_dice'],
          'final': scores['final'], 'heads': scores['heads']}


def summary_record(final_eval: dict[str, Any], in_training: dict[str, Any] | None,
                   config: ml_collections.ConfigDict, *, step: int, seconds: float,
                   seconds_total: float | None, num_params: int, conv_impl: str
                   ) -> dict[str, Any]:
  """`summary.json`: the whole-image eval of the held-out cases (top level, as `--mode=eval`
  reports it), the last in-training scores per output, and the run's facts.

  `train_seconds` sums every launch that trained the run (`fit`'s `seconds_total`); when the
  checkpoint it resumed from predates that record, it is this launch's alone and
  `train_seconds_partial` says so.
  """
  eval_summary = {k: v for k, v in final_eval.items() if k != 'cases'}
  out = {'step': step, 'mean_foreground_dice': final_eval['mean_foreground_dice'],
         'dice_per_class': final_eval['per_class']['dice'], 'eval': eval_summary}
  if in_training is not None:
    out.update(pooled_foreground_dice=in_training['pooled_foreground_dice'],
               final=in_training['final'], heads=in_training['heads'])
  if seconds_total is None:
    out['train_seconds_partial'] = True
  return {**out, 'train_seconds': seconds if seconds_total is None else seconds_total,
          'train_seconds_this_launch': seconds, 'num_params': num_params,
          'ds_mode': config.model.ds.mode, 'backend': jax.default_backend(),
          'devices': jax.device_count(), 'conv_impl': conv_impl}


@contextlib.contextmanager
def _signals_to_flag() -> Iterator[dict[str, int]]:
  """SIGTERM / SIGINT set `flag['signum']` instead of killing the process (main thread only)."""
  flag: dict[str, int] = {}
  handler = lambda signum, frame: flag.setdefault('signum', signum)  # noqa: E731
  try:
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  except ValueError:  # not the main thread: leave signals alone
    previous = {}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@contextlib.contextmanager
def _signals_stop_eval(step: int, directory: str) -> Iterator[None]:
  """SIGTERM / SIGINT during the final whole-image eval (checkpoint `step` already saved) stop
  it at once with `Interrupted`, instead of waiting for an eval that can take minutes."""
  def handler(signum, frame):
    del frame
    raise Interrupted(signum, f'{signal.Signals(signum).name}: the checkpoint of step {step} was '
                      f'saved in {directory} before its evaluation, which was stopped; score it '
                      'with --mode=eval (or run the same command again)')
  try:
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  except ValueError:  # not the main thread: leave signals alone
    previous = {}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


class _StepLog:
  """Host side of the steps: finite checks, `metrics.jsonl` every `log_every`, the progress bar."""

  def __init__(self, trainer: Trainer, writers: Sequence[logs.Writer], start: int):
    self.trainer, self.writers = trainer, writers
    self.config = trainer.config
    self._clock = (time.time(), start)
    names = trainer.run_names
    self.bar = tqdm.tqdm(total=self.config.train.steps, initial=start,
                         disable=not writers[0].enabled, dynamic_ncols=True,
                         desc='train' if names is None else f'train x{len(names)}')

  def retarget(self, trainer: Trainer) -> None:
    """Goes on for `trainer` (a re-planned run: its step count and schedule)."""
    self.trainer, self.config = trainer, trainer.config
    self.bar.total = self.config.train.steps
    self.bar.refresh()

  def __call__(self, step: int, m: Any) -> None:
    m = jax.tree.map(np.asarray, m)
    names = self.trainer.run_names
    if names is None:
      per_run = [m]
      check_finite(step, m)
    else:
      per_run = [jax.tree.map(lambda x, i=i: x[i], m) for i in range(len(names))]
      for i, (name, r) in enumerate(zip(names, per_run)):
        check_finite(step, r, run=f'{name!r} (multirun index {i})', num_runs=len(names))
    self.bar.update(step - self.bar.n)
    c = self.config
    if step % c.train.log_every and step != c.train.steps:
      return
    now = time.time()
    t, s = self._clock
    self._clock = (now, step)
    lr = float(self.trainer.lr(step - 1))
    steps_per_s = (step - s) / max(now - t, 1e-9)  # each run advances every step
    for writer, r in zip(self.writers, per_run):
      writer.write_train(train_record(step, r, lr=lr, steps_per_s=steps_per_s))
    self.bar.set_postfix({'loss': ' '.join(f'{float(r["loss"]):.4f}' for r in per_run)})


def _check_resume(ckpts: checkpoint.Checkpoints, config_json: str,
                  allow_changes: Sequence[str]) -> list[str]:
  """The changed keys `allow_changes` accepts; `workdir.ConfigChangedError` for any other
  difference between the latest checkpoint's config and `config_json`."""
  new = json.loads(config_json)
  path = ckpts.path(ckpts.steps()[-1])
  accepted = workdir_lib.check_resume(config_lib.fill_defaults(ckpts.saved_config()), new,
                                      allow_changes, path)
  step, steps = ckpts.steps()[-1], int(new['train']['steps'])
  if steps < step:
    raise workdir_lib.ConfigChangedError(
        f'{path}: train.steps={steps} is below the step this run has reached ({step}): a run '
        f'cannot be cut back to fewer steps; give train.steps >= {step}, or train anew in '
        'another --workdir')
  return accepted


def _steps_note(ckpts: checkpoint.Checkpoints, config_json: str, start: int) -> str | None:
  """What a changed `train.steps` does to the schedules, said when the resume accepts it."""
  old = int(config_lib.fill_defaults(ckpts.saved_config())['train']['steps'])
  new = int(json.loads(config_json)['train']['steps'])
  if old == new:
    return None
  return (f'resume: train.steps {old} -> {new}: the learning-rate and DS-weight schedules now '
          f'span {new} steps, so from step {start} they are what a {new}-step run has there '
          '(a decayed learning rate goes back up)')


def check_resume_early(config: ml_collections.ConfigDict, workdir: str,
                       allow_changes: Sequence[str] = ()) -> int | None:
  """Refuses a resume under a changed config before any data is built or compiled: the check
  `fit` repeats under the workdir lock, done first so a refused launch costs nothing. Returns the
  latest checkpoint's step (None for a new run)."""
  directory = os.path.join(os.path.abspath(workdir), state_lib.CHECKPOINT_DIR)
  if not os.path.isdir(directory) or not os.listdir(directory):
    return None
  if config.data.name in cases_lib.FILE_KINDS:  # first: a changed plan follows from new cases
    cases_lib.check_same_cases(config.data, workdir)
  ckpts = checkpoint.Checkpoints(directory)
  try:
    step = ckpts.latest_step()
    if step is not None:
      _check_resume(ckpts, config_lib.to_json(config), allow_changes)
    return step
  finally:
    ckpts.close()


def _restore(trainer: Trainer, ckpts: checkpoint.Checkpoints, data_iter: DataIterator,
             config_json: str, allow_changes: Sequence[str]
             ) -> tuple[Any, int, bool, float | None]:
  """(state, step, fresh, seconds): the latest readable checkpoint, its config checked against
  this launch's, or a new state; `fresh` when the run's data files are to be written anew;
  `seconds` the training time of the launches before (None: an older checkpoint lacks it)."""
  if ckpts.latest_step() is None:
    return trainer.init_state(), 0, True, 0.0
  # The config first: a changed model is named by its keys, not by mismatching arrays.
  accepted = _check_resume(ckpts, config_json, allow_changes)
  if accepted:
    print(f'resume: accepted config changes since the checkpoint: {", ".join(accepted)}')
  state, data_state, start = ckpts.restore(trainer.abstract_state())
  note = _steps_note(ckpts, config_json, start) if 'train.steps' in accepted else None
  if note:
    print(note)
  for path in ckpts.set_aside_after(start):  # unreadable later checkpoints, kept for a look
    print(f'resume: continuing from step {start}; the unreadable checkpoint is now {path}')
  if data_state is not None:
    try:
      data_iter.set_state(data_state)
    except ValueError as e:  # e.g. grain's sampler: the data has another number of records
      raise ValueError(f'{trainer.workdir}: the checkpoint\'s data position (step {start}) does '
                       f'not fit the data as prepared now ({str(e).splitlines()[0][:200]}); '
                       'the data changed since the run started: restore it, or use a new '
                       '--workdir') from None
  # The split is written anew only when the data itself was allowed to change.
  fresh = any(k.startswith('data.') and k != 'data.data_dir' for k in accepted)
  return state, start, fresh, ckpts.train_seconds(start)


def _set_aside_unverified(ckpts: checkpoint.Checkpoints, failed_step: int) -> list[str]:
  """Moves away the checkpoints whose parameters produced the non-finite `failed_step`."""
  ckpts.wait()
  return ckpts.set_aside_after(failed_step - 2)


def finished_summary(config: ml_collections.ConfigDict, workdir: str,
                     step: int | None) -> dict[str, Any] | None:
  """The run's summary.json if it finished: written at its latest checkpoint's `step` (from
  `check_resume_early`), which has reached `train.steps` or at which its time budget stopped it
  (`train.minutes`); else None."""
  path = os.path.join(workdir, SUMMARY_FILE)
  if step is None or not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None  # scored again, and written anew
  if summary.get('step') != step:
    return None
  if step < int(config.train.steps) and not (summary.get('budget') or {}).get(
      'stopped_at_deadline'):
    return None
  return summary


def fit_config(config: ml_collections.ConfigDict, workdir: str,
               build: Callable[..., Trainer], allow_changes: Sequence[str] = ()
               ) -> tuple[Trainer, dict[str, Any], Any, float]:
  """A run from its config, as both trainers (`train`, `multirun`) start one: validates it, turns
  `train.minutes` into steps (`budget.fit`), refuses a changed resume before building anything,
  then builds the trainer and `fit`s it (re-planned once when budgeted, `budget.Replan`).

  `build(config, workdir, quiet=False)`: the budget's calibration and re-plan builds are quiet,
  so a config warning is said once. Returns (trainer, `fit`'s output, the `budget.Plan` the run
  went by or None, the start's `time.time()`); for a run already finished at `train.steps`, (None,
  `{'step', 'finished': its summary.json}`, ...) without building anything.
  """
  t0 = time.time()
  config_lib.validate(config)  # a bad value is named before a resume check asks to allow it
  rebuild = functools.partial(build, quiet=True)
  config, plan = budget.fit(config, workdir, rebuild)  # train.minutes -> train.steps
  step = check_resume_early(config, workdir, allow_changes)  # a refused resume builds nothing
  summary = finished_summary(config, workdir, step)
  if summary is not None:  # nothing to train or score again: keep what it wrote
    cut = ' (its time budget ended it)' if summary['step'] < config.train.steps else ''
    print(f'{workdir}: finished at step {summary["step"]} of {config.train.steps}{cut}; its '
          'summary.json is kept (--mode=eval scores it again; a higher train.steps, with '
          '--allow_config_change=train.steps, trains it further)', flush=True)
    return None, {'step': summary['step'], 'finished': summary}, plan, t0
  trainer = build(config, workdir)
  replan = budget.Replan(plan, config, workdir, rebuild, t0) if plan else None
  out = fit(trainer, allow_changes, deadline=t0 + plan.train_deadline_s if plan else None,
            replan=replan)
  return trainer, out, (replan.plan if replan else plan), t0


def fit(trainer: Trainer, allow_changes: Sequence[str] = (),
        deadline: float | None = None, replan: Any = None) -> dict[str, Any]:
  """Trains `trainer` from its workdir's latest checkpoint to `last_step`, then scores it.

  `deadline` (a `time.time()`): training stops at the first step past it, checkpointed and
  evaluated, as if it were the last (a wall-clock budget's safety net).
  `replan` (`budget.Replan`, fresh runs): at its `at_step`, after that step's eval and
  checkpoint, it gets the measured seconds per step and may return a trainer rebuilt for a new
  step count, which the loop goes on with (same state and data position).
  Returns the last in-training records and whole-image evals, per run:
  `{'step', 'stopped_early'?: True, 'evals': [...], 'in_training': [...], 'steps_run' and
  'seconds' (this launch's training), 'seconds_total' (every launch's; None if an older
  checkpoint lacks it)}`.
  """
  c = trainer.config
  writers = trainer.writers()
  lock = workdir_lib.WorkdirLock(trainer.workdir, enabled=writers[0].enabled)
  with lock:
    config_json = config_lib.to_json(c)
    ckpts = checkpoint.Checkpoints(os.path.join(trainer.workdir, state_lib.CHECKPOINT_DIR),
                                   c.train.max_to_keep)
    try:
      data_iter = trainer.data_iterator()
      state, start, fresh, before = _restore(trainer, ckpts, data_iter, config_json,
                                             allow_changes)
      trainer.write_run_files(fresh)  # only after the resume was accepted
      for writer in writers:
        writer.truncate_after(start)
      with _signals_to_flag() as flag:
        return _run(trainer, state, start, data_iter, ckpts, writers, config_json, flag,
                    deadline, before, replan if start == 0 else None)
    finally:  # on any error too: finish the async saves, so the last good checkpoint is complete
      ckpts.wait()
      ckpts.close()
      for writer in writers:
        writer.close()


def _run(trainer: Trainer, state: Any, start: int, data_iter: DataIterator,
         ckpts: checkpoint.Checkpoints, writers: Sequence[logs.Writer], config_json: str,
         flag: dict[str, int], deadline: float | None = None,
         seconds_before: float | None = 0.0, replan: Any = None) -> dict[str, Any]:
  c = trainer.config
  step_fn = trainer.jit_train_step()
  replan_at = replan.at_step if replan is not None else 0
  # The pace a re-plan goes by: from the step a quarter of the way to the re-plan (the first
  # steps warm up the data pipeline and caches) up to the re-plan step's eval.
  paced_from = start + max(1, (replan_at - start) // 4)
  t_paced = t_eval = None
  log = _StepLog(trainer, writers, start)
  t0, last, evals = time.time(), last_step(c), None
  # Training time summed over launches (None once an older checkpoint in the chain lacked it).
  total = lambda: None if seconds_before is None else seconds_before + time.time() - t0  # noqa
  save = lambda step, state: ckpts.save(step, state, data_iter.get_state(), config_json,  # noqa
                                        total())
  pending = None  # (step, device metrics): fetched one step late so dispatch stays async
  step = start
  try:
    while step < last:  # `last` moves when the run is re-planned
      step += 1
      state, m = step_fn(state, trainer.shard(next(data_iter)))
      if step == start + 1:  # compiled: hand the compiler's freed heap back to the OS
        hostmem.trim_host_heap()
      if step == paced_from:
        t_paced = time.time()
      if pending is not None:
        log(*pending)
      pending = (step, m)
      out_of_time = deadline is not None and time.time() > deadline and step < last
      saving = step % c.train.checkpoint_every == 0 or step == last or out_of_time
      scoring = step % c.train.eval_every == 0 or step == c.train.steps or out_of_time
      if saving or scoring or 'signum' in flag:
        log(*pending)
        pending = None
      if scoring:  # before the checkpoint of this step: a resume from it never skips the eval
        t_eval = time.time() if step == replan_at else t_eval
        evals = [eval_record(step, e) for e in trainer.evaluate(state)]
        for writer, record in zip(writers, evals):
          writer.write_eval(record)
        log.bar.set_postfix({'dice': ' '.join(f'{e["pooled_foreground_dice"]:.3f}'
                                              for e in evals)})
      if saving or 'signum' in flag:
        save(step, state)
      if 'signum' in flag:
        ckpts.wait()
        name = signal.Signals(flag['signum']).name
        raise Interrupted(flag['signum'], f'{name}: checkpoint of step {step} saved in '
                          f'{ckpts.directory}; run the same command again to resume')
      if out_of_time:
        print(f'time budget reached: training stops at step {step} of {c.train.steps}')
        break
      if step == replan_at and t_eval is not None and t_paced is not None:
        rebuilt = replan(step, (t_eval - t_paced) / max(step - paced_from + 1, 1))
        if rebuilt is not None:  # the same state and data, programs for the new step count
          trainer, c = rebuilt, rebuilt.config
          step_fn, last = trainer.jit_train_step(), last_step(c)
          config_json = config_lib.to_json(c)  # what later checkpoints record
          trainer.write_run_files(fresh=False)
          log.retarget(trainer)
  except NonFiniteError as e:
    moved = _set_aside_unverified(ckpts, e.step)
    kept = ckpts.latest_step()
    aside = f' ({len(moved)} later ones moved to {ckpts.directory}-unreadable)' if moved else ''
    raise NonFiniteError(e.step, f'{e}; the last good checkpoint is '
                         f'{"step " + str(kept) if kept is not None else "none"}{aside}') from None
  finally:
    log.bar.close()
  seconds, seconds_total = time.time() - t0, total()
  if last < c.train.steps and step == last:
    return {'step': last, 'stopped_early': True}
  step = int(np.ravel(state.step)[0])
  if 'signum' in flag:  # arrived after the last step's checkpoint
    raise Interrupted(flag['signum'], f'{signal.Signals(flag["signum"]).name}: checkpoint of step '
                      f'{step} saved in {ckpts.directory}; score it with --mode=eval (or run '
                      'the same command again)')
  with _signals_stop_eval(step, ckpts.directory):
    if evals is None:  # resumed a finished run: score the restored state
      evals = [eval_record(step, e) for e in trainer.evaluate(state)]
    final = trainer.final_eval(state, step)
  return {'step': step, 'steps_run': step - start, 'in_training': evals, 'evals': final,
          'seconds': seconds, 'seconds_total': seconds_total,
          'num_params': trainer.num_params(state)}
