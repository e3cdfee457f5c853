"""Which implementation runs each spatial op: `conv_impl` names, 'auto' resolution, routing.

The layers call `conv`, `conv_transpose`, `max_pool` and `resize` here with the configured
`conv_impl`; this module alone decides which of `xla_cpu`, `fused`, `upsampling`, `onednn` or the
native lax ops computes them. Every impl computes the same function (values and gradients), so
checkpoints move freely between them.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_ds.models.ops import common
from unet_ds.models.ops import fused
from unet_ds.models.ops import onednn
from unet_ds.models.ops import upsampling
from unet_ds.models.ops import xla_cpu

IMPLS = ('auto', 'native', 'native_einsum_up', 'cpu_fast', 'onednn')

dimension_numbers = common.dimension_numbers


def resolve_impl(impl: str) -> str:
  """Maps a configured `conv_impl` to a concrete one ('auto' picks by backend).

  - 'native': lax convolutions, transposed convolutions and `nn.max_pool` everywhere.
  - 'native_einsum_up': native convolutions, but transposed convolutions with kernel == stride
    (the U-Net's upsampling) as one einsum + reshape (`upsampling.conv_transpose`), exact. On an
    H100, cuDNN's strided transposed conv made the bench_ref step 35 ms; this form, 9.5 ms.
  - 'cpu_fast': convolutions through `xla_cpu` (XLA:CPU's 3D and input-dilated convolutions
    are slow), norm + activation and pools through `fused`.
  - 'onednn': as 'cpu_fast', but float32 convolutions and kernel == stride transposed
    convolutions (forward and both gradients) run as oneDNN primitives through XLA custom
    calls (`onednn`): ~2x faster kernel gradients than `xla_cpu`; so do float32 linear
    upsampling resizes.

  'auto' is 'onednn' on the CPU backend when it can be built here and one device runs the
  model (the custom call has no sharding rule), else 'cpu_fast'; 'native_einsum_up' on GPU/TPU.
  """
  if impl not in IMPLS:
    raise ValueError(f'conv_impl must be one of {IMPLS}, got {impl!r}')
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'native_einsum_up'
    return 'onednn' if jax.device_count() == 1 and onednn.available() else 'cpu_fast'
  if impl == 'onednn' and not onednn.available():
    raise ValueError(f'conv_impl=onednn is not available here: {onednn.unavailable_reason()}')
  return impl


def uses_fused_cpu_ops(impl: str) -> bool:
  """Whether `impl` (resolved) takes the fused CPU norm + activation and pool of `fused`."""
  return resolve_impl(impl) in ('cpu_fast', 'onednn')


def _onednn_takes(impl: str, x: jax.Array, kernel: jax.Array) -> bool:
  return impl == 'onednn' and x.dtype == kernel.dtype == jnp.float32


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], impl: str) -> jax.Array:
  """'SAME'-padded channels-last convolution, dispatched on `impl`."""
  impl = resolve_impl(impl)
  strides = tuple(strides)
  if _onednn_takes(impl, x, kernel):
    return onednn.conv(x, kernel, strides=strides, padding='SAME')
  if impl in ('cpu_fast', 'onednn'):
    return xla_cpu.conv(x, kernel, strides=strides, padding='SAME')
  return jax.lax.conv_general_dilated(x, kernel, strides, 'SAME',
                                      dimension_numbers=dimension_numbers(x.ndim - 2))


def conv_transpose(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   impl: str) -> jax.Array:
  """'VALID' transposed convolution (kernel not flipped, as flax's default)."""
  impl = resolve_impl(impl)
  strides = tuple(strides)
  kernel_is_stride = tuple(kernel.shape[:-2]) == strides
  if kernel_is_stride and _onednn_takes(impl, x, kernel):
    return onednn.conv_transpose(x, kernel, strides=strides)
  if impl in ('cpu_fast', 'onednn'):
    return xla_cpu.conv_transpose(x, kernel, strides=strides)
  if impl == 'native_einsum_up' and kernel_is_stride:
    return upsampling.conv_transpose(x, kernel, strides=strides)
  return jax.lax.conv_transpose(x, kernel, strides, 'VALID',
                                dimension_numbers=dimension_numbers(x.ndim - 2))


def max_pool(x: jax.Array, window: Sequence[int], impl: str) -> jax.Array:
  """Max pool with stride == window ('VALID'), as `nn.max_pool(x, window, strides=window)`."""
  window = tuple(window)
  if uses_fused_cpu_ops(impl):
    return fused.max_pool(x, window)
  return nn.max_pool(x, window, strides=window)


def _onednn_resizes(impl: str, x: jax.Array, spatial_shape: tuple[int, ...],
                    method: str) -> bool:
  # Upsampling only: jax antialiases when downsampling, oneDNN does not.
  upsampling = len(spatial_shape) == x.ndim - 2 and all(
      o >= i for o, i in zip(spatial_shape, x.shape[1:-1]))
  return (method == 'linear' and x.dtype == jnp.float32 and x.ndim in (4, 5) and upsampling
          and resolve_impl(impl) == 'onednn')


def resize(x: jax.Array, spatial_shape: Sequence[int], method: str = 'linear',
           impl: str = 'native') -> jax.Array:
  """Resizes the spatial dims of a channels-last batch `x` to `spatial_shape`.

  `jax.image.resize` contracts each axis with a dense (in, out) weight matrix; with impl
  'onednn', float32 linear upsampling runs oneDNN's resampling instead (2 taps per axis, the
  same function).
  """
  spatial_shape = tuple(int(s) for s in spatial_shape)
  if x.shape[1:-1] == spatial_shape:
    return x
  if _onednn_resizes(impl, x, spatial_shape, method):
    return onednn.resize_linear(x, spatial_shape)
  return jax.image.resize(x, (x.shape[0], *spatial_shape, x.shape[-1]), method=method)
