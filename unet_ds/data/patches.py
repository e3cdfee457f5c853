"""Fixed-size patches from variable-size cases: padding, cropping, foreground-oversampled sampling.

Rank-agnostic: images are `[*spatial, C]`, labels `[*spatial]`, any number of spatial axes.
Foreground oversampling follows nnU-Net: a patch is forced, with probability `fg_fraction`, to
contain a voxel of a foreground class (class drawn uniformly among those present in the case);
otherwise it is a uniform random crop. Per-example draws (grain hands each example its own rng),
so the fraction holds on average over batches rather than exactly within each one.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import grain.python as grain
import numpy as np


def pad_to_at_least(array: np.ndarray, shape: Sequence[int], *, value: float = 0
                    ) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
  """Pads the leading `len(shape)` axes to at least `shape`, centred; returns (array, pads)."""
  rank = len(shape)
  pads = []
  for size, target in zip(array.shape[:rank], shape):
    extra = max(int(target) - size, 0)
    pads.append((extra // 2, extra - extra // 2))
  pads += [(0, 0)] * (array.ndim - rank)
  if any(p != (0, 0) for p in pads):
    array = np.pad(array, pads, mode='constant', constant_values=value)
  return array, tuple(pads[:rank])


def crop(array: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
  """`array[start : start + shape]` over the leading axes."""
  return array[tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, shape))]


def center_pad_crop(example: dict[str, Any], shape: Sequence[int]) -> dict[str, Any]:
  """Pads (zeros, label 0) and centre-crops `image`/`label` to exactly `shape`; drops other keys.

  For fixed-shape evaluation batches; whole-volume metrics need `inference.sliding_window_predict`.
  """
  image, _ = pad_to_at_least(example['image'], shape)
  label, _ = pad_to_at_least(example['label'], shape)
  start = [(size - n) // 2 for size, n in zip(label.shape, shape)]
  return {'image': np.ascontiguousarray(crop(image, start, shape)),
          'label': np.ascontiguousarray(crop(label, start, shape))}


def sample_patch(image: np.ndarray, label: np.ndarray, patch_size: Sequence[int],
                 rng: np.random.Generator, *, foreground: bool,
                 fg_classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One `patch_size` crop of (image `[*spatial, C]`, label `[*spatial]`).

  Args:
    image: float `[*spatial, C]`.
    label: int `[*spatial]`.
    patch_size: spatial patch shape; smaller cases are zero-padded (label 0) first.
    rng: numpy generator.
    foreground: contain a voxel of a random foreground class present in the case (uniform crop
      when the case has none).
    fg_classes: classes counting as foreground (default: every class > 0).

  Returns:
    (image patch `[*patch_size, C]`, label patch `[*patch_size]`).
  """
  if label.shape != image.shape[:-1] or len(patch_size) != label.ndim:
    raise ValueError(f'sample_patch: image {image.shape} / label {label.shape} / patch_size '
                     f'{tuple(patch_size)} disagree (need image [*spatial, C], label [*spatial])')
  image, _ = pad_to_at_least(image, patch_size)
  label, _ = pad_to_at_least(label, patch_size)
  high = [size - n for size, n in zip(label.shape, patch_size)]
  centre = _foreground_voxel(label, rng, fg_classes) if foreground else None
  if centre is None:
    start = [int(rng.integers(0, h + 1)) for h in high]
  else:  # the voxel at the patch centre, shifted inward at the borders
    start = [int(np.clip(c - n // 2, 0, h)) for c, n, h in zip(centre, patch_size, high)]
  return crop(image, start, patch_size), crop(label, start, patch_size)


def _foreground_voxel(label: np.ndarray, rng: np.random.Generator,
                      fg_classes: Sequence[int] | None) -> tuple[int, ...] | None:
  counts = np.bincount(label.ravel(), minlength=1)
  present = [c for c in range(1, len(counts)) if counts[c]]
  if fg_classes is not None:
    present = [c for c in present if c in fg_classes]
  if not present:
    return None
  cls = present[int(rng.integers(len(present)))]
  flat = np.flatnonzero(label.ravel() == cls)
  return np.unravel_index(int(flat[int(rng.integers(len(flat)))]), label.shape)


@dataclasses.dataclass(frozen=True)
class RandomPatch(grain.RandomMapTransform):
  """grain transform: `{'image', 'label', ...}` -> `{'image': [*patch, C], 'label': [*patch]}`.

  Attributes:
    patch_size: spatial patch shape.
    fg_fraction: probability that a patch is forced to contain foreground (nnU-Net: 1/3).
    fg_classes: classes counting as foreground (None: all > 0).
  """
  patch_size: tuple[int, ...]
  fg_fraction: float = 1 / 3
  fg_classes: tuple[int, ...] | None = None

  def __post_init__(self):
    if not 0 <= self.fg_fraction <= 1:
      raise ValueError(f'RandomPatch: fg_fraction={self.fg_fraction}, need 0..1')
    if not self.patch_size or min(self.patch_size) < 1:
      raise ValueError(f'RandomPatch: patch_size={self.patch_size}, need positive sizes')

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    foreground = bool(rng.random() < self.fg_fraction)
    image, label = sample_patch(element['image'], element['label'], self.patch_size, rng,
                                foreground=foreground, fg_classes=self.fg_classes)
    return {'image': np.ascontiguousarray(image, np.float32),
            'label': np.ascontiguousarray(label, np.int32)}


@dataclasses.dataclass(frozen=True)
class CenterPadCrop(grain.MapTransform):
  """grain transform: deterministic `center_pad_crop` to `shape` (eval on fixed shapes)."""
  shape: tuple[int, ...]

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return center_pad_crop(element, self.shape)


class PadCropSource:
  """Random-access view of a source with every example `center_pad_crop`ped to `shape`.

  Gives the fixed-shape `{'image', 'label'}` examples that eval batching needs from variable-size
  cases; choose `shape` >= every case to score whole images (the padding is background).
  """

  def __init__(self, source: Sequence[dict[str, Any]], shape: Sequence[int]):
    self._source = source
    self._shape = tuple(int(s) for s in shape)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return center_pad_crop(self._source[index], self._shape)

  def __repr__(self) -> str:
    return f'PadCropSource({self._source!r}, {self._shape})'
