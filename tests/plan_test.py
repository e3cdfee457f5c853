"""Tests for unet_ds.plan and configs/auto.py on small NIfTI / PNG folders written here:
anisotropic (1 x 1 x 4 mm), CT-like (HU, -1024 air), multi-channel 4D; planned values against hand
computation."""
import importlib.util
import json
import os
import subprocess
import sys

import nibabel
import numpy as np
from PIL import Image
import pytest

from unet_ds import config_lib
from unet_ds import models
from unet_ds import plan as plan_lib
from unet_ds import predict
from unet_ds.data import datasets
from unet_ds.data import io
from unet_ds.data import msd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(root, name, image, label, spacing):
  affine = np.diag([*spacing, 1.0])
  nibabel.save(nibabel.Nifti1Image(image, affine), root / 'imagesTr' / f'{name}.nii.gz')
  nibabel.save(nibabel.Nifti1Image(label, affine), root / 'labelsTr' / f'{name}.nii.gz')


def _folder(root, modality=None):
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  if modality:
    meta = {'modality': {str(i): m for i, m in enumerate(modality)},
            'labels': {'0': 'background', '1': 'organ'}}
    (root / 'dataset.json').write_text(json.dumps(meta))


def _anisotropic_set(root):
  """Five MRI-like cases at 1 x 1 x z mm, z in 3.5..5 (median 4), 24 x 28 x 6 voxels."""
  _folder(root)
  rng = np.random.default_rng(0)
  for i, z in enumerate((4.0, 4.0, 5.0, 3.5, 4.5)):
    image = rng.normal(300, 50, (24, 28, 6)).astype(np.float32)
    label = np.zeros((24, 28, 6), np.uint8)
    label[8:16, 10:20, 2:4] = 1
    _write(root, f'mr_{i}', image, label, (1.0, 1.0, z))


def _ct_set(root, channels=1):
  """HU volumes: air -1024, soft tissue ~40 HU in the organ (label 1), a few bone voxels."""
  _folder(root, ['CT', 'MRI'][:channels])
  rng = np.random.default_rng(1)
  cases = {}
  for i in range(3):
    ct = np.full((12, 10, 8), -1024.0, np.float32)
    organ = np.zeros((12, 10, 8), bool)
    organ[3:9, 2:8, 2:6] = True
    ct[organ] = rng.normal(40, 10, organ.sum())
    ct[0, 0, :] = 1500.0  # bone outside the organ
    image = ct if channels == 1 else np.stack([ct, rng.normal(5, 2, ct.shape)], -1)
    label = organ.astype(np.uint8)
    _write(root, f'ct_{i}', image.astype(np.float32), label, (0.7, 0.7, 1.5))
    cases[f'ct_{i}'] = (image, organ)
  return cases


def test_target_spacing_median_and_anisotropic_rule():
  shapes = np.array([[100, 100, 20]] * 5)
  iso = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 2.0], [1.0, 1.0, 1.5], [1.0, 1.0, 1.2],
                  [1.0, 1.0, 2.5]])
  assert plan_lib.target_spacing(iso, shapes) == ([1.0, 1.0, 1.5], None)
  aniso = np.array([[0.8, 0.8, 5.0], [0.8, 0.8, 4.0], [0.8, 0.8, 6.0], [0.8, 0.8, 3.0],
                    [0.8, 0.8, 5.0]])
  target, axis = plan_lib.target_spacing(aniso, shapes)
  # 10th percentile of [3, 4, 5, 5, 6]: 3 + 0.4 * (4 - 3) = 3.4
  assert axis == 2 and target == pytest.approx([0.8, 0.8, 3.4])


def test_pooling_waits_for_the_coarse_axis():
  strides = plan_lib.pooling([64, 64, 16], [1.0, 1.0, 4.0])
  assert strides == [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]
  assert plan_lib.multiples(strides, 3) == [16, 16, 4]
  assert plan_lib.pooling([40, 56, 40], [1.0, 1.0, 1.0]) == [[2, 2, 2]] * 3  # 5 < 2 * 4 stops


