"""Tests for experiments.launch: commands, skipping finished points, resuming the others."""

import json
import pathlib
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from experiments import launch
from unet_ds import cli

_CONFIG_FILE = '''
from ml_collections import config_dict
from experiments import sweep

def get_config(arg=None):
  return config_dict.ConfigDict({'seed': 0, 'model': {'ds': {'mode': 'none', 'weights': (1.0,)}},
                                 'train': {'steps': 100}})

def get_sweep(arg=None):
  return sweep.chain(
      sweep.product(sweep.axis('model.ds.mode', ['none']), sweep.axis('seed', [0, 1])),
      sweep.product(sweep.axis('model.ds.mode', ['deep']),
                    sweep.axis('model.ds.weights', [(1.0, 0.5)]), sweep.axis('seed', [0, 1])))
'''

_NAMES = ['mode=none,seed=0', 'mode=none,seed=1', 'mode=deep,weights=1.0_0.5,seed=0',
          'mode=deep,weights=1.0_0.5,seed=1']


@pytest.fixture
def config_path(tmp_path):
  path = tmp_path / 'ablation.py'
  path.write_text(_CONFIG_FILE)
  return str(path)


class FakeMain:
  """Stands in for `python -m unet_ds.main`: writes config.json, a checkpoint, summary.json.

  Points named in `crash` write config.json and a checkpoint and then fail, once each.
  """

  def __init__(self, crash=()):
    self.crash = set(crash)
    self.calls = []

  def __call__(self, argv, workdir):
    assert argv[1:3] == ['-m', 'unet_ds.main']
    flags = dict(a[2:].split('=', 1) for a in argv[3:])
    assert pathlib.Path(flags['workdir']) == workdir
    self.calls.append((workdir.name, list(argv)))
    config = {'seed': 0, 'model': {'ds': {'mode': 'none', 'weights': [1.0]}},
              'train': {'steps': 100}}
    for key, value in flags.items():
      if key.startswith('config.'):
        *parents, leaf = key[len('config.'):].split('.')
        node = config
        for p in parents:
          node = node[p]
        node[leaf] = eval(value) if leaf in ('seed', 'weights', 'steps') else value
    (workdir / 'config.json').write_text(json.dumps(config))
    resumed = (workdir / 'checkpoint').exists()
    (workdir / 'checkpoint').write_text('1')
    if workdir.name in self.crash:
      self.crash.remove(workdir.name)
      return 1
    (workdir / 'summary.json').write_text(json.dumps({'resumed': resumed}))
    return 0


def test_print_commands(config_path, tmp_path, capsys):
  root = tmp_path / 'runs'
  out = []
  code = launch.main([f'--config={config_path}:smoke', f'--root={root}', '--print',
                      '--config.train.steps=7'], out=out.append)
  assert code == 0
  assert len(out) == 4
  assert [shlex.split(line) for line in out][2] == [
      sys.executable, '-m', 'unet_ds.main', f'--config={config_path}:smoke',
      f'--workdir={root}/{_NAMES[2]}', '--config.model.ds.mode=deep',
      '--config.model.ds.weights=(1.0, 0.5)', '--config.seed=0', '--config.train.steps=7']
  assert not root.exists()  # --print touches nothing.


def test_runs_skips_finished_and_resumes_interrupted(config_path, tmp_path):
  root = tmp_path / 'runs'
  fake = FakeMain(crash=[_NAMES[1]])
  out = []
  code = launch.main([f'--config={config_path}', f'--root={root}', '--config.train.steps', '3'],
                     runner=fake, out=out.append)
  assert code == 1
  assert [name for name, _ in fake.calls] == _NAMES
  assert 'failed: mode=none,seed=1' in out
  assert sorted(p.name for p in root.iterdir()) == sorted(_NAMES + ['sweep.json'])
  assert not (root / _NAMES[1] / 'summary.json').exists()
  recorded = json.loads((root / _NAMES[2] / 'config.json').read_text())
  assert recorded['model']['ds'] == {'mode': 'deep', 'weights': [1.0, 0.5]}
  assert recorded['train']['steps'] == 3
  manifest = json.loads((root / 'sweep.json').read_text())
  assert [p['name'] for p in manifest['points']] == _NAMES
  assert manifest['extra_overrides'] == {'train.steps': '3'}

  # Second launch: only the interrupted point runs again, with the same command.
  first_argv = dict(fake.calls)[_NAMES[1]]
  fake.calls.clear()
  code = launch.main([f'--config={config_path}', f'--root={root}', '--config.train.steps=3'],
                     runner=fake, out=out.append)
  assert code == 0
  assert fake.calls == [(_NAMES[1], first_argv)]
  assert json.loads((root / _NAMES[1] / 'summary.json').read_text()) == {'resumed': True}
  assert out[-1].startswith('sweep') and '1 ran, 3 already finished, 0 stopped early, 0 failed' in out[-1]

  # Third launch: nothing to do.
  fake.calls.clear()
  assert launch.main([f'--config={config_path}', f'--root={root}'], runner=fake,
                     out=out.append) == 0
  assert fake.calls == []


