"""oneDNN convolutions (conv_impl=onednn) equal the native ops: values and gradients, 2D/3D."""

import functools
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from unet_ds import config_lib
from unet_ds import models
from unet_ds import sharding
from unet_ds import train
from unet_ds.models import layers
from unet_ds.models.ops import onednn


def _native(strides, padding):
  return lambda x, k: lax.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=layers.dimension_numbers(x.ndim - 2))


def _values_and_grads(op, x, k, dy):
  y, vjp = jax.vjp(op, x, k)
  return (y,) + vjp(dy)


def test_builds_and_registers_here():
  # requirements.txt installs oneDNN and the machine has g++: CI must exercise the real path.
  assert onednn.available(), onednn.unavailable_reason()
  assert os.path.exists(onednn.cache_dir())


@pytest.mark.parametrize('x_shape,k_shape,strides,padding', [
    ((2, 8, 8, 8, 3), (3, 3, 3, 3, 4), (1, 1, 1), 'SAME'),
    ((1, 9, 7, 6, 2), (3, 3, 3, 2, 5), (2, 2, 2), 'SAME'),     # odd sizes, stride 2
    ((2, 8, 6, 8, 4), (3, 1, 3, 4, 3), (1, 2, 1), 'SAME'),     # anisotropic kernel and stride
    ((1, 7, 8, 9, 3), (3, 3, 3, 3, 2), (1, 1, 1), 'VALID'),
    ((2, 6, 6, 6, 1), (3, 3, 3, 1, 16), (1, 1, 1), 'SAME'),    # one input channel (the image)
    ((2, 4, 4, 4, 8), (1, 1, 1, 8, 3), (1, 1, 1), 'SAME'),     # 1x1x1 head
    ((3, 10, 12, 3), (3, 3, 3, 4), (1, 1), 'SAME'),            # 2D
    ((2, 11, 9, 2), (3, 3, 2, 3), (2, 2), 'SAME'),             # 2D, odd, stride 2
])
def test_conv_equals_native(x_shape, k_shape, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
  native = _native(strides, padding)
  out = jax.eval_shape(native, x, k)
  dy = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  fast = functools.partial(onednn.conv, strides=strides, padding=padding)
  expected = jax.jit(functools.partial(_values_and_grads, native))(x, k, dy)
  got = jax.jit(functools.partial(_values_and_grads, fast))(x, k, dy)
  for name, a, b in zip(('y', 'dx', 'dk'), expected, got):
    assert b.shape == a.shape and b.dtype == a.dtype, name
    scale = float(jnp.abs(a).max())
    np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=2e-6,
                               err_msg=name)


def _assert_close(got, want, name):
  assert got.shape == want.shape, name
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=2e-6,
                             err_msg=name)


def _conv_transpose_native(strides):
  return lambda x, k: lax.conv_transpose(
      x, k, strides, 'VALID', dimension_numbers=layers.dimension_numbers(x.ndim - 2))


# Multi-run training vmaps the model over K runs: one batched call runs every member (side by
# side on the cores); each member must equal its own native conv, values and both gradients.
@pytest.mark.parametrize('op,members,x_shape,k_shape,strides', [
    ('conv', (3,), (2, 6, 5, 6, 2), (3, 3, 3, 2, 4), (1, 1, 1)),
    ('conv', (4,), (1, 7, 6, 5, 3), (3, 3, 3, 3, 2), (2, 2, 2)),   # stride 2, odd sizes
    ('conv', (2, 3), (2, 4, 4, 4, 2), (1, 1, 1, 2, 3), (1, 1, 1)),  # nested vmap, 1x1x1 head
    ('conv', (5,), (2, 9, 8, 3), (3, 3, 3, 4), (1, 1)),            # 2D
    ('conv', (3,), (1, 9, 7, 2), (3, 3, 2, 5), (2, 2)),            # 2D, stride 2
    ('conv_transpose', (3,), (2, 3, 4, 3, 4), (2, 2, 2, 4, 3), (2, 2, 2)),
    ('conv_transpose', (4,), (2, 5, 3, 4), (2, 2, 4, 2), (2, 2)),  # 2D
])
def test_batched_members_equal_native_per_member(op, members, x_shape, k_shape, strides):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(members + x_shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(members + k_shape), jnp.float32)
  if op == 'conv':
    native = _native(strides, 'SAME')
    fast = functools.partial(onednn.conv, strides=strides)
  else:
    native = _conv_transpose_native(strides)
    fast = functools.partial(onednn.conv_transpose, strides=strides)
  out_shape = jax.eval_shape(native, x[(0,) * len(members)], k[(0,) * len(members)]).shape
  dy = jnp.asarray(rng.standard_normal(members + out_shape), jnp.float32)
  batched = functools.partial(_values_and_grads, fast)
  for _ in members:
    batched = jax.vmap(batched)
  hlo = jax.jit(batched).lower(x, k, dy).as_text()
  assert hlo.count('@unet_ds_onednn_conv') == 3 and 'while' not in hlo  # no per-member loop
  got = jax.jit(batched)(x, k, dy)
  for i in np.ndindex(*members):
    want = _values_and_grads(native, x[i], k[i], dy[i])
    for name, a, b in zip(('y', 'dx', 'dk'), want, got):
      _assert_close(b[i], a, f'{name} of member {i}')


