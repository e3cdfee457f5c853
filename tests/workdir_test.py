"""Atomic writes, the workdir lock (against real second processes) and resume config checks."""
import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import nibabel
import numpy as np
from PIL import Image
import pytest

from unet_ds import cli
from unet_ds import workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_temp_name_is_hidden_and_keeps_the_suffix():
  pid = os.getpid()
  assert workdir.temp_name('out/case_1.nii.gz') == f'out/.case_1.tmp-{pid}.nii.gz'
  assert workdir.temp_name('summary.json') == f'.summary.tmp-{pid}.json'
  assert workdir.temp_name('/w/README') == f'/w/.README.tmp-{pid}'


def test_atomic_write_replaces_and_a_failure_leaves_the_old_file(tmp_path):
  path = tmp_path / 'metrics.json'
  workdir.atomic_write(path, '{"old": 1}')
  assert path.read_text() == '{"old": 1}'
  with pytest.raises(RuntimeError, match='disk full'):
    with workdir.atomic_path(path) as tmp:
      pathlib.Path(tmp).write_text('{"new": ')  # half written, then the failure
      raise RuntimeError('disk full')
  assert path.read_text() == '{"old": 1}'
  assert sorted(os.listdir(tmp_path)) == ['metrics.json']  # the temp file is gone
  workdir.atomic_write(path, b'\x00\x01')
  assert path.read_bytes() == b'\x00\x01'


def test_atomic_path_refuses_a_folder_and_an_unwritten_temp(tmp_path):
  (tmp_path / 'out.png').mkdir()
  with pytest.raises(IsADirectoryError, match='out.png: is a folder'):
    with workdir.atomic_path(tmp_path / 'out.png'):
      pass
  with pytest.raises(FileNotFoundError, match='x.json: nothing was written'):
    with workdir.atomic_path(tmp_path / 'x.json'):
      pass
  assert not (tmp_path / 'x.json').exists()


def test_atomic_path_writes_nifti_and_png_by_suffix(tmp_path):
  labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  with workdir.atomic_path(tmp_path / 'case.nii.gz') as tmp:
    assert tmp.endswith('.nii.gz')
    nibabel.save(nibabel.Nifti1Image(labels, np.eye(4)), tmp)
  np.testing.assert_array_equal(np.asanyarray(nibabel.load(tmp_path / 'case.nii.gz').dataobj),
                                labels)
  with workdir.atomic_path(tmp_path / 'mask.png') as tmp:
    Image.fromarray(labels[0]).save(tmp)
  np.testing.assert_array_equal(np.array(Image.open(tmp_path / 'mask.png')), labels[0])
  assert sorted(os.listdir(tmp_path)) == ['case.nii.gz', 'mask.png']


def test_write_json_nulls_non_finite_numbers(tmp_path):
  workdir.write_json(tmp_path / 's.json', {'dice': [np.float32(0.5), float('nan')],
                                           'inf': np.array([np.inf, 1.0]), 't': (1, 2)})
  assert json.loads((tmp_path / 's.json').read_text()) == {
      'dice': [0.5, None], 'inf': [None, 1.0], 't': [1, 2]}


# --- lock -------------------------------------------------------------------------------------

_HOLDER = ('import sys, time; from unet_ds import workdir; '
           'workdir.WorkdirLock(sys.argv[1]).acquire(); print("held", flush=True); time.sleep(120)')


@pytest.fixture
def holder(tmp_path):
  """A second process that takes the lock of tmp_path/'w' and sleeps."""
  proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(tmp_path / 'w')], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'held'
    yield proc
  finally:
    proc.kill()
    proc.wait()


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path, holder):
  w = tmp_path / 'w'
  with pytest.raises(workdir.WorkdirLockedError) as e:
    workdir.WorkdirLock(w).acquire()
  assert str(e.value).startswith(
      f'{w} is in use by pid {holder.pid} on host {socket.gethostname()} since 20')
  assert str(e.value).endswith('(another trainer); wait for it or use another --workdir')


def test_a_lock_left_by_a_killed_trainer_is_taken_over(tmp_path, holder):
  w = tmp_path / 'w'
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert json.loads((w / '.lock').read_text())['pid'] == holder.pid  # the stale lock file
  with workdir.WorkdirLock(w) as lock:
    assert lock.held
    assert json.loads((w / '.lock').read_text())['pid'] == os.getpid()
    with pytest.raises(workdir.WorkdirLockedError, match=f'pid {os.getpid()}'):
      workdir.WorkdirLock(w).acquire()  # flock is per open file: also refused in this process
  assert (w / '.lock').read_text() == ''  # released
  workdir.WorkdirLock(w).acquire()


def test_disabled_lock_does_nothing(tmp_path, holder):
  with workdir.WorkdirLock(tmp_path / 'w', enabled=False) as lock:  # process > 0 of many hosts
    assert not lock.held
  with workdir.WorkdirLock(tmp_path / 'other', enabled=False):
    pass
  assert not (tmp_path / 'other').exists()


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(workdir.fcntl, 'flock', no_flock)
  w = tmp_path / 'w'
  w.mkdir()
  sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  try:
    host = socket.gethostname()
    (w / '.lock').write_text(json.dumps({'pid': sleeper.pid, 'host': host, 'started': 'T'}))
    with pytest.raises(workdir.WorkdirLockedError,
                       match=f'pid {sleeper.pid} on host {host} since T .*delete {w}/.lock'):
      workdir.WorkdirLock(w).acquire()
  finally:
    sleeper.kill()
    sleeper.wait()
  with workdir.WorkdirLock(w):  # the holder is dead now
    assert json.loads((w / '.lock').read_text())['pid'] == os.getpid()


