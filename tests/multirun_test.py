"""Multi-run training: K runs in one vmapped program equal the K runs trained one by one."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import runs as runs_lib
from tests import smoke
from unet_ds import checkpoint
from unet_ds import config_lib
from unet_ds import evaluate
from unet_ds import losses
from unet_ds import multirun
from unet_ds import sharding
from unet_ds import state as state_lib
from unet_ds import train

# Two runs differing in seed and in every per-run DS setting.
_RUNS = [dict(seed=3, ds_weights='exp', ds_schedule='constant', ds_floor=0.0),
         dict(seed=5, ds_weights='0.5,0.5', ds_schedule='linear', ds_floor=0.25)]


_smoke = smoke.config


def _multi(data_dir, runs=_RUNS, **train_kw):
  c = _smoke(data_dir, **train_kw)
  c.multirun.k = len(runs)
  c.multirun.seeds = tuple(r['seed'] for r in runs)
  c.multirun.ds_weights = tuple(r['ds_weights'] for r in runs)
  c.multirun.ds_schedule = tuple(r['ds_schedule'] for r in runs)
  c.multirun.ds_floor = tuple(r['ds_floor'] for r in runs)
  return c


def _single(data_dir, run, **train_kw):
  c = _smoke(data_dir, **train_kw)
  c.seed = run['seed']
  c.loss.ds_weights, c.loss.ds_schedule = run['ds_weights'], run['ds_schedule']
  c.loss.ds_floor = run['ds_floor']
  return c


def _lines(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


_NAMES = ['seed=3,ds_weights=exp,ds_schedule=constant,ds_floor=0.0',
          'seed=5,ds_weights=0.5_0.5,ds_schedule=linear,ds_floor=0.25']


def test_multirun_equals_runs_one_by_one_and_resumes(tmp_path, data_dir):
  kw = dict(steps=4, eval_every=2, checkpoint_every=2)
  # Interrupted after step 2 and resumed: the resumed result must still match the single runs.
  part = multirun.train_and_evaluate(_multi(data_dir, stop_at_step=2, **kw), str(tmp_path / 'm'))
  assert part == {'step': 2, 'stopped_early': True}
  multi = multirun.train_and_evaluate(_multi(data_dir, **kw), str(tmp_path / 'm'))
  assert sorted(multi['runs']) == sorted(_NAMES) and multi['step'] == 4

  mexp = multirun.MultiExperiment.build(_multi(data_dir, **kw), str(tmp_path / 'm'))
  ckpts = checkpoint.Checkpoints(str(tmp_path / 'm' / 'checkpoints'))
  states, _, step = ckpts.restore(mexp.abstract_state())
  ckpts.close()
  assert step == 4 and states.step.tolist() == [4, 4]

  for i, (run, name) in enumerate(zip(_RUNS, _NAMES)):
    single = train.train_and_evaluate(_single(data_dir, run, **kw), str(tmp_path / f's{i}'))
    _, state, _ = state_lib.restore(_single(data_dir, run, **kw), str(tmp_path / f's{i}'))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(states.params)):
      np.testing.assert_allclose(b[i], a, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(states.rng[i], state.rng)

    rdir = tmp_path / 'm' / name
    la, lb = _lines(tmp_path / f's{i}' / 'metrics.jsonl'), _lines(rdir / 'metrics.jsonl')
    assert [r['step'] for r in lb] == [1, 2, 3, 4]
    assert set(lb[0]) == set(la[0])
    for key in ('loss', 'level_losses', 'ds_weights', 'lr', 'grad_norm'):
      np.testing.assert_allclose([r[key] for r in lb], [r[key] for r in la], rtol=1e-4, atol=1e-6,
                                 err_msg=key)
    ea, eb = _lines(tmp_path / f's{i}' / 'eval.jsonl'), _lines(rdir / 'eval.jsonl')
    assert [r['step'] for r in eb] == [2, 4]
    for a, b in zip(ea, eb):
      np.testing.assert_allclose(b['final']['dice'], a['final']['dice'], rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(b['heads'][0]['dice'], a['heads'][0]['dice'], rtol=1e-4,
                                 atol=1e-6)
    summary = json.loads((rdir / 'summary.json').read_text())
    assert set(summary) == set(multi['runs'][name]) >= {'mean_foreground_dice', 'final', 'heads'}
    np.testing.assert_allclose(summary['mean_foreground_dice'], single['mean_foreground_dice'],
                               rtol=1e-4)
    assert summary['multirun'] == {'k': 2, 'index': i, 'name': name}
    # A member's folder works like a run's: --mode=eval slices its state out of the stack.
    member_eval = evaluate.run(None, str(rdir))
    assert member_eval['step'] == 4
    np.testing.assert_allclose(member_eval['mean_foreground_dice'],
                               summary['mean_foreground_dice'], rtol=1e-4)

    # The run's config.json is its single run's config (multi-run off).
    saved = json.loads((rdir / 'config.json').read_text())
    expected = json.loads(config_lib.to_json(_single(data_dir, run, **kw)))
    assert saved == expected

  # The report's reader takes the runs for ordinary finished runs.
  found, skipped = runs_lib.find_runs(tmp_path / 'm')
  assert sorted(r.name for r in found) == sorted(_NAMES) and not skipped
  assert json.loads((tmp_path / 'm' / 'multirun.json').read_text())['runs'] == _NAMES


def test_a_member_whose_heads_are_all_weighted_0_is_warned(data_dir, caplog):
  runs = [dict(_RUNS[0]), dict(_RUNS[1], ds_weights='nnunet')]
  c = _multi(data_dir, runs)
  c.model.depth = 3  # one head, the lowest: nnU-Net's weights give it 0
  mexp = multirun.MultiExperiment.build(c, '/tmp/unused')
  warned = [r.getMessage() for r in caplog.records if 'trains like ds.mode=none' in r.getMessage()]
  assert len(warned) == 1 and warned[0].startswith(f'{mexp.runs[1].name}: ')


@pytest.mark.parametrize('vectorize', ['vmap', 'map'])
def test_per_run_weights_change_the_loss(data_dir, vectorize):
  # Same seed (same init, same batches), different DS weights: same level losses, other total.
  runs = [dict(_RUNS[0], seed=0), dict(_RUNS[1], seed=0)]
  c = _multi(data_dir, runs)
  c.multirun.vectorize = vectorize
  mexp = multirun.MultiExperiment.build(c, '/tmp/unused')
  states = mexp.init_state()
  batches = [next(iter(l)) for l in mexp.train_loaders()]
  np.testing.assert_array_equal(batches[0]['image'], batches[1]['image'])
  step = mexp.jit_train_step()
  states, m = step(states, mexp.shard(batches))
  np.testing.assert_allclose(m['level_losses'][0], m['level_losses'][1], rtol=1e-5)
  np.testing.assert_allclose(m['ds_weights'], [[2 / 3, 1 / 3], [0.5, 0.5]], rtol=1e-6)
  assert abs(float(m['loss'][0]) - float(m['loss'][1])) > 1e-3
  for _ in range(2):  # the first step has lr 0 (warmup): the params part from the second on
    states, m = step(states, mexp.shard(batches))
  assert not np.allclose(m['level_losses'][0], m['level_losses'][1], rtol=1e-4)
  # Run 1's side weight decays linearly over the 4 steps, from 1 to its floor 0.25.
  np.testing.assert_allclose(m['ds_weights'][1], [0.5, 0.5 * (0.25 + 0.75 * 0.5)], rtol=1e-6)
  np.testing.assert_allclose(m['ds_weights'][0], [2 / 3, 1 / 3], rtol=1e-6)
  # Each run's losses are those of its own single-run step on the same batches.
  for i in range(2):
    exp = mexp.run_experiment(i)
    state, single_step = exp.init_state(), exp.jit_train_step()
    for _ in range(3):
      state, single = single_step(state, sharding.shard_batch(exp.mesh, batches[i]))
    np.testing.assert_allclose(m['loss'][i], single['loss'], rtol=1e-5)
    np.testing.assert_allclose(m['level_losses'][i], single['level_losses'], rtol=1e-5)


@pytest.mark.parametrize('schedule', losses.SCHEDULES)
@pytest.mark.parametrize('floor', [0.0, 0.3])
def test_scheduled_weights_match_single_run_schedule(schedule, floor):
  base = np.array([0.5, 0.3, 0.2], np.float32)
  run = multirun.RunWeights(base=jnp.asarray(base),
                            schedule=jnp.asarray(losses.SCHEDULES.index(schedule)),
                            floor=jnp.asarray(floor, jnp.float32))
  fn = jax.jit(lambda r, s: multirun.scheduled_weights(r, s, decay_steps=10))
  for step in (0, 3, 10, 14):
    np.testing.assert_allclose(
        fn(run, jnp.asarray(step)),
        losses.scheduled_weights(base, step, schedule=schedule, decay_steps=10, floor=floor),
        rtol=1e-6)


def test_non_finite_loss_names_the_run(tmp_path, data_dir, monkeypatch):
  real = train.Experiment.train_loader

  class Poisoned:
    """The real iterator of seed 5's run, with NaN images in its 3rd batch."""

    def __init__(self, it, poison):
      self._it, self._n, self._poison = it, 0, poison

    def __iter__(self):
      return self

    def __next__(self):
      self._n += 1
      batch = next(self._it)
      if self._poison and self._n == 3:
        return {**batch, 'image': np.full_like(batch['image'], np.nan)}
      return batch

    def get_state(self):
      return self._it.get_state()

  monkeypatch.setattr(train.Experiment, 'train_loader',
                      lambda exp: Poisoned(iter(real(exp)), exp.config.seed == 5))
  c = _multi(data_dir, steps=4, eval_every=4, checkpoint_every=2)
  with pytest.raises(FloatingPointError, match=r"run 'seed=5,.*' \(multirun index 1\) at step 3"):
    multirun.train_and_evaluate(c, str(tmp_path))
  # Step 3's loss is the first to see step 2's parameters: that checkpoint is set aside.
  ckpts = checkpoint.Checkpoints(str(tmp_path / 'checkpoints'))
  assert ckpts.latest_step() is None
  ckpts.close()
  assert (tmp_path / 'checkpoints-unreadable' / '2').is_dir()
  assert not (tmp_path / _NAMES[0] / 'summary.json').exists()


