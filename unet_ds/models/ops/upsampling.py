"""Transposed convolutions in the sub-pixel form, and the channel matmul they reduce to.

A stride-s transposed conv equals a stride-1 conv over the (un-dilated) input with a kernel that
emits s**n output phases as channels, followed by a depth-to-space reshape (no input dilation,
which XLA:CPU runs through a slow generic loop, and cuDNN's strided transposed conv is slow too).
With kernel == stride (the U-Net's learned upsampling) that phase conv is 1x1: one einsum over
channels and a reshape, exact; this is the `native_einsum_up` (GPU/TPU) default and the
`cpu_fast` one. The same form is the input gradient of a strided conv (`xla_cpu`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from unet_ds.models.ops import common

# (x, kernel, pads) -> stride-1 conv of x: the phase conv of the sub-pixel form.
PhaseConv = Callable[[jax.Array, jax.Array, common.Pads], jax.Array]


def _native_phase_conv(x: jax.Array, kernel: jax.Array, pads: common.Pads) -> jax.Array:
  return common.native_conv(x, kernel, (1,) * (x.ndim - 2), pads)


def conv_transpose(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int],
                   phase_conv: PhaseConv = _native_phase_conv) -> jax.Array:
  """Transposed convolution, equal to flax `ConvTranspose(padding='VALID')`'s core op.

  That is `lax.conv_transpose(x, kernel, strides, 'VALID', transpose_kernel=False)`: each input
  voxel `x[n, i]` adds `x[n, i] @ kernel[k - 1 - t]` to output voxel `i * s + t` (the kernel is
  used spatially flipped), and the output has size `(in - 1) * s + max(k, s)` per axis (for
  k < s, the last s - k rows of each phase block are zeros, as in lax).

  Args:
    x: [N, *spatial, C_in] with 2 or 3 spatial dims.
    kernel: [*k, C_in, C_out].
    strides: one stride per spatial dim.
    phase_conv: the stride-1 conv used when some k > s (k <= s needs none: a channel matmul).

  Returns:
    [N, *((spatial - 1) * strides + max(k, strides)), C_out].
  """
  strides = common.check_conv_args(x, kernel, strides, 'conv_transpose')
  ksize = kernel.shape[:-2]
  rank = len(ksize)
  flipped = kernel[(slice(None, None, -1),) * rank]
  out_size = tuple((n - 1) * s + max(k, s) for n, s, k in zip(x.shape[1:-1], strides, ksize))
  return scatter_taps(x, flipped, strides, out_size, (0,) * rank, phase_conv)


def scatter_taps(y: jax.Array, g: jax.Array, strides: tuple[int, ...],
                 out_size: tuple[int, ...], lows: tuple[int, ...],
                 phase_conv: PhaseConv = _native_phase_conv) -> jax.Array:
  """out[q - low] = sum over (i, t) with i * s + t == q of y[i] @ g[t], for 0 <= q - low < size.

  The adjoint of a strided conv (and a transposed conv) with no input dilation: writing
  q = m * s + r and t = r + s * u, `out[m * s + r] = sum_u y[m - u] @ g[r + s * u]`, a stride-1
  VALID conv over y (padded by U - 1 = ceil(k / s) - 1 below) whose output channels are the
  s**rank phases r, which a depth-to-space reshape interleaves. That conv is `phase_conv`, or a
  channel matmul when it is 1x1 (k <= s).
  """
  rank = y.ndim - 2
  ksize = g.shape[:-2]
  c_in, c_out = g.shape[-2:]
  taps = tuple(-(-k // s) for k, s in zip(ksize, strides))  # U per axis
  # Phase rows m in [m0, m1) cover the wanted q in [low, low + size); row m reads y[m - U + 1 .. m].
  m0 = tuple(lo // s for lo, s in zip(lows, strides))
  m1 = tuple(-(-(lo + n) // s) for lo, n, s in zip(lows, out_size, strides))
  y_pads = [(u - 1 - a, b - n) for u, a, b, n in zip(taps, m0, m1, y.shape[1:-1])]
  # Negative pads crop rows of y that only land outside the wanted window; the conv pads the
  # rest (cheaper than padding y here: no padded copy of the volume).
  y = lax.pad(y, jnp.zeros((), y.dtype), [(0, 0, 0)] + [(min(lo, 0), min(hi, 0), 0)
                                                        for lo, hi in y_pads] + [(0, 0, 0)])
  conv_pads = tuple((max(lo, 0), max(hi, 0)) for lo, hi in y_pads)
  rows = tuple(b - a for a, b in zip(m0, m1))
  # Kernel of the phase conv: kg[v, ci, r, co] = g[r + s * (U - 1 - v)] (zero where t >= k).
  kg = jnp.pad(g, [(0, u * s - k) for u, s, k in zip(taps, strides, ksize)] + [(0, 0)] * 2)
  split = []
  for u, s in zip(taps, strides):
    split += [u, s]
  kg = kg.reshape(split + [c_in, c_out])
  kg = kg[tuple(slice(None, None, -1) if a % 2 == 0 else slice(None)
                for a in range(2 * rank))]
  # -> [*U, C_in, *s, C_out]
  perm = [2 * a for a in range(rank)] + [2 * rank] + [2 * a + 1 for a in range(rank)] + [
      2 * rank + 1]
  kg = kg.transpose(perm).reshape(taps + (c_in, math.prod(strides) * c_out))
  if all(u == 1 for u in taps) and all(p == (0, 0) for p in conv_pads):
    z = channel_matmul(y, kg.reshape(kg.shape[-2:]))  # [N, *rows, prod(s) * C_out]
  else:
    z = phase_conv(y, kg, conv_pads)
  n = z.shape[0]
  z = z.reshape((n,) + rows + tuple(strides) + (c_out,))
  # Interleave phases: [N, m_0, r_0, m_1, r_1, ..., C] -> [N, m_0 * s_0 + r_0, ..., C].
  perm = [0] + [a for i in range(rank) for a in (1 + i, 1 + rank + i)] + [1 + 2 * rank]
  z = z.transpose(perm).reshape((n,) + tuple(m * s for m, s in zip(rows, strides)) + (c_out,))
  starts = tuple(lo - a * s for lo, a, s in zip(lows, m0, strides))
  return z[(slice(None),) + tuple(slice(a, a + size) for a, size in zip(starts, out_size))]


def _matmul_last(x: jax.Array, w: jax.Array) -> jax.Array:
  out_dtype = common.out_dtype(x, w)
  y = jnp.einsum('...c,co->...o', x, w, preferred_element_type=common.acc_dtype(out_dtype))
  return y.astype(out_dtype)


@jax.custom_vjp
def channel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """[..., C] @ [C, O]; its weight gradient avoids XLA's whole-volume transpose."""
  return _matmul_last(x, w)


