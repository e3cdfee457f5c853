"""Tests for experiments.report on hand-made workdirs: exact numbers, bad input, outputs."""

import csv
import json
import logging
import math

import numpy as np
from PIL import Image
import pytest

from experiments import case_overlays
from experiments import report
from experiments import runs as runs_lib
from experiments import stats
from unet_ds import overlays

_T_975_DF2 = 4.302652729749462  # Student t, two-sided 95%, 2 degrees of freedom (tables: 4.303).
_T_975_DF1 = 12.706204736174694


def _metrics(dice, classes):
  fg = classes[1:]
  return {'dice': classes, 'iou': [d / (2 - d) for d in classes], 'mean_foreground_dice': dice,
          'mean_foreground_iou': sum(d / (2 - d) for d in fg) / len(fg)}


def _make_run(root, name, mode, seed, dice, classes, heads=(), evals=(), lr=0.1, finished=True,
              fold=None, weights=None):
  """A workdir as unet_ds.main writes it; `evals` are (step, mean fg Dice) pairs."""
  workdir = root / name
  workdir.mkdir(parents=True)
  config = {'seed': seed, 'model': {'ds': {'mode': mode, 'levels': 2}, 'depth': 3},
            'data': {'name': 'synthetic', 'shuffle_seed': seed + 10, 'shape': [8, 8, 8]},
            'optim': {'lr': lr}, 'train': {'steps': 300, 'workdir': str(workdir)}}
  if fold is not None:
    config['data'].update(name='msd', num_folds=5, fold=fold, val_cases='')
  (workdir / 'config.json').write_text(json.dumps(config))
  num_levels = 1 + len(heads)
  with open(workdir / 'metrics.jsonl', 'w') as f:
    for step in (10, 20, 30):
      f.write(json.dumps({'step': step, 'loss': 1.0 / step, 'level_losses': [1.0 / step] * num_levels,
                          'ds_weights': weights or [1.0] * num_levels, 'lr': lr,
                          'steps_per_s': 5.0}) + '\n')
  with open(workdir / 'eval.jsonl', 'w') as f:
    for step, d in evals:
      f.write(json.dumps({'step': step, 'mean_foreground_dice': d,
                          'final': _metrics(d, [0.99, d or 0.0, d or 0.0]), 'heads': []}) + '\n')
    f.write('\n')  # Blank lines are fine.
  if finished:
    summary = {'mean_foreground_dice': dice, 'step': 300, 'final': _metrics(dice, classes),
               'heads': [_metrics(h, [0.9, h, h]) for h in heads], 'train_seconds': 60.0 + seed}
    (workdir / 'summary.json').write_text(json.dumps(summary))
  return workdir


@pytest.fixture
def root(tmp_path):
  root = tmp_path / 'sweep'
  # Baseline: final Dice 0.70, 0.74, 0.72.
  _make_run(root, 'mode=none,seed=0', 'none', 0, 0.70, [0.99, 0.60, 0.80],
            evals=[(100, 0.5), (200, 0.66), (300, 0.70)])
  _make_run(root, 'mode=none,seed=1', 'none', 1, 0.74, [0.99, 0.68, 0.80],
            evals=[(100, 0.5), (200, 0.69), (300, 0.74)])
  _make_run(root, 'mode=none,seed=2', 'none', 2, 0.72, [0.99, 0.64, 0.80],
            evals=[(100, 0.5), (200, 0.60), (300, 0.72)])
  # Deep: 0.75, 0.78, 0.80 (paired diffs 0.05, 0.04, 0.08); heads own Dice.
  _make_run(root, 'mode=deep,seed=0', 'deep', 0, 0.75, [0.99, 0.70, 0.80], heads=(0.6, 0.3),
            evals=[(100, 0.6), (200, 0.72), (300, 0.75)])
  _make_run(root, 'mode=deep,seed=1', 'deep', 1, 0.78, [0.99, 0.76, 0.80], heads=(0.7, 0.4),
            evals=[(100, 0.6), (200, 0.76), (300, 0.78)])
  _make_run(root, 'mode=deep,seed=2', 'deep', 2, 0.80, [0.99, 0.80, 0.80], heads=(0.8, 0.2),
            evals=[(100, 0.7), (200, 0.75), (300, 0.80)])
  # Additive: 2 seeds, 0.71, 0.73 (paired diffs 0.01, -0.01).
  _make_run(root, 'mode=additive,seed=0', 'additive', 0, 0.71, [0.99, 0.62, 0.80], heads=(0.5,),
            evals=[(300, 0.71)])
  _make_run(root, 'mode=additive,seed=1', 'additive', 1, 0.73, [0.99, 0.66, 0.80], heads=(0.5,),
            evals=[(300, 0.73)])
  # Hypercolumn: one seed only.
  _make_run(root, 'mode=hypercolumn,seed=1', 'hypercolumn', 1, 0.76, [0.99, 0.72, 0.80],
            heads=(0.1, 0.1), evals=[(300, 0.76)])
  # Unfinished (skipped with a warning) and an unrelated folder (ignored).
  _make_run(root, 'mode=hypercolumn,seed=2', 'hypercolumn', 2, 0.0, [], finished=False,
            evals=[(100, 0.3)])
  (root / 'plots').mkdir()
  return root