def test_fail_fast_stops(config_path, tmp_path):
  fake = FakeMain(crash=[_NAMES[0]])
  code = launch.main([f'--config={config_path}', f'--root={tmp_path}', '--fail_fast'],
                     runner=fake, out=lambda s: None)
  assert code == 1 and [n for n, _ in fake.calls] == _NAMES[:1]



def test_a_point_in_use_by_another_launcher_is_busy_not_failed(config_path, tmp_path):
  lines = []
  busy = lambda argv, workdir: cli.BUSY  # noqa: E731  (main's status for a locked workdir)
  code = launch.main([f'--config={config_path}', f'--root={tmp_path}'], runner=busy,
                     out=lines.append)
  assert code == 0 and 'failed:' not in '\n'.join(lines)
  assert f'0 failed, {len(_NAMES)} in use by another process' in lines[-1]

def test_changed_sweep_is_refused_before_running(config_path, tmp_path):
  root = tmp_path / 'runs'
  (root / _NAMES[2]).mkdir(parents=True)
  (root / _NAMES[2] / 'config.json').write_text(json.dumps(
      {'seed': 0, 'model': {'ds': {'mode': 'deep', 'weights': [1.0, 0.25]}}}))
  fake = FakeMain()
  with pytest.raises(SystemExit) as e:
    launch.main([f'--config={config_path}', f'--root={root}'], runner=fake)
  assert e.value.code == 2 and fake.calls == []
  with pytest.raises(ValueError, match=r'mode=deep,weights=1.0_0.5,seed=0/config.json has '
                     r'model.ds.weights=\(1.0, 0.25\)'):
    launch.check_workdirs(launch.plan(config_path, root))


def test_bad_extra_overrides(config_path, tmp_path, capsys):
  for extra, message in [('--config.train.stesp=3', "did you mean train.steps"),
                         ('--config.seed=3', 'sets a key that the sweep'),
                         ('--steps=3', 'unknown argument')]:
    with pytest.raises(SystemExit):
      launch.main([f'--config={config_path}', f'--root={tmp_path}', extra], runner=FakeMain())
    assert message in capsys.readouterr().err



def test_a_real_sweep_checks_values_and_whole_configs_before_running(tmp_path):
  """On a unet_ds config every point is validated as unet_ds.main would, and an existing workdir
  must match the point's whole config, not only the swept keys."""
  config = 'configs/ablation_synthetic.py:smoke,steps=20,seeds=1,forms=none+deep'
  root = tmp_path / 'runs'
  with pytest.raises(ValueError, match=r"sweep point 'mode=none,seed=0': config.loss.ds_schedule: "
                     r'must be one of'):
    launch.plan(config, root, [('loss.ds_schedule', 'cosin')])
  with pytest.raises(ValueError, match=r'--config.multirun.k: a sweep point is one run'):
    launch.plan(config, root, [('multirun.k', '2')])
  jobs = launch.plan(config, root, [('optim.lr', '0.5')])
  assert jobs[0].config['optim']['lr'] == 0.5
  # A finished run made with another learning rate (or steps) is not this sweep's.
  made = dict(jobs[0].config, optim={**jobs[0].config['optim'], 'lr': 0.01})
  jobs[0].workdir.mkdir(parents=True)
  (jobs[0].workdir / 'config.json').write_text(json.dumps(made))
  (jobs[0].workdir / 'summary.json').write_text('{}')
  with pytest.raises(ValueError, match=r"mode=none,seed=0/config.json differs from this launch's "
                     r"sweep point 'mode=none,seed=0' in optim.lr"):
    launch.plan(config, root, [('optim.lr', '0.5')])
  assert launch.plan(config, root, [('optim.lr', '0.01')])[0].finished  # the same: skipped
  # A budgeted run records the steps and warm-up its budget planned: still this sweep's.
  (budgeted,) = launch.plan(config.replace('forms=none+deep', 'forms=none'), tmp_path / 'b',
                            [('train.minutes', '15.0')])
  planned = dict(budgeted.config, train={**budgeted.config['train'], 'steps': 4321},
                 optim={**budgeted.config['optim'], 'warmup_steps': 7})
  budgeted.workdir.mkdir(parents=True)
  (budgeted.workdir / 'config.json').write_text(json.dumps(planned))
  assert launch.plan(config.replace('forms=none+deep', 'forms=none'), tmp_path / 'b',
                     [('train.minutes', '15.0')])

