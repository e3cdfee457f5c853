"""The only place the U-Nets touch convolutions, transposed convolutions, pools and resizes.

The flax modules `Conv` and `ConvTranspose`, and the functional ops of `ops.dispatch`
(re-exported here, so the model code has one import): a backend-specific implementation is
swapped in by one config value, `conv_impl`, without touching the U-Net code. Parameters have the
same names and layouts as `flax.linen.Conv` / `ConvTranspose` (`kernel` as (*k, C_in, C_out),
`bias`), whatever the impl, so checkpoints move freely between implementations.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_ds.models.ops.dispatch import conv
from unet_ds.models.ops.dispatch import conv_transpose
from unet_ds.models.ops.dispatch import dimension_numbers
from unet_ds.models.ops.dispatch import IMPLS
from unet_ds.models.ops.dispatch import max_pool
from unet_ds.models.ops.dispatch import resize
from unet_ds.models.ops.dispatch import resolve_impl
from unet_ds.models.ops.dispatch import uses_fused_cpu_ops

__all__ = ['IMPLS', 'Conv', 'ConvTranspose', 'channels', 'conv', 'conv_transpose',
           'dimension_numbers', 'max_pool', 'per_axis', 'resize', 'resolve_impl',
           'uses_fused_cpu_ops']


# He-normal (kaiming_normal_, as PyTorch/MONAI): the blocks use (leaky) ReLU. Not truncated:
# XLA:CPU takes seconds to compile each truncated-normal draw, which dominated init.
_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def channels(x: jax.Array | Sequence[jax.Array]) -> int:
  """The channel count of an input given whole or as parts (see `Conv`)."""
  parts = tuple(x) if isinstance(x, (list, tuple)) else (x,)
  return sum(int(p.shape[-1]) for p in parts)


def per_axis(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  """A size given once for every axis, or per axis, as a per-axis tuple."""
  if isinstance(value, int):
    return (value,) * ndim
  value = tuple(int(v) for v in value)
  if len(value) != ndim:
    raise ValueError(f'{value}: needs {ndim} values, one per spatial axis')
  return value


class Conv(nn.Module):
  """N-d 'SAME' convolution; rank from the input, channels-last.

  `x` may be a sequence of parts, the channels of one input split in order: the conv of their
  concatenation, computed as the sum of each part's conv with its slice of the one kernel (same
  parameter). No concatenated copy is built, nor kept for the backward pass (the U-Net decoder's
  `[upsampled, skip]` input: its parts are kept anyway).
  """
  features: int
  kernel_size: int | tuple[int, ...] = 3  # one for every axis, or per axis
  strides: int | tuple[int, ...] = 1
  use_bias: bool = True
  impl: str = 'native'
  dtype: Any = None  # compute dtype (e.g. bfloat16); params stay float32.

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
    parts = tuple(x) if isinstance(x, (list, tuple)) else (x,)
    if len({(p.ndim, p.shape[:-1]) for p in parts}) != 1:
      raise ValueError(f'Conv: parts of one input must agree in all but the channel axis, got '
                       f'shapes {[p.shape for p in parts]}')
    ndim = parts[0].ndim - 2
    kernel = self.param('kernel', _KERNEL_INIT,
                        per_axis(self.kernel_size, ndim) + (channels(parts), self.features),
                        jnp.float32)
    dtype = self.dtype or parts[0].dtype
    strides = per_axis(self.strides, ndim)
    y, start = None, 0
    for part in parts:
      stop = start + part.shape[-1]
      y_part = conv(part.astype(dtype), kernel[..., start:stop, :].astype(dtype), strides,
                    self.impl)
      y, start = (y_part if y is None else y + y_part), stop
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(dtype)
    return y


class ConvTranspose(nn.Module):
  """N-d transposed convolution with kernel == stride (the U-Net's learned upsampling)."""
  features: int
  kernel_size: int | tuple[int, ...] = 2  # one for every axis, or per axis
  strides: int | tuple[int, ...] = 2
  impl: str = 'native'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ndim = x.ndim - 2
    kernel = self.param('kernel', _KERNEL_INIT,
                        per_axis(self.kernel_size, ndim) + (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    y = conv_transpose(x.astype(dtype), kernel.astype(dtype), per_axis(self.strides, ndim),
                       self.impl)
    return y + bias.astype(dtype)