def _by_label(rep):
  return {v.label: v for v in rep.variants}


def test_numbers_are_exact(root):
  rep = report.build(root, target_dice=0.75)
  v = _by_label(rep)
  assert list(v) == ['model.ds.mode=none', 'model.ds.mode=additive', 'model.ds.mode=deep',
                     'model.ds.mode=hypercolumn']
  none, deep = v['model.ds.mode=none'], v['model.ds.mode=deep']
  add, hyper = v['model.ds.mode=additive'], v['model.ds.mode=hypercolumn']
  assert none.is_baseline and not deep.is_baseline
  assert [r.name for r in deep.runs] == ['mode=deep,seed=0', 'mode=deep,seed=1', 'mode=deep,seed=2']
  # mean and sample std (ddof=1) by hand: deviations from 0.72 are -0.02, 0.02, 0.
  assert none.dice == pytest.approx((0.72, math.sqrt((0.02**2 + 0.02**2) / 2)), abs=1e-12)
  assert deep.dice[0] == pytest.approx(0.77666666666666667, abs=1e-12)
  deep_dev = [0.75 - 2.33 / 3, 0.78 - 2.33 / 3, 0.80 - 2.33 / 3]
  assert deep.dice[1] == pytest.approx(math.sqrt(sum(d * d for d in deep_dev) / 2), abs=1e-12)
  assert deep.dice[1] == pytest.approx(0.025166114784235835, abs=1e-12)
  # Per class: class 1 of the baseline 0.60, 0.68, 0.64 -> 0.64 ± 0.04; class 2 constant.
  assert none.class_dice[1] == pytest.approx((0.64, 0.04), abs=1e-12)
  assert none.class_dice[2] == pytest.approx((0.80, 0.0), abs=1e-12)
  # Heads' own Dice, highest resolution first: (0.6, 0.7, 0.8) and (0.3, 0.4, 0.2).
  assert deep.head_dice == [pytest.approx((0.7, 0.1), abs=1e-12),
                            pytest.approx((0.3, 0.1), abs=1e-12)]
  assert none.head_dice == [] and add.head_dice == [pytest.approx((0.5, 0.0))]
  # Steps to Dice >= 0.75: deep 200 (0.76 at seed 1), 300 (0.72 then 0.75), 200 (0.75).
  assert deep.steps_to_target == [300, 200, 200]
  assert none.steps_to_target == [None, None, None]
  assert hyper.steps_to_target == [300]

  # Paired differences deep - none by seed: 0.05, 0.04, 0.08.
  d = deep.vs_baseline
  assert deep.baseline == 'model.ds.mode=none' and d.n == 3
  mean = (0.05 + 0.04 + 0.08) / 3
  sd = math.sqrt(((0.05 - mean)**2 + (0.04 - mean)**2 + (0.08 - mean)**2) / 2)
  half = _T_975_DF2 * sd / math.sqrt(3)
  assert d.mean == pytest.approx(mean, abs=1e-12) and d.std == pytest.approx(sd, abs=1e-12)
  assert (d.ci_low, d.ci_high) == (pytest.approx(mean - half, abs=1e-12),
                                   pytest.approx(mean + half, abs=1e-12))
  assert (d.ci_low, d.ci_high) == (pytest.approx(0.0049552, abs=1e-7),
                                   pytest.approx(0.1083781, abs=1e-7))
  assert d.excludes_zero
  # Additive pairs seeds 0 and 1 only: diffs 0.01, -0.01 -> mean 0, sd sqrt(2)*0.01.
  a = add.vs_baseline
  assert a.n == 2 and a.mean == pytest.approx(0.0, abs=1e-12)
  assert a.ci_high == pytest.approx(_T_975_DF1 * math.sqrt(2) * 0.01 / math.sqrt(2), abs=1e-12)
  assert a.excludes_zero is False
  # One seed: a difference but no interval.
  h = hyper.vs_baseline
  assert h.n == 1 and h.mean == pytest.approx(0.02, abs=1e-12) and math.isnan(h.ci_low)
  assert h.excludes_zero is None

  assert [w.label for w in rep.winners] == ['model.ds.mode=deep']
  assert report.headline(rep) == (
      '**Winner: `model.ds.mode=deep`, mean foreground Dice 0.7767 ± 0.0252** vs baseline '
      '`model.ds.mode=none`: +0.0567, 95% CI [+0.0050, +0.1084] over 3 paired seeds, which '
      'excludes 0: better than the baseline.')
  assert [s.path.name for s in rep.skipped] == ['mode=hypercolumn,seed=2']


