"""Fixed-size patches from variable-size cases: padding, cropping, foreground-oversampled sampling.

Rank-agnostic: images are `[*spatial, C]`, labels `[*spatial]`, any number of spatial axes.
Foreground oversampling follows nnU-Net: in each batch, the last `B - round(B * (1 - fg_fraction))`
patches are forced to contain a voxel of a foreground class (class drawn uniformly among those
present in the case); the others are uniform random crops. The fraction therefore holds within
every batch (nnU-Net's `oversample_foreground_percent` rule), not only on average: with batch 2
and 1/3, one patch of every batch is centred on foreground. So that grain knows each example's
place in its batch, patches are cut (and augmented) in the batch function `PatchBatch`; each
example keeps its own seeded rng (`AttachSeed`), so batches are deterministic from the seed.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import itertools
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
                 fg_classes: Sequence[int] | None = None,
                 spatial: SpatialAugment | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One `patch_size` crop of (image `[*spatial, C]`, label `[*spatial]`).

  Args:
    image: float `[*spatial, C]`.
    label: int `[*spatial]`.
    patch_size: spatial patch shape; smaller cases are zero-padded (label 0) first.
    rng: numpy generator.
    foreground: contain a voxel of a random foreground class present in the case (uniform crop
      when the case has none).
    fg_classes: classes counting as foreground (default: every class > 0).
    spatial: a random rotation / scaling about the patch centre, drawn with `rng` (see
      `SpatialAugment`); the patch is then resampled from the whole case, not cut.

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
  matrix = spatial.draw(label.ndim, rng) if spatial is not None else None
  if matrix is None:
    return crop(image, start, patch_size), crop(label, start, patch_size)
  return _resample_patch(image, label, start, patch_size, matrix)


@dataclasses.dataclass(frozen=True)
class SpatialAugment:
  """nnU-Net's spatial augmentation, per patch: a rotation and a uniform scaling about the patch
  centre, each with its own probability.

  The rotation stays in `plane` (two axes of equal spacing: for thick-slice data the in-plane
  axes, so no slab is tilted into its neighbours), or with `plane=()` turns in every plane of the
  patch, each by its own angle (3D: about all three axes, nnU-Net's isotropic 3D rotation); the
  scaling acts on `scale_axes` (default
  every axis; thick-slice data: the in-plane ones, as nnU-Net's 2D augmentation of such data),
  and `scale` > 1 samples a larger region (zooms out). Images are resampled linearly, labels by
  nearest neighbour; outside the case is 0.
  """
  p_rotate: float = 0.2
  max_degrees: float = 30.0
  plane: tuple[int, ...] = (0, 1)  # () = every plane
  p_scale: float = 0.2
  scale: tuple[float, float] = (0.7, 1.4)
  scale_axes: tuple[int, ...] | None = None

  def __post_init__(self):
    if not (0 <= self.p_rotate <= 1 and 0 <= self.p_scale <= 1):
      raise ValueError(f'SpatialAugment: p_rotate={self.p_rotate}, p_scale={self.p_scale}, '
                       'need probabilities in 0..1')
    if not 0 < self.scale[0] <= self.scale[1]:
      raise ValueError(f'SpatialAugment: scale={self.scale}, need 0 < low <= high')
    if self.plane and (len(self.plane) != 2 or self.plane[0] == self.plane[1]
                       or min(self.plane) < 0):
      raise ValueError(f'SpatialAugment: plane={self.plane}, need two different axes or () for '
                       'every plane')

  def draw(self, ndim: int, rng: np.random.Generator) -> np.ndarray | None:
    """The `[ndim, ndim]` map from patch to case offsets, or None (no transform drawn)."""
    rotate, scale = rng.random() < self.p_rotate, rng.random() < self.p_scale
    if not (rotate or scale):
      return None
    if self.plane and max(self.plane) >= ndim:
      raise ValueError(f'SpatialAugment: plane {self.plane} is not two of the {ndim} axes')
    matrix = np.eye(ndim)
    if rotate:
      planes = [tuple(self.plane)] if self.plane else list(itertools.combinations(range(ndim), 2))
      for a, b in planes:
        angle = np.deg2rad(rng.uniform(-self.max_degrees, self.max_degrees))
        turn = np.eye(ndim)
        turn[[a, a, b, b], [a, b, a, b]] = (np.cos(angle), -np.sin(angle), np.sin(angle),
                                            np.cos(angle))
        matrix = turn @ matrix
    if scale:
      factors = np.ones(ndim)
      factors[list(range(ndim) if self.scale_axes is None else self.scale_axes)] = rng.uniform(
          *self.scale)
      matrix = matrix * factors[None, :]
    return matrix


def _resample_patch(image: np.ndarray, label: np.ndarray, start: Sequence[int],
                    patch_size: Sequence[int], matrix: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """The patch at `start`, its grid mapped by `matrix` about the patch centre (`sample_patch`)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  offsets = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in patch_size],
                                 indexing='ij')).reshape(len(patch_size), -1)
  centre = np.asarray([s + (n - 1) / 2 for s, n in zip(start, patch_size)])[:, None]
  coords = (centre + matrix @ offsets).reshape(len(patch_size), *patch_size)
  channels = [ndimage.map_coordinates(image[..., c], coords, order=1, mode='constant', cval=0.0)
              for c in range(image.shape[-1])]
  labels = ndimage.map_coordinates(label, coords, order=0, mode='constant', cval=0)
  return np.stack(channels, axis=-1).astype(np.float32), labels.astype(label.dtype)


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


