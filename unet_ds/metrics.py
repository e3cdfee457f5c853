"""Dice and IoU from confusion counts accumulated over a whole evaluation set, region scores, and
the TGS salt competition score.

Scores are computed once from the summed true-positive / false-positive / false-negative counts
of every voxel of the set, never as an average of per-batch scores (which over-weights small
batches and is undefined for batches missing a class).

Convention for a class absent from both the prediction and the label over the whole set: its
Dice and IoU are undefined and reported as NaN (`null` in JSON), and it is left out of the mean
foreground scores (as nnU-Net does). A class present in only one of them scores 0.

Ignored voxels (`ignore_index`, the loss's `loss.ignore_index`) leave every count, as in nnU-Net's
evaluation: a prediction perfect on the annotated voxels scores Dice 1 whatever it says on the
rest. A negative `ignore_index` or None means none.

Logits with one channel are a binary (sigmoid) output: the foreground is `sigmoid > 0.5`, i.e.
`logit > 0`, and it is class 1 of a two-class map (`labels_from_logits`, `probs_from_logits`).
It is scored against `foreground_label(label)`: 1 where the label is any class > 0 (class 1 of
two-class data; the union of the foreground classes of multi-class data), as `bce_dice` trains.

Regions (`eval.regions`, e.g. BraTS whole tumour = labels {1, 2, 3}) are unions of classes,
scored as one foreground each; their counts follow the class counts on the last axis
(`[3, K + R]`), so they accumulate and summarise the same way.

The counts of a DS model are kept for every output: `final` against the label, each head
against the label shrunk to its resolution (nearest, as the DS loss does).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unet_ds import targets

Regions = tuple[tuple[str, tuple[int, ...]], ...]
# TGS salt (Kaggle 2018): precision averaged over these IoU thresholds, 0.50:0.05:0.95.
TGS_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


# ----------------------------------------------------------------------------- logits

def labels_from_logits(logits: jax.Array) -> jax.Array:
  """Integer class map `[..., ]` from logits `[..., K]`: argmax, or `sigmoid > 0.5` (`logit > 0`)
  for a single binary channel."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def probs_from_logits(logits: jax.Array) -> jax.Array:
  """Class probabilities `[..., K]`: softmax, or `[1 - p, p]` (K = 2) for one sigmoid channel.

  `argmax` of the result equals `labels_from_logits(logits)` (ties aside), so sliding-window
  blending of probabilities and single-pass labels agree for both kinds of output.
  """
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    p = jax.nn.sigmoid(logits)
    return jnp.concatenate([1 - p, p], axis=-1)
  return jax.nn.softmax(logits, axis=-1)


def foreground_label(label: jax.Array, ignore_index: int | None = None) -> jax.Array:
  """The two-class label a one-sigmoid-channel output is scored against: 1 where `label > 0`
  (every foreground class), 0 elsewhere; voxels labelled `ignore_index` keep that value."""
  fg = (label > 0).astype(label.dtype)
  ignore_index = _ignore(ignore_index)
  return fg if ignore_index is None else jnp.where(label == ignore_index, label, fg)


def _ignore(ignore_index: int | None) -> int | None:
  """`loss.ignore_index` convention: None or negative means no ignored label."""
  return None if ignore_index is None or ignore_index < 0 else int(ignore_index)


# ----------------------------------------------------------------------------- regions

def parse_regions(spec: str | Mapping[str, Sequence[int]] | Sequence[Any] | None,
                  num_classes: int | None = None) -> Regions:
  """`eval.regions` as `((name, labels), ...)`.

  Accepts `'whole_tumour=1,2,3;tumour_core=1,3;enhancing=3'`, a mapping `{name: labels}`, pairs,
  or ''/None (no regions). With `num_classes`, every label must be a foreground class
  `1..num_classes-1`.
  """
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    return ()
  if isinstance(spec, str):
    pairs = []
    for part in filter(None, (p.strip() for p in spec.split(';'))):
      name, sep, labels = part.partition('=')
      if not sep:
        raise ValueError(f'eval.regions: {part!r} is not name=label,label (in {spec!r})')
      pairs.append((name.strip(), labels.split(',')))
  elif isinstance(spec, Mapping) or hasattr(spec, 'items'):
    pairs = list(spec.items())
  else:
    pairs = list(spec)
  out = []
  for name, labels in pairs:
    try:
      labels = tuple(sorted({int(v) for v in labels}))
    except (TypeError, ValueError):
      raise ValueError(f'eval.regions: region {name!r} labels {labels!r} are not ints') from None
    if not name or not labels:
      raise ValueError(f'eval.regions: region {name!r} needs a name and at least one label')
    if num_classes is not None and any(not 1 <= v < num_classes for v in labels):
      raise ValueError(f'eval.regions: region {name!r} labels {labels} must be foreground '
                       f'classes 1..{num_classes - 1} (data.num_classes={num_classes})')
    out.append((str(name), labels))
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f'eval.regions: duplicate region names {names}')
  return tuple(out)


