"""A wall-clock budget: `train.minutes=N` sets `train.steps` so that the whole run fits in N minutes.

On a CPU the question is "the best model in N minutes", not "how many steps". Before training, a
throwaway copy of the run is built, compiled and timed: the train step (median of a few steps
after compilation), one in-training eval, and everything else it took (data, init,
compilations: `setup_s`). The real run pays that setup again (its learning-rate schedule is laid
out over the new step count, so its programs compile anew), then its steps and evals, then the
final whole-image eval (estimated as `FINAL_EVAL_FACTOR` in-training evals per flip-TTA pass
plus one more compilation). Steps are timed with their data fetch, as the loop runs them, and
planned `STEP_MARGIN` slower than measured: a long run's steady state (data workers, checkpoint
saves, other processes) is a little slower than a few calibration steps, and a schedule cut
short by the deadline never reaches its low learning rates. The number of steps is the largest that fits all of that after the calibration.
The learning-rate schedule and the DS weight schedule follow `train.steps`, so both fit too.
A few calibration steps can catch the machine busier or quieter than the run finds it, so at its
first eval the run re-plans once from its own measured pace (`Replan`). Should the machine slow
down after that, training stops at the first step past the budget less the final eval's
estimate (checkpointed and evaluated there).

A resumed budgeted run keeps the step count its checkpoint was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from typing import Any, Callable

import jax
import ml_collections

from unet_ds import checkpoint
from unet_ds import state as state_lib
from unet_ds import workdir as workdir_lib

FINAL_EVAL_FACTOR = 3.0  # whole-image sliding-window eval vs one in-training eval (estimate)
STEP_MARGIN = 1.06       # planned step time / measured (module doc)
TIMED_STEPS = 5
UNDERUSE = 0.85          # a run ending before this fraction of its budget says why (underuse_note)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the budget decided, recorded in `summary.json` (`budget`)."""
  minutes: float
  steps: int
  step_s: float
  eval_s: float
  final_eval_s: float
  compile_s: float
  setup_s: float
  calibration_s: float
  replanned_at: int = 0   # the step at which `Replan` changed `steps` (0: never)
  first_steps: int = 0    # `steps` as first planned, when re-planned

  @property
  def train_deadline_s(self) -> float:
    """Seconds from the start after which training stops whatever the plan (its safety net when
    the machine slows down): the budget less the final eval's estimate."""
    return self.minutes * 60 - self.final_eval_s - self.compile_s

  def predicted_seconds(self, eval_every: int) -> float:
    return self.calibration_s + run_seconds(self.steps, step_s=self.step_s, eval_s=self.eval_s,
                                            final_eval_s=self.final_eval_s, compile_s=self.compile_s, setup_s=self.setup_s,
                                            eval_every=eval_every)


PLAN_FILE = 'budget.json'  # the plan, in the workdir, for the summary of a resumed run
# The config keys `fit` sets from the budget: a budgeted run's config.json holds its own values.
PLANNED_KEYS = ('train.steps', 'optim.warmup_steps')


def record(plan: Plan, eval_every: int) -> dict[str, Any]:
  """The plan as `summary.json`'s `budget` (and `budget.json`): its fields and predicted seconds."""
  return {**dataclasses.asdict(plan), 'predicted_seconds': plan.predicted_seconds(eval_every)}


