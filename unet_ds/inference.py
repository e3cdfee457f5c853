"""Sliding-window prediction over whole images/volumes of any size (nnU-Net style).

Windows of `patch_size` overlap by `overlap`; each window's softmax is weighted by a Gaussian
importance map (sigma = patch * sigma_scale, nnU-Net: 1/8) so voxels near window borders, which see
less context, count less. Windows go through the model in batches of a fixed size (the last batch
zero-padded), so a jitted model compiles once. Optional flip test-time augmentation averages the
softmax over every combination of flips of `tta_axes` (2^n passes, as nnU-Net's mirroring).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_ds import metrics
from unet_ds.data import patches

PredictFn = Callable[[jax.Array], jax.Array]  # [B, *patch, C] -> logits [B, *patch, K]


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to predict whole images: window, blending, TTA, and what to write.

  The one set of defaults: `config_lib` builds the `config.inference` group from them, and
  `from_dict` reads that group back (the window is the run's training patch).
  """
  patch_size: tuple[int, ...] = ()
  overlap: float = 0.5          # fraction of a window shared with its neighbour (nnU-Net: 0.5)
  batch_size: int = 2           # windows per model call
  sigma_scale: float = 1 / 8    # Gaussian importance sigma / patch size
  tta_axes: tuple[int, ...] = ()  # flip TTA over these spatial axes, e.g. (0, 1, 2)
  save_probs: bool = False      # also write class probabilities

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'Settings':
    """Settings from `config.inference` (+ patch_size); an unknown key is an error naming it."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'config.inference.{unknown[0]}: unknown key; known: '
                       f'{sorted(known - {"patch_size"})}')
    v = dict(values)
    s = cls(patch_size=tuple(int(p) for p in v.get('patch_size', ())),
            overlap=float(v.get('overlap', cls.overlap)),
            batch_size=int(v.get('batch_size', cls.batch_size)),
            sigma_scale=float(v.get('sigma_scale', cls.sigma_scale)),
            tta_axes=tuple(int(a) for a in v.get('tta_axes', ())),
            save_probs=bool(v.get('save_probs', cls.save_probs)))
    if not 0 <= s.overlap < 1:
      raise ValueError(f'config.inference.overlap={s.overlap}: need 0 <= overlap < 1')
    if s.batch_size < 1:
      raise ValueError(f'config.inference.batch_size={s.batch_size}: need >= 1')
    return s

  @classmethod
  def config_defaults(cls) -> dict[str, Any]:
    """The `config.inference` group's fields and defaults (the window comes from the data)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != 'patch_size'}


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
  """Start offsets along one axis: evenly spread, first at 0, last at `size - patch`.

  The step is at most `patch * (1 - overlap)`; `size <= patch` gives one window at 0.
  """
  if not 0 <= overlap < 1:
    raise ValueError(f'overlap={overlap}: need 0 <= overlap < 1')
  if size <= patch:
    return [0]
  step = max(int(patch * (1 - overlap)), 1)
  num = math.ceil((size - patch) / step) + 1
  return [int(round(i * (size - patch) / (num - 1))) for i in range(num)]


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
  """Separable Gaussian `[*patch_size]` centred on the patch, max 1, floored at 1e-6."""
  weight = np.ones((), np.float64)
  for n in patch_size:
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2
    sigma = max(n * sigma_scale, 1e-6)
    weight = np.multiply.outer(weight, np.exp(-0.5 * (x / sigma) ** 2))
  weight /= weight.max()
  return np.maximum(weight, 1e-6).astype(np.float32)


def flip_combinations(tta_axes: Sequence[int]) -> list[tuple[int, ...]]:
  """Every subset of `tta_axes` (the empty one first): the flips TTA averages over."""
  axes = tuple(dict.fromkeys(int(a) for a in tta_axes))
  return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def make_window_fn(predict_fn: PredictFn, weight: np.ndarray,
                   tta_axes: Sequence[int] = ()) -> Callable[[np.ndarray], jax.Array]:
  """Jitted `[B, *patch, C] -> weight * mean_over_flips(probs)` `[B, *patch, K]`."""
  flips = flip_combinations(tta_axes)
  weight = jnp.asarray(weight)[None, ..., None]

  @jax.jit
  def window_fn(batch):
    probs = 0.0
    for flip in flips:
      batch_axes = tuple(a + 1 for a in flip)
      x = jnp.flip(batch, batch_axes) if flip else batch
      p = metrics.probs_from_logits(predict_fn(x))
      probs = probs + (jnp.flip(p, batch_axes) if flip else p)
    return probs * (weight / len(flips))

  return window_fn


