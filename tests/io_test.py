"""Tests for unet_ds.data.io: casting, label checks, normalisation, NIfTI/PNG writing."""
import os

import nibabel
import numpy as np
from PIL import Image
import pytest

from unet_ds.data import folder2d
from unet_ds.data import io


def test_case_id_strips_image_suffixes():
  assert io.case_id('/a/b/hippocampus_001.nii.gz') == 'hippocampus_001'
  assert io.case_id('x.nii') == 'x'
  assert io.case_id('12.PNG') == '12'
  assert io.case_id('s.tiff') == 's'


def test_image_to_float_adds_channel_and_keeps_4d_channels():
  assert io.image_to_float(np.zeros((3, 4, 5), np.uint8), 'f', 3).shape == (3, 4, 5, 1)
  assert io.image_to_float(np.zeros((3, 4, 5, 2), np.int16), 'f', 3).shape == (3, 4, 5, 2)
  assert io.image_to_float(np.zeros((3, 4, 5, 1, 2)), 'f', 3).shape == (3, 4, 5, 2)
  assert io.image_to_float(np.zeros((3, 4)), 'f', 2).dtype == np.float32


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_image_to_float_rejects_non_finite(bad):
  image = np.zeros((3, 4, 5), np.float32)
  image[1, 2, 3] = bad
  with pytest.raises(io.DataError, match='vol.nii.gz: image holds 1 NaN/Inf'):
    io.image_to_float(image, 'vol.nii.gz', 3)


def test_label_to_classes_casts_float_and_maps_values():
  label = np.array([[0.0, 1.0], [2.0, 1.0]], np.float32)
  out = io.label_to_classes(label, 'l.nii', 3)
  assert out.dtype == np.int32 and out.tolist() == [[0, 1], [2, 1]]
  mapped = io.label_to_classes(np.array([[0, 255]], np.uint8), 'm.png', 2, {0: 1, 255: 0})
  assert mapped.tolist() == [[1, 0]]


@pytest.mark.parametrize('label, mapping, match', [
    (np.array([0, 3]), None, r'l.png: label values \[3\] outside the 3 classes'),
    (np.array([0.0, 0.5]), None, 'l.png: label holds non-integer'),
    (np.array([0, 7], np.uint8), {0: 0, 255: 1}, r'l.png: label values \[7\] not in label_map'),
    (np.array([0, 255], np.uint8), {0: 0, 255: 5}, r'l.png: label values \[5\] outside'),
])
def test_label_to_classes_errors_name_file(label, mapping, match):
  with pytest.raises(io.DataError, match=match):
    io.label_to_classes(label, 'l.png', 3, mapping)


def test_parse_label_map_forms():
  assert io.parse_label_map('0:1, 255:0') == {0: 1, 255: 0}
  assert io.parse_label_map({'0': 1, 255: '0'}) == {0: 1, 255: 0}
  assert io.parse_label_map(((0, 1), (255, 0))) == {0: 1, 255: 0}
  assert io.parse_label_map('') is None and io.parse_label_map(None) is None
  with pytest.raises(ValueError, match='label_map'):
    io.parse_label_map('0-1')