def test_cli_value_round_trips_through_literal_eval():
  assert launch.cli_value('deep') == 'deep'
  assert launch.cli_value((0.5, 0.25)) == '(0.5, 0.25)'
  assert launch.cli_value([1]) == '(1,)'
  assert launch.cli_value(1e-5) == '1e-05'
  assert launch.cli_value(True) == 'True'


def test_subprocess_runner_streams_and_logs(tmp_path, capsys):
  workdir = tmp_path / 'w'
  code = launch.subprocess_runner(
      [sys.executable, '-c', 'import sys; print("hello"); sys.exit(3)'], workdir)
  assert code == 3
  assert 'hello' in capsys.readouterr().out
  log = (workdir / 'launch.log').read_text().splitlines()
  assert log[0].startswith('$ ') and log[1] == 'hello'


def test_subprocess_runner_finds_the_checkout_from_any_directory(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  code = launch.subprocess_runner(
      [sys.executable, '-c', 'import experiments.launch; print("imported")'], tmp_path / 'w')
  assert code == 0 and 'imported' in capsys.readouterr().out


def test_exit_zero_without_summary_is_stopped_not_failed(config_path, tmp_path):
  def stop_early(argv, workdir):  # train.stop_at_step: checkpoint and exit 0, no summary.
    (workdir / 'checkpoint').write_text('1')
    return 0
  jobs = launch.plan(config_path, tmp_path)
  status = launch.run(jobs, runner=stop_early, log=lambda s: None)
  assert set(status.values()) == {'stopped'}


def test_ctrl_c_ends_the_launcher_with_one_line(config_path, tmp_path):
  def interrupted(argv, workdir):  # Ctrl-C while the second point trains
    if workdir.name == _NAMES[1]:
      raise KeyboardInterrupt
    (workdir / 'summary.json').write_text('{}')
    return 0
  out = []
  code = launch.main([f'--config={config_path}', f'--root={tmp_path}'], runner=interrupted,
                     out=out.append)
  assert code == 130
  assert out[-1].endswith('interrupted; finished points are kept and the same command resumes '
                          'the rest')
  assert (tmp_path / _NAMES[0] / 'summary.json').exists()
  # The trainer alone got the signal (a launcher in a script ignores SIGINT): it exits 130 after
  # its checkpoint, and the sweep stops there too instead of going on as after a failure.
  ran = []
  def trainer_interrupted(argv, workdir):
    ran.append(workdir.name)
    return 130
  out.clear()
  code = launch.main([f'--config={config_path}', f'--root={tmp_path}'],
                     runner=trainer_interrupted, out=out.append)
  assert code == 130 and ran == [_NAMES[1]]
  assert f'{_NAMES[1]}: interrupted (exit status 130); its checkpoint is kept' in out[-2]


def test_killing_the_launcher_stops_the_running_point(config_path, tmp_path):
  # A stand-in interpreter that records its pid and trains "forever".
  fake_python = tmp_path / 'fake_python'
  fake_python.write_text(f'#!/bin/sh\necho $$ > {tmp_path}/child.pid\nexec sleep 60\n')
  fake_python.chmod(0o755)
  repo = pathlib.Path(__file__).resolve().parents[1]
  launcher = subprocess.Popen(
      [sys.executable, '-m', 'experiments.launch', f'--config={config_path}',
       f'--root={tmp_path / "runs"}', f'--python={fake_python}'],
      cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  pid_file = tmp_path / 'child.pid'
  for _ in range(300):
    if pid_file.exists() and pid_file.read_text().strip():
      break
    time.sleep(0.1)
  child = int(pid_file.read_text())
  launcher.send_signal(signal.SIGTERM)
  assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
  with pytest.raises(ProcessLookupError):
    for _ in range(100):  # The child is terminated (and reaped by the launcher).
      os.kill(child, 0)
      time.sleep(0.1)
