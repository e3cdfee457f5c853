"""The seed-system presets (tgs_salt, brats18, dsn3d) train end to end on synthetic data and on
small folders (2D PNG, 4-channel 4D NIfTI); their settings match the systems; binary and
disagreeing settings are checked at config time."""

import nibabel
import numpy as np
from PIL import Image
import pytest

from configs import brats18
from configs import dsn3d
from configs import tgs_salt
from configs import unet2d
from unet_ds import config_lib
from unet_ds import evaluate
from unet_ds import metrics
from unet_ds import predict
from unet_ds import train

PRESETS = {'tgs_salt': tgs_salt, 'brats18': brats18, 'dsn3d': dsn3d}


def _train(c, workdir, data_dir):
  c.data.data_dir = data_dir
  c.mesh.data = 1
  return train.train_and_evaluate(c, str(workdir))


@pytest.mark.parametrize('name, classes, heads', [
    ('tgs_salt', 2, 1),   # one sigmoid channel scored as background / foreground
    ('brats18', 4, 1),    # smoke: depth 3 -> one additive head
    ('dsn3d', 3, 1),
])
def test_preset_smoke_trains_end_to_end(tmp_path, data_dir, name, classes, heads):
  summary = _train(PRESETS[name].get_config('smoke'), tmp_path, data_dir)
  assert summary['step'] == 4
  assert len(summary['final']['dice']) == classes
  assert len(summary['heads']) == heads
  assert 0.0 <= summary['mean_foreground_dice'] <= 1.0
  ev = evaluate.run(None, str(tmp_path))  # --mode=eval gives the number training ended with
  assert ev['mean_foreground_dice'] == pytest.approx(summary['mean_foreground_dice'])


def test_tgs_salt_is_the_keras_model():
  c = tgs_salt.get_config()
  m = config_lib.validate(c)
  assert (c.data.ndim, c.data.num_classes, m.num_classes) == (2, 2, 1)
  assert (m.depth, m.base_filters, [m.filters(l) for l in range(5)]) == (
      5, 16, [16, 32, 64, 128, 256])
  assert (m.block, m.convs_per_block, m.norm, m.activation, m.down) == (
      'preact_residual', 2, 'batch', 'relu', 'maxpool')
  assert [m.level_rate('down_dropout', i) for i in range(4)] == [0.25, 0.5, 0.5, 0.5]
  assert [m.level_rate('up_dropout', i) for i in range(4)] == [0.5] * 4
  assert (m.up, m.up_kernel) == ('transpose', 3)
  assert (m.ds_mode, m.ds_fusion, m.ds_fusion_dropout) == ('hypercolumn', 'conv_act', 0.5)
  assert c.loss.name == 'bce_dice' and not config_lib.side_losses(c)
  assert c.optim.name == 'adamw' and c.optim.weight_decay == 0.0  # Adam


def test_tgs_salt_dropout_ratio_scales_the_pattern():
  m = config_lib.validate(tgs_salt.get_config('dropout_ratio=0.2'))
  assert (m.down_dropout, m.up_dropout, m.ds_fusion_dropout) == ((0.1, 0.2), (0.2,), 0.2)


def test_tgs_salt_isbi_arg_and_real_data_defaults():
  c = tgs_salt.get_config('path=/data/isbi/train,isbi')
  assert (c.data.name, c.data.path, c.data.label_map) == ('folder2d', '/data/isbi/train',
                                                         '0:1,255:0')
  assert c.data.val_cases == '25,26,27,28,29' and tuple(c.data.patch_size) == (128, 128)
  assert tuple(c.data.eval_shape) == (512, 512)  # whole held-out slices
  assert c.model.num_classes == 1 and c.data.num_classes == 2