def test_batched_input_with_one_kernel_equals_native():
  # vmap over the data only: the shared kernel is broadcast to every member.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((3, 2, 5, 5, 5, 2)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 4)), jnp.float32)
  fast = functools.partial(onednn.conv, strides=(1, 1, 1))
  native = _native((1, 1, 1), 'SAME')
  loss = lambda conv: lambda x, k: jnp.sum(jax.vmap(conv, in_axes=(0, None))(x, k) ** 2)
  want = jax.grad(loss(native), argnums=(0, 1))(x, k)
  got = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(x, k)
  for name, a, b in zip(('dx', 'dk'), want, got):
    _assert_close(b, a, name)


def test_batched_members_with_more_threads_than_cores_in_a_fresh_process():
  # OMP_NUM_THREADS=4: 3 members take 3 threads of 1, then 2 members 2 threads of 2 OpenMP
  # threads each (one pool worker sits out), then 5 members 4 threads; all equal native.
  code = """
import functools, jax, jax.numpy as jnp, numpy as np
from jax import lax
from unet_ds.models.ops import onednn
rng = np.random.default_rng(0)
fast = jax.jit(jax.vmap(functools.partial(onednn.conv, strides=(1, 1, 1))))
native = functools.partial(lax.conv_general_dilated, window_strides=(1, 1, 1), padding='SAME',
                           dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
for k in (3, 2, 5):
  x = jnp.asarray(rng.standard_normal((k, 2, 6, 5, 4, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, 3, 3, 3, 3, 4)), jnp.float32)
  got = fast(x, w)
  for i in range(k):
    np.testing.assert_allclose(got[i], native(x[i], w[i]), rtol=1e-4, atol=1e-4)
print('ok')
"""
  env = dict(os.environ, OMP_NUM_THREADS='4', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0 and out.stdout.split()[-1:] == ['ok'], out.stderr[-2000:]


@pytest.mark.parametrize('x_shape,k_shape,strides,dtype,match', [
    ((1, 4, 4, 4, 2), (3, 3, 3, 3, 4), (1, 1, 1), jnp.float32, r'kernel \(3, 3, 3, 3, 4\)'),
    ((1, 4, 4, 4, 2), (3, 3, 3, 2, 4), (1, 1), jnp.float32, 'one positive stride'),
    ((1, 4, 4, 4, 2), (3, 3, 3, 2, 4), (1, 1, 1), jnp.bfloat16, 'float32 only'),
    ((1, 4, 4, 2), (5, 5, 2, 4), (1, 1), jnp.float32, 'larger than the padded input'),
])
def test_bad_input_is_an_error_naming_the_shape(x_shape, k_shape, strides, dtype, match):
  x, k = jnp.zeros(x_shape, dtype), jnp.zeros(k_shape, dtype)
  padding = 'VALID' if 'larger' in match else 'SAME'
  with pytest.raises(ValueError, match=match):
    onednn.conv(x, k, strides=strides, padding=padding)


def test_layers_route_float32_convs_to_onednn_only():
  x = jnp.ones((1, 4, 4, 4, 2))
  k = jnp.ones((3, 3, 3, 2, 3))
  hlo = jax.jit(lambda x, k: layers.conv(x, k, (1, 1, 1), 'onednn')).lower(x, k).as_text()
  assert 'unet_ds_onednn_conv_fwd' in hlo
  # bfloat16 compute goes through xla_cpu (oneDNN shim is float32 only).
  xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  hlo = jax.jit(lambda x, k: layers.conv(x, k, (1, 1, 1), 'onednn')).lower(xb, kb).as_text()
  assert 'unet_ds_onednn' not in hlo
  np.testing.assert_allclose(layers.conv(x, k, (1, 1, 1), 'onednn'),
                             layers.conv(x, k, (1, 1, 1), 'native'), rtol=1e-6)
  assert layers.uses_fused_cpu_ops('onednn') and not layers.uses_fused_cpu_ops('native')


def test_auto_picks_onednn_on_one_cpu_device_only(monkeypatch):
  if jax.default_backend() != 'cpu':
    pytest.skip('auto resolves to native_einsum_up off CPU')
  assert layers.resolve_impl('auto') == 'cpu_fast'  # conftest simulates 4 devices
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  assert layers.resolve_impl('auto') == 'onednn'
  monkeypatch.setattr(onednn, '_load', lambda: (False, 'RuntimeError: no g++'))
  assert layers.resolve_impl('auto') == 'cpu_fast'
  with pytest.raises(ValueError, match='conv_impl=onednn is not available here: .*no g\\+\\+'):
    layers.resolve_impl('onednn')


def test_failed_build_names_the_command_and_keeps_no_partial_library(tmp_path, monkeypatch):
  monkeypatch.setenv('UNET_DS_CACHE_DIR', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')  # a "compiler" that always fails
  with pytest.raises(RuntimeError, match=r'building .*onednn_conv\.cc failed \(false '):
    onednn._build()
  leftovers = [f for _, _, files in os.walk(tmp_path) for f in files]
  assert leftovers == []


def test_disabled_by_environment_in_a_fresh_process():
  code = ('from unet_ds.models import layers; from unet_ds.models.ops import onednn; import jax; '
          'print(jax.device_count(), onednn.available(), layers.resolve_impl("auto"), '
          'onednn.unavailable_reason())')
  env = dict(os.environ, UNET_DS_DISABLE_ONEDNN='1', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
  assert out.split()[:3] == ['1', 'False', 'cpu_fast'], out
  assert 'UNET_DS_DISABLE_ONEDNN' in out


def test_training_with_onednn_matches_cpu_fast_and_loss_falls(data_dir):
  def run(impl, steps):
    c = config_lib.apply_args(config_lib.base_config(3), 'ds=deep,smoke')
    c.data.data_dir = data_dir
    c.mesh.data = 1
    c.model.conv_impl = impl
    c.optim.update(lr=1e-2, schedule='constant', warmup_steps=0)
    exp = train.Experiment.build(c, '/tmp/unused')
    state = exp.init_state()
    batch = sharding.shard_batch(exp.mesh, next(iter(exp.train_loader())))
    step = exp.jit_train_step()
    losses = []
    for _ in range(steps):
      state, m = step(state, batch)
      losses.append(float(m['loss']))
    return losses

  losses = run('onednn', 20)
  assert losses[-1] < 0.7 * losses[0], losses
  ref = run('cpu_fast', 3)
  np.testing.assert_allclose(losses[:3], ref, rtol=1e-4)


@pytest.mark.parametrize('x_shape,k_shape', [
    ((2, 4, 5, 3, 6), (2, 2, 2, 6, 3)),
    ((1, 3, 4, 4, 8), (2, 1, 2, 8, 5)),   # anisotropic: no upsampling along H
    ((3, 5, 6, 4), (2, 2, 4, 7)),         # 2D
])
def test_conv_transpose_equals_native(x_shape, k_shape):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
  strides = k_shape[:-2]
  native = _conv_transpose_native(strides)
  dy = jnp.asarray(rng.standard_normal(jax.eval_shape(native, x, k).shape), jnp.float32)
  fast = functools.partial(onednn.conv_transpose, strides=strides)
  expected = jax.jit(functools.partial(_values_and_grads, native))(x, k, dy)
  got = jax.jit(functools.partial(_values_and_grads, fast))(x, k, dy)
  for name, a, b in zip(('y', 'dx', 'dk'), expected, got):
    assert b.shape == a.shape, name
    scale = float(jnp.abs(a).max())
    np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=2e-6,
                               err_msg=name)
  hlo = jax.jit(lambda x, k: layers.conv_transpose(x, k, strides, 'onednn')).lower(x, k).as_text()
  assert 'unet_ds_onednn_conv_bwd_data' in hlo
  with pytest.raises(ValueError, match='k == strides'):
    onednn.conv_transpose(x, k, strides=(3,) * len(strides))


# Linear resizes: oneDNN resampling (half-pixel centres, clamped source indices) against
# jax.image.resize (renormalised edge weights): the same function when upsampling.
_needs_onednn = pytest.mark.skipif(not onednn.available(), reason='oneDNN shim not available')


def _jax_resize(spatial):
  return lambda x: jax.image.resize(x, (x.shape[0], *spatial, x.shape[-1]), 'linear')


@_needs_onednn
@pytest.mark.parametrize('x_shape,spatial', [
    ((2, 8, 8, 8, 3), (16, 16, 16)),      # x2
    ((1, 4, 5, 3, 2), (16, 20, 12)),      # x4, non-cubic
    ((2, 2, 3, 2, 4), (16, 24, 16)),      # x8
    ((1, 8, 8, 4, 3), (16, 16, 4)),       # anisotropic: factor 1 along the last axis
    ((1, 3, 5, 4, 2), (7, 11, 9)),        # non-integer factors
    ((3, 8, 6, 5), (16, 12)),             # 2D x2, non-square
    ((2, 4, 3, 2), (16, 12)),             # 2D x4
    ((1, 2, 4, 3), (16, 32)),             # 2D x8
    ((2, 8, 5, 3), (8, 20)),              # 2D anisotropic
])
def test_resize_linear_equals_jax_values_and_gradients(x_shape, spatial):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((x_shape[0], *spatial, x_shape[-1])), jnp.float32)

  def values_and_grad(op):
    y, vjp = jax.vjp(op, x)
    return y, vjp(dy)[0]

  want_y, want_dx = jax.jit(lambda: values_and_grad(_jax_resize(spatial)))()
  got_y, got_dx = jax.jit(lambda: values_and_grad(
      functools.partial(onednn.resize_linear, spatial_shape=spatial)))()
  assert got_y.shape == want_y.shape and got_dx.shape == x.shape
  # Relative to the largest element: a x8 gradient sums 512 cotangents per input in float32.
  for name, got, want, tol in (('y', got_y, want_y, 1e-6), ('dx', got_dx, want_dx, 1e-5)):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=tol,
                               err_msg=name)