def test_written_files(root, tmp_path):
  rep = report.build(root, target_dice=0.75)
  out = tmp_path / 'out'
  paths = report.write(rep, out)
  md = paths['report.md'].read_text()
  assert md.splitlines()[2] == report.headline(rep)
  table = [line for line in md.splitlines() if line.startswith('| `model.ds.mode=')]
  assert table[0] == ('| `model.ds.mode=none` | 3 | 0.7200 ± 0.0200 | 0.6400 ± 0.0400 | '
                      '0.8000 ± 0.0000 | not reached (0/3) | — | baseline | 61 |')
  assert table[2] == ('| `model.ds.mode=deep` | 3 | 0.7767 ± 0.0252 | 0.7533 ± 0.0503 | '
                      '0.8000 ± 0.0000 | 233 ± 58 (3/3) | 0.7000 ± 0.1000 / 0.3000 ± 0.1000 | '
                      '+0.0567 [+0.0050, +0.1084] | 61 |')
  assert table[3] == ('| `model.ds.mode=hypercolumn` | 1 | 0.7600 | 0.7200 | 0.8000 | 300 (1/1) '
                      '| 0.1000 / 0.1000 | +0.0200 [n/a, n=1] | 61 |')
  assert '`' + str(root / 'mode=hypercolumn,seed=2') + '`: unfinished: no summary.json' in md
  assert '![dice_vs_step.png](dice_vs_step.png)' in md
  assert 'HD95' not in md  # these runs have no boundary metrics

  with open(paths['report.csv']) as f:
    rows = {r['variant']: r for r in csv.DictReader(f)}
  deep = rows['model.ds.mode=deep']
  assert float(deep['dice_mean']) == pytest.approx(0.7766666666666667, abs=1e-15)
  assert float(deep['diff_ci_low']) == pytest.approx(0.0049552, abs=1e-7)
  assert deep['ci_excludes_zero'] == 'True' and deep['n_reached_target'] == '3'
  assert float(deep['head_2_dice_mean']) == pytest.approx(0.3, abs=1e-15)
  assert float(deep['steps_to_target_std']) == pytest.approx(math.sqrt(10000 / 3), abs=1e-9)
  hyper = rows['model.ds.mode=hypercolumn']
  assert hyper['dice_std'] == '' and hyper['diff_ci_low'] == '' and hyper['diff_n'] == '1'
  assert rows['model.ds.mode=none']['head_1_dice_mean'] == ''
  assert rows['model.ds.mode=none']['steps_to_target_mean'] == ''
  with open(paths['runs.csv']) as f:
    runs = list(csv.DictReader(f))
  assert len(runs) == 9
  assert runs[0]['run'] == 'mode=none,seed=0' and runs[0]['seeds'] == 'data.shuffle_seed=10,seed=0'
  for name in ('dice_vs_step.png', 'level_losses.png'):
    data = paths[name].read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000


def test_cli_and_unfinished_warning(root, capsys, caplog):
  with caplog.at_level(logging.WARNING):
    assert report.main([str(root), '--target-dice', '0.75']) == 0
  assert 'mode=hypercolumn,seed=2' in caplog.text and 'unfinished' in caplog.text
  out = capsys.readouterr().out
  assert out.startswith('**Winner: `model.ds.mode=deep`, mean')
  assert 'no overlays' not in out  # not asked for
  assert (root / 'report.md').is_file() and (root / 'report.csv').is_file()
  assert report.main([str(root), '--overlays=2']) == 0  # asked for, on synthetic runs
  assert ('no overlays: the runs are on synthetic data, which has no held-out case files'
          in capsys.readouterr().out)


def test_bad_files_are_named(root, capsys):
  eval_file = root / 'mode=deep,seed=1' / 'eval.jsonl'
  eval_file.write_text(eval_file.read_text() + '{"step": 400, "mean_fore\n')
  with pytest.raises(runs_lib.RunFileError, match=r'mode=deep,seed=1/eval.jsonl:5: not valid JSON'):
    report.build(root)
  with pytest.raises(SystemExit) as e:
    report.main([str(root)])
  assert e.value.code == 2 and 'eval.jsonl:5' in capsys.readouterr().err

  (root / 'mode=deep,seed=1' / 'eval.jsonl').unlink()
  with pytest.raises(runs_lib.RunFileError, match=r'mode=deep,seed=1/eval.jsonl: missing'):
    report.build(root)


def test_bad_summary_and_empty_root(tmp_path):
  run = _make_run(tmp_path / 'a', 'x', 'deep', 0, 0.5, [0.9, 0.5], heads=(0.4,), evals=[(1, 0.5)])
  summary = json.loads((run / 'summary.json').read_text())
  del summary['heads'][0]['mean_foreground_dice']
  (run / 'summary.json').write_text(json.dumps(summary))
  with pytest.raises(runs_lib.RunFileError, match=r'x/summary.json: heads\[0\]'):
    report.build(tmp_path / 'a')
  (tmp_path / 'b' / 'half').mkdir(parents=True)
  (tmp_path / 'b' / 'half' / 'config.json').write_text('{}')
  with pytest.raises(ValueError, match='no finished runs.*skipped 1 unfinished'):
    report.build(tmp_path / 'b')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    report.build(tmp_path / 'nowhere')
  (tmp_path / 'a' / 'x' / 'summary.json').write_text(json.dumps(summary))  # one run's folder
  with pytest.raises(ValueError, match=r'x is one run: give the folder that holds the runs'):
    report.build(tmp_path / 'a' / 'x')


def test_same_seed_twice_is_an_error(root):
  _make_run(root, 'copy', 'deep', 1, 0.78, [0.99, 0.76, 0.80], heads=(0.7, 0.4), evals=[(1, 0.1)])
  with pytest.raises(ValueError, match='copy and .*same variant with the same seeds'):
    report.build(root)


