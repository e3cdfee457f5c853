"""Tests of Dice/IoU from confusion counts accumulated over a set, per class and per head; ignored
voxels, binary (one-channel) logits, regions, whole-case counts and the TGS salt score."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

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
  assert np.asarray(metrics.labels_from_logits(logits)).tolist() == [[0, 1, 1]]


def test_probs_from_logits_softmax_and_sigmoid_agree_with_labels():
  rng = np.random.default_rng(0)
  multi = rng.normal(size=(2, 5, 3)).astype(np.float32)
  p = np.asarray(metrics.probs_from_logits(multi))
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(p.argmax(-1), metrics.labels_from_logits(multi))
  binary = np.array([[[-2.0], [0.5], [3.0]]], np.float32)
  p = np.asarray(metrics.probs_from_logits(binary))
  sig = 1 / (1 + np.exp(-binary[..., 0]))
  np.testing.assert_allclose(p, np.stack([1 - sig, sig], -1), rtol=1e-6)
  np.testing.assert_array_equal(p.argmax(-1), metrics.labels_from_logits(binary))


def test_binary_output_counts_foreground_at_half_probability_per_head():
  label = np.array([[[0, 1], [1, 1]]])                     # [1, 2, 2]
  final = np.array([[[[-3.0], [0.2]], [[-0.1], [4.0]]]])   # p > 0.5 at (0,1), (1,1)
  head = np.array([[[[-1.0]]]])                            # 1x1: shrunk label is label[1, 1] = 1
  counts = np.asarray(metrics.output_counts(final, (head,), label, 2))
  assert counts.shape == (2, 3, 2)
  np.testing.assert_array_equal(counts[0], [[1, 2], [1, 0], [0, 1]])  # fg: tp 2, fp 0, fn 1
  out = metrics.summarize_outputs(counts)
  assert math.isclose(out['mean_foreground_dice'], 4 / 5)
  assert math.isclose(out['final']['mean_foreground_iou'], 2 / 3)
  assert out['heads'][0]['dice'] == [0.0, 0.0]  # predicted bg where the (shrunk) label is fg


def test_binary_output_on_multiclass_labels_scores_the_foreground_union():
  label = np.array([[0, 1, 2, 2, 3, 0]])              # 3 = ignore
  logits = np.array([[-1.0, 1.0, 1.0, -1.0, 1.0, 1.0]])[..., None]
  counts = np.asarray(metrics.output_counts(logits, (), label, 4, ignore_index=3))
  assert counts.shape == (1, 3, 2)                     # background / foreground
  np.testing.assert_array_equal(counts[0], [[1, 2], [1, 1], [1, 1]])
  np.testing.assert_array_equal(metrics.foreground_label(label, 3), [[0, 1, 1, 1, 3, 0]])
  np.testing.assert_array_equal(metrics.foreground_label(label), [[0, 1, 1, 1, 1, 0]])
  with pytest.raises(ValueError, match='regions need a softmax'):
    metrics.output_counts(logits, (), label, 4, regions=(('a', (1, 2)),))


def _partly_ignored(seed=0):
  """Labels 0..2 with 3 as the ignore label; a prediction right on every annotated voxel and
  wrong (classes 1, 2) on the ignored ones."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 3, (2, 6, 6))
  label[:, :2] = 3
  pred = np.where(label == 3, rng.integers(1, 3, label.shape), label)
  return pred, label


def test_ignored_voxels_leave_the_counts_perfect_on_annotated_scores_one():
  pred, label = _partly_ignored()
  without = metrics.summarize(np.asarray(metrics.confusion_counts(pred, label, 4)))
  assert without['dice'][1] < 1 and without['dice'][3] == 0.0  # the failure nnU-Net avoids
  for counts in (metrics.confusion_counts(pred, label, 4, ignore_index=3),
                 metrics.case_counts(pred, label, 4, ignore_index=3),
                 metrics.output_counts(10.0 * np.eye(4)[pred], (), label, 4, ignore_index=3)[0]):
    s = metrics.summarize(np.asarray(counts))
    assert s['dice'] == [1.0, 1.0, 1.0, None], s
    assert s['mean_foreground_dice'] == 1.0
  # A negative index (the config's "none") ignores nothing.
  np.testing.assert_array_equal(metrics.confusion_counts(pred, label, 4, ignore_index=-1),
                                metrics.confusion_counts(pred, label, 4))


def test_ignored_voxels_leave_binary_and_head_counts():
  pred, label = _partly_ignored(1)
  label = np.where(label == 3, 3, (label > 0).astype(int))    # binary + ignore label 3
  fg = np.where(label == 3, 1, label)                         # wrong only on ignored voxels
  logits = np.where(fg == 1, 5.0, -5.0)[..., None]
  head = logits[:, 1::2, 1::2]                                # = nearest-shrunk prediction
  counts = metrics.output_counts(logits, (head,), label, 2, ignore_index=3)
  out = metrics.summarize_outputs(np.asarray(counts))
  assert out['final']['dice'] == [1.0, 1.0] and out['heads'][0]['dice'] == [1.0, 1.0]


