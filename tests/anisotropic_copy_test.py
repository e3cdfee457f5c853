"""Tests for the anisotropic-copy benchmarks: `make_anisotropic` (thick slices from fine data) and
`coarsened_bound` (a fine-data run's predictions scored on the copy's grid)."""
import nibabel
import numpy as np
import pytest

from benchmarks import coarsened_bound
from benchmarks import make_anisotropic
from configs import msd as msd_config
from unet_ds import evaluate
from unet_ds import train


def test_thick_slices_average_the_image_and_take_the_slab_majority_label():
  image = np.arange(9, dtype=np.float32).reshape(1, 1, 9)
  #                 slab 0     slab 1     slab 2
  label = np.array([0, 1, 1,   1, 0, 0,   2, 0, 1], np.int32).reshape(1, 1, 9)
  out, labels, shape = make_anisotropic.coarsen(image, label, (1.0, 1.0, 1.0), 2, 3.0)
  assert shape == (1, 1, 3)
  np.testing.assert_allclose(out.ravel(), [1.0, 4.0, 7.0])  # each slab's mean
  # majorities 1 and 0; the last slab is a three-way tie, which its centre slice (0) breaks
  np.testing.assert_array_equal(labels.ravel(), [1, 0, 0])
  # probabilities: the class with the largest mean share over the slab wins
  scores = np.zeros((1, 1, 9, 3), np.float32)
  scores[..., 2] = [0.6, 0.6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
  scores[..., 1] = [0.4, 0.4, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
  scores[..., 0] = 1 - scores[..., 1] - scores[..., 2]
  np.testing.assert_array_equal(
      make_anisotropic.slab_argmax(scores, (1, 1, 3), (1, 1, 3)).ravel(), [1, 0, 0])


def _fine_folder(root, n=5):
  (root / 'imagesTr').mkdir(parents=True)
  (root / 'labelsTr').mkdir()
  rng = np.random.default_rng(0)
  for i in range(n):
    label = np.zeros((12, 10, 9), np.uint8)
    label[3:9, 2:8, 2 + i % 2:7] = 1
    image = (label * 100.0 + rng.normal(0, 5, label.shape)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [i, -2, 5]
    nibabel.save(nibabel.Nifti1Image(image, affine), root / 'imagesTr' / f'c{i}.nii.gz')
    nibabel.save(nibabel.Nifti1Image(label, affine), root / 'labelsTr' / f'c{i}.nii.gz')


def test_copy_covers_the_same_box_and_the_bound_of_an_unchanged_copy_is_eval(tmp_path):
  fine = tmp_path / 'fine'
  _fine_folder(fine)
  assert make_anisotropic.make_copy(str(fine), str(tmp_path / 'thick'), 3.0, 2) == 5
  src, copy = (nibabel.load(d / 'imagesTr' / 'c1.nii.gz') for d in (fine, tmp_path / 'thick'))
  assert copy.shape == (12, 10, 3) and copy.header.get_zooms() == pytest.approx((1, 1, 3))
  for j in range(3):  # thick voxel j's centre is fine slice 3j + 1's: the same box in the world
    np.testing.assert_allclose(copy.affine @ [2, 3, j, 1], src.affine @ [2, 3, 3 * j + 1, 1])
  labels = np.asarray(nibabel.load(tmp_path / 'thick' / 'labelsTr' / 'c1.nii.gz').dataobj)
  assert set(np.unique(labels)) == {0, 1}
  # --fine_grid: the thick images back on the input grid, the fine labels and affine untouched
  make_anisotropic.make_copy(str(fine), str(tmp_path / 'back'), 3.0, 2, fine_grid=True)
  back = nibabel.load(tmp_path / 'back' / 'imagesTr' / 'c1.nii.gz')
  assert back.shape == src.shape and np.allclose(back.affine, src.affine)
  thick_image = np.asarray(copy.dataobj)
  np.testing.assert_allclose(np.asarray(back.dataobj)[..., [1, 4, 7]], thick_image, atol=1e-4)
  np.testing.assert_allclose(np.asarray(back.dataobj)[..., 2:4].mean(-1),  # linear in between
                             thick_image[..., :2].mean(-1), atol=1e-4)
  np.testing.assert_array_equal(
      np.asarray(nibabel.load(tmp_path / 'back' / 'labelsTr' / 'c1.nii.gz').dataobj),
      np.asarray(nibabel.load(fine / 'labelsTr' / 'c1.nii.gz').dataobj))

  config = msd_config.get_config(f'path={fine},classes=2,smoke')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.mesh.data = 1
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  scored = evaluate.run(None, workdir, input_path=None, output=str(tmp_path / 'ev'))
  # A "copy" at the data's own spacing: the coarsening is the identity, so the bound is eval's.
  same = make_anisotropic.make_copy(str(fine), str(tmp_path / 'same'), 1.0, 2)
  assert same == 5
  result = coarsened_bound.bound(workdir, str(tmp_path / 'same'))
  assert result['num_cases'] == scored['num_cases']
  assert result['mean_foreground_dice'] == pytest.approx(scored['mean_foreground_dice'], abs=1e-6)
  thick = coarsened_bound.bound(workdir, str(tmp_path / 'thick'))
  assert thick['num_cases'] == scored['num_cases'] and 0 <= thick['mean_foreground_dice'] <= 1
