"""Shape and contract tests of the U-Net family: every DS mode x 2D/3D x depths, train and eval."""

import functools
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_ds import losses
from unet_ds import models

MODES = ('none', 'deep', 'additive', 'hypercolumn')


def _model(mode, depth=3, **kw):
  cfg = dict(num_classes=3, depth=depth, base_filters=2, ds={'mode': mode}, **kw)
  return models.get_model(cfg)


@pytest.mark.parametrize('mode,ndim,depth', itertools.product(MODES, (2, 3), (3, 4)))
def test_contract_shapes(mode, ndim, depth):
  size = 16
  x = jnp.ones((2,) + (size,) * ndim + (1,))
  model = _model(mode, depth, norm='batch', dropout=0.1)
  # Abstract evaluation: the full trace (shapes, dtypes, structure) without compiling.
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0, impl='rbg'), x)
  eval_out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  train_out, _ = jax.eval_shape(
      functools.partial(model.apply, train=True, mutable=['batch_stats'],
                        rngs={'dropout': jax.random.key(1)}), variables, x)
  for final, inter in (eval_out, train_out):
    assert isinstance(inter, tuple)
    assert final.shape == x.shape[:-1] + (3,)
    assert final.dtype == jnp.float32
    expected_levels = () if mode == 'none' else tuple(range(1, depth - 1))
    assert len(inter) == len(expected_levels)
    for head, level in zip(inter, expected_levels):
      assert head.shape == (2,) + (size // 2 ** level,) * ndim + (3,)
  # Same pytree structure in train and eval.
  assert jax.tree.structure(eval_out) == jax.tree.structure(train_out)


def test_levels_select_heads_and_order():
  model = models.get_model(dict(num_classes=2, depth=5, base_filters=2,
                                ds={'mode': 'deep', 'levels': (3, 1)}))
  x = jnp.ones((1, 32, 32, 1))
  _, inter = jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0, impl='rbg'), x), x), x)
  assert [h.shape[1] for h in inter] == [16, 4]  # highest -> lowest resolution


def _head_params(params):
  flat = flax.traverse_util.flatten_dict(params['ds'])
  return {k: v for k, v in flat.items() if k[0].startswith('head_')}


def test_none_has_no_head_params_deep_gradients_reach_every_head():
  x = jax.random.normal(jax.random.key(0, impl='rbg'), (2, 16, 16, 1))
  label = (x[..., 0] > 0).astype(jnp.int32) + (x[..., 0] > 1).astype(jnp.int32)
  none = _model('none')
  assert not _head_params(jax.eval_shape(none.init, jax.random.key(0, impl='rbg'), x)['params'])

  deep = _model('deep', depth=4)
  params = jax.jit(deep.init)(jax.random.key(0, impl='rbg'), x)['params']
  assert len(_head_params(params)) == 4  # 2 heads x (kernel, bias)
  w = losses.ds_weights('exp', (0, 1, 2))

  def loss_fn(p):
    final, inter = deep.apply({'params': p}, x)
    return losses.deep_supervision_loss(final, inter, label, w, num_classes=3)[0]

  grads = _head_params(jax.jit(jax.grad(loss_fn))(params))
  for name, g in grads.items():
    assert float(jnp.abs(g).sum()) > 0, name


def test_additive_final_depends_on_heads():
  x = jax.random.normal(jax.random.key(0, impl='rbg'), (1, 16, 16, 1))
  model = _model('additive', depth=4)
  params = model.init(jax.random.key(0, impl='rbg'), x)['params']
  final, _ = model.apply({'params': params}, x)
  bumped = jax.tree.map(lambda a: a, params)
  bumped = flax.core.unfreeze(bumped) if hasattr(flax.core, 'unfreeze') else bumped
  bumped['ds']['head_l2']['Conv_0']['bias'] = bumped['ds']['head_l2']['Conv_0']['bias'] + 1.0
  final2, _ = model.apply({'params': bumped}, x)
  # A constant bias on the lowest head shifts every final logit by 1 after upsampling.
  np.testing.assert_allclose(final2 - final, 1.0, atol=1e-5)
  # The deep form's final does not depend on its heads.
  deep = _model('deep', depth=4)
  p = deep.init(jax.random.key(0, impl='rbg'), x)['params']
  f1, _ = deep.apply({'params': p}, x)
  p['ds']['head_l2']['Conv_0']['bias'] += 1.0
  f2, _ = deep.apply({'params': p}, x)
  np.testing.assert_array_equal(f1, f2)