@_needs_onednn
def test_resize_linear_under_vmap_is_one_call_equal_per_member():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((3, 2, 4, 4, 2, 3)), jnp.float32)
  resize = functools.partial(onednn.resize_linear, spatial_shape=(8, 16, 2))
  loss = lambda x: jnp.sum(jnp.sin(jax.vmap(resize)(x)))
  hlo = jax.jit(jax.grad(loss)).lower(x).as_text()
  assert hlo.count('@unet_ds_onednn_resample') == 2 and 'while' not in hlo
  want = jax.grad(lambda x: sum(jnp.sum(jnp.sin(_jax_resize((8, 16, 2))(m))) for m in x))(x)
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), want, atol=1e-5)


@_needs_onednn
def test_resize_routes_float32_linear_upsampling_to_onednn_only():
  def routed(x, spatial, method='linear', impl='onednn'):
    hlo = jax.jit(lambda x: layers.resize(x, spatial, method, impl)).lower(x).as_text()
    return 'unet_ds_onednn_resample_fwd' in hlo

  x = jnp.ones((1, 4, 4, 4, 2))
  assert routed(x, (8, 8, 4))
  assert not routed(x, (8, 8, 4), impl='native')
  assert not routed(x, (8, 8, 2))                     # downsampling an axis: jax antialiases
  assert not routed(x, (8, 8, 8), method='nearest')
  assert not routed(x.astype(jnp.bfloat16), (8, 8, 8))
  assert layers.resize(x, (4, 4, 4), impl='onednn') is x


