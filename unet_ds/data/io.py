"""Reading, checking, normalising and writing user images: NIfTI volumes and PNG/TIFF slices.

Every check raises `DataError` with the offending file in the message, so a bad case in a folder of
hundreds is found by name before any training starts. Arrays leave this module channels-last:
images float32 `[*spatial, C]`, labels int32 `[*spatial]` holding class ids 0..K-1.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os
from typing import Any

import nibabel
import numpy as np
from PIL import Image

NIFTI_SUFFIXES = ('.nii.gz', '.nii')
IMAGE2D_SUFFIXES = ('.png', '.tif', '.tiff')
NORMALIZATIONS = ('zscore', 'minmax', 'none')

LabelMap = Mapping[int, int]


class DataError(ValueError):
  """A user data file is missing, unreadable or inconsistent; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Volume:
  """A NIfTI file as read: the raw array plus what is needed to write a result back."""
  path: str
  array: np.ndarray
  affine: np.ndarray  # [4, 4]
  header: Any  # nibabel header, copied into predictions


def case_id(path: str | os.PathLike[str]) -> str:
  """File name without directory and image suffix ('a/b/hip_001.nii.gz' -> 'hip_001')."""
  name = os.path.basename(os.fspath(path))
  for suffix in NIFTI_SUFFIXES + IMAGE2D_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return os.path.splitext(name)[0]


