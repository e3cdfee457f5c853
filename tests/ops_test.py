"""The ops package: XLA:CPU rewrites, fused ops and upsampling equal the native ops (values and
gradients, 2D/3D, shapes, strides, dtypes); dispatch; XLA flags set only by the explicit call."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from unet_ds.models import layers
from unet_ds.models import ops
from unet_ds.models.ops import fused
from unet_ds.models.ops import upsampling
from unet_ds.models.ops import xla_cpu


def _normal(shape, seed=0):
  # numpy, not jax.random: XLA takes seconds to compile a large jax.random.normal.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _dn(rank):
  return layers.dimension_numbers(rank)


def _native_conv(strides, padding):
  return lambda x, k: lax.conv_general_dilated(x, k, strides, padding,
                                               dimension_numbers=_dn(x.ndim - 2))


def _fast_conv(strides, padding):
  # native_below_flops=0: these shapes are tiny, test the rewritten ops, not the fallback.
  return lambda x, k: xla_cpu.conv(x, k, strides=strides, padding=padding,
                                    native_below_flops=0)


def _native_transpose(strides):
  return lambda x, k: lax.conv_transpose(x, k, strides, 'VALID', dimension_numbers=_dn(x.ndim - 2))


def _fast_transpose(strides, module=xla_cpu):
  # xla_cpu: the phase conv through the rewrites; upsampling: through the native conv (GPU form).
  return lambda x, k: module.conv_transpose(x, k, strides=strides)


def _assert_same_op(native, fast, x_shape, k_shape, rtol=1e-5, dtype=jnp.float32, seed=0):
  """Same output shape and values, and same VJP w.r.t. input and kernel."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), dtype)
  k = jnp.asarray(rng.standard_normal(k_shape), dtype)
  out = jax.eval_shape(native, x, k)
  dy = jnp.asarray(rng.standard_normal(out.shape), dtype)

  @functools.partial(jax.jit, static_argnames='op')
  def value_and_vjp(x, k, dy, *, op):
    y, vjp = jax.vjp(op, x, k)
    return (y,) + vjp(dy)

  expected = value_and_vjp(x, k, dy, op=native)
  got = value_and_vjp(x, k, dy, op=fast)
  assert got[0].shape == out.shape and got[0].dtype == out.dtype
  for a, b in zip(expected, got):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    scale = max(np.abs(a).max(), 1e-6)
    np.testing.assert_allclose(b / scale, a / scale, rtol=0, atol=rtol)


CONV_CASES = [
    # x shape, kernel shape, strides, padding
    ((2, 7, 6, 5, 3), (3, 3, 3, 3, 4), (1, 1, 1), 'SAME'),
    ((2, 7, 6, 5, 3), (3, 3, 3, 3, 4), (2, 2, 2), 'SAME'),    # odd sizes, strided
    ((1, 8, 9, 10, 2), (3, 3, 3, 2, 5), (2, 1, 2), 'SAME'),   # strides differ per axis
    ((1, 6, 5, 7, 2), (5, 5, 5, 2, 3), (1, 1, 1), 'SAME'),
    ((1, 6, 5, 7, 4), (3, 3, 3, 4, 2), (1, 2, 1), 'SAME'),    # C_in > C_out: stacked taps
    ((1, 9, 8, 7, 2), (1, 1, 1, 2, 3), (2, 2, 2), 'SAME'),    # strided 1x1x1 projection
    ((2, 6, 7, 8, 1), (3, 3, 3, 1, 4), (1, 1, 1), 'SAME'),    # 1-channel input: depth taps on channels
    ((1, 5, 6, 4, 3), (3, 3, 3, 3, 17), (1, 1, 1), 'SAME'),   # C_out > 16: shifted 2D convs
    ((1, 6, 5, 4, 3), (3, 3, 3, 3, 17), (1, 2, 1), 'VALID'),
    ((2, 6, 5, 7, 3), (3, 3, 3, 3, 2), (1, 1, 1), 'VALID'),
    ((1, 7, 6, 9, 1), (3, 3, 3, 1, 2), (2, 1, 2), 'VALID'),
    ((1, 8, 9, 10, 2), (1, 3, 3, 2, 3), (1, 2, 2), 'SAME'),   # anisotropic kernel
    ((2, 7, 6, 5, 3), (3, 3, 3, 3, 4), (2, 2, 2), 'VALID'),
    ((2, 7, 6, 3), (3, 3, 3, 4), (2, 2), 'SAME'),             # 2D strided: sub-pixel input grad
    ((2, 9, 6, 3), (4, 4, 3, 4), (3, 2), 'SAME'),
]


