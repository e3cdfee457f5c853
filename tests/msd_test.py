"""Tests for unet_ds.data.msd: MSD NIfTI folders prepared as TFDS array_record, and their checks."""
import json
import os

import nibabel
import numpy as np
import pytest

from unet_ds.data import io
from unet_ds.data import msd


def _affine(i):
  affine = np.diag([1.0, 1.5, 2.0, 1.0])
  affine[:3, 3] = [i, -i, 2 * i]
  return affine


def _write_case(root, name, image, label, affine=None, label_affine=None):
  affine = _affine(0) if affine is None else affine
  nibabel.save(nibabel.Nifti1Image(image, affine), root / 'imagesTr' / f'{name}.nii.gz')
  if label is not None:
    nibabel.save(nibabel.Nifti1Image(label, affine if label_affine is None else label_affine),
                 root / 'labelsTr' / f'{name}.nii.gz')


def _make_task(root, num_cases=4, channels=None):
  """Cases of different sizes; uint8 and float32 images; one float32 label (as in real MSD)."""
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  rng = np.random.default_rng(0)
  cases = {}
  for i in range(num_cases):
    shape = (6 + i, 7, 5 + (i % 2))
    image = rng.normal(100, 20, shape + ((channels,) if channels else ()))
    image = image.astype(np.uint8) if i % 2 == 0 else (image * 50).astype(np.float32)
    label = rng.integers(0, 3, shape).astype(np.float32 if i == 1 else np.uint8)
    _write_case(root, f'case_{i:03d}', image, label, _affine(i))
    cases[f'case_{i:03d}'] = (image, label)
  return cases


def _cfg(root, tmp_path, **kw):
  return {'path': str(root), 'num_classes': 3, 'data_dir': str(tmp_path / 'tfds'),
          'val_fraction': 0.25, **kw}


def test_load_reads_mixed_dtypes_sizes_and_keeps_geometry(tmp_path):
  root = tmp_path / 'Task99'
  cases = _make_task(root)
  sources = msd.load(_cfg(root, tmp_path))
  assert (len(sources['train']), len(sources['validation'])) == (3, 1)
  seen = set()
  for source in sources.values():
    for j in range(len(source)):
      ex = source[j]
      image, label = cases[ex['case_id']]
      seen.add(ex['case_id'])
      assert ex['image'].dtype == np.float32 and ex['image'].shape == image.shape + (1,)
      assert ex['label'].dtype == np.int32
      np.testing.assert_array_equal(ex['label'], label.astype(np.int32))
      np.testing.assert_array_equal(ex['shape'], image.shape)
      np.testing.assert_allclose(ex['affine'], _affine(int(ex['case_id'][-3:])))
      assert ex['file'] == ex['case_id'] + '.nii.gz'
      # z-scored per volume, and still monotone in the raw intensities
      assert abs(ex['image'].mean()) < 1e-4 and abs(ex['image'].std() - 1) < 1e-3
      raw = image.astype(np.float32).ravel()
      assert np.corrcoef(raw, ex['image'].ravel())[0, 1] > 0.999
  assert seen == set(cases)


def test_multichannel_4d_images(tmp_path):
  root = tmp_path / 'Task01'
  _make_task(root, num_cases=3, channels=2)
  sources = msd.load(_cfg(root, tmp_path, in_channels=2, val_fraction=0.0))
  assert 'validation' not in sources
  ex = sources['train'][0]
  assert ex['image'].shape[-1] == 2 and ex['image'].shape[:3] == ex['label'].shape
  with pytest.raises(io.DataError, match=r'imagesTr/case_000.nii.gz: image has 2 channels, '
                                         r'expected 4'):
    msd.load(_cfg(root, tmp_path, in_channels=4))


def test_settings_change_the_prepared_copy(tmp_path):
  root = tmp_path / 'Task99'
  _make_task(root, num_cases=5)
  base = msd.make_config(msd.settings_from_config(_cfg(root, tmp_path)))
  same = msd.make_config(msd.settings_from_config(_cfg(root, tmp_path)))
  assert base.name == same.name and '_task99_' in base.name
  for change in [{'seed': 1}, {'fold': 1, 'num_folds': 5}, {'normalization': 'minmax'},
                 {'clip_percentiles': (1, 99)}, {'label_map': '0:0,1:1,2:2'}]:
    other = msd.make_config(msd.settings_from_config(_cfg(root, tmp_path, **change)))
    assert other.name != base.name, change
  os.utime(root / 'imagesTr' / 'case_000.nii.gz', ns=(1, 1))  # an edited file re-prepares
  assert msd.make_config(msd.settings_from_config(_cfg(root, tmp_path))).name != base.name


