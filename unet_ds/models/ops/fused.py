"""Fused ops both CPU paths (`cpu_fast`, `onednn`) use: instance norm + activation, max pool.

- Instance norm + (leaky) ReLU: one custom VJP, statistics in one pass (sum and sum of squares),
  the backward as one reduction pass and one elementwise pass over the volume (autodiff of
  flax's `InstanceNorm` followed by the activation makes several more on XLA:CPU).
- Max pool (stride == window): a reshape and max; XLA:CPU's native gradient builds several
  whole-volume index arrays.

Both equal the flax/lax ops they replace in values and gradients.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp


def max_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """Non-overlapping max pool (stride == window, VALID), equal to `flax.linen.max_pool`.

  Values and gradient match XLA's: the gradient of each window goes to its first maximum in
  row-major window order, as `select_and_scatter` does. XLA:CPU expands that gradient into
  several whole-volume index arrays; here it is one elementwise pass over a reshaped view.

  Args:
    x: [N, *spatial, C].
    window: one window size per spatial dim.

  Returns:
    [N, *(spatial // window), C].
  """
  window = tuple(int(w) for w in window)
  if len(window) != x.ndim - 2 or min(window, default=0) < 1:
    raise ValueError(f'max_pool: need one positive window size per spatial dim of x '
                     f'{x.shape}, got {window}')
  if any(n < w for n, w in zip(x.shape[1:-1], window)):
    raise ValueError(f'max_pool: window {window} larger than x {x.shape}')
  # VALID drops the remainder.
  x = x[(slice(None),) + tuple(slice(0, n - n % w) for n, w in zip(x.shape[1:-1], window))
        + (slice(None),)]
  return _max_pool(x, window)


def _windows(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """[N, *spatial, C] -> [N, s0 // w0, w0, s1 // w1, w1, ..., C] (a free reshape)."""
  shape = [x.shape[0]]
  for n, w in zip(x.shape[1:-1], window):
    shape += [n // w, w]
  return x.reshape(shape + [x.shape[-1]])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
  rank = len(window)
  return jnp.max(_windows(x, window), axis=tuple(2 + 2 * a for a in range(rank)))


def _max_pool_fwd(x, window):
  y = _max_pool(x, window)
  return y, (x, y)


def _exclusive_prefix_sum(count: jax.Array, axis: int) -> jax.Array:
  """`cumsum(count, axis) - count` over a short window axis, as explicit slices: XLA:CPU lowers
  `cumsum` to a reduce-window that, fused into a batched (multi-run) step, ran ~40x slower."""
  run = jnp.zeros_like(lax.slice_in_dim(count, 0, 1, axis=axis))
  parts = [run]
  for i in range(count.shape[axis] - 1):
    run = run + lax.slice_in_dim(count, i, i + 1, axis=axis)
    parts.append(run)
  return jnp.concatenate(parts, axis=axis)


def _max_pool_bwd(window, res, dy):
  x, y = res
  rank = len(window)
  win_axes = tuple(2 + 2 * a for a in range(rank))
  xw = _windows(x, window)
  is_max = xw == jnp.expand_dims(y, win_axes)
  # Keep only the first maximum in row-major window order: count the maxima before each
  # position, axis by axis from the last window axis (exclusive prefix sums).
  before = jnp.zeros(xw.shape, jnp.int32)
  count = is_max.astype(jnp.int32)
  for axis in reversed(win_axes):
    before = before + _exclusive_prefix_sum(count, axis)  # broadcasts over later axes
    count = jnp.sum(count, axis=axis, keepdims=True)
  first = is_max & (before == 0)
  dx = jnp.where(first, jnp.expand_dims(dy, win_axes), jnp.zeros((), dy.dtype))
  return (dx.reshape(x.shape),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def instance_norm_act(x: jax.Array, scale: jax.Array, bias: jax.Array, *,
                      negative_slope: float | None, epsilon: float = 1e-6,
                      dtype=None) -> jax.Array:
  """`act(flax InstanceNorm(x))` over the spatial axes of channels-last `x`, fused.

  Equal to `nn.InstanceNorm(epsilon=epsilon, dtype=dtype)` (statistics in float32 at least,
  `var = E[x^2] - E[x]^2` clipped at 0) followed by `nn.leaky_relu(., negative_slope)`
  (`negative_slope=0`: ReLU; None: no activation), in values and gradients.

  Args:
    x: [N, *spatial, C].
    scale: [C], the norm's scale.
    bias: [C], the norm's bias.
    negative_slope: slope of the activation below 0; None for no activation.
    epsilon: added to the variance.
    dtype: output dtype; None: the promoted dtype of x, scale and bias (as flax).

  Returns:
    [N, *spatial, C] in `dtype`.
  """
  c = x.shape[-1]
  if x.ndim < 3 or scale.shape != (c,) or bias.shape != (c,):
    raise ValueError(f'instance_norm_act: need x [N, *spatial, C] and scale, bias [C]; '
                     f'got x {x.shape}, scale {scale.shape}, bias {bias.shape}')
  out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(x, scale, bias)
  slope = None if negative_slope is None else float(negative_slope)
  return _instance_norm_act(x, scale, bias, slope, float(epsilon), out_dtype)


def _norm_stats(xf: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """Per (sample, channel) mean and 1/std, from one pass of sums (flax's fast variance)."""
  axes = tuple(range(1, xf.ndim - 1))
  mean = jnp.mean(xf, axes, keepdims=True)
  mean2 = jnp.mean(lax.square(xf), axes, keepdims=True)
  var = jnp.maximum(0.0, mean2 - lax.square(mean))
  return mean, lax.rsqrt(var + epsilon)


def _leaky(z: jax.Array, slope: float | None) -> jax.Array:
  return z if slope is None else jnp.where(z >= 0, z, slope * z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _instance_norm_act(x, scale, bias, slope, epsilon, out_dtype):
  return _instance_norm_act_fwd(x, scale, bias, slope, epsilon, out_dtype)[0]


def _instance_norm_act_fwd(x, scale, bias, slope, epsilon, out_dtype):
  stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(stat_dtype)
  mean, rstd = _norm_stats(xf, epsilon)
  mul = rstd * scale.astype(stat_dtype)
  z = (xf - mean) * mul + bias.astype(stat_dtype)
  return _leaky(z, slope).astype(out_dtype), (x, scale, bias, mean, rstd)


def _instance_norm_act_bwd(slope, epsilon, out_dtype, res, dy):
  del epsilon, out_dtype
  x, scale, bias, mean, rstd = res
  stat_dtype = mean.dtype
  axes = tuple(range(1, x.ndim - 1))
  xhat = (x.astype(stat_dtype) - mean) * rstd
  g = dy.astype(stat_dtype)
  if slope is not None:
    z = xhat * scale.astype(stat_dtype) + bias.astype(stat_dtype)
    g = jnp.where(z >= 0, g, slope * g)
  # One pass: per (sample, channel) sums of g and g * xhat; the rest is per-channel algebra.
  g_mean = jnp.mean(g, axes, keepdims=True)
  gx_mean = jnp.mean(g * xhat, axes, keepdims=True)
  count = math.prod(x.shape[1:-1])
  dbias = jnp.sum(g_mean, axis=(0,) + axes) * count
  dscale = jnp.sum(gx_mean, axis=(0,) + axes) * count
  dx = (rstd * scale.astype(stat_dtype)) * (g - g_mean - xhat * gx_mean)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_instance_norm_act.defvjp(_instance_norm_act_fwd, _instance_norm_act_bwd)
