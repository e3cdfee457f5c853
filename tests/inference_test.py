"""Tests for unet_ds.inference: sliding window == direct forward where it must, flip TTA."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_ds import inference
from unet_ds import models


class _Net(nn.Module):
  """Fully convolutional toy: conv(kernel) -> tanh -> 1x1 conv to `classes` logits."""
  kernel: tuple[int, ...]
  classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, self.kernel)(x))
    return nn.Conv(self.classes, (1,) * len(self.kernel))(x)


def _model(kernel, shape, seed=0):
  net = _Net(kernel)
  params = net.init(jax.random.key(seed), np.zeros((1, *shape[:-1], shape[-1]), np.float32))
  predict = lambda x: net.apply(params, x)  # noqa: E731
  direct = lambda image: np.asarray(jax.nn.softmax(predict(image[None]), -1)[0])  # noqa: E731
  return predict, direct


def _image(shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_window_starts_cover_and_step():
  assert inference.window_starts(5, 8, 0.5) == [0]
  assert inference.window_starts(8, 8, 0.5) == [0]
  starts = inference.window_starts(21, 8, 0.5)
  assert starts[0] == 0 and starts[-1] == 13
  assert max(np.diff(starts)) <= 4 and len(starts) == 5
  assert inference.window_starts(16, 8, 0.0) == [0, 8]


def test_gaussian_importance_peak_and_sigma():
  w = inference.gaussian_importance((17, 9), sigma_scale=1 / 8)
  assert w.shape == (17, 9) and w.max() == pytest.approx(1) and w[8, 4] == pytest.approx(1)
  np.testing.assert_allclose(w, w[::-1, ::-1])
  sigma = 17 / 8
  np.testing.assert_allclose(inference.gaussian_importance((17,))[8 + 2],
                             np.exp(-0.5 * (2 / sigma) ** 2), rtol=1e-6)
  assert w.min() >= 1e-6


def test_pointwise_model_matches_direct_forward_everywhere():
  """A 1x1x1 model sees no neighbours: every window agrees, so the blend is exact (3D, padded
  last batch, sizes not multiples of the patch)."""
  image = _image((13, 11, 9, 2))
  predict, direct = _model((1, 1, 1), image.shape)
  probs = inference.sliding_window_predict(predict, image, patch_size=(6, 5, 4), overlap=0.5,
                                           batch_size=3)
  assert probs.shape == (13, 11, 9, 3)
  np.testing.assert_allclose(probs, direct(image), atol=1e-5)
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)


def test_image_smaller_than_patch_matches_direct_forward():
  """Zero padding to the patch equals the conv's own SAME zero padding."""
  image = _image((5, 4, 3, 1))
  predict, direct = _model((3, 3, 3), image.shape)
  probs = inference.sliding_window_predict(predict, image, patch_size=(8, 8, 8), batch_size=2)
  assert probs.shape == (5, 4, 3, 3)
  np.testing.assert_allclose(probs, direct(image), atol=1e-5)


def _interior_mask(size, patch, overlap, halo):
  """Voxels that are >= halo from every covering window's border (image borders excepted)."""
  ok = np.ones(size, bool)
  for axis, (n, p) in enumerate(zip(size, patch)):
    line = np.ones(n, bool)
    for s in inference.window_starts(n, p, overlap):
      lo = s + halo if s > 0 else 0
      hi = s + p - halo if s + p < n else n
      bad = np.zeros(n, bool)
      bad[s:s + p] = True
      bad[lo:hi] = False
      line &= ~bad
    ok &= np.expand_dims(line, [a for a in range(len(size)) if a != axis])
  return ok


def test_3x3_model_matches_direct_forward_away_from_window_seams():
  image = _image((23, 19, 1))
  predict, direct = _model((3, 3), image.shape)
  probs = inference.sliding_window_predict(predict, image, patch_size=(8, 8), overlap=0.5,
                                           batch_size=4)
  expected = direct(image)
  mask = _interior_mask((23, 19), (8, 8), 0.5, halo=1)
  assert 0.2 < mask.mean() < 0.9
  np.testing.assert_allclose(probs[mask], expected[mask], atol=1e-5)
  # At the seams the windows saw zero padding instead of neighbours: there they must differ.
  assert np.abs(probs[~mask] - expected[~mask]).max() > 1e-4


def test_whole_image_window_matches_direct_forward():
  image = _image((8, 8, 1))
  predict, direct = _model((3, 3), image.shape)
  probs = inference.sliding_window_predict(predict, image, patch_size=(8, 8))
  np.testing.assert_allclose(probs, direct(image), atol=1e-5)


def test_flip_tta_of_symmetric_input_is_symmetric():
  half = _image((8, 11, 1))
  image = np.concatenate([half, half[::-1]], 0)  # mirror-symmetric along axis 0
  predict, _ = _model((3, 3), image.shape, seed=3)
  plain = inference.sliding_window_predict(predict, image, patch_size=(8, 8), overlap=0.5)
  assert np.abs(plain - plain[::-1]).max() > 1e-3  # the model itself is not symmetric
  tta = inference.sliding_window_predict(predict, image, patch_size=(8, 8), overlap=0.5,
                                         tta_axes=(0,))
  np.testing.assert_allclose(tta, tta[::-1], atol=1e-5)
  both = np.concatenate([image, image[:, ::-1]], 1)  # symmetric along both axes
  tta2 = inference.sliding_window_predict(predict, both, patch_size=(8, 8), tta_axes=(0, 1))
  np.testing.assert_allclose(tta2, tta2[::-1], atol=1e-5)
  np.testing.assert_allclose(tta2, tta2[:, ::-1], atol=1e-5)


def test_flip_combinations():
  assert inference.flip_combinations(()) == [()]
  assert inference.flip_combinations((0, 2)) == [(), (0,), (2,), (0, 2)]


def test_bad_arguments():
  predict, _ = _model((1, 1), (4, 4, 1))
  with pytest.raises(ValueError, match=r'image shape \(4, 4\) is not \[\*spatial, C\]'):
    inference.sliding_window_predict(predict, np.zeros((4, 4)), patch_size=(4, 4))
  with pytest.raises(ValueError, match='tta_axes'):
    inference.sliding_window_predict(predict, np.zeros((4, 4, 1)), patch_size=(4, 4),
                                     tta_axes=(2,))
  with pytest.raises(ValueError, match='overlap'):
    inference.window_starts(10, 4, 1.0)


def test_single_binary_logit_gives_two_class_probs():
  logit = np.linspace(-3, 3, 16, dtype=np.float32).reshape(4, 4, 1)
  probs = inference.sliding_window_predict(lambda x: x, logit, patch_size=(4, 4))
  np.testing.assert_allclose(probs[..., 1], 1 / (1 + np.exp(-logit[..., 0])), rtol=1e-5)
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-6)


def test_unet_final_output_whole_image_window():
  """The project's DS U-Net: a window covering the image gives softmax(final) exactly."""
  model = models.get_model({'num_classes': 3, 'depth': 3, 'base_filters': 4,
                            'ds': {'mode': 'deep'}})
  image = _image((8, 8, 1))
  # Random params from shapes: model.init's truncated-normal compiles take ~15 s on CPU.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image[None], train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes)
  predict = jax.jit(lambda x: model.apply(variables, x, train=False)[0])
  probs = inference.sliding_window_predict(predict, image, patch_size=(8, 8))
  np.testing.assert_allclose(probs, jax.nn.softmax(predict(image[None]), -1)[0], atol=1e-5)
