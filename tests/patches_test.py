"""Tests for unet_ds.data.patches: padding/cropping and foreground oversampling."""
import numpy as np
import pytest

from unet_ds.data import patches


def test_pad_to_at_least_centres_and_keeps_larger_axes():
  padded, pads = patches.pad_to_at_least(np.ones((3, 10, 2)), (6, 4))
  assert padded.shape == (6, 10, 2) and pads == ((1, 2), (0, 0))
  assert padded[:, :, 0].sum() == 30 and padded[0].sum() == 0


def test_center_pad_crop_exact_shape():
  label = np.arange(5 * 9).reshape(5, 9)
  out = patches.center_pad_crop({'image': label[..., None].astype(np.float32), 'label': label,
                                 'case_id': 'x'}, (7, 5))
  assert set(out) == {'image', 'label'}
  assert out['image'].shape == (7, 5, 1) and out['label'].shape == (7, 5)
  np.testing.assert_array_equal(out['label'][1:6], label[:, 2:7])
  np.testing.assert_array_equal(out['label'][0], 0)


def test_patch_pairs_image_and_label():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, (20, 17, 9))
  image = np.stack([label, -label], -1).astype(np.float32)
  for fg in (False, True):
    img, lab = patches.sample_patch(image, label, (8, 8, 8), rng, foreground=fg)
    assert img.shape == (8, 8, 8, 2) and lab.shape == (8, 8, 8)
    np.testing.assert_array_equal(img[..., 0], lab)


def test_small_case_is_padded():
  label = np.ones((3, 4), np.int32)
  img, lab = patches.sample_patch(label[..., None].astype(np.float32), label, (6, 6),
                                  np.random.default_rng(0), foreground=True)
  assert img.shape == (6, 6, 1) and lab.sum() == 12


def _one_voxel_case(seed_source: np.random.Generator) -> dict:
  """One foreground voxel in a big volume: only forced patches (almost) ever contain it."""
  label = np.zeros((40, 40, 40), np.int32)
  label[37, 2, 20] = 2
  return {'image': label[..., None].astype(np.float32), 'label': label,
          'seed': int(seed_source.integers(2**63))}


def test_forced_foreground_positions_follow_nnunet():
  assert patches.forced_foreground(2, 1 / 3) == [False, True]
  assert patches.forced_foreground(6, 1 / 3) == [False] * 4 + [True] * 2
  assert patches.forced_foreground(4, 0.0) == [False] * 4
  assert patches.forced_foreground(3, 1.0) == [True] * 3
  with pytest.raises(ValueError, match='fg_fraction'):
    patches.forced_foreground(2, 1.5)


def test_foreground_fraction_holds_in_every_batch():
  rng = np.random.default_rng(0)
  batcher = patches.PatchBatch((8, 8, 8), fg_fraction=1 / 3)
  hits = np.array([[lab.max() == 2 for lab in batcher([_one_voxel_case(rng) for _ in range(6)])
                    ['label']] for _ in range(100)])
  assert hits[:, 4:].all()  # the forced third of every batch
  assert hits[:, :4].mean() < 0.02  # uniform crops: 8^3 / 33^3 chance of the voxel at most
  never = patches.PatchBatch((8, 8, 8), fg_fraction=0.0)
  assert sum(int(never([_one_voxel_case(rng)])['label'].max() == 2) for _ in range(200)) <= 2


def test_patch_batch_is_deterministic_from_seeds():
  rng = np.random.default_rng(3)
  cases = [_one_voxel_case(rng) for _ in range(3)]
  for case in cases:
    case['image'] = rng.normal(size=case['image'].shape).astype(np.float32)
  batcher = patches.PatchBatch((8, 8, 8))
  first, again = batcher(cases), batcher(cases)
  np.testing.assert_array_equal(first['image'], again['image'])
  cases[0]['seed'] += 1
  assert not np.array_equal(batcher(cases)['image'][0], first['image'][0])
  np.testing.assert_array_equal(batcher(cases)['image'][1:], first['image'][1:])


def test_foreground_classes_drawn_uniformly():
  label = np.zeros((30, 30), np.int32)
  label[:20, :20] = 1  # big class
  label[28, 28] = 2  # single voxel: still drawn half the time
  rng = np.random.default_rng(1)
  hits = [patches.sample_patch(label[..., None].astype(np.float32), label, (4, 4), rng,
                               foreground=True)[1].max() == 2 for _ in range(400)]
  assert 0.4 < np.mean(hits) < 0.6
  only1 = [patches.sample_patch(label[..., None].astype(np.float32), label, (4, 4), rng,
                                foreground=True, fg_classes=(1,))[1] for _ in range(50)]
  assert all((p == 1).any() and not (p == 2).any() for p in only1)


def test_patch_batch_output_and_validation():
  seed = int(patches.AttachSeed().random_map({'file': 'a.png'}, np.random.default_rng(0))['seed'])
  example = {'image': np.zeros((5, 6, 1)), 'label': np.zeros((5, 6), np.uint8), 'seed': seed}
  out = patches.PatchBatch((4, 4))([example, example])
  assert set(out) == {'image', 'label'} and out['image'].dtype == np.float32
  assert out['image'].shape == (2, 4, 4, 1) and out['label'].dtype == np.int32
  with pytest.raises(ValueError, match='fg_fraction'):
    patches.PatchBatch((4, 4), fg_fraction=2)
  with pytest.raises(ValueError, match='disagree'):
    patches.sample_patch(np.zeros((5, 6, 1)), np.zeros((5, 7)), (4, 4), np.random.default_rng(0),
                         foreground=False)


def test_pad_crop_source_fixed_shapes():
  source = [{'image': np.ones((3 + i, 5, 1), np.float32), 'label': np.ones((3 + i, 5), np.int32),
             'case_id': str(i)} for i in range(3)]
  view = patches.PadCropSource(source, (4, 6))
  assert len(view) == 3
  shapes = {(view[i]['image'].shape, view[i]['label'].shape) for i in range(3)}
  assert shapes == {((4, 6, 1), (4, 6))}
  assert [int(view[i]['label'].sum()) for i in range(3)] == [15, 20, 20]


def test_loader_forces_foreground_in_every_batch_and_resumes():
  from unet_ds.data import pipeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  source = [{k: v for k, v in _one_voxel_case(rng).items() if k != 'seed'} for _ in range(5)]
  make = lambda: iter(pipeline.make_train_loader(
      source, batch_size=2, seed=7, transforms=(patches.AttachSeed(),),
      batch_fn=patches.PatchBatch((8, 8, 8))))
  it = make()
  batches = [next(it) for _ in range(6)]
  assert all(b['label'][1].max() == 2 for b in batches)
  state = it.get_state()
  expected = next(it)['image']
  resumed = make()
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['image'], expected)
