"""Makes an anisotropic copy of an MSD task folder: every case resampled to a coarser spacing along
one axis (default: 3 mm along the last axis, 1 x 1 x 3 mm for Task04 hippocampus), to check that
planning (`configs/auto.py`) trains as well on thick-slice data.

Thick slices average what they cover, so images are block-averaged along the coarse axis (linear
interpolation of the slices, then a box filter of the slice thickness); labels take the majority
class of the voxels each thick slice covers (linear on one-hot). The affine is scaled so that the
copy covers the same box in world coordinates.

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


def coarsen(image: np.ndarray, label: np.ndarray, spacing: Sequence[float], axis: int,
            new_spacing: float) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
  """(image [*spatial], label, new shape): `axis` resampled from `spacing[axis]` to
  `new_spacing`."""
  target = list(spacing)
  target[axis] = new_spacing
  shape = resample.target_shape(image.shape, spacing, target)
  thickness = new_spacing / spacing[axis]
  size = [1] * image.ndim
  size[axis] = max(1, int(round(thickness)))
  smoothed = ndimage.uniform_filter(image.astype(np.float32), size=size, mode='nearest')
  out = resample.resample_image(smoothed[..., None], shape, order=1)[..., 0]
  labels = resample.resample_labels(label, shape, method='linear')
  return out, labels, shape


def main(argv: Sequence[str]) -> None:
  del argv
  if not (_INPUT.value and _OUTPUT.value):
    raise app.UsageError('--input and --output are required')
  for sub in ('imagesTr', 'labelsTr'):
    os.makedirs(os.path.join(_OUTPUT.value, sub), exist_ok=True)
  meta = os.path.join(_INPUT.value, 'dataset.json')
  if os.path.exists(meta):
    shutil.copy(meta, os.path.join(_OUTPUT.value, 'dataset.json'))
  cases = msd.find_cases(_INPUT.value)
  for cid, image_path, label_path in cases:
    volume = io.read_nifti(image_path)
    spacing = msd.spacing_of(volume)
    label = io.label_to_classes(io.read_nifti(label_path).array, label_path, 256)
    image, labels, shape = coarsen(np.asarray(volume.array, np.float32), label, spacing,
                                   _AXIS.value, _SPACING.value)
    affine = resample.resampled_affine(volume.affine, volume.array.shape[:3], shape)
    header = volume.header.copy()
    header.set_data_dtype(np.float32)
    for folder, array, dtype in (('imagesTr', image, np.float32), ('labelsTr', labels, np.uint8)):
      img = nibabel.Nifti1Image(array.astype(dtype), affine, header)
      img.set_data_dtype(dtype)
      nibabel.save(img, os.path.join(_OUTPUT.value, folder, f'{cid}.nii.gz'))
  print(f'{len(cases)} cases -> {_OUTPUT.value} ({_SPACING.value} mm along axis {_AXIS.value})')


if __name__ == '__main__':
  app.run(main)
