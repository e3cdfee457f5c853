"""Meshes and shardings: data + spatial partitioning on 8 simulated devices, and two processes.

The 8-device and multi-process checks run this file as a worker in subprocesses, because
conftest fixes 4 simulated devices for the test process and a backend cannot be re-created.
Each worker builds the train step from a tiny 3D config with a random batch (no dataset) and
prints the loss and the parameter update, which the tests compare with a single-device run.
One 8-device worker steps every mesh in turn (one start-up, not one per mesh) while the two
processes of the multi-host check run beside it.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import xla_env

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(ndim=3, size=16):
  from unet_ds import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.apply_args(config_lib.base_config(ndim=ndim), 'smoke')
  c.data.shape = (size,) * ndim
  c.train.batch_size = 4
  c.optim.name, c.optim.lr = 'sgd', 0.1
  c.optim.schedule = 'constant'
  return c


def _batch(c, seed=0):
  rng = np.random.default_rng(seed)
  shape = (c.train.batch_size, *c.data.shape)
  return {'image': rng.standard_normal(shape + (1,), dtype=np.float32),
          'label': rng.integers(0, c.data.num_classes, shape, dtype=np.int32)}


def _step_result(c, host_batch):
  """Loss and flattened parameter update of one train step of config `c` on `host_batch`."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from unet_ds import config_lib  # pylint: disable=g-import-not-at-top
  from unet_ds import models  # pylint: disable=g-import-not-at-top
  from unet_ds import optim  # pylint: disable=g-import-not-at-top
  from unet_ds import sharding  # pylint: disable=g-import-not-at-top
  from unet_ds import state as state_lib  # pylint: disable=g-import-not-at-top
  from unet_ds import train  # pylint: disable=g-import-not-at-top

  model_cfg = config_lib.validate(c)
  sharding.maybe_initialize_distributed(c.mesh)
  mesh = sharding.make_mesh(c.mesh)
  model = models.get_model(model_cfg)
  tx, _ = optim.make_optimizer(c.optim, int(c.train.steps))
  ds_loss = train.DSLoss.from_config(c, model_cfg)
  input_shape = (c.train.batch_size, *c.data.shape, 1)
  repl = sharding.replicated(mesh)
  state = jax.jit(functools.partial(state_lib.create, model, tx, 0, input_shape),
                  out_shardings=repl)()
  before = jax.tree.map(np.asarray, state.params)
  batch = sharding.shard_batch(mesh, host_batch)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, ds_loss=ds_loss),
                 out_shardings=(repl, repl))
  new_state, metrics = step(state, batch)
  after = jax.tree.map(np.asarray, new_state.params)
  update = np.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(after),
                                                           jax.tree.leaves(before))])
  return {'loss': float(metrics['loss']), 'update': update.tolist(),
          'image_sharding': str(batch['image'].sharding.spec),
          'devices': len(batch['image'].sharding.device_set)}


# (conv_impl, data, space) of the 8-device worker's meshes; the first is the single-device reference.
_MESHES = (('native', 1, 1),
           ('cpu_fast', 2, 4),   # data x space on all 8 devices, depth split in 4
           ('native', 4, 2))


def _worker(argv):
  """`sharding_test.py OUT.json meshes` or `OUT.json multihost PORT PROCESS_ID`."""
  out_path, mode = argv[0], argv[1]
  argv = argv[1:]
  c = _config()
  batch = _batch(c)
  if mode == 'meshes':
    results = {}
    for impl, data, space in _MESHES:
      c.model.conv_impl = impl
      c.mesh.data, c.mesh.space = data, space
      results[f'{impl}-{data}-{space}'] = _step_result(c, batch)
  else:
    port, process_id = argv[1], int(argv[2])
    c.mesh.distributed = True
    c.mesh.coordinator_address = f'localhost:{port}'
    c.mesh.num_processes, c.mesh.process_id = 2, process_id
    rows = c.train.batch_size // 2  # each process feeds its own half of the global batch
    batch = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in batch.items()}
    results = _step_result(c, batch)
  with open(out_path, 'w') as f:
    json.dump(results, f)


def _run_worker(tmp_path, args, devices):
  """Starts a worker; its result and log go to files (pipes could fill and block a process
  that its peer waits for in a collective)."""
  name = '_'.join(map(str, args))
  env = {**os.environ, 'XLA_FLAGS': xla_env.flags(devices),
         'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': _ROOT}
  out = tmp_path / f'{name}.json'
  log = open(tmp_path / f'{name}.log', 'w')  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out), *map(str, args)],
                          cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  return proc, out, log


def _result(worker, timeout=900):
  proc, out, log = worker
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  assert proc.returncode == 0, open(log.name).read()[-3000:]
  with open(out) as f:
    return json.load(f)


