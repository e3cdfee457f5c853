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
  assert not _head_params(none.init(jax.random.key(0, impl='rbg'), x)['params'])

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
