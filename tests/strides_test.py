"""Per-axis pooling (`model.strides`) and conv kernel sizes (`model.kernel_sizes`) for anisotropic
data: shapes through every DS form, training gradients, equivalence with the default, and errors
that name the key."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_ds import config_lib
from unet_ds import models

ANISO = ((2, 2, 1), (2, 2, 2), (2, 2, 1))


def _model(**kw):
  cfg = {'num_classes': 3, 'depth': 4, 'base_filters': 4, 'conv_impl': 'native', **kw}
  return models.get_model(models.model_config(cfg))


@pytest.mark.parametrize('mode', ['deep', 'additive', 'hypercolumn', 'none'])
@pytest.mark.parametrize('down', ['maxpool', 'conv'])
def test_shapes_follow_the_per_axis_factors(mode, down):
  model = _model(strides=[list(s) for s in ANISO], down=down, ds={'mode': mode})
  assert model.config.size_multiples(3) == (8, 8, 2)
  x = jnp.ones((1, 16, 8, 6, 1))
  # Shapes only: traced, never computed (eager init + apply took seconds per case).
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  final, heads = jax.eval_shape(model.apply, variables, x)
  assert final.shape == (1, 16, 8, 6, 3)
  expected = {'deep': [(1, 8, 4, 6, 3), (1, 4, 2, 3, 3)], 'none': []}
  if mode in expected:
    assert [h.shape for h in heads] == expected[mode]
  up = variables['params']['up_l0']['ConvTranspose_0'] if 'ConvTranspose_0' in variables[
      'params']['up_l0'] else variables['params']['up_l0']
  assert up['kernel'].shape[:3] == (2, 2, 1)  # kernel == stride per axis


def test_gradients_reach_every_parameter():
  model = _model(depth=3, base_filters=2, strides=((2, 2, 1), (2, 2, 2)))
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 2, 1))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  def loss(params):  # the final output and every DS head
    final, heads = model.apply({'params': params}, x)
    return sum(jnp.sum(o ** 2) for o in (final, *heads))
  grads = jax.jit(jax.grad(loss))(variables['params'])
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_isotropic_strides_equal_the_default():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 8, 1))
  default, explicit = _model(), _model(strides=((2, 2, 2),) * 3)
  variables = jax.jit(default.init)(jax.random.PRNGKey(0), x)  # jitted: eager apply takes seconds
  np.testing.assert_allclose(jax.jit(explicit.apply)(variables, x)[0],
                             jax.jit(default.apply)(variables, x)[0], atol=1e-5)


@pytest.mark.parametrize('kw,match', [
    ({'strides': ((2, 2, 1),)}, r'strides has 1 levels .* depth-1=3'),
    ({'strides': ((2, 2, 3),) * 3}, r'one factor \(1 or 2\) per spatial axis'),
    ({'strides': ((2, 2, 1), (2, 2), (2, 2, 1))}, 'per spatial axis'),
    ({'strides': ANISO, 'up_kernel': 3}, 'strides needs up_kernel=2'),
    ({'strides': 'x'}, 'config.model.strides'),
    ({'kernel_sizes': ((3, 3, 1),) * 3}, r'kernel_sizes has 3 levels .* depth=4 needs one per'),
    ({'kernel_sizes': ((3, 3, 5),) * 4}, r'one size \(1 or 3\) per spatial axis'),
    ({'kernel_sizes': ((3, 3, 1),) * 4, 'block': 'preact_residual'}, 'kernel_sizes needs block'),
    ({'kernel_sizes': 'x'}, 'config.model.kernel_sizes'),
])
def test_bad_strides_name_the_key(kw, match):
  with pytest.raises(ValueError, match=match):
    _model(**kw)


def test_config_checks_the_patch_per_axis():
  c = config_lib.base_config(3)
  c.model.strides = ANISO
  c.data.shape = (16, 16, 6)
  config_lib.validate(c)  # z needs only a multiple of 2
  c.data.shape = (16, 16, 5)
  with pytest.raises(ValueError, match=r'\(16, 16, 5\) must be divisible by \(8, 8, 2\) per axis '
                                       r'\(the pooling factors of model.strides'):
    config_lib.validate(c)
  with pytest.raises(ValueError, match=r'must be divisible by \(8, 8, 2\) per axis'):
    _model(strides=ANISO).init(jax.random.PRNGKey(0), jnp.ones((1, 16, 16, 5, 1)))


THIN = ((3, 3, 1),) * 4  # never mixes z slices


def test_kernel_sizes_shape_the_conv_kernels():
  model = _model(strides=ANISO, kernel_sizes=((3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3)))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 16, 8, 6, 1)))['params']
  kernel = lambda block, i: block[f'ConvNormAct_{i}']['Conv_0']['kernel'].shape[:3]  # noqa
  assert [kernel(params['enc_l0'], i) for i in (0, 1)] == [(3, 3, 1)] * 2
  assert kernel(params['dec_l0'], 0) == (3, 3, 1) and kernel(params['enc_l1'], 0) == (3, 3, 3)
  assert kernel(params['enc_l3'], 1) == (3, 3, 3)


def test_kernel_size_one_keeps_slices_apart():
  """With kernel 1 and no pooling along z at every level, output slice k sees input slice k only
  (norm 'none': instance norm would share statistics across slices)."""
  model = _model(strides=((2, 2, 1),) * 3, kernel_sizes=THIN, norm='none', ds={'mode': 'none'})
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 16, 4, 1))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  apply = jax.jit(model.apply)
  y = apply(variables, x)[0]
  y2 = apply(variables, x.at[:, :, :, 0].add(5.0))[0]
  changed = np.abs(np.asarray(y2 - y)).max(axis=(0, 1, 2, 4))
  assert changed[0] > 1e-3 and np.all(changed[1:] == 0)


@pytest.mark.parametrize('impl', ['cpu_fast', 'onednn'])
def test_kernel_sizes_same_on_every_impl(impl):
  from unet_ds.models.ops import onednn
  if impl == 'onednn' and not onednn.available():
    pytest.skip(onednn.unavailable_reason())
  kw = dict(strides=ANISO, kernel_sizes=((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3)))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 8, 6, 1))
  native, other = _model(**kw), _model(conv_impl=impl, **kw)
  params = jax.jit(native.init)(jax.random.PRNGKey(0), x)['params']
  def loss(model, p):
    final, heads = model.apply({'params': p}, x, train=True)
    return sum(jnp.mean(o ** 2) for o in (final, *heads))
  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(native, p)))(params)
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(other, p)))(params)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-3)
