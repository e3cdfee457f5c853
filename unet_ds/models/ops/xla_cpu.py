"""Convolutions rewritten for XLA:CPU, equal to the native ops in values and gradients.

XLA:CPU hands 2D convolutions to a fast Eigen kernel but runs 3D ones, and any convolution with
input dilation (the input gradient of a strided conv, a strided transposed conv), through a slow
generic loop (~10x and up to ~40x slower). This module re-expresses them with the fast pieces
only:

- 3D conv: a sum over depth taps of 2D convs on depth slices folded into the batch (or, when
  C_in > C_out or C_out is small, one 2D conv emitting all taps' outputs, summed with depth
  shifts; a conv with few input channels as one 2D conv over depth taps stacked on channels).
- Input gradient of a strided conv, and transposed convs: the sub-pixel form of `upsampling`,
  its phase conv through this module's `conv`.
- Kernel gradient of a 3D conv: a scan over input depth slabs, one matmul per in-plane tap on
  contiguous slices of the flattened slab, small enough to stay in cache (the native
  kernel-gradient conv runs at a few GFLOP/s).
- 1x1 convs: `upsampling.channel_matmul` (weight gradients summed over row chunks; XLA would
  transpose the whole volume).

All functions are pure, channels-last, and take kernels in flax layout (*k, C_in, C_out). On
GPU/TPU the native ops are the right choice; `dispatch.resolve_impl` picks this module on CPU
(`cpu_fast`, and `onednn` for what the oneDNN shim does not take).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from unet_ds.models.ops import common
from unet_ds.models.ops import upsampling

Pads = common.Pads


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
  strides = common.check_conv_args(x, kernel, strides, 'xla_cpu.conv')
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f"xla_cpu.conv: padding must be 'SAME' or 'VALID', got {padding!r}")
  if padding == 'VALID' and any(n < k for n, k in zip(x.shape[1:-1], kernel.shape[:-2])):
    raise ValueError(f'xla_cpu.conv: kernel {kernel.shape[:-2]} larger than the input '
                     f'{x.shape[1:-1]} with VALID padding')
  pads = tuple(lax.padtype_to_pads(x.shape[1:-1], kernel.shape[:-2], strides, padding))
  if native_below_flops and _conv_flops(x, kernel, strides, pads) < native_below_flops:
    return common.native_conv(x, kernel, strides, pads)
  return _conv(x, kernel, strides, pads)


def _conv_flops(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Pads) -> int:
  out = [(n + lo + hi - k) // s + 1
         for n, k, s, (lo, hi) in zip(x.shape[1:-1], kernel.shape[:-2], strides, pads)]
  return 2 * x.shape[0] * math.prod(out) * math.prod(kernel.shape)


def conv_transpose(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int]) -> jax.Array:
  """`upsampling.conv_transpose` with its phase conv (when k > s) through `conv`'s rewrites."""
  return upsampling.conv_transpose(x, kernel, strides=strides, phase_conv=_phase_conv)


def _phase_conv(x: jax.Array, kernel: jax.Array, pads: Pads) -> jax.Array:
  return _conv(x, kernel, (1,) * (x.ndim - 2), pads)


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
  return upsampling.channel_matmul(x, kernel.reshape(kernel.shape[-2:]))


def _conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...], pads: Pads) -> jax.Array:
  """Native 2D conv; a strided one gets the sub-pixel input gradient (no input dilation)."""
  if all(s == 1 for s in strides):
    return common.native_conv(x, kernel, strides, pads)
  return _strided_conv2d(x, kernel, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv2d(x, kernel, strides, pads):
  return common.native_conv(x, kernel, strides, pads)


def _strided_conv2d_fwd(x, kernel, strides, pads):
  return common.native_conv(x, kernel, strides, pads), (x, kernel)


def _strided_conv2d_bwd(strides, pads, res, dy):
  x, kernel = res
  dx = _input_grad(dy, kernel, strides, pads, x.shape[1:-1]).astype(x.dtype)
  # The native kernel gradient of a 2D conv has no input dilation and is fine.
  _, kernel_vjp = jax.vjp(lambda k: common.native_conv(x, k, strides, pads), kernel)
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
  out_dtype = common.out_dtype(x, kernel)
  acc = None
  for t in range(kd):
    xs = lax.slice_in_dim(xp, t, t + (d_out - 1) * sd + 1, sd, axis=1)
    y = common.native_conv(xs.reshape(n * d_out, h, w, c), kernel[t], strides[1:], pads[1:],
                           preferred_element_type=common.acc_dtype(out_dtype))
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
  out_dtype = common.out_dtype(x, kernel)
  zero = jnp.zeros((), common.acc_dtype(out_dtype))
  y = None
  for t in range(kd):
    z = common.native_conv(x.reshape(n * d, h, w, c), kernel[t], strides[1:], pads[1:],
                           preferred_element_type=common.acc_dtype(out_dtype))
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
  out_dtype = common.out_dtype(x, kernel)
  stacked = jnp.moveaxis(kernel, 0, -2).reshape(kernel.shape[1:3] + (c, kd * o))
  z = common.native_conv(x.reshape(n * d, h, w, c), stacked, strides[1:], pads[1:],
                         preferred_element_type=common.acc_dtype(out_dtype))
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
  return upsampling.scatter_taps(dy, kernel_t, strides, tuple(in_size), lows, _phase_conv)



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
  acc_dtype = common.acc_dtype(jnp.result_type(x.dtype, dy.dtype))
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
  acc_dtype = common.acc_dtype(jnp.result_type(x.dtype, dy.dtype))
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