def _channel_matmul_fwd(x, w):
  return _matmul_last(x, w), (x, w)


def _channel_matmul_bwd(res, dy):
  x, w = res
  dx = _matmul_last(dy, w.T).astype(x.dtype)
  dw = _gram(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])).astype(w.dtype)
  return dx, dw


channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def _gram(a: jax.Array, b: jax.Array, rows: int = 8192) -> jax.Array:
  """a.T @ b for tall a [M, P], b [M, Q], summed over row chunks in a scan.

  XLA:CPU lays such a product out by transposing a whole operand in memory, a strided pass over
  the volume that costs more than the matmul; chunks keep every transpose in cache.
  """
  m = a.shape[0]
  acc_dtype = common.acc_dtype(jnp.result_type(a.dtype, b.dtype))
  if m <= rows:
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)
  chunks = -(-m // rows)
  if chunks * rows != m:
    a = jnp.pad(a, ((0, chunks * rows - m), (0, 0)))
    b = jnp.pad(b, ((0, chunks * rows - m), (0, 0)))

  def step(acc, ab):
    return acc + lax.dot_general(ab[0], ab[1], (((0,), (0,)), ((), ())),
                                 preferred_element_type=acc_dtype), None

  acc0 = jnp.zeros((a.shape[1], b.shape[1]), acc_dtype)
  acc, _ = lax.scan(step, acc0, (a.reshape(chunks, rows, -1), b.reshape(chunks, rows, -1)))
  return acc

