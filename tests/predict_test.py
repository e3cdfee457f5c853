"""Tests for unet_ds.predict and unet_ds.evaluate: folder prediction written back in the input
format, whole-image eval of folders and of a run's held-out cases."""
import csv
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import nibabel
import numpy as np
from PIL import Image
import pytest

from benchmarks import ensemble_eval
from configs import folder2d as folder2d_config
from tests import smoke
from unet_ds import config_lib
from unet_ds import inference
from unet_ds import models
from unet_ds import optim
from unet_ds import evaluate
from unet_ds import predict
from unet_ds import state as state_lib
from unet_ds import train
from unet_ds.data import cases as cases_lib
from unet_ds.data import folder2d
from unet_ds.data import io


def _oracle(centres):
  """Pointwise 'model': logit_k = -|x - centre_k|, so intensity c_k is predicted as class k."""
  c = jnp.asarray(centres, jnp.float32)
  return lambda x: -jnp.abs(x[..., :1] - c)


def _config(name, path, patch, **data):
  return ml_collections.ConfigDict({
      'data': {'name': name, 'path': str(path), 'num_classes': 3, 'patch_size': patch,
               'normalization': 'none', 'val_fraction': 0.5, **data},
      'inference': {'overlap': 0.5, 'batch_size': 2, 'tta_axes': (0,), 'save_probs': True},
  })


def _msd_folder(root, n=4):
  rng = np.random.default_rng(0)
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  labels = {}
  for i in range(n):
    shape = (9 + i, 7, 6)
    label = rng.integers(0, 3, shape).astype(np.uint8)
    affine = np.diag([0.8, 1.2, 2.5, 1.0])
    affine[:3, 3] = [i, 2, -3]
    nibabel.save(nibabel.Nifti1Image((label * 10.0).astype(np.float32), affine),
                 root / 'imagesTr' / f'c{i}.nii.gz')
    nibabel.save(nibabel.Nifti1Image(label, affine), root / 'labelsTr' / f'c{i}.nii.gz')
    labels[f'c{i}'] = (label, affine)
  return labels


def test_predict_nifti_folder_keeps_affine_and_header(tmp_path):
  root = tmp_path / 'Task'
  labels = _msd_folder(root)
  config = _config('msd', root, (4, 4, 4))
  predictor = predict.Predictor(_oracle([0, 10, 20]), config.data,
                                predict.settings_from_config(config))
  inputs = predict.find_inputs(str(root), config.data)  # falls back to imagesTr/
  assert len(inputs) == 4
  written = predict.predict_files(predictor, inputs, str(tmp_path / 'out'), log=lambda _: None)
  for path in written:
    cid = io.case_id(path)
    out = nibabel.load(path)
    label, affine = labels[cid]
    np.testing.assert_allclose(out.affine, affine)
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), label)
    probs = nibabel.load(tmp_path / 'out' / f'{cid}_probs.nii.gz')
    assert probs.shape == label.shape + (3,)
    np.testing.assert_allclose(probs.affine, affine)



def test_predicted_nifti_holds_the_files_own_label_values(tmp_path):
  root = tmp_path / 'Task'
  labels = _msd_folder(root, n=2)
  # Files hold 0/1/2; the run swapped 0 and 1 (class 0 is value 1, whose intensity is 10).
  config = _config('msd', root, (4, 4, 4), label_map='0:1,1:0,2:2')
  predictor = predict.Predictor(_oracle([10, 0, 20]), config.data,
                                predict.settings_from_config(config))
  written = predict.predict_files(predictor, predict.find_inputs(str(root), config.data),
                                  str(tmp_path / 'out'), log=lambda _: None)
  for path in written:
    np.testing.assert_array_equal(np.asanyarray(nibabel.load(path).dataobj),
                                  labels[io.case_id(path)][0])