def test_brats18_flags_map_to_the_model():
  c = brats18.get_config()
  m = config_lib.validate(c)
  assert (c.data.in_channels, c.data.num_classes, m.depth, m.base_filters) == (4, 4, 5, 16)
  assert (m.filter_growth, m.residual, m.norm, m.ds_mode, m.down) == (
      2, True, 'instance', 'additive', 'conv')
  assert c.loss.name == 'generalized_dice' and c.loss.include_background
  assert c.eval.regions == 'whole_tumour=1,2,3;tumour_core=1,3;enhancing_tumour=3'
  c = brats18.get_config('depth=4,base_filter=8,filter_grow=false,residual=false,'
                         'instance_norm=false,deep_supervision=false,num_class=3')
  m = config_lib.validate(c)
  assert (m.depth, m.base_filters, m.filter_growth, m.residual, m.norm, m.ds_mode) == (
      4, 8, 1, False, 'batch', 'none')
  assert c.data.num_classes == 3 and c.eval.regions == ''
  c = brats18.get_config('path=/data/Task01_BrainTumour')
  assert (c.data.name, c.data.in_channels, c.eval.regions) == (
      'msd', 4, 'whole_tumour=1,2,3;tumour_core=2,3;enhancing_tumour=3')
  c = brats18.get_config('path=/data/brats,brats_labels')
  assert c.data.label_map == '0:0,1:1,2:2,4:3' and 'tumour_core=1,3' in c.eval.regions
  with pytest.raises(ValueError, match='expected true/false'):
    brats18.get_config('residual=maybe')


def test_dsn3d_weights_one_per_output_with_a_decay():
  c = dsn3d.get_config()
  assert c.loss.ds_weights == '1,0.5,0.25' and c.model.ds.mode == 'deep'
  assert (c.loss.ds_schedule, c.loss.ds_floor) == ('linear', 0.1)
  config_lib.validate(c)
  assert dsn3d.get_config('smoke').loss.ds_weights == '1,0.5'  # depth 3: final + one head
  assert dsn3d.get_config('weights=1+0.3+0.1').loss.ds_weights == '1,0.3,0.1'
  c = dsn3d.get_config('weights=1+0.3')
  with pytest.raises(ValueError, match='give 3 weights'):
    config_lib.validate(c)


def test_patch_arg_sets_every_size():
  c = dsn3d.get_config('path=/data/hip,patch=24x32x24')
  assert tuple(c.data.patch_size) == tuple(c.data.eval_shape) == tuple(c.data.shape) == (
      24, 32, 24)
  c = tgs_salt.get_config('path=/data/isbi,isbi,patch=128x128')  # whole-slice eval stays
  assert tuple(c.data.patch_size) == (128, 128) and tuple(c.data.eval_shape) == (512, 512)
  with pytest.raises(ValueError, match='3 sizes like|2 sizes for ndim=3'):
    dsn3d.get_config('patch=24x32')


def _png_folder(root, num=4, size=32):
  """ISBI-style 2D folder: uint8 images, {0, 255} masks with 0 = membrane (foreground)."""
  (root / 'image').mkdir(parents=True)
  (root / 'label').mkdir()
  rng = np.random.default_rng(0)
  for i in range(num):
    mask = np.where(rng.random((size, size)) < 0.3, 0, 255).astype(np.uint8)
    image = (mask * 0.5 + rng.integers(0, 60, mask.shape)).astype(np.uint8)
    Image.fromarray(image).save(root / 'image' / f'{i}.png')
    Image.fromarray(mask).save(root / 'label' / f'{i}.png')


def test_tgs_salt_binary_on_a_png_folder(tmp_path):
  _png_folder(tmp_path / 'em')
  c = tgs_salt.get_config(f'path={tmp_path / "em"},smoke')
  c.data.label_map, c.data.val_cases = '0:1,255:0', '3'
  summary = _train(c, tmp_path / 'run', str(tmp_path / 'tfds'))
  assert summary['step'] == 4 and len(summary['final']['dice']) == 2
  # --mode=eval: the held-out slice, binary Dice, IoU and the TGS score; --mode=predict: PNGs in
  # the folder's own values (0 / 255), probabilities on request.
  ev = evaluate.run(None, str(tmp_path / 'run'), output=str(tmp_path / 'ev'))
  assert ev['num_cases'] == 1 and len(ev['per_class']['dice']) == 2
  assert ev['mean_foreground_dice'] == pytest.approx(summary['mean_foreground_dice'])
  assert 0.0 <= ev['mean_tgs_score'] <= 1.0
  out = predict.run(None, str(tmp_path / 'run'), input_path=str(tmp_path / 'em' / 'image'),
                    output=str(tmp_path / 'pred'), probabilities=True)
  first = np.array(Image.open(out['written'][0]))
  assert set(np.unique(first)) <= {0, 255}
  assert np.load(tmp_path / 'pred' / '0_probs.npy').shape == first.shape + (2,)


