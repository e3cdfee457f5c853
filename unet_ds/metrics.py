"""Dice and IoU from confusion counts accumulated over a whole evaluation set.

Scores are computed once from the summed true-positive / false-positive / false-negative counts
of every voxel of the set, never as an average of per-batch scores (which over-weights small
batches and is undefined for batches missing a class).

Convention for a class absent from both the prediction and the label over the whole set: its
Dice and IoU are undefined and reported as NaN (`null` in JSON), and it is left out of the mean
foreground scores (as nnU-Net does). A class present in only one of them scores 0.

The counts of a DS model are kept for every output: `final` against the label, each head
against the label shrunk to its resolution (nearest, as the DS loss does).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unet_ds import targets


def predict_labels(logits: jax.Array) -> jax.Array:
  """Class map from logits: argmax, or `logit > 0` for a single binary channel."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def confusion_counts(pred: jax.Array, label: jax.Array, num_classes: int,
                     mask: jax.Array | None = None) -> jax.Array:
  """`[3, K]` int32 counts (tp, fp, fn) per class of integer maps `pred` and `label` `[B, *s]`.

  `mask [B]` marks the real examples of a padded batch; padded ones count nothing.
  """
  k = jnp.arange(num_classes)
  p = pred[..., None] == k
  t = label[..., None] == k
  if mask is not None:
    m = mask.reshape((-1,) + (1,) * (pred.ndim - 1) + (1,)).astype(bool)
    p, t = p & m, t & m
  axes = tuple(range(pred.ndim))
  tp = jnp.sum(p & t, axis=axes)
  fp = jnp.sum(p & ~t, axis=axes)
  fn = jnp.sum(~p & t, axis=axes)
  return jnp.stack([tp, fp, fn]).astype(jnp.int32)


def output_counts(final: jax.Array, intermediates: Sequence[jax.Array], label: jax.Array,
                  num_classes: int, mask: jax.Array | None = None) -> jax.Array:
  """`[1 + n_heads, 3, K]` counts for `final` and every head (label shrunk to each head)."""
  counts = []
  for out in (final, *intermediates):
    lab = label if out.shape[1:-1] == label.shape[1:] else targets.nearest(label, out.shape[1:-1])
    counts.append(confusion_counts(predict_labels(out), lab, num_classes, mask))
  return jnp.stack(counts)


def dice_iou(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-class Dice and IoU from `[3, K]` counts; NaN where a class is absent from both."""
  tp, fp, fn = (np.asarray(c, np.float64) for c in counts)
  denom = 2 * tp + fp + fn
  with np.errstate(invalid='ignore', divide='ignore'):
    dice = np.where(denom > 0, 2 * tp / denom, np.nan)
    iou = np.where(denom > 0, tp / (tp + fp + fn), np.nan)
  return dice, iou


def _nanmean(x: np.ndarray) -> float:
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float('nan')


def summarize(counts: np.ndarray) -> dict[str, Any]:
  """JSON-ready scores of one output's `[3, K]` counts.

  Foreground = every class but 0; with a single binary class map (K = 2) that is class 1.
  """
  dice, iou = dice_iou(counts)
  fg = slice(1, None) if dice.size > 1 else slice(None)
  return {
      'dice': [None if np.isnan(d) else float(d) for d in dice],
      'iou': [None if np.isnan(v) else float(v) for v in iou],
      'mean_foreground_dice': _nanmean(dice[fg]),
      'mean_foreground_iou': _nanmean(iou[fg]),
  }


def summarize_outputs(counts: np.ndarray) -> dict[str, Any]:
  """Scores of `[1 + n_heads, 3, K]` counts: `{'mean_foreground_dice', 'final', 'heads'}`."""
  counts = np.asarray(counts)
  final = summarize(counts[0])
  return {
      'mean_foreground_dice': final['mean_foreground_dice'],
      'final': final,
      'heads': [summarize(c) for c in counts[1:]],
  }
