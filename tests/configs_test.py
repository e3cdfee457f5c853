"""Every config file and argument loads and validates; bad configs fail before any compute."""

import glob
import json
import importlib.util
import os
import subprocess
import sys

import pytest

from unet_ds import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
ARGS = [None, 'smoke', 'ds=none,smoke', 'ds=deep', 'ds=additive,smoke', 'ds=hypercolumn,smoke',
        'bench_ref', 'seed=3']


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _needs_path(c):
  return c.data.name in ('msd', 'folder2d')


@pytest.mark.parametrize('path', [p for p in CONFIG_FILES if not p.endswith('__init__.py')],
                         ids=os.path.basename)
def test_every_config_and_arg_validates(path):
  module = _load(path)
  args = getattr(module, 'ARGS', ARGS)  # a config file may declare its own argument set
  for arg in args:
    try:
      c = module.get_config(arg)
    except ValueError as e:  # an arg this file does not take must say so clearly
      assert 'unknown config argument' in str(e), (path, arg, e)
      continue
    config_lib.validate(c)
    assert c.model.num_classes in (c.data.num_classes, 1)


def test_arg_parsing_and_unknown_arg():
  assert config_lib.parse_arg('ds=deep,smoke') == {'ds': 'deep', 'smoke': True}
  with pytest.raises(ValueError, match="unknown config argument 'smok'"):
    config_lib.apply_args(config_lib.base_config(3), 'smok')


@pytest.mark.parametrize('key,value,match', [
    ('model.ds.mode', 'deeper', r'^config\.model\.ds\.mode must be one of'),
    ('model.depth', 1, r'^config\.model\.depth must be >= 2, got 1'),
    ('loss.ds_weights', '1,0.5,0.25,0.1', r'^config\.loss\.ds_weights: has 4 values'),
    ('loss.ds_weights', 'linear', r"^config\.loss\.ds_weights: 'linear' is neither one of"),
    ('loss.name', 'focal', 'config.loss.name'),
    ('optim.name', 'lamb', 'config.optim.name'),
    ('loss.ds_schedule', 'step', 'config.loss.ds_schedule'),
    ('train.steps', 0, 'config.train.steps'),
    ('data.shape', (20, 16, 16), r'\(20, 16, 16\) must be divisible by 8'),
    ('loss.name', 'bce_dice', 'bce_dice needs model.num_classes=1'),
    ('mesh.space', 3, 'config.mesh.space=3 must divide'),
])
def test_validation_errors_name_the_key(key, value, match):
  c = config_lib.base_config(3)
  group, _, field = key.rpartition('.')
  node = c
  for part in group.split('.'):
    node = node[part]
  node[field] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


@pytest.mark.parametrize('seed', [-1, 2**31])
def test_bad_seed_names_the_key(seed):
  c = config_lib.base_config(3)
  c.seed = seed
  with pytest.raises(ValueError, match=r'config.seed: must be an int in \[0, 2\*\*31\)'):
    config_lib.validate(c)


def test_cli_unknown_key_and_bad_value_fail_before_compute(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  cmd = [sys.executable, '-m', 'unet_ds.main', '--config=configs/unet3d.py:smoke',
         f'--workdir={tmp_path / "w"}']
  bad_key = subprocess.run(cmd + ['--config.loss.weights=exp'], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
  assert bad_key.returncode != 0 and 'weights' in bad_key.stderr
  bad_value = subprocess.run(cmd + ['--config.model.norm=layer'], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
  assert bad_value.returncode != 0 and 'norm must be one of' in bad_value.stderr
  assert not (tmp_path / 'w').exists()  # nothing was created, nothing ran


def _flat(d, prefix=''):
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def test_real_data_configs_resolve_as_recorded():
  # tests/testdata/real_data_configs.json holds, per file and argument string, every field where
  # the resolved config differs from base_config(ndim), as recorded before msd.py and folder2d.py
  # were composed from config_lib.real_data_config: the composition must not change a value.
  with open(os.path.join(ROOT, 'tests', 'testdata', 'real_data_configs.json')) as f:
    recorded = json.load(f)
  for name, by_arg in recorded.items():
    module = _load(os.path.join(ROOT, 'configs', f'{name}.py'))
    for arg, expected in by_arg.items():
      c = module.get_config(arg or None)
      base = _flat(json.loads(config_lib.to_json(config_lib.base_config(c.data.ndim))))
      got = _flat(json.loads(config_lib.to_json(c)))
      assert set(base) <= set(got), (name, arg, set(base) - set(got))
      diff = {k: v for k, v in got.items() if k not in base or base[k] != v}
      assert diff == expected, (name, arg)


@pytest.mark.parametrize('key, value, match', [
    ('data.val_fraction', 0.0, 'val_fraction=0 leaves no validation cases'),
    ('data.eval_shape', (12, 16, 16), r'eval_shape \(12, 16, 16\).*divisible by 8'),
])
def test_real_data_config_gaps_fail_at_config_time(key, value, match):
  spec = importlib.util.spec_from_file_location('msd_cfg', 'configs/msd.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('path=/nowhere')
  group, name = key.split('.')
  c[group][name] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_imports_have_no_cycle():
  """Each module imports alone in a fresh process (a cycle hidden in function-level imports
  shows up as a partially initialised module), and predict never pulls in train."""
  code = ('import sys, unet_ds.predict, unet_ds.evaluate; '
          'assert "unet_ds.train" not in sys.modules, "predict imports train"; '
          'import unet_ds.train, unet_ds.multirun, unet_ds.main, unet_ds.bench, unet_ds.plan')
  res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]


def test_a_multirun_ds_weights_error_names_its_index_once():
  c = config_lib.base_config(3)
  c.multirun.k = 2
  c.multirun.ds_weights = ('exp', 'a,b')
  with pytest.raises(ValueError, match=r"^config\.multirun\.ds_weights\[1\]: 'a,b' is neither"):
    config_lib.validate(c)
  c.multirun.ds_weights = ('exp', '1,2,3,4,5')
  with pytest.raises(ValueError, match=r'^config\.multirun\.ds_weights\[1\]: has 5 values'):
    config_lib.validate(c)


def test_fill_defaults_gives_a_run_on_files_the_real_data_keys_added_since():
  # A hippocampus run written before data.aug_* existed resumes and groups with today's runs.
  c = config_lib.real_data_config(3, 'msd')
  saved = json.loads(config_lib.to_json(c))
  for key in ('aug_rotate_p', 'aug_plane', 'fg_fraction'):
    del saved['data'][key]
  assert config_lib.fill_defaults(saved) == json.loads(config_lib.to_json(c))
  synthetic = json.loads(config_lib.to_json(config_lib.base_config(3)))
  assert 'aug_rotate_p' not in config_lib.fill_defaults(synthetic)['data']  # files only