# ----------------------------------------------------------------------------- counts

def _valid(label: jax.Array, mask: jax.Array | None, ignore_index: int | None) -> jax.Array:
  """`[B, *s]` bool: voxels of real (masked-in) examples whose label is not ignored."""
  valid = jnp.ones(label.shape, bool)
  if mask is not None:
    valid = valid & mask.reshape((-1,) + (1,) * (label.ndim - 1)).astype(bool)
  ignore_index = _ignore(ignore_index)
  if ignore_index is not None:
    valid = valid & (label != ignore_index)
  return valid


def _tp_fp_fn(p: jax.Array, t: jax.Array, valid: jax.Array) -> jax.Array:
  """`[3, N]` counts of one-hot-like bool maps `[B, *s, N]` over valid voxels."""
  v = valid[..., None]
  p, t = p & v, t & v
  axes = tuple(range(p.ndim - 1))
  return jnp.stack([jnp.sum(p & t, axis=axes), jnp.sum(p & ~t, axis=axes),
                    jnp.sum(~p & t, axis=axes)]).astype(jnp.int32)


def confusion_counts(pred: jax.Array, label: jax.Array, num_classes: int,
                     mask: jax.Array | None = None, ignore_index: int | None = None,
                     regions: Regions = ()) -> jax.Array:
  """`[3, K + R]` int32 counts (tp, fp, fn) per class, then per region, of integer maps
  `pred` and `label` `[B, *s]`.

  `mask [B]` marks the real examples of a padded batch; padded ones count nothing. Voxels whose
  label is `ignore_index` count nothing either.
  """
  valid = _valid(label, mask, ignore_index)
  k = jnp.arange(num_classes)
  counts = _tp_fp_fn(pred[..., None] == k, label[..., None] == k, valid)
  if not regions:
    return counts
  p = jnp.stack([jnp.isin(pred, jnp.asarray(labels)) for _, labels in regions], axis=-1)
  t = jnp.stack([jnp.isin(label, jnp.asarray(labels)) for _, labels in regions], axis=-1)
  return jnp.concatenate([counts, _tp_fp_fn(p, t, valid)], axis=-1)


def output_counts(final: jax.Array, intermediates: Sequence[jax.Array], label: jax.Array,
                  num_classes: int, mask: jax.Array | None = None, *,
                  ignore_index: int | None = None, regions: Regions = ()) -> jax.Array:
  """`[1 + n_heads, 3, K + R]` counts for `final` and every head (label shrunk to each head).

  Logits have K = `num_classes` channels (softmax), or one (sigmoid): then the counts are of the
  two classes background / foreground (`foreground_label`), `[1 + n_heads, 3, 2]`, whatever
  `num_classes` (the label values) is, and there are no regions.
  """
  binary = final.shape[-1] == 1
  if binary:
    if regions:
      raise ValueError('eval.regions need a softmax output (model.num_classes > 1); a single '
                       'sigmoid channel has only background / foreground')
    label, num_classes = foreground_label(label, ignore_index), 2
  counts = []
  for out in (final, *intermediates):
    lab = label if out.shape[1:-1] == label.shape[1:] else targets.nearest(label, out.shape[1:-1])
    counts.append(confusion_counts(labels_from_logits(out), lab, num_classes, mask,
                                   ignore_index, regions))
  return jnp.stack(counts)


def case_counts(pred: np.ndarray, label: np.ndarray, num_classes: int,
                ignore_index: int | None = None, regions: Regions = ()) -> np.ndarray:
  """`[3, K + R]` int64 (tp, fp, fn) per class (then region) of two whole integer maps (numpy).

  Voxels labelled `ignore_index` count nothing.
  """
  pred = np.asarray(pred).astype(np.int64).ravel()
  label = np.asarray(label).astype(np.int64).ravel()
  if pred.shape != label.shape:
    raise ValueError(f'case_counts: prediction has {pred.size} voxels, label {label.size}')
  ignore_index = _ignore(ignore_index)
  if ignore_index is not None:
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
  for name, values in (('prediction', pred), ('label', label)):
    if values.size and not 0 <= values.min() <= values.max() < num_classes:
      raise ValueError(f'case_counts: {name} values outside 0..{num_classes - 1} '
                       f'(min {values.min()}, max {values.max()})')
  cm = np.bincount(label * num_classes + pred,
                   minlength=num_classes * num_classes).reshape(num_classes, num_classes)
  tp = np.diag(cm)
  counts = np.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp])
  if not regions:
    return counts
  return np.concatenate([counts, _np_region_counts(pred, label, regions)], axis=-1)


def _np_region_counts(pred: np.ndarray, label: np.ndarray, regions: Regions) -> np.ndarray:
  """`[3, R]` int64 counts of flat integer maps (ignored voxels already removed)."""
  per_region = []
  for _, labels in regions:
    p, t = np.isin(pred, labels), np.isin(label, labels)
    per_region.append([np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)])
  return np.asarray(per_region, np.int64).reshape(-1, 3).T