@pytest.mark.parametrize('kw', [
    dict(residual=True, norm='group', down='conv', up='resize'),
    dict(filter_growth=1, norm='none', activation='relu', convs_per_block=1),
    dict(remat=True, dtype='bfloat16'),
])
def test_options_run(kw):
  x = jnp.ones((1, 8, 8, 8, 2))
  model = _model('hypercolumn', depth=3, **kw)
  variables = jax.jit(model.init)(jax.random.key(0, impl='rbg'), x)
  final, inter = jax.jit(model.apply)(variables, x)
  assert final.shape == (1, 8, 8, 8, 3) and len(inter) == 1
  assert final.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(final)))


def test_filters_growth_and_cap():
  cfg = models.model_config(dict(num_classes=2, depth=5, base_filters=32, max_filters=128))
  assert [cfg.filters(l) for l in range(5)] == [32, 64, 128, 128, 128]
  const = models.model_config(dict(num_classes=2, depth=4, base_filters=8, filter_growth=1))
  assert [const.filters(l) for l in range(4)] == [8, 8, 8, 8]


def test_bad_spatial_size_is_a_clear_error():
  model = _model('deep', depth=4)
  x = jnp.ones((1, 20, 16, 16, 1))
  with pytest.raises(ValueError, match=r'\(20, 16, 16\) must be divisible by 8.*\(24, 16, 16\)'):
    model.init(jax.random.key(0, impl='rbg'), x)


@pytest.mark.parametrize('cfg,match', [
    (dict(num_classes=2, ds={'mode': 'deeep'}), 'ds.mode must be one of'),
    (dict(num_classes=2, norm='layer'), 'norm must be one of'),
    (dict(num_classes=2, depth=4, ds={'mode': 'deep', 'levels': (3,)}), r'\[3\] outside'),
    (dict(num_classes=2, depth=2, ds={'mode': 'deep'}), 'needs at least one head level'),
    (dict(num_classes=2, base_filter=8), 'config.model.base_filter: unknown key'),
    (dict(num_classes=2, ds={'mode': 'deep', 'level': (1,)}), 'config.model.ds.level: unknown'),
    (dict(num_classes=2, conv_impl='gpu'), 'conv_impl must be one of'),
])
def test_config_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    models.get_model(cfg)


def test_conv_impls_agree():
  # Every conv_impl is the same model: same parameter tree, outputs and gradients (strided
  # downsampling: the fast path's strided convs too; max pool has its own tests). Two input
  # channels: with one, the gradient of a 1x1 projection into a norm is ~0 (scale invariance)
  # and only rounding noise would be compared.
  x = jax.random.normal(jax.random.key(0, impl='rbg'), (2, 8, 8, 8, 2))
  label = jax.random.randint(jax.random.key(1, impl='rbg'), (2, 8, 8, 8), 0, 3)

  def model(impl):
    return _model('deep', depth=3, residual=True, down='conv', conv_impl=impl)

  # One set of parameters for all: applying it checks that the trees agree.
  params = jax.jit(model('native').init)(jax.random.key(2, impl='rbg'), x)['params']

  def loss_and_grads(impl):
    def loss(params):
      final, inter = model(impl).apply({'params': params}, x)
      logp = jax.nn.log_softmax(final)
      return -jnp.mean(jnp.take_along_axis(logp, label[..., None], -1)) + sum(
          jnp.mean(h ** 2) for h in inter)
    return jax.jit(jax.value_and_grad(loss))(params)

  expected = loss_and_grads('native')
  for impl in ('native_einsum_up', 'cpu_fast', 'onednn'):
    got = loss_and_grads(impl)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      scale = max(float(jnp.abs(a).max()), 1e-6)
      np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=1e-4)


def _tgs(**kw):
  """The TGS salt model's options on a tiny 2D U-Net with one sigmoid channel."""
  cfg = dict(num_classes=1, depth=3, base_filters=2, block='preact_residual', norm='batch',
             activation='relu', down_dropout=(0.25, 0.5), up_dropout=0.5, up_kernel=3,
             ds={'mode': 'hypercolumn', 'fusion': 'conv_act', 'fusion_dropout': 0.5})
  return models.get_model({**cfg, **kw})