def test_a_copy_of_the_data_resumes_a_checkpointed_iterator(tmp_path):
  """Sources are named by content (settings + relative file names and sizes), not by location
  or mtimes: a run resumes on its data copied elsewhere; other settings are another source."""
  import shutil  # pylint: disable=g-import-not-at-top
  from unet_ds.data import pipeline  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'Task99'
  _make_task(root, num_cases=5)
  copy = tmp_path / 'scratch' / 'Task99'
  shutil.copytree(root, copy)  # new location and mtimes: prepared again, same content
  original = msd.load(_cfg(root, tmp_path))
  copied = msd.load(_cfg(copy, tmp_path))
  assert repr(original['train']) == repr(copied['train'])
  assert repr(original['train']) != repr(msd.load(_cfg(root, tmp_path, seed=1))['train'])
  make = lambda sources: iter(pipeline.make_train_loader(sources['train'], batch_size=1, seed=0))
  it = make(original)
  next(it)
  state = it.get_state()
  resumed = make(copied)
  resumed.set_state(state)  # grain checks repr(source)
  np.testing.assert_array_equal(next(resumed)['image'], next(it)['image'])


def test_kfold_validation_sets_cover_all_cases(tmp_path):
  root = tmp_path / 'Task99'
  _make_task(root, num_cases=4)
  held = []
  for fold in range(2):
    sources = msd.load(_cfg(root, tmp_path, num_folds=2, fold=fold))
    held += [sources['validation'][j]['case_id'] for j in range(len(sources['validation']))]
    assert len(sources['train']) + len(sources['validation']) == 4
  assert sorted(held) == [f'case_{i:03d}' for i in range(4)]


def _break(root, kind):
  """Spoils one case of a good task folder; returns the file name the error must name."""
  if kind == 'corrupt':
    (root / 'imagesTr' / 'case_002.nii.gz').write_bytes(b'\x1f\x8bnot a nifti')
    return 'imagesTr/case_002.nii.gz'
  if kind == 'shape':
    _write_case(root, 'case_002', np.zeros((6, 7, 5), np.float32) + np.arange(5),
                np.zeros((6, 7, 4), np.uint8))
    return 'labelsTr/case_002.nii.gz'
  if kind == 'affine':
    _write_case(root, 'case_002', np.zeros((6, 7, 5), np.float32), np.zeros((6, 7, 5), np.uint8),
                affine=_affine(0), label_affine=_affine(3))
    return 'labelsTr/case_002.nii.gz'
  if kind == 'label_values':
    _write_case(root, 'case_002', np.ones((6, 7, 5), np.float32), np.full((6, 7, 5), 4, np.uint8))
    return 'labelsTr/case_002.nii.gz'
  if kind == 'nan':
    image = np.ones((6, 7, 5), np.float32)
    image[1, 1, 1] = np.nan
    _write_case(root, 'case_002', image, np.zeros((6, 7, 5), np.uint8))
    return 'imagesTr/case_002.nii.gz'
  if kind == 'missing_label':
    os.remove(root / 'labelsTr' / 'case_002.nii.gz')
    return 'imagesTr/case_002.nii.gz: missing label'
  if kind == 'orphan_label':
    os.remove(root / 'imagesTr' / 'case_002.nii.gz')
    return 'labelsTr/case_002.nii.gz: label without an image'
  if kind == 'empty':
    for f in os.listdir(root / 'imagesTr'):
      os.remove(root / 'imagesTr' / f)
    return 'imagesTr: empty folder'
  if kind == 'dataset_json':
    (root / 'dataset.json').write_text(json.dumps({'labels': {'0': 'bg', '1': 'a'}}))
    return 'dataset.json: lists 2 labels'
  raise ValueError(kind)


@pytest.mark.parametrize('kind', ['corrupt', 'shape', 'affine', 'label_values', 'nan',
                                  'missing_label', 'orphan_label', 'empty', 'dataset_json'])
