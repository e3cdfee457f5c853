"""Tests for adaptive ablations (`experiments.until`, `launch --until`) on hand-made workdirs."""

import json
import math

import pytest

from experiments import launch
from experiments import until

_CONFIG_FILE = '''
from ml_collections import config_dict
from experiments import sweep

def get_config(arg=None):
  return config_dict.ConfigDict({'seed': 0, 'model': {'ds': {'mode': 'none'}}})

def get_sweep(arg=None):
  return sweep.product(sweep.axis('model.ds.mode', ['none', 'deep', 'additive', 'hypercolumn']),
                       sweep.axis('seed', [0, 1]))
'''
_BASE = [0.80, 0.82, 0.81, 0.79, 0.80, 0.83, 0.81, 0.80]
# Differences to the baseline per seed: deep is exactly +0.05 (settles at once); additive is
# noisy at first (half-widths 0.64, 0.12, 0.065, 0.044 for 2..5 seeds: settles at 5 seeds with a
# target of 0.05); hypercolumn swings +-0.2 (never settles: capped).
_DIFF = {'none': [0.0] * 8, 'deep': [0.05] * 8, 'additive': [0.0, 0.1] + [0.05] * 6,
         'hypercolumn': [0.2, -0.2] * 4}


def _dice(mode, seed):
  return _BASE[seed] + _DIFF[mode][seed]


class FakeTraining:
  """Stands in for `unet_ds.main`: writes the point's summary.json with its table Dice."""

  def __init__(self):
    self.ran = []

  def __call__(self, argv, workdir):
    flags = dict(a[2:].split('=', 1) for a in argv[3:])
    mode, seed = flags['config.model.ds.mode'], int(flags['config.seed'])
    self.ran.append(workdir.name)
    (workdir / 'summary.json').write_text(json.dumps({'mean_foreground_dice': _dice(mode, seed)}))
    return 0


@pytest.fixture
def root(tmp_path):
  """A sweep root whose first round (2 seeds per form) is already finished, written by hand."""
  root = tmp_path / 'runs'
  for mode in _DIFF:
    for seed in (0, 1):
      workdir = root / f'mode={mode},seed={seed}'
      workdir.mkdir(parents=True)
      (workdir / 'config.json').write_text(json.dumps(
          {'seed': seed, 'model': {'ds': {'mode': mode}}}))
      (workdir / 'summary.json').write_text(json.dumps(
          {'mean_foreground_dice': _dice(mode, seed)}))
  return root


@pytest.fixture
def config_path(tmp_path):
  path = tmp_path / 'ablation.py'
  path.write_text(_CONFIG_FILE)
  return str(path)


