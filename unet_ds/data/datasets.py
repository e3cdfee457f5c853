"""Dataset registry: `config.data` -> sources, train transforms and batch function, eval examples.

Synthetic data trains on whole volumes; real data (`msd`, `folder2d`) trains on random patches
with foreground oversampling and augmentation, and is evaluated during training on centre
pad/crops of `config.data.eval_shape` (default: the patch size; whole-volume sliding-window
scores come from `--mode=eval`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import grain.python as grain
import numpy as np

from unet_ds.data import prepare
from unet_ds.data import synthetic


def get_sources(data_cfg: Any) -> dict[str, Any]:
  """`{'train': source, 'validation': source}` for `config.data` (prepared on first use)."""
  if data_cfg.name == 'synthetic':
    return synthetic.load(ndim=data_cfg.ndim, shape=tuple(data_cfg.shape),
                          num_classes=data_cfg.num_classes, num_train=data_cfg.num_train,
                          num_val=data_cfg.num_val, seed=data_cfg.seed,
                          data_dir=data_cfg.data_dir or prepare.default_data_dir(),
                          in_channels=int(data_cfg.get('in_channels', 1)))
  if data_cfg.name == 'msd':
    from unet_ds.data import msd  # pylint: disable=g-import-not-at-top
    return msd.load(data_cfg)
  if data_cfg.name == 'folder2d':
    from unet_ds.data import folder2d  # pylint: disable=g-import-not-at-top
    return folder2d.load(data_cfg)
  raise ValueError(f'config.data.name: unknown dataset {data_cfg.name!r}')


def training_shape(data_cfg: Any) -> tuple[int, ...]:
  """Spatial shape of training (and in-training eval) examples."""
  return tuple(data_cfg.get('patch_size') or data_cfg.shape)


class _Select(grain.MapTransform):
  """Keeps only the arrays the model trains on (drops ids, affines, shapes)."""

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {'image': np.asarray(element['image'], np.float32),
            'label': np.asarray(element['label'], np.int32)}


def train_transforms(data_cfg: Any) -> Sequence[grain.Transformation]:
  """Per-example transforms before batching."""
  if data_cfg.name == 'synthetic':
    return (_Select(),)
  from unet_ds.data import patches  # pylint: disable=g-import-not-at-top
  return (_Select(), patches.AttachSeed())


def train_batch_fn(data_cfg: Any) -> Callable[[Sequence[Any]], Any] | None:
  """The batch function: None (stack) for synthetic data; patches + augmentation for real data,
  cut per batch so that foreground oversampling holds within every batch."""
  if data_cfg.name == 'synthetic':
    return None
  from unet_ds.data import augment  # pylint: disable=g-import-not-at-top
  from unet_ds.data import patches  # pylint: disable=g-import-not-at-top
  augmentations = augment.make_augmentations(
      data_cfg.ndim, intensity=intensity_augment(data_cfg),
      keep_axes=_unscaled_axes(data_cfg)) if data_cfg.get('augment', True) else ()
  return patches.PatchBatch(training_shape(data_cfg),
                            fg_fraction=float(data_cfg.get('fg_fraction', 1 / 3)),
                            transforms=tuple(augmentations), spatial=spatial_augment(data_cfg))


def intensity_augment(data_cfg: Any) -> str:
  """`data.aug_intensity` checked: 'basic' (scale/shift and noise) or 'nnunet' (`augment`)."""
  from unet_ds.data import augment  # pylint: disable=g-import-not-at-top
  name = str(data_cfg.get('aug_intensity', 'basic'))
  if name not in augment.INTENSITY:
    raise ValueError(f'data.aug_intensity={name!r}: one of {augment.INTENSITY}')
  return name


def _unscaled_axes(data_cfg: Any) -> tuple[int, ...]:
  """Axes the spatial scaling leaves alone (thick slices' coarse axis), left alone by the
  low-resolution simulation too."""
  scaled = tuple(int(a) for a in data_cfg.get('aug_scale_axes', ()))
  return tuple(a for a in range(data_cfg.ndim) if scaled and a not in scaled)


def spatial_augment(data_cfg: Any) -> Any:
  """`patches.SpatialAugment` from `data.aug_*`, or None when both probabilities are 0 (so runs
  without it draw the same random numbers as before it existed)."""
  from unet_ds.data import patches  # pylint: disable=g-import-not-at-top
  p_rotate = float(data_cfg.get('aug_rotate_p', 0.0))
  p_scale = float(data_cfg.get('aug_scale_p', 0.0))
  if not data_cfg.get('augment', True) or (p_rotate == 0 and p_scale == 0):
    return None
  plane = tuple(int(a) for a in data_cfg.get('aug_plane', (0, 1)))
  if plane and (len(plane) != 2 or plane[0] == plane[1]
                or not all(0 <= a < data_cfg.ndim for a in plane)):
    raise ValueError(f'data.aug_plane={plane}: need two different axes of the {data_cfg.ndim} '
                     'spatial axes, or () to turn in every plane')
  scale_axes = tuple(int(a) for a in data_cfg.get('aug_scale_axes', ()))
  if not all(0 <= a < data_cfg.ndim for a in scale_axes):
    raise ValueError(f'data.aug_scale_axes={scale_axes}: axes of the {data_cfg.ndim} spatial '
                     'axes, or () for all')
  return patches.SpatialAugment(
      p_rotate=p_rotate, max_degrees=float(data_cfg.get('aug_rotate_degrees', 30.0)),
      plane=plane, p_scale=p_scale,
      scale=tuple(float(v) for v in data_cfg.get('aug_scale', (0.7, 1.4))),
      scale_axes=scale_axes or None)


class _EvalSource:
  """Fixed-shape view of a source for batched in-training evaluation."""

  def __init__(self, source: Any, shape: tuple[int, ...] | None):
    self._source, self._shape = source, shape

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = _Select().map(self._source[index])
    if self._shape is not None:
      from unet_ds.data import patches  # pylint: disable=g-import-not-at-top
      ex = patches.center_pad_crop(ex, self._shape)
    return ex

  def __repr__(self) -> str:
    return f'EvalSource({self._source!r}, {self._shape})'


def eval_source(data_cfg: Any, source: Any) -> Any:
  """Validation examples at `data.eval_shape` (default: the training shape; synthetic: as is)."""
  if data_cfg.name == 'synthetic':
    return _EvalSource(source, None)
  return _EvalSource(source, tuple(data_cfg.get('eval_shape') or training_shape(data_cfg)))