def test_eval_validation_split_writes_json_and_csv(tmp_path):
  root = tmp_path / 'Task'
  labels = _msd_folder(root)
  config = _config('msd', root, (4, 4, 4))
  # Intensity 20 (class 2) is nearer 10 than 40: class 2 is always predicted as class 1.
  predictor = predict.Predictor(_oracle([0, 10, 40]), config.data,
                                predict.settings_from_config(config))
  cases = cases_lib.find_labelled(str(root), config.data, 'validation')
  assert len(cases) == 2 and set(c[0] for c in cases) < set(labels)
  summary = evaluate.evaluate_cases(predictor, cases, str(tmp_path / 'ev'), log=lambda _: None)
  expected_d1 = []
  for cid, _, _ in cases:
    label = labels[cid][0]
    n1, n2 = (label == 1).sum(), (label == 2).sum()
    expected_d1.append(2 * n1 / (2 * n1 + n2))
  dice = summary['per_class']['dice']
  assert dice[0] == pytest.approx(1.0) and dice[2] == pytest.approx(0.0)
  assert dice[1] == pytest.approx(np.mean(expected_d1))
  assert summary['mean_foreground_dice'] == pytest.approx(np.mean(expected_d1) / 2)
  on_disk = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
  assert on_disk['mean_foreground_dice'] == pytest.approx(summary['mean_foreground_dice'])
  assert on_disk['num_cases'] == 2 and [c['case_id'] for c in on_disk['cases']] == [
      c[0] for c in cases]
  rows = list(csv.reader(open(tmp_path / 'ev' / 'metrics.csv')))
  assert rows[0][:3] == ['case_id', 'file', 'mean_foreground_dice'] and rows[-1][0] == 'mean'
  assert len(rows) == 1 + 2 + 1
  assert float(rows[-1][2]) == pytest.approx(summary['mean_foreground_dice'])


def test_eval_perfect_and_wrong_models(tmp_path):
  root = tmp_path / 'Task'
  _msd_folder(root, n=2)
  config = _config('msd', root, (8, 8, 8))
  settings = predict.settings_from_config(config)
  cases = cases_lib.find_labelled(str(root), config.data)
  perfect = evaluate.evaluate_cases(predict.Predictor(_oracle([0, 10, 20]), config.data, settings),
                                   cases, str(tmp_path / 'a'), log=lambda _: None)
  assert perfect['mean_foreground_dice'] == pytest.approx(1.0)
  assert perfect['pooled']['mean_foreground_dice'] == pytest.approx(1.0)
  swapped = evaluate.evaluate_cases(predict.Predictor(_oracle([0, 20, 10]), config.data, settings),
                                   cases, str(tmp_path / 'b'), log=lambda _: None)
  assert swapped['mean_foreground_dice'] == pytest.approx(0.0)
  assert swapped['per_class']['dice'][0] == pytest.approx(1.0)


def test_predict_png_writes_original_label_values(tmp_path):
  root = tmp_path / 'em'
  (root / 'image').mkdir(parents=True)
  (root / 'label').mkdir()
  rng = np.random.default_rng(0)
  masks = {}
  for i in range(3):
    mask = np.where(rng.random((20, 13)) < 0.3, 0, 255).astype(np.uint8)  # 0 = membrane
    Image.fromarray(mask).save(root / 'image' / f'{i}.png')  # image == mask: an easy oracle
    Image.fromarray(mask).save(root / 'label' / f'{i}.png')
    masks[str(i)] = mask
  config = _config('folder2d', root, (8, 8), num_classes=2, label_map='0:1,255:0',
                   val_cases='2')
  predictor = predict.Predictor(_oracle([255, 0]), config.data,
                                predict.settings_from_config(config))
  written = predict.predict_files(predictor, predict.find_inputs(str(root / 'image'), config.data),
                                  str(tmp_path / 'out'), log=lambda _: None)
  for path in written:
    np.testing.assert_array_equal(np.array(Image.open(path)), masks[io.case_id(path)])
  assert np.load(tmp_path / 'out' / '0_probs.npy').shape == (20, 13, 2)
  cases = cases_lib.find_labelled(str(root), config.data, 'validation')
  assert [c[0] for c in cases] == ['2']
  summary = evaluate.evaluate_cases(predictor, cases, str(tmp_path / 'ev'), log=lambda _: None)
  assert summary['mean_foreground_dice'] == pytest.approx(1.0)


