"""Shrinking labels (or one-hot targets) to a DS head's resolution.

Used by the DS loss (`target='downsample'`) and by the per-head metrics, so that a head is trained
and scored against exactly the same label map. Arrays are channels-last batches: `[B, *spatial]`
for label maps, `[B, *spatial, K]` for one-hot targets.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

DOWNSAMPLE_METHODS = ('nearest', 'maxpool')


def factors(src: Sequence[int], dst: Sequence[int]) -> tuple[int, ...]:
  """Integer per-axis shrink factors from spatial shape `src` to `dst`; errors if not integer."""
  src, dst = tuple(src), tuple(dst)
  if len(src) != len(dst) or any(d <= 0 or s % d for s, d in zip(src, dst)):
    raise ValueError(f'cannot downsample spatial shape {src} to {dst}: every axis needs an '
                     'integer factor')
  return tuple(s // d for s, d in zip(src, dst))


def nearest(x: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """Nearest-neighbour shrink: keeps the voxel at each output voxel's centre (offset f // 2).

  `x` is `[B, *spatial]` or `[B, *spatial, K]`; spatial axes start at axis 1.
  """
  nd = len(spatial_shape)
  f = factors(x.shape[1:1 + nd], spatial_shape)
  index = (slice(None),) + tuple(slice(k // 2, None, k) for k in f)
  return x[index]


def maxpool(x: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """Max over each block of a `[B, *spatial, K]` one-hot target: small structures survive."""
  nd = len(spatial_shape)
  f = factors(x.shape[1:1 + nd], spatial_shape)
  window = (1,) + f + (1,) * (x.ndim - 1 - nd)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, 'VALID')