def test_bad_input_errors_name_the_file(tmp_path, kind):
  root = tmp_path / 'Task99'
  _make_task(root, num_cases=4)
  where = _break(root, kind)
  with pytest.raises(io.DataError, match=where):
    msd.load(_cfg(root, tmp_path))
  # Nothing half-written is left behind to be reused later.
  prepared = tmp_path / 'tfds' / 'unet_ds_msd'
  if prepared.exists():
    assert not list(prepared.rglob('*incomplete*')) and not list(prepared.rglob('*.json'))
    assert not [d for d in prepared.rglob('*') if d.is_dir()], list(prepared.rglob('*'))


def test_a_dataset_json_edited_after_preparation_is_checked_too(tmp_path):
  root = tmp_path / 'Task99'
  _make_task(root, num_cases=4)
  msd.load(_cfg(root, tmp_path))  # prepared (and cached) as the folder was
  _break(root, 'dataset_json')
  with pytest.raises(io.DataError, match='dataset.json: lists 2 labels'):
    msd.load(_cfg(root, tmp_path))


def test_read_case_without_label_for_prediction(tmp_path):
  root = tmp_path / 'Task99'
  _make_task(root, num_cases=1)
  ex = msd.read_case(str(root / 'imagesTr' / 'case_000.nii.gz'), None, num_classes=3)
  assert 'label' not in ex and ex['image'].shape == (6, 7, 5, 1)


def test_missing_required_settings(tmp_path):
  with pytest.raises(ValueError, match='config.data.path'):
    msd.load({'num_classes': 3})
  with pytest.raises(ValueError, match='config.data.num_classes'):
    msd.load({'path': str(tmp_path)})


def _anisotropic_case(root):
  """One 1 x 1 x 4 mm case, 16 x 12 x 5 voxels, with an oblique affine and a box label."""
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  affine = nibabel.affines.from_matvec(np.diag([1.0, -1.0, 4.0]), [5.0, 20.0, -8.0])
  image = np.random.default_rng(0).normal(100, 10, (16, 12, 5)).astype(np.float32)
  label = np.zeros((16, 12, 5), np.uint8)
  label[4:12, 3:9, 1:4] = 1
  _write_case(root, 'mr', image, label, affine)
  return affine, label


def test_read_case_resamples_to_the_target_spacing_and_keeps_the_geometry(tmp_path):
  root = tmp_path / 'Aniso'
  affine, label = _anisotropic_case(root)
  paths = (str(root / 'imagesTr' / 'mr.nii.gz'), str(root / 'labelsTr' / 'mr.nii.gz'))
  ex = msd.read_case(*paths, num_classes=2, target_spacing=(2.0, 2.0, 2.0))
  g = ex['geometry']
  assert g.original_shape == (16, 12, 5) and g.original_spacing == (1.0, 1.0, 4.0)
  assert g.shape == (8, 6, 10) and g.coarse_axis == 2  # the input is 4x coarser along z
  np.testing.assert_allclose(g.affine, affine)
  assert ex['image'].shape == (8, 6, 10, 1) and ex['label'].shape == (8, 6, 10)
  np.testing.assert_array_equal(ex['shape'], (8, 6, 10))
  np.testing.assert_allclose(np.abs(np.diag(ex['affine'])[:3]), (2.0, 2.0, 2.0))
  # z by whole slices: output slices 2..7 come from input slices 1..3 (the labelled ones)
  np.testing.assert_array_equal(ex['label'][:, :, [2, 7]].any(axis=(0, 1)), [True, True])
  assert not ex['label'][:, :, [0, 1, 8, 9]].any()
  kept = msd.read_case(*paths, num_classes=2, target_spacing=(2.0, 2.0, 2.0),
                       resample_label=False)
  np.testing.assert_array_equal(kept['label'], label)  # scored on the input's own grid
  assert kept['image'].shape == (8, 6, 10, 1)
  same = msd.read_case(*paths, num_classes=2)
  assert not same['geometry'].resampled and same['image'].shape == (16, 12, 5, 1)