def test_nearest_baseline_and_labels(tmp_path):
  root = tmp_path / 'r'
  for lr in (0.1, 0.01):
    for seed, (base, deep) in enumerate([(0.5, 0.6), (0.6, 0.65)]):
      _make_run(root, f'none,lr={lr},s={seed}', 'none', seed, base + lr, [0.9, 0.5],
                evals=[(1, 0.1)], lr=lr)
      _make_run(root, f'deep,lr={lr},s={seed}', 'deep', seed, deep + lr, [0.9, 0.5], heads=(0.2,),
                evals=[(1, 0.1)], lr=lr)
  v = _by_label(report.build(root))
  assert list(v) == ['model.ds.mode=none optim.lr=0.01', 'model.ds.mode=none optim.lr=0.1',
                     'model.ds.mode=deep optim.lr=0.01', 'model.ds.mode=deep optim.lr=0.1']
  deep = v['model.ds.mode=deep optim.lr=0.1']
  assert deep.baseline == 'model.ds.mode=none optim.lr=0.1'
  assert deep.vs_baseline.mean == pytest.approx(0.075, abs=1e-12)


def test_stats_helpers():
  assert stats.mean_std([1.0]) == (1.0, pytest.approx(math.nan, nan_ok=True))
  assert stats.mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(math.sqrt(7 / 3)))
  d = stats.paired_difference({0: 1.0, 1: 2.0, 2: 5.0}, {1: 1.0, 2: 2.0, 3: 9.0})
  assert (d.n, d.mean) == (2, 2.0)
  assert d.ci_low == pytest.approx(2.0 - _T_975_DF1 * math.sqrt(2) / math.sqrt(2))
  steps, mean, std = stats.mean_curve([[(1, 0.1), (2, 0.3)], [(1, 0.3)]])
  assert steps.tolist() == [1, 2] and mean.tolist() == pytest.approx([0.2, 0.3])
  assert std[0] == pytest.approx(math.sqrt(0.02)) and math.isnan(std[1])


def test_null_numbers_from_the_trainer(tmp_path):
  """The trainer logs NaN as null: such values are n/a, never a crash or a winner."""
  root = tmp_path / 'r'
  for seed in (0, 1):
    _make_run(root, f'none{seed}', 'none', seed, 0.5, [0.9, 0.5, 0.5], evals=[(1, None), (2, 0.5)])
    run = _make_run(root, f'deep{seed}', 'deep', seed, 0.6, [0.9, 0.6, 0.6], heads=(0.4,),
                    evals=[(1, None), (2, 0.6)])
  summary = json.loads((run / 'summary.json').read_text())
  summary['final']['dice'][2] = None
  (run / 'summary.json').write_text(json.dumps(summary))
  rep = report.build(root, target_dice=0.55)
  v = _by_label(rep)
  deep = v['model.ds.mode=deep']
  assert deep.steps_to_target == [2, 2] and v['model.ds.mode=none'].steps_to_target == [None, None]
  assert deep.class_dice[1] == pytest.approx((0.6, 0.0)) and math.isnan(deep.class_dice[2][0])
  assert [w.label for w in rep.winners] == ['model.ds.mode=deep']
  row = [l for l in report.markdown(rep).splitlines() if l.startswith('| `model.ds.mode=deep')][0]
  assert '| n/a |' in row


def test_folds_pair_with_seeds(tmp_path):
  """Cross-validation: the same seed on different folds is a different pair, folds are shown."""
  root = tmp_path / 'cv'
  base = {0: (0.70, 0.72), 1: (0.80, 0.78), 2: (0.60, 0.66)}  # fold -> Dice at seeds 0, 1
  gain = {0: (0.02, 0.04), 1: (0.01, 0.01), 2: (-0.01, 0.05)}
  for fold in base:
    for seed in (0, 1):
      b, g = base[fold][seed], gain[fold][seed]
      _make_run(root, f'none,fold={fold},seed={seed}', 'none', seed, b, [0.9, b], fold=fold,
                evals=[(300, b)])
      _make_run(root, f'deep,fold={fold},seed={seed}', 'deep', seed, b + g, [0.9, b + g],
                heads=(0.5,), fold=fold, evals=[(300, b + g)])
  rep = report.build(root)
  v = _by_label(rep)
  assert list(v) == ['model.ds.mode=none', 'model.ds.mode=deep']  # the fold forms no variant
  assert rep.folds == [(('data.fold', 0),), (('data.fold', 1),), (('data.fold', 2),)]
  deep = v['model.ds.mode=deep']
  assert deep.n == 6 and deep.folds[:2] == [(('data.fold', 0),)] * 2
  assert deep.seeds[1] == (('data.fold', 0), ('data.shuffle_seed', 11), ('seed', 1))
  diffs = [0.02, 0.04, 0.01, 0.01, -0.01, 0.05]
  d = deep.vs_baseline
  mean = sum(diffs) / 6
  sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 5)
  assert (d.n, d.mean, d.std) == (6, pytest.approx(mean, abs=1e-12), pytest.approx(sd, abs=1e-12))
  assert 'over 6 paired (fold, seed) runs' in report.headline(rep)

  folds = {(r.variant, report.fold_label(r.fold)): r for r in report.per_fold(rep)}
  assert len(folds) == 6
  r = folds['model.ds.mode=none', 'fold 2']
  assert (r.n, r.dice) == (2, (pytest.approx(0.63), pytest.approx(math.sqrt(0.0018))))
  assert r.vs_baseline is None
  r = folds['model.ds.mode=deep', 'fold 2']
  assert r.vs_baseline.n == 2 and r.vs_baseline.mean == pytest.approx(0.02, abs=1e-12)
  assert r.vs_baseline.ci_high == pytest.approx(0.02 + _T_975_DF1 * 0.03, abs=1e-9)

  paths = report.write(rep, tmp_path / 'out', overlays=0)
  md = paths['report.md'].read_text()
  assert '## Held-out cases' not in md
  assert '## Per fold' in md and '| variant | fold 0 | fold 1 | fold 2 |' in md
  assert ('| `model.ds.mode=none` | 0.7100 ± 0.0141 (2) | 0.7900 ± 0.0141 (2) | '
          '0.6300 ± 0.0424 (2) |') in md
  assert '| `model.ds.mode=deep` | +0.0300 [' in md
  with open(paths['folds.csv']) as f:
    rows = list(csv.DictReader(f))
  assert [(r['variant'], r['fold'], r['n']) for r in rows][:2] == [
      ('model.ds.mode=none', 'fold 0', '2'), ('model.ds.mode=none', 'fold 1', '2')]
  assert float(rows[3]['diff_mean']) == pytest.approx(0.03, abs=1e-12)
  with open(paths['runs.csv']) as f:
    assert next(csv.DictReader(f))['fold'] == 'fold 0'


