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
  """Max over each block of the spatial axes (starting at axis 1) of `x`."""
  nd = len(spatial_shape)
  f = factors(x.shape[1:1 + nd], spatial_shape)
  window = (1,) + f + (1,) * (x.ndim - 1 - nd)
  return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, window, window,
                               'VALID')


def maxpool_onehot(onehot: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """Shrinks a `[B, *spatial, K]` one-hot target so that small structures survive.

  A block is foreground if any of its voxels is (class 0 = background only where no foreground
  is); blocks holding several foreground classes share the target between them, so every target
  still sums to 1 (or 0 where every voxel is ignored).
  """
  pooled = maxpool(onehot, spatial_shape)
  any_fg = jnp.max(pooled[..., 1:], axis=-1, keepdims=True)
  pooled = jnp.concatenate([pooled[..., :1] * (1.0 - any_fg), pooled[..., 1:]], axis=-1)
  return pooled / jnp.maximum(jnp.sum(pooled, axis=-1, keepdims=True), 1.0)
