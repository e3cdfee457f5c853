"""Benchmark smoke run (the JSON record's fields); the memory levers remat and bfloat16 train."""

import functools
import importlib.util
import json
import math
import os

import jax
import numpy as np
import pytest

from unet_ds import bench
from unet_ds import config_lib
from unet_ds import hostmem
from unet_ds import models
from unet_ds import optim
from unet_ds import state as state_lib
from unet_ds import train

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg):
  path = os.path.join(_ROOT, 'configs', name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.mesh.data = 1  # conftest simulates 4 devices; the smoke batch is 2
  return c


def test_bench_record_2d_smoke():
  c = _config('unet2d.py', 'smoke')
  record = bench.run(c, steps=2, warmup=1, mode='both')
  json.dumps(record)  # one JSON line
  assert record['backend'] == 'cpu' and record['conv_impl'] == 'cpu_fast'
  assert record['timed_steps'] == 2 and record['batch_size'] == 2
  for prefix in ('step_s', 'infer_s'):
    lo, med, hi = (record[f'{prefix}_{k}'] for k in ('min', 'median', 'max'))
    assert 0 < lo <= med <= hi
  assert record['compile_s'] > 0 and record['infer_compile_s'] > 0
  voxels = 2 * math.prod(c.data.shape)
  assert record['voxels_per_s'] == pytest.approx(voxels / record['step_s_median'])
  # A train step costs more FLOPs than the forward pass it contains (~3x).
  assert record['train_flops_per_step'] > 2 * record['infer_flops'] > 0
  assert record['achieved_flops_per_s'] == pytest.approx(
      record['train_flops_per_step'] / record['step_s_median'])
  assert 0 < record['baseline_rss_mb'] <= record['train_peak_rss_mb'] <= record['peak_rss_mb']
  # XLA's temporaries hold at least the saved full-resolution activations of the step.
  assert record['step_temp_mb'] > 2 * math.prod(c.data.shape) * c.model.base_filters * 4 / 2**20
  assert record['threads'] >= 1
  assert record['config']['model']['depth'] == c.model.depth


def test_bench_reference_config_and_known_peaks():
  c = _config('unet3d.py', 'bench_ref')
  assert tuple(c.data.shape) == (64, 64, 64) and c.train.batch_size == 2
  assert (c.model.base_filters, c.model.depth, c.model.residual) == (16, 4, True)
  assert c.model.down == 'conv'  # strided convs, as MONAI DynUNet
  assert tuple(c.model.ds.levels) == (1, 2) and c.optim.name == 'sgd'
  c2 = _config('unet2d.py', 'bench_ref')
  assert tuple(c2.data.shape) == (256, 256) and c2.train.batch_size == 8
  model = config_lib.validate(c2)
  assert [model.filters(l) for l in range(model.depth)] == [32, 64, 128, 256, 512]
  assert model.residual and model.down == 'conv' and model.head_levels == (1, 2, 3)
  assert c2.loss.name == 'dice_ce' and c2.optim.name == 'sgd'
  assert bench.known_peak('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert bench.known_peak('cpu', 'float32') is None


def test_bench_rejects_bad_steps():
  with pytest.raises(ValueError, match='steps'):
    bench.run(_config('unet2d.py', 'smoke'), steps=0)


def _train(c, steps):
  """Losses and parameters of `steps` train steps on one fixed random batch."""
  model_cfg = config_lib.validate(c)
  model = models.get_model(model_cfg)
  tx, _ = optim.make_optimizer(c.optim, int(c.train.steps))
  ds_loss = train.DSLoss.from_config(c, model_cfg)
  shape = (c.train.batch_size, *c.data.shape)
  rng = np.random.default_rng(0)
  label = rng.integers(0, c.data.num_classes, shape, dtype=np.int32)
  # Learnable: the image is the label plus noise.
  image = (label + 0.3 * rng.standard_normal(shape)).astype(np.float32)[..., None]
  batch = {'image': jax.numpy.asarray(image), 'label': jax.numpy.asarray(label)}
  state = jax.jit(functools.partial(state_lib.create, model, tx, 0, image.shape))()
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, ds_loss=ds_loss))
  losses = []
  for _ in range(steps):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  return losses, state.params


def _lever_config(**model):
  c = _config('unet2d.py', 'smoke')
  c.optim.name, c.optim.lr, c.optim.schedule = 'adamw', 1e-2, 'constant'
  c.model.update(model)
  return c


def test_remat_trains_like_no_remat():
  steps = 3
  plain, p_plain = _train(_lever_config(), steps)
  remat, p_remat = _train(_lever_config(remat=True), steps)
  np.testing.assert_allclose(remat, plain, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p_remat), jax.tree.leaves(p_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_with_remat_loss_falls():
  losses, params = _train(_lever_config(dtype='bfloat16', remat=True), 12)
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
  # Parameters stay float32 (bf16 is the compute dtype only).
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype('float32')}


def test_trim_host_heap_returns_freed_pages():
  before = hostmem.peak_rss_mb()
  blocks = [bytearray(1 << 16) for _ in range(2000)]  # ~130 MB of small heap allocations
  assert hostmem.peak_rss_mb() >= before
  rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])
  high = rss()
  del blocks[:-1]  # the last one pins the top of the heap: only a trim gives the rest back
  assert hostmem.trim_host_heap()
  assert rss() < high - 50 * 1024