def test_no_fold_table_without_folds(root):
  rep = report.build(root)
  assert rep.folds == [] and report.per_fold(rep) == []
  assert '## Per fold' not in report.markdown(rep)


def test_synthetic_runs_skip_overlays_with_a_note(root, tmp_path):
  md = report.write(report.build(root), tmp_path / 'out')['report.md'].read_text()
  assert '## Held-out cases' in md and 'Overlays skipped: the runs are on synthetic data' in md
  assert not (tmp_path / 'out' / 'overlays').exists()


def test_overlays_of_the_first_common_pair(tmp_path, monkeypatch):
  """Real-data runs: each variant's run of one (fold, seed) pair draws the same held-out cases."""
  root = tmp_path / 'cv'
  for fold in (0, 1):
    for seed in (0, 1):
      _make_run(root, f'none,fold={fold},seed={seed}', 'none', seed, 0.7, [0.9, 0.7], fold=fold,
                evals=[(1, 0.7)])
      if (fold, seed) != (0, 0):  # deep lacks the first pair: fold 0, seed 1 is the common one
        _make_run(root, f'deep,fold={fold},seed={seed}', 'deep', seed, 0.8, [0.9, 0.8],
                  heads=(0.5,), fold=fold, evals=[(1, 0.8)])
  _make_run(root, 'hyper,fold=1,seed=5', 'hypercolumn', 5, 0.8, [0.9, 0.8], heads=(0.5,), fold=1,
            evals=[(1, 0.8)])
  loaded = []

  def fake_load(workdir):
    loaded.append(workdir.name)
    label = np.zeros((12, 10), np.int64)
    label[3:8, 2:6] = 1
    outputs = {'final': label}
    if 'deep' in workdir.name:
      outputs['head 1'] = label[::2, ::2]
    cases = [(f'case{i}', f'img{i}', f'lab{i}') for i in range(5)]
    return case_overlays.RunModel(
        cases=cases, read=lambda image, lab: {'image': np.zeros((12, 10, 1)), 'label': label},
        labels=lambda image: outputs, num_classes=2)

  monkeypatch.setattr(case_overlays, 'load_run', fake_load)
  rep = report.build(root)
  paths = report.write(rep, tmp_path / 'out', overlays=2)
  assert sorted(loaded) == ['deep,fold=0,seed=1', 'none,fold=0,seed=1']
  assert [k for k in paths if k.startswith('overlays/')] == ['overlays/case0', 'overlays/case1']
  pixels = np.asarray(Image.open(paths['overlays/case0']))
  # Columns: label, none, deep, deep head 1.
  assert pixels.shape[:2] == (overlays.PANEL_PX, 4 * overlays.PANEL_PX)
  md = paths['report.md'].read_text()
  assert 'each variant\'s run with data.fold=0, data.shuffle_seed=11, seed=1' in md
  assert 'Not in the overlays (no run with that fold and seed): `model.ds.mode=hypercolumn`' in md
  assert '![case1](overlays/case1.png)' in md


def test_overlay_failures_are_notes(tmp_path, monkeypatch):
  root = tmp_path / 'r'
  for seed in (0, 1):
    _make_run(root, f'none{seed}', 'none', seed, 0.7, [0.9, 0.7], fold=0, evals=[(1, 0.7)])

  def broken(workdir):
    raise FileNotFoundError(f'no checkpoints in {workdir}/checkpoints')

  monkeypatch.setattr(case_overlays, 'load_run', broken)
  md = report.write(report.build(root), tmp_path / 'out')['report.md'].read_text()
  # The one variant is named by its form.
  assert '`model.ds.mode=none (all runs)` left out of the overlays: ' in md
  assert 'FileNotFoundError' in md


