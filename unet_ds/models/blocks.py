"""Rank-agnostic U-Net building blocks: conv-norm-act, plain and residual conv blocks, and the
pre-activation residual stage and 3x3 'SAME' transposed conv of the Kaggle TGS salt U-Net."""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_ds.models import layers
from unet_ds.models.ops import fused

NORMS = ('instance', 'group', 'batch', 'none')
BLOCKS = ('conv', 'preact_residual')  # `model.block`: ConvBlock | PreActResidualStage
ACTIVATIONS = ('relu', 'leaky_relu')
_NEGATIVE_SLOPES = {'relu': 0.0, 'leaky_relu': 0.01}  # leaky: nnU-Net's slope


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name == 'relu':
    return nn.relu
  if name == 'leaky_relu':
    return lambda x: nn.leaky_relu(x, negative_slope=_NEGATIVE_SLOPES[name])
  raise ValueError(f'activation must be one of {ACTIVATIONS}, got {name!r}')


class Norm(nn.Module):
  """Instance / group / batch norm (or identity) over the channels-last axis."""
  kind: str
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.kind == 'instance':
      return nn.InstanceNorm(dtype=self.dtype)(x)
    if self.kind == 'group':
      channels = x.shape[-1]
      # 8 groups where possible (GroupNorm paper's default is 32; U-Net widths here are small).
      groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
      return nn.GroupNorm(num_groups=groups, dtype=self.dtype)(x)
    if self.kind == 'batch':
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    if self.kind == 'none':
      return x
    raise ValueError(f'norm must be one of {NORMS}, got {self.kind!r}')


class _InstanceNormParams(nn.Module):
  """The scale and bias of `nn.InstanceNorm`, under the same names."""

  @nn.compact
  def __call__(self, channels: int) -> tuple[jax.Array, jax.Array]:
    return (self.param('scale', nn.initializers.ones, (channels,), jnp.float32),
            self.param('bias', nn.initializers.zeros, (channels,), jnp.float32))