def _assert_same_step(got, want):
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-5)
  update, ref = np.asarray(got['update']), np.asarray(want['update'])
  np.testing.assert_allclose(update, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def worker_results(tmp_path_factory):
  """Every worker's results, the workers started together: the 8-device one and two hosts of 2
  devices each (4 global), each host feeding its half of the batch."""
  tmp_path = tmp_path_factory.mktemp('workers')
  port = _free_port()
  workers = [_run_worker(tmp_path, ['meshes'], devices=8)]
  workers += [_run_worker(tmp_path, ['multihost', port, i], devices=2) for i in range(2)]
  try:
    meshes, *hosts = [_result(w) for w in workers]
  finally:  # a failed worker: stop the others
    for proc, _, _ in workers:
      if proc.poll() is None:
        proc.kill()
  return {'meshes': meshes, 'hosts': hosts}


@pytest.fixture(scope='module')
def single_device_step(worker_results):
  result = worker_results['meshes']['-'.join(map(str, _MESHES[0]))]
  assert result['devices'] == 1
  return result


@pytest.mark.parametrize('impl,data,space', _MESHES[1:])
def test_data_and_space_sharded_step_matches_single_device(worker_results, single_device_step,
                                                           impl, data, space):
  got = worker_results['meshes'][f'{impl}-{data}-{space}']
  assert got['devices'] == data * space
  assert "'data', 'space'" in got['image_sharding']
  _assert_same_step(got, single_device_step)


def test_two_processes_match_single_device(worker_results, single_device_step):
  for got in worker_results['hosts']:
    assert got['devices'] == 4
    _assert_same_step(got, single_device_step)


def test_make_mesh_shapes_and_errors():
  from unet_ds import sharding  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4  # conftest
  mesh = sharding.make_mesh({'data': -1, 'space': 2})
  assert dict(mesh.shape) == {'data': 2, 'space': 2}
  assert dict(sharding.make_mesh({'data': 1, 'space': 1}).shape) == {'data': 1, 'space': 1}
  with pytest.raises(ValueError, match='needs 8 devices'):
    sharding.make_mesh({'data': 4, 'space': 2})
  assert sharding.batch_spec(5) == sharding.P('data', 'space', None, None, None)
  assert sharding.batch_spec(1) == sharding.P('data')
  assert not sharding.maybe_initialize_distributed({'distributed': False})



class _FakeDevice:
  """What `select_devices` reads of a device: its id and its process."""

  def __init__(self, process_index, id_):
    self.process_index, self.id = process_index, id_

  def __repr__(self):
    return f'p{self.process_index}d{self.id}'


def _fake_devices(*local_counts):
  """Devices of processes with `local_counts` devices each, listed interleaved (not by process)."""
  devices = [_FakeDevice(p, p * 100 + i) for p, n in enumerate(local_counts) for i in range(n)]
  return sorted(devices, key=lambda d: (d.id % 100, d.process_index))


@pytest.mark.parametrize('counts,data,space,want', [
    ((4, 4), 2, 1, ['p0d0', 'p1d100']),                        # 2 of 8 devices: one per host
    ((4, 4), 4, 1, ['p0d0', 'p0d1', 'p1d100', 'p1d101']),
    ((4, 4), 2, 2, ['p0d0', 'p0d1', 'p1d100', 'p1d101']),      # a data row per host
    ((4, 4), 8, 1, ['p0d0', 'p0d1', 'p0d2', 'p0d3', 'p1d100', 'p1d101', 'p1d102', 'p1d103']),
    ((2, 2, 2), 3, 2, ['p0d0', 'p0d1', 'p1d100', 'p1d101', 'p2d200', 'p2d201']),
    ((4, 2), 4, 1, ['p0d0', 'p0d1', 'p1d100', 'p1d101']),      # uneven hosts, equal shares
])
def test_select_devices_gives_every_process_its_share(counts, data, space, want):
  from unet_ds import sharding  # pylint: disable=g-import-not-at-top
  picked = sharding.select_devices(_fake_devices(*counts), data, space)
  assert [repr(d) for d in picked] == want
  rows = np.asarray([d.process_index for d in picked]).reshape(data, space)
  assert (rows == rows[:, :1]).all()  # every data row lies on one process


@pytest.mark.parametrize('counts,data,space,match', [
    ((4, 4), 1, 2, r'mesh.data=1 must be a multiple of the 2 processes'),
    ((4, 4), 3, 1, r'mesh.data=3 must be a multiple of the 2 processes'),
    ((4, 2), 6, 1, r'takes 3 devices from each of the 2 processes, but process 1 has 2'),
    ((4, 4), 4, 4, r'data=4 x space=4 needs 16 devices, 8 available'),
])
def test_select_devices_errors(counts, data, space, match):
  from unet_ds import sharding  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=match):
    sharding.select_devices(_fake_devices(*counts), data, space)


def test_select_devices_one_process_takes_the_first():
  from unet_ds import sharding  # pylint: disable=g-import-not-at-top
  devices = [_FakeDevice(0, i) for i in (3, 1, 2, 0)]
  assert [d.id for d in sharding.select_devices(devices, 1, 2)] == [3, 1]


if __name__ == '__main__':
  _worker(sys.argv[1:])
