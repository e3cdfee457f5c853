"""Resampling volumes to a target voxel spacing, and predictions back to each input's own grid.

Images use a cubic B-spline (order 3); labels either take the nearest voxel or interpolate each
class's one-hot map linearly and keep the argmax (smoother boundaries, no lost thin structures at
small factors). When a grid is strongly anisotropic (largest spacing > `ANISOTROPY_THRESHOLD` x the
smallest, e.g. 0.8 x 0.8 x 5 mm MRI), the coarse axis is resampled apart from the others with
order 0: interpolating across thick slices invents structure that is not in the data (nnU-Net's
rule). Voxel centres are aligned (voxel i of n covers [i, i + 1) / n of the extent), so a volume
and its resampled copy cover the same physical box.

  shape = resample.target_shape(image.shape[:3], spacing, target_spacing)
  image = resample.resample_image(image, shape, resample.coarse_axis(spacing, target_spacing))
  probs = resample.to_original(probs, geometry)  # a prediction back on the input's grid
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0
LABEL_METHODS = ('linear', 'nearest')


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where a resampled example came from: enough to bring a prediction back to the input grid."""
  original_shape: tuple[int, ...]
  original_spacing: tuple[float, ...]
  affine: np.ndarray | None  # the input's [4, 4] affine (None for 2D images)
  shape: tuple[int, ...]  # the resampled (model-side) spatial shape
  coarse_axis: int | None  # the axis resampled apart (order 0), None when isotropic enough

  @property
  def resampled(self) -> bool:
    return self.shape != self.original_shape


def identity_geometry(shape: Sequence[int], spacing: Sequence[float],
                      affine: np.ndarray | None = None) -> Geometry:
  """The geometry of an example kept on its own grid."""
  shape = tuple(int(s) for s in shape)
  return Geometry(shape, tuple(float(s) for s in spacing), affine, shape, None)


def target_shape(shape: Sequence[int], spacing: Sequence[float],
                 target_spacing: Sequence[float]) -> tuple[int, ...]:
  """Voxels per axis at `target_spacing` covering the same extent (at least 1)."""
  _check_lengths(shape, spacing, target_spacing)
  return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def coarse_axis(spacing: Sequence[float], target_spacing: Sequence[float] | None = None
                ) -> int | None:
  """The axis to resample apart, or None.

  An axis is coarse when the input's (or else the target's) spacing is anisotropic beyond
  `ANISOTROPY_THRESHOLD`; the input's grid decides first, as its thick slices are what spline
  interpolation would smear.
  """
  for grid in (spacing, target_spacing):
    if grid is None:
      continue
    grid = np.asarray(grid, np.float64)
    if grid.size > 1 and grid.max() > ANISOTROPY_THRESHOLD * grid.min():
      return int(np.argmax(grid))
  return None


def _check_lengths(*seqs: Sequence[float]) -> None:
  if len({len(s) for s in seqs}) != 1:
    raise ValueError(f'resample: shape/spacing lengths disagree: {[tuple(s) for s in seqs]}')


def _zoom_axes(volume: np.ndarray, shape: Sequence[int], axes: Sequence[int],
               order: int) -> np.ndarray:
  """Resamples `volume` (spatial only) to `shape` along `axes`; other axes are left as they are."""
  new_shape = [n if a in axes else volume.shape[a] for a, n in enumerate(shape)]
  if list(volume.shape) == new_shape:
    return volume
  factors = [n / s for n, s in zip(new_shape, volume.shape)]
  # grid_mode: voxel-centre alignment (the extent is kept); at factor 1 an axis is unchanged.
  out = ndimage.zoom(volume, factors, order=order, mode='nearest', grid_mode=True,
                     prefilter=order > 1)
  if list(out.shape) != new_shape:  # zoom rounds shape * factor; guard against float drift
    raise ValueError(f'resample: got {out.shape}, wanted {tuple(new_shape)}')
  return out


def _resample_spatial(volume: np.ndarray, shape: Sequence[int], axis: int | None, order: int,
                      coarse_order: int) -> np.ndarray:
  """One channel: all axes at `order`, or the others at `order` and `axis` at `coarse_order`."""
  rank = volume.ndim
  if axis is None:
    return _zoom_axes(volume, shape, range(rank), order)
  fine = _zoom_axes(volume, shape, [a for a in range(rank) if a != axis], order)
  return _zoom_axes(fine, shape, [axis], coarse_order)


