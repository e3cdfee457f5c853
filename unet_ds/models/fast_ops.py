"""Convolutions rewritten for XLA:CPU, equal to the native ops in values and gradients.

XLA:CPU hands 2D convolutions to a fast Eigen kernel but runs 3D ones, and any convolution with
input dilation (the input gradient of a strided conv, a strided transposed conv), through a slow
generic loop (DESIGN.md §5: ~10x and up to ~40x slower). This module re-expresses them with
the fast pieces only:

- 3D conv: a sum over depth taps of 2D convs on depth slices folded into the batch (or, when
  C_in > C_out or C_out is small, one 2D conv emitting all taps' outputs, summed with depth
  shifts; a conv with few input channels as one 2D conv over depth taps stacked on channels).
- Input gradient of a conv, and transposed convs: the "sub-pixel" form. A stride-s transposed
  conv equals a stride-1 conv over the (un-dilated) input with a kernel that emits s**n output
  phases as channels, followed by a depth-to-space reshape.
- Kernel gradient of a 3D conv: a scan over input depth slabs, one matmul per in-plane tap on
  contiguous slices of the flattened slab, small enough to stay in cache (the native
  kernel-gradient conv runs at a few GFLOP/s).
- 1x1 convs and transposed convs with kernel == stride: einsums and reshapes, with weight
  gradients summed over row chunks (XLA would transpose the whole volume).
- Max pool (stride == window): a reshape and max; XLA:CPU's native gradient builds several
  whole-volume index arrays.
- Instance norm + (leaky) ReLU: one custom VJP, statistics in one pass (sum and sum of squares),
  the backward as one reduction pass and one elementwise pass over the volume (autodiff of
  flax's `InstanceNorm` followed by the activation makes several more).

All functions are pure, channels-last, and take kernels in flax layout (*k, C_in, C_out). On
GPU/TPU the native ops are the right choice; `layers.resolve_impl` picks this module on CPU.

Importing this module adds `XLA_CPU_FLAGS` to `XLA_FLAGS` (unless the user set that flag):
XLA:CPU (jax 0.10) hands some 2D convolutions to YNNPACK, which runs them on one thread and 2-3x
slower than its Eigen path (64^3 x 32 -> 48 channels: 243 ms vs 75 ms on 2 cores); keeping
YNNPACK for dots and reductions only made the bench_ref train step ~13% faster. XLA reads the
flags when its CPU backend starts, so import unet_ds before running any jax computation.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

Pads = tuple[tuple[int, int], ...]

XLA_CPU_FLAGS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}


def _add_xla_cpu_flags() -> None:
  """Appends `XLA_CPU_FLAGS` to the XLA_FLAGS environment variable; user-set flags win."""
  flags = os.environ.get('XLA_FLAGS', '')
  extra = [f'--{name}={value}' for name, value in XLA_CPU_FLAGS.items() if name not in flags]
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([flags] + extra).strip()


_add_xla_cpu_flags()

# Below ~16 MFLOP a native conv (and its gradients) take well under 10 ms on XLA:CPU; the
# rewritten ones compile slower (scans), which dominates for the tiny models of tests.
NATIVE_BELOW_FLOPS = 2**24


def conv(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int], padding: str = 'SAME',
         native_below_flops: int = NATIVE_BELOW_FLOPS) -> jax.Array:
  """Channels-last convolution, equal to `lax.conv_general_dilated` (NDHWC/DHWIO or NHWC/HWIO).

  Args:
    x: [N, *spatial, C_in] with 2 or 3 spatial dims.
    kernel: [*k, C_in, C_out].
    strides: one stride per spatial dim.
    padding: 'SAME' or 'VALID' (XLA's meaning).
    native_below_flops: convs cheaper than this many FLOPs use the native op, which is fast
      enough there and compiles in half the time (tiny test models); 0 disables.

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
  if native_below_flops and _conv_flops(x, kernel, strides, pads) < native_below_flops:
    return _native(x, kernel, strides, pads)
  return _conv(x, kernel, strides, pads)


def _conv_flops(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Pads) -> int:
  out = [(n + lo + hi - k) // s + 1
         for n, k, s, (lo, hi) in zip(x.shape[1:-1], kernel.shape[:-2], strides, pads)]
  return 2 * x.shape[0] * math.prod(out) * math.prod(kernel.shape)


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
    raise ValueError(f'fast_ops.max_pool: need one positive window size per spatial dim of x '
                     f'{x.shape}, got {window}')
  if any(n < w for n, w in zip(x.shape[1:-1], window)):
    raise ValueError(f'fast_ops.max_pool: window {window} larger than x {x.shape}')
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
    before = before + jnp.cumsum(count, axis=axis) - count  # broadcasts over later axes
    count = jnp.sum(count, axis=axis, keepdims=True)
  first = is_max & (before == 0)
  dx = jnp.where(first, jnp.expand_dims(dy, win_axes), jnp.zeros((), dy.dtype))
  return (dx.reshape(x.shape),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


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
    if x.shape[-1] * ksize[0] <= _DEPTH_STACK_MAX_CHANNELS:
      return _conv3d_depth_stacked(x, kernel, strides, pads)
    return _conv3d(x, kernel, strides, pads)
  return _conv2d(x, kernel, strides, pads)


# A conv with C_in * kd at most this many runs as one 2D conv over depth slices stacked on
# channels: 2D convs with 1 input channel crawl (64^3, 1 -> 16: 17 ms vs 44 ms for the taps).
_DEPTH_STACK_MAX_CHANNELS = 8


def _conv3d_depth_stacked(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                          pads: Pads) -> jax.Array:
  """3D conv as one 2D conv over [N * D_out, H, W, kd * C_in] (depth taps on channels).

  Plain ops under autodiff: the kernel gradient is the native 2D one, the input gradient
  (unused for the network's input) goes through `_conv2d`'s.
  """
  n, _, h, w, c = x.shape
  kd, sd = kernel.shape[0], strides[0]
  xp = jnp.pad(x, ((0, 0), pads[0], (0, 0), (0, 0), (0, 0)))
  d_out = (xp.shape[1] - kd) // sd + 1
  x3 = jnp.concatenate([lax.slice_in_dim(xp, t, t + (d_out - 1) * sd + 1, sd, axis=1)
                        for t in range(kd)], axis=-1)  # tap-major channels
  k2 = jnp.moveaxis(kernel, 0, 2).reshape(kernel.shape[1:3] + (kd * c, kernel.shape[-1]))
  y = _conv2d(x3.reshape(n * d_out, h, w, kd * c), k2, strides[1:], pads[1:])
  return y.reshape((n, d_out) + y.shape[1:])


def _pointwise(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...]) -> jax.Array:
  """1x1(x1) conv: a strided subsample and a matmul over channels."""
  if any(s != 1 for s in strides):
    x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
  return _channel_matmul(x, kernel.reshape(kernel.shape[-2:]))


def _matmul_last(x: jax.Array, w: jax.Array) -> jax.Array:
  out_dtype = _out_dtype(x, w)
  y = jnp.einsum('...c,co->...o', x, w, preferred_element_type=_acc_dtype(out_dtype))
  return y.astype(out_dtype)


@jax.custom_vjp
def _channel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """[..., C] @ [C, O]; its weight gradient avoids XLA's whole-volume transpose."""
  return _matmul_last(x, w)


def _channel_matmul_fwd(x, w):
  return _matmul_last(x, w), (x, w)


def _channel_matmul_bwd(res, dy):
  x, w = res
  dx = _matmul_last(dy, w.T).astype(x.dtype)
  dw = _gram(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])).astype(w.dtype)
  return dx, dw


_channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def _gram(a: jax.Array, b: jax.Array, rows: int = 8192) -> jax.Array:
  """a.T @ b for tall a [M, P], b [M, Q], summed over row chunks in a scan.

  XLA:CPU lays such a product out by transposing a whole operand in memory, a strided pass over
  the volume that costs more than the matmul; chunks keep every transpose in cache.
  """
  m = a.shape[0]
  acc_dtype = _acc_dtype(jnp.result_type(a.dtype, b.dtype))
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


# Narrow convs (C_out up to this) also stack their depth taps: one 2D conv to kd * C_out
# channels is a wider, faster matmul (64^3, 16 -> 16: 55 ms vs 79 ms for three 2D convs).
_STACK_TAPS_MAX_COUT = 16


def _conv3d_taps(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                 pads: Pads) -> jax.Array:
  """3D conv as sum_t conv2d(depth slice t folded into the batch, kernel[t])."""
  if strides[0] == 1 and kernel.shape[0] > 1 and (
      kernel.shape[-2] > kernel.shape[-1] or kernel.shape[-1] <= _STACK_TAPS_MAX_COUT):
    return _conv3d_stacked_taps(x, kernel, strides, pads)
  if strides[0] == 1:
    return _conv3d_shifted_taps(x, kernel, strides, pads)
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


def _conv3d_shifted_taps(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                         pads: Pads) -> jax.Array:
  """Depth-stride-1 3D conv as kd 2D convs over all depth slices, summed with depth shifts.

  `z_t[d] = conv2d(x[d], kernel[t])` reads x in place (no padded copy, no per-tap slices) and
  `y[q] = sum_t z_t[q + t - low]` is one elementwise pass.
  """
  n, d, h, w, c = x.shape
  kd = kernel.shape[0]
  low, high = pads[0]
  d_out = d + low + high - kd + 1
  out_dtype = _out_dtype(x, kernel)
  zero = jnp.zeros((), _acc_dtype(out_dtype))
  y = None
  for t in range(kd):
    z = _native(x.reshape(n * d, h, w, c), kernel[t], strides[1:], pads[1:],
                preferred_element_type=_acc_dtype(out_dtype))
    z = lax.pad(z.reshape((n, d) + z.shape[1:]), zero,
                [(0, 0, 0), (low - t, d_out - d - low + t, 0)] + [(0, 0, 0)] * 3)
    y = z if y is None else y + z
  return y.astype(out_dtype)


