"""train.minutes: the step count planned from measured times, honoured on a tiny run, kept on resume."""

import json

import pytest

from unet_ds import budget
from unet_ds import checkpoint
from unet_ds import config_lib
from unet_ds import train


def test_steps_within_is_the_largest_count_that_fits():
  # 90 s left: setup 4 + n steps of 1 s + (ceil(n / 10) evals + 3 final) of 5 s + compile 1.
  n = budget.steps_within(100, spent_s=10, step_s=1.0, eval_s=5.0, final_eval_s=15.0,
                          compile_s=1.0, setup_s=4.0, eval_every=10)
  assert n == 45
  assert 4 + 45 + (5 + 3) * 5 + 1 <= 90 < 4 + 46 + (5 + 3) * 5 + 1
  assert budget.steps_within(10, spent_s=9, step_s=1.0, eval_s=1.0, final_eval_s=3.0,
                             compile_s=1.0, setup_s=0.0, eval_every=1) == 0


def test_a_budgeted_run_fits_its_minutes_replans_and_resumes_with_its_steps(
    tmp_path, data_dir, monkeypatch, capsys, caplog):
  """The calibration times its steps 8x too slow (as on a busy moment): the run measures its own
  pace at the first eval, plans more steps, and its schedule spans them to the end. (8x, not a
  smaller factor: the parallel suite's load on the cores can change between the calibration and
  the re-plan by 2-3x, which must not hide the re-plan.)"""
  real = budget.calibrate
  def slow(trainer):
    compile_s, step_s, eval_s = real(trainer)
    return compile_s, 8 * step_s, eval_s
  monkeypatch.setattr(budget, 'calibrate', slow)
  workdir = tmp_path / 'a' / 'new'  # not there yet: the run makes it
  c = config_lib.apply_args(config_lib.base_config(2), 'ds=deep,smoke')
  c.data.data_dir, c.mesh.data = data_dir, 1
  c.train.update(minutes=1.0, steps=100000, eval_every=20, checkpoint_every=20, log_every=1)
  c.model.depth, c.loss.ds_weights = 3, 'nnunet'  # its one head weighted 0: a config warning
  summary = train.train_and_evaluate(c, str(workdir))
  # Said once, though the budget builds the run three times (calibration, run, re-plan).
  assert caplog.text.count('this run trains like ds.mode=none') == 1
  plan = summary['budget']
  assert 1 <= summary['step'] <= plan['steps']  # fewer only if the machine slowed down
  assert summary['wall_seconds'] <= 1.3 * 60 + 15, summary['wall_seconds']
  assert plan['replanned_at'] == 20 and plan['steps'] > 1.5 * plan['first_steps'], plan
  assert 're-planned at step 20' in capsys.readouterr().out
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['train']['steps'] == plan['steps'] and saved['train']['minutes'] == 1.0
  ckpts = checkpoint.Checkpoints(str(workdir / 'checkpoints'))  # a resume continues the new count
  assert ckpts.saved_config()['train']['steps'] == plan['steps']
  ckpts.close()
  lrs = [json.loads(l)['lr'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  if not plan.get('stopped_at_deadline'):
    assert lrs[-1] < 0.01 * max(lrs)  # the cosine schedule reached its end
  # The same command again (up to the step reached) resumes with the planned steps: not refused.
  c.train.stop_at_step = summary['step']
  again = train.train_and_evaluate(c, str(workdir))
  assert again['step'] == summary['step']
  # A resume's summary still says what the budget planned (saved when it was planned).
  saved_plan = {k: v for k, v in plan.items()  # what happened is the launch's
                if k not in ('note', 'stopped_at_deadline')}
  assert json.loads((workdir / budget.PLAN_FILE).read_text()) == saved_plan
  assert budget.summary_budget(None, c, str(workdir)) == {**saved_plan, 'resumed': True}


def test_minutes_must_not_be_negative():
  c = config_lib.base_config(2)
  c.train.minutes = -1.0
  with pytest.raises(ValueError, match='config.train.minutes'):
    config_lib.validate(c)


def test_a_budget_too_short_for_one_step_names_the_least_that_fits():
  # 30 s: calibration 15 s + setup 15 s + final eval 0.1 s + its compilation 9 s leave no step.
  times = dict(step_s=0.1, eval_s=0.01, final_eval_s=0.1, compile_s=9.0, setup_s=15.0,
               eval_every=10)
  assert budget.steps_within(30, spent_s=15, **times) == 0
  message = budget.too_short(0.5, spent_s=15, **times)
  assert 'calibration took 15.0 s' in message and '24.1 s besides its steps' in message
  least = float(message.split('--config.train.minutes=')[1].split()[0])
  assert least == 0.7  # 39.21 s rounded up to 0.1 minute
  assert budget.steps_within(least * 60, spent_s=15, **times) >= 1
  assert budget.steps_within(least * 60 - 6, spent_s=15, **times) == 0


def _plan(**kw):
  return budget.Plan(**{**dict(minutes=15.0, steps=6105, step_s=0.14, eval_s=2.0,
                               final_eval_s=30.0, compile_s=10.0, setup_s=20.0,
                               calibration_s=15.0), **kw})


def test_a_run_that_left_its_budget_unused_says_why(capsys):
  c = config_lib.base_config(3)
  c.train.eval_every = 200
  # Calibrated under load (0.14 s + 2 s / 200 per step planned), ran at 0.0885 s: 596 of 900 s.
  record = budget.summary_budget(_plan(), c, 'unused', wall_s=596.0, steps_run=6105,
                                 train_s=540.0)
  note = record['note']
  assert 'train.minutes=15 used 596 of 900 s' in note and '0.088 s each' in note, note
  assert '0.150 s planned' in note and 'busier during the calibration' in note, note
  assert note in capsys.readouterr().out
  # Steps as planned, the fixed costs overestimated: said so instead.
  note = budget.underuse_note(_plan(), wall_s=700.0, steps_run=4000, train_s=600.0,
                              eval_every=200)
  assert 'estimates were generous' in note, note
  # A run that used the budget, and a run without one, say nothing.
  assert 'note' not in budget.summary_budget(_plan(), c, 'used', wall_s=880.0, steps_run=6105,
                                             train_s=840.0)
  assert budget.underuse_note(None, wall_s=1.0, steps_run=1, train_s=1.0, eval_every=1) is None
  assert capsys.readouterr().out == ''


def test_a_run_stopped_by_its_deadline_says_so(capsys):
  c = config_lib.base_config(3)
  c.train.eval_every = 200
  record = budget.summary_budget(_plan(), c, 'cut', wall_s=905.0, steps_run=5000, train_s=820.0)
  assert record['stopped_at_deadline'] == 5000 and record['steps'] == 6105
  note = record['note']
  assert 'stopped training at its deadline, step 5000 of 6105 planned' in note, note
  assert '0.164 s each' in note and '0.150 s planned' in note and 'schedule stopped short' in note
  assert note in capsys.readouterr().out
  assert 'stopped_at_deadline' not in budget.summary_budget(_plan(), c, 'full', wall_s=880.0,
                                                            steps_run=6105, train_s=840.0)

