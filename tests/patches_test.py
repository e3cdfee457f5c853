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


def test_spatial_augment_without_a_turn_is_the_plain_crop():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, (20, 17, 9))
  image = rng.standard_normal((20, 17, 9, 2)).astype(np.float32)
  none = patches.SpatialAugment(p_rotate=1.0, max_degrees=0.0, p_scale=0.0)
  for fg in (False, True):
    plain = patches.sample_patch(image, label, (8, 8, 8), np.random.default_rng(fg),
                                 foreground=fg)
    turned = patches.sample_patch(image, label, (8, 8, 8), np.random.default_rng(fg),
                                  foreground=fg, spatial=none)
    np.testing.assert_allclose(turned[0], plain[0], atol=1e-6)
    np.testing.assert_array_equal(turned[1], plain[1])


def test_a_quarter_turn_is_rot90_and_keeps_image_and_label_paired():
  rng = np.random.default_rng(1)
  label = rng.integers(0, 3, (12, 12, 5))
  image = np.stack([label, 2 * label], -1).astype(np.float32)
  quarter = np.array([[0., -1., 0.], [1., 0., 0.], [0., 0., 1.]])
  img, lab = patches._resample_patch(image, label, (2, 2, 0), (8, 8, 5), quarter)
  crop = label[2:10, 2:10, :]
  # out[i, j] = case at centre + (-(j - 3.5), i - 3.5): crop[7 - j, i], a clockwise rot90.
  np.testing.assert_array_equal(lab, np.rot90(crop, -1, (0, 1)))
  np.testing.assert_allclose(img[..., 0], lab, atol=1e-5)  # grid points: no blending
  np.testing.assert_allclose(img[..., 1], 2 * lab, atol=1e-5)


def test_in_plane_turns_and_scalings_never_mix_thick_slices():
  depth = np.broadcast_to(np.arange(10, dtype=np.float32), (30, 30, 10))
  label = np.ones((30, 30, 10), np.int32)
  aug = patches.SpatialAugment(p_rotate=1.0, max_degrees=180.0, plane=(0, 1), p_scale=1.0,
                               scale=(0.7, 1.4), scale_axes=(0, 1))
  rng = np.random.default_rng(2)
  for _ in range(5):
    img, lab = patches.sample_patch(depth[..., None], label, (16, 16, 6), rng, foreground=False,
                                    spatial=aug)
    inside = lab == 1  # outside the case is 0
    z = np.broadcast_to(np.arange(6), lab.shape)
    offsets = (img[..., 0] - z)[inside]
    assert inside.mean() > 0.3 and np.allclose(offsets, offsets[0], atol=1e-4)  # one z offset


def test_zooming_out_shrinks_an_object():
  label = np.zeros((64, 64), np.int32)
  label[24:40, 24:40] = 1  # a 16 x 16 square at the centre
  image = label[..., None].astype(np.float32)
  matrix = np.eye(2) * 2.0  # each patch step covers two voxels of the case
  _, lab = patches._resample_patch(image, label, (16, 16), (32, 32), matrix)
  assert lab.sum() == 64  # 16 x 16 voxels seen at half size: 8 x 8


def test_spatial_augment_from_config_and_its_errors():
  from unet_ds import config_lib
  from unet_ds.data import datasets
  c = config_lib.real_data_config(3, 'msd')
  assert datasets.spatial_augment(c.data) is None  # off by default: old runs draw as before
  c.data.aug_rotate_p, c.data.aug_plane, c.data.aug_scale_axes = 0.2, (0, 1), (0, 1)
  aug = datasets.spatial_augment(c.data)
  assert aug.p_rotate == 0.2 and aug.p_scale == 0 and aug.scale_axes == (0, 1)
  c.data.patch_size = (16, 16, 16)
  assert datasets.train_batch_fn(c.data).spatial == aug  # what training cuts patches with
  c.data.aug_plane = (0, 3)
  with pytest.raises(ValueError, match=r'data.aug_plane=\(0, 3\)'):
    datasets.spatial_augment(c.data)
  c.data.aug_plane, c.data.aug_scale = (0, 1), (1.4, 0.7)
  with pytest.raises(ValueError, match='scale'):
    datasets.spatial_augment(c.data)


def test_turning_in_every_plane_is_a_3d_rotation_about_all_axes():
  every = patches.SpatialAugment(p_rotate=1.0, max_degrees=30.0, plane=(), p_scale=0.0)
  one = patches.SpatialAugment(p_rotate=1.0, max_degrees=30.0, plane=(0, 1), p_scale=0.0)
  rng = np.random.default_rng(3)
  for _ in range(20):
    m = every.draw(3, rng)
    np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)  # a rotation ...
    assert np.linalg.det(m) == pytest.approx(1.0)
    assert np.all(np.abs(m[~np.eye(3, dtype=bool)]) > 0)  # ... that moves every axis
    angle = np.degrees(np.arccos(np.clip((np.trace(m) - 1) / 2, -1, 1)))
    assert angle <= 3 * 30.0 + 1e-9
  m = one.draw(3, rng)
  assert m[2, 2] == 1.0 and not m[2, :2].any() and not m[:2, 2].any()  # z untouched
  # one plane draws exactly the numbers it drew before `()` existed: flags, then one angle
  again = np.random.default_rng(5)
  again.random(), again.random()
  angle = np.deg2rad(again.uniform(-30.0, 30.0))
  np.testing.assert_allclose(one.draw(3, np.random.default_rng(5))[:2, :2],
                             [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  flat = every.draw(2, np.random.default_rng(6))  # 2D: its one plane
  np.testing.assert_allclose(flat @ flat.T, np.eye(2), atol=1e-12)


def test_every_plane_from_config():
  from unet_ds import config_lib
  from unet_ds.data import datasets
  c = config_lib.real_data_config(3, 'msd')
  c.data.aug_rotate_p, c.data.aug_plane = 0.2, ()
  assert datasets.spatial_augment(c.data).plane == ()
  c.data.aug_plane = (1,)
  with pytest.raises(ValueError, match=r'data.aug_plane=\(1,\).*or \(\) to turn in every plane'):
    datasets.spatial_augment(c.data)
