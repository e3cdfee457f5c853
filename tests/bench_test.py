"""Smoke run of the benchmark on a tiny config: the JSON record's fields and their consistency."""

import importlib.util
import json
import math
import os

import pytest

from unet_ds import bench

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
  assert record['peak_rss_mb'] > 0
  assert record['config']['model']['depth'] == c.model.depth


def test_bench_reference_config_and_known_peaks():
  c = _config('unet3d.py', 'bench_ref')
  assert tuple(c.data.shape) == (64, 64, 64) and c.train.batch_size == 2
  assert (c.model.base_filters, c.model.depth, c.model.residual) == (16, 4, True)
  assert tuple(c.model.ds.levels) == (1, 2) and c.optim.name == 'sgd'
  assert bench.known_peak('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert bench.known_peak('cpu', 'float32') is None


def test_bench_rejects_bad_steps():
  with pytest.raises(ValueError, match='steps'):
    bench.run(_config('unet2d.py', 'smoke'), steps=0)