def _make_current_run(root, name, mode, seed, dice, classes, curve, heads=(), hd95=None, nsd=None):
  """A workdir in the trainer's current format: the whole-image eval in summary.json, the
  in-training scores as pooled_foreground_dice."""
  workdir = root / name
  workdir.mkdir(parents=True)
  config = {'seed': seed, 'model': {'ds': {'mode': mode}},
            'data': {'name': 'msd', 'num_folds': 0, 'fold': 0, 'val_cases': ''}}
  (workdir / 'config.json').write_text(json.dumps(config))
  (workdir / 'metrics.jsonl').write_text(json.dumps(
      {'step': 1, 'loss': 1.0, 'level_losses': [1.0] * (1 + len(heads))}) + '\n')
  (workdir / 'eval.jsonl').write_text(''.join(
      json.dumps({'step': s, 'pooled_foreground_dice': d, 'final': _metrics(d, [0.9, d]),
                  'heads': []}) + '\n' for s, d in curve))
  eval_summary = {'mean_foreground_dice': dice, 'per_class': {'dice': classes}}
  if hd95 is not None:
    eval_summary.update(mean_foreground_hd95=hd95, mean_foreground_nsd=nsd,
                        hd95=[None, hd95], nsd=[None, nsd])
  summary = {'step': curve[-1][0], 'mean_foreground_dice': dice, 'dice_per_class': classes,
             'eval': eval_summary, 'pooled_foreground_dice': curve[-1][1],
             'final': _metrics(curve[-1][1], [0.9, curve[-1][1]]),
             'heads': [_metrics(h, [0.9, h]) for h in heads], 'train_seconds': 10.0}
  (workdir / 'summary.json').write_text(json.dumps(summary))


def test_current_format_and_boundary_metrics(tmp_path):
  root = tmp_path / 'r'
  for seed, (b, d) in enumerate([(0.80, 0.84), (0.82, 0.85)]):
    _make_current_run(root, f'none{seed}', 'none', seed, b, [0.99, b], [(10, 0.5), (20, 0.7)],
                      hd95=4.0 + seed, nsd=0.8)
    _make_current_run(root, f'deep{seed}', 'deep', seed, d, [0.99, d], [(10, 0.72), (20, 0.75)],
                      heads=(0.6,), hd95=2.0 + 2 * seed, nsd=0.9 + 0.02 * seed)
  rep = report.build(root, target_dice=0.71)
  v = _by_label(rep)
  deep = v['model.ds.mode=deep']
  # Final Dice from the whole-image eval, the curve from the in-training scores.
  assert deep.dice[0] == pytest.approx(0.845) and deep.class_dice[1][0] == pytest.approx(0.845)
  assert deep.steps_to_target == [10, 10] and v['model.ds.mode=none'].steps_to_target == [None] * 2
  assert deep.head_dice == [pytest.approx((0.6, 0.0))]
  assert deep.boundary['hd95'] == pytest.approx((3.0, math.sqrt(2)))
  assert deep.boundary['nsd'][0] == pytest.approx(0.91)
  md = report.markdown(rep)
  assert '| HD95 (mm) | NSD |' in md
  row = [l for l in md.splitlines() if l.startswith('| `model.ds.mode=none`')][0]
  assert '| 4.5000 ± 0.7071 | 0.8000 ± 0.0000 |' in row
  rows = report.variant_rows(rep)
  assert rows[1]['hd95_mean'] == pytest.approx(3.0) and rows[0]['nsd_mean'] == pytest.approx(0.8)
  assert report.run_rows(rep)[0]['hd95'] == 4.0
  # Runs without boundary metrics: no such columns.


def test_block_folds_are_labelled_by_fold(tmp_path):
  """ISBI-style folds set data.fold and data.val_cases together: one fold, labelled by number."""
  root = tmp_path / 'isbi'
  for fold, held in enumerate(['0,1,2', '3,4,5']):
    for mode, dice in (('none', 0.7), ('deep', 0.72)):
      run = _make_run(root, f'{mode},fold={fold}', mode, 0, dice + fold / 10, [0.9, dice],
                      fold=fold, evals=[(1, dice)])
      config = json.loads((run / 'config.json').read_text())
      config['data']['val_cases'] = held
      (run / 'config.json').write_text(json.dumps(config))
  rep = report.build(root)
  assert [report.fold_label(f) for f in rep.folds] == ['fold 0', 'fold 1']
  assert rep.folds[1] == (('data.fold', 1), ('data.val_cases', '3,4,5'))
  deep = _by_label(rep)['model.ds.mode=deep']
  assert deep.vs_baseline.n == 2 and deep.vs_baseline.mean == pytest.approx(0.02, abs=1e-12)
  assert report.fold_label((('data.val_cases', '3,4,5'),)) == 'data.val_cases=3,4,5'