def test_tgs_options_shapes_params_and_dropout():
  model = _tgs()
  assert model.config.down_dropout == (0.25, 0.5) and model.config.up_dropout == (0.5,)
  deeper = _tgs(depth=5).config  # the last rate repeats
  assert [deeper.level_rate('down_dropout', i) for i in range(4)] == [0.25, 0.5, 0.5, 0.5]
  assert [deeper.level_rate('up_dropout', i) for i in range(4)] == [0.5] * 4
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  variables = model.init(jax.random.key(0, impl='rbg'), x, train=False)
  flat = flax.traverse_util.flatten_dict(variables['params'])
  enc = {k[1:] for k in flat if k[0] == 'enc_l1'}
  # conv, then two pre-activation units (norm-act-conv-norm-act-conv), the last ending in norm-act.
  assert ('Conv_0', 'kernel') in enc and ('Conv_0', 'bias') in enc
  assert {k[0] for k in enc if k[0].startswith('PreActResidualUnit')} == {
      'PreActResidualUnit_0', 'PreActResidualUnit_1'}
  assert ('PreActResidualUnit_1', 'NormAct_2', 'Norm_0', 'BatchNorm_0', 'scale') in enc
  assert ('PreActResidualUnit_0', 'NormAct_2', 'Norm_0', 'BatchNorm_0', 'scale') not in enc
  assert flat[('up_l0', 'kernel')].shape == (3, 3, 4, 2)  # 3x3 stride-2 transposed conv
  fusion = {k[2:] for k in flat if k[:2] == ('ds', 'fusion')}
  assert fusion == {('Conv_0', 'kernel'), ('Conv_0', 'bias')}  # conv + bias, no norm
  final, heads = model.apply(variables, x, train=False)
  assert final.shape == (2, 16, 16, 1) and heads[0].shape == (2, 8, 8, 1)
  # Dropout: eval is deterministic; train draws differ by rng.
  run = lambda seed: model.apply(variables, x, train=True, mutable=['batch_stats'],  # noqa: E731
                                 rngs={'dropout': jax.random.key(seed)})[0][0]
  assert not np.allclose(run(1), run(2))
  np.testing.assert_array_equal(model.apply(variables, x)[0], final)


