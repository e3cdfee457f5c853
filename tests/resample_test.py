"""Tests for unet_ds.data.resample: grids, spline and one-hot resampling, the coarse axis, round
trips."""
import nibabel
import numpy as np
import pytest

from unet_ds.data import resample


def test_target_shape_and_coarse_axis():
  assert resample.target_shape((100, 80, 20), (0.8, 0.8, 5.0), (1.0, 1.0, 2.5)) == (80, 64, 40)
  assert resample.target_shape((3, 3), (1.0, 1.0), (10.0, 10.0)) == (1, 1)  # never 0 voxels
  assert resample.coarse_axis((0.8, 0.8, 5.0)) == 2
  assert resample.coarse_axis((1.0, 1.0, 3.0)) is None  # 3x is not beyond the threshold
  assert resample.coarse_axis((1.0, 1.0, 1.0), (1.0, 4.0, 1.0)) == 1  # the target's grid
  with pytest.raises(ValueError, match='lengths disagree'):
    resample.target_shape((4, 4, 4), (1, 1), (1, 1, 1))


def test_same_shape_is_identity_and_constants_stay_constant():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(6, 7, 5, 2)).astype(np.float32)
  np.testing.assert_array_equal(resample.resample_image(image, (6, 7, 5)), image)
  const = np.full((6, 7, 5, 1), 3.5, np.float32)
  out = resample.resample_image(const, (12, 9, 11))
  assert out.shape == (12, 9, 11, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out, 3.5, atol=1e-5)


def test_spline_follows_a_linear_ramp_away_from_the_edges():
  x = np.arange(16, dtype=np.float32)
  image = np.broadcast_to(x[:, None, None, None], (16, 4, 4, 1)).copy()
  out = resample.resample_image(image, (32, 4, 4))
  # Voxel centres aligned: new voxel i sits at old coordinate (i + 0.5) / 2 - 0.5.
  expected = (np.arange(32) + 0.5) / 2 - 0.5
  np.testing.assert_allclose(out[8:-8, 0, 0, 0], expected[8:-8], atol=2e-3)


def test_coarse_axis_takes_whole_slices():
  # Each z slice holds its index: order 0 along z may only copy slices, never blend them.
  image = np.broadcast_to(np.arange(5, dtype=np.float32)[None, None, :, None], (8, 8, 5, 1)).copy()
  out = resample.resample_image(image, (16, 16, 12), axis=2)
  assert out.shape == (16, 16, 12, 1)
  assert set(np.unique(np.round(out, 4))) <= set(range(5))
  blended = resample.resample_image(image, (16, 16, 12), axis=None)
  assert not set(np.unique(np.round(blended, 4))) <= set(range(5))


def test_labels_linear_one_hot_and_nearest():
  label = np.zeros((8, 8, 8), np.int32)
  label[2:6, 2:6, 2:6] = 1
  label[3:5, 3:5, 3:5] = 2
  for method in ('linear', 'nearest'):
    up = resample.resample_labels(label, (16, 16, 16), method=method, num_classes=3)
    assert up.shape == (16, 16, 16) and up.dtype == np.int32
    assert set(np.unique(up)) == {0, 1, 2}
    # 2x up then 2x down returns the original map
    np.testing.assert_array_equal(resample.resample_labels(up, (8, 8, 8), method=method), label)
  with pytest.raises(ValueError, match='method'):
    resample.resample_labels(label, (4, 4, 4), method='cubic')


def test_to_original_round_trip_shapes_and_values():
  geometry = resample.Geometry(original_shape=(10, 12, 5), original_spacing=(1.0, 1.0, 4.0),
                               affine=np.eye(4), shape=(10, 12, 14), coarse_axis=2)
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(10, 12, 14, 3))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  back = resample.to_original(probs.astype(np.float32), geometry)
  assert back.shape == (10, 12, 5, 3)
  np.testing.assert_allclose(back.sum(-1), 1.0, atol=1e-5)
  labels = resample.to_original(np.argmax(probs, -1).astype(np.uint8), geometry)
  assert labels.shape == (10, 12, 5) and labels.max() <= 2
  with pytest.raises(ValueError, match=r'not the resampled shape \(10, 12, 14\)'):
    resample.to_original(probs[:5], geometry)
  same = resample.identity_geometry((4, 4, 4), (1, 1, 1))
  assert resample.to_original(probs[:4, :4, :4], same) is not None and not same.resampled


def test_resampled_affine_keeps_the_box():
  affine = nibabel.affines.from_matvec(np.diag([0.8, 0.8, 5.0]), [10.0, -3.0, 7.0])
  new = resample.resampled_affine(affine, (100, 80, 20), (80, 64, 40))
  np.testing.assert_allclose(np.abs(np.diag(new)[:3]), [1.0, 1.0, 2.5])
  for corner_old, corner_new in (([-0.5] * 3, [-0.5] * 3),
                                 ([99.5, 79.5, 19.5], [79.5, 63.5, 39.5])):
    np.testing.assert_allclose(nibabel.affines.apply_affine(affine, corner_old),
                               nibabel.affines.apply_affine(new, corner_new), atol=1e-9)