def test_unknown_cases_are_named_with_what_cases_takes(tmp_path):
  root = tmp_path / 'Task'
  _msd_folder(root, n=2)
  config = _config('msd', root, (4, 4, 4))
  with pytest.raises(io.DataError, match=r"cases \['validaton'\] not found; --cases takes all, "
                     r'train, validation or case ids \(c0, c1\)'):
    cases_lib.find_labelled(str(root), config.data, 'validaton')

def test_bad_inputs(tmp_path):
  config = _config('msd', tmp_path, (4, 4, 4))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(io.DataError, match='empty: empty folder'):
    predict.find_inputs(str(tmp_path / 'empty'), config.data)
  with pytest.raises(io.DataError, match='x.png: not a .nii.gz/.nii file'):
    (tmp_path / 'x.png').write_bytes(b'')
    predict.find_inputs(str(tmp_path / 'x.png'), config.data)
  with pytest.raises(ValueError, match="config.data.name='synthetic'"):
    cases_lib.data_kind({'name': 'synthetic'})
  with pytest.raises(ValueError, match='need 3 sizes'):
    predict.Predictor(_oracle([0]), config.data, inference.Settings(patch_size=(4, 4)))


def _fake_run(config, workdir, step=7):
  """A workdir as the trainer leaves it (config.json + orbax checkpoint), without training:
  random weights from the state's shapes (model.init's compile alone takes ~15 s on CPU)."""
  model = models.get_model(config_lib.validate(config))
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  shapes = jax.eval_shape(lambda: state_lib.create(
      model, tx, 0, (1, *config.data.patch_size, 1)))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(a.dtype), shapes)
  state = state.replace(step=np.int32(step))
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config_lib.to_json(config))
  smoke.save_checkpoint(workdir, step, state, config)
  return state, model


def _em_folder(root, seed):
  """Four 20x18 ISBI-style 0/255 masks as image/ + label/ PNG pairs named 0..3."""
  (root / 'image').mkdir(parents=True)
  (root / 'label').mkdir()
  rng = np.random.default_rng(seed)
  for i in range(4):
    mask = np.where(rng.random((20, 18)) < 0.3, 0, 255).astype(np.uint8)
    Image.fromarray(mask).save(root / 'image' / f'{i}.png')
    Image.fromarray(mask).save(root / 'label' / f'{i}.png')
  return root


def test_predict_and_eval_restore_the_run_from_its_workdir(tmp_path):
  root = _em_folder(tmp_path / 'em', seed=0)
  config = folder2d_config.get_config(f'path={root},isbi,smoke')
  config.data.val_cases = '3'
  workdir = str(tmp_path / 'run')
  state, model = _fake_run(config, workdir)

  out = predict.run(None, workdir, input_path=str(root / 'image' / '1.png'),
                    output=str(tmp_path / 'pred'), probabilities=True)
  assert out['step'] == 7 and len(out['written']) == 1
  pred = np.array(Image.open(out['written'][0]))
  assert pred.shape == (20, 18) and set(np.unique(pred)) <= {0, 255}
  probs = np.load(tmp_path / 'pred' / '1_probs.npy').astype(np.float32)
  assert probs.shape == (20, 18, 2)
  # The restored weights are the saved ones: same probabilities as the model applied directly.
  example = folder2d.read_case(str(root / 'image' / '1.png'), None, num_classes=2)
  direct = inference.sliding_window_predict(
      lambda x: model.apply(state.variables(), x, train=False)[0], example['image'],
      patch_size=config.data.patch_size, batch_size=2)
  np.testing.assert_allclose(probs, direct, atol=2e-3)  # probabilities stored as float16

  summary = evaluate.run(None, workdir, input_path=None,
                        output=str(tmp_path / 'ev'))
  assert summary['cases_selected'] == 'validation' and summary['num_cases'] == 1
  on_disk = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
  assert on_disk['step'] == 7 and on_disk['cases'][0]['case_id'] == '3'
  assert on_disk['mean_foreground_dice'] == pytest.approx(summary['mean_foreground_dice'])
  assert (tmp_path / 'ev' / 'metrics.csv').exists() and (tmp_path / 'ev' / '3.png').exists()
  (tmp_path / 'a_file').write_text('not a folder')
  with pytest.raises(NotADirectoryError, match='a_file: exists and is not a folder'):
    predict.run(None, workdir, input_path=str(root / 'image'), output=str(tmp_path / 'a_file'))
  with pytest.raises(FileNotFoundError, match='config.json not found'):
    predict.run(None, str(tmp_path / 'nothing'), input_path=str(root),
                output=str(tmp_path / 'x'))


