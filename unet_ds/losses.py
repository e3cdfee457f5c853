"""Per-level segmentation losses, DS weights and schedules, and the deep-supervision loss.

Everything here is a pure, jit-friendly function. Losses take integer labels at the top
(`deep_supervision_loss`) and work on one-hot (or max-pooled, multi-hot) targets inside, with a
`valid` mask that drops ignored voxels from every term.

Conventions:
- `outputs = (final, *intermediates)`; `weights[0]` belongs to `final`, `weights[i]` to head i.
- Named weight schemes are normalised to sum 1; an explicit tuple is used as given.
- A schedule scales the side (head) weights only; the final output's weight stays fixed (3D-DSN).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unet_ds import targets
from unet_ds.models import layers

LOSSES = ('ce', 'dice', 'dice_ce', 'generalized_dice', 'bce', 'bce_dice')
BINARY_LOSSES = ('bce', 'bce_dice')  # one sigmoid channel (model.num_classes = 1)
WEIGHT_SCHEMES = ('exp', 'nnunet', 'same')
SCHEDULES = ('constant', 'linear', 'cosine')
TARGET_MODES = ('downsample', 'upsample')

LevelLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------- targets

def one_hot_target(label: jax.Array, num_classes: int,
                   ignore_index: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Integer `label [B, *s]` -> (`target [B, *s, K]` float32 one-hot, `valid [B, *s]` float32)."""
  label = label.astype(jnp.int32)
  valid = jnp.ones(label.shape, jnp.float32)
  if ignore_index is not None:
    valid = (label != ignore_index).astype(jnp.float32)
    label = jnp.where(label == ignore_index, 0, label)
  target = jax.nn.one_hot(label, num_classes, dtype=jnp.float32) * valid[..., None]
  return target, valid


def _sum_axes(x: jax.Array, batch: bool) -> tuple[int, ...]:
  """Spatial axes (and the batch axis when `batch`) of a `[B, *s, K]` array."""
  return tuple(range(0 if batch else 1, x.ndim - 1))


# ----------------------------------------------------------------------------- per level