# --- resume checks ----------------------------------------------------------------------------

SAVED = {'seed': 0,
         'model': {'ds': {'mode': 'deep', 'levels': [1, 2]}, 'base_filters': 8,
                   'conv_impl': 'auto'},
         'loss': {'name': 'dice_ce'},
         'optim': {'lr': 0.003, 'warmup_steps': 20},
         'data': {'data_dir': '/a', 'worker_count': 0},
         'train': {'steps': 60, 'stop_at_step': 30, 'eval_every': 20},
         'mesh': {'data': -1},
         'plan': {'plan_dir': '/cache/plans/task_1a2b'}}


def _new(**changes):
  new = json.loads(json.dumps(SAVED))
  for key, value in changes.items():
    *path, last = key.split('__')
    d = new
    for p in path:
      d = d[p]
    d[last] = value
  return new


def test_safe_changes_are_not_conflicts():
  new = _new(train__stop_at_step=0, train__eval_every=5, data__data_dir='/b', mesh__data=2,
             model__conv_impl='onednn',
             plan__plan_dir='/cache/plans/task_9f8e')  # a touched file: another cache name
  new['model']['ds']['levels'] = (1, 2)  # a tuple in the live config, a list in JSON
  assert workdir.resume_conflicts(SAVED, new) == []
  assert workdir.changed_keys(SAVED, new) == [
      'data.data_dir', 'mesh.data', 'model.conv_impl', 'plan.plan_dir', 'train.eval_every',
      'train.stop_at_step']


def test_model_loss_data_seed_and_steps_changes_are_conflicts():
  new = _new(model__ds__mode='additive', loss__name='ce', data__worker_count=2, seed=1,
             train__steps=100, optim__lr=0.01)
  del new['model']['base_filters']
  new['model']['dropout'] = 0.1
  assert workdir.resume_conflicts(SAVED, new) == [
      'data.worker_count', 'loss.name', 'model.base_filters', 'model.dropout', 'model.ds.mode',
      'optim.lr', 'seed', 'train.steps']
  assert workdir.resume_conflicts(
      SAVED, new, allowed=['config.optim', 'train.steps', ' seed', 'model.dropout']) == [
          'data.worker_count', 'loss.name', 'model.base_filters', 'model.ds.mode']


def test_allowing_an_unknown_key_is_an_error():
  with pytest.raises(ValueError, match="no config key 'optim.lrr'"):
    workdir.resume_conflicts(SAVED, SAVED, allowed=['optim.lrr'])


def test_describe_and_check_resume_name_the_keys():
  new = _new(model__ds__mode='additive', loss__name='ce', train__eval_every=10)
  del new['model']['base_filters']
  keys = workdir.resume_conflicts(SAVED, new)
  assert workdir.describe_conflicts(keys, SAVED, new, 'W/checkpoints/30') == (
      'resume refused: config.loss.name changed dice_ce -> ce, config.model.base_filters changed '
      '8 -> (absent), config.model.ds.mode changed deep -> additive since the checkpoint in '
      'W/checkpoints/30; use a new --workdir (config.model.base_filters changes the model or '
      'optimiser state the checkpoint holds, so it cannot continue under it)')
  # only keys the checkpoint's arrays survive are offered to --allow_config_change
  assert workdir.describe_conflicts(['loss.name', 'model.dropout'], SAVED, new, 'W') == (
      'resume refused: config.loss.name changed dice_ce -> ce, config.model.dropout changed '
      '(absent) -> (absent) since the checkpoint in W; use a new --workdir, or '
      '--allow_config_change=loss.name,model.dropout to accept')
  assert [k for k in ('model.ds.mode', 'model.remat', 'data.num_classes', 'data.patch_size',
                      'optim.lr', 'optim.name', 'multirun.k', 'model.conv_impl')
          if workdir.changes_parameters(k)] == [
              'model.ds.mode', 'data.num_classes', 'optim.name', 'multirun.k']
  with pytest.raises(workdir.ConfigChangedError, match='config.loss.name changed dice_ce -> ce'):
    workdir.check_resume(SAVED, new, (), 'W')
  accepted = workdir.check_resume(SAVED, new, ['loss', 'model'], 'W')
  assert accepted == ['loss.name', 'model.base_filters', 'model.ds.mode', 'train.eval_every']


def test_a_locked_workdir_ends_the_process_with_the_busy_status():
  """A launcher tells 'in use by another process' from a failure by this exit status."""
  code = ('from unet_ds import cli, workdir\n'
          'cli.exit_with_error(workdir.WorkdirLockedError("runs/a is in use by pid 1"))')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=False)
  assert done.returncode == cli.BUSY
  assert done.stderr.strip().splitlines()[-1] == (
      'error: WorkdirLockedError: runs/a is in use by pid 1')
  assert 'Traceback' not in done.stderr  # one line, as every user error