@pytest.mark.parametrize('x_shape,k_shape,strides,padding', CONV_CASES)
def test_conv_matches_native(x_shape, k_shape, strides, padding):
  _assert_same_op(_native_conv(strides, padding), _fast_conv(strides, padding), x_shape, k_shape)


TRANSPOSE_CASES = [
    ((2, 3, 4, 5, 3), (2, 2, 2, 3, 4), (2, 2, 2)),   # the U-Net's upsampling
    ((2, 3, 4, 5, 3), (3, 3, 3, 3, 4), (2, 2, 2)),   # k > s: overlapping taps
    ((2, 3, 4, 5, 3), (3, 2, 1, 3, 4), (1, 2, 3)),   # k < s on one axis
    ((2, 3, 4, 3), (4, 3, 3, 4), (2, 3)),
]


@pytest.mark.parametrize('module', [xla_cpu, upsampling], ids=['xla_cpu', 'upsampling'])
@pytest.mark.parametrize('x_shape,k_shape,strides', TRANSPOSE_CASES)
def test_conv_transpose_matches_native(x_shape, k_shape, strides, module):
  _assert_same_op(_native_transpose(strides), _fast_transpose(strides, module), x_shape, k_shape)


def test_conv_transpose_matches_flax_module():
  x = _normal((1, 3, 4, 5, 2))
  module = nn.ConvTranspose(3, (2, 2, 2), strides=(2, 2, 2), padding='VALID', use_bias=False)
  variables = module.init(jax.random.key(1), x)
  y = xla_cpu.conv_transpose(x, variables['params']['kernel'], strides=(2, 2, 2))
  np.testing.assert_allclose(y, module.apply(variables, x), atol=1e-5)
  # Each input voxel lands on its own 2x2x2 block, through the spatially flipped kernel.
  kernel = variables['params']['kernel']
  np.testing.assert_allclose(y[0, 1, 0, 2], x[0, 0, 0, 1] @ kernel[0, 1, 1], atol=1e-5)


def test_bfloat16_inputs_match_native():
  _assert_same_op(_native_conv((1, 1, 1), 'SAME'), _fast_conv((1, 1, 1), 'SAME'),
                  (1, 6, 6, 6, 4), (3, 3, 3, 4, 4), rtol=2e-2, dtype=jnp.bfloat16)


def test_kernel_grad_chunks_long_rows():
  # More rows than one chunk of the weight-gradient scan (8192), and not a multiple of it.
  _assert_same_op(_native_conv((1, 1, 1), 'SAME'), _fast_conv((1, 1, 1), 'SAME'),
                  (1, 21, 21, 21, 3), (1, 1, 1, 3, 2))


@pytest.mark.parametrize('shape,window', [
    ((2, 8, 6, 4, 3), (2, 2, 2)),
    ((2, 9, 7, 5, 3), (2, 2, 2)),   # odd sizes: VALID drops the remainder
    ((1, 8, 6, 3), (2, 2)),
    ((1, 9, 9, 2), (3, 3)),
    ((1, 8, 6, 4, 2), (2, 3, 1)),
])
@pytest.mark.parametrize('ties', [False, True])
def test_max_pool_matches_flax(shape, window, ties):
  x = _normal(shape)
  if ties:  # many equal maxima: the gradient must go to the first one, as select_and_scatter
    x = jnp.round(x)
  y0, vjp0 = jax.vjp(lambda x: nn.max_pool(x, window, strides=window), x)
  y1, vjp1 = jax.vjp(lambda x: fused.max_pool(x, window), x)
  dy = _normal(seed=1, shape=y0.shape)
  np.testing.assert_array_equal(y1, y0)
  np.testing.assert_array_equal(vjp1(dy)[0], vjp0(dy)[0])


