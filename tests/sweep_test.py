"""Tests for experiments.sweep: building sweeps, point names, loading and checking points."""

import pathlib
import textwrap

import pytest
from ml_collections import config_dict

from experiments import sweep


def _config():
  return config_dict.ConfigDict({
      'seed': 0,
      'model': {'ds': {'mode': 'none', 'levels': 2}},
      'loss': {'ds_weights': (1.0, 0.5), 'mode': 'ce', 'lr': 0.1},
  })


def test_product_order_and_points():
  points = sweep.product(
      sweep.axis('model.ds.mode', ['none', 'deep']), sweep.axis('seed', [0, 1, 2]))
  assert points == [
      {'model.ds.mode': 'none', 'seed': 0}, {'model.ds.mode': 'none', 'seed': 1},
      {'model.ds.mode': 'none', 'seed': 2}, {'model.ds.mode': 'deep', 'seed': 0},
      {'model.ds.mode': 'deep', 'seed': 1}, {'model.ds.mode': 'deep', 'seed': 2},
  ]
  assert sweep.point_names(points) == [
      'mode=none,seed=0', 'mode=none,seed=1', 'mode=none,seed=2',
      'mode=deep,seed=0', 'mode=deep,seed=1', 'mode=deep,seed=2',
  ]


def test_zip_chain_and_lists_become_tuples():
  weights = sweep.zip_axes(sweep.axis('loss.ds_weights', [[1, 0.5], (1, 0)]),
                           sweep.axis('model.ds.levels', [2, 1]))
  points = sweep.chain([{'model.ds.mode': 'none'}],
                       sweep.product(sweep.axis('model.ds.mode', ['deep']), weights))
  assert points == [
      {'model.ds.mode': 'none'},
      {'model.ds.mode': 'deep', 'loss.ds_weights': (1, 0.5), 'model.ds.levels': 2},
      {'model.ds.mode': 'deep', 'loss.ds_weights': (1, 0), 'model.ds.levels': 1},
  ]
  assert sweep.point_names(points) == [
      'mode=none', 'mode=deep,ds_weights=1_0.5,levels=2', 'mode=deep,ds_weights=1_0,levels=1']


def test_bad_sweeps_raise():
  with pytest.raises(ValueError, match='no values'):
    sweep.axis('seed', [])
  with pytest.raises(TypeError, match='single value'):
    sweep.axis('model.ds.mode', 'deep')
  with pytest.raises(ValueError, match='dotted config key'):
    sweep.axis('model..mode', [1])
  with pytest.raises(ValueError, match='one length'):
    sweep.zip_axes(sweep.axis('a', [1, 2]), sweep.axis('b', [1]))
  with pytest.raises(ValueError, match="key 'a' is set twice"):
    sweep.product(sweep.axis('a', [1]), sweep.axis('a', [2]))
  with pytest.raises(ValueError, match='same point'):
    sweep.point_names([{'a': 1}, {'a': 1}])


def test_names_disambiguate_keys_with_one_last_component():
  points = sweep.product(sweep.axis('model.ds.mode', ['deep']), sweep.axis('loss.mode', ['dice']),
                         sweep.axis('mode', [1]))
  assert sweep.point_names(points) == ['ds.mode=deep,loss.mode=dice,mode=1']


def test_names_are_filesystem_safe_and_clashes_get_hashes():
  points = [{'a': 1}, {'a': '1'}, {'a': 'x/y z'}, {'a': 'x_y_z'}, {'a': '.hidden'}, {'a': -1.5},
            {'a': 1e-5}, {'a': True}, {'a': None}, {'a': ()}, {}]
  names = sweep.point_names(points)
  assert len(set(names)) == len(names)
  for name in names:
    assert pathlib.PurePosixPath(name).name == name and not name.startswith(('.', '-'))
    assert all(c.isalnum() or c in '._+=,-' for c in name), name
  # Clashing names keep their readable part and differ by a hash of the exact point.
  assert names[0].startswith('a=1+') and names[1].startswith('a=1+') and names[0] != names[1]
  assert names[2].startswith('a=x_y_z+') and names[3].startswith('a=x_y_z+')
  assert names[4:] == ['a=.hidden', 'a=-1.5', 'a=1e-05', 'a=True', 'a=None', 'a=empty', 'default']
  # Deterministic: same points, same names (hashes don't depend on the process).
  assert sweep.point_names(points) == names
  assert names[0] == 'a=1+' + sweep._hash(sweep._fingerprint({'a': 1}))


def test_long_names_are_cut_with_a_hash():
  points = [{'data.path': '/data/' + 'x' * 300}, {'data.path': '/data/' + 'x' * 299 + 'y'}]
  names = sweep.point_names(points, max_len=60)
  assert [len(n) for n in names] == [60, 60]
  assert names[0][:51] == names[1][:51] == 'path=_data_' + 'x' * 40
  assert names[0] != names[1]
  assert sweep.point_names([{'a': 'short'}], max_len=60) == ['a=short']