def test_brats18_on_4d_nifti_with_4_modalities(tmp_path):
  root = tmp_path / 'Task01'
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    label = rng.integers(0, 4, (18, 16, 17)).astype(np.uint8)
    image = (label[..., None] * np.array([1.0, 2.0, -1.0, 0.5]) + rng.normal(size=label.shape + (4,))
             ) * (i + 1) * 100  # [X, Y, Z, 4], scaled per case: normalisation undoes it
    nibabel.save(nibabel.Nifti1Image(image.astype(np.float32), np.eye(4)),
                 root / 'imagesTr' / f'c{i}.nii.gz')
    nibabel.save(nibabel.Nifti1Image(label, np.eye(4)), root / 'labelsTr' / f'c{i}.nii.gz')
  c = brats18.get_config(f'path={root},smoke')
  c.data.val_cases = 'c2'
  summary = _train(c, tmp_path / 'run', str(tmp_path / 'tfds'))
  assert summary['step'] == 4 and len(summary['final']['dice']) == 4
  ev = evaluate.run(None, str(tmp_path / 'run'))  # the held-out case, classes and regions
  assert ev['num_cases'] == 1 and len(ev['per_class']['dice']) == 4
  assert ev['mean_foreground_dice'] == pytest.approx(summary['mean_foreground_dice'])
  if c.eval.regions:
    assert set(ev['region_dice']) == {n for n, _ in metrics.parse_regions(c.eval.regions)}
  out = predict.run(None, str(tmp_path / 'run'), input_path=str(root / 'imagesTr' / 'c0.nii.gz'),
                    output=str(tmp_path / 'pred'))
  written = nibabel.load(out['written'][0])
  assert written.shape == (18, 16, 17) and written.get_data_dtype() == np.uint8


def test_binary_output_on_multiclass_synthetic_trains_and_keeps_the_data():
  # The README's repro: one sigmoid channel on the 3-class synthetic images (foreground = union).
  c = unet2d.get_config('smoke,ds=hypercolumn')
  c.loss.name = 'bce_dice'
  c.model.num_classes = 1
  assert c.data.num_classes == 3  # setting the output channels leaves the label values alone
  assert config_lib.validate(c).num_classes == 1
  c.data.num_classes = 2          # data.num_classes no longer rewrites a set model.num_classes
  assert c.model.num_classes == 1


def test_binary_repro_trains(tmp_path, data_dir):
  c = unet2d.get_config('smoke,ds=hypercolumn')
  c.loss.name = 'bce_dice'
  c.model.num_classes = 1
  c.train.steps = c.train.eval_every = c.train.checkpoint_every = 1
  summary = _train(c, tmp_path, data_dir)
  assert summary['step'] == 1 and len(summary['final']['dice']) == 2


@pytest.mark.parametrize('overrides, match', [
    (dict(loss='bce_dice'), r'set --config.model.num_classes=1'),
    (dict(loss='bce'), r'set --config.model.num_classes=1'),
    (dict(channels=1), r'set --config.loss.name=bce_dice'),
    (dict(channels=2), r'set --config.model.num_classes=3'),
    (dict(channels=1, loss='bce_dice', regions='a=1'), r'regions need a softmax'),
    (dict(regions='a=1,7'), r'foreground classes 1..2'),
])
def test_disagreeing_settings_say_what_to_set(overrides, match):
  c = unet2d.get_config('smoke')
  c.loss.name = overrides.get('loss', c.loss.name)
  c.model.num_classes = overrides.get('channels', 3)
  if 'regions' in overrides:
    c.eval = {'regions': overrides['regions']}
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)
