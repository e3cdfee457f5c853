"""Tests of the per-level losses, DS weights/schedules and the DS loss against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_ds import losses


def _np_ce(logits, label):
  """Mean softmax cross-entropy, computed by hand in numpy."""
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, label[..., None], -1).mean()


def _np_upsample2(x):
  """Linear x2 upsampling of [B, 2, 2, K] with half-pixel centres and edge clamping, by hand."""
  def axis(a, ax):
    a0 = np.take(a, [0], ax)
    a1 = np.take(a, [1], ax)
    return np.concatenate([a0, 0.75 * a0 + 0.25 * a1, 0.25 * a0 + 0.75 * a1, a1], ax)
  return axis(axis(x, 1), 2)


@pytest.fixture
def example():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, size=(2, 4, 4)).astype(np.int32)
  final = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  head = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
  return final, head, label


def test_ds_loss_downsample_equals_hand_sum(example):
  final, head, label = example
  w = np.array([0.7, 0.3], np.float32)
  loss, aux = losses.deep_supervision_loss(final, (head,), label, w,
                                           level_loss=losses.cross_entropy, num_classes=3)
  # nearest: the voxel at each 2x2 block's centre offset (1, 1).
  expected_levels = [_np_ce(final, label), _np_ce(head, label[:, 1::2, 1::2])]
  np.testing.assert_allclose(aux['level_losses'], expected_levels, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.7 * expected_levels[0] + 0.3 * expected_levels[1], rtol=1e-5)
  np.testing.assert_allclose(aux['ds_weights'], w)


def test_ds_loss_upsample_equals_hand_sum(example):
  final, head, label = example
  w = np.array([0.5, 0.5], np.float32)
  loss, aux = losses.deep_supervision_loss(final, (head,), label, w, target='upsample',
                                           level_loss=losses.cross_entropy, num_classes=3)
  expected = 0.5 * _np_ce(final, label) + 0.5 * _np_ce(_np_upsample2(head), label)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert aux['level_losses'].shape == (2,)


def test_maxpool_target_keeps_small_structures():
  label = np.zeros((1, 4, 4), np.int32)
  label[0, 0, 0] = 1  # one voxel, missed by nearest sampling at offset (1, 1)
  head = np.zeros((1, 2, 2, 2), np.float32)
  head[0, 0, 0] = [0.0, 10.0]  # confident foreground in the first block
  kw = dict(level_loss=losses.cross_entropy, num_classes=2)
  final = np.zeros((1, 4, 4, 2), np.float32)
  _, near = losses.deep_supervision_loss(final, (head,), label, [0.0, 1.0], **kw)
  _, pool = losses.deep_supervision_loss(final, (head,), label, [0.0, 1.0], downsample='maxpool',
                                         **kw)
  # With max-pool the block is foreground, so the confident head is right there (loss ~ 0 there).
  assert float(pool['level_losses'][1]) < float(near['level_losses'][1])


def test_ignore_index_drops_voxels():
  label = np.array([[0, 1, 255, 255]], np.int32)
  logits = np.array([[[2.0, 0.0], [0.0, 2.0], [9.0, -9.0], [-9.0, 9.0]]], np.float32)
  target, valid = losses.one_hot_target(label, 2, ignore_index=255)
  ce = losses.cross_entropy(logits, target, valid)
  np.testing.assert_allclose(ce, _np_ce(logits[:, :2], label[:, :2]), rtol=1e-6)


@pytest.mark.parametrize('name', ['dice', 'dice_ce', 'ce', 'generalized_dice'])
def test_perfect_prediction_gives_zero_loss(name):
  label = np.random.default_rng(1).integers(0, 3, size=(2, 8, 8, 8))
  logits = 50.0 * jax.nn.one_hot(label, 3)
  target, valid = losses.one_hot_target(label, 3)
  fn = losses.make_level_loss(name)
  assert float(fn(logits, target, valid)) < 1e-4


def test_bce_dice_binary():
  label = np.random.default_rng(2).integers(0, 2, size=(2, 8, 8))
  target, valid = losses.one_hot_target(label, 2)
  perfect = np.where(label == 1, 40.0, -40.0)[..., None]
  fn = losses.make_level_loss('bce_dice')
  assert float(fn(perfect, target, valid)) < 1e-4
  assert float(fn(-perfect, target, valid)) > 1.0
  with pytest.raises(ValueError, match='single logit channel'):
    fn(np.zeros((2, 8, 8, 2)), target, valid)


def test_bce_by_hand_and_ignored_voxels():
  logits = np.array([[[0.0], [2.0], [-1.0]]], np.float32)
  label = np.array([[1, 0, 2]])          # 2 is a second foreground class: foreground too
  target, valid = losses.one_hot_target(label, 3)
  sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  expected = -(np.log(sig(0.0)) + np.log(1 - sig(2.0)) + np.log(sig(-1.0))) / 3
  np.testing.assert_allclose(losses.make_level_loss('bce')(logits, target, valid), expected,
                             rtol=1e-5)
  target, valid = losses.one_hot_target(label, 3, ignore_index=0)  # drops the middle voxel
  expected = -(np.log(sig(0.0)) + np.log(sig(-1.0))) / 2
  np.testing.assert_allclose(losses.bce(logits, target, valid), expected, rtol=1e-5)
  with pytest.raises(ValueError, match='single logit channel'):
    losses.bce(np.zeros((1, 3, 2)), target, valid)


def _np_generalized_dice(probs, target):
  """Sudre et al. 2017 with square weights, batch pooled, by hand."""
  axes = tuple(range(probs.ndim - 1))
  w = 1.0 / target.sum(axes) ** 2
  return 1 - 2 * (w * (probs * target).sum(axes)).sum() / (w * (probs + target).sum(axes)).sum()


def test_generalized_dice_by_hand_weights_small_classes_up():
  rng = np.random.default_rng(3)
  label = np.zeros((2, 6, 6), np.int32)
  label[:, :4] = 1
  label[:, 5, :2] = 2                    # class 2 is small
  logits = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  target, valid = losses.one_hot_target(label, 3)
  probs = np.asarray(jax.nn.softmax(logits, -1))
  t = np.asarray(target)
  fn = losses.make_level_loss('generalized_dice', include_background=True)
  np.testing.assert_allclose(fn(logits, target, valid), _np_generalized_dice(probs, t), rtol=1e-5)
  fg = losses.make_level_loss('generalized_dice')  # background excluded by default
  np.testing.assert_allclose(fg(logits, target, valid),
                             _np_generalized_dice(probs[..., 1:], t[..., 1:]), rtol=1e-5)
  # Missing the small class costs as much as missing the large one would, unlike plain Dice.
  miss_small = np.where(label[..., None] == np.arange(3), 9.0, 0.0).astype(np.float32)
  miss_small[..., 2] = -9.0
  miss_small[label == 2, 1] = 9.0
  assert float(fg(miss_small, target, valid)) > 0.05


def test_generalized_dice_absent_class_takes_the_largest_weight():
  label = np.zeros((1, 4, 4), np.int32)
  label[0, :2] = 1                       # class 2 absent from the target
  target, valid = losses.one_hot_target(label, 3)
  perfect = np.where(label[..., None] == np.arange(3), 20.0, -20.0).astype(np.float32)
  fn = losses.make_level_loss('generalized_dice')
  assert float(fn(perfect, target, valid)) < 1e-4
  wrong = perfect.copy()
  wrong[0, 2:, :, 2] = 40.0              # predicts the absent class on the background half
  probs = np.asarray(jax.nn.softmax(wrong, -1))[..., 1:]
  w = np.array([1 / 8 ** 2, 1 / 8 ** 2])  # class 2 borrows class 1's weight
  t = np.asarray(target)[..., 1:]
  expected = 1 - 2 * (w * (probs * t).sum((0, 1, 2))).sum() / (
      w * (probs + t).sum((0, 1, 2))).sum()
  np.testing.assert_allclose(fn(wrong, target, valid), expected, rtol=1e-4)


def test_soft_dice_value_by_hand():
  # One sample, two voxels, two classes; background excluded.
  logits = np.log(np.array([[[0.25, 0.75], [0.5, 0.5]]], np.float32))
  label = np.array([[1, 0]])
  target, valid = losses.one_hot_target(label, 2)
  dice = (2 * 0.75) / ((0.75 + 0.5) + 1.0)
  np.testing.assert_allclose(losses.soft_dice(logits, target, valid, smooth=0.0), 1 - dice,
                             rtol=1e-5)
  both = (dice + (2 * 0.5) / ((0.25 + 0.5) + 1.0)) / 2
  np.testing.assert_allclose(
      losses.soft_dice(logits, target, valid, include_background=True, smooth=0.0), 1 - both,
      rtol=1e-5)


def test_weight_schemes():
  np.testing.assert_allclose(losses.ds_weights('nnunet', range(5)),
                             [0.533333, 0.266667, 0.133333, 0.066667, 0.0], atol=1e-6)
  np.testing.assert_allclose(losses.ds_weights('exp', range(3)), [4 / 7, 2 / 7, 1 / 7], rtol=1e-6)
  np.testing.assert_allclose(losses.ds_weights('same', range(4)), [0.25] * 4)
  # Non-contiguous levels weigh by resolution: 1, 1/4.
  np.testing.assert_allclose(losses.ds_weights('exp', (0, 2)), [0.8, 0.2], rtol=1e-6)
  np.testing.assert_allclose(losses.ds_weights((1.0, 0.5, 0.25), range(3)), [1.0, 0.5, 0.25])
  assert float(sum(losses.ds_weights('nnunet', range(3)))) == pytest.approx(1.0)
  with pytest.raises(ValueError, match=r'3 values .* but the model has 2 outputs'):
    losses.ds_weights((1.0, 0.5, 0.25), (0, 1))
  with pytest.raises(ValueError, match='must be one of'):
    losses.ds_weights('linear', (0, 1))


def test_output_weights_without_side_losses():
  np.testing.assert_allclose(losses.output_weights('exp', (1, 2), side_losses=False), [1, 0, 0])
  with pytest.raises(ValueError, match='2 values'):
    losses.output_weights((1.0, 1.0), (1, 2), side_losses=False)


@pytest.mark.parametrize('schedule,mid', [('constant', 1.0), ('linear', 0.55), ('cosine', 0.55)])
def test_schedules(schedule, mid):
  kw = dict(schedule=schedule, decay_steps=100, floor=0.1)
  start = losses.side_weight_scale(0, **kw)
  middle = losses.side_weight_scale(50, **kw)
  end = losses.side_weight_scale(100, **kw)
  after = losses.side_weight_scale(1000, **kw)
  assert float(start) == pytest.approx(1.0)
  assert float(middle) == pytest.approx(mid, abs=1e-6)
  expected_end = 1.0 if schedule == 'constant' else 0.1
  assert float(end) == pytest.approx(expected_end, abs=1e-6)
  assert float(after) == pytest.approx(expected_end, abs=1e-6)
  if schedule == 'cosine':  # slower than linear early on
    assert float(losses.side_weight_scale(25, **kw)) > 1 - 0.9 * 0.25


def test_scheduled_weights_inside_jit_keep_final_weight():
  base = losses.ds_weights('exp', range(3))
  fn = jax.jit(lambda step: losses.scheduled_weights(base, step, schedule='linear',
                                                      decay_steps=10, floor=0.0))
  np.testing.assert_allclose(fn(0), base, rtol=1e-6)
  np.testing.assert_allclose(fn(5), [base[0], base[1] / 2, base[2] / 2], rtol=1e-6)
  np.testing.assert_allclose(fn(10), [base[0], 0, 0], atol=1e-7)


def test_wrong_weight_count_in_loss():
  final = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match='3 DS weights for 1 outputs'):
    losses.deep_supervision_loss(final, (), jnp.zeros((1, 4, 4), jnp.int32), [1.0, 0.5, 0.2])


def test_maxpool_onehot_values():
  from unet_ds import targets  # pylint: disable=g-import-not-at-top
  label = np.array([[[0, 1, 0, 0], [0, 0, 0, 0], [2, 0, 1, 0], [0, 0, 0, 2]]])
  onehot, _ = losses.one_hot_target(label, 3)
  pooled = np.asarray(targets.maxpool_onehot(onehot, (2, 2)))
  np.testing.assert_allclose(pooled[0, 0, 0], [0, 1, 0])
  np.testing.assert_allclose(pooled[0, 0, 1], [1, 0, 0])
  np.testing.assert_allclose(pooled[0, 1, 0], [0, 0, 1])
  np.testing.assert_allclose(pooled[0, 1, 1], [0, 0.5, 0.5])