def list_files(folder: str | os.PathLike[str], suffixes: Sequence[str]) -> list[str]:
  """Sorted files in `folder` with one of `suffixes`; hidden files ('._x' from macOS) skipped.

  Raises:
    DataError: the folder does not exist or holds no matching file.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise DataError(f'{folder}: folder not found')
  files = sorted(
      os.path.join(folder, f) for f in os.listdir(folder)
      if not f.startswith('.') and f.lower().endswith(tuple(suffixes)))
  if not files:
    raise DataError(f'{folder}: empty folder, no {"/".join(suffixes)} files')
  return files


def read_nifti(path: str | os.PathLike[str]) -> Volume:
  """Reads a NIfTI file fully (so a truncated .gz fails here, not mid-training)."""
  path = os.fspath(path)
  try:
    img = nibabel.load(path)
    array = np.asanyarray(img.dataobj)
  except Exception as e:  # nibabel raises many types for corrupt files
    raise DataError(f'{path}: cannot read NIfTI file ({type(e).__name__}: {e})') from e
  return Volume(path=path, array=np.asarray(array), affine=np.asarray(img.affine, np.float64),
                header=img.header)


IMAGE2D_KINDS = ('image', 'label')


def read_image2d(path: str | os.PathLike[str], kind: str = 'image') -> np.ndarray:
  """Reads a PNG/TIFF slice as `[H, W]` or `[H, W, C]` in its stored dtype.

  A palette ('P') file means colours for an image but class ids for a label: as `kind='image'` it
  is converted to the gray (`[H, W]`, when every used colour is gray) or RGB values it shows; as
  `kind='label'` it keeps its indices (masks are often stored that way).
  """
  path = os.fspath(path)
  if kind not in IMAGE2D_KINDS:
    raise ValueError(f'kind {kind!r}: expected one of {IMAGE2D_KINDS}')
  try:
    with Image.open(path) as img:
      if getattr(img, 'n_frames', 1) > 1:
        raise DataError(f'{path}: multi-page TIFF ({img.n_frames} pages); store one slice per file')
      img.load()
      if kind == 'image' and img.mode in ('P', 'PA'):
        array = np.array(img.convert('RGB'))
        if (array == array[..., :1]).all():
          array = array[..., 0]
      else:
        array = np.array(img)
  except DataError:
    raise
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for corrupt files
    raise DataError(f'{path}: cannot read image file ({type(e).__name__}: {e})') from e
  if array.ndim not in (2, 3):
    raise DataError(f'{path}: expected a 2D image, got array of shape {array.shape}')
  return array


def image_to_float(array: np.ndarray, path: str, spatial_rank: int) -> np.ndarray:
  """Casts an image (any int/float dtype) to float32 `[*spatial, C]`; rejects NaN/Inf.

  A rank-`spatial_rank` array gets a channel axis; one more axis is taken as channels (MSD stores
  multi-modal volumes as 4D `[X, Y, Z, C]`).
  """
  if array.ndim == spatial_rank + 2 and array.shape[spatial_rank] == 1:
    array = array[..., 0, :]  # [X, Y, Z, 1, C]: NIfTI's unused time axis
  if array.ndim == spatial_rank:
    array = array[..., None]
  if array.ndim != spatial_rank + 1:
    raise DataError(f'{path}: expected {spatial_rank}D image (+ channels), got shape {array.shape}')
  if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
    raise DataError(f'{path}: unsupported image dtype {array.dtype}')
  image = array.astype(np.float32)
  if not np.isfinite(image).all():
    bad = int(np.size(image) - np.isfinite(image).sum())
    raise DataError(f'{path}: image holds {bad} NaN/Inf values')
  return image


def parse_label_map(spec: str | LabelMap | Sequence[Sequence[int]] | None) -> dict[int, int] | None:
  """Label value -> class id, from `'0:1,255:0'`, a dict, or pairs; None/'' means identity."""
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return None
  try:
    if isinstance(spec, str):
      pairs = [item.split(':') for item in spec.replace(' ', '').split(',') if item]
    elif isinstance(spec, Mapping):
      pairs = list(spec.items())
    else:
      pairs = list(spec)
    mapping = {int(float(k)): int(v) for k, v in pairs}
  except (TypeError, ValueError) as e:
    raise ValueError(f'label_map {spec!r}: expected "value:class,..." ({e})') from e
  return mapping


def label_to_classes(array: np.ndarray, path: str, num_classes: int,
                     label_map: LabelMap | None = None) -> np.ndarray:
  """Casts a stored label (uint8, float, ...) to int32 class ids, checking every value.

  Raises:
    DataError: non-integral values, or values outside the mapping / outside 0..num_classes-1.
  """
  if np.issubdtype(array.dtype, np.floating):
    if not np.isfinite(array).all():
      raise DataError(f'{path}: label holds NaN/Inf values')
    rounded = np.rint(array)
    if np.abs(array - rounded).max(initial=0) > 1e-3:
      raise DataError(f'{path}: label holds non-integer values, e.g. '
                      f'{array[np.abs(array - rounded) > 1e-3].flat[0]}')
    array = rounded
  elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
    raise DataError(f'{path}: unsupported label dtype {array.dtype}')
  values = np.unique(array).astype(np.int64)
  if label_map is not None:
    unknown = [int(v) for v in values if int(v) not in label_map]
    if unknown:
      raise DataError(f'{path}: label values {unknown[:10]} not in label_map '
                      f'{dict(sorted(label_map.items()))}')
    lut_keys = np.array(sorted(label_map), np.int64)
    lut_vals = np.array([label_map[k] for k in lut_keys], np.int64)
    array = lut_vals[np.searchsorted(lut_keys, array.astype(np.int64))]
    values = np.unique(lut_vals[np.searchsorted(lut_keys, values)])
  outside = [int(v) for v in values if not 0 <= v < num_classes]
  if outside:
    raise DataError(f'{path}: label values {outside[:10]} outside the {num_classes} classes '
                    f'0..{num_classes - 1} (set data.num_classes or data.label_map)')
  return array.astype(np.int32)


def normalize(image: np.ndarray, method: str = 'zscore',
              clip_percentiles: Sequence[float] | None = None) -> np.ndarray:
  """Per-case, per-channel intensity normalisation of a float `[*spatial, C]` image.

  Args:
    image: float32 `[*spatial, C]`.
    method: 'zscore' (mean 0, std 1), 'minmax' (to [0, 1]) or 'none'.
    clip_percentiles: optional (low, high) percentiles, e.g. (0.5, 99.5), clipped to before
      normalising so a few extreme voxels do not squash the rest.
  """
  if method not in NORMALIZATIONS:
    raise ValueError(f'normalization {method!r}: expected one of {NORMALIZATIONS}')
  axes = tuple(range(image.ndim - 1))
  image = image.astype(np.float32, copy=True)
  if clip_percentiles:
    low, high = clip_percentiles
    if not 0 <= low < high <= 100:
      raise ValueError(f'clip_percentiles {clip_percentiles}: need 0 <= low < high <= 100')
    lo, hi = np.percentile(image, [low, high], axis=axes, keepdims=True)
    image = np.clip(image, lo, hi)
  if method == 'zscore':
    mean = image.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = image.std(axis=axes, keepdims=True, dtype=np.float64)
    image = (image - mean) / np.maximum(std, 1e-8)
  elif method == 'minmax':
    lo = image.min(axis=axes, keepdims=True)
    hi = image.max(axis=axes, keepdims=True)
    image = (image - lo) / np.maximum(hi - lo, 1e-8)
  return image.astype(np.float32)


def check_pair(image_path: str, label_path: str, image_shape: Sequence[int],
               label_shape: Sequence[int], image_affine: np.ndarray | None = None,
               label_affine: np.ndarray | None = None) -> None:
  """Image spatial shape must equal the label's; affines (NIfTI) must agree within 1e-3."""
  if tuple(image_shape) != tuple(label_shape):
    raise DataError(f'{label_path}: label shape {tuple(label_shape)} != image shape '
                    f'{tuple(image_shape)} of {image_path}')
  if image_affine is not None and label_affine is not None:
    if not np.allclose(image_affine, label_affine, rtol=1e-5, atol=1e-3):
      raise DataError(f'{label_path}: label affine differs from image {image_path}:\n'
                      f'{np.round(label_affine, 4)}\nvs\n{np.round(image_affine, 4)}')


def write_nifti(path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray,
                header: Any = None, dtype: np.dtype | type = np.uint8) -> None:
  """Writes `array` with the reference affine/header (dtype and scaling reset for `dtype`)."""
  header = header.copy() if header is not None else nibabel.Nifti1Header()
  array = np.asarray(array).astype(dtype)
  img = nibabel.Nifti1Image(array, np.asarray(affine, np.float64), header=header)
  img.set_data_dtype(dtype)
  img.header.set_slope_inter(1.0, 0.0)
  if array.ndim > 3:  # probabilities [X, Y, Z, K]: the header's dim fields follow the data
    img.header.set_intent('vector')
  nibabel.save(img, os.fspath(path))


def write_image2d(path: str | os.PathLike[str], array: np.ndarray) -> None:
  """Writes a 2D uint8/uint16 array as PNG (or TIFF, by suffix)."""
  array = np.asarray(array)
  if array.ndim != 2:
    raise ValueError(f'{path}: expected a 2D array, got shape {array.shape}')
  if array.max(initial=0) > 255 or array.dtype == np.uint16:
    array = array.astype(np.uint16)
  else:
    array = array.astype(np.uint8)
  Image.fromarray(array).save(os.fspath(path))
