"""HD95 and normalised surface Dice against hand-computed values (unet_ds.surface_metrics)."""

import math

import numpy as np
import pytest

from unet_ds import surface_metrics as sm


def _square(top, shape=(10, 10), size=4, left=2):
  mask = np.zeros(shape, bool)
  mask[top:top + size, left:left + size] = True
  return mask


def _brute_force(pred, label, spacing):
  """HD95 and the directed distances by all pairs of surface points (no distance transform)."""
  a = np.argwhere(sm.surface(pred)) * np.asarray(spacing)
  b = np.argwhere(sm.surface(label)) * np.asarray(spacing)
  d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  return d.min(1), d.min(0)


def test_surface_is_the_boundary_ring():
  ring = sm.surface(_square(2))
  assert ring.sum() == 12 and not ring[3:5, 3:5].any() and ring[2, 2:6].all()
  edge = np.ones((3, 3), bool)  # the image border counts as outside
  assert sm.surface(edge).sum() == 8
  cube = np.zeros((6, 6, 6), bool)
  cube[1:5, 1:5, 1:5] = True
  assert sm.surface(cube).sum() == 64 - 8


def test_square_shifted_by_one_pixel():
  # 4x4 squares, rows 2-5 and 3-6. Each direction: 6 surface pixels on the other's ring (0),
  # 6 at distance 1 (two top pixels over the other's interior, the 4 of the far edge).
  label, pred = _square(2), _square(3)
  d_pred, d_label = sm.surface_distances(pred, label, (1.0, 1.0))
  assert sorted(d_pred.tolist()) == [0.0] * 6 + [1.0] * 6
  assert sorted(d_label.tolist()) == [0.0] * 6 + [1.0] * 6
  assert sm.hd95_nsd(pred, label, (1.0, 1.0), tolerance_mm=1.0) == (1.0, 1.0)
  assert sm.hd95_nsd(pred, label, (1.0, 1.0), tolerance_mm=0.5) == (1.0, 0.5)


def test_anisotropic_spacing():
  # Rows 2 mm apart, columns 1 mm: the pixels one row off are now 2 mm away, except the two
  # next to the other square's side column (1 mm). Each direction: 6 x 0, 2 x 1 mm, 4 x 2 mm.
  label, pred = _square(2), _square(3)
  d_pred, d_label = sm.surface_distances(pred, label, (2.0, 1.0))
  assert sorted(d_pred.tolist()) == [0.0] * 6 + [1.0] * 2 + [2.0] * 4
  assert sorted(d_label.tolist()) == [0.0] * 6 + [1.0] * 2 + [2.0] * 4
  hd95, nsd = sm.hd95_nsd(pred, label, (2.0, 1.0), tolerance_mm=1.0)
  assert hd95 == 2.0 and nsd == pytest.approx(16 / 24)
  assert sm.hd95_nsd(pred, label, (2.0, 1.0), tolerance_mm=2.0) == (2.0, 1.0)
  # Spacing along columns instead: the shift is along rows, 1 mm, so everything is within 1 mm.
  assert sm.hd95_nsd(pred, label, (1.0, 3.0), tolerance_mm=1.0) == (1.0, 1.0)


def test_percentile_of_one_outlier():
  # The same square plus one stray pixel 5 rows below the label's bottom edge (row 5 -> row 10 of
  # a 12-row image). pred -> label: 12 zeros and 5; P95 of 13 values
  # interpolates between the 12th (0) and 13th (5) at 0.4: 2.0. label -> pred: all 0.
  label = _square(2, shape=(12, 10))
  pred = label.copy()
  pred[10, 3] = True
  d_pred, d_label = sm.surface_distances(pred, label, (1.0, 1.0))
  assert sorted(d_pred.tolist()) == [0.0] * 12 + [5.0] and not d_label.any()
  hd95, nsd = sm.hd95_nsd(pred, label, (1.0, 1.0), tolerance_mm=1.0)
  assert hd95 == pytest.approx(2.0) and nsd == pytest.approx(24 / 25)


def test_cubes_shifted_by_one_voxel_match_brute_force():
  label = np.zeros((10, 10, 10), bool)
  label[2:6, 2:6, 2:6] = True
  pred = np.roll(label, 1, axis=0)
  for spacing in ((1.0, 1.0, 1.0), (3.0, 0.5, 0.7)):
    d_pred, d_label = sm.surface_distances(pred, label, spacing)
    ref_pred, ref_label = _brute_force(pred, label, spacing)
    np.testing.assert_allclose(np.sort(d_pred), np.sort(ref_pred), atol=1e-12)
    np.testing.assert_allclose(np.sort(d_label), np.sort(ref_label), atol=1e-12)
  # Unit spacing: by the 2D argument in each slice, every distance is 0 or 1 (one row off).
  hd95, nsd = sm.hd95_nsd(pred, label, (1.0, 1.0, 1.0), tolerance_mm=1.0)
  assert (hd95, nsd) == (1.0, 1.0)
  # 3 mm slices: of each cube's 56 surface voxels, its far end face (16) is 3 mm beyond the other
  # cube's; its near end face's inner 4 are 0.5 mm (one column) from the other's side wall, the
  # rest lie on the other's surface. P95 of 16/56 at 3 mm is 3; NSD at 1 mm: 2 x 40 / 112.
  hd95, nsd = sm.hd95_nsd(pred, label, (3.0, 0.5, 0.7), tolerance_mm=1.0)
  assert hd95 == 3.0 and nsd == pytest.approx(5 / 7)


