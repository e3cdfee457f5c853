"""Tests for unet_ds.data.augment: determinism from the rng, labels moved with images."""
import grain.python as grain
import numpy as np
import pytest

from unet_ds.data import augment
from unet_ds.data import pipeline


def _example(shape=(6, 6, 4)):
  label = np.random.default_rng(0).integers(0, 4, shape).astype(np.int32)
  return {'image': np.stack([label, 2 * label], -1).astype(np.float32), 'label': label}


def _apply(transforms, example, seed):
  rng = np.random.default_rng(seed)
  for t in transforms:
    example = t.random_map(example, rng) if isinstance(t, grain.RandomMapTransform) else t.map(
        example)
  return example


def test_spatial_transforms_move_label_with_image():
  chain = augment.make_augmentations(3, intensity_p=0, noise_p=0)
  changed = 0
  for seed in range(20):
    out = _apply(chain, _example(), seed)
    np.testing.assert_array_equal(out['image'][..., 0], out['label'])
    np.testing.assert_array_equal(out['image'][..., 1], 2 * out['label'])
    assert out['image'].flags['C_CONTIGUOUS'] and out['label'].dtype == np.int32
    changed += not np.array_equal(out['label'], _example()['label'])
  assert changed >= 15  # 1/16 chance of no flip and k=0 per draw


def test_same_rng_same_output_and_seed_changes_it():
  chain = augment.make_augmentations(3, intensity_p=1.0, noise_p=1.0)
  a, b, c = (_apply(chain, _example(), s) for s in (5, 5, 6))
  np.testing.assert_array_equal(a['image'], b['image'])
  assert not np.array_equal(a['image'], c['image'])


def test_rot90_non_square_plane_keeps_shape():
  t = augment.RandomRot90((0, 1))
  for seed in range(10):
    out = t.random_map(_example((4, 6, 3)), np.random.default_rng(seed))
    assert out['label'].shape == (4, 6, 3)
  square = {t.random_map(_example((5, 5)), np.random.default_rng(s))['label'].tobytes()
            for s in range(40)}
  assert len(square) == 4  # all four rotations occur


def test_intensity_and_noise_leave_label():
  ex = _example()
  out = augment.RandomIntensity(scale=0.5, shift=1.0, p=1.0).random_map(
      ex, np.random.default_rng(0))
  np.testing.assert_array_equal(out['label'], ex['label'])
  slope = np.polyfit(ex['image'].ravel(), out['image'].ravel(), 1)[0]
  assert 0.5 <= slope <= 1.5 and not np.allclose(slope, 1)
  noisy = augment.GaussianNoise(max_sigma=0.5, p=1.0).random_map(ex, np.random.default_rng(0))
  assert 0 < np.std(noisy['image'] - ex['image']) < 0.5
  assert augment.GaussianNoise(p=0.0).random_map(ex, np.random.default_rng(0)) is ex


def test_bad_axes():
  with pytest.raises(ValueError, match='axis 3 outside the 3'):
    augment.make_augmentations(3, flip_axes=(3,))
  with pytest.raises(ValueError, match='rot90_axes'):
    augment.make_augmentations(3, rot90_axes=(1, 1))


def test_loader_is_deterministic_from_seed():
  source = [_example() for _ in range(4)]
  chain = augment.make_augmentations(3, noise_p=1.0)

  def first_batches(seed):
    it = iter(pipeline.make_train_loader(source, batch_size=2, seed=seed, transforms=chain))
    return [next(it)['image'] for _ in range(3)]

  for x, y in zip(first_batches(1), first_batches(1)):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, y) for x, y in zip(first_batches(1), first_batches(2)))