def test_adds_seeds_until_settled_or_capped(config_path, root):
  fake, out = FakeTraining(), []
  code = launch.main([f'--config={config_path}', f'--root={root}',
                      '--until=ci_halfwidth:0.05,max_seeds:5'], runner=fake, out=out.append)
  assert code == 0
  # Rounds 1..3 add seeds 2, 3, 4 to the open comparisons and to the baseline; deep, settled in
  # round 0, never gets another seed.
  assert fake.ran == ['mode=none,seed=2', 'mode=additive,seed=2', 'mode=hypercolumn,seed=2',
                      'mode=none,seed=3', 'mode=additive,seed=3', 'mode=hypercolumn,seed=3',
                      'mode=none,seed=4', 'mode=additive,seed=4', 'mode=hypercolumn,seed=4']
  record = json.loads((root / 'until.json').read_text())
  assert record['rule'] == {'ci_halfwidth': 0.05, 'max_seeds': 5, 'confidence': 0.95}
  assert record['settled'] == ['mode=deep', 'mode=additive']
  assert record['not_settled'] == ['mode=hypercolumn']
  assert [r['added'] for r in record['rounds']] == [
      ['mode=none,seed=2', 'mode=additive,seed=2', 'mode=hypercolumn,seed=2'],
      ['mode=none,seed=3', 'mode=additive,seed=3', 'mode=hypercolumn,seed=3'],
      ['mode=none,seed=4', 'mode=additive,seed=4', 'mode=hypercolumn,seed=4'], []]
  last = {c['variant']: c for c in record['rounds'][-1]['comparisons']}
  assert (last['mode=deep']['status'], last['mode=deep']['pairs']) == ('settled', 2)
  assert last['mode=deep']['mean'] == pytest.approx(0.05)
  assert last['mode=deep']['half_width'] == pytest.approx(0.0, abs=1e-9)
  assert (last['mode=additive']['status'], last['mode=additive']['seeds']) == ('settled', 5)
  assert last['mode=additive']['half_width'] == pytest.approx(0.0439, abs=1e-4)
  assert (last['mode=hypercolumn']['status'], last['mode=hypercolumn']['seeds']) == ('capped', 5)
  assert last['mode=hypercolumn']['half_width'] > 0.05
  additive_rounds = [next(c for c in r['comparisons'] if c['variant'] == 'mode=additive')
                     for r in record['rounds']]
  assert [c['status'] for c in additive_rounds] == ['open', 'open', 'open', 'settled']
  assert [round(c['half_width'], 3) for c in additive_rounds] == [0.635, 0.124, 0.065, 0.044]
  assert any('2 of 3 comparisons settled' in line for line in out)
  # sweep.json lists the added points beside the sweep's own.
  names = [p['name'] for p in json.loads((root / 'sweep.json').read_text())['points']]
  assert len(names) == 17 and names[-1] == 'mode=hypercolumn,seed=4'

  # Launching again re-derives the same rounds from the workdirs and trains nothing.
  fake.ran.clear()
  assert launch.main([f'--config={config_path}', f'--root={root}',
                      '--until=ci_halfwidth:0.05,max_seeds:5'], runner=fake, out=out.append) == 0
  assert fake.ran == []
  assert json.loads((root / 'until.json').read_text()) == record


def test_stops_at_once_when_everything_is_settled(config_path, root):
  fake = FakeTraining()
  assert launch.main([f'--config={config_path}', f'--root={root}',
                      '--until=ci_halfwidth:3'], runner=fake, out=lambda s: None) == 0
  assert fake.ran == []
  record = json.loads((root / 'until.json').read_text())
  assert len(record['rounds']) == 1 and record['not_settled'] == []


def test_cap_of_two_seeds_adds_nothing(config_path, root):
  fake = FakeTraining()
  assert launch.main([f'--config={config_path}', f'--root={root}',
                      '--until=ci_halfwidth:0.05,max_seeds:2'], runner=fake,
                     out=lambda s: None) == 0
  assert fake.ran == []
  statuses = {c['variant']: c['status']
              for c in json.loads((root / 'until.json').read_text())['rounds'][0]['comparisons']}
  assert statuses == {'mode=deep': 'settled', 'mode=additive': 'capped',
                      'mode=hypercolumn': 'capped'}


def test_unfinished_round_stops_without_deciding(config_path, root):
  (root / 'mode=deep,seed=1' / 'summary.json').unlink()
  def fail(argv, workdir):
    return 1
  out = []
  assert launch.main([f'--config={config_path}', f'--root={root}', '--until=ci_halfwidth:0.05'],
                     runner=fail, out=out.append) == 1
  assert any('stopped after round 0: 1 point(s) without summary.json' in line for line in out)
  assert not (root / 'until.json').exists()