def _ball(shape, centre, radius_mm, spacing):
  grid = np.indices(shape).astype(float)
  d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
  return d2 <= radius_mm ** 2


def test_spheres():
  spacing = (2.0, 1.0, 1.0)
  shape, centre = (20, 40, 40), (10, 20, 20)
  inner, outer = _ball(shape, centre, 10.0, spacing), _ball(shape, centre, 13.0, spacing)
  assert sm.hd95_nsd(inner, inner, spacing) == (0.0, 1.0)
  hd95, nsd = sm.hd95_nsd(inner, outer, spacing, tolerance_mm=1.0)
  # The radii differ by 3 mm; voxelising each surface moves it by up to a voxel (2 mm).
  assert 3.0 - 2.0 <= hd95 <= 3.0 + 2.0
  assert nsd < 0.2
  assert sm.hd95_nsd(inner, outer, spacing, tolerance_mm=hd95)[1] >= 0.95


def test_empty_masks():
  empty, square = np.zeros((10, 10), bool), _square(2)
  assert sm.hd95_nsd(empty, empty, (1.0, 1.0)) == (0.0, 1.0)
  diagonal = math.sqrt((10 * 2.0) ** 2 + (10 * 1.0) ** 2)
  assert sm.hd95_nsd(empty, square, (2.0, 1.0)) == (pytest.approx(diagonal), 0.0)
  assert sm.hd95_nsd(square, empty, (2.0, 1.0)) == (pytest.approx(diagonal), 0.0)


def test_case_metrics_per_class_and_ignore():
  label = np.zeros((10, 10), np.int64)
  label[_square(2)] = 1
  label[8:10, 8:10] = 2
  pred = np.zeros_like(label)
  pred[_square(3)] = 1  # class 1 shifted by one row; class 2 missed
  out = sm.case_surface_metrics(pred, label, (1.0, 1.0), num_classes=4, tolerance_mm=0.5)
  assert math.isnan(out['hd95'][0]) and math.isnan(out['nsd'][0])
  assert out['hd95'][1:] == [1.0, pytest.approx(math.sqrt(200)), 0.0]
  assert out['nsd'][1:] == [0.5, 0.0, 1.0]  # class 3: absent from both
  # Ignored label voxels leave both masks: hide the shifted rows' difference (rows 2 and 6).
  label[2, :], label[6, :] = 255, 255
  out = sm.case_surface_metrics(pred, label, (1.0, 1.0), num_classes=2, ignore_index=255)
  assert out['hd95'][1] == 0.0 and out['nsd'][1] == 1.0
  # 3D maps work the same way.
  vol = np.zeros((6, 6, 6), np.int64)
  vol[1:4, 1:4, 1:4] = 1
  out = sm.case_surface_metrics(vol, vol, (1.0, 1.0, 2.5), num_classes=2)
  assert out['hd95'][1] == 0.0 and out['nsd'][1] == 1.0


def test_bad_input_is_named():
  a = np.zeros((4, 4), np.int64)
  with pytest.raises(ValueError, match=r'prediction shape \(4, 4\) != label shape \(4, 5\)'):
    sm.case_surface_metrics(a, np.zeros((4, 5)), (1, 1), 2)
  with pytest.raises(ValueError, match=r'spacing \(1.0,\) must hold 2 positive sizes'):
    sm.case_surface_metrics(a, a, (1,), 2)
  with pytest.raises(ValueError, match=r'spacing \(1.0, 0.0\)'):
    sm.case_surface_metrics(a, a, (1, 0), 2)
  with pytest.raises(ValueError, match='tolerance_mm=-1'):
    sm.case_surface_metrics(a, a, (1, 1), 2, tolerance_mm=-1)
  with pytest.raises(ValueError, match='2D or 3D'):
    sm.case_surface_metrics(np.zeros(4), np.zeros(4), (1,), 2)


def test_mean_over_cases():
  cases = [{'hd95': [math.nan, 1.0, 4.0], 'nsd': [math.nan, 1.0, 0.5]},
           {'hd95': [math.nan, 3.0, math.nan], 'nsd': [math.nan, 0.0, math.nan]}]
  out = sm.mean_over_cases(cases)
  assert math.isnan(out['hd95'][0]) and out['hd95'][1:] == [2.0, 4.0]
  assert out['nsd'][1:] == [0.5, 0.5]
  assert out['mean_foreground_hd95'] == 3.0 and out['mean_foreground_nsd'] == 0.5
