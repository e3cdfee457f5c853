"""Deep-supervision output stages: the hypercolumn fusions and additive against their definitions
(values), their gradients and the heads' shapes."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_ds import models
from unet_ds.models import ds


def _features(seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s), jnp.float32)
          for s in ((2, 16, 12, 4), (2, 8, 6, 8), (2, 4, 3, 16))]


def _output(impl='native', fusion='conv1x1_norm_act'):
  return ds.DSOutput('hypercolumn', (1,), 3, 5, 'instance', 'leaky_relu', impl, fusion=fusion)


def test_conv1x1_fusion_equals_a_1x1_conv_norm_act_of_the_column():
  features = _features()
  module = _output()
  variables = module.init(jax.random.key(0), features, train=False)
  params = variables['params']
  assert {k for k in params if k.startswith('fusion')} == {
      'fusion_l0', 'fusion_l1', 'fusion_l2', 'fusion_norm'}
  assert 'bias' not in params['fusion_l1']  # the norm follows
  final, heads = module.apply(variables, features, train=False)
  assert final.shape == (2, 16, 12, 3) and heads[0].shape == (2, 8, 6, 3)

  # The column the 3x3 fusion builds, through one 1x1 conv with the stacked projections.
  size = features[0].shape[1:-1]
  column = jnp.concatenate([jax.image.resize(f, (2, *size, f.shape[-1]), 'linear')
                            for f in features], axis=-1)
  kernel = jnp.concatenate([params[f'fusion_l{l}']['kernel'][0, 0] for l in range(3)], axis=0)
  norm = params['fusion_norm']['InstanceNorm_0']
  y = nn.InstanceNorm().apply({'params': norm}, column @ kernel)
  y = nn.leaky_relu(y, 0.01)
  head = params['final_head']['Conv_0']
  expected = y @ head['kernel'][0, 0] + head['bias']
  np.testing.assert_allclose(final, expected, rtol=1e-4, atol=1e-4)


def test_conv1x1_fusion_same_on_the_fused_cpu_path():
  features = _features(1)
  variables = _output('native').init(jax.random.key(1), features, train=False)
  a, _ = _output('native').apply(variables, features, train=False)
  b, _ = _output('cpu_fast').apply(variables, features, train=False)  # same parameter tree
  np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_conv1x1_fusion_costs_less_than_the_3x3_one():
  features = _features()

  def flops(fusion):
    module = _output(fusion=fusion)
    variables = module.init(jax.random.key(0), features, train=False)
    fn = jax.jit(lambda v, f: module.apply(v, f, train=False)[0])
    return fn.lower(variables, features).cost_analysis()['flops']

  assert flops('conv1x1_norm_act') < 0.5 * flops('conv_norm_act')


def test_conv1x1_fusion_config():
  cfg = {'num_classes': 2, 'depth': 3, 'ds': {'mode': 'hypercolumn', 'fusion': 'conv1x1_norm_act'}}
  assert models.get_model(cfg).config.ds_fusion == 'conv1x1_norm_act'
  with pytest.raises(ValueError, match='ds.fusion_dropout needs a 3x3 fusion'):
    models.model_config({**cfg, 'ds': {**cfg['ds'], 'fusion_dropout': 0.5}})
  # A whole U-Net with it trains-shaped: final at full size.
  model = models.get_model(cfg)
  x = jnp.zeros((1, 8, 8, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  flat = flax.traverse_util.flatten_dict(variables['params'])
  assert ('ds', 'fusion_l2', 'kernel') not in flat  # depth 3: decoder levels 0 and 1
  assert model.apply(variables, x, train=False)[0].shape == (1, 8, 8, 2)


def test_additive_equals_its_definition_and_heads_have_their_levels_shapes():
  features = _features(2)
  module = ds.DSOutput('additive', (1, 2), 3, 5, 'instance', 'leaky_relu')
  variables = module.init(jax.random.key(0), features, train=False)
  final, heads = module.apply(variables, features, train=False)
  assert [h.shape for h in heads] == [(2, 8, 6, 3), (2, 4, 3, 3)]
  params = variables['params']

  def head(name, x):
    conv = params[name]['Conv_0']
    return x @ conv['kernel'][0, 0] + conv['bias']

  up = lambda x, like: jax.image.resize(x, (*like.shape[:-1], x.shape[-1]), 'linear')
  acc = head('head_l1', features[1]) + up(head('head_l2', features[2]), features[1])
  expected = head('final_head', features[0]) + up(acc, features[0])
  np.testing.assert_allclose(final, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode,fusion', [('additive', 'conv_norm_act'),
                                         ('hypercolumn', 'conv1x1_norm_act'),
                                         ('hypercolumn', 'conv_norm_act')])
def test_ds_gradients_are_finite_and_reach_every_level(mode, fusion):
  features = _features(3)
  module = ds.DSOutput(mode, (1, 2), 3, 5, 'instance', 'leaky_relu', fusion=fusion)
  variables = module.init(jax.random.key(0), features, train=True)

  def loss(features):
    final, heads = module.apply(variables, features, train=True)
    return jnp.mean(final ** 2) + sum(jnp.mean(h ** 2) for h in heads)

  grads = jax.grad(loss)(features)
  for f, g in zip(features, grads):
    assert g.shape == f.shape
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0