def _add_keys(run, keys):
  """Sets nested config keys ('train.minutes') in a hand-made run's config.json."""
  config = json.loads((run / 'config.json').read_text())
  for key, value in keys.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  (run / 'config.json').write_text(json.dumps(config))


def test_keys_added_since_a_run_count_at_their_defaults(tmp_path):
  """Runs written before `train.minutes` / `model.strides` existed group with runs that record
  those keys at their defaults (0, []); a run with another value is its own variant."""
  root = tmp_path / 'mixed'
  for seed in (0, 1):  # old runs: no such keys
    _make_run(root, f'none,old,s={seed}', 'none', seed, 0.70 + seed / 100, [0.9, 0.7])
    _make_run(root, f'deep,old,s={seed}', 'deep', seed, 0.72 + seed / 100, [0.9, 0.7], heads=(0.5,))
  for seed in (2, 3):  # new runs: the keys at their defaults
    for mode, dice in (('none', 0.71), ('deep', 0.74)):
      run = _make_run(root, f'{mode},new,s={seed}', mode, seed, dice, [0.9, dice],
                      heads=(0.5,) if mode == 'deep' else ())
      _add_keys(run, {'train.minutes': 0.0, 'model.strides': []})
  run = _make_run(root, 'deep,budget', 'deep', 0, 0.8, [0.9, 0.8], heads=(0.5,))
  _add_keys(run, {'train.minutes': 5.0, 'model.strides': []})
  v = _by_label(report.build(root))
  assert list(v) == ['model.ds.mode=none train.minutes=0.0', 'model.ds.mode=deep train.minutes=0.0',
                     'model.ds.mode=deep train.minutes=5.0']
  deep = v['model.ds.mode=deep train.minutes=0.0']
  assert [r.name for r in deep.runs] == ['deep,old,s=0', 'deep,old,s=1', 'deep,new,s=2',
                                         'deep,new,s=3']
  # Seeds are still the run's own seed keys: filling defaults adds none (no data.seed etc.).
  assert deep.seeds[0] == (('data.shuffle_seed', 10), ('seed', 0))
  assert deep.vs_baseline.n == 4
  assert deep.vs_baseline.mean == pytest.approx((0.02 * 2 + 0.03 * 2) / 4, abs=1e-12)
  # Without the new keys anywhere, nothing is filled: the hand-made configs stay as they are.
  assert 'train.minutes' not in report.with_missing_defaults([{'seed': 0}, {'seed': 1}])[0]
  assert report.with_missing_defaults([{'seed': 0}, {'seed': 1, 'train.minutes': 2.0}]) == [
      {'seed': 0, 'train.minutes': 0.0}, {'seed': 1, 'train.minutes': 2.0}]


def test_no_winner_without_a_settling_interval(tmp_path):
  """The highest mean is named a winner only when its paired interval excludes 0."""
  one = tmp_path / 'one_seed'  # one pair: a difference, no interval
  _make_run(one, 'none0', 'none', 0, 0.70, [0.99, 0.7, 0.7])
  _make_run(one, 'deep0', 'deep', 0, 0.75, [0.99, 0.75, 0.75], heads=(0.5,))
  line = report.headline(report.build(one))
  assert line.startswith('No winner named: highest mean `model.ds.mode=deep`') and '**' not in line
  assert 'over 1 paired seed, no interval' in line
  mixed = tmp_path / 'mixed'  # deep: diffs +0.05, -0.03 (CI includes 0); additive: -0.02, -0.021
  for seed, (none, deep, add) in enumerate([(0.70, 0.75, 0.68), (0.72, 0.69, 0.699)]):
    _make_run(mixed, f'none{seed}', 'none', seed, none, [0.99, none, none])
    _make_run(mixed, f'deep{seed}', 'deep', seed, deep, [0.99, deep, deep], heads=(0.5,))
    _make_run(mixed, f'add{seed}', 'additive', seed, add, [0.99, add, add], heads=(0.5,))
  line = report.headline(report.build(mixed))
  assert line.startswith('No winner: the highest mean is `model.ds.mode=deep`')
  assert 'which includes 0: not distinguishable from the baseline; worse than the baseline at ' \
         '95%: `model.ds.mode=additive`.' in line



def test_a_variant_whose_heads_were_all_weighted_0_is_noted(tmp_path):
  for seed in (0, 1):
    _make_run(tmp_path, f'none{seed}', 'none', seed, 0.7, [0.99, 0.7, 0.7])
    _make_run(tmp_path, f'deep{seed}', 'deep', seed, 0.7, [0.99, 0.7, 0.7], heads=(0.5,),
              weights=[1.0, 0.0])
  built = report.build(tmp_path)
  assert [report.heads_inert(v) for v in built.variants] == [False, True]
  assert ('Note: `model.ds.mode=deep` weighted every DS head 0 at every logged step'
          in report.markdown(built))