def sliding_window_predict(predict_fn: PredictFn, image: np.ndarray, *, patch_size: Sequence[int],
                           overlap: float = 0.5, batch_size: int = 1, sigma_scale: float = 1 / 8,
                           tta_axes: Sequence[int] = (),
                           window_fn: Callable[[np.ndarray], jax.Array] | None = None
                           ) -> np.ndarray:
  """Class probabilities `[*spatial, K]` for a whole image `[*spatial, C]`.

  Args:
    predict_fn: jax-traceable `[B, *patch_size, C] -> logits [B, *patch_size, K]` (the model's
      `final` output; deep-supervision heads are not used).
    image: float `[*spatial, C]`, any spatial size; smaller than the patch is zero-padded.
    patch_size: window shape, what the model was trained on.
    overlap: fraction of a window shared with its neighbour (nnU-Net: 0.5).
    batch_size: windows per model call (fixed, so one compilation).
    sigma_scale: Gaussian sigma as a fraction of the patch size.
    tta_axes: spatial axes to flip for test-time augmentation (() for none).
    window_fn: a `make_window_fn(...)` result to reuse across images (skips re-jitting);
      `predict_fn`, `sigma_scale` and `tta_axes` are then ignored.

  Returns:
    float32 `[*spatial, K]`, summing to 1 over K (K = 2 for a single binary logit channel).
  """
  patch_size = tuple(int(p) for p in patch_size)
  rank = len(patch_size)
  if image.ndim != rank + 1:
    raise ValueError(f'sliding_window_predict: image shape {image.shape} is not [*spatial, C] '
                     f'for patch_size {patch_size}')
  if batch_size < 1:
    raise ValueError(f'sliding_window_predict: batch_size={batch_size}, need >= 1')
  if any(not 0 <= a < rank for a in tta_axes):
    raise ValueError(f'sliding_window_predict: tta_axes {tuple(tta_axes)} outside {rank} axes')
  weight = gaussian_importance(patch_size, sigma_scale)
  if window_fn is None:
    window_fn = make_window_fn(predict_fn, weight, tta_axes)
  padded, pads = patches.pad_to_at_least(np.asarray(image, np.float32), patch_size)
  spatial = padded.shape[:rank]
  starts = list(itertools.product(*(window_starts(s, p, overlap)
                                    for s, p in zip(spatial, patch_size))))
  acc = None
  norm = np.zeros(spatial, np.float32)
  for first in range(0, len(starts), batch_size):
    chunk = starts[first:first + batch_size]
    batch = np.zeros((batch_size, *patch_size, padded.shape[-1]), np.float32)
    for i, start in enumerate(chunk):
      batch[i] = patches.crop(padded, start, patch_size)
    probs = np.asarray(window_fn(batch))
    if probs.shape[:rank + 1] != (batch_size, *patch_size):
      raise ValueError(f'sliding_window_predict: predict_fn returned {probs.shape}, expected '
                       f'[{batch_size}, *{patch_size}, K]')
    if acc is None:
      acc = np.zeros((*spatial, probs.shape[-1]), np.float32)
    for i, start in enumerate(chunk):
      window = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
      acc[window] += probs[i]
      norm[window] += weight
  out = acc / norm[..., None]
  return out[tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, image.shape[:rank]))]


class Windows:
  """A model's sliding-window predictor, jitted once for many images of any size."""

  def __init__(self, predict_fn: PredictFn, settings: Settings):
    self.settings = settings
    self._window_fn = make_window_fn(
        predict_fn, gaussian_importance(settings.patch_size, settings.sigma_scale),
        settings.tta_axes)

  def probs(self, image: np.ndarray) -> np.ndarray:
    """Class probabilities `[*spatial, K]` of one image `[*spatial, C]`."""
    s = self.settings
    return sliding_window_predict(None, image, patch_size=s.patch_size, overlap=s.overlap,
                                  batch_size=s.batch_size, sigma_scale=s.sigma_scale,
                                  tta_axes=s.tta_axes, window_fn=self._window_fn)