def forced_foreground(batch_size: int, fg_fraction: float) -> list[bool]:
  """Which positions of a batch get a foreground-centred patch (nnU-Net's rule: the last ones)."""
  if not 0 <= fg_fraction <= 1:
    raise ValueError(f'fg_fraction={fg_fraction}, need 0..1')
  first = round(batch_size * (1 - fg_fraction))
  return [i >= first for i in range(batch_size)]


@dataclasses.dataclass(frozen=True)
class AttachSeed(grain.RandomMapTransform):
  """grain transform: adds `'seed'`, the example's own draw from grain's per-record rng."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return {**element, 'seed': int(rng.integers(2**63))}


@dataclasses.dataclass(frozen=True)
class PatchBatch:
  """grain `Batch(batch_fn=...)`: a patch per example (foreground by batch position), then
  `transforms` (e.g. augmentations) with the example's rng, stacked into a batch.

  Examples come from `AttachSeed`: `{'image': [*spatial, C], 'label': [*spatial], 'seed'}`.
  Output: `{'image': float32 [B, *patch, C], 'label': int32 [B, *patch]}`.

  Attributes:
    patch_size: spatial patch shape.
    fg_fraction: fraction of each batch forced onto foreground (nnU-Net: 1/3).
    fg_classes: classes counting as foreground (None: all > 0).
    transforms: grain Map/RandomMap transforms applied to each patch.
    spatial: rotation / scaling drawn per patch as it is cut (None: plain crops).
  """
  patch_size: tuple[int, ...]
  fg_fraction: float = 1 / 3
  fg_classes: tuple[int, ...] | None = None
  transforms: tuple[grain.Transformation, ...] = ()
  spatial: SpatialAugment | None = None

  def __post_init__(self):
    forced_foreground(1, self.fg_fraction)  # validates
    if not self.patch_size or min(self.patch_size) < 1:
      raise ValueError(f'PatchBatch: patch_size={self.patch_size}, need positive sizes')

  def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = []
    for element, foreground in zip(elements, forced_foreground(len(elements), self.fg_fraction)):
      rng = np.random.default_rng(element['seed'])
      image, label = sample_patch(element['image'], element['label'], self.patch_size, rng,
                                  foreground=foreground, fg_classes=self.fg_classes,
                                  spatial=self.spatial)
      example = {'image': np.asarray(image, np.float32), 'label': np.asarray(label, np.int32)}
      for t in self.transforms:
        example = (t.random_map(example, rng) if isinstance(t, grain.RandomMapTransform)
                   else t.map(example))
      out.append(example)
    return {key: np.stack([e[key] for e in out]) for key in ('image', 'label')}


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