@_needs_onednn
@pytest.mark.parametrize('x_shape,spatial,dtype,match', [
    ((1, 4, 4, 2), (2, 8), jnp.float32, 'upsampling only'),
    ((1, 4, 4, 2), (8, 8, 8), jnp.float32, 'one output size per spatial dim'),
    ((1, 4, 4, 2), (8, 8), jnp.bfloat16, 'float32 only'),
])
def test_resize_linear_bad_input_is_an_error(x_shape, spatial, dtype, match):
  with pytest.raises(ValueError, match=match):
    onednn.resize_linear(jnp.zeros(x_shape, dtype), spatial)


@_needs_onednn
def test_hypercolumn_1x1_fusion_same_loss_and_gradients_as_native():
  cfg = {'num_classes': 3, 'depth': 4, 'base_filters': 4,
         'ds': {'mode': 'hypercolumn', 'fusion': 'conv1x1_norm_act'}}
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 8, 1)), jnp.float32)
  target = jnp.asarray(rng.standard_normal((2, 16, 16, 8, 3)), jnp.float32)
  models_by_impl = {impl: models.get_model({**cfg, 'conv_impl': impl})
                    for impl in ('native', 'onednn')}
  params = jax.jit(models_by_impl['native'].init, static_argnames='train')(jax.random.key(0), x,
                                                                        train=False)

  def loss(model):
    return lambda p: jnp.mean((model.apply(p, x, train=False)[0] - target) ** 2)

  results = {impl: jax.jit(jax.value_and_grad(loss(m)))(params)
             for impl, m in models_by_impl.items()}
  hlo = jax.jit(jax.grad(loss(models_by_impl['onednn']))).lower(params).as_text()
  assert 'unet_ds_onednn_resample_bwd' in hlo
  (want_loss, want_grads), (got_loss, got_grads) = results['native'], results['onednn']
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for path, want in flax.traverse_util.flatten_dict(want_grads).items():
    got = flax.traverse_util.flatten_dict(got_grads)[path]
    scale = float(jnp.abs(want).max()) or 1.0
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-4, err_msg=str(path))


