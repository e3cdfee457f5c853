"""Shape checks, dtype rules and the native conv shared by the op implementations."""

from __future__ import annotations

from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

Pads = tuple[tuple[int, int], ...]


def dimension_numbers(ndim: int) -> tuple[str, str, str]:
  """Channels-last conv dimension numbers for `ndim` spatial dims (1 to 3)."""
  if not 1 <= ndim <= 3:
    raise ValueError(f'only 1 to 3 spatial dims are supported, got {ndim}')
  sp = 'DHW'[3 - ndim:]
  return (f'N{sp}C', f'{sp}IO', f'N{sp}C')


def check_conv_args(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                    op: str) -> tuple[int, ...]:
  """Validates shapes before any compute; returns the strides as a tuple of ints."""
  if x.ndim not in (4, 5):
    raise ValueError(f'{op}: x must be [N, *spatial, C] with 2 or 3 spatial dims, '
                     f'got shape {x.shape}')
  if kernel.ndim != x.ndim:
    raise ValueError(f'{op}: kernel must be [*k, C_in, C_out] with the rank of x; '
                     f'got kernel {kernel.shape} for x {x.shape}')
  if kernel.shape[-2] != x.shape[-1]:
    raise ValueError(f'{op}: kernel C_in {kernel.shape[-2]} (kernel {kernel.shape}) != '
                     f'x channels {x.shape[-1]} (x {x.shape})')
  strides = tuple(int(s) for s in strides)
  if len(strides) != x.ndim - 2 or min(strides) < 1:
    raise ValueError(f'{op}: need one positive stride per spatial dim of x {x.shape}, '
                     f'got {strides}')
  return strides


def out_dtype(x: jax.Array, kernel: jax.Array) -> jnp.dtype:
  return jnp.result_type(x.dtype, kernel.dtype)


def acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
  # Accumulate partial sums in float32 at least so that low-precision results round once,
  # like the native op.
  return jnp.promote_types(dtype, jnp.float32)


def native_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Pads,
                preferred_element_type=None) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, strides, pads, dimension_numbers=dimension_numbers(x.ndim - 2),
      preferred_element_type=preferred_element_type)
