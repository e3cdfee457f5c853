"""Tests for sweeps through submitit (experiments.cluster, launch --executor=...).

The jobs go through submitit's real code path with its LocalExecutor (each point a local
process). Most tests train a stand-in for `unet_ds.main` (a script that counts steps, writes
checkpoints, and on SIGTERM saves and exits as the trainer does); one trains the real smoke
config. SLURM submission is checked with stand-in `srun`/`sbatch`/`sacct` programs.
"""

import json
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import submitit

from experiments import cluster
from experiments import launch

REPO = pathlib.Path(__file__).resolve().parents[1]

_SWEEP_FILE = '''
from ml_collections import config_dict
from experiments import sweep

def get_config(arg=None):
  return config_dict.ConfigDict({'seed': 0, 'model': {'ds': {'mode': 'none'}},
                                 'train': {'steps': 12}})

def get_sweep(arg=None):
  return sweep.axis('model.ds.mode', ['none', 'deep'])
'''
_NAMES = ['mode=none', 'mode=deep']

# Stand-in trainer: resumes from the highest checkpoints/<step>, logs each step to metrics.jsonl,
# checkpoints every 2 steps, and on SIGTERM checkpoints the current step and exits 0.
_FAKE_MAIN = '''
import json, os, pathlib, signal, sys, time
flags = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--') and '=' in a)
workdir = pathlib.Path(flags['workdir'])
steps = int(flags.get('config.train.steps', 12))
ckpts = workdir / 'checkpoints'
start = max((int(p.name) for p in ckpts.glob('*') if p.name.isdigit()), default=0)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print(f'fake trainer from step {start}', flush=True)
for step in range(start + 1, steps + 1):
  time.sleep(float(os.environ.get('FAKE_STEP_S', '0.05')))
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'step': step}) + '\\n')
  if step % 2 == 0 or stop:
    (ckpts / str(step)).mkdir(parents=True, exist_ok=True)
  while (step == 2 and os.environ.get('FAKE_HOLD') and not stop
         and not os.path.exists(os.environ['FAKE_HOLD'])):
    time.sleep(0.05)  # held after the first checkpoint until the test lets it go on
  if stop:
    print(f'saved step {step}, exiting', flush=True)
    sys.exit(0)
# deep is better than none by 0.1 on odd seeds, equal on even ones: a wide interval.
dice = 0.5 + (0.1 if flags.get('config.model.ds.mode') == 'deep' and
              int(flags.get('config.seed', 0)) % 2 else 0.0)
(workdir / 'summary.json').write_text(json.dumps({'mean_foreground_dice': dice, 'step': steps}))
'''


@pytest.fixture
def sweep_file(tmp_path):
  path = tmp_path / 'sweep_cfg.py'
  path.write_text(_SWEEP_FILE)
  return path


@pytest.fixture
def fake_python(tmp_path):
  main = tmp_path / 'fake_main.py'
  main.write_text(_FAKE_MAIN)
  exe = tmp_path / 'fake_python'
  exe.write_text(f'#!/bin/sh\nexec {sys.executable} {main} "$@"\n')
  exe.chmod(0o755)
  return exe