def test_run_names_and_configs(data_dir):
  c = _smoke(data_dir)
  c.seed, c.multirun.k = 7, 3
  runs = multirun.member_runs(c)
  assert [r.name for r in runs] == ['seed=7', 'seed=8', 'seed=9']
  assert [r.config.seed for r in runs] == [7, 8, 9]
  assert all(r.config.multirun.k == 0 and r.config.multirun.seeds == () for r in runs)
  assert c.seed == 7 and c.multirun.k == 3  # the multi-run config itself is untouched
  c.multirun.seeds, c.multirun.ds_weights = (1, 1, 1), ('exp', 'same', '1,0.5')
  runs = multirun.member_runs(c)
  assert [r.name for r in runs] == ['seed=1,ds_weights=exp', 'seed=1,ds_weights=same',
                                    'seed=1,ds_weights=1_0.5']
  assert runs[2].config.loss.ds_weights == '1,0.5' and runs[2].config.seed == 1


@pytest.mark.parametrize('overrides, match', [
    (dict(k=2, seeds=(1, 2, 3)), r'multirun.seeds: has 3 values'),
    (dict(k=0, ds_weights=('exp',)), r'multirun.ds_weights has 1 values but multirun.k=0'),
    (dict(k=2, ds_weights=('exp', '1,0.5,0.25')), r'multirun.ds_weights\[1\]: .*2 outputs'),
    (dict(k=2, ds_weights=('exp', 'bogus')), r'multirun.ds_weights\[1\]: .*bogus'),
    (dict(k=2, ds_schedule=('constant', 'step')), r'multirun.ds_schedule\[1\]: must be one of'),
    (dict(k=2, ds_floor=(0.1, 1.5)), r'multirun.ds_floor\[1\]: must be a number in \[0, 1\]'),
    (dict(k=2, seeds=(4, -1)), r'multirun.seeds\[1\] .*: must be an int'),
    (dict(k=2, seeds=(4, 4)), r'multirun: runs 0 and 1 are the same run'),
    (dict(k=2, seeds=(4, 4), ds_weights=('1,0.5', '1.0,0.50')), r'runs 0 and 1 are the same'),
    (dict(k=-1), r'multirun.k: must be an int >= 0'),
    (dict(k=2, vectorize='pmap'), r'multirun.vectorize: must be one of'),
])
def test_bad_multirun_config_errors_before_compute(data_dir, overrides, match):
  c = _smoke(data_dir)
  c.multirun.update(overrides)
  with pytest.raises(ValueError, match=match):
    multirun.MultiExperiment.build(c, '/tmp/unused')