def test_preact_unit_is_identity_plus_residual():
  from unet_ds.models import blocks  # pylint: disable=g-import-not-at-top
  unit = blocks.PreActResidualUnit(4, norm='none', act='relu')
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  v = unit.init(jax.random.key(1), x, train=False)
  zero = jax.tree.map(jnp.zeros_like, v)
  np.testing.assert_array_equal(unit.apply(zero, x, train=False), x)  # zero convs: identity
  y = unit.apply(v, x, train=False)
  k = v['params']
  h = jax.lax.conv_general_dilated(jax.nn.relu(x), k['Conv_0']['kernel'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  h = jax.nn.relu(h + k['Conv_0']['bias'])
  h = jax.lax.conv_general_dilated(h, k['Conv_1']['kernel'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(y, x + h + k['Conv_1']['bias'], rtol=1e-5, atol=1e-5)


def test_up_kernel_3_is_tf_same_transposed_conv():
  # The decoder input holds the upsampled features: they must equal a 'SAME' 3x3 stride-2
  # transposed conv (TF/Keras Conv2DTranspose(padding='same'), as lax's 'SAME').
  model = models.get_model(dict(num_classes=2, depth=2, base_filters=2, up_kernel=3,
                                ds={'mode': 'none'}, conv_impl='native'))
  x = jax.random.normal(jax.random.key(0), (1, 6, 10, 1))
  variables = model.init(jax.random.key(0, impl='rbg'), x)
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.name in ('up_l0', 'dec_l0'):
      seen[context.module.name] = args[0]
    return next_fun(*args, **kwargs)

  with flax.linen.intercept_methods(interceptor):
    final, _ = model.apply(variables, x)
  assert final.shape == (1, 6, 10, 2)
  p = variables['params']['up_l0']
  expected = jax.lax.conv_transpose(seen['up_l0'], p['kernel'], (2, 2), 'SAME',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['bias']
  upsampled, skip = seen['dec_l0']  # the block's input as its parts: [upsampled, skip]
  assert skip.shape == (1, 6, 10, 2)
  np.testing.assert_allclose(upsampled, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kw, match', [
    (dict(block='dense'), 'block must be one of'),
    (dict(down_dropout=(0.1, 0.2, 0.3)), r'down_dropout has 3 rates .* for depth-1=2 levels'),
    (dict(up_dropout=1.5), r'up_dropout rates must be in \[0, 1\)'),
    (dict(up_kernel=4), 'up_kernel must be 2 or 3'),
    (dict(ds={'mode': 'hypercolumn', 'fusion': 'sum'}), 'ds.fusion must be one of'),
    (dict(ds={'mode': 'deep', 'fuse': 1}), r"config.model.ds.fuse: unknown key"),
])
def test_bad_model_options_name_the_key(kw, match):
  with pytest.raises(ValueError, match=match):
    models.model_config({**dict(num_classes=2, depth=3), **kw})


@pytest.mark.parametrize('ndim', [2, 3])
def test_same_conv_transpose_equals_lax_same(ndim):
  from unet_ds.models import blocks  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2,) + (5, 4, 3)[:ndim] + (3,))
  for impl in ('native', 'auto'):
    module = blocks.SameConvTranspose(4, impl=impl)
    v = module.init(jax.random.key(1), x)
    p = v['params']
    dn = ('NHWC', 'HWIO', 'NHWC') if ndim == 2 else ('NDHWC', 'DHWIO', 'NDHWC')
    expected = jax.lax.conv_transpose(x, p['kernel'], (2,) * ndim, 'SAME',
                                      dimension_numbers=dn) + p['bias'] + 0.5
    v = {'params': {**p, 'bias': p['bias'] + 0.5}}
    np.testing.assert_allclose(module.apply(v, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl,kernel_size,strides', [
    ('native', 3, 1), ('auto', 3, 1), ('auto', 1, 1), ('auto', 3, 2)])
def test_conv_of_parts_is_conv_of_concatenation(impl, kernel_size, strides):
  from unet_ds.models import layers  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (2, 8, 8, 8, 3))
  b = jax.random.normal(jax.random.key(1), (2, 8, 8, 8, 2))
  conv = layers.Conv(4, kernel_size, strides, impl=impl)
  whole = jnp.concatenate([a, b], axis=-1)
  params = conv.init(jax.random.key(2), whole)
  # One parameter tree for both forms (init from the parts draws the same kernel).
  assert jax.tree.map(jnp.shape, conv.init(jax.random.key(2), (a, b))) == jax.tree.map(
      jnp.shape, params)
  np.testing.assert_array_equal(conv.init(jax.random.key(2), (a, b))['params']['kernel'],
                                params['params']['kernel'])

  def loss(p, a, b, parts):
    y = conv.apply(p, (a, b) if parts else jnp.concatenate([a, b], axis=-1))
    return jnp.sum(y * jnp.cos(y)), y

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (g_whole, y_whole), (g_parts, y_parts) = grad(params, a, b, False), grad(params, a, b, True)
  assert y_parts.shape == (2,) + (8 // strides,) * 3 + (4,)
  np.testing.assert_allclose(y_parts, y_whole, rtol=1e-5, atol=1e-5)
  for x, y in zip(jax.tree.leaves(g_parts), jax.tree.leaves(g_whole)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r'parts of one input must agree.*\(2, 4, 8, 8, 2\)'):
    conv.apply(params, (a, b[:, :4]))


def test_backward_after_cotangent_same_values_and_gradients():
  from unet_ds.models import blocks  # pylint: disable=g-import-not-at-top
  from unet_ds.models.ops import fused  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 6, 4)) * 3 + 1
  scale = jnp.linspace(0.5, 1.5, 4)
  bias = jnp.linspace(-0.2, 0.3, 4)
  fn = functools.partial(fused.instance_norm_act, negative_slope=0.01)
  late = blocks.backward_after_cotangent(fn)
  np.testing.assert_array_equal(late(x, scale, bias), fn(x, scale, bias))
  weights = jax.random.normal(jax.random.key(1), x.shape)
  grads = [jax.jit(jax.grad(lambda *args, f=f: jnp.sum(f(*args) * weights), argnums=(0, 1, 2)))(
      x, scale, bias) for f in (fn, late)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_decoder_dropout_keeps_the_concatenation():
  # With up_dropout the decoder drops from the concatenated input (the rates' original
  # meaning); without, its block gets [upsampled, skip] as parts. Same parameters either way.
  x = jax.random.normal(jax.random.key(0), (1, 16, 16, 1))
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.name == 'dec_l0':
      seen['dec_l0'] = args[0]
    return next_fun(*args, **kwargs)

  shapes = []
  for rate in (0.0, 0.5):
    model = _model('deep', depth=3, up_dropout=rate)
    variables = model.init(jax.random.key(0, impl='rbg'), x)
    shapes.append(jax.tree.map(jnp.shape, variables))
    with flax.linen.intercept_methods(interceptor):
      model.apply(variables, x)
    got = seen['dec_l0']
    if rate:
      assert got.shape == (1, 16, 16, 4)
    else:
      assert [p.shape for p in got] == [(1, 16, 16, 2), (1, 16, 16, 2)]
  assert shapes[0] == shapes[1]