def summary_budget(plan: Plan | None, config: ml_collections.ConfigDict, workdir: str, *,
                   wall_s: float = 0.0, steps_run: int = 0, train_s: float = 0.0
                   ) -> dict[str, Any] | None:
  """`summary.json`'s `budget`: this launch's plan, with `underuse_note`'s `note` (also printed)
  when the run (`wall_s` in all, `steps_run` steps in `train_s`) left much of it unused; for a
  resumed budgeted run (no new plan) the one saved in `WORKDIR/budget.json` when the run was
  planned, marked `resumed`; None without a budget."""
  eval_every = int(config.train.eval_every)
  if plan is not None:
    cut = steps_run < plan.steps  # planned this launch, so it ran from step 0
    note = (deadline_note if cut else underuse_note)(
        plan, wall_s=wall_s, steps_run=steps_run, train_s=train_s, eval_every=eval_every)
    if note:
      print(note, flush=True)
    return {**record(plan, eval_every), **({'stopped_at_deadline': steps_run} if cut else {}),
            **({'note': note} if note else {})}
  minutes = float(config.train.get('minutes', 0) or 0)
  if minutes <= 0:
    return None
  path = os.path.join(workdir, PLAN_FILE)
  if not os.path.exists(path):  # planned before budget.json was written
    return {'minutes': minutes, 'steps': int(config.train.steps), 'resumed': True}
  with open(path) as f:
    return {**json.load(f), 'resumed': True}


def run_seconds(steps: int, *, step_s: float, eval_s: float, final_eval_s: float,
                compile_s: float, setup_s: float, eval_every: int) -> float:
  """Predicted seconds of a run of `steps` after calibration (module doc)."""
  evals = math.ceil(steps / eval_every)
  return setup_s + steps * step_s + evals * eval_s + final_eval_s + compile_s


def steps_within(budget_s: float, *, spent_s: float, step_s: float, eval_s: float,
                 final_eval_s: float, compile_s: float, setup_s: float, eval_every: int) -> int:
  """The most steps whose `run_seconds` fit in `budget_s - spent_s` (0 if none)."""
  times = dict(step_s=step_s, eval_s=eval_s, final_eval_s=final_eval_s, compile_s=compile_s,
               setup_s=setup_s, eval_every=eval_every)
  left = budget_s - spent_s
  n = max(int((left - run_seconds(0, **times)) / (step_s + eval_s / eval_every)) + 1, 0)
  while n > 0 and run_seconds(n, **times) > left:
    n -= 1
  return n


REPLAN_TOLERANCE = 0.1  # re-plan when the measured pace changes the step count by more


class Replan:
  """Re-plans a budgeted run once, after its first in-training eval, from the pace of its own
  steps: the calibration's few steps can be timed while the machine is busier (or quieter) than
  during the run, which left budgets a third unused (or cut short by the deadline, the schedule
  unfinished). When the measured pace changes the step count by more than `REPLAN_TOLERANCE`,
  `train.steps` changes and the run goes on with programs rebuilt for it: the learning-rate and
  DS-weight schedules span the new count (the optimiser state carries over; the schedules
  barely moved in the steps already taken). Checkpoints from then on hold the new count, so a
  resume continues it.
  """

  def __init__(self, plan: Plan, config: ml_collections.ConfigDict, workdir: str,
               build: Callable[[ml_collections.ConfigDict, str], Any], started: float):
    self.plan, self._config, self._workdir = plan, config, workdir
    self._build, self._started = build, started
    self._every = every = int(config.train.eval_every)
    # Once, at the first eval, if it leaves most of the run to re-plan; not across processes,
    # whose clocks could disagree on the count.
    self.at_step = every if 1 < every <= plan.steps // 2 and jax.process_count() == 1 else 0

  def __call__(self, step: int, step_s: float) -> Any:
    """A trainer rebuilt for the re-planned step count, or None to go on as planned.

    Args:
      step: the step just done (`at_step`).
      step_s: measured seconds per step over the steps before it (the first quarter, which
        warms up, left out; compilation and evals not included).
    """
    p = self.plan
    # The rest of the run as `fit` counts a run, its setup already paid, and the train and eval
    # programs compiled anew for the new count.
    steps = step + steps_within(p.minutes * 60, spent_s=time.time() - self._started,
                                step_s=step_s, eval_s=p.eval_s, final_eval_s=p.final_eval_s,
                                compile_s=2 * p.compile_s, setup_s=0.0, eval_every=self._every)
    if steps <= step or abs(steps - p.steps) <= REPLAN_TOLERANCE * p.steps:
      return None
    print(f'train.minutes={p.minutes:g}: re-planned at step {step}: steps take {step_s:.3f} s, '
          f'{p.step_s:.3f} s as calibrated; {p.steps} -> {steps} steps (the learning-rate and '
          'DS-weight schedules span the new count)', flush=True)
    config = ml_collections.ConfigDict(self._config.to_dict())
    config.train.steps = steps
    self.plan = dataclasses.replace(p, steps=steps, step_s=step_s, replanned_at=step,
                                    first_steps=p.steps)
    if jax.process_index() == 0:
      workdir_lib.write_json(os.path.join(self._workdir, PLAN_FILE),
                             record(self.plan, self._every))
    return self._build(config, self._workdir)