def test_apply_overrides_checks_keys_and_types():
  config = _config()
  new = sweep.apply_overrides(config, {'model.ds.mode': 'deep', 'loss.ds_weights': [0.2, 0.1],
                                       'loss.lr': 1})
  assert new.model.ds.mode == 'deep' and new.loss.ds_weights == (0.2, 0.1)
  assert isinstance(new.loss.lr, float) and new.loss.lr == 1.0
  assert config.model.ds.mode == 'none'  # The original is untouched.
  with pytest.raises(KeyError, match="did you mean model.ds.mode"):
    sweep.apply_overrides(config, {'model.ds.mod': 'deep'})
  with pytest.raises(KeyError, match="no key 'modle'"):
    sweep.apply_overrides(config, {'modle.ds.mode': 'deep'})
  with pytest.raises(TypeError, match="key 'seed'"):
    sweep.apply_overrides(config, {'seed': 'one'})
  with pytest.raises(TypeError, match='config group'):
    sweep.apply_overrides(config, {'model.ds': 1})


_CONFIG_FILE = '''
from ml_collections import config_dict
from experiments import sweep

def get_config(arg=None):
  return config_dict.ConfigDict({'seed': 0, 'model': {'ds': {'mode': 'none'}}, 'arg': str(arg)})

def get_sweep(arg=None):
  seeds = [0] if arg == 'smoke' else [0, 1]
  return sweep.product(sweep.axis('model.ds.mode', ['none', MODE]), sweep.axis('seed', seeds))
'''


def test_load_reads_config_file_and_checks_points(tmp_path):
  path = tmp_path / 'cfg.py'
  path.write_text(_CONFIG_FILE.replace('MODE', "'deep'"))
  config, points = sweep.load(f'{path}:smoke')
  assert config.arg == 'smoke'
  assert points == [{'model.ds.mode': 'none', 'seed': 0}, {'model.ds.mode': 'deep', 'seed': 0}]
  _, points = sweep.load(str(path))
  assert len(points) == 4

  bad = tmp_path / 'bad.py'
  bad.write_text(_CONFIG_FILE.replace("'model.ds.mode'", "'model.ds.mdoe'").replace('MODE', '1'))
  with pytest.raises(ValueError, match=r'bad.py: sweep point 0 .*did you mean model.ds.mode'):
    sweep.load(str(bad))
  typed = tmp_path / 'typed.py'
  typed.write_text(_CONFIG_FILE.replace('MODE', '3'))
  with pytest.raises(ValueError, match=r"typed.py: sweep point 2 .*key 'model.ds.mode'"):
    sweep.load(str(typed))
  nosweep = tmp_path / 'nosweep.py'
  nosweep.write_text(textwrap.dedent(_CONFIG_FILE.split('def get_sweep')[0]))
  with pytest.raises(ValueError, match='nosweep.py defines no get_sweep'):
    sweep.load(str(nosweep))
  with pytest.raises(FileNotFoundError, match='missing.py'):
    sweep.load(str(tmp_path / 'missing.py'))


@pytest.mark.parametrize('config_arg, count, first, last', [
    ('configs/ablation_synthetic.py', 12, 'mode=none,seed=0', 'mode=hypercolumn,seed=2'),
    ('configs/ablation_synthetic.py:smoke', 4, 'mode=none,seed=0', 'mode=deep,seed=1'),
    ('configs/ablation_synthetic.py:weights', 21, 'mode=none,seed=0',
     'mode=deep,ds_weights=same,ds_schedule=linear,seed=2'),
    ('configs/ablation_synthetic.py:weights,smoke', 3, 'mode=none,seed=0',
     'mode=deep,ds_weights=same,ds_schedule=linear,seed=0'),
    ('configs/ablation_synthetic.py:seeds=2,steps=60,side', 8, 'mode=none,seed=0',
     'mode=hypercolumn,seed=1'),
    ('configs/ablation_hippocampus.py:path=/data/hip', 12, 'mode=none,seed=0',
     'mode=hypercolumn,seed=2'),
])
def test_ablation_configs(config_arg, count, first, last, monkeypatch):
  from unet_ds import config_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
  config, points = sweep.load(config_arg)
  names = sweep.point_names(points)
  assert (len(points), names[0], names[-1]) == (count, first, last)
  for point in points:  # Every point is a valid experiment (checked before any compute).
    config_lib.validate(sweep.apply_overrides(config, point))
  if 'steps=60' in config_arg:
    assert (config.train.steps, config.train.eval_every, config.loss.side_losses) == (60, 10, True)


def test_hippocampus_ablation_needs_a_path(monkeypatch):
  monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])
  with pytest.raises(ValueError, match='needs the task folder'):
    sweep.load('configs/ablation_hippocampus.py')
  config, _ = sweep.load('configs/ablation_hippocampus.py:path=/data/hip,fold=1')
  assert (config.data.name, config.data.path, config.data.fold) == ('msd', '/data/hip', 1)