def test_upsampled_ds_loss_resamples_natively_with_the_same_value_and_gradients():
  # loss.target=upsample resizes each head's logits to the label: under conv_impl=onednn the
  # train step passes resize_impl='onednn' (DSLoss), which must not change loss or gradients.
  from unet_ds import losses
  rng = np.random.default_rng(7)
  final = jnp.asarray(rng.standard_normal((2, 16, 16, 8, 3)), jnp.float32)
  heads = tuple(jnp.asarray(rng.standard_normal((2, 16 // f, 16 // f, 8 // f, 3)), jnp.float32)
                for f in (2, 4))
  label = jnp.asarray(rng.integers(0, 3, (2, 16, 16, 8)), jnp.int32)

  def loss(impl):
    return lambda outs: losses.deep_supervision_loss(
        outs[0], outs[1:], label, (1.0, 0.5, 0.25), target='upsample', resize_impl=impl)[0]

  want, want_grads = jax.jit(jax.value_and_grad(loss('native')))((final, *heads))
  got, got_grads = jax.jit(jax.value_and_grad(loss('onednn')))((final, *heads))
  hlo = jax.jit(jax.grad(loss('onednn'))).lower((final, *heads)).as_text()
  assert 'unet_ds_onednn_resample_fwd' in hlo and 'unet_ds_onednn_resample_bwd' in hlo
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for w, g in zip(want_grads, got_grads):
    np.testing.assert_allclose(g, w, atol=1e-6 * float(jnp.abs(w).max()) + 1e-8, rtol=1e-4)
  c = config_lib.base_config(3)
  c.model.conv_impl = 'onednn'
  assert train.DSLoss.from_config(c, models.model_config(c.model)).resize_impl == 'onednn'