def test_prepared_data_is_resampled_and_named_by_the_spacing(tmp_path):
  root = tmp_path / 'Aniso'
  _anisotropic_case(root)
  base = _cfg(root, tmp_path, num_classes=2, val_fraction=0.0)
  plain = msd.load(base)['train'][0]
  resampled = msd.load({**base, 'target_spacing': (1.0, 1.0, 2.0)})['train'][0]
  assert plain['image'].shape == (16, 12, 5, 1) and resampled['image'].shape == (16, 12, 10, 1)
  assert resampled['label'].shape == (16, 12, 10)
  with pytest.raises(ValueError, match='config.data.target_spacing'):
    msd.load({**base, 'target_spacing': (1.0, 0.0, 2.0)})
  with pytest.raises(ValueError, match='config.data.normalization'):
    msd.load({**base, 'normalization': 'ct,hu'})
  with pytest.raises(ValueError, match=r"config.data.ct_stats=None: normalization .ct. needs"):
    msd.read_case(str(root / 'imagesTr' / 'mr.nii.gz'), None, num_classes=2, normalization='ct')


def test_prediction_lands_on_the_input_grid(tmp_path):
  # Trained at 2 x 2 x 2 mm, predicted on a 1 x 1 x 4 mm input: the written label map has the
  # input's shape, affine and spacing, and is scored against the label on that grid.
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from unet_ds import evaluate  # pylint: disable=g-import-not-at-top
  from unet_ds import predict  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'Aniso'
  affine, label = _anisotropic_case(root)
  nibabel.save(nibabel.Nifti1Image(label * 10.0, affine), root / 'imagesTr' / 'mr.nii.gz')
  config = ml_collections.ConfigDict({
      'data': {'name': 'msd', 'path': str(root), 'num_classes': 2, 'patch_size': (4, 4, 4),
               'normalization': 'none', 'target_spacing': (2.0, 2.0, 2.0)},
      'inference': {'overlap': 0.5, 'batch_size': 2},
  })
  centres = jnp.asarray([0.0, 10.0])
  oracle = lambda x: -jnp.abs(x[..., :1] - centres)  # intensity 10 -> class 1  # noqa: E731
  predictor = predict.Predictor(oracle, config.data, predict.settings_from_config(config))
  assert predictor.read(str(root / 'imagesTr' / 'mr.nii.gz'))['image'].shape == (8, 6, 10, 1)
  written = predict.predict_files(predictor, [str(root / 'imagesTr' / 'mr.nii.gz')],
                                  str(tmp_path / 'out'), log=lambda _: None)
  out = nibabel.load(written[0])
  assert out.shape == (16, 12, 5)
  np.testing.assert_allclose(out.affine, affine)
  np.testing.assert_allclose(out.header.get_zooms()[:3], (1.0, 1.0, 4.0))
  pred = np.asarray(out.dataobj)
  dice = 2 * (pred * label).sum() / (pred.sum() + label.sum())
  assert dice > 0.9
  cases = [('mr', str(root / 'imagesTr' / 'mr.nii.gz'), str(root / 'labelsTr' / 'mr.nii.gz'))]
  summary = evaluate.evaluate_cases(predictor, cases, str(tmp_path / 'ev'), log=lambda _: None)
  assert summary['mean_foreground_dice'] == pytest.approx(dice, abs=1e-6)


def test_dataset_json_naming_missing_images_is_warned_once(tmp_path, monkeypatch):
  root = tmp_path / 'Task98'
  _make_task(root, num_cases=3)
  listed = [{'image': f'./imagesTr/case_{i:03d}.nii.gz', 'label': f'./labelsTr/case_{i:03d}.nii.gz'}
            for i in range(5)]  # a partial copy: 2 of 5 listed cases are not there
  (root / 'dataset.json').write_text(json.dumps({'labels': {'0': 'bg', '1': 'a', '2': 'b'},
                                                 'training': listed}))
  warnings = []
  monkeypatch.setattr(msd.logging, 'warning', lambda fmt, *a: warnings.append(fmt % a))
  assert len(msd.find_cases(str(root))) == 3
  assert len(msd.find_cases(str(root))) == 3
  assert len(warnings) == 1, warnings
  assert ('dataset.json lists 5 training images, 2 of them not found (e.g. '
          f'{root}/imagesTr/case_003.nii.gz); using the 3 cases in imagesTr/') in warnings[0]