def test_headline_caveats_uneven_counts_one_seed_and_nan(tmp_path):
  uneven = tmp_path / 'uneven'  # deep's worst seed missing: its mean is over 2 seeds, none's 3
  for seed, (none, deep) in enumerate([(0.70, 0.60), (0.72, 0.73), (0.74, 0.738)]):
    _make_run(uneven, f'none{seed}', 'none', seed, none, [0.99, none, none])
    if seed:
      _make_run(uneven, f'deep{seed}', 'deep', seed, deep, [0.99, deep, deep], heads=(0.5,))
  line = report.headline(report.build(uneven))
  assert line.startswith('No winner: the highest mean is `model.ds.mode=deep`'), line
  assert '(run counts differ, 2 to 3: the means are over different seeds;' in line
  # The baseline's mean is highest over its extra seed, but paired, deep is ahead: said so.
  ahead = tmp_path / 'ahead'  # deep's seed 2 missing; paired diffs +0.01, +0.02
  for seed, (none, deep) in enumerate([(0.70, 0.71), (0.72, 0.74), (0.90, None)]):
    _make_run(ahead, f'none{seed}', 'none', seed, none, [0.99, none, none])
    if deep is not None:
      _make_run(ahead, f'deep{seed}', 'deep', seed, deep, [0.99, deep, deep], heads=(0.5,))
  line = report.headline(report.build(ahead))
  assert line.startswith('No winner named: the highest mean is the baseline '
                         '`model.ds.mode=none`'), line
  assert line.endswith('paired with it, `model.ds.mode=deep` is +0.0150 over 2 seeds, 95% CI '
                       '[-0.0485, +0.0785].'), line
  one = tmp_path / 'one'  # the baseline highest, one seed: no bold claim
  _make_run(one, 'none0', 'none', 0, 0.75, [0.99, 0.75, 0.75])
  _make_run(one, 'deep0', 'deep', 0, 0.70, [0.99, 0.7, 0.7], heads=(0.5,))
  line = report.headline(report.build(one))
  assert line.startswith('No variant beat the baseline in these runs, but none has an interval')
  assert '**' not in line
  nan = tmp_path / 'nan'  # three pairs, one baseline Dice NaN
  for seed, (none, deep) in enumerate([(None, 0.75), (0.70, 0.74), (0.71, 0.76)]):
    _make_run(nan, f'none{seed}', 'none', seed, none, [0.99, none or 0.0, none or 0.0])
    _make_run(nan, f'deep{seed}', 'deep', seed, deep, [0.99, deep, deep], heads=(0.5,))
  line = report.headline(report.build(nan))
  assert "over 3 paired seeds, no interval (a paired difference is not a number: a run's Dice " \
         'is NaN)' in line, line

def test_a_weight_sweeps_baseline_is_labelled_without_its_inert_ds_weights(tmp_path):
  root = tmp_path / 'weights'
  for mode, weights in (('none', 'exp'), ('deep', 'exp'), ('deep', 'same')):
    for seed in (0, 1):
      workdir = _make_run(root, f'{mode},{weights},{seed}', mode, seed, 0.7 + 0.01 * seed,
                          [0.99, 0.7, 0.7])
      config = json.loads((workdir / 'config.json').read_text())
      config['loss'] = {'ds_weights': weights}
      (workdir / 'config.json').write_text(json.dumps(config))
  labels = [v.label for v in report.build(root).variants]
  assert labels == ['model.ds.mode=none', 'loss.ds_weights=exp model.ds.mode=deep',
                    'loss.ds_weights=same model.ds.mode=deep']
  # Two no-DS variants that differ only in a DS weight keep it, or they would share a label.
  workdir = _make_run(root, 'none,same,0', 'none', 0, 0.7, [0.99, 0.7, 0.7])
  config = json.loads((workdir / 'config.json').read_text())
  config['loss'] = {'ds_weights': 'same'}
  (workdir / 'config.json').write_text(json.dumps(config))
  labels = [v.label for v in report.build(root).variants]
  assert 'loss.ds_weights=exp model.ds.mode=none' in labels
  assert 'loss.ds_weights=same model.ds.mode=none' in labels


def test_another_baseline_for_a_weight_sweep_without_a_no_ds_run(tmp_path):
  for seed, (exp, same) in enumerate([(0.70, 0.72), (0.74, 0.77), (0.71, 0.74)]):
    for weights, dice in (('exp', exp), ('same', same)):
      workdir = _make_run(tmp_path, f'{weights},{seed}', 'deep', seed, dice, [0.99, dice, dice],
                          heads=(0.5,))
      config = json.loads((workdir / 'config.json').read_text())
      config['loss'] = {'ds_weights': weights}
      (workdir / 'config.json').write_text(json.dumps(config))
  line = report.headline(report.build(tmp_path))
  assert 'no `model.ds.mode=none` baseline among the runs' in line and '--baseline' in line
  built = report.build(tmp_path, baseline='loss.ds_weights=exp')
  base, same = built.variants
  assert base.is_baseline and same.baseline == base.label
  assert same.vs_baseline.mean == pytest.approx(0.0267, abs=1e-4) and same.vs_baseline.n == 3
  assert report.headline(built).startswith('**Winner: `loss.ds_weights=same`')
  with pytest.raises(ValueError, match=r"no variant has loss.ds_weights=nnunet; its values: "
                                       r"exp, same"):
    report.build(tmp_path, baseline='loss.ds_weights=nnunet')
  with pytest.raises(ValueError, match=r"no run has the config key 'loss.ds_weight'"):
    report.build(tmp_path, baseline='loss.ds_weight=exp')