def test_saved_split_keeps_the_held_out_cases_when_files_change(tmp_path):
  root = tmp_path / 'Task'
  _msd_folder(root, n=4)
  config = _config('msd', root, (4, 4, 4))
  split = cases_lib.case_split(config.data)
  assert sorted(split['train'] + split['validation']) == ['c0', 'c1', 'c2', 'c3']
  # New cases arrive after training: the seeded split of the larger folder differs, the saved
  # one does not.
  for i in range(4, 9):
    for sub in ('imagesTr', 'labelsTr'):
      (root / sub / f'c{i}.nii.gz').write_bytes((root / sub / 'c0.nii.gz').read_bytes())
  saved = cases_lib.find_labelled(str(root), config.data, 'validation', split=split)
  assert [c[0] for c in saved] == split['validation']
  recomputed = cases_lib.find_labelled(str(root), config.data, 'validation')
  assert [c[0] for c in recomputed] != split['validation']
  (root / 'imagesTr' / f'{split["validation"][0]}.nii.gz').unlink()
  (root / 'labelsTr' / f'{split["validation"][0]}.nii.gz').unlink()
  with pytest.raises(io.DataError, match=rf"the run's validation cases \['{split['validation'][0]}'"
                                         r"\] \(its split.json\) are not in this folder"):
    cases_lib.find_labelled(str(root), config.data, 'validation', split=split)


def test_train_on_a_folder_then_eval_its_saved_split(tmp_path, capsys):
  """End to end on real files: patches per batch, split.json, eval of the held-out case, also
  of a moved copy (said so)."""
  root = _em_folder(tmp_path / 'em', seed=1)
  config = folder2d_config.get_config(f'path={root},isbi,smoke')
  config.data.val_cases = '2'
  config.data.data_dir = str(tmp_path / 'tfds')
  config.mesh.data = 1
  workdir = str(tmp_path / 'run')
  summary = train.train_and_evaluate(config, workdir)
  assert summary['step'] == config.train.steps
  split = json.loads((tmp_path / 'run' / 'split.json').read_text())
  assert split == {'train': ['0', '1', '3'], 'validation': ['2']}
  result = evaluate.run(None, workdir, input_path=None, output=str(tmp_path / 'ev'))
  assert result['num_cases'] == 1 and result['cases'][0]['case_id'] == '2'
  assert 'scored as the run\'s data moved there' not in capsys.readouterr().out
  moved = shutil.copytree(root, tmp_path / 'moved')
  result = evaluate.run(None, workdir, input_path=str(moved), output=str(tmp_path / 'ev2'))
  assert result['num_cases'] == 1 and result['cases'][0]['case_id'] == '2'
  assert f"eval: {moved} holds every case of the run's split" in capsys.readouterr().out
  # benchmarks/ensemble_eval: a run averaged with itself scores as it does alone under eval.
  rows = ensemble_eval.ensembles([workdir, workdir])['ensembles']
  assert [r['mean_foreground_dice'] for r in rows] == pytest.approx(
      [result['mean_foreground_dice']] * 2, abs=1e-6)
  # A case added to the folder since: the resume is refused before any compute, naming it.
  for sub in ('image', 'label'):
    shutil.copy(root / sub / '0.png', root / sub / '4.png')
  before = (tmp_path / 'run' / 'summary.json').stat().st_mtime_ns
  with pytest.raises(io.DataError, match=r"its cases changed since the run .* \(added \['4'\]\)"):
    train.train_and_evaluate(config, workdir)
  assert (tmp_path / 'run' / 'summary.json').stat().st_mtime_ns == before