def _paces(plan: Plan, *, steps_run: int, train_s: float, eval_every: int
           ) -> tuple[float, float]:
  """(seconds per step as run, as planned), evals included, as the loop runs them."""
  return (train_s / max(steps_run, 1),
          plan.step_s + plan.eval_s / max(eval_every, 1))


def underuse_note(plan: Plan | None, *, wall_s: float, steps_run: int, train_s: float,
                  eval_every: int) -> str | None:
  """Why a run planned this launch ended well before its budget (under `UNDERUSE` of it), or None.

  The steps, and the learning-rate schedule over them, are planned from the calibration and
  re-planned at most once (`Replan`), so a machine that was busier during the calibration than
  during the run can still leave time unused; the user is told rather than left to wonder why a
  15-minute run took 10.
  """
  if plan is None or wall_s >= UNDERUSE * plan.minutes * 60:
    return None
  budget_s = plan.minutes * 60
  ran, planned = _paces(plan, steps_run=steps_run, train_s=train_s, eval_every=eval_every)
  why = ('the machine was busier during the calibration than after it' if ran < 0.9 * planned
         else 'the setup and final-eval estimates were generous')
  return (f'train.minutes={plan.minutes:g} used {wall_s:.0f} of {budget_s:.0f} s: {steps_run} '
          f'steps took {ran:.3f} s each (evals included) against {planned:.3f} s planned, so '
          f'{why}. Steps are planned at the start and re-planned at most once, at the first eval '
          '(the learning-rate schedule spans them); a rerun on a quieter machine uses more of '
          'the budget')


def deadline_note(plan: Plan, *, wall_s: float, steps_run: int, train_s: float,
                  eval_every: int) -> str:
  """Why a run planned this launch stopped at its deadline before its planned steps."""
  ran, planned = _paces(plan, steps_run=steps_run, train_s=train_s, eval_every=eval_every)
  return (f'train.minutes={plan.minutes:g} stopped training at its deadline, step {steps_run} '
          f'of {plan.steps} planned ({wall_s:.0f} s in all): steps took {ran:.3f} s each (evals '
          f'included) against {planned:.3f} s planned, so the machine was busier after the '
          'calibration than during it, and the learning-rate schedule stopped short of its end')


def too_short(minutes: float, *, spent_s: float, **times: float) -> str:
  """Why `minutes` fits no step, with the least that fits one: the fixed costs (calibration,
  the real run's setup, the final eval and its compilation) dwarf a step, so naming only the
  step and compile times left users puzzled that e.g. 30 s did not fit a 9 s compilation."""
  one_step = spent_s + run_seconds(1, **times)
  least = math.ceil(one_step / 6) / 10  # minutes, rounded up to 0.1
  return (f'config.train.minutes={minutes}: not even one step fits: calibration took '
          f'{spent_s:.1f} s, and the run itself needs {run_seconds(0, **times):.1f} s besides its '
          f'steps (data, init and compilation {times["setup_s"]:.1f} s, the final eval '
          f'{times["final_eval_s"]:.1f} s and its compilation {times["compile_s"]:.1f} s), '
          f'{one_step:.1f} s with one {times["step_s"]:.2f} s step > {minutes * 60:.0f} s; set '
          f'--config.train.minutes={least:g} or more, or a smaller model or patch')


