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


def _smooth(shape=(12, 14, 10), channels=2, seed=0):
  rng = np.random.default_rng(seed)
  grids = np.meshgrid(*[np.linspace(0, 3, n) for n in shape], indexing='ij')
  base = np.sin(sum(grids)) + 0.3 * rng.standard_normal(shape)
  image = np.stack([base * (c + 1) + c for c in range(channels)], -1).astype(np.float32)
  return {'image': image, 'label': (base > 0).astype(np.int32)}


def test_nnunet_intensity_transforms_do_what_nnunet_does():
  ex = _smooth()
  img, axes = ex['image'], (0, 1, 2)
  rng = lambda s=0: np.random.default_rng(s)
  for t in augment.nnunet_intensity():
    out = t.random_map(ex, rng())
    np.testing.assert_array_equal(out['label'], ex['label'])
    assert out['image'].shape == img.shape and out['image'].dtype == np.float32
  bright = augment.Brightness(p=1.0).random_map(ex, rng())['image']
  ratio = bright / img
  assert np.allclose(ratio, ratio.flat[0], rtol=1e-5) and 0.75 <= ratio.flat[0] <= 1.25
  contrast = augment.Contrast(factor=(0.5, 0.5), p=1.0).random_map(ex, rng())['image']
  np.testing.assert_allclose(contrast.mean(axes), img.mean(axes), atol=1e-4)  # no clipping at 0.5
  np.testing.assert_allclose(contrast.std(axes), 0.5 * img.std(axes), rtol=1e-4)
  wider = augment.Contrast(factor=(2.0, 2.0), p=1.0).random_map(ex, rng())['image']
  assert (wider.min(axes) >= img.min(axes) - 1e-6).all()  # range preserved
  assert (wider.max(axes) <= img.max(axes) + 1e-6).all()
  for invert in (False, True):  # gamma keeps each channel's mean and sd, changes its shape
    g = augment.Gamma(p=1.0, invert=invert).random_map(ex, rng(3))['image']
    np.testing.assert_allclose(g.mean(axes), img.mean(axes), atol=1e-3)
    np.testing.assert_allclose(g.std(axes), img.std(axes), rtol=1e-3)
    assert not np.allclose(g, img, atol=1e-2)
  blurred = augment.GaussianBlur(p=1.0, p_channel=1.0).random_map(ex, rng())['image']
  assert (np.abs(np.diff(blurred, axis=0)).mean((0, 1, 2))
          < 0.8 * np.abs(np.diff(img, axis=0)).mean((0, 1, 2))).all()
  low = augment.SimulateLowResolution(zoom=(0.5, 0.5), p=1.0, p_channel=1.0)
  coarse = low.random_map(ex, rng())['image']
  assert not np.allclose(coarse, img, atol=1e-2)
  # thick slices: nothing happens along the kept axis; an image that varies only along it stays
  along_z = np.broadcast_to(np.linspace(-1, 1, 10, dtype=np.float32)[:, None], (12, 14, 10, 1))
  kept = augment.SimulateLowResolution(zoom=(0.5, 0.5), p=1.0, p_channel=1.0, keep_axes=(2,))
  z_only = {'image': np.ascontiguousarray(along_z), 'label': ex['label']}
  np.testing.assert_allclose(kept.random_map(z_only, rng())['image'], z_only['image'], atol=1e-5)


def test_nnunet_chain_replaces_basic_intensity_and_is_deterministic():
  basic = augment.make_augmentations(3)
  nn = augment.make_augmentations(3, intensity='nnunet', keep_axes=(2,))
  assert any(isinstance(t, augment.RandomIntensity) for t in basic)
  assert not any(isinstance(t, augment.RandomIntensity) for t in nn)
  names = [type(t).__name__ for t in nn]
  assert names[names.index('GaussianNoise'):names.index('Contiguous')] == [
      'GaussianNoise', 'GaussianBlur', 'Brightness', 'Contrast', 'SimulateLowResolution',
      'Gamma', 'Gamma']
  assert [t for t in nn if isinstance(t, augment.SimulateLowResolution)][0].keep_axes == (2,)
  a, b = (_apply(nn, _smooth(), 7) for _ in range(2))
  np.testing.assert_array_equal(a['image'], b['image'])
  with pytest.raises(ValueError, match="'strong'"):
    augment.make_augmentations(3, intensity='strong')


def test_aug_intensity_from_config():
  from unet_ds import config_lib
  from unet_ds.data import datasets
  c = config_lib.real_data_config(3, 'msd')
  c.data.patch_size = (16, 16, 16)
  assert c.data.aug_intensity == 'basic'  # old runs train as they did
  c.data.aug_intensity, c.data.aug_scale_axes = 'nnunet', (0, 1)
  low = [t for t in datasets.train_batch_fn(c.data).transforms
         if isinstance(t, augment.SimulateLowResolution)]
  assert len(low) == 1 and low[0].keep_axes == (2,)  # not along the axis scaling leaves alone
  c.data.aug_intensity = 'heavy'
  with pytest.raises(ValueError, match="config.data.aug_.*aug_intensity='heavy'"):
    config_lib.validate(c)
