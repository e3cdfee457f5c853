"""The workdir under faults, end to end: refused resumes, the lock, evals around interruptions,
torn logs, signals and the one-line errors of the command line."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import smoke
from unet_ds import checkpoint
from unet_ds import evaluate
from unet_ds import train
from unet_ds import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_smoke = smoke.config


def _steps(path, key='step'):
  with open(path) as f:
    return [json.loads(l)[key] for l in f if l.strip()]


def test_changed_model_or_loss_is_refused_before_the_workdir_is_touched(tmp_path, data_dir,
                                                                        capsys):
  c = _smoke(data_dir, steps=4, eval_every=2, checkpoint_every=2, stop_at_step=2)
  train.train_and_evaluate(c, str(tmp_path))
  before = {n: (tmp_path / n).read_bytes() for n in ('config.json', 'metrics.jsonl')}
  changed = _smoke(data_dir, steps=4, eval_every=2, checkpoint_every=2)
  changed.model.ds.mode, changed.loss.name = 'additive', 'ce'
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r'config.loss.name changed dice_ce -> ce.*config.model.ds.mode '
                           r'changed deep -> additive'):
    train.train_and_evaluate(changed, str(tmp_path))
  assert {n: (tmp_path / n).read_bytes() for n in before} == before
  # Safe keys (stop_at_step) and keys allowed by name resume; the workdir still evaluates.
  c = _smoke(data_dir, steps=6, eval_every=2, checkpoint_every=2)
  with pytest.raises(workdir_lib.ConfigChangedError, match='train.steps changed 4 -> 6'):
    train.train_and_evaluate(c, str(tmp_path))
  summary = train.train_and_evaluate(c, str(tmp_path), allow_changes=['train.steps'])
  assert summary['step'] == 6 and _steps(tmp_path / 'metrics.jsonl') == [1, 2, 3, 4, 5, 6]
  assert 'resume: train.steps 4 -> 6: the learning-rate and DS-weight schedules now span 6' in (
      capsys.readouterr().out)
  assert evaluate.run(None, str(tmp_path))['step'] == 6
  # Fewer steps than the run has reached: refused, even when allowed.
  c.train.steps = 5
  with pytest.raises(workdir_lib.ConfigChangedError, match=r'train.steps=5 is below the step '
                                                           r'this run has reached \(6\)'):
    train.train_and_evaluate(c, str(tmp_path), allow_changes=['train.steps'])
  # The finished run's command again: nothing trained or scored, its summary kept as it was.
  c.train.steps = 6
  saved = (tmp_path / 'summary.json').read_bytes()
  capsys.readouterr()
  again = train.train_and_evaluate(c, str(tmp_path))
  assert again == json.loads(saved) and (tmp_path / 'summary.json').read_bytes() == saved
  assert f'{tmp_path}: finished at step 6 of 6; its summary.json is kept' in capsys.readouterr().out


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path, data_dir):
  c = _smoke(data_dir, steps=2)
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f'pid {os.getpid()}'):
      train.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / 'metrics.jsonl').exists()


def test_an_eval_interrupted_before_its_checkpoint_is_redone(tmp_path, data_dir, monkeypatch):
  c = _smoke(data_dir, steps=4, eval_every=2, checkpoint_every=1)
  real = train.Experiment.evaluate

  def killed_at_step_4(self, state):
    if int(np.ravel(state.step)[0]) == 4:
      raise KeyboardInterrupt('killed during the eval of step 4')
    return real(self, state)

  monkeypatch.setattr(train.Experiment, 'evaluate', killed_at_step_4)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, str(tmp_path))
  ckpts = checkpoint.Checkpoints(str(tmp_path / 'checkpoints'))
  assert ckpts.latest_step() == 3  # step 4 was not saved before its eval was written
  ckpts.close()
  monkeypatch.setattr(train.Experiment, 'evaluate', real)
  train.train_and_evaluate(c, str(tmp_path))
  assert _steps(tmp_path / 'eval.jsonl') == [2, 4]


def test_a_torn_metrics_line_does_not_block_the_resume(tmp_path, data_dir):
  c = _smoke(data_dir, steps=4, eval_every=2, checkpoint_every=2, stop_at_step=2)
  train.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 3, "loss": 1.0')  # a disk that filled mid-line
  train.train_and_evaluate(_smoke(data_dir, steps=4, eval_every=2, checkpoint_every=2),
                           str(tmp_path))
  assert _steps(tmp_path / 'metrics.jsonl') == [1, 2, 3, 4]


def _cli(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'unet_ds.main', '--config=configs/unet2d.py:smoke',
          f'--config.data.data_dir={data_dir}', '--config.mesh.data=1',
          f'--workdir={workdir}', *extra]


def test_sigterm_checkpoints_the_current_step_and_says_so(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(
      _cli(workdir, data_dir, '--config.train.steps=100000', '--config.train.log_every=1',
           '--config.train.checkpoint_every=100000', '--config.train.eval_every=100000'),
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (workdir / 'metrics.jsonl').exists():
    time.sleep(0.5)
  time.sleep(1)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith('interrupted: SIGTERM: checkpoint of step'), last
  step = int(last.split('checkpoint of step ')[1].split()[0])
  ckpts = checkpoint.Checkpoints(str(workdir / 'checkpoints'))
  assert ckpts.latest_step() == step >= 1
  ckpts.close()


def test_cli_errors_end_with_one_line_naming_the_cause(tmp_path, data_dir):
  (tmp_path / 'out').write_text('a file, not a folder')
  cases = [
      (['--config.model.ds.mode=deepest'], 'ds.mode must be one of'),
      (['--mode=eval'], 'config.json not found'),
  ]
  for extra, expected in cases:
    res = subprocess.run(_cli(tmp_path / 'none', data_dir, *extra), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and expected in last, last
    assert 'Traceback' not in res.stderr


def _wait_for(predicate, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if predicate():
      return True
    time.sleep(0.01)
  return False


def test_sigterm_and_a_kill_inside_a_checkpoint_save_resume_exactly(tmp_path, data_dir):
  flags = ['--config.train.steps=14', '--config.train.checkpoint_every=1',
           '--config.train.eval_every=7', '--config.train.log_every=1']
  straight = tmp_path / 'straight'
  subprocess.run(_cli(straight, data_dir, *flags), cwd=REPO, check=True, capture_output=True,
                 timeout=600)
  run = tmp_path / 'run'
  ckpt_dir = run / 'checkpoints'

  def start():
    return subprocess.Popen(_cli(run, data_dir, *flags), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

  def logged_step():
    try:
      return max(_steps(run / 'metrics.jsonl'), default=0)
    except (OSError, ValueError):
      return 0

  proc = start()  # 1: SIGTERM after a few steps
  assert _wait_for(lambda: logged_step() >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM
  proc = start()  # 2: SIGKILL as soon as a checkpoint is being written (orbax's temp folder)
  in_save = lambda: any('tmp' in p.name for p in ckpt_dir.iterdir())  # noqa: E731
  _wait_for(lambda: logged_step() >= 8 and in_save(), proc)
  proc.kill()
  proc.communicate(timeout=300)
  proc = start()  # 3: to the end
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  a = [json.loads(l) for l in open(straight / 'metrics.jsonl')]
  b = [json.loads(l) for l in open(run / 'metrics.jsonl')]
  assert [r['step'] for r in b] == list(range(1, 15))
  np.testing.assert_array_equal([r['loss'] for r in a], [r['loss'] for r in b])
  assert _steps(run / 'eval.jsonl') == [7, 14]
  sa = json.loads((straight / 'summary.json').read_text())
  sb = json.loads((run / 'summary.json').read_text())
  assert sa['mean_foreground_dice'] == sb['mean_foreground_dice']
  assert sa['final'] == sb['final']


def test_a_checkpoint_from_before_a_new_config_key_resumes(tmp_path, data_dir):
  c = _smoke(data_dir, steps=4, eval_every=2, checkpoint_every=2, stop_at_step=2)
  train.train_and_evaluate(c, str(tmp_path))
  # As if written by an older unet_ds: the saved config lacks a key that now has a default.
  ckpt = tmp_path / 'checkpoints' / '2' / 'config' / 'metadata'
  saved = json.loads(ckpt.read_text())
  del saved['model']['ds']['fusion']
  ckpt.write_text(json.dumps(saved))
  data = tmp_path / 'checkpoints' / '2' / 'data' / 'metadata'  # nor the training seconds
  data.write_text(json.dumps({k: v for k, v in json.loads(data.read_text()).items()
                              if k != 'train_seconds'}))
  summary = train.train_and_evaluate(_smoke(data_dir, steps=4, eval_every=2, checkpoint_every=2),
                                     str(tmp_path))
  assert summary['step'] == 4
  # The time before the resume is unknown: this launch's alone, marked as such.
  assert summary['train_seconds_partial'] is True
  assert summary['train_seconds'] == summary['train_seconds_this_launch'] > 0