def test_conv_kernels_are_thin_until_the_coarse_axis_catches_up():
  # 1 x 1 x 3: z is 3x the finest at level 0 (kernel 1), 1.5x after one in-plane pool (3).
  assert plan_lib.conv_kernels([1.0, 1.0, 3.0], [[2, 2, 1], [2, 2, 2], [2, 2, 1]]) == [
      [3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
  # 0.8 x 0.8 x 5: z 6.25x, then 3.1x (still 1), then 1.6x: 3 from level 2 on.
  assert plan_lib.conv_kernels([0.8, 0.8, 5.0], [[2, 2, 1], [2, 2, 1], [2, 2, 2]]) == [
      [3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
  # exactly 2x is coarse (nnU-Net's `< 2`), isotropic is 3 everywhere, the bottleneck always 3
  assert plan_lib.conv_kernels([1.0, 2.0], [[2, 1]]) == [[3, 1], [3, 3]]
  assert plan_lib.conv_kernels([1.0] * 3, [[2, 2, 2]] * 3) == [[3, 3, 3]] * 4


def test_augmentation_is_in_plane_for_thin_patches_of_thick_slices():
  # 1 x 1 x 3 copy of hippocampus: patch 40 x 56 x 14, 56 / 14 > 3 -> 2D-style, in-plane
  thin = plan_lib.augmentation([1.0, 1.0, 3.0], [40, 56, 14])
  assert thin['plane'] == thin['scale_axes'] == [0, 1]
  assert thin['degrees'] == 30.0  # not nnU-Net's 180, which scored lower (docs/results.md)
  # coarse axis first (5 mm slices): the plane is the other two
  assert plan_lib.augmentation([5.0, 0.8, 0.8], [8, 96, 96])['plane'] == [1, 2]
  # isotropic, or anisotropic with a patch not thin along z (3x at most): 3D, every axis scaled
  for spacing, patch in (([1.0] * 3, [40, 56, 40]), ([1.0, 1.0, 2.0], [64, 64, 32])):
    iso = plan_lib.augmentation(spacing, patch)
    assert iso['plane'] == [0, 1] and iso['degrees'] == 30.0 and iso['scale_axes'] == []
  flat = plan_lib.augmentation([1.0, 1.0], [256, 256])
  assert flat['degrees'] == 180.0 and (flat['p_rotate'], flat['p_scale']) == (0.2, 0.2)


def test_patch_size_fits_the_budget():
  # Task04 hippocampus: median 36 x 51 x 36.5 at 1 mm -> nnU-Net's (40, 56, 40), 3 pools.
  patch, strides = plan_lib.patch_and_pooling([36, 51, 36.5], [1.0, 1.0, 1.0], 100_000)
  assert patch == [40, 56, 40] and len(strides) == 3
  patch, strides = plan_lib.patch_and_pooling([512, 512], [1.0, 1.0], 256 * 256)
  assert patch == [256, 256] and len(strides) == 5
  patch, _ = plan_lib.patch_and_pooling([200, 200, 200], [1.0, 1.0, 1.0], 30_000)
  assert np.prod(patch) <= 30_000 and max(patch) - min(patch) <= 8


def test_batch_size_rules():
  strides = [[2, 2, 2]] * 3
  kw = dict(budget=100_000, memory_mb=2048, dataset_voxels=1e9)
  assert plan_lib.batch_size([40, 56, 40], strides, 8, **kw) == 2  # 200000 // 89600
  assert plan_lib.batch_size([16, 16, 16], strides, 8, **kw) == 48  # 200000 // 4096
  assert plan_lib.batch_size([16, 16, 16], strides, 8, **{**kw, 'dataset_voxels': 4096 * 100}) == 5
  tight = plan_lib.activation_bytes([16, 16, 16], strides, 8) * 3 / 2**20
  assert plan_lib.batch_size([16, 16, 16], strides, 8, **{**kw, 'memory_mb': tight}) == 3


def test_anisotropic_plan_and_prepared_data(tmp_path):
  root = tmp_path / 'Aniso'
  _anisotropic_set(root)
  plan = plan_lib.plan_for(str(root), str(tmp_path / 'tfds'))
  # median z 4 > 3 x 1 and 6 slices * 3 < 24: z takes the 10th percentile of [3.5, 4, 4, 4.5, 5]
  assert plan['target_spacing'] == pytest.approx([1.0, 1.0, 3.7])
  assert plan['anisotropic_axis'] == 2 and plan['resampling']['needed']
  assert plan['normalization'] == ['zscore'] and plan['ct_stats'] == []
  assert plan['num_classes'] == 2 and plan['in_channels'] == 1
  assert plan['strides'][0] == [2, 2, 1]  # in-plane first: z spacing is 3.7x the finest
  assert plan['kernel_sizes'][0] == [3, 3, 1] and len(plan['kernel_sizes']) == plan['depth']
  mult = plan_lib.multiples(plan['strides'], 3)
  assert all(p % m == 0 for p, m in zip(plan['patch_size'], mult))
  assert os.path.exists(os.path.join(plan['plan_dir'], 'plan.json'))
  sources = msd.load({'path': str(root), 'num_classes': 2, 'data_dir': str(tmp_path / 'tfds'),
                      'val_fraction': 0.0, 'target_spacing': plan['target_spacing']})
  shapes = {tuple(ex['shape']) for ex in (sources['train'][i] for i in range(5))}
  # z: round(6 * z / 3.7) for z in (4, 4, 5, 3.5, 4.5)
  assert shapes == {(24, 28, round(6 * z / 3.7)) for z in (4.0, 5.0, 3.5, 4.5)}


def test_ct_plan_uses_dataset_foreground_statistics(tmp_path):
  root = tmp_path / 'CT'
  cases = _ct_set(root)
  plan = plan_lib.plan_for(str(root), str(tmp_path / 'tfds'))
  fg = np.concatenate([img[organ] for img, organ in cases.values()]).astype(np.float64)
  low, high = np.percentile(fg, [0.5, 99.5])
  assert plan['normalization'] == ['ct']
  np.testing.assert_allclose(plan['ct_stats'][0], [low, high, fg.mean(), fg.std()], rtol=1e-5)
  # All at 0.7 x 0.7 x 1.5: nothing to resample in training, but the target is kept for inputs
  # of other spacings.
  assert plan['target_spacing'] == pytest.approx([0.7, 0.7, 1.5])
  assert not plan['resampling']['needed'] and plan['anisotropic_axis'] is None
  c = _auto_config(f'path={root},data_dir={tmp_path / "tfds"}')
  assert c.data.normalization == 'ct' and c.plan.normalization == ('ct',)
  sources = msd.load(c.data)
  ex = next(sources[s][i] for s in sources for i in range(len(sources[s])))
  image, organ = cases[ex['case_id']]
  expected = (np.clip(image, low, high) - fg.mean()) / fg.std()
  np.testing.assert_allclose(ex['image'][..., 0], expected, rtol=1e-4, atol=1e-4)
  # A new input at twice the spacing is brought to the training grid, then back.
  coarse = tmp_path / 'coarse.nii.gz'
  nibabel.save(nibabel.Nifti1Image(np.zeros((6, 5, 4), np.float32),
                                   np.diag([1.4, 1.4, 3.0, 1.0])), coarse)
  predictor = predict.Predictor(lambda x: x, c.data, predict.settings_from_config(c))
  read = predictor.read(str(coarse))
  assert read['image'].shape[:3] == (12, 10, 8) and read['geometry'].original_shape == (6, 5, 4)
  assert ex['image'][-1, -1, -1, 0] == pytest.approx((low - fg.mean()) / fg.std(), rel=1e-4)  # air
  assert ex['image'][0, 0, 0, 0] == pytest.approx((high - fg.mean()) / fg.std(), rel=1e-4)  # bone


def test_multichannel_ct_and_mri_channels(tmp_path):
  root = tmp_path / 'Multi'
  cases = _ct_set(root, channels=2)
  plan = plan_lib.plan_for(str(root), str(tmp_path / 'tfds'))
  assert plan['in_channels'] == 2 and plan['normalization'] == ['ct', 'zscore']
  assert len(plan['ct_stats']) == 2
  c = _auto_config(f'path={root},data_dir={tmp_path / "tfds"}')
  assert c.data.normalization == 'ct,zscore' and c.data.in_channels == 2
  sources = msd.load({**c.data.to_dict(), 'val_fraction': 0.0})
  ex = sources['train'][0]
  image, _ = cases[ex['case_id']]
  low, high, mean, std = plan['ct_stats'][0]
  np.testing.assert_allclose(ex['image'][..., 0], (np.clip(image[..., 0], low, high) - mean) / std,
                             rtol=1e-4, atol=1e-4)
  assert abs(ex['image'][..., 1].mean()) < 1e-4 and abs(ex['image'][..., 1].std() - 1) < 1e-3


def test_fingerprint_is_cached_and_keyed_by_the_files(tmp_path, monkeypatch):
  root = tmp_path / 'Aniso'
  _anisotropic_set(root)
  data_dir = str(tmp_path / 'tfds')
  first = plan_lib.plan_for(str(root), data_dir)
  def recompute(*args, **kwargs):
    raise RuntimeError('fingerprint recomputed')
  monkeypatch.setattr(plan_lib, 'compute_fingerprint', recompute)
  assert plan_lib.plan_for(str(root), data_dir) == first
  image = nibabel.load(root / 'imagesTr' / 'mr_0.nii.gz')
  nibabel.save(nibabel.Nifti1Image(np.asarray(image.dataobj)[:20], image.affine),
               root / 'imagesTr' / 'mr_0.nii.gz')
  with pytest.raises(RuntimeError, match='fingerprint recomputed'):
    plan_lib.plan_for(str(root), data_dir)


def test_2d_folder_plan_derives_a_label_map(tmp_path):
  root = tmp_path / 'em'
  (root / 'image').mkdir(parents=True)
  (root / 'label').mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    image = rng.integers(0, 255, (64, 48), dtype=np.uint8)
    Image.fromarray(image).save(root / 'image' / f'{i}.png')
    mask = np.full((64, 48), 255, np.uint8)
    mask[::8] = 0
    Image.fromarray(mask).save(root / 'label' / f'{i}.png')
  plan = plan_lib.plan_for(str(root), str(tmp_path / 'tfds'))
  assert plan['kind'] == 'folder2d' and plan['ndim'] == 2
  assert plan['num_classes'] == 2 and plan['label_map'] == [[0, 0], [255, 1]]
  assert plan['patch_size'] == [64, 48] and plan['target_spacing'] == []
  c = _auto_config(f'path={root},data_dir={tmp_path / "tfds"},label_map=0:1;255:0,smoke')
  config_lib.validate(c)
  assert c.data.name == 'folder2d' and c.data.label_map == '0:1,255:0'
  assert c.plan.label_map == ((0, 1), (255, 0))


def test_a_label_value_of_one_2d_mask_is_warned_about(tmp_path, caplog):
  root = tmp_path / 'em'
  (root / 'image').mkdir(parents=True)
  (root / 'label').mkdir()
  for i in range(3):
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(root / 'image' / f'{i}.png')
    mask = np.full((16, 16), 255, np.uint8)
    mask[::4] = 0
    Image.fromarray(mask).save(root / 'label' / f'{i}.png')
  plan_lib.plan_for(str(root), str(tmp_path / 'tfds'))
  assert 'label value' not in caplog.text
  mask[1, :5] = 128  # anti-aliased edge pixels in one mask
  Image.fromarray(mask).save(root / 'label' / '2.png')
  plan = plan_lib.plan_for(str(root), str(tmp_path / 'tfds'))
  assert plan['label_map'] == [[0, 0], [128, 1], [255, 2]]
  assert 'label value 128 is only in case 2 (5 voxels of it) of 3, and becomes class 1 of 3' in (
      caplog.text)


def test_auto_plans_a_2d_folder_with_other_subfolder_names(tmp_path):
  root = tmp_path / 'salt'
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  for i in range(2):
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(root / 'images' / f'{i}.png')
    Image.fromarray(np.eye(16, dtype=np.uint8) * 255).save(root / 'masks' / f'{i}.png')
  with pytest.raises(io.DataError, match=r"nor a 2D folder \(image/ \+ label/\); it holds "
                     r"\['images', 'masks'\] \(set image_dir and label_dir"):
    _auto_config(f'path={root},data_dir={tmp_path / "tfds"}')
  c = _auto_config(f'path={root},data_dir={tmp_path / "tfds"},image_dir=images,label_dir=masks')
  config_lib.validate(c)
  assert (c.data.name, c.data.image_dir, c.data.label_dir) == ('folder2d', 'images', 'masks')
  assert c.plan.label_map == ((0, 0), (255, 1))


def _auto_config(arg):
  spec = importlib.util.spec_from_file_location('auto', os.path.join(ROOT, 'configs', 'auto.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_auto_config_records_the_plan(tmp_path):
  root = tmp_path / 'Aniso'
  _anisotropic_set(root)
  c = _auto_config(f'path={root},data_dir={tmp_path / "tfds"},fold=1,ds=none,seed=3')
  config_lib.validate(c)
  assert c.data.target_spacing == pytest.approx((1.0, 1.0, 3.7))
  assert (c.data.num_folds, c.data.fold, c.model.ds.mode, c.seed) == (5, 1, 'none', 3)
  assert c.model.depth == c.plan.depth and c.train.batch_size == c.plan.batch_size
  # in-plane first, then z: the model pools as planned and the patch is the planned one
  assert c.model.strides == tuple(tuple(s) for s in c.plan.strides)
  assert c.model.strides[0] == (2, 2, 1) and c.data.patch_size == c.plan.patch_size
  assert c.model.kernel_sizes == tuple(tuple(k) for k in c.plan.kernel_sizes)
  assert c.model.kernel_sizes[0] == (3, 3, 1)  # z is still 3.7x the finest at full resolution
  aug = c.plan.augmentation  # the planned spatial augmentation is what the data pipeline gets
  assert (c.data.aug_rotate_p, c.data.aug_scale_p) == (aug.p_rotate, aug.p_scale) == (0.2, 0.2)
  assert c.data.aug_plane == tuple(aug.plane) and c.data.aug_scale_axes == tuple(aug.scale_axes)
  assert datasets.spatial_augment(c.data).max_degrees == aug.degrees
  models.model_config(c.model)  # the model takes what the plan gives
  smoke = _auto_config(f'path={root},data_dir={tmp_path / "tfds"},smoke')
  config_lib.validate(smoke)
  assert smoke.model.strides == () and smoke.data.patch_size == (16, 16, 16)
  assert smoke.model.kernel_sizes == ()
  recorded = json.loads(config_lib.to_json(c))
  assert recorded['plan']['target_spacing'] == pytest.approx([1.0, 1.0, 3.7])
  assert recorded['plan']['anisotropic_axis'] == 2


def test_cli_prints_the_plan(tmp_path):
  root = tmp_path / 'CT'
  _ct_set(root)
  out = subprocess.run([sys.executable, '-m', 'unet_ds.plan', f'--input={root}',
                        f'--data_dir={tmp_path / "tfds"}'], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, check=True)
  plan = json.loads(out.stdout)
  assert plan['normalization'] == ['ct'] and plan['num_classes'] == 2
  bad = subprocess.run([sys.executable, '-m', 'unet_ds.plan', f'--input={tmp_path}'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert bad.returncode != 0 and 'neither an MSD task folder' in bad.stderr


def test_command_line_overrides_win_over_the_plan(tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'Aniso'
  _anisotropic_set(root)
  argv = ['prog', f'--config={ROOT}/configs/auto.py:path={root},data_dir={tmp_path / "tfds"}',
          '--config.train.batch_size=3', '--config.data.target_spacing=(1.0,1.0,2.0)']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, sys_argv=argv)
  values(argv)
  c = values.config
  assert c.train.batch_size == 3 and c.data.target_spacing == (1.0, 1.0, 2.0)
  assert c.plan.batch_size == 2 and c.plan.target_spacing == pytest.approx((1.0, 1.0, 3.7))
  recorded = json.loads(config_lib.to_json(c))
  assert recorded['train']['batch_size'] == 3 and recorded['plan']['batch_size'] == 2


def test_a_label_value_dataset_json_does_not_list_is_named_by_the_fingerprint(tmp_path):
  root = tmp_path / 'Stray'
  _folder(root, ['MRI'])  # dataset.json: 2 labels
  image = np.ones((8, 8, 4), np.float32)
  label = np.zeros((8, 8, 4), np.uint8)
  _write(root, 'a', image, label, (1.0, 1.0, 1.0))
  label[1, 1, 1] = 5
  _write(root, 'b', image, label, (1.0, 1.0, 1.0))
  with pytest.raises(io.DataError, match=r'labelsTr/b.nii.gz: label values \[5\] that '
                     r'dataset.json does not list \(it lists \[0, 1\]\)'):
    plan_lib.compute_fingerprint(str(root))


def test_dataset_json_labels_0_1_5_plan_a_label_map(tmp_path):
  root = tmp_path / 'Sparse'
  _folder(root)
  (root / 'dataset.json').write_text(json.dumps(
      {'modality': {'0': 'MRI'}, 'labels': {'0': 'bg', '1': 'organ', '5': 'tumour'}}))
  image = np.ones((8, 8, 4), np.float32)
  label = np.zeros((8, 8, 4), np.uint8)
  label[1:3, 1:3, 1], label[5:7, 5:7, 2] = 1, 5
  _write(root, 'a', image, label, (1.0, 1.0, 1.0))
  plan = plan_lib.plan_for(str(root), str(tmp_path / 'tfds'))
  assert plan['num_classes'] == 3 and plan['label_map'] == [[0, 0], [1, 1], [5, 2]]
  # Without the plan, training's preparation says how to map them.
  with pytest.raises(io.DataError, match=r'dataset.json: labels \[0, 1, 5\] are not the class '
                     r'ids 0..2: .* --config.data.label_map=0:0,1:1,5:2'):
    msd.find_cases(str(root), num_classes=3)
  assert msd.find_cases(str(root), num_classes=3, label_map={0: 0, 1: 1, 5: 2})


@pytest.mark.parametrize('meta,match', [
    ({'modality': 'CT'}, r'"modality" must map channel indices to names'),
    ({'modality': {'0': 'CT', '1': 'MRI'}}, r"lists 2 modalities \['CT', 'MRI'\], but .*a.nii.gz "
                                            r'has 1 channel'),
    ({'labels': {'0': 'bg', 'one': 'organ'}}, r'"labels" keys .* are not integers'),
])
def test_malformed_dataset_json_is_named_before_planning(tmp_path, meta, match):
  root = tmp_path / 'Bad'
  _folder(root)
  (root / 'dataset.json').write_text(json.dumps(meta))
  _write(root, 'a', np.ones((8, 8, 4), np.float32), np.zeros((8, 8, 4), np.uint8), (1, 1, 1))
  with pytest.raises(io.DataError, match=match):
    plan_lib.plan_for(str(root), str(tmp_path / 'tfds'))


def test_an_edited_dataset_json_is_planned_anew(tmp_path):
  root = tmp_path / 'Edited'
  _folder(root)
  (root / 'dataset.json').write_text(json.dumps({'labels': {'0': 'bg', '1': 'organ'}}))
  image = np.full((8, 8, 4), -1024.0, np.float32)
  label = np.zeros((8, 8, 4), np.uint8)
  label[2:6, 2:6, 1:3] = 1
  image[label > 0] = 40.0
  _write(root, 'a', image, label, (1.0, 1.0, 1.0))
  data_dir = str(tmp_path / 'tfds')
  assert plan_lib.plan_for(str(root), data_dir)['normalization'] == ['zscore']
  (root / 'dataset.json').write_text(json.dumps({'modality': {'0': 'CT'},
                                                 'labels': {'0': 'bg', '1': 'organ'}}))
  assert plan_lib.plan_for(str(root), data_dir)['normalization'] == ['ct']