def test_pairs_by_fold_and_seed_and_grows_every_fold():
  points, dice = [], []
  for mode, shift in (('none', 0.0), ('deep', 0.02)):
    for fold in (0, 1):
      for seed in (0, 1):
        points.append({'model.ds.mode': mode, 'data.fold': fold, 'seed': seed})
        dice.append(0.7 + 0.1 * fold + 0.01 * seed + shift + (0.03 if (mode, fold, seed) == (
            'deep', 1, 1) else 0.0))
  (c,) = until.compare(points, dice, until.Rule(ci_halfwidth=0.001, max_seeds=4))
  assert (c.variant, c.baseline, c.seeds, c.diff.n, c.status) == (
      'mode=deep', 'mode=none', 2, 4, 'open')
  assert c.diff.mean == pytest.approx(0.02 + 0.03 / 4)
  new = until.next_points(points, [c])
  assert new == [{'model.ds.mode': 'none', 'data.fold': 0, 'seed': 2},
                 {'model.ds.mode': 'none', 'data.fold': 1, 'seed': 2},
                 {'model.ds.mode': 'deep', 'data.fold': 0, 'seed': 2},
                 {'model.ds.mode': 'deep', 'data.fold': 1, 'seed': 2}]


def test_baseline_is_the_closest_none_variant():
  points = [{'model.ds.mode': m, 'loss.ds_weights': w, 'seed': s}
            for m, w in (('none', 'exp'), ('none', 'same'), ('deep', 'same')) for s in (0, 1)]
  (c,) = until.compare(points, [0.5, 0.6, 0.7, 0.8, 0.72, 0.83], until.Rule(ci_halfwidth=0.1))
  assert c.baseline == 'mode=none,ds_weights=same'
  assert c.diff.mean == pytest.approx(0.025)


def test_missing_result_is_no_interval():
  points = [{'model.ds.mode': m, 'seed': s} for m in ('none', 'deep') for s in (0, 1)]
  (c,) = until.compare(points, [0.5, 0.6, math.nan, 0.7], until.Rule(ci_halfwidth=0.5))
  assert c.status == 'open' and math.isnan(c.diff.half_width)


def test_a_variant_equal_to_its_baseline_in_every_pair_is_identical_not_settled():
  points = [{'model.ds.mode': m, 'seed': s} for m in ('none', 'deep') for s in (0, 1)]
  (c,) = until.compare(points, [0.5, 0.6, 0.5, 0.6], until.Rule(ci_halfwidth=0.01))
  assert c.status == 'identical' and 'the settings change nothing' in c.line()
  assert until.next_points(points, [c]) == []


@pytest.mark.parametrize('text, message', [
    ('ci_halfwidth:0', 'need a number > 0'),
    ('max_seeds:4', 'ci_halfwidth:FLOAT is required'),
    ('ci_halfwidth:0.01,max_seeds:1', 'at least 2'),
    ('ci_halfwidth=0.01', 'bad part'),
    ('ci_halfwidth:0.01,seeds:3', "bad part 'seeds:3'"),
    ('ci_halfwidth:abc', 'could not convert'),
])
def test_bad_rules(text, message):
  with pytest.raises(ValueError, match=message):
    until.parse_rule(text)


def test_parse_rule():
  assert until.parse_rule('ci_halfwidth:0.01,max_seeds:10') == until.Rule(0.01, 10)
  assert until.parse_rule('ci_halfwidth:0.02').max_seeds == 10


def test_sweeps_that_cannot_be_adaptive_fail_before_running(tmp_path, capsys):
  for sweep_expr, message in [
      ("sweep.axis('model.ds.mode', ['none', 'deep'])", "has no 'seed' axis"),
      ("sweep.product(sweep.axis('model.ds.mode', ['deep']), sweep.axis('seed', [0, 1]))",
       'no sweep point sets model.ds.mode=none')]:
    path = tmp_path / 'cfg.py'
    path.write_text(_CONFIG_FILE.split('def get_sweep')[0]
                    + f'def get_sweep(arg=None):\n  return {sweep_expr}\n')
    with pytest.raises(SystemExit) as e:
      launch.main([f'--config={path}', f'--root={tmp_path / "r"}', '--until=ci_halfwidth:0.1'],
                  runner=FakeTraining())
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / 'r').exists()