def _conv3d_stacked_taps(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                         pads: Pads) -> jax.Array:
  """Depth-stride-1 3D conv as one 2D conv emitting every depth tap's output, then shifted sums.

  `z[d, t] = conv2d(x[d], kernel[t])` for all taps at once (C_out * kd output channels, a wider
  and faster matmul than kd convs to C_out), and `y[d] = sum_t z[d + t - low, t]`. Cheaper than
  the per-tap form when C_in > C_out (its z is then smaller than the per-tap input slices) or
  when C_out is small (the per-tap matmuls are too narrow).
  """
  n, d, h, w, c = x.shape
  kd, o = kernel.shape[0], kernel.shape[-1]
  out_dtype = _out_dtype(x, kernel)
  stacked = jnp.moveaxis(kernel, 0, -2).reshape(kernel.shape[1:3] + (c, kd * o))
  z = _native(x.reshape(n * d, h, w, c), stacked, strides[1:], pads[1:],
              preferred_element_type=_acc_dtype(out_dtype))
  z = z.reshape((n, d) + z.shape[1:3] + (kd, o))
  low, high = pads[0]
  d_out = d + low + high - kd + 1
  # y[q] = sum_t z[q + t - low, t]: each term a depth-shifted (cropped / zero-padded) slice, all
  # in one elementwise pass (padding z itself would write a copy of all kd * C_out channels).
  zero = jnp.zeros((), z.dtype)
  y = sum(lax.pad(z[:, :, :, :, t], zero, [(0, 0, 0), (low - t, d_out - d - low + t, 0)]
                  + [(0, 0, 0)] * 3) for t in range(kd))
  return y.astype(out_dtype)


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
  if all(s == 1 for s in strides):
    return _kernel_grad3d_flat(x, dy, kshape, pads)
  return _kernel_grad3d_im2col(x, dy, kshape, strides, pads)


def _kernel_grad3d_flat(x: jax.Array, dy: jax.Array, kshape: Sequence[int],
                        pads: Pads) -> jax.Array:
  """Stride-1 kernel gradient with in-plane shifts as contiguous slices of flattened slabs.

  On a padded slab flattened to L = Hp * Wp rows, tap (i, j) is the row offset i * Wp + j, so
  `dk[t, i, j] = sum_l slab_p[l + i * Wp + j] (x) dy_p-t[l]` with dy laid on the same padded grid
  (zeros off the output): one matmul per in-plane tap over a contiguous slice, all depth taps
  at once (dy slabs p - t stacked on channels). No im2col copy with scattered writes.
  """
  kd, kh, kw, c, o = kshape
  n, d_out, h_out, w_out, _ = dy.shape
  h_pad, w_pad = (s + lo + hi for s, (lo, hi) in zip(x.shape[2:-1], pads[1:]))
  length = h_pad * w_pad
  reach = (kh - 1) * w_pad + (kw - 1)
  # Zero rows below each slab cover the taps' reach past its end: one padded copy of x, in
  # plane only (depth-padding slabs are zeros and contribute nothing).
  extra = -(-reach // w_pad)
  xp = jnp.pad(x, ((0, 0), (0, 0), (pads[1][0], pads[1][1] + extra), pads[2], (0, 0)))
  xp = xp.reshape(n, x.shape[1], (h_pad + extra) * w_pad, c)
  # dy on the padded grid at the top-left; depth padded so that slab p reads dy[p - t] for all t.
  dy_grid = jnp.pad(dy, ((0, 0), (kd - 1, kd - 1), (0, h_pad - h_out), (0, w_pad - w_out),
                         (0, 0))).reshape(n, d_out + 2 * (kd - 1), length, o)
  acc_dtype = _acc_dtype(jnp.result_type(x.dtype, dy.dtype))
  contract_rows = (((0,), (0,)), ((), ()))

  def step(acc, q):
    slab = lax.dynamic_index_in_dim(xp, q, axis=1, keepdims=False)  # [N, >= L + reach, C]
    p = q + pads[0][0]  # the slab's index in the depth-padded input
    g = lax.dynamic_slice_in_dim(dy_grid, p, kd, axis=1)[:, ::-1]  # tap t <- dy[p - t]
    g = jnp.moveaxis(g, 1, 2).reshape(n * length, kd * o)
    taps = [lax.dot_general(slab[:, i * w_pad + j:i * w_pad + j + length].reshape(n * length, c),
                            g, contract_rows, preferred_element_type=acc_dtype)
            for i in range(kh) for j in range(kw)]
    return acc + jnp.stack(taps), None

  acc0 = jnp.zeros((kh * kw, c, kd * o), acc_dtype)
  acc, _ = lax.scan(step, acc0, jnp.arange(x.shape[1]))
  return acc.reshape(kh, kw, c, kd, o).transpose(3, 0, 1, 2, 4)


def _kernel_grad3d_im2col(x: jax.Array, dy: jax.Array, kshape: Sequence[int],
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
    raise ValueError(f'fast_ops.instance_norm_act: need x [N, *spatial, C] and scale, bias [C]; '
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
