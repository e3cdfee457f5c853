"""Tests of Dice/IoU from confusion counts accumulated over a set, per class and per head."""

import math

import jax.numpy as jnp
import numpy as np

from unet_ds import metrics


def test_counts_and_scores_by_hand():
  # Classes: 0 bg, 1 partly right, 2 predicted but absent from the label, 3 absent from both.
  label = np.array([[0, 0, 1, 1, 1, 0]])
  pred = np.array([[0, 2, 1, 1, 0, 0]])
  counts = np.asarray(metrics.confusion_counts(jnp.asarray(pred), jnp.asarray(label), 4))
  np.testing.assert_array_equal(counts, [[2, 2, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]])
  s = metrics.summarize(counts)
  assert s['dice'][0] == 4 / 6 and s['dice'][1] == 4 / 5 and s['dice'][2] == 0.0
  assert s['dice'][3] is None and s['iou'][3] is None  # absent from both: undefined
  assert s['iou'][1] == 2 / 3
  assert math.isclose(s['mean_foreground_dice'], (4 / 5 + 0.0) / 2)
  assert math.isclose(s['mean_foreground_iou'], (2 / 3 + 0.0) / 2)


def test_accumulating_batches_equals_whole_set_not_mean_of_batches():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, (4, 6, 6))
  pred = np.where(rng.random((4, 6, 6)) < 0.7, label, rng.integers(0, 3, (4, 6, 6)))
  whole = metrics.confusion_counts(pred, label, 3)
  parts = sum(metrics.confusion_counts(pred[i:i + 1], label[i:i + 1], 3) for i in range(4))
  np.testing.assert_array_equal(whole, parts)


def test_mask_excludes_padded_examples():
  label = np.ones((2, 3, 3), np.int32)
  pred = np.ones((2, 3, 3), np.int32)
  pred[1] = 0
  counts = metrics.confusion_counts(pred, label, 2, mask=jnp.array([True, False]))
  s = metrics.summarize(np.asarray(counts))
  assert s['dice'] == [None, 1.0]


def test_perfect_prediction_dice_one_and_heads_at_their_resolution():
  rng = np.random.default_rng(1)
  label = rng.integers(0, 3, (2, 8, 8, 8))
  final = 10.0 * np.eye(3)[label]
  head = 10.0 * np.eye(3)[label[:, 1::2, 1::2, 1::2]]  # exactly the nearest-shrunk label
  counts = metrics.output_counts(jnp.asarray(final), (jnp.asarray(head),), jnp.asarray(label), 3)
  assert counts.shape == (2, 3, 3)
  out = metrics.summarize_outputs(np.asarray(counts))
  assert out['mean_foreground_dice'] == 1.0
  assert out['final']['dice'] == [1.0, 1.0, 1.0]
  assert out['heads'][0]['dice'] == [1.0, 1.0, 1.0]


def test_binary_single_channel_logits():
  logits = np.array([[[-1.0], [2.0], [3.0]]])
  assert np.asarray(metrics.predict_labels(logits)).tolist() == [[0, 1, 1]]