def resample_image(image: np.ndarray, shape: Sequence[int], axis: int | None = None, *,
                   order: int = 3, coarse_order: int = 0) -> np.ndarray:
  """A float `[*spatial, C]` image resampled to spatial `shape` (cubic spline by default).

  Args:
    image: `[*spatial, C]`.
    shape: the new spatial shape.
    axis: the coarse axis to resample apart at `coarse_order` (see `coarse_axis`), or None.
    order: spline order of the other axes.
    coarse_order: spline order along `axis` (0: nearest slice, as nnU-Net).
  """
  shape = tuple(int(s) for s in shape)
  if image.ndim != len(shape) + 1:
    raise ValueError(f'resample_image: image {image.shape} is not [*spatial, C] for {shape}')
  if image.shape[:-1] == shape:
    return image.astype(np.float32, copy=False)
  channels = [_resample_spatial(image[..., c].astype(np.float32), shape, axis, order, coarse_order)
              for c in range(image.shape[-1])]
  return np.stack(channels, -1).astype(np.float32)


def resample_labels(label: np.ndarray, shape: Sequence[int], axis: int | None = None, *,
                    method: str = 'linear', num_classes: int | None = None) -> np.ndarray:
  """An integer `[*spatial]` label map resampled to `shape`.

  Args:
    label: class ids `[*spatial]`.
    shape: the new spatial shape.
    axis: the coarse axis (nearest slice along it whatever `method`), or None.
    method: 'linear' (each class's one-hot map interpolated linearly, argmax kept) or 'nearest'.
    num_classes: classes to interpolate (default: max label + 1).
  """
  if method not in LABEL_METHODS:
    raise ValueError(f'resample_labels: method {method!r}, expected one of {LABEL_METHODS}')
  shape = tuple(int(s) for s in shape)
  if label.ndim != len(shape):
    raise ValueError(f'resample_labels: label {label.shape} is not [*spatial] for {shape}')
  if label.shape == shape:
    return label.astype(np.int32, copy=False)
  if method == 'nearest':
    return _resample_spatial(label.astype(np.int32), shape, None, 0, 0)
  k = int(num_classes or int(label.max(initial=0)) + 1)
  best = np.full(shape, -1.0, np.float32)
  out = np.zeros(shape, np.int32)
  for c in range(k):  # one class at a time: memory of two volumes, not K
    score = _resample_spatial((label == c).astype(np.float32), shape, axis, 1, 0)
    better = score > best
    out[better], best[better] = c, score[better]
  return out


def resample_probs(probs: np.ndarray, shape: Sequence[int], axis: int | None = None
                   ) -> np.ndarray:
  """Class probabilities `[*spatial, K]` to `shape`: linear per class (order 0 along `axis`),
  renormalised to sum to 1."""
  out = resample_image(probs, shape, axis, order=1, coarse_order=0)
  out = np.clip(out, 0.0, None)
  return out / np.maximum(out.sum(-1, keepdims=True), 1e-8)


def to_original(prediction: np.ndarray, geometry: Geometry) -> np.ndarray:
  """A prediction on the resampled grid brought back to the input's own grid.

  Args:
    prediction: probabilities `[*shape, K]` (float) or a label map `[*shape]` (integer).
    geometry: the example's `Geometry` (from `msd.read_case`).

  Returns:
    The same kind of array on `geometry.original_shape`.
  """
  rank = len(geometry.shape)
  spatial = prediction.shape[:rank]
  if spatial != geometry.shape:
    raise ValueError(f'to_original: prediction spatial shape {spatial} is not the resampled '
                     f'shape {geometry.shape}')
  if not geometry.resampled:
    return prediction
  if np.issubdtype(prediction.dtype, np.integer):
    if prediction.ndim != rank:
      raise ValueError(f'to_original: integer prediction {prediction.shape} must be a label map')
    return resample_labels(prediction, geometry.original_shape, geometry.coarse_axis)
  if prediction.ndim != rank + 1:
    raise ValueError(f'to_original: probabilities {prediction.shape} must be [*spatial, K]')
  return resample_probs(prediction, geometry.original_shape, geometry.coarse_axis)


def resampled_affine(affine: np.ndarray, shape: Sequence[int],
                     new_shape: Sequence[int]) -> np.ndarray:
  """The affine of `new_shape` voxels covering the same box as `shape` voxels of `affine`."""
  scale = np.asarray(shape, np.float64) / np.asarray(new_shape, np.float64)
  to_old = np.eye(4)
  to_old[:3, :3] = np.diag(scale)
  to_old[:3, 3] = 0.5 * scale - 0.5  # voxel centres: new i -> old (i + 0.5) * scale - 0.5
  return np.asarray(affine, np.float64) @ to_old