def test_multirun_needs_two_runs(data_dir):
  with pytest.raises(ValueError, match='multi-run needs k >= 2'):
    multirun.member_runs(_smoke(data_dir))


def test_data_parallel_multirun_matches_single_device(data_dir):
  assert jax.device_count() >= 2
  results = []
  for devices in (1, 2):
    c = _multi(data_dir)
    c.mesh.data = devices
    c.multirun.vectorize = 'map'  # compiles faster on CPU; the sharding is the same either way
    mexp = multirun.MultiExperiment.build(c, '/tmp/unused')
    batches = mexp.shard([next(iter(l)) for l in mexp.train_loaders()])
    assert len(batches['image'].sharding.device_set) == devices
    states = mexp.init_state()
    for _ in range(2):
      states, m = mexp.jit_train_step()(states, batches)
    results.append(np.asarray(m['loss']))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_changed_multirun_resume_is_refused_before_the_data_is_built(tmp_path, data_dir,
                                                                      monkeypatch):
  from unet_ds import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = _multi(data_dir)
  mexp = multirun.MultiExperiment.build(config, str(tmp_path))
  smoke.save_checkpoint(str(tmp_path), 1, mexp.init_state(), config, max_to_keep=2)
  smoke.forbid_data(monkeypatch)
  changed = _multi(data_dir)
  changed.model.base_filters = 8
  with pytest.raises(workdir_lib.ConfigChangedError, match='model.base_filters'):
    multirun.train_and_evaluate(changed, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
