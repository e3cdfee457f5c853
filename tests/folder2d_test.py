"""Tests for unet_ds.data.folder2d: PNG/TIFF image-mask folders, label mapping, bad input."""
import os

import numpy as np
from PIL import Image
import pytest

from unet_ds.data import folder2d
from unet_ds.data import io


def _make_folder(root, num=4, size=(12, 10)):
  """uint8 PNG images and {0, 255} masks (ISBI style: 0 = membrane), one float32 TIFF image."""
  (root / 'image').mkdir(parents=True)
  (root / 'label').mkdir()
  rng = np.random.default_rng(0)
  masks = {}
  for i in range(num):
    shape = (size[0] + i, size[1])
    mask = np.where(rng.random(shape) < 0.3, 0, 255).astype(np.uint8)
    image = (mask * 0.5 + rng.integers(0, 60, shape)).astype(np.uint8)
    if i == 1:
      Image.fromarray(image.astype(np.float32) * 10).save(root / 'image' / f'{i}.tif')
    else:
      Image.fromarray(image).save(root / 'image' / f'{i}.png')
    Image.fromarray(mask).save(root / 'label' / f'{i}.png')
    masks[str(i)] = mask
  return masks


def _cfg(root, tmp_path, **kw):
  return {'path': str(root), 'num_classes': 2, 'label_map': '0:1,255:0',
          'data_dir': str(tmp_path / 'tfds'), 'val_cases': '3', **kw}


def test_load_maps_labels_and_keeps_shapes(tmp_path):
  root = tmp_path / 'em'
  masks = _make_folder(root)
  sources = folder2d.load(_cfg(root, tmp_path))
  assert len(sources['train']) == 3
  assert [sources['validation'][0]['case_id']] == ['3']
  for source in sources.values():
    for j in range(len(source)):
      ex = source[j]
      mask = masks[ex['case_id']]
      assert ex['image'].shape == mask.shape + (1,) and ex['image'].dtype == np.float32
      np.testing.assert_array_equal(ex['label'], (mask == 0).astype(np.int32))  # membrane = 1
      np.testing.assert_array_equal(ex['shape'], mask.shape)
      assert abs(ex['image'].mean()) < 1e-4
      # membrane pixels are darker in the image: the stored intensities kept that
      assert ex['image'][mask == 0].mean() < ex['image'][mask == 255].mean()
  assert sources['train'][[sources['train'][j]['case_id'] for j in range(3)].index('1')][
      'file'] == '1.tif'


def test_rgb_images_and_custom_folder_names(tmp_path):
  root = tmp_path / 'rgb'
  (root / 'imgs').mkdir(parents=True)
  (root / 'masks').mkdir()
  for i in range(3):
    Image.fromarray(np.full((8, 9, 3), 40 * i + np.arange(9)[None, :, None], np.uint8)).save(
        root / 'imgs' / f'p{i}.png')
    mask = np.zeros((8, 9, 3), np.uint8)
    mask[2:5, 3:7] = 2  # grey mask saved as RGB
    Image.fromarray(mask).save(root / 'masks' / f'p{i}.png')
  sources = folder2d.load({'path': str(root), 'num_classes': 3, 'image_dir': 'imgs',
                           'label_dir': 'masks', 'val_fraction': 0.0,
                           'data_dir': str(tmp_path / 'tfds'), 'in_channels': 3})
  ex = sources['train'][0]
  assert ex['image'].shape == (8, 9, 3) and ex['label'].shape == (8, 9)
  assert ex['label'].sum() == 2 * 12


def _break(root, kind):
  if kind == 'corrupt':
    (root / 'image' / '2.png').write_bytes(b'\x89PNG\r\n\x1a\nbroken')
    return 'image/2.png: cannot read image'
  if kind == 'label_values':
    Image.fromarray(np.full((14, 10), 128, np.uint8)).save(root / 'label' / '2.png')
    return r'label/2.png: label values \[128\] not in label_map'
  if kind == 'shape':
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / 'label' / '2.png')
    return r'label/2.png: label shape \(5, 5\) != image shape \(14, 10\)'
  if kind == 'missing_label':
    os.remove(root / 'label' / '2.png')
    return 'image/2.png: missing label'
  if kind == 'empty':
    for f in os.listdir(root / 'image'):
      os.remove(root / 'image' / f)
    return 'image: empty folder'
  if kind == 'channels':
    Image.fromarray(np.zeros((14, 10, 3), np.uint8)).save(root / 'image' / '2.png')
    return 'image/2.png: image has 3 channels, expected 1'
  if kind == 'colour_label':
    mask = np.zeros((14, 10, 3), np.uint8)
    mask[..., 0] = 255
    Image.fromarray(mask).save(root / 'label' / '2.png')
    return 'label/2.png: label is a colour image'
  raise ValueError(kind)


@pytest.mark.parametrize('kind', ['corrupt', 'label_values', 'shape', 'missing_label', 'empty',
                                  'channels', 'colour_label'])
def test_bad_input_errors_name_the_file(tmp_path, kind):
  root = tmp_path / 'em'
  _make_folder(root)
  where = _break(root, kind)
  with pytest.raises(io.DataError, match=where):
    folder2d.load(_cfg(root, tmp_path, val_cases='', val_fraction=0.0))


def test_float_image_with_nan_is_rejected(tmp_path):
  root = tmp_path / 'em'
  _make_folder(root)
  image = np.ones((13, 10), np.float32)
  image[0, 0] = np.nan
  Image.fromarray(image).save(root / 'image' / '1.tif')
  with pytest.raises(io.DataError, match='image/1.tif: image holds 1 NaN/Inf'):
    folder2d.load(_cfg(root, tmp_path))
