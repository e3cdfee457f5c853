"""Random augmentations as grain transforms; every draw comes from grain's per-example rng.

grain derives each example's rng from the loader seed and the example's position, so a run is
reproducible from its seed (and resumable: the rng does not depend on what came before).
Elements are `{'image': float [*spatial, C], 'label': int [*spatial]}`; spatial transforms move
image and label together; intensity transforms touch only the image.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import grain.python as grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.RandomMapTransform):
  """Flips each of `axes` (spatial axis indices) independently with probability `p`."""
  axes: tuple[int, ...]
  p: float = 0.5

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    _check_axes(self.axes, element['label'].ndim, 'RandomFlip')
    flip = tuple(a for a in self.axes if rng.random() < self.p)
    if not flip:
      return element
    return {**element, 'image': np.flip(element['image'], flip),
            'label': np.flip(element['label'], flip)}


@dataclasses.dataclass(frozen=True)
class RandomRot90(grain.RandomMapTransform):
  """Rotates by k * 90 degrees in the plane of `axes` (two spatial axes), k uniform in 0..3.

  With a non-square plane only k in {0, 2} is drawn, so the shape never changes.
  """
  axes: tuple[int, int] = (0, 1)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    _check_axes(self.axes, element['label'].ndim, 'RandomRot90')
    label = element['label']
    square = label.shape[self.axes[0]] == label.shape[self.axes[1]]
    k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
    if k == 0:
      return element
    return {**element, 'image': np.rot90(element['image'], k, self.axes),
            'label': np.rot90(label, k, self.axes)}


@dataclasses.dataclass(frozen=True)
class RandomIntensity(grain.RandomMapTransform):
  """With probability `p`: image * U(1-scale, 1+scale) + U(-shift, shift), one draw per example."""
  scale: float = 0.1
  shift: float = 0.1
  p: float = 0.5

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.p:
      return element
    a = rng.uniform(1 - self.scale, 1 + self.scale)
    b = rng.uniform(-self.shift, self.shift)
    return {**element, 'image': (element['image'] * a + b).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class GaussianNoise(grain.RandomMapTransform):
  """With probability `p`: adds N(0, sigma^2) noise, sigma ~ U(0, max_sigma), or with `variance`
  sigma^2 ~ U(0, max_sigma^2) (nnU-Net's draw: p 0.1, variance up to 0.1)."""
  max_sigma: float = 0.1
  p: float = 0.15
  variance: bool = False

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.p:
      return element
    image = element['image']
    sigma = (np.sqrt(rng.uniform(0, self.max_sigma ** 2)) if self.variance
             else rng.uniform(0, self.max_sigma))
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return {**element, 'image': (image + noise).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class GaussianBlur(grain.RandomMapTransform):
  """With probability `p`: each channel, with probability `p_channel`, blurred by a Gaussian of
  its own sigma ~ U(`sigma`) voxels along every axis (nnU-Net: p 0.2, 0.5, 0.5-1)."""
  sigma: tuple[float, float] = (0.5, 1.0)
  p: float = 0.2
  p_channel: float = 0.5

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.p:
      return element
    from scipy import ndimage  # pylint: disable=g-import-not-at-top
    image = np.array(element['image'], np.float32)
    for c in range(image.shape[-1]):
      if rng.random() < self.p_channel:
        image[..., c] = ndimage.gaussian_filter(image[..., c], rng.uniform(*self.sigma))
    return {**element, 'image': image}


@dataclasses.dataclass(frozen=True)
class Brightness(grain.RandomMapTransform):
  """With probability `p`: image * U(`factor`) (nnU-Net's multiplicative brightness: p 0.15)."""
  factor: tuple[float, float] = (0.75, 1.25)
  p: float = 0.15

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.p:
      return element
    return {**element, 'image': (element['image'] * rng.uniform(*self.factor)).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Contrast(grain.RandomMapTransform):
  """With probability `p`: each channel's deviation from its mean scaled by U(`factor`), then
  clipped to the channel's former range (nnU-Net: p 0.15, 0.75-1.25, range preserved)."""
  factor: tuple[float, float] = (0.75, 1.25)
  p: float = 0.15

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.p:
      return element
    image = element['image']
    axes = tuple(range(image.ndim - 1))
    mean = image.mean(axis=axes, keepdims=True)
    out = (image - mean) * rng.uniform(*self.factor) + mean
    out = np.clip(out, image.min(axis=axes, keepdims=True), image.max(axis=axes, keepdims=True))
    return {**element, 'image': out.astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class SimulateLowResolution(grain.RandomMapTransform):
  """With probability `p`: each channel, with probability `p_channel`, downsampled by a zoom
  ~ U(`zoom`) (nearest) and upsampled back (cubic), along every axis but `keep_axes` (thick-slice
  data: the coarse one). nnU-Net: p 0.25, 0.5, zoom 0.5-1."""
  zoom: tuple[float, float] = (0.5, 1.0)
  p: float = 0.25
  p_channel: float = 0.5
  keep_axes: tuple[int, ...] = ()

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.p:
      return element
    from scipy import ndimage  # pylint: disable=g-import-not-at-top
    image = np.array(element['image'], np.float32)
    shape = image.shape[:-1]
    _check_axes(self.keep_axes, len(shape), 'SimulateLowResolution')
    for c in range(image.shape[-1]):
      if rng.random() >= self.p_channel:
        continue
      zoom = rng.uniform(*self.zoom)
      small = tuple(n if a in self.keep_axes else max(1, round(n * zoom))
                    for a, n in enumerate(shape))
      coarse = ndimage.zoom(image[..., c], [m / n for m, n in zip(small, shape)], order=0,
                            grid_mode=True, mode='nearest')
      image[..., c] = ndimage.zoom(coarse, [n / m for m, n in zip(coarse.shape, shape)], order=3,
                                   grid_mode=True, mode='nearest')
    return {**element, 'image': image}


@dataclasses.dataclass(frozen=True)
class Gamma(grain.RandomMapTransform):
  """With probability `p`: each channel mapped through a gamma curve on its own range, then
  given back its mean and standard deviation; `invert` applies it to the negated image (nnU-Net:
  p 0.3, and p 0.1 inverted; gamma 0.7-1 or 1-1.5, either side with probability 1/2)."""
  gamma: tuple[float, float] = (0.7, 1.5)
  p: float = 0.3
  invert: bool = False

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.p:
      return element
    low, high = self.gamma
    gamma = rng.uniform(low, 1.0) if low < 1 and rng.random() < 0.5 else rng.uniform(
        max(low, 1.0), high)
    image = -element['image'] if self.invert else element['image']
    axes = tuple(range(image.ndim - 1))
    mean, sd = image.mean(axis=axes), image.std(axis=axes)
    lo = image.min(axis=axes)
    span = image.max(axis=axes) - lo
    out = ((image - lo) / (span + 1e-7)) ** gamma * span + lo
    out = (out - out.mean(axis=axes)) / (out.std(axis=axes) + 1e-8) * sd + mean
    return {**element, 'image': (-out if self.invert else out).astype(np.float32)}


INTENSITY = ('basic', 'nnunet')


def nnunet_intensity(keep_axes: Sequence[int] = ()) -> tuple[grain.Transformation, ...]:
  """nnU-Net's intensity augmentations in its order: noise (variance up to 0.1, p 0.1), blur,
  brightness, contrast, low-resolution simulation (not along `keep_axes`), inverted gamma, gamma."""
  return (GaussianNoise(max_sigma=float(np.sqrt(0.1)), p=0.1, variance=True), GaussianBlur(),
          Brightness(), Contrast(), SimulateLowResolution(keep_axes=tuple(keep_axes)),
          Gamma(p=0.1, invert=True), Gamma())


@dataclasses.dataclass(frozen=True)
class Contiguous(grain.MapTransform):
  """Copies flipped/rotated views into contiguous float32/int32 arrays (cheaper batching)."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {**element, 'image': np.ascontiguousarray(element['image'], np.float32),
            'label': np.ascontiguousarray(element['label'], np.int32)}


def make_augmentations(spatial_rank: int, *, flip_axes: Sequence[int] | None = None,
                       rot90_axes: Sequence[int] | None = None, intensity_scale: float = 0.1,
                       intensity_shift: float = 0.1, intensity_p: float = 0.5,
                       noise_sigma: float = 0.1, noise_p: float = 0.15,
                       intensity: str = 'basic', keep_axes: Sequence[int] = ()
                       ) -> tuple[grain.Transformation, ...]:
  """The default chain: flips, in-plane 90 degree rotations, intensity scale/shift, noise.

  Args:
    spatial_rank: 2 or 3.
    flip_axes: spatial axes to flip (default: all); () disables flips.
    rot90_axes: the rotation plane (default: the first two axes); () disables rotations.
    intensity_scale, intensity_shift, intensity_p: `RandomIntensity` settings (p=0 disables).
    noise_sigma, noise_p: `GaussianNoise` settings (p=0 disables).
    intensity: 'basic' (the scale/shift and noise above) or 'nnunet' (`nnunet_intensity` in
      their place).
    keep_axes: with 'nnunet', axes the low-resolution simulation leaves alone.
  """
  if intensity not in INTENSITY:
    raise ValueError(f'intensity augmentation {intensity!r}: one of {INTENSITY}')
  flip_axes = tuple(range(spatial_rank)) if flip_axes is None else tuple(flip_axes)
  rot90_axes = (0, 1) if rot90_axes is None else tuple(rot90_axes)
  for axis in (*flip_axes, *rot90_axes):
    if not 0 <= axis < spatial_rank:
      raise ValueError(f'augmentation axis {axis} outside the {spatial_rank} spatial axes')
  out: list[grain.Transformation] = []
  if flip_axes:
    out.append(RandomFlip(flip_axes))
  if rot90_axes:
    if len(rot90_axes) != 2 or rot90_axes[0] == rot90_axes[1]:
      raise ValueError(f'rot90_axes={rot90_axes}: need two different spatial axes')
    out.append(RandomRot90(rot90_axes))
  if intensity == 'nnunet':
    out.extend(nnunet_intensity(keep_axes))
  else:
    if intensity_p > 0:
      out.append(RandomIntensity(intensity_scale, intensity_shift, intensity_p))
    if noise_p > 0:
      out.append(GaussianNoise(noise_sigma, noise_p))
  out.append(Contiguous())
  return tuple(out)


def _check_axes(axes: Sequence[int], rank: int, name: str) -> None:
  if any(not 0 <= a < rank for a in axes):
    raise ValueError(f'{name}: axes {tuple(axes)} outside the {rank} spatial axes')