# ----------------------------------------------------------------------------- scores

def dice_iou(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-column Dice and IoU from `[3, N]` counts; NaN where a class is absent from both."""
  tp, fp, fn = (np.asarray(c, np.float64) for c in counts)
  denom = 2 * tp + fp + fn
  with np.errstate(invalid='ignore', divide='ignore'):
    dice = np.where(denom > 0, 2 * tp / denom, np.nan)
    iou = np.where(denom > 0, tp / (tp + fp + fn), np.nan)
  return dice, iou


def region_dice(pred: np.ndarray, label: np.ndarray, regions: Regions | str,
                ignore_index: int | None = None) -> dict[str, float | None]:
  """Dice of each region (a union of labels, e.g. BraTS whole tumour {1, 2, 3}) of two integer
  maps; None where the region is absent from both."""
  regions = parse_regions(regions)
  pred = np.asarray(pred).astype(np.int64).ravel()
  label = np.asarray(label).astype(np.int64).ravel()
  if _ignore(ignore_index) is not None:
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
  dice, _ = dice_iou(_np_region_counts(pred, label, regions))
  return {name: _float_or_none(d) for (name, _), d in zip(regions, dice)}


def _float_or_none(x: float) -> float | None:
  return None if np.isnan(x) else float(x)


def _nanmean(x: np.ndarray) -> float:
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float('nan')


def summarize(counts: np.ndarray, regions: Regions = ()) -> dict[str, Any]:
  """JSON-ready scores of one output's `[3, K + R]` counts.

  Foreground = every class but 0; with a single binary class map (K = 2) that is class 1.
  With `regions`, their Dice and IoU are reported by name beside the per-class scores.
  """
  counts = np.asarray(counts)
  k = counts.shape[-1] - len(regions)
  dice, iou = dice_iou(counts)
  cls_dice, cls_iou = dice[:k], iou[:k]
  fg = slice(1, None) if k > 1 else slice(None)
  out = {
      'dice': [_float_or_none(d) for d in cls_dice],
      'iou': [_float_or_none(v) for v in cls_iou],
      'mean_foreground_dice': _nanmean(cls_dice[fg]),
      'mean_foreground_iou': _nanmean(cls_iou[fg]),
  }
  if regions:
    out['region_dice'] = {n: _float_or_none(d) for (n, _), d in zip(regions, dice[k:])}
    out['region_iou'] = {n: _float_or_none(v) for (n, _), v in zip(regions, iou[k:])}
    out['mean_region_dice'] = _nanmean(dice[k:])
  return out


def summarize_outputs(counts: np.ndarray, regions: Regions = ()) -> dict[str, Any]:
  """Scores of `[1 + n_heads, 3, K + R]` counts: `{'mean_foreground_dice', 'final', 'heads'}`."""
  counts = np.asarray(counts)
  final = summarize(counts[0], regions)
  return {
      'mean_foreground_dice': final['mean_foreground_dice'],
      'final': final,
      'heads': [summarize(c, regions) for c in counts[1:]],
  }


# ----------------------------------------------------------------------------- TGS salt score

def tgs_scores(pred: jax.Array, label: jax.Array, ignore_index: int | None = None) -> jax.Array:
  """TGS salt competition score of each image of binary maps `[B, *s]` (nonzero = foreground).

  Per image, the precision TP / (TP + FP + FN) of the one predicted object against the one true
  object, averaged over the IoU thresholds 0.50:0.05:0.95 (a hit when IoU > threshold). The
  empty-mask rule: an image with no foreground in the label scores 1 when the prediction is
  empty too and 0 otherwise; a non-empty label with an empty prediction scores 0.
  Works on numpy or jax arrays (jit-friendly); returns float32 `[B]`.
  """
  valid = _valid(label, None, ignore_index)
  p = (pred != 0) & valid
  t = (label != 0) & valid
  axes = tuple(range(1, p.ndim))
  inter = jnp.sum(p & t, axis=axes).astype(jnp.float32)
  union = jnp.sum(p | t, axis=axes).astype(jnp.float32)
  iou = inter / jnp.maximum(union, 1.0)
  hits = (iou[:, None] > jnp.asarray(TGS_IOU_THRESHOLDS, jnp.float32)).astype(jnp.float32)
  return jnp.where(union == 0, 1.0, jnp.mean(hits, axis=1))


def tgs_score_sum(final: jax.Array, label: jax.Array, mask: jax.Array | None = None,
                  ignore_index: int | None = None) -> jax.Array:
  """`[2]` float32 (sum of the TGS scores of the batch's real examples, their number), from
  `final` logits: sums over batches, then `sum / n` is the set's score."""
  scores = tgs_scores(labels_from_logits(final), label, ignore_index)
  real = (jnp.ones(scores.shape, jnp.float32) if mask is None
          else mask.reshape(-1).astype(jnp.float32))
  return jnp.stack([jnp.sum(scores * real), jnp.sum(real)])