@pytest.mark.parametrize('shape,slope,dtype', [
    ((2, 5, 6, 7, 3), 0.01, jnp.float32),   # leaky ReLU, 3D
    ((2, 5, 6, 7, 3), 0.0, jnp.float32),    # ReLU
    ((1, 4, 5, 2), None, jnp.float32),      # no activation, 2D
    ((2, 6, 6, 6, 4), 0.01, jnp.bfloat16),  # statistics in float32, output in bfloat16
])
def test_instance_norm_act_matches_flax(shape, slope, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, dtype)  # nonzero mean: tests centring
  scale, bias = (jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32) for _ in range(2))
  module_dtype = dtype if dtype == jnp.bfloat16 else None

  def native(x, scale, bias):
    y = nn.InstanceNorm(dtype=module_dtype).apply({'params': {'scale': scale, 'bias': bias}}, x)
    return y if slope is None else nn.leaky_relu(y, slope)

  def fused_op(x, scale, bias):
    return fused.instance_norm_act(x, scale, bias, negative_slope=slope, dtype=module_dtype)

  y0, vjp0 = jax.vjp(native, x, scale, bias)
  y1, vjp1 = jax.vjp(fused_op, x, scale, bias)
  assert y1.dtype == y0.dtype and y1.shape == y0.shape
  dy = jnp.asarray(rng.standard_normal(shape), y0.dtype)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for a, b in zip((y0,) + vjp0(dy), (y1,) + vjp1(dy)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale_ab = max(np.abs(a).max(), 1e-6)
    np.testing.assert_allclose(b / scale_ab, a / scale_ab, rtol=0, atol=tol)


def test_instance_norm_act_bad_shapes():
  with pytest.raises(ValueError, match=r'scale \(3,\)'):
    fused.instance_norm_act(jnp.zeros((1, 4, 4, 2)), jnp.ones(3), jnp.zeros(3),
                               negative_slope=0.01)


def test_second_order_grad_matches_native():
  # The custom VJPs stay differentiable (e.g. for gradient penalties).
  x = _normal((1, 4, 5, 6, 2))
  k = _normal(seed=1, shape=(3, 3, 3, 2, 2))

  def grad_of_grad_norm(conv):
    def penalty(k):
      return jnp.sum(jax.grad(lambda x: jnp.sum(conv(x, k) ** 2))(x) ** 2)
    return jax.jit(jax.grad(penalty))

  g0 = grad_of_grad_norm(_native_conv((1, 1, 1), 'SAME'))(k)
  g1 = grad_of_grad_norm(_fast_conv((1, 1, 1), 'SAME'))(k)
  np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-4 * float(jnp.abs(g0).max()))


@pytest.mark.parametrize('x_shape,k_shape,strides,match', [
    ((2, 4, 4, 4), (3, 3, 3, 4, 4), (1, 1, 1), 'rank of x'),
    ((2, 4, 4, 4, 3), (3, 3, 3, 2, 4), (1, 1, 1), 'C_in 2'),
    ((2, 4, 4, 4, 3), (3, 3, 3, 3, 4), (1, 1), 'one positive stride'),
    ((2, 4, 4, 3), (3, 3, 3, 4), (0, 1), 'one positive stride'),
    ((4, 4, 3), (3, 3, 3, 4), (1, 1), '2 or 3 spatial dims'),
])
def test_bad_shapes_raise_before_compute(x_shape, k_shape, strides, match):
  with pytest.raises(ValueError, match=match):
    xla_cpu.conv(jnp.zeros(x_shape), jnp.zeros(k_shape), strides=strides)


def test_bad_padding_and_pool_window_raise():
  with pytest.raises(ValueError, match='padding'):
    xla_cpu.conv(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), strides=(1, 1),
                  padding='CIRCULAR')
  with pytest.raises(ValueError, match='larger than the input'):
    xla_cpu.conv(jnp.zeros((1, 2, 4, 1)), jnp.zeros((3, 3, 1, 1)), strides=(1, 1),
                  padding='VALID')
  with pytest.raises(ValueError, match='window'):
    fused.max_pool(jnp.zeros((1, 4, 4, 1)), (2, 2, 2))