def test_a_multiruns_changed_cases_are_named_from_its_members_split(tmp_path):
  root = _em_folder(tmp_path / 'em', seed=1)
  config = folder2d_config.get_config(f'path={root},isbi,smoke')
  config.data.val_cases = '2'
  workdir = tmp_path / 'multi'  # K runs: the split is in each member's folder
  (workdir / 'seed=0').mkdir(parents=True)
  (workdir / 'multirun.json').write_text(json.dumps({'runs': ['seed=0', 'seed=1']}))
  (workdir / 'seed=0' / 'split.json').write_text(
      json.dumps(cases_lib.case_split(config.data)))
  cases_lib.check_same_cases(config.data, str(workdir))  # unchanged: fine
  for sub in ('image', 'label'):
    (root / sub / '3.png').rename(root / sub / '9.png')
  with pytest.raises(io.DataError, match=r"its cases changed .* \(added \['9'\]; removed "
                                         r"\['3'\]\)"):
    cases_lib.check_same_cases(config.data, str(workdir))


def test_inputs_unlike_the_training_data_get_a_warning(tmp_path):
  root = tmp_path / 'Task'
  _msd_folder(root, n=3)
  config = _config('msd', root, (4, 4, 4))
  trained = cases_lib.training_geometry(config.data, ['c0', 'c1', 'c2'])
  assert trained['spacing_min'] == pytest.approx([0.8, 1.2, 2.5])
  assert trained['orientations'] == ['RAS']
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / cases_lib.GEOMETRY_FILE).write_text(json.dumps(trained))
  odd = tmp_path / 'odd.nii.gz'
  nibabel.save(nibabel.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.diag([-0.8, 1.2, 5.0, 1])),
               odd)
  same = str(root / 'imagesTr' / 'c0.nii.gz')
  (warning,) = predict.warn_on_geometry([same, str(odd)], str(workdir))
  assert warning.startswith(f'{odd}: spacing (0.8, 1.2, 5.0) mm is outside the training range')
  assert 'orientation LAS differs' in warning


def test_a_bad_file_stops_predict_and_eval_before_any_prediction(tmp_path):
  """The last of the inputs is corrupt: the error names it and nothing was predicted or written
  (not the cases before it, one by one)."""
  root = _em_folder(tmp_path / 'em', seed=0)
  config = folder2d_config.get_config(f'path={root},isbi,smoke')
  config.data.val_cases = '2,3'
  workdir = str(tmp_path / 'run')
  _fake_run(config, workdir)
  (root / 'image' / '3.png').write_bytes(b'not a png')
  with pytest.raises(io.DataError, match=r'image/3.png'):
    predict.run(None, workdir, input_path=str(root / 'image'), output=str(tmp_path / 'pred'))
  assert not (tmp_path / 'pred').exists()  # not even the folder
  with pytest.raises(io.DataError, match=r'image/3.png'):
    evaluate.run(None, workdir, output=str(tmp_path / 'ev'))
  assert not (tmp_path / 'ev').exists() or not os.listdir(tmp_path / 'ev')
  # A label whose shape differs from its image's is named too.
  (root / 'image' / '3.png').unlink()
  Image.fromarray(np.zeros((20, 18), np.uint8)).save(root / 'image' / '3.png')
  Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / 'label' / '3.png')
  with pytest.raises(io.DataError, match=r'label/3.png'):
    evaluate.run(None, workdir, output=str(tmp_path / 'ev2'))