def backward_after_cotangent(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`fn` with the same values and gradients, whose backward pass cannot start before the
  cotangent of its output exists.

  For cheap ops on large tensors (a norm): otherwise XLA:CPU's scheduler computes the parts of
  their backward that need no cotangent (the normalised input) right in the forward pass and keeps
  them live, beside the input, until the backward reaches the op (3D bench_ref: 6 extra
  full-resolution tensors at the step's peak). Here the backward reads `fn`'s saved residuals
  through a data dependency on the cotangent (plus 0 times one of its elements, fused into the
  readers). XLA:CPU drops optimization barriers before scheduling, so a barrier would not hold.
  """
  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def forward(*args):
    return jax.vjp(fn, *args)  # (output, residuals: fn's own, as a pytree)

  def backward(vjp_fn, cotangent):
    zero = cotangent.reshape(-1)[0] * 0  # NaN/inf there would make the whole gradient NaN anyway
    late = lambda a: a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a  # noqa
    return jax.tree.map(late, vjp_fn)(cotangent)

  wrapped.defvjp(forward, backward)
  return wrapped


class InstanceNormAct(nn.Module):
  """`activation(Norm('instance')(x))` as one fused op (`fused.instance_norm_act`).

  Same values, gradients and parameter tree as `Norm('instance')` and then `activation(act)`
  when used under the same name (checkpoints move between the two). Its backward waits for the
  output's cotangent (`backward_after_cotangent`), so it keeps `x` and not also `x` normalised.
  """
  act: str | None = 'leaky_relu'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.act is not None and self.act not in ACTIVATIONS:
      raise ValueError(f'activation must be one of {ACTIVATIONS}, got {self.act!r}')
    scale, bias = _InstanceNormParams(name='InstanceNorm_0')(x.shape[-1])
    slope = None if self.act is None else _NEGATIVE_SLOPES[self.act]
    norm_act = functools.partial(fused.instance_norm_act, negative_slope=slope, dtype=self.dtype)
    return backward_after_cotangent(norm_act)(x, scale, bias)


class ConvNormAct(nn.Module):
  """conv -> norm -> activation (activation optional for residual branches)."""
  features: int
  kernel_size: int | tuple[int, ...] = 3  # one for every axis, or per axis
  strides: int | tuple[int, ...] = 1
  norm: str = 'instance'
  act: str | None = 'leaky_relu'
  impl: str = 'native'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array], train: bool) -> jax.Array:
    # A bias before a normalisation is redundant.
    x = layers.Conv(self.features, self.kernel_size, self.strides, use_bias=self.norm == 'none',
                    impl=self.impl, dtype=self.dtype)(x)
    return norm_act(x, self.norm, self.act, self.impl, self.dtype, train)


def norm_act(x: jax.Array, norm: str, act: str | None, impl: str, dtype: Any, train: bool,
             name: str = 'Norm_0') -> jax.Array:
  """norm -> activation as submodule `name` of the calling (compact) module; instance norm is
  fused with the activation on the CPU paths, with the same parameters as `Norm`."""
  if norm == 'instance' and layers.uses_fused_cpu_ops(impl):
    # XLA:CPU runs the unfused norm and activation as several passes over the volume.
    return InstanceNormAct(act, dtype, name=name)(x)
  x = Norm(norm, dtype=dtype, name=name)(x, train)
  return activation(act)(x) if act else x


class ConvBlock(nn.Module):
  """`num_convs` conv-norm-act layers, optionally residual, optionally strided first.

  The residual form is the pre-addition one used by nnU-Net's ResEnc and MONAI's
  UnetResBlock: the last conv's activation is applied after adding the (projected) input.
  """
  features: int
  num_convs: int = 2
  strides: int = 1
  residual: bool = False
  norm: str = 'instance'
  act: str = 'leaky_relu'
  dropout: float = 0.0
  impl: str = 'native'
  dtype: Any = None
  kernel_size: int | tuple[int, ...] = 3  # one for every axis, or per axis (1 on a coarse axis)

  @nn.compact
  def __call__(self, x: jax.Array | Sequence[jax.Array], train: bool) -> jax.Array:
    """`x`: one input, or its channel parts in order (`layers.Conv`: never concatenated)."""
    shortcut = x
    for i in range(self.num_convs):
      last = i == self.num_convs - 1
      x = ConvNormAct(self.features, self.kernel_size, self.strides if i == 0 else 1, self.norm,
                      None if (self.residual and last) else self.act,
                      self.impl, self.dtype)(x, train)
      if i == 0 and self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.residual:
      if layers.channels(shortcut) != self.features or self.strides != 1:
        shortcut = ConvNormAct(self.features, 1, self.strides, self.norm, None,
                               self.impl, self.dtype)(shortcut, train)
      x = activation(self.act)(x + shortcut)
    return x


class NormAct(nn.Module):
  """norm -> activation (the "BatchActivate" of pre-activation blocks)."""
  norm: str = 'batch'
  act: str = 'relu'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return activation(self.act)(Norm(self.norm, dtype=self.dtype)(x, train))


class PreActResidualUnit(nn.Module):
  """`x + conv(norm-act(conv(norm-act(x))))`, optionally then norm-act (He et al. 2016's
  identity-mapping unit). Convs carry a bias, as in the Keras original; widths are unchanged."""
  features: int
  norm: str = 'batch'
  act: str = 'relu'
  post_act: bool = False
  impl: str = 'native'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if x.shape[-1] != self.features:
      raise ValueError(f'PreActResidualUnit: input has {x.shape[-1]} channels, the unit '
                       f'{self.features} (identity skip)')
    y = NormAct(self.norm, self.act, self.dtype)(x, train)
    y = layers.Conv(self.features, 3, impl=self.impl, dtype=self.dtype)(y)
    y = NormAct(self.norm, self.act, self.dtype)(y, train)
    y = layers.Conv(self.features, 3, impl=self.impl, dtype=self.dtype)(y)
    x = x + y.astype(x.dtype)
    return NormAct(self.norm, self.act, self.dtype)(x, train) if self.post_act else x


class PreActResidualStage(nn.Module):
  """One U-Net level of the TGS salt kernel: a 3x3 conv (bias, no activation; strided when it
  downsamples) to `features`, then `num_units` pre-activation residual units, the last one
  ending in norm-act so the level's output is activated."""
  features: int
  num_units: int = 2
  strides: int = 1
  norm: str = 'batch'
  act: str = 'relu'
  impl: str = 'native'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.Conv(self.features, 3, self.strides, impl=self.impl, dtype=self.dtype)(x)
    for i in range(self.num_units):
      x = PreActResidualUnit(self.features, self.norm, self.act, i == self.num_units - 1,
                             self.impl, self.dtype)(x, train)
    return x


# Sub-pixel form of a 3-wide stride-2 transposed conv, per axis: output phase r (voxel 2m + r)
# reads input taps (x[m-1], x[m]) with these indices into the kernel padded by one zero in front
# (0 = no contribution): even outputs take K[0] and K[2], odd ones K[1] alone.
_PHASE_TAPS = ((1, 3), (0, 2))
_HE_NORMAL = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')  # as layers' kernels


class SameConvTranspose(nn.Module):
  """Stride-2 transposed conv with a 3-wide kernel and TF/Keras 'SAME' padding (output 2n), as
  `lax.conv_transpose(x, kernel, 2, 'SAME')`: the Keras `Conv2DTranspose(3, strides=2,
  padding='same')` of the TGS salt U-Net.

  Computed in the sub-pixel form, one 2-tap stride-1 conv to the 2^ndim output phases, then
  interleaved: XLA:CPU runs the input-dilated convolution of the direct form several times
  slower. Parameters as `layers.ConvTranspose` (`kernel` (3,)*ndim + (C_in, C_out), `bias`).
  """
  features: int
  impl: str = 'native'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ndim = x.ndim - 2
    kernel = self.param('kernel', _HE_NORMAL, (3,) * ndim + (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    dtype = self.dtype or x.dtype
    padded = jnp.pad(kernel, [(1, 0)] * ndim + [(0, 0), (0, 0)])
    phases = []
    for phase in itertools.product((0, 1), repeat=ndim):
      w = padded
      for axis, r in enumerate(phase):
        w = jnp.take(w, jnp.asarray(_PHASE_TAPS[r]), axis=axis)
      phases.append(w)
    w = jnp.concatenate(phases, axis=-1)  # [2]*ndim + [C_in, 2^ndim * C_out], phase-major
    spatial = x.shape[1:-1]
    # One zero in front of each axis: 'SAME' with a 2-tap kernel reads (x[m-1], x[m]) at m.
    xp = jnp.pad(x.astype(dtype), [(0, 0)] + [(1, 0)] * ndim + [(0, 0)])
    y = layers.conv(xp, w.astype(dtype), (1,) * ndim, self.impl)
    y = y[(slice(None), *(slice(0, n) for n in spatial))]
    y = y.reshape(x.shape[0], *spatial, *(2,) * ndim, self.features)
    # [B, n1.., r1.., C] -> [B, n1, r1, n2, r2, .., C] -> [B, 2 n1, 2 n2, .., C]
    order = [0] + [a for d in range(ndim) for a in (1 + d, 1 + ndim + d)] + [1 + 2 * ndim]
    y = y.transpose(order).reshape(x.shape[0], *(2 * n for n in spatial), self.features)
    return y + bias.astype(dtype)