def cross_entropy(logits: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
  """Softmax cross-entropy, mean over valid voxels. `target` may be soft (max-pooled)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_voxel = -jnp.sum(target * logp, axis=-1)
  return jnp.sum(per_voxel * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _dice_from_probs(probs: jax.Array, target: jax.Array, valid: jax.Array, *,
                     batch_dice: bool, smooth: float) -> jax.Array:
  """Soft Dice per class (`[K]` for batch Dice, `[B, K]` per sample)."""
  probs = probs * valid[..., None]
  axes = _sum_axes(probs, batch_dice)
  inter = jnp.sum(probs * target, axis=axes)
  denom = jnp.sum(probs, axis=axes) + jnp.sum(target, axis=axes)
  return (2.0 * inter + smooth) / (denom + smooth)


def soft_dice(logits: jax.Array, target: jax.Array, valid: jax.Array, *,
              include_background: bool = False, batch_dice: bool = True,
              smooth: float = 1e-5) -> jax.Array:
  """1 - mean soft Dice of the softmax over classes (background excluded unless asked).

  `batch_dice` pools voxels of the whole batch per class (nnU-Net's default for 3D); otherwise
  Dice is computed per sample and averaged. A class absent from both prediction and target scores
  1 thanks to `smooth`, so it neither helps nor hurts.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  dice = _dice_from_probs(probs, target, valid, batch_dice=batch_dice, smooth=smooth)
  if not include_background and logits.shape[-1] > 1:
    dice = dice[..., 1:]
  return 1.0 - jnp.mean(dice)


def dice_ce(logits: jax.Array, target: jax.Array, valid: jax.Array, *,
            include_background: bool = False, batch_dice: bool = True,
            smooth: float = 1e-5) -> jax.Array:
  """nnU-Net's default: cross-entropy + soft Dice loss, equal weights."""
  return cross_entropy(logits, target, valid) + soft_dice(
      logits, target, valid, include_background=include_background, batch_dice=batch_dice,
      smooth=smooth)


def generalized_dice(logits: jax.Array, target: jax.Array, valid: jax.Array, *,
                     include_background: bool = False, batch_dice: bool = True,
                     smooth: float = 1e-5) -> jax.Array:
  """1 - generalised Dice (Sudre et al. 2017) of the softmax, square weighting.

  `1 - 2 sum_k w_k sum_n p_kn t_kn / sum_k w_k sum_n (p_kn + t_kn)`, `w_k = 1 / (sum_n t_kn)^2`,
  so small structures weigh as much as large ones. A class absent from the target would get an
  infinite weight; it takes the largest finite weight instead (NiftyNet's rule, as the BraTS 2018
  3D U-Net used). `batch_dice` pools the batch per class, else one score per sample, averaged.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * valid[..., None]
  if not include_background and logits.shape[-1] > 1:
    probs, target = probs[..., 1:], target[..., 1:]
  axes = _sum_axes(probs, batch_dice)
  volume = jnp.sum(target, axis=axes)
  inter = jnp.sum(probs * target, axis=axes)
  denom = jnp.sum(probs, axis=axes) + volume
  present = volume > 0
  w = jnp.where(present, 1.0 / jnp.maximum(volume, 1e-12) ** 2, 0.0)
  w = jnp.where(present, w, jnp.max(w, axis=-1, keepdims=True))
  gdice = (2.0 * jnp.sum(w * inter, axis=-1) + smooth) / (jnp.sum(w * denom, axis=-1) + smooth)
  return 1.0 - jnp.mean(gdice)


def _binary_foreground(logits: jax.Array, target: jax.Array, name: str
                       ) -> tuple[jax.Array, jax.Array]:
  """(float32 logits `[..., 1]`, foreground target `[..., 1]` = any non-background class)."""
  if logits.shape[-1] != 1:
    raise ValueError(f'{name} needs a single logit channel (model.num_classes=1), got logits '
                     f'{logits.shape}')
  fg = jnp.clip(jnp.sum(target[..., 1:], axis=-1, keepdims=True), 0.0, 1.0)
  return logits.astype(jnp.float32), fg


def bce(logits: jax.Array, target: jax.Array, valid: jax.Array, **unused) -> jax.Array:
  """Binary cross-entropy of one foreground logit channel (`logits [..., 1]`), mean over valid
  voxels. The foreground target is every non-background class of `target` (one-hot, >= 2)."""
  del unused
  z, fg = _binary_foreground(logits, target, 'bce')
  # Numerically stable BCE with logits.
  per_voxel = jnp.maximum(z, 0) - z * fg + jnp.log1p(jnp.exp(-jnp.abs(z)))
  return jnp.sum(per_voxel[..., 0] * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def bce_dice(logits: jax.Array, target: jax.Array, valid: jax.Array, *,
             batch_dice: bool = True, smooth: float = 1.0, **unused) -> jax.Array:
  """Binary: BCE + (1 - soft Dice of the sigmoid) on one foreground logit channel (TGS salt)."""
  del unused
  z, fg = _binary_foreground(logits, target, 'bce_dice')
  dice = _dice_from_probs(jax.nn.sigmoid(z), fg, valid, batch_dice=batch_dice, smooth=smooth)
  return bce(logits, target, valid) + 1.0 - jnp.mean(dice)


def make_level_loss(name: str, *, include_background: bool = False, batch_dice: bool = True,
                    smooth: float = 1e-5) -> LevelLoss:
  """The per-level loss `f(logits, target, valid) -> scalar` named by `config.loss.name`."""
  if name == 'ce':
    return cross_entropy
  kw = dict(batch_dice=batch_dice, smooth=smooth)
  if name == 'dice':
    return functools.partial(soft_dice, include_background=include_background, **kw)
  if name == 'dice_ce':
    return functools.partial(dice_ce, include_background=include_background, **kw)
  if name == 'generalized_dice':
    return functools.partial(generalized_dice, include_background=include_background, **kw)
  if name == 'bce':
    return bce
  if name == 'bce_dice':
    return functools.partial(bce_dice, **kw)
  raise ValueError(f'loss.name must be one of {LOSSES}, got {name!r}')


# ----------------------------------------------------------------------------- DS weights

def ds_weights(scheme: str | Sequence[float], levels: Sequence[int]) -> np.ndarray:
  """Static weights for outputs at resolution `levels` (0 = final, then the heads' levels).

  - `'exp'`: 1/2^level, normalised.
  - `'nnunet'`: 1/2^level with the lowest-resolution output at 0, normalised (nnU-Net v2).
  - `'same'`: equal, normalised.
  - a tuple: used as given; its length must match the number of outputs.

  Errors say what is wrong with `scheme` without naming a config key: the caller names it once
  (`config_lib.validate`: 'config.loss.ds_weights: has 4 values ...').
  """
  levels = tuple(int(l) for l in levels)
  n = len(levels)
  if isinstance(scheme, str):
    if scheme == 'same':
      w = np.ones(n)
    elif scheme in ('exp', 'nnunet'):
      w = np.array([0.5 ** l for l in levels])
      if scheme == 'nnunet' and n > 1:
        w[int(np.argmax(levels))] = 0.0
    else:
      raise ValueError(f'must be one of {WEIGHT_SCHEMES} or a tuple of floats, '
                       f'got {scheme!r}')
    return (w / w.sum()).astype(np.float32)
  w = np.asarray(tuple(scheme), np.float32)
  if w.shape != (n,):
    raise ValueError(f'has {w.size} values {tuple(scheme)} but the model has {n} '
                     f'outputs (final + heads at levels {levels[1:]}); give {n} weights')
  if np.any(w < 0) or not np.all(np.isfinite(w)):
    raise ValueError(f'must be finite and >= 0, got {tuple(scheme)}')
  return w


def output_weights(scheme: str | Sequence[float], head_levels: Sequence[int], *,
                   side_losses: bool = True) -> np.ndarray:
  """Base weights for `(final, *heads)`; without side losses only `final` is trained (weight 1).

  `additive` and `hypercolumn` fold the heads into `final`, so by default they have one loss;
  `deep` always trains its heads.
  """
  levels = (0, *head_levels)
  if not side_losses:
    w = np.zeros(len(levels), np.float32)
    w[0] = 1.0
    if not isinstance(scheme, str):
      ds_weights(scheme, levels)  # still reject a tuple of the wrong length
    return w
  return ds_weights(scheme, levels)


def side_weight_scale(step: jax.Array | int, *, schedule: str = 'constant',
                      decay_steps: int = 1, floor: float = 0.0) -> jax.Array:
  """Factor on the side weights at `step`: 1 -> `floor` over `decay_steps` (then held)."""
  if schedule not in SCHEDULES:
    raise ValueError(f'loss.ds_schedule must be one of {SCHEDULES}, got {schedule!r}')
  if schedule == 'constant':
    return jnp.ones((), jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(decay_steps), 1), 0.0, 1.0)
  if schedule == 'linear':
    frac = 1.0 - t
  else:
    frac = 0.5 * (1.0 + jnp.cos(math.pi * t))
  return floor + (1.0 - floor) * frac


def scheduled_weights(base: np.ndarray | jax.Array, step: jax.Array | int, *,
                      schedule: str = 'constant', decay_steps: int = 1,
                      floor: float = 0.0) -> jax.Array:
  """`base` with its side entries (index >= 1) scaled by `side_weight_scale(step)`."""
  base = jnp.asarray(base, jnp.float32)
  scale = side_weight_scale(step, schedule=schedule, decay_steps=decay_steps, floor=floor)
  return base.at[1:].multiply(scale)


# ----------------------------------------------------------------------------- the DS loss

def deep_supervision_loss(final: jax.Array, intermediates: Sequence[jax.Array],
                          label: jax.Array, weights: jax.Array | Sequence[float], *,
                          level_loss: LevelLoss = dice_ce, num_classes: int | None = None,
                          target: str = 'downsample', downsample: str = 'nearest',
                          ignore_index: int | None = None, resize_impl: str = 'native'
                          ) -> tuple[jax.Array, dict]:
  """`sum_i weights[i] * level_loss(output_i, label)` over `(final, *intermediates)`.

  Every output is compared with the SAME label: shrunk to the head's resolution
  (`target='downsample'`, nearest or max-pool of the one-hot), or the head's logits resized
  (linear) to the label's resolution (`target='upsample'`, through `layers.resize` with
  `resize_impl`: the model's conv_impl, so 'onednn' resamples natively).

  Returns `(loss, aux)`, `aux = {'level_losses': [n], 'ds_weights': [n]}`.
  """
  outputs = (final, *intermediates)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != (len(outputs),):
    raise ValueError(f'{weights.shape[0] if weights.ndim else 0} DS weights for {len(outputs)} '
                     'outputs (final + heads)')
  if target not in TARGET_MODES:
    raise ValueError(f'loss.target must be one of {TARGET_MODES}, got {target!r}')
  if downsample not in targets.DOWNSAMPLE_METHODS:
    raise ValueError(f'loss.downsample must be one of {targets.DOWNSAMPLE_METHODS}, '
                     f'got {downsample!r}')
  spatial = label.shape[1:]
  if final.shape[1:-1] != spatial:
    raise ValueError(f'final logits {final.shape} and label {label.shape} differ in spatial shape')
  k = max(num_classes or final.shape[-1], 2)
  onehot, valid = one_hot_target(label, k, ignore_index)

  losses = []
  for out in outputs:
    size = out.shape[1:-1]
    if size == spatial:
      losses.append(level_loss(out, onehot, valid))
    elif target == 'upsample':
      up = layers.resize(out.astype(jnp.float32), spatial, impl=resize_impl)
      losses.append(level_loss(up, onehot, valid))
    elif downsample == 'nearest':
      losses.append(level_loss(out, targets.nearest(onehot, size), targets.nearest(valid, size)))
    else:
      losses.append(level_loss(out, targets.maxpool_onehot(onehot, size),
                               targets.maxpool(valid[..., None], size)[..., 0]))
  level_losses = jnp.stack(losses)
  return jnp.sum(weights * level_losses), {'level_losses': level_losses, 'ds_weights': weights}
