"""The only place the U-Nets touch convolutions, transposed convolutions and resizes.

Every spatial op of the model family goes through this module so that a backend-specific
implementation (e.g. the CPU fast path in `fast_ops`) can be swapped in by one config value,
`conv_impl`, without touching the U-Net code. Parameters have the same names and layouts as
`flax.linen.Conv` / `ConvTranspose` (`kernel` as (*k, C_in, C_out), `bias`), whatever the impl,
so checkpoints move freely between implementations.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_ds.models import fast_ops
from unet_ds.models import onednn

IMPLS = ('auto', 'native', 'native_einsum_up', 'cpu_fast', 'onednn')

# He-normal (kaiming_normal_, as PyTorch/MONAI): the blocks use (leaky) ReLU. Not truncated:
# XLA:CPU takes seconds to compile each truncated-normal draw, which dominated init.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def resolve_impl(impl: str) -> str:
  """Maps a configured `conv_impl` to a concrete one ('auto' picks by backend).

  - 'native': lax convolutions, transposed convolutions and `nn.max_pool` everywhere.
  - 'native_einsum_up': native convolutions, but transposed convolutions with kernel == stride
    (the U-Net's upsampling) as one einsum + reshape (`fast_ops.conv_transpose`), exact. On an
    H100, cuDNN's strided transposed conv made the bench_ref step 35 ms; this form, 9.5 ms.
  - 'cpu_fast': everything through `fast_ops` (XLA:CPU's 3D and input-dilated convolutions are
    slow; DESIGN.md §5).
  - 'onednn': as 'cpu_fast', but float32 convolutions and kernel == stride transposed
    convolutions (forward and both gradients) run as oneDNN primitives through XLA custom
    calls (`onednn`): ~2x faster kernel gradients than `fast_ops`.

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


def uses_fast_ops(impl: str) -> bool:
  """Whether `impl` (resolved) takes the CPU rewrites of `fast_ops` (pools, norms, upsampling)."""
  return resolve_impl(impl) in ('cpu_fast', 'onednn')


def dimension_numbers(ndim: int) -> tuple[str, str, str]:
  """Channels-last conv dimension numbers for `ndim` spatial dims (1 to 3)."""
  if not 1 <= ndim <= 3:
    raise ValueError(f'only 1 to 3 spatial dims are supported, got {ndim}')
  sp = 'DHW'[3 - ndim:]
  return (f'N{sp}C', f'{sp}IO', f'N{sp}C')


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], impl: str) -> jax.Array:
  """'SAME'-padded channels-last convolution, dispatched on `impl`."""
  impl = resolve_impl(impl)
  if impl == 'onednn' and x.dtype == kernel.dtype == jnp.float32:
    return onednn.conv(x, kernel, strides=tuple(strides), padding='SAME')
  if uses_fast_ops(impl):
    return fast_ops.conv(x, kernel, strides=tuple(strides), padding='SAME')
  return jax.lax.conv_general_dilated(
      x, kernel, tuple(strides), 'SAME',
      dimension_numbers=dimension_numbers(x.ndim - 2))


def conv_transpose(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                   impl: str) -> jax.Array:
  """'VALID' transposed convolution (kernel not flipped, as flax's default)."""
  impl = resolve_impl(impl)
  strides = tuple(strides)
  if (impl == 'onednn' and tuple(kernel.shape[:-2]) == strides
      and x.dtype == kernel.dtype == jnp.float32):
    return onednn.conv_transpose(x, kernel, strides=strides)
  if uses_fast_ops(impl) or (impl == 'native_einsum_up' and tuple(kernel.shape[:-2]) == strides):
    return fast_ops.conv_transpose(x, kernel, strides=strides)
  return jax.lax.conv_transpose(
      x, kernel, strides, 'VALID', dimension_numbers=dimension_numbers(x.ndim - 2))


def max_pool(x: jax.Array, window: Sequence[int], impl: str) -> jax.Array:
  """Max pool with stride == window ('VALID'), as `nn.max_pool(x, window, strides=window)`."""
  window = tuple(window)
  if uses_fast_ops(impl):
    return fast_ops.max_pool(x, window)
  return nn.max_pool(x, window, strides=window)


def resize(x: jax.Array, spatial_shape: Sequence[int], method: str = 'linear') -> jax.Array:
  """Resizes the spatial dims of a channels-last batch `x` to `spatial_shape`."""
  spatial_shape = tuple(int(s) for s in spatial_shape)
  if x.shape[1:-1] == spatial_shape:
    return x
  return jax.image.resize(x, (x.shape[0], *spatial_shape, x.shape[-1]), method=method)


class Conv(nn.Module):
  """N-d 'SAME' convolution; rank from the input, channels-last."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = True
  impl: str = 'native'
  dtype: Any = None  # compute dtype (e.g. bfloat16); params stay float32.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ndim = x.ndim - 2
    kernel = self.param('kernel', _KERNEL_INIT,
                        (self.kernel_size,) * ndim + (x.shape[-1], self.features), jnp.float32)
    dtype = self.dtype or x.dtype
    y = conv(x.astype(dtype), kernel.astype(dtype), (self.strides,) * ndim, self.impl)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(dtype)
    return y


class ConvTranspose(nn.Module):
  """N-d transposed convolution with kernel == stride (the U-Net's learned upsampling)."""
  features: int
  kernel_size: int = 2
  strides: int = 2
  impl: str = 'native'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ndim = x.ndim - 2
    kernel = self.param('kernel', _KERNEL_INIT,
                        (self.kernel_size,) * ndim + (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    y = conv_transpose(x.astype(dtype), kernel.astype(dtype), (self.strides,) * ndim, self.impl)
    return y + bias.astype(dtype)
