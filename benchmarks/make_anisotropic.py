"""Makes an anisotropic copy of an MSD task folder: every case resampled to a coarser spacing along
one axis (default: 3 mm along the last axis, 1 x 1 x 3 mm for Task04 hippocampus), to check that
planning (`configs/auto.py`) trains as well on thick-slice data.

Thick slices average what they cover, so images are block-averaged along the coarse axis (a
box filter of the slice thickness, then the slab centres sampled); labels take the majority
class of the voxels each thick slice covers (`slab_majority`). The affine is scaled so that the
copy covers the same box in world coordinates.

`--fine_grid` is a diagnostic: the thick-slice images put back on the input grid (linear
interpolation between slab centres) beside the untouched fine labels. A run trained on it sees
only what the thick images hold but is supervised and scored on fine labels; coarsening its
predictions (`coarsened_bound.py`) separates what the images lose from what the coarse labels
cost the copy's own training.

  python benchmarks/make_anisotropic.py --input=/data/Task04_Hippocampus \
      --output=/data/Task04_Hippocampus_1x1x3 --spacing=3 --axis=2
"""
from __future__ import annotations

from collections.abc import Sequence
import os
import shutil

from absl import app
from absl import flags
import nibabel
import numpy as np
from scipy import ndimage

from unet_ds.data import io
from unet_ds.data import msd
from unet_ds.data import resample

_INPUT = flags.DEFINE_string('input', None, 'MSD task folder (imagesTr/ + labelsTr/).')
_OUTPUT = flags.DEFINE_string('output', None, 'where the anisotropic copy goes.')
_SPACING = flags.DEFINE_float('spacing', 3.0, 'new spacing (mm) of the coarse axis.')
_AXIS = flags.DEFINE_integer('axis', 2, 'the array axis made coarse.')
_FINE_GRID = flags.DEFINE_bool('fine_grid', False, 'thick-slice images back on the input grid, '
                               'fine labels kept (a diagnostic; module doc).')


def coarsen(image: np.ndarray, label: np.ndarray, spacing: Sequence[float], axis: int,
            new_spacing: float) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
  """(image [*spatial], label, new shape): `axis` resampled from `spacing[axis]` to
  `new_spacing`."""
  target = list(spacing)
  target[axis] = new_spacing
  shape = resample.target_shape(image.shape, spacing, target)
  size = slab_size(spacing, target)
  smoothed = ndimage.uniform_filter(image.astype(np.float32), size=size, mode='nearest')
  out = resample.resample_image(smoothed[..., None], shape, order=1)[..., 0]
  return out, slab_majority(label, shape, size), shape


def slab_size(fine: Sequence[float], coarse: Sequence[float]) -> list[int]:
  """How many fine voxels along each axis one coarse voxel's slab covers (at least 1)."""
  return [max(1, int(round(c / f))) for f, c in zip(fine, coarse)]


def slab_majority(label: np.ndarray, shape: Sequence[int], size: Sequence[int]) -> np.ndarray:
  """The class covering most of each thick voxel's slab (`size` fine voxels), as an annotator of
  the averaged slices would draw it; a tie goes to the class at the slab's centre.

  Sampling the fine labels at the slab centres instead (linear on one-hot) would label an image
  that averages three slices with its middle slice alone: a target its image does not determine.
  """
  onehot = np.eye(int(label.max(initial=0)) + 1, dtype=np.float32)[label]
  return slab_argmax(onehot, shape, size, tie=onehot)


def slab_argmax(scores: np.ndarray, shape: Sequence[int], size: Sequence[int],
                tie: np.ndarray | None = None) -> np.ndarray:
  """Class map on `shape`: each class's score `[*spatial, K]` averaged over the slab of `size`
  fine voxels that a thick voxel covers, sampled at the slab centres, argmax (`tie`, times
  1e-3, added to the slab averages, breaks ties)."""
  best = np.full(tuple(shape), -np.inf, np.float32)
  out = np.zeros(tuple(shape), np.int32)
  for c in range(scores.shape[-1]):
    share = ndimage.uniform_filter(scores[..., c].astype(np.float32), size=size, mode='nearest')
    if tie is not None:
      share = share + 1e-3 * tie[..., c]
    score = resample.resample_image(share[..., None], shape, order=1)[..., 0]
    better = score > best
    out[better], best[better] = c, score[better]
  return out


def make_copy(input_dir: str, output_dir: str, new_spacing: float = 3.0, axis: int = 2,
              fine_grid: bool = False) -> int:
  """Writes the coarsened copy of every case of `input_dir` (and its dataset.json) into
  `output_dir` (`fine_grid`: its images on the input grid, with the fine labels); returns the
  number of cases."""
  for sub in ('imagesTr', 'labelsTr'):
    os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
  meta = os.path.join(input_dir, 'dataset.json')
  if os.path.exists(meta):
    shutil.copy(meta, os.path.join(output_dir, 'dataset.json'))
  cases = msd.find_cases(input_dir)
  for cid, image_path, label_path in cases:
    volume = io.read_nifti(image_path)
    spacing = msd.spacing_of(volume)
    label = io.label_to_classes(io.read_nifti(label_path).array, label_path, 256)
    image, labels, shape = coarsen(np.asarray(volume.array, np.float32), label, spacing, axis,
                                   new_spacing)
    if fine_grid:
      image = resample.resample_image(image[..., None], label.shape, order=1)[..., 0]
      labels, affine = label, volume.affine
    else:
      affine = resample.resampled_affine(volume.affine, volume.array.shape[:3], shape)
    header = volume.header.copy()
    header.set_data_dtype(np.float32)
    for folder, array, dtype in (('imagesTr', image, np.float32), ('labelsTr', labels, np.uint8)):
      img = nibabel.Nifti1Image(array.astype(dtype), affine, header)
      img.set_data_dtype(dtype)
      nibabel.save(img, os.path.join(output_dir, folder, f'{cid}.nii.gz'))
  return len(cases)


def main(argv: Sequence[str]) -> None:
  del argv
  if not (_INPUT.value and _OUTPUT.value):
    raise app.UsageError('--input and --output are required')
  num = make_copy(_INPUT.value, _OUTPUT.value, _SPACING.value, _AXIS.value, _FINE_GRID.value)
  print(f'{num} cases -> {_OUTPUT.value} ({_SPACING.value} mm along axis {_AXIS.value})')


if __name__ == '__main__':
  app.run(main)
