"""Tests for unet_ds.overlays: grid shapes, upsampled heads, slice choice, bad input."""

import numpy as np
from PIL import Image
import pytest

from unet_ds import overlays

_RED = np.array([0xe6, 0x19, 0x4b])  # class 1's colour


def _read(path):
  data = path.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  return np.asarray(Image.open(path).convert('RGB')).astype(int)


def _reddish(pixels):
  """Pixels where class 1's colour shows through the overlay (red well above green and blue)."""
  return (pixels[..., 0] - np.maximum(pixels[..., 1], pixels[..., 2])) > 60


def test_upsample_nearest():
  coarse = np.array([[1, 2], [3, 4]])
  np.testing.assert_array_equal(overlays.upsample_nearest(coarse, (4, 4)),
                                [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
  assert overlays.upsample_nearest(np.zeros((3, 5, 2)), (7, 10, 4)).shape == (7, 10, 4)
  with pytest.raises(ValueError, match='different numbers of axes'):
    overlays.upsample_nearest(coarse, (4, 4, 4))


def test_2d_grid_and_panels(tmp_path):
  image = np.random.default_rng(0).normal(size=(64, 48, 1))
  label = np.zeros((64, 48), np.int64)
  label[10:40, 10:30] = 1
  head = np.zeros((16, 12), np.int64)  # a DS head at 1/4 resolution: upsampled
  head[3:10, 3:8] = 1
  preds = {'deep': label.copy(), 'none': np.zeros_like(label), 'deep head 2': head}
  path = overlays.write_overlay(tmp_path / 'sub' / 'case.png', image, label, preds, title='c0')
  assert overlays.grid_shape(2, 3) == (1, 4)
  pixels = _read(path)
  assert pixels.shape == (overlays.PANEL_PX, 4 * overlays.PANEL_PX, 3)
  panels = np.split(pixels, 4, axis=1)
  red = [_reddish(p).sum() for p in panels]
  # The label, the matching prediction and the head show class 1; the empty prediction does not.
  assert red[0] > 1000 and red[1] > 1000 and red[3] > 1000
  assert red[2] < 50


def test_3d_grid_slices_through_the_label(tmp_path):
  image = np.zeros((20, 30, 24))
  label = np.zeros((20, 30, 24), np.int64)
  label[12:15, 5:8, 18:21] = 2
  assert overlays.slice_centre(label) == (13, 6, 19)
  assert overlays.slice_centre(np.zeros((4, 6, 8))) == (2, 3, 4)
  path = overlays.write_overlay(tmp_path / 'v.png', image, label,
                                {'a': label, 'b': label[::2, ::2, ::2]}, spacing=(2.0, 1.0, 1.0),
                                num_classes=3)
  pixels = _read(path)
  assert overlays.grid_shape(3, 2) == (3, 3)
  assert pixels.shape == (3 * overlays.PANEL_PX, 3 * overlays.PANEL_PX, 3)
  # Every view cuts through the structure: each label panel shows class 2's colour.
  for row in np.split(pixels, 3, axis=0):
    label_panel = np.split(row, 3, axis=1)[0]
    assert (np.abs(label_panel - np.array([0x3c, 0xb4, 0x4b]) * 0.45).sum(-1) < 40).sum() > 20


def test_bad_input(tmp_path):
  with pytest.raises(ValueError, match=r'image shape \(4, 4\) != label shape \(4, 5\)'):
    overlays.write_overlay(tmp_path / 'x.png', np.zeros((4, 4)), np.zeros((4, 5)), {})
  with pytest.raises(ValueError, match='2D or 3D'):
    overlays.write_overlay(tmp_path / 'x.png', np.zeros(4), np.zeros(4), {})
  with pytest.raises(ValueError, match='spacing'):
    overlays.write_overlay(tmp_path / 'x.png', np.zeros((4, 4)), np.zeros((4, 4)), {},
                           spacing=(1.0,))


def test_output_predict_fns_resize_each_head():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def apply_fn(x):  # a stand-in model: final at full size, heads at 1/2 and 1/4
    final = jnp.concatenate([x, -x], -1)
    return final, (final[:, ::2, ::2] + 1.0, final[:, ::4, ::4] + 2.0)

  fns = overlays.output_predict_fns(apply_fn, (1, 8, 8, 1))
  assert list(fns) == ['final', 'head 1', 'head 2']
  x = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)
  np.testing.assert_array_equal(fns['final'](x), apply_fn(x)[0])
  head2 = np.asarray(fns['head 2'](x))
  assert head2.shape == (1, 8, 8, 2)
  # Nearest neighbour: each 4x4 block holds the coarse value of its corner voxel, + 2.
  np.testing.assert_array_equal(head2[0, :4, :4, 0], np.full((4, 4), 0.0 + 2.0))
  np.testing.assert_array_equal(head2[0, 4:, 4:, 1], np.full((4, 4), -36.0 + 2.0))


def test_output_windows_predict_every_output_over_the_whole_image(tmp_path):
  import types  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def apply_fn(x):  # pointwise: class 1 where x > 0; one head at 1/2 resolution
    final = jnp.concatenate([-x, x], -1)
    return final, (final[:, ::2, ::2],)

  settings = types.SimpleNamespace(patch_size=(8, 8), overlap=0.5, batch_size=2,
                                   sigma_scale=1 / 8, tta_axes=())
  windows = overlays.OutputWindows(apply_fn, settings, in_channels=1)
  assert windows.names == ['final', 'head 1']
  image = np.random.default_rng(1).normal(size=(13, 11, 1)).astype(np.float32)
  labels = windows.labels(image)
  np.testing.assert_array_equal(labels['final'], image[..., 0] > 0)
  assert labels['head 1'].shape == (13, 11)
  assert overlays.example_spacing({'image': image}) is None
  examples = [('a', {'image': image, 'label': labels['final']}),
              ('b', {'image': -image, 'label': labels['final']})]
  paths = overlays.write_run_overlays(tmp_path / 'ov', windows, examples, num_classes=2)
  assert [p.name for p in paths] == ['a.png', 'b.png']
  # Columns: the label, final, head 1.
  assert _read(paths[1]).shape == (overlays.PANEL_PX, 3 * overlays.PANEL_PX, 3)


def test_example_spacing_of_a_resampled_case():
  from unet_ds.data import resample  # pylint: disable=g-import-not-at-top
  geometry = resample.Geometry(original_shape=(10, 20, 20), original_spacing=(3.0, 1.0, 1.0),
                               affine=None, shape=(20, 20, 20), coarse_axis=0)
  assert overlays.example_spacing({'geometry': geometry}) == (1.5, 1.0, 1.0)