def test_tiny_convs_fall_back_to_native():
  x, k = _normal((1, 4, 4, 4, 2)), _normal((3, 3, 3, 2, 3), seed=1)
  hlo = jax.jit(lambda x, k: xla_cpu.conv(x, k, strides=(1, 1, 1))).lower(x, k).as_text()
  assert hlo.count('convolution') == 1  # the one native 3D conv
  hlo = jax.jit(lambda x, k: xla_cpu.conv(x, k, strides=(1, 1, 1), native_below_flops=0)
                ).lower(x, k).as_text()
  convs = [l for l in hlo.splitlines() if 'stablehlo.convolution' in l]
  assert convs and all('x[0, 1, i, o]' in l for l in convs)  # 2D convs only


def test_layers_route_cpu_fast_and_resolve_auto():
  x = _normal((1, 4, 4, 4, 2))
  k = _normal(seed=1, shape=(3, 3, 3, 2, 3))
  np.testing.assert_allclose(layers.conv(x, k, (1, 1, 1), 'cpu_fast'),
                             layers.conv(x, k, (1, 1, 1), 'native'), atol=1e-5)
  expected = 'cpu_fast' if jax.default_backend() == 'cpu' else 'native_einsum_up'
  assert layers.resolve_impl('auto') == expected
  with pytest.raises(ValueError, match='conv_impl'):
    layers.resolve_impl('fast')


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize('k_shape,strides,fast_impls', [
    ((2, 2, 2, 3, 4), (2, 2, 2), ('native_einsum_up', 'cpu_fast', 'onednn')),  # k == s: einsum
    ((3, 3, 3, 3, 4), (2, 2, 2), ('cpu_fast', 'onednn')),           # k != s: sub-pixel on CPU
])
def test_layers_conv_transpose_dispatch(k_shape, strides, fast_impls):
  x = _normal((1, 3, 4, 5, 3))
  k = _normal(seed=1, shape=k_shape)
  expected = _native_transpose(strides)(x, k)
  for impl in layers.IMPLS[1:]:
    op = functools.partial(layers.conv_transpose, strides=strides, impl=impl)
    np.testing.assert_allclose(op(x, k), expected, atol=1e-5)
    # The native op is a convolution with input dilation; the fast forms have none.
    assert ('lhs_dilate = [2, 2, 2]' in _hlo(op, x, k)) == (impl not in fast_impls), impl


def test_layers_max_pool_dispatch():
  x = jnp.round(_normal((2, 4, 6, 4, 3)))  # ties: gradients must agree too
  window = (2, 2, 2)
  y0, vjp0 = jax.vjp(lambda x: nn.max_pool(x, window, strides=window), x)
  dy = _normal(seed=1, shape=y0.shape)
  for impl in layers.IMPLS[1:]:
    y1, vjp1 = jax.vjp(lambda x, impl=impl: layers.max_pool(x, window, impl), x)
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(vjp1(dy)[0], vjp0(dy)[0])
    # cpu_fast (and onednn) reshape and reduce; the others keep XLA's reduce-window.
    hlo = _hlo(lambda x, impl=impl: layers.max_pool(x, window, impl), x)
    assert ('reduce_window' in hlo) == (not layers.uses_fused_cpu_ops(impl)), impl


def test_xla_cpu_flags_added_unless_user_set(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  ops.configure_xla_flags()
  flags = os.environ['XLA_FLAGS'].split()
  assert flags[0] == '--xla_force_host_platform_device_count=4'
  assert ('--xla_cpu_experimental_ynn_fusion_type='
          'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE') in flags
  user = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'
  monkeypatch.setenv('XLA_FLAGS', user)
  ops.configure_xla_flags()
  assert os.environ['XLA_FLAGS'] == user


def test_importing_the_model_leaves_xla_flags_alone():
  code = ('import os; os.environ["XLA_FLAGS"] = "--user"; '
          'import unet_ds.models, unet_ds.models.layers, unet_ds.models.ops.dispatch; '
          'print(os.environ["XLA_FLAGS"])')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       timeout=120)
  assert out.stdout.split() == ['--user']
