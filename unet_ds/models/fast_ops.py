"""Convolutions rewritten for XLA:CPU, equal to the native ops in values and gradients.

XLA:CPU hands 2D convolutions to a fast Eigen kernel but runs 3D ones, and any convolution with
input dilation (the input gradient of a strided conv, a strided transposed conv), through a slow
generic loop (DESIGN.md §5: ~10x and up to ~40x slower). This module re-expresses them with
the fast pieces only:

- 3D conv: a sum over depth taps of 2D convs on depth slices folded into the batch.
- Input gradient of a conv, and transposed convs: the "sub-pixel" form. A stride-s transposed
  conv equals a stride-1 conv over the (un-dilated) input with a kernel that emits s**n output
  phases as channels, followed by a depth-to-space reshape.
- Kernel gradient of a 3D conv: a scan over input depth slabs, each an im2col matmul kept small
  enough to stay in cache (the native kernel-gradient conv runs at a few GFLOP/s).
- 1x1 convs and transposed convs with kernel == stride: einsums and reshapes.

All functions are pure, channels-last, and take kernels in flax layout (*k, C_in, C_out). On
GPU/TPU the native ops are the right choice; `layers.resolve_impl` picks this module on CPU.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

Pads = tuple[tuple[int, int], ...]


def conv(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int],
         padding: str = 'SAME') -> jax.Array:
  """Channels-last convolution, equal to `lax.conv_general_dilated` (NDHWC/DHWIO or NHWC/HWIO).

  Args:
    x: [N, *spatial, C_in] with 2 or 3 spatial dims.
    kernel: [*k, C_in, C_out].
    strides: one stride per spatial dim.
    padding: 'SAME' or 'VALID' (XLA's meaning).

  Returns:
    [N, *out_spatial, C_out] in the promoted dtype of `x` and `kernel`.
  """
  strides = _check_conv_args(x, kernel, strides)
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f"fast_ops: padding must be 'SAME' or 'VALID', got {padding!r}")
  if padding == 'VALID' and any(n < k for n, k in zip(x.shape[1:-1], kernel.shape[:-2])):
    raise ValueError(f'fast_ops: kernel {kernel.shape[:-2]} larger than the input '
                     f'{x.shape[1:-1]} with VALID padding')
  pads = tuple(lax.padtype_to_pads(x.shape[1:-1], kernel.shape[:-2], strides, padding))
  return _conv(x, kernel, strides, pads)


def conv_transpose(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int]) -> jax.Array:
  """Transposed convolution, equal to flax `ConvTranspose(padding='VALID')`'s core op.

  That is `lax.conv_transpose(x, kernel, strides, 'VALID', transpose_kernel=False)`: each input
  voxel `x[n, i]` adds `x[n, i] @ kernel[k - 1 - t]` to output voxel `i * s + t` (the kernel is
  used spatially flipped), and the output has size `(in - 1) * s + max(k, s)` per axis (for
  k < s, the last s - k rows of each phase block are zeros, as in lax).

  Args:
    x: [N, *spatial, C_in] with 2 or 3 spatial dims.
    kernel: [*k, C_in, C_out].
    strides: one stride per spatial dim.

  Returns:
    [N, *((spatial - 1) * strides + max(k, strides)), C_out].
  """
  strides = _check_conv_args(x, kernel, strides)
  ksize = kernel.shape[:-2]
  rank = len(ksize)
  flipped = kernel[(slice(None, None, -1),) * rank]
  out_size = tuple((n - 1) * s + max(k, s) for n, s, k in zip(x.shape[1:-1], strides, ksize))
  return _scatter_taps(x, flipped, strides, out_size, (0,) * rank)


def _check_conv_args(x: jax.Array, kernel: jax.Array,
                     strides: Sequence[int]) -> tuple[int, ...]:
  """Validates shapes before any compute; returns the strides as a tuple of ints."""
  if x.ndim not in (4, 5):
    raise ValueError(f'fast_ops: x must be [N, *spatial, C] with 2 or 3 spatial dims, '
                     f'got shape {x.shape}')
  if kernel.ndim != x.ndim:
    raise ValueError(f'fast_ops: kernel must be [*k, C_in, C_out] with the rank of x; '
                     f'got kernel {kernel.shape} for x {x.shape}')
  if kernel.shape[-2] != x.shape[-1]:
    raise ValueError(f'fast_ops: kernel C_in {kernel.shape[-2]} (kernel {kernel.shape}) != '
                     f'x channels {x.shape[-1]} (x {x.shape})')
  strides = tuple(int(s) for s in strides)
  if len(strides) != x.ndim - 2 or min(strides) < 1:
    raise ValueError(f'fast_ops: need one positive stride per spatial dim of x {x.shape}, '
                     f'got {strides}')
  return strides


def _dimension_numbers(rank: int) -> tuple[str, str, str]:
  sp = 'DHW'[3 - rank:]
  return (f'N{sp}C', f'{sp}IO', f'N{sp}C')


def _out_dtype(x: jax.Array, kernel: jax.Array) -> jnp.dtype:
  return jnp.result_type(x.dtype, kernel.dtype)


def _acc_dtype(dtype: jnp.dtype) -> jnp.dtype:
  # Accumulate partial sums in float32 at least so that low-precision results round once,
  # like the native op.
  return jnp.promote_types(dtype, jnp.float32)


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Pads) -> jax.Array:
  """Dispatch on shape: pointwise convs as matmuls, 3D convs via 2D ones, else native."""
  ksize = kernel.shape[:-2]
  if all(k == 1 for k in ksize) and all(p == (0, 0) for p in pads):
    return _pointwise(x, kernel, strides)
  if len(ksize) == 3:
    return _conv3d(x, kernel, strides, pads)
  return _conv2d(x, kernel, strides, pads)


def _pointwise(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...]) -> jax.Array:
  """1x1(x1) conv: a strided subsample and a matmul over channels (autodiff is fast)."""
  if any(s != 1 for s in strides):
    x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
  kmat = kernel.reshape(kernel.shape[-2:])
  out_dtype = _out_dtype(x, kernel)
  y = jnp.einsum('...c,co->...o', x, kmat, preferred_element_type=_acc_dtype(out_dtype))
  return y.astype(out_dtype)


def _conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Pads) -> jax.Array:
  """Native 2D conv; a strided one gets the sub-pixel input gradient (no input dilation)."""
  if all(s == 1 for s in strides):
    return _native(x, kernel, strides, pads)
  return _strided_conv2d(x, kernel, strides, pads)


def _native(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Pads,
            preferred_element_type=None) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, strides, pads, dimension_numbers=_dimension_numbers(x.ndim - 2),
      preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv2d(x, kernel, strides, pads):
  return _native(x, kernel, strides, pads)


def _strided_conv2d_fwd(x, kernel, strides, pads):
  return _native(x, kernel, strides, pads), (x, kernel)


def _strided_conv2d_bwd(strides, pads, res, dy):
  x, kernel = res
  dx = _input_grad(dy, kernel, strides, pads, x.shape[1:-1]).astype(x.dtype)
  # The native kernel gradient of a 2D conv has no input dilation and is fine.
  _, kernel_vjp = jax.vjp(lambda k: _native(x, k, strides, pads), kernel)
  return dx, kernel_vjp(dy)[0]


_strided_conv2d.defvjp(_strided_conv2d_fwd, _strided_conv2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv3d(x, kernel, strides, pads):
  return _conv3d_taps(x, kernel, strides, pads)


def _conv3d_fwd(x, kernel, strides, pads):
  return _conv3d_taps(x, kernel, strides, pads), (x, kernel)


def _conv3d_bwd(strides, pads, res, dy):
  x, kernel = res
  dx = _input_grad(dy, kernel, strides, pads, x.shape[1:-1]).astype(x.dtype)
  dk = _kernel_grad3d(x, dy, kernel.shape, strides, pads).astype(kernel.dtype)
  return dx, dk


_conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)


def _conv3d_taps(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                 pads: Pads) -> jax.Array:
  """3D conv as sum_t conv2d(depth slice t folded into the batch, kernel[t])."""
  n, _, h, w, c = x.shape
  kd = kernel.shape[0]
  sd = strides[0]
  xp = jnp.pad(x, ((0, 0), pads[0], (0, 0), (0, 0), (0, 0)))
  d_out = (xp.shape[1] - kd) // sd + 1
  out_dtype = _out_dtype(x, kernel)
  acc = None
  for t in range(kd):
    xs = lax.slice_in_dim(xp, t, t + (d_out - 1) * sd + 1, sd, axis=1)
    y = _native(xs.reshape(n * d_out, h, w, c), kernel[t], strides[1:], pads[1:],
                preferred_element_type=_acc_dtype(out_dtype))
    acc = y if acc is None else acc + y
  return acc.reshape((n, d_out) + acc.shape[1:]).astype(out_dtype)


def _input_grad(dy: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Pads,
                in_size: Sequence[int]) -> jax.Array:
  """VJP of conv w.r.t. its input: scatter dy through the taps, crop the padding."""
  kernel_t = jnp.swapaxes(kernel, -1, -2)  # maps dy channels to x channels
  lows = tuple(lo for lo, _ in pads)
  return _scatter_taps(dy, kernel_t, strides, tuple(in_size), lows)


def _scatter_taps(y: jax.Array, g: jax.Array, strides: tuple[int, ...],
                  out_size: tuple[int, ...], lows: tuple[int, ...]) -> jax.Array:
  """out[q - low] = sum over (i, t) with i * s + t == q of y[i] @ g[t], for 0 <= q - low < size.

  The adjoint of a strided conv (and a transposed conv) with no input dilation: writing
  q = m * s + r and t = r + s * u, `out[m * s + r] = sum_u y[m - u] @ g[r + s * u]`, a stride-1
  VALID conv over y (padded by U - 1 = ceil(k / s) - 1 below) whose output channels are the
  s**rank phases r, which a depth-to-space reshape interleaves.
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
  z = _conv(y, kg, (1,) * rank, conv_pads)  # [N, *rows, prod(s) * C_out]
  n = z.shape[0]
  z = z.reshape((n,) + rows + tuple(strides) + (c_out,))
  # Interleave phases: [N, m_0, r_0, m_1, r_1, ..., C] -> [N, m_0 * s_0 + r_0, ..., C].
  perm = [0] + [a for i in range(rank) for a in (1 + i, 1 + rank + i)] + [1 + 2 * rank]
  z = z.transpose(perm).reshape((n,) + tuple(m * s for m, s in zip(rows, strides)) + (c_out,))
  starts = tuple(lo - a * s for lo, a, s in zip(lows, m0, strides))
  return z[(slice(None),) + tuple(slice(a, a + size) for a, size in zip(starts, out_size))]


def _kernel_grad3d(x: jax.Array, dy: jax.Array, kshape: Sequence[int],
                   strides: tuple[int, ...], pads: Pads) -> jax.Array:
  """dk[t, i, j] = sum x_pad[n, d*sd + t, h*sh + i, w*sw + j] (x) dy[n, d, h, w].

  A scan over the padded input's depth slabs p: slab p pairs with dy[(p - t) / sd] for every
  depth tap t that divides evenly, so each step is one matmul of the slab's in-plane im2col
  [N*Ho*Wo, kh*kw*C] with those dy slabs stacked [N*Ho*Wo, kd*O]; the im2col of one slab stays
  in cache and no buffer grows with the whole volume.
  """
  kd, kh, kw, c, o = kshape
  sd, sh, sw = strides
  n, d_out, h_out, w_out, _ = dy.shape
  xp = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  acc_dtype = _acc_dtype(jnp.result_type(x.dtype, dy.dtype))
  n_slabs = (d_out - 1) * sd + kd  # slabs beyond this meet no output
  # For slab p and tap t: the dy slab index, or d_out (an appended zero slab) when none.
  index = [[(p - t) // sd if (p - t) % sd == 0 and 0 <= (p - t) // sd < d_out else d_out
            for t in range(kd)] for p in range(n_slabs)]
  dy_ext = jnp.concatenate([dy, jnp.zeros_like(dy[:, :1])], axis=1)
  rows = n * h_out * w_out

  def step(acc, inputs):
    p, idx = inputs
    slab = lax.dynamic_index_in_dim(xp, p, axis=1, keepdims=False)  # [N, Hp, Wp, C]
    cols = jnp.concatenate(
        [lax.slice(slab, (0, i, j, 0),
                   (n, i + (h_out - 1) * sh + 1, j + (w_out - 1) * sw + 1, c), (1, sh, sw, 1))
         for i in range(kh) for j in range(kw)], axis=-1).reshape(rows, kh * kw * c)
    g = jnp.take(dy_ext, idx, axis=1)  # [N, kd, Ho, Wo, O]
    g = jnp.moveaxis(g, 1, -2).reshape(rows, kd * o)
    return acc + jnp.matmul(cols.T, g, preferred_element_type=acc_dtype), None

  acc0 = jnp.zeros((kh * kw * c, kd * o), acc_dtype)
  acc, _ = lax.scan(step, acc0, (jnp.arange(n_slabs), jnp.asarray(index, jnp.int32)))
  return acc.reshape(kh, kw, c, kd, o).transpose(3, 0, 1, 2, 4)
