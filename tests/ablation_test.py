"""Tests for the ablation configs' fold and form args (experiments.ablation, configs/ablation_*)."""

import pathlib

import pytest

from experiments import ablation
from experiments import sweep
from unet_ds import config_lib


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
  monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])


def test_hippocampus_folds_beside_seeds():
  config, points = sweep.load('configs/ablation_hippocampus.py:path=/data/hip,folds=5,seeds=2')
  names = sweep.point_names(points)
  assert (config.data.num_folds, config.data.val_cases) == (5, '')
  assert len(points) == 4 * 5 * 2
  # Seed-major, then fold: the first seed's every fold and form come first.
  assert names[:5] == ['mode=none,fold=0,seed=0', 'mode=deep,fold=0,seed=0',
                       'mode=additive,fold=0,seed=0', 'mode=hypercolumn,fold=0,seed=0',
                       'mode=none,fold=1,seed=0']
  assert names[-1] == 'mode=hypercolumn,fold=4,seed=1'
  assert {(p['data.fold'], p['seed']) for p in points} == {(f, s) for f in range(5) for s in (0, 1)}
  for point in points:
    run = sweep.apply_overrides(config, point)
    config_lib.validate(run)
    assert run.data.num_folds == 5 and run.data.fold == point['data.fold']


def test_weight_sweep_with_folds():
  _, points = sweep.load('configs/ablation_hippocampus.py:path=/data/hip,weights,folds=3,seeds=1')
  assert len(points) == (1 + 6) * 3
  assert sorted({p['data.fold'] for p in points}) == [0, 1, 2]


def test_forms_choose_the_compared_forms():
  _, points = sweep.load('configs/ablation_hippocampus.py:path=/data/hip,forms=none+deep,folds=5,'
                         'seeds=1,steps=300')
  assert sweep.point_names(points)[:3] == ['mode=none,fold=0,seed=0', 'mode=deep,fold=0,seed=0',
                                           'mode=none,fold=1,seed=0']
  assert len(points) == 10
  with pytest.raises(ValueError, match='forms=none\\+deeper: need distinct forms'):
    sweep.load('configs/ablation_synthetic.py:forms=none+deeper')
  with pytest.raises(ValueError, match='weights and forms=none\\+deep: .* give one form'):
    sweep.load('configs/ablation_synthetic.py:weights,forms=none+deep')


def test_weight_sweep_on_a_fused_form():
  config, points = sweep.load('configs/ablation_hippocampus.py:path=/data/hip,weights,'
                              'forms=additive,side,schedules=constant,folds=2,seeds=1')
  assert len(points) == (1 + 3) * 2
  assert {(p['model.ds.mode'], p.get('loss.ds_weights'), p.get('loss.ds_schedule'))
          for p in points} == {('none', None, None), ('additive', 'exp', 'constant'),
                               ('additive', 'nnunet', 'constant'), ('additive', 'same', 'constant')}
  assert config.loss.side_losses
  # Fold-major like the form ablation: a partly run sweep holds every weighting on fold 0.
  assert [(p['model.ds.mode'], p.get('loss.ds_weights'), p['data.fold']) for p in points[:4]] == [
      ('none', None, 0), ('additive', 'exp', 0), ('additive', 'nnunet', 0), ('additive', 'same', 0)]
  run = sweep.apply_overrides(config, next(p for p in points if p.get('loss.ds_weights') == 'same'))
  config_lib.validate(run)
  assert (run.model.ds.mode, run.loss.ds_weights, run.loss.side_losses) == ('additive', 'same', True)
  with pytest.raises(ValueError, match='forms=additive: additive.s heads get no loss without side'):
    sweep.load('configs/ablation_hippocampus.py:path=/data/hip,weights,forms=additive')
  with pytest.raises(ValueError, match='schedules=cosin\\+linear: need distinct schedules'):
    sweep.load('configs/ablation_hippocampus.py:path=/data/hip,weights,schedules=cosin+linear')
  with pytest.raises(ValueError, match='schedules=linear: only with weights'):
    sweep.load('configs/ablation_hippocampus.py:path=/data/hip,schedules=linear')


def test_bad_fold_args():
  with pytest.raises(ValueError, match='folds=5: this config has no data.num_folds'):
    sweep.load('configs/ablation_synthetic.py:folds=5')
  with pytest.raises(ValueError, match='folds=1: need an integer >= 2'):
    sweep.load('configs/ablation_hippocampus.py:path=/data/hip,folds=1')
  with pytest.raises(ValueError, match='fold=1 and folds=5: give one'):
    sweep.load('configs/ablation_hippocampus.py:path=/data/hip,fold=1,folds=5')


def test_block_folds_are_consecutive():
  ids = [str(i) for i in range(11)]
  points = ablation.block_fold_axis(ids[::-1], 3)
  assert points == [{'data.fold': 0, 'data.val_cases': '0,1,2'},
                    {'data.fold': 1, 'data.val_cases': '3,4,5,6'},
                    {'data.fold': 2, 'data.val_cases': '7,8,9,10'}]
  with pytest.raises(ValueError, match='folds=12: need 2 <= folds <= number of cases'):
    ablation.block_fold_axis(ids, 12)


def test_isbi_folds_hold_out_blocks_of_slices(tmp_path):
  for sub in ('image', 'label'):
    (tmp_path / sub).mkdir()
    for i in range(30):
      (tmp_path / sub / f'{i}.png').write_bytes(b'')
  config, points = sweep.load(f'configs/ablation_isbi.py:path={tmp_path},folds=5,seeds=1')
  assert config.data.label_map == '0:1,255:0' and config.data.val_cases == ''
  assert len(points) == 20
  held = {p['data.fold']: p['data.val_cases'] for p in points}
  assert held == {f: ','.join(str(i) for i in range(6 * f, 6 * f + 6)) for f in range(5)}
  for point in points:
    config_lib.validate(sweep.apply_overrides(config, point))
  config, points = sweep.load(f'configs/ablation_isbi.py:path={tmp_path}')
  assert config.data.val_cases == '25,26,27,28,29' and len(points) == 12
  with pytest.raises(ValueError, match='needs the folder holding image/ and label/'):
    sweep.load('configs/ablation_isbi.py')


def test_steps_given_with_smoke_are_honoured():
  smoke, _ = sweep.load('configs/ablation_synthetic.py:smoke,seeds=1')
  shorter, _ = sweep.load('configs/ablation_synthetic.py:smoke,seeds=1,steps=10')
  assert shorter.train.steps == 10 != smoke.train.steps
  assert shorter.train.eval_every == smoke.train.eval_every  # smoke's intervals stay


def test_schedules_are_honoured_with_smoke_and_counts_are_named():
  _, points = sweep.load('configs/ablation_synthetic.py:smoke,weights,schedules=linear+cosine')
  assert sorted({p.get('loss.ds_schedule') for p in points} - {None}) == ['cosine', 'linear']
  _, points = sweep.load('configs/ablation_synthetic.py:weights,schedules=constant+cosine')
  assert {p.get('loss.ds_schedule') for p in points} - {None} == {'constant', 'cosine'}
  for arg in ('seeds=two', 'steps=many'):
    with pytest.raises(ValueError, match=f'ablation arg {arg}: not a whole number'):
      sweep.load(f'configs/ablation_synthetic.py:smoke,{arg}')
