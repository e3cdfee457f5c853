"""oneDNN convolutions for XLA:CPU, as XLA FFI custom calls (`conv_impl='onednn'`).

XLA:CPU has no fast 3D convolution: `xla_cpu` rebuilds one from 2D convs and matmuls, but its
kernel gradients run at ~150 GFLOP/s where oneDNN's direct convolutions (what PyTorch, and so
MONAI, use on CPU) reach ~300-400 on the same cores. This module compiles a small C++ shim
(`onednn_conv.cc`: forward, backward-data and backward-weights primitives on the model's
channels-last buffers, no copies of the volume) against the oneDNN of the `onednn-cpu-gomp`
wheel, registers it with XLA, and exposes `conv` with a custom VJP. The same shim runs linear
upsampling (`resize_linear`, oneDNN's resampling forward and backward): `jax.image.resize`
contracts each axis with a dense (in, out) matrix, where resampling takes 2 taps per axis.

The shim is built once per source / jaxlib / oneDNN version with the system C++ compiler
(`$CXX` or `g++`, a few seconds) into `$UNET_DS_CACHE_DIR/onednn` (default
`~/.cache/unet_ds/onednn`). `available()` says whether it could be built and why not; the
model falls back to `cpu_fast` (`conv_impl='auto'`) when it can't.

Under `jax.vmap` (K runs trained together, `unet_ds.multirun`) each op stays one custom call that
takes every member (the mapped dims in front of each operand); the shim runs the members' K
independent convolutions side by side, one per core, where a loop of calls would run K small
convolutions each spread thinly over every core.

Float32 only (other dtypes go through `xla_cpu`). The custom call has no SPMD partitioning
rule, so XLA would gather sharded operands onto each device: `conv_impl='auto'` picks it only
when a single device runs the model.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'onednn_conv.cc')
_TARGETS = {  # FFI target name -> exported handler symbol
    'unet_ds_onednn_conv_fwd': 'UnetDsConvForward',
    'unet_ds_onednn_conv_bwd_data': 'UnetDsConvBackwardData',
    'unet_ds_onednn_conv_bwd_weights': 'UnetDsConvBackwardWeights',
    'unet_ds_onednn_resample_fwd': 'UnetDsResampleForward',
    'unet_ds_onednn_resample_bwd': 'UnetDsResampleBackward',
}

# -fopenmp: the shim sets the OpenMP thread count oneDNN (GNU OpenMP build) plans and runs with.
_CXX_FLAGS = ('-O2', '-std=c++17', '-fopenmp', '-shared', '-fPIC')


def cache_dir() -> str:
  root = os.environ.get('UNET_DS_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'unet_ds')
  return os.path.join(root, 'onednn')


def _find_onednn() -> tuple[str, str]:
  """(include dir, lib dir) of an installed oneDNN; raises FileNotFoundError naming the paths."""
  prefixes = [sys.prefix, sys.base_prefix, '/usr/local', '/usr']
  for prefix in dict.fromkeys(prefixes):
    include = os.path.join(prefix, 'include')
    for lib in ('lib', 'lib64', os.path.join('lib', 'x86_64-linux-gnu')):
      lib_dir = os.path.join(prefix, lib)
      if (os.path.exists(os.path.join(include, 'oneapi', 'dnnl', 'dnnl.hpp'))
          and os.path.exists(os.path.join(lib_dir, 'libdnnl.so'))):
        return include, lib_dir
  raise FileNotFoundError(
      'oneDNN headers and library not found (looked for include/oneapi/dnnl/dnnl.hpp and '
      f'lib/libdnnl.so under {prefixes}); pip install onednn-cpu-gomp onednn-devel-cpu-gomp '
      '(see requirements.txt)')


def _build() -> str:
  """Compiles the shim if needed; returns the path of the shared library."""
  include, lib_dir = _find_onednn()
  cxx = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not cxx:
    raise FileNotFoundError('no C++ compiler found (set $CXX or install g++)')
  with open(_SOURCE, 'rb') as f:
    source = f.read()
  lib_file = os.path.realpath(os.path.join(lib_dir, 'libdnnl.so'))
  key = hashlib.sha256(b'\0'.join([
      source, importlib.metadata.version('jaxlib').encode(), lib_file.encode(), cxx.encode(),
      ' '.join(_CXX_FLAGS).encode(),
  ])).hexdigest()[:16]
  out = os.path.join(cache_dir(), key, 'libunet_ds_onednn.so')
  if os.path.exists(out):
    return out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  # Build beside the target and rename: concurrent processes (test workers) never see a
  # half-written library.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(out))
  os.close(fd)
  cmd = [cxx, *_CXX_FLAGS, '-o', tmp, _SOURCE,
         f'-I{jax.ffi.include_dir()}', f'-I{include}', f'-L{lib_dir}', '-ldnnl',
         f'-Wl,-rpath,{lib_dir}']
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
      raise RuntimeError(f'building {_SOURCE} failed ({" ".join(cmd)}):\n{result.stderr[-2000:]}')
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


@functools.cache
def _load() -> tuple[bool, str]:
  """Builds, loads and registers the shim once per process: (ok, reason if not)."""
  if os.environ.get('UNET_DS_DISABLE_ONEDNN'):
    return False, 'disabled by $UNET_DS_DISABLE_ONEDNN'
  try:
    # Threads that wait between oneDNN calls must not spin on the cores XLA's own ops use next.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    lib = ctypes.CDLL(_build())
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return False, f'{type(e).__name__}: {e}'
  return True, ''


def available() -> bool:
  """Whether the oneDNN convolutions can run here (built and registered on first call)."""
  return _load()[0]


def unavailable_reason() -> str:
  """Why `available()` is False ('' when it is True)."""
  return _load()[1]


def _require_float32(x: jax.Array, kernel: jax.Array, op: str) -> None:
  """The checks every entry point makes first: the shim is built, and the dtypes it takes."""
  if not available():
    raise RuntimeError(f'conv_impl=onednn is not available here: {unavailable_reason()}')
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise ValueError(f'onednn.{op}: float32 only, got x {x.dtype}, kernel {kernel.dtype}')


def conv(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int],
         padding: str = 'SAME') -> jax.Array:
  """Channels-last float32 convolution, equal to `lax.conv_general_dilated` up to rounding.

  Args:
    x: [N, *spatial, C_in], 2 or 3 spatial dims, float32.
    kernel: [*k, C_in, C_out] (flax layout), float32.
    strides: one stride per spatial dim.
    padding: 'SAME' or 'VALID' (XLA's meaning).

  Returns:
    [N, *out_spatial, C_out] float32.
  """
  _require_float32(x, kernel, 'conv')
  strides = tuple(int(s) for s in strides)
  if x.ndim not in (4, 5) or kernel.ndim != x.ndim or kernel.shape[-2] != x.shape[-1]:
    raise ValueError(f'onednn.conv: need x [N, *spatial, C] with 2 or 3 spatial dims and kernel '
                     f'[*k, C, O] of the same rank; got x {x.shape}, kernel {kernel.shape}')
  if len(strides) != x.ndim - 2 or min(strides) < 1:
    raise ValueError(f'onednn.conv: need one positive stride per spatial dim of x {x.shape}, '
                     f'got {strides}')
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f"onednn.conv: padding must be 'SAME' or 'VALID', got {padding!r}")
  pads = tuple(lax.padtype_to_pads(x.shape[1:-1], kernel.shape[:-2], strides, padding))
  if any(lo < 0 or hi < 0 for lo, hi in pads) or any(
      n + lo + hi < k for n, k, (lo, hi) in zip(x.shape[1:-1], kernel.shape[:-2], pads)):
    raise ValueError(f'onednn.conv: kernel {kernel.shape[:-2]} larger than the padded input '
                     f'{x.shape[1:-1]} ({padding})')
  return _conv(x, kernel, strides, pads)


def _out_shape(x_shape, k_shape, strides, pads) -> tuple[int, ...]:
  spatial = tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi)
                  in zip(x_shape[1:-1], k_shape[:-2], strides, pads))
  return (x_shape[0],) + spatial + (k_shape[-1],)


def _call(target: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array,
          strides: tuple[int, ...], pads) -> jax.Array:
  # Under vmap (multi-run training) one call takes every member, each operand given the mapped
  # dims in front ('broadcast_all'); the shim runs the members side by side on the cores.
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='broadcast_all')(
      a, b, strides=np.asarray(strides, np.int64),
      pad_lo=np.asarray([lo for lo, _ in pads], np.int64),
      pad_hi=np.asarray([hi for _, hi in pads], np.int64))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, pads):
  return _call('unet_ds_onednn_conv_fwd', _out_shape(x.shape, kernel.shape, strides, pads),
               x, kernel, strides, pads)


def _conv_fwd(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, res, dy):
  x, kernel = res
  dx = _call('unet_ds_onednn_conv_bwd_data', x.shape, dy, kernel, strides, pads)
  dk = _call('unet_ds_onednn_conv_bwd_weights', kernel.shape, x, dy, strides, pads)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_transpose(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int]) -> jax.Array:
  """Transposed conv with kernel == stride, equal to `upsampling.conv_transpose` up to rounding.

  That is flax `ConvTranspose(padding='VALID')`'s op, `y[i * s + t] = x[i] @ kernel[k - 1 - t]`
  (output size `in * s`): the input gradient of a stride-s VALID conv whose kernel is `kernel`
  flipped in space with C_in and C_out swapped, so the same three primitives serve it (the
  forward is oneDNN's backward-data, its gradients the forward and backward-weights).

  Args:
    x: [N, *spatial, C_in] float32.
    kernel: [*k, C_in, C_out] float32 with k == strides.
    strides: one stride per spatial dim.

  Returns:
    [N, *(spatial * strides), C_out] float32.
  """
  _require_float32(x, kernel, 'conv_transpose')
  strides = tuple(int(s) for s in strides)
  if (x.ndim not in (4, 5) or kernel.ndim != x.ndim or kernel.shape[-2] != x.shape[-1]
      or tuple(kernel.shape[:-2]) != strides):
    raise ValueError(f'onednn.conv_transpose: need x [N, *spatial, C], kernel [*k, C, O] with '
                     f'k == strides; got x {x.shape}, kernel {kernel.shape}, strides {strides}')
  rank = x.ndim - 2
  adjoint = jnp.swapaxes(kernel[(slice(None, None, -1),) * rank], -1, -2)
  return _upsample(x, adjoint, strides)


def _up_shape(x_shape, k_shape, strides):
  return (x_shape[0],) + tuple(n * s for n, s in zip(x_shape[1:-1], strides)) + (k_shape[-2],)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _upsample(x, adjoint, strides):
  pads = ((0, 0),) * len(strides)
  return _call('unet_ds_onednn_conv_bwd_data', _up_shape(x.shape, adjoint.shape, strides),
               x, adjoint, strides, pads)


def _upsample_fwd(x, adjoint, strides):
  return _upsample(x, adjoint, strides), (x, adjoint)


def _upsample_bwd(strides, res, dy):
  x, adjoint = res
  pads = ((0, 0),) * len(strides)
  dx = _call('unet_ds_onednn_conv_fwd', x.shape, dy, adjoint, strides, pads)
  dadjoint = _call('unet_ds_onednn_conv_bwd_weights', adjoint.shape, dy, x, strides, pads)
  return dx, dadjoint


_upsample.defvjp(_upsample_fwd, _upsample_bwd)


def resize_linear(x: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """Linear upsampling, equal to `jax.image.resize(x, ..., 'linear')` up to rounding.

  oneDNN's linear resampling takes half-pixel centres and clamps source indices at the edges;
  jax renormalises the edge weights instead. When every output size is >= its input size both
  give an output beyond the outermost input centre all its weight on that input, so the
  functions agree; downsampling differs (jax antialiases), hence upsampling only.

  Args:
    x: [N, *spatial, C], 2 or 3 spatial dims, float32.
    spatial_shape: the output's spatial sizes, each >= the input's.

  Returns:
    [N, *spatial_shape, C] float32.
  """
  if not available():
    raise RuntimeError(f'conv_impl=onednn is not available here: {unavailable_reason()}')
  spatial_shape = tuple(int(s) for s in spatial_shape)
  if x.dtype != jnp.float32:
    raise ValueError(f'onednn.resize_linear: float32 only, got {x.dtype}')
  if x.ndim not in (4, 5) or len(spatial_shape) != x.ndim - 2:
    raise ValueError(f'onednn.resize_linear: need x [N, *spatial, C] with 2 or 3 spatial dims '
                     f'and one output size per spatial dim; got x {x.shape}, {spatial_shape}')
  if any(o < i for o, i in zip(spatial_shape, x.shape[1:-1])):
    raise ValueError(f'onednn.resize_linear: upsampling only, got {x.shape[1:-1]} -> '
                     f'{spatial_shape}')
  y_shape = (x.shape[0], *spatial_shape, x.shape[-1])
  return _resize_linear(x, (tuple(x.shape), y_shape))


def _resample_call(target: str, shape: tuple[int, ...], a: jax.Array) -> jax.Array:
  # Under vmap the shim folds the mapped dims into the batch (members are independent images).
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='broadcast_all')(a, spatial_dims=np.int64(len(shape) - 2))


# `shapes` = (x's shape, y's shape), static: the resize is linear, so the backward needs no
# residual but x's shape.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _resize_linear(x, shapes):
  return _resample_call('unet_ds_onednn_resample_fwd', shapes[1], x)


def _resize_linear_fwd(x, shapes):
  return _resize_linear(x, shapes), None


def _resize_linear_bwd(shapes, _, dy):
  return (_resample_call('unet_ds_onednn_resample_bwd', shapes[0], dy),)


_resize_linear.defvjp(_resize_linear_fwd, _resize_linear_bwd)