def test_case_counts_equals_confusion_counts():
  rng = np.random.default_rng(2)
  label = rng.integers(0, 4, (3, 5, 7))
  pred = rng.integers(0, 4, (3, 5, 7))
  regions = metrics.parse_regions('a=1,2,3;b=1,3;c=3')
  np.testing.assert_array_equal(
      metrics.case_counts(pred, label, 4, ignore_index=2, regions=regions),
      metrics.confusion_counts(pred, label, 4, ignore_index=2, regions=regions))


def test_case_counts_rejects_values_outside_the_classes():
  with pytest.raises(ValueError, match='label values outside 0..1'):
    metrics.case_counts(np.zeros(3, int), np.array([0, 1, 2]), 2)


def test_regions_by_hand_beside_per_class_scores():
  # BraTS-like: 1 necrosis, 2 oedema, 3 enhancing; whole = {1,2,3}, core = {1,3}, enh = {3}.
  label = np.array([[0, 1, 1, 2, 2, 3, 3, 0]])
  pred = np.array([[0, 3, 1, 2, 0, 3, 2, 2]])
  regions = metrics.parse_regions('whole=1,2,3;core=1,3;enhancing=3', num_classes=4)
  assert regions == (('whole', (1, 2, 3)), ('core', (1, 3)), ('enhancing', (3,)))
  counts = np.asarray(metrics.confusion_counts(pred, label, 4, regions=regions))
  assert counts.shape == (3, 7)
  # whole: label fg idx 1..6, pred fg idx 1,2,3,5,6,7 -> tp 5, fp 1, fn 1
  # core: label {1,2,5,6}, pred {1,2,5} -> tp 3, fp 0, fn 1; enhancing: label {5,6}, pred {1,5}
  np.testing.assert_array_equal(counts[:, 4:], [[5, 3, 1], [1, 0, 1], [1, 1, 1]])
  s = metrics.summarize(counts, regions)
  assert s['region_dice'] == {'whole': 10 / 12, 'core': 6 / 7, 'enhancing': 0.5}
  assert len(s['dice']) == 4 and math.isclose(s['mean_region_dice'], (10 / 12 + 6 / 7 + 0.5) / 3)
  assert metrics.region_dice(pred, label, 'whole=1,2,3;core=1,3;enhancing=3') == s['region_dice']
  out = metrics.summarize_outputs(counts[None], regions)
  assert out['final']['region_dice'] == s['region_dice']


@pytest.mark.parametrize('spec, match', [
    ('whole=1,2,9', r'foreground classes 1..3'),
    ('whole', 'not name=label'),
    ('a=1;a=2', 'duplicate'),
    ('a=x', 'not ints'),
])
def test_bad_regions_name_the_problem(spec, match):
  with pytest.raises(ValueError, match=match):
    metrics.parse_regions(spec, num_classes=4)


def test_tgs_score_by_hand():
  t = np.zeros((6, 3, 3), int)
  p = np.zeros((6, 3, 3), int)
  # 0: both empty -> 1. 1: empty label, one predicted pixel -> 0. 2: object missed -> 0.
  p[1, 0, 0] = 1
  t[2, 1, 1] = 1
  # 3: IoU 2/3 -> hits at 0.50, 0.55, 0.60, 0.65 -> 0.4.
  t[3, 0, :2] = 1
  p[3, 0, :3] = 1
  # 4: IoU 9/10... on 3x3: label all 9, prediction 8 -> IoU 8/9 = 0.889 -> 8 hits -> 0.8.
  t[4] = 1
  p[4] = 1
  p[4, 2, 2] = 0
  # 5: perfect -> 1 (IoU 1 beats 0.95).
  t[5, 1] = p[5, 1] = 1
  scores = np.asarray(metrics.tgs_scores(p, t))
  np.testing.assert_allclose(scores, [1.0, 0.0, 0.0, 0.4, 0.8, 1.0], rtol=1e-6)
  logits = np.where(p == 1, 3.0, -3.0)[..., None]
  total = np.asarray(metrics.tgs_score_sum(logits, t, mask=np.array([1, 1, 1, 1, 1, 0])))
  np.testing.assert_allclose(total, [2.2, 5.0], rtol=1e-6)


def test_tgs_score_ignores_ignored_pixels():
  t = np.array([[[1, 1, 2, 2]]])  # 2 = ignore
  p = np.array([[[1, 1, 1, 0]]])
  assert float(metrics.tgs_scores(p, t, ignore_index=2)[0]) == 1.0
  assert float(metrics.tgs_scores(p, t)[0]) < 1.0