def _block(tree: Any) -> None:
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, 'block_until_ready') else x, tree)


def calibrate(trainer: Any) -> tuple[float, float, float]:
  """(compile + first step, median step, one in-training eval) seconds of a throwaway run."""
  state = trainer.init_state()
  step_fn = trainer.jit_train_step()
  data = trainer.data_iterator()
  batch = trainer.shard(next(data))
  t = time.perf_counter()
  state, m = step_fn(state, batch)
  _block(m)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(TIMED_STEPS):
    t = time.perf_counter()
    state, m = step_fn(state, trainer.shard(next(data)))
    _block(m)
    times.append(time.perf_counter() - t)
  trainer.evaluate(state)  # compiles the eval step
  t = time.perf_counter()
  trainer.evaluate(state)
  return compile_s, statistics.median(times), time.perf_counter() - t


def fit(config: ml_collections.ConfigDict, workdir: str,
        build: Callable[[ml_collections.ConfigDict, str], Any]
        ) -> tuple[ml_collections.ConfigDict, Plan | None]:
  """`config` with `train.steps` set by `train.minutes` (unchanged when it is 0), and the plan.

  Args:
    config: the run's config; `train.minutes` > 0 turns the budget on.
    workdir: the run's folder; with a checkpoint there, its saved step count is kept.
    build: `(config, workdir) -> trainer` (`train.Experiment.build`).
  """
  minutes = float(config.train.get('minutes', 0) or 0)
  if minutes <= 0:
    return config, None
  t0 = time.perf_counter()
  directory = os.path.join(os.path.abspath(workdir), state_lib.CHECKPOINT_DIR)
  config = ml_collections.ConfigDict(config.to_dict())
  if os.path.isdir(directory) and os.listdir(directory):
    ckpts = checkpoint.Checkpoints(directory)
    try:
      latest = ckpts.latest_step()
      if latest is not None:
        saved = ckpts.saved_config()
        config.train.steps = int(saved['train']['steps'])
        config.optim.warmup_steps = int(saved['optim']['warmup_steps'])
        if latest < config.train.steps and jax.process_index() == 0:
          print(f'train.minutes={minutes:g}: resuming at step {latest} towards the '
                f'{config.train.steps} steps planned when the run started; a resume is not '
                'budgeted again (train.stop_at_step ends it earlier)', flush=True)
        return config, None
    finally:
      ckpts.close()
  compile_s, step_s, eval_s = calibrate(build(config, workdir))
  spent = time.perf_counter() - t0
  setup_s = max(spent - TIMED_STEPS * step_s - eval_s, 0.0)
  step_s *= STEP_MARGIN
  passes = 2 ** len(tuple(config.get('inference', {}).get('tta_axes', ()) or ()))
  final_eval_s = FINAL_EVAL_FACTOR * eval_s * passes
  steps = steps_within(minutes * 60, spent_s=spent, step_s=step_s, eval_s=eval_s,
                       final_eval_s=final_eval_s, compile_s=compile_s, setup_s=setup_s,
                       eval_every=int(config.train.eval_every))
  if steps < 1:
    raise ValueError(too_short(minutes, spent_s=spent, step_s=step_s, eval_s=eval_s,
                               final_eval_s=final_eval_s, compile_s=compile_s, setup_s=setup_s,
                               eval_every=int(config.train.eval_every)))
  config.train.steps = steps
  config.optim.warmup_steps = min(int(config.optim.warmup_steps), max(steps // 10, 0))
  plan = Plan(minutes=minutes, steps=steps, step_s=step_s, eval_s=eval_s,
              final_eval_s=final_eval_s, compile_s=compile_s, setup_s=setup_s,
              calibration_s=spent)
  if jax.process_index() == 0:  # for the summary of a later resume, which plans nothing
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.write_json(os.path.join(workdir, PLAN_FILE),
                           record(plan, int(config.train.eval_every)))
  return config, plan
