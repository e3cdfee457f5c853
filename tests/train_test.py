"""End-to-end training tests on tiny synthetic data: every DS mode, resume, checkpoints, sharding."""

import json
import os

import jax
import numpy as np
import pytest

from tests import smoke
from unet_ds import checkpoint
from unet_ds import config_lib
from unet_ds import evaluate
from unet_ds import sharding
from unet_ds import state as state_lib
from unet_ds import train


def _smoke(data_dir, ndim=3, mode='deep', **train_kw):
  return smoke.config(data_dir, ndim, mode, **train_kw)


def _lines(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


# Every form in 2D; in 3D the two with heads of their own (3D `none` trains end to end in the
# notebook and ablation smoke runs, 3D `additive` in the brats18 preset's).
@pytest.mark.parametrize('mode,ndim', [('none', 2), ('deep', 2), ('additive', 2),
                                       ('hypercolumn', 2), ('deep', 3), ('hypercolumn', 3)])
def test_one_step_train_and_evaluate_every_mode(tmp_path, data_dir, ndim, mode):
  c = _smoke(data_dir, ndim, mode, steps=1, eval_every=1, checkpoint_every=1)
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary['step'] == 1
  assert 0.0 <= summary['mean_foreground_dice'] <= 1.0
  # The top-level score is the whole-volume eval of the 2 validation volumes, as --mode=eval.
  assert summary['eval']['num_cases'] == 2 and summary['eval']['cases_selected'] == 'validation'
  assert 0.0 <= summary['pooled_foreground_dice'] <= 1.0
  n_heads = 0 if mode == 'none' else 1
  assert len(summary['heads']) == n_heads
  (record,) = _lines(tmp_path / 'metrics.jsonl')
  assert len(record['level_losses']) == len(record['ds_weights']) == 1 + n_heads
  assert np.isfinite(record['loss'])
  if mode in ('additive', 'hypercolumn'):  # one loss unless side losses are asked for
    assert record['ds_weights'][1:] == [0.0] * n_heads
  (ev,) = _lines(tmp_path / 'eval.jsonl')
  assert ev['step'] == 1 and len(ev['final']['dice']) == 3
  assert ev['pooled_foreground_dice'] == summary['pooled_foreground_dice']
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['ds']['mode'] == mode
  assert len(os.listdir(tmp_path / 'tensorboard')) == 1  # one event file a run
  saved_summary = json.loads((tmp_path / 'summary.json').read_text())
  assert saved_summary['step'] == 1
  assert saved_summary['conv_impl'] == 'cpu_fast'  # 'auto' with conftest's 4 CPU devices


def test_loss_falls_when_overfitting_one_batch(data_dir):
  c = _smoke(data_dir, 2, 'deep')
  c.optim.update(lr=1e-2, schedule='constant', warmup_steps=0)
  exp = train.Experiment.build(c, '/tmp/unused')
  state = exp.init_state()
  batch = next(iter(exp.train_loader()))
  batch = sharding.shard_batch(exp.mesh, batch)
  step = exp.jit_train_step()
  losses = []
  for _ in range(40):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < 0.6 * losses[0], losses


def test_checkpoint_round_trip(tmp_path, data_dir):
  exp = train.Experiment.build(_smoke(data_dir, 2), str(tmp_path))
  state = exp.init_state()
  ckpts = checkpoint.Checkpoints(str(tmp_path / 'ck'), 2)
  ckpts.save(7, state, b'{"pos": 3}', config_lib.to_json(exp.config))
  ckpts.wait()
  restored, data_state, step = ckpts.restore(exp.abstract_state())
  assert step == 7 and data_state == b'{"pos": 3}'
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  ckpts.close()


def test_resume_equals_uninterrupted(tmp_path, data_dir):
  kw = dict(steps=4, eval_every=4, checkpoint_every=2)
  straight = train.train_and_evaluate(_smoke(data_dir, 2, **kw), str(tmp_path / 'a'))
  part = train.train_and_evaluate(_smoke(data_dir, 2, stop_at_step=2, **kw), str(tmp_path / 'b'))
  assert part == {'step': 2, 'stopped_early': True}
  resumed = train.train_and_evaluate(_smoke(data_dir, 2, **kw), str(tmp_path / 'b'))
  _, state_a, _ = state_lib.restore(_smoke(data_dir, 2, **kw), str(tmp_path / 'a'))
  _, state_b, _ = state_lib.restore(_smoke(data_dir, 2, **kw), str(tmp_path / 'b'))
  assert int(state_a.step) == int(state_b.step) == 4
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, b)
  assert straight['final'] == resumed['final']
  # train_seconds sums both launches: the first's up to its checkpoint, then the resumed one's.
  before = checkpoint.Checkpoints(str(tmp_path / 'b' / 'checkpoints')).train_seconds(2)
  assert before > 0 and 'train_seconds_partial' not in resumed
  assert resumed['train_seconds'] == pytest.approx(
      before + resumed['train_seconds_this_launch'], abs=0.05)
  assert straight['train_seconds'] == pytest.approx(straight['train_seconds_this_launch'], abs=0.05)
  # The log of the resumed run is the same sequence of steps and losses.
  la, lb = _lines(tmp_path / 'a' / 'metrics.jsonl'), _lines(tmp_path / 'b' / 'metrics.jsonl')
  assert [r['step'] for r in lb] == [1, 2, 3, 4]
  np.testing.assert_array_equal([r['loss'] for r in la], [r['loss'] for r in lb])