def test_normalize_zscore_minmax_and_clip():
  rng = np.random.default_rng(0)
  image = np.stack([rng.normal(5, 3, (8, 8, 8)), rng.normal(-2, 0.5, (8, 8, 8))], -1)
  z = io.normalize(image, 'zscore')
  np.testing.assert_allclose(z.mean((0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(z.std((0, 1, 2)), 1, atol=1e-4)
  m = io.normalize(image, 'minmax')
  np.testing.assert_allclose(m.min((0, 1, 2)), 0)
  np.testing.assert_allclose(m.max((0, 1, 2)), 1)
  spiky = np.zeros((10, 10, 1), np.float32)
  spiky[0, 0] = 1e6  # one outlier: clipping at the 99th percentile removes it
  clipped = io.normalize(spiky, 'none', clip_percentiles=(0, 99))
  assert clipped.max() < 1e6 and io.normalize(spiky, 'none').max() == 1e6
  with pytest.raises(ValueError, match='normalization'):
    io.normalize(image, 'bogus')


def test_check_pair_shape_and_affine():
  io.check_pair('i', 'l', (2, 3, 4), (2, 3, 4), np.eye(4), np.eye(4) + 1e-6)
  with pytest.raises(io.DataError, match=r'lab.nii: label shape \(2, 3, 5\) != image shape'):
    io.check_pair('img.nii', 'lab.nii', (2, 3, 4), (2, 3, 5))
  shifted = np.eye(4)
  shifted[0, 3] = 1
  with pytest.raises(io.DataError, match='lab.nii: label affine differs from image img.nii'):
    io.check_pair('img.nii', 'lab.nii', (2, 3, 4), (2, 3, 4), np.eye(4), shifted)


def test_read_nifti_corrupt_names_file(tmp_path):
  path = tmp_path / 'broken.nii.gz'
  path.write_bytes(b'\x1f\x8b not really gzip')
  with pytest.raises(io.DataError, match='broken.nii.gz: cannot read NIfTI'):
    io.read_nifti(path)


def test_write_nifti_keeps_affine_and_header(tmp_path):
  affine = np.array([[0, -1.5, 0, 10], [2, 0, 0, -4], [0, 0, 3, 7], [0, 0, 0, 1]], np.float64)
  src = nibabel.Nifti1Image(np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32),
                            affine)
  src.header['descrip'] = b'source scan'
  nibabel.save(src, tmp_path / 'img.nii.gz')
  ref = io.read_nifti(tmp_path / 'img.nii.gz')
  labels = np.random.default_rng(1).integers(0, 3, (4, 5, 6))
  io.write_nifti(tmp_path / 'pred.nii.gz', labels, ref.affine, ref.header)
  out = nibabel.load(tmp_path / 'pred.nii.gz')
  np.testing.assert_allclose(out.affine, affine)
  assert out.get_data_dtype() == np.uint8
  assert out.header['descrip'].tobytes().startswith(b'source scan')
  np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels)
  probs = np.random.default_rng(2).random((4, 5, 6, 3)).astype(np.float32)
  io.write_nifti(tmp_path / 'probs.nii.gz', probs, ref.affine, ref.header, dtype=np.float32)
  back = nibabel.load(tmp_path / 'probs.nii.gz')
  np.testing.assert_allclose(back.get_fdata(), probs, rtol=1e-6)
  np.testing.assert_allclose(back.affine, affine)


def test_image2d_roundtrip_and_errors(tmp_path):
  mask = np.array([[0, 255], [255, 0]], np.uint8)
  io.write_image2d(tmp_path / 'm.png', mask)
  np.testing.assert_array_equal(io.read_image2d(tmp_path / 'm.png'), mask)
  (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  with pytest.raises(io.DataError, match='bad.png: cannot read image'):
    io.read_image2d(tmp_path / 'bad.png')


def test_list_files_empty_and_missing(tmp_path):
  (tmp_path / 'e').mkdir()
  (tmp_path / 'e' / '._hidden.nii.gz').write_bytes(b'')  # macOS metadata files are skipped
  with pytest.raises(io.DataError, match=f'{tmp_path}/e: empty folder'):
    io.list_files(tmp_path / 'e', io.NIFTI_SUFFIXES)
  with pytest.raises(io.DataError, match='nope: folder not found'):
    io.list_files(os.path.join(tmp_path, 'nope'), io.NIFTI_SUFFIXES)


def _palette_png(path, indices, palette_rgb):
  img = Image.fromarray(indices.astype(np.uint8), mode='P')
  img.putpalette(np.asarray(palette_rgb, np.uint8).ravel().tolist())
  img.save(path)


def test_palette_image_reads_as_its_gray_or_rgb_values(tmp_path):
  rng = np.random.default_rng(0)
  indices = rng.integers(0, 4, (5, 6))
  gray_levels = np.array([200, 10, 130, 60])  # not the identity: index 0 shows as 200
  _palette_png(tmp_path / 'p.png', indices, np.repeat(gray_levels[:, None], 3, axis=1))
  Image.fromarray(gray_levels[indices].astype(np.uint8), mode='L').save(tmp_path / 'l.png')
  gray = io.read_image2d(tmp_path / 'l.png')
  assert gray.shape == (5, 6)
  np.testing.assert_array_equal(io.read_image2d(tmp_path / 'p.png'), gray)
  np.testing.assert_array_equal(io.read_image2d(tmp_path / 'p.png', kind='label'), indices)

  colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]])
  _palette_png(tmp_path / 'c.png', indices, colours)
  Image.fromarray(colours[indices].astype(np.uint8), mode='RGB').save(tmp_path / 'rgb.png')
  np.testing.assert_array_equal(io.read_image2d(tmp_path / 'c.png'),
                                io.read_image2d(tmp_path / 'rgb.png'))
  assert io.read_image2d(tmp_path / 'c.png').shape == (5, 6, 3)
  with pytest.raises(ValueError, match="kind 'mask'"):
    io.read_image2d(tmp_path / 'c.png', kind='mask')


def test_folder2d_reads_palette_images_as_values_and_palette_masks_as_indices(tmp_path):
  indices = np.array([[0, 1], [2, 1]])
  _palette_png(tmp_path / 'img.png', indices, [[50, 50, 50], [0, 0, 0], [100, 100, 100]])
  _palette_png(tmp_path / 'mask.png', indices, [[0, 0, 0], [255, 0, 0], [0, 255, 0]])
  case = folder2d.read_case(str(tmp_path / 'img.png'), str(tmp_path / 'mask.png'),
                            num_classes=3, normalization='none')
  np.testing.assert_array_equal(case['image'][..., 0], [[50, 0], [100, 0]])
  np.testing.assert_array_equal(case['label'], indices)