def _steps(workdir):
  return [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _children(pid):
  path = pathlib.Path(f'/proc/{pid}/task/{pid}/children')
  return [int(p) for p in path.read_text().split()] if path.exists() else []


def _wait_for(predicate, timeout=120.0, what='condition'):
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      raise AssertionError(f'timed out waiting for {what}')
    time.sleep(0.1)


def test_submitit_local_sweep_runs_and_an_interrupted_job_is_requeued(
    sweep_file, fake_python, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('FAKE_STEP_S', '0.3')
  root = tmp_path / 'runs'
  jobs = launch.plan(str(sweep_file), root)
  executor = cluster.make_executor('submitit_local', root / 'submitit' / '%j',
                                   cluster.Resources(time_min=10))
  point_jobs = [cluster.PointJob(j.name, j.workdir, j.argv(str(fake_python)), cwd=str(tmp_path),
                                 stop_grace_s=20) for j in jobs]
  submitted = cluster.submit(executor, point_jobs)
  assert [s.state for s in submitted] == ['RUNNING', 'RUNNING']

  # Preempt the first point once it has a checkpoint: SIGUSR2 to its job process, as SLURM does.
  first = root / _NAMES[0]
  _wait_for(lambda: (first / 'checkpoints' / '2').is_dir(), what='a checkpoint')
  (task,) = _children(int(submitted[0].job_id))
  os.kill(task, signal.SIGUSR2)

  assert [cluster.outcome(s) for s in submitted] == [('done', ''), ('done', '')]
  log = submitted[0].stdout()
  assert 'stopped for requeueing' in log and 'resuming from checkpoint step' in log
  resumed_at = int(log.split('resuming from checkpoint step ')[1].split()[0])
  assert 2 <= resumed_at < 12
  # The trainer ran twice and the second run continued: every step logged once, in order.
  assert (first / 'launch.log').read_text().count('$ ') == 2
  assert _steps(first) == list(range(1, 13))
  assert _steps(root / _NAMES[1]) == list(range(1, 13))
  assert (first / 'launch.log').read_text().count('fake trainer from step 0') == 1


def test_launch_submitit_local_records_jobs_and_relaunch_resumes_a_killed_point(
    sweep_file, fake_python, tmp_path):
  root = tmp_path / 'runs'
  hold = tmp_path / 'go_on'
  env = dict(os.environ, FAKE_HOLD=str(hold))
  cmd = [sys.executable, '-m', 'experiments.launch', f'--config={sweep_file}', f'--root={root}',
         '--executor=submitit_local', f'--python={fake_python}', '--time_min=10']
  def launch_(*flags):
    # Output to a file: the local jobs inherit the launcher's stdout, a pipe would stay open.
    log = tmp_path / 'launcher.out'
    with open(log, 'w') as f:
      subprocess.run(cmd + list(flags), cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                     check=True, timeout=300)
    return log.read_text()

  # Submit without waiting: the launcher exits, the jobs go on.
  out = launch_()
  assert '2 submitted and running' in out and 'submitit_local: 2 points start at once' in out
  record = json.loads((root / 'jobs.json').read_text())
  assert record['executor'] == 'submitit_local' and sorted(record['points']) == sorted(_NAMES)
  controllers = {n: int(p['job_id']) for n, p in record['points'].items()}

  # Launching again while they run submits nothing.
  assert '0 submitted and running, 2 already queued' in launch_()
  assert json.loads((root / 'jobs.json').read_text())['points'] == record['points']

  # The machine of the first point dies: kill its controller, job process and trainer.
  first = root / _NAMES[0]
  _wait_for(lambda: (first / 'checkpoints' / '2').is_dir(), what='a checkpoint')
  controller = controllers[_NAMES[0]]
  procs = [controller]
  for _ in range(2):
    procs += [c for p in procs[-1:] for c in _children(p)]
  assert len(procs) == 3, procs
  for pid in procs:
    os.kill(pid, signal.SIGKILL)
  _wait_for(lambda: not cluster._is_active('submitit_local', '', str(controller)),
            what='the killed job to be gone')
  assert not (first / 'summary.json').exists()

  # Relaunch with --wait: only the killed point is submitted; it resumes from its checkpoint.
  hold.touch()
  out = launch_('--wait')
  assert re.search(rf'{_NAMES[0]}: job \d+ done', out)
  assert out.count('submitted as job') == 1  # the other point ran on (or has just finished)
  new_ids = {n: int(p['job_id']) for n, p in
             json.loads((root / 'jobs.json').read_text())['points'].items()}
  assert new_ids[_NAMES[0]] != controller and new_ids[_NAMES[1]] == controllers[_NAMES[1]]
  steps = _steps(first)
  assert steps == list(range(1, 13))  # continued from its checkpoint, not restarted
  assert re.findall(r'fake trainer from step (\d+)', (first / 'launch.log').read_text()) == [
      '0', '2']
  _wait_for(lambda: (root / _NAMES[1] / 'summary.json').exists(), what='the other point')


def test_until_with_submitit_jobs_adds_seeds_in_rounds(tmp_path, fake_python, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cfg = tmp_path / 'seeds.py'
  cfg.write_text(_SWEEP_FILE.replace(
      "return sweep.axis('model.ds.mode', ['none', 'deep'])",
      "return sweep.product(sweep.axis('model.ds.mode', ['none', 'deep']), "
      "sweep.axis('seed', [0, 1]))"))
  root = tmp_path / 'runs'
  out = []
  assert launch.main([f'--config={cfg}', f'--root={root}', '--executor=submitit_local',
                      f'--python={fake_python}', '--until=ci_halfwidth:0.01,max_seeds:3'],
                     out=out.append) == 0
  record = json.loads((root / 'until.json').read_text())
  assert [r['added'] for r in record['rounds']] == [['mode=none,seed=2', 'mode=deep,seed=2'], []]
  assert record['not_settled'] == ['mode=deep']
  assert record['rounds'][-1]['comparisons'][0]['status'] == 'capped'
  jobs = json.loads((root / 'jobs.json').read_text())['points']
  assert sorted(jobs) == sorted(f'mode={m},seed={s}' for m in ('none', 'deep') for s in range(3))
  assert jobs['mode=deep,seed=2']['round'] == 1 and jobs['mode=deep,seed=0']['round'] == 0
  assert sum('submitted as job' in line for line in out) == 6


def test_slurm_submission_is_one_job_array_with_the_resources(sweep_file, tmp_path, monkeypatch):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'calls'
  for name, body in [
      ('srun', 'exit 0'),
      ('sbatch', f'cp "$1" {tmp_path}/submitted.sh; echo sbatch >> {calls}; '
                 'echo "Submitted batch job 4242"'),
      ('sacct', f'echo sacct >> {calls}; printf "JobID|State|NodeList\\n4242_0|RUNNING|n1\\n'
                '4242_1|PENDING|\\n"'),
  ]:
    (bin_dir / name).write_text(f'#!/bin/sh\n{body}\n')
    (bin_dir / name).chmod(0o755)
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  monkeypatch.chdir(tmp_path)
  root = tmp_path / 'runs'
  out = []
  argv = [f'--config={sweep_file}', f'--root={root}', '--executor=slurm', '--partition=gpu',
          '--time_min=30', '--gpus=1', '--cpus=4', '--array_parallelism=1',
          '--slurm=account=ab12', '--config.train.steps=7']
  assert launch.main(argv, out=out.append) == 0
  sbatch = (tmp_path / 'submitted.sh').read_text()
  for line in ['#SBATCH --partition=gpu', '#SBATCH --time=30', '#SBATCH --gpus-per-node=1',
               '#SBATCH --cpus-per-task=4', '#SBATCH --array=0-1%1', '#SBATCH --account=ab12',
               '#SBATCH --signal=USR2@90']:
    assert line in sbatch, line
  record = json.loads((root / 'jobs.json').read_text())
  assert record['executor'] == 'slurm'
  assert {n: p['job_id'] for n, p in record['points'].items()} == {
      _NAMES[0]: '4242_0', _NAMES[1]: '4242_1'}
  # Each array task holds its point: the same command as the local runner, resumable.
  delayed = submitit.helpers.DelayedSubmission.load(
      root / 'submitit' / '4242_0' / '4242_0_submitted.pkl')
  job = delayed.function
  assert isinstance(job, cluster.PointJob) and job.name == _NAMES[0]
  assert list(job.argv) == launch.plan(str(sweep_file), root, [('train.steps', '7')])[0].argv(
      sys.executable)
  assert job.workdir == (root / _NAMES[0]).resolve() and job.cwd == str(tmp_path)

  # Launching again while SLURM has them queued or running submits nothing.
  out.clear()
  assert launch.main(argv, out=out.append) == 0
  assert calls.read_text().split().count('sbatch') == 1
  assert sum('already queued or running' in line for line in out) == 2


def test_bad_executor_settings_fail_before_submitting(sweep_file, tmp_path, capsys):
  for flags, message in [(['--time_min=0'], '--time_min=0'),
                         (['--slurm=acount'], 'expected KEY=VALUE'),
                         (['--slurm=not_a_param=1'], 'not_a_param'),
                         (['--array_parallelism=1'], '--array_parallelism is a SLURM setting; '
                          '--executor=submitit_local starts every point at once')]:
    with pytest.raises(SystemExit) as e:
      launch.main([f'--config={sweep_file}', f'--root={tmp_path / "r"}',
                   '--executor=submitit_local', *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
  assert not (tmp_path / 'r').exists()


def test_point_job_pickles_without_its_running_child(tmp_path):
  job = cluster.PointJob('p', tmp_path / 'p', ['true'], cwd=str(tmp_path))
  job._child = object()  # stands for a running LoggedProcess (not picklable)
  copy = pickle.loads(pickle.dumps(job))
  assert copy._child is None and copy.argv == ('true',) and copy.name == 'p'
  assert cluster.latest_checkpoint_step(tmp_path / 'p') is None
  for step in ('2', '10', '12.orbax-checkpoint-tmp-1'):
    (tmp_path / 'p' / 'checkpoints' / step).mkdir(parents=True)
  assert cluster.latest_checkpoint_step(tmp_path / 'p') == 10


@pytest.mark.skipif(not pathlib.Path('/proc/self/task').exists(), reason='needs /proc')
def test_real_smoke_training_is_requeued_and_resumes(tmp_path, monkeypatch):
  """`unet_ds.main` on configs/unet3d.py:smoke through submitit, interrupted after its first
  checkpoint, requeued, finished from that checkpoint."""
  monkeypatch.chdir(REPO)
  monkeypatch.delenv('XLA_FLAGS', raising=False)  # one device, as a user's run (not the suite's 4)
  cfg = tmp_path / 'smoke_sweep.py'
  cfg.write_text(textwrap.dedent('''
      from configs import unet3d
      from experiments import sweep

      def get_config(arg=None):
        return unet3d.get_config(arg)

      def get_sweep(arg=None):
        return sweep.axis('seed', [0])
  '''))
  root = tmp_path / 'runs'
  (job,) = launch.plan(f'{cfg}:smoke', root, [('train.steps', '8'), ('data.num_train', '2')])
  executor = cluster.make_executor('submitit_local', root / 'submitit' / '%j',
                                   cluster.Resources(time_min=20))
  (sub,) = cluster.submit(executor, [cluster.PointJob(job.name, job.workdir,
                                                      job.argv(sys.executable), cwd=str(REPO),
                                                      stop_grace_s=120)])
  _wait_for(lambda: cluster.latest_checkpoint_step(job.workdir) is not None or sub.done(),
            timeout=400, what='the first checkpoint')
  assert not sub.done(), sub.stdout()
  (task,) = _children(int(sub.job_id))
  os.kill(task, signal.SIGUSR2)
  assert cluster.outcome(sub) == ('done', ''), sub.stdout()
  log = sub.stdout()
  assert 'resuming from checkpoint step' in log, log
  assert (job.workdir / 'launch.log').read_text().count('$ ') == 2
  steps = [json.loads(line)['step'] for line in
           (job.workdir / 'metrics.jsonl').read_text().splitlines() if line.strip()]
  assert steps == list(range(1, 9))  # resumed: the first run's steps kept, none repeated