def test_eval_mode_gives_the_number_training_ended_with(tmp_path, data_dir):
  c = _smoke(data_dir, 2, steps=2, eval_every=2, checkpoint_every=2)
  summary = train.train_and_evaluate(c, str(tmp_path))
  again = evaluate.run(None, str(tmp_path), num_overlays=1)
  assert again['step'] == 2
  (png,) = again['overlays']  # label, final and the DS head over 1 row (2D)
  assert png.endswith('eval/overlays/val_0000.png') and os.path.getsize(png) > 0
  assert again['mean_foreground_dice'] == pytest.approx(summary['mean_foreground_dice'])
  for key in ('dice', 'hd95', 'nsd'):  # boundary metrics too, in mm, per class (NaN: background)
    assert again['per_class'][key] == pytest.approx(summary['eval']['per_class'][key], nan_ok=True)
  assert again['mean_foreground_hd95'] > 0 and 0 <= again['mean_foreground_nsd'] <= 1
  on_disk = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
  assert len(on_disk['cases']) == 2
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'config.json').write_text(config_lib.to_json(c))
  with pytest.raises(FileNotFoundError, match='no checkpoints'):
    evaluate.run(None, str(tmp_path / 'empty'))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, data_dir, monkeypatch):
  c = _smoke(data_dir, 2, steps=6, eval_every=6, checkpoint_every=2)
  real = train.Experiment.train_loader

  class Poisoned:
    """The real iterator, with NaN images in the 3rd batch."""

    def __init__(self, it):
      self._it, self._n = it, 0

    def __iter__(self):
      return self

    def __next__(self):
      self._n += 1
      batch = next(self._it)
      return {**batch, 'image': np.full_like(batch['image'], np.nan)} if self._n == 3 else batch

    def get_state(self):
      return self._it.get_state()

  def poisoned(exp):
    return Poisoned(iter(real(exp)))

  monkeypatch.setattr(train.Experiment, 'train_loader', poisoned)
  with pytest.raises(FloatingPointError, match='at step 3'):
    train.train_and_evaluate(c, str(tmp_path))
  # Step 3's loss is the first to see the parameters of step 2: their checkpoint goes too.
  ckpts = checkpoint.Checkpoints(str(tmp_path / 'checkpoints'))
  assert ckpts.latest_step() is None
  ckpts.close()
  assert not (tmp_path / 'summary.json').exists()


def test_diverged_parameters_never_stay_in_a_checkpoint(tmp_path, data_dir):
  c = _smoke(data_dir, 2, steps=8, eval_every=8, checkpoint_every=1, max_to_keep=8)
  c.optim.update(lr=1e6, schedule='constant', warmup_steps=0, grad_clip=0.0)
  with pytest.raises(FloatingPointError, match=r'at step (\d+).*last good checkpoint') as err:
    train.train_and_evaluate(c, str(tmp_path))
  failed = int(err.value.step)
  ckpts = checkpoint.Checkpoints(str(tmp_path / 'checkpoints'), 8)
  kept = ckpts.latest_step()
  ckpts.close()
  assert kept is None or kept <= failed - 2
  if kept is not None:  # what is kept trains on with a sane learning rate
    c.optim.lr, c.train.steps = 1e-3, kept + 2
    summary = train.train_and_evaluate(c, str(tmp_path), allow_changes=['optim', 'train.steps'])
    assert summary['step'] == kept + 2


def test_deep_with_every_head_weighted_0_is_warned(data_dir, caplog):
  c = _smoke(data_dir, 2, 'deep')
  c.model.depth, c.loss.ds_weights = 3, 'nnunet'  # one head, the lowest: nnU-Net weights it 0
  exp = train.Experiment.build(c, '/tmp/unused')
  assert exp.ds_loss.base_weights == (1.0, 0.0)
  assert 'this run trains like ds.mode=none' in caplog.text

def test_data_parallel_step_matches_single_device(data_dir):
  assert jax.device_count() >= 4
  results = []
  for devices in (1, 4):
    c = _smoke(data_dir, 2, 'deep', batch_size=4, eval_batch_size=4)
    c.mesh.data = devices
    exp = train.Experiment.build(c, '/tmp/unused')
    state = exp.init_state()
    batch = sharding.shard_batch(exp.mesh, next(iter(exp.train_loader())))
    assert len(batch['image'].sharding.device_set) == devices
    state, m = exp.jit_train_step()(state, batch)
    results.append((float(m['loss']), jax.tree.map(np.asarray, state.params)))
  (loss1, p1), (loss4, p4) = results
  np.testing.assert_allclose(loss1, loss4, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_finished_is_the_last_step_or_a_budget_deadline(data_dir, tmp_path):
  from unet_ds import loop  # pylint: disable=g-import-not-at-top
  c = _smoke(data_dir, 2, steps=10)
  smoke.save_checkpoint(str(tmp_path), 3, train.Experiment.build(c, str(tmp_path)).init_state(), c)
  assert loop.check_resume_early(c, str(tmp_path)) == 3  # the latest step, as fit_config passes it
  finished = lambda: loop.finished_summary(c, str(tmp_path), 3)  # noqa: E731
  summary = {'step': 3, 'mean_foreground_dice': 0.5}
  (tmp_path / 'summary.json').write_text(json.dumps(summary))
  assert finished() is None  # stopped early: resumes
  assert loop.finished_summary(c, str(tmp_path), None) is None  # no checkpoint: a new run
  summary['budget'] = {'stopped_at_deadline': 3}  # its train.minutes ran out at step 3
  (tmp_path / 'summary.json').write_text(json.dumps(summary))
  assert finished() == summary
  c.train.steps = 3
  del summary['budget']
  (tmp_path / 'summary.json').write_text(json.dumps(summary))
  assert finished() == summary
  (tmp_path / 'summary.json').write_text(json.dumps({**summary, 'step': 2}))  # an older summary
  assert finished() is None
