"""Per-axis pooling (`model.strides`) for anisotropic data: shapes through every DS form, training
gradients, equivalence with the default, and errors that name the key."""
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
  variables = model.init(jax.random.PRNGKey(0), x)
  final, heads = model.apply(variables, x)
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
  variables = model.init(jax.random.PRNGKey(0), x)
  def loss(params):  # the final output and every DS head
    final, heads = model.apply({'params': params}, x)
    return sum(jnp.sum(o ** 2) for o in (final, *heads))
  grads = jax.grad(loss)(variables['params'])
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_isotropic_strides_equal_the_default():
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 8, 1))
  default, explicit = _model(), _model(strides=((2, 2, 2),) * 3)
  variables = default.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(explicit.apply(variables, x)[0], default.apply(variables, x)[0],
                             atol=1e-5)


@pytest.mark.parametrize('kw,match', [
    ({'strides': ((2, 2, 1),)}, r'strides has 1 levels .* depth-1=3'),
    ({'strides': ((2, 2, 3),) * 3}, r'one factor \(1 or 2\) per spatial axis'),
    ({'strides': ((2, 2, 1), (2, 2), (2, 2, 1))}, 'per spatial axis'),
    ({'strides': ANISO, 'up_kernel': 3}, 'strides needs up_kernel=2'),
    ({'strides': 'x'}, 'config.model.strides'),
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
