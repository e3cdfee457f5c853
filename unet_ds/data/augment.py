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
  """With probability `p`: adds N(0, sigma^2) noise, sigma ~ U(0, max_sigma) (nnU-Net: p=0.1)."""
  max_sigma: float = 0.1
  p: float = 0.15

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() >= self.p:
      return element
    image = element['image']
    sigma = rng.uniform(0, self.max_sigma)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return {**element, 'image': (image + noise).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Contiguous(grain.MapTransform):
  """Copies flipped/rotated views into contiguous float32/int32 arrays (cheaper batching)."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {**element, 'image': np.ascontiguousarray(element['image'], np.float32),
            'label': np.ascontiguousarray(element['label'], np.int32)}


def make_augmentations(spatial_rank: int, *, flip_axes: Sequence[int] | None = None,
                       rot90_axes: Sequence[int] | None = None, intensity_scale: float = 0.1,
                       intensity_shift: float = 0.1, intensity_p: float = 0.5,
                       noise_sigma: float = 0.1, noise_p: float = 0.15
                       ) -> tuple[grain.Transformation, ...]:
  """The default chain: flips, in-plane 90 degree rotations, intensity scale/shift, noise.

  Args:
    spatial_rank: 2 or 3.
    flip_axes: spatial axes to flip (default: all); () disables flips.
    rot90_axes: the rotation plane (default: the first two axes); () disables rotations.
    intensity_scale, intensity_shift, intensity_p: `RandomIntensity` settings (p=0 disables).
    noise_sigma, noise_p: `GaussianNoise` settings (p=0 disables).
  """
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
  if intensity_p > 0:
    out.append(RandomIntensity(intensity_scale, intensity_shift, intensity_p))
  if noise_p > 0:
    out.append(GaussianNoise(noise_sigma, noise_p))
  out.append(Contiguous())
  return tuple(out)


def _check_axes(axes: Sequence[int], rank: int, name: str) -> None:
  if any(not 0 <= a < rank for a in axes):
    raise ValueError(f'{name}: axes {tuple(axes)} outside the {rank} spatial axes')
