"""Boundary metrics of one case: 95th-percentile Hausdorff distance and normalised surface Dice.

The Medical Segmentation Decathlon's boundary metrics (Nikolov et al. 2021, "Clinically applicable
segmentation of head and neck anatomy for radiotherapy"), in physical units from the voxel spacing,
per class, for 2D and 3D label maps:

  * surface of a mask: its boundary voxels, the voxels of the mask with a face neighbour outside
    it (`mask & ~erode(mask)`, face connectivity; the image border counts as outside), as MONAI's
    `get_mask_edges`;
  * d(a, B): the Euclidean distance in mm from a surface voxel `a` to the nearest surface voxel of
    the other mask (an exact distance transform with `sampling=spacing`);
  * HD95 = max(P95 {d(a, L) : a in S_pred}, P95 {d(b, P) : b in S_label}), the larger of the two
    directed 95th percentiles (numpy's linear interpolation), as MONAI's
    `compute_hausdorff_distance(percentile=95)` and the DeepMind surface-distance library;
  * NSD at tolerance t = (#{a in S_pred : d(a, L) <= t} + #{b in S_label : d(b, P) <= t})
    / (|S_pred| + |S_label|), each surface voxel counting once (MONAI's `compute_surface_dice`;
    the DeepMind library weights by surfel area instead).

Empty masks have defined values, so that every case enters the means:
  * both empty (the class is absent and none was predicted): HD95 0, NSD 1 (a perfect answer);
  * one empty (a missed or a hallucinated structure): NSD 0, and HD95 the image diagonal in mm,
    the largest distance the image can hold (BraTS scores a missing segmentation the same way),
    instead of infinity, which no mean survives, or NaN, which a mean would silently skip.

Background (class 0) is not scored: its entries are NaN. 2D images without a physical spacing
(PNG/TIFF folders) take spacing 1 per pixel; tolerance and HD95 are then in pixels.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

METRICS = ('hd95', 'nsd')


def surface(mask: np.ndarray) -> np.ndarray:
  """The boundary voxels of a boolean mask (face connectivity; the image border is outside)."""
  mask = np.asarray(mask, bool)
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(distances from pred's surface voxels to label's surface, label's to pred's), in mm.

  Both masks must be non-empty. Only the bounding box of the two masks (plus one voxel) is
  transformed: every surface voxel lies in it, and the distance transform is exact, not path-based.
  """
  both = pred | label
  box = tuple(slice(max(int(idx.min()) - 1, 0), int(idx.max()) + 2) for idx in np.nonzero(both))
  # Surfaces on the whole image first: a crop edge must not look like the image border.
  pred_surface, label_surface = surface(pred)[box], surface(label)[box]
  to_label = ndimage.distance_transform_edt(~label_surface, sampling=spacing)
  to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
  return to_label[pred_surface], to_pred[label_surface]


def hd95_nsd(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float],
             tolerance_mm: float = 1.0) -> tuple[float, float]:
  """(HD95 in mm, NSD at `tolerance_mm`) of two boolean masks; empty masks as the module doc."""
  pred, label = np.asarray(pred, bool), np.asarray(label, bool)
  has_pred, has_label = bool(pred.any()), bool(label.any())
  if not has_pred and not has_label:
    return 0.0, 1.0
  if not has_pred or not has_label:
    return image_diagonal(pred.shape, spacing), 0.0
  d_pred, d_label = surface_distances(pred, label, spacing)
  hd95 = max(float(np.percentile(d_pred, 95)), float(np.percentile(d_label, 95)))
  within = int((d_pred <= tolerance_mm).sum()) + int((d_label <= tolerance_mm).sum())
  return hd95, within / (d_pred.size + d_label.size)


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
  """The image's diagonal in mm: HD95's value when exactly one of the masks is empty."""
  return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def case_surface_metrics(pred: np.ndarray, label: np.ndarray, spacing: Sequence[float],
                         num_classes: int, tolerance_mm: float = 1.0,
                         ignore_index: int | None = None) -> dict[str, list[float]]:
  """HD95 and NSD per class of one case's integer label maps.

  Args:
    pred, label: integer maps of one shape (2D or 3D), classes 0..num_classes-1.
    spacing: the voxel size in mm per array axis (e.g. the NIfTI header's zooms in the array's
      axis order); 1 per axis for images without one.
    num_classes: K, background included.
    tolerance_mm: NSD's tolerance, in the spacing's units.
    ignore_index: label value of voxels left out of both masks (both pred and label), if any.

  Returns:
    `{'hd95': [K floats], 'nsd': [K floats]}`, index 0 (background) NaN.

  Raises:
    ValueError: shapes that differ, a spacing of the wrong length or not positive, a negative
      tolerance, or fewer than 2 classes.
  """
  pred, label = np.asarray(pred), np.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(f'surface metrics: prediction shape {pred.shape} != label shape {label.shape}')
  if pred.ndim not in (2, 3):
    raise ValueError(f'surface metrics: need a 2D or 3D label map, got shape {pred.shape}')
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != pred.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
    raise ValueError(f'surface metrics: spacing {spacing} must hold {pred.ndim} positive sizes '
                     f'(one per axis of the shape {pred.shape})')
  if not tolerance_mm >= 0:
    raise ValueError(f'surface metrics: tolerance_mm={tolerance_mm} must be >= 0')
  if num_classes < 2:
    raise ValueError(f'surface metrics: num_classes={num_classes} must be >= 2 (background + one)')
  keep = label != ignore_index if ignore_index is not None else np.ones(label.shape, bool)
  out = {m: [math.nan] for m in METRICS}
  for c in range(1, num_classes):
    hd95, nsd = hd95_nsd((pred == c) & keep, (label == c) & keep, spacing, tolerance_mm)
    out['hd95'].append(hd95)
    out['nsd'].append(nsd)
  return out


def mean_over_cases(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Per class, the mean over cases of each metric, and the mean over foreground classes.

  `cases` are `case_surface_metrics` results (or rows holding their 'hd95' and 'nsd' lists).
  Returns `{'hd95': [K], 'nsd': [K], 'mean_foreground_hd95', 'mean_foreground_nsd'}`; NaN where
  no value exists.
  """
  out = {}
  for m in METRICS:
    per_case = np.asarray([c[m] for c in cases], np.float64)
    if per_case.size == 0:
      out[m], out[f'mean_foreground_{m}'] = [], math.nan
      continue
    with np.errstate(invalid='ignore'):
      counts = (~np.isnan(per_case)).sum(0)
      sums = np.nansum(per_case, 0)
      per_class = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    out[m] = [float(v) for v in per_class]
    fg = per_class[1:][~np.isnan(per_class[1:])]
    out[f'mean_foreground_{m}'] = float(fg.mean()) if fg.size else math.nan
  return out
