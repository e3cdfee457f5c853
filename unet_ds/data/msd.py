"""Medical Segmentation Decathlon style NIfTI folders as a TFDS dataset (array_record, no TF).

Layout: `PATH/imagesTr/<case>.nii.gz` + `PATH/labelsTr/<case>.nii.gz`, optional `PATH/dataset.json`
(label names, modalities; checked against the config when present). Images are 3D, or 4D
`[X, Y, Z, C]` for several modalities. Each case is read, checked, cast to float32, normalised and,
when `data.target_spacing` is set (a plan, `unet_ds.plan`), resampled to that spacing while
preparing; it is stored with its affine and file name so predictions can be written back in place
(`read_case` also gives the input's geometry, for `resample.to_original`).

  sources = msd.load(config.data)  # {'train': CaseSource, 'validation': CaseSource}
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import os
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from unet_ds.data import io
from unet_ds.data import prepare
from unet_ds.data import resample

SPATIAL_RANK = 3
_VERSION = '1.0.0'


def spacing_of(volume: io.Volume) -> tuple[float, ...]:
  """Voxel spacing (mm) of the spatial axes, in array axis order, from the NIfTI header."""
  zooms = tuple(float(z) for z in volume.header.get_zooms()[:SPATIAL_RANK])
  if len(zooms) != SPATIAL_RANK or min(zooms) <= 0:
    raise io.DataError(f'{volume.path}: voxel spacing {zooms} from the header is not usable')
  return zooms


def read_case(image_path: str, label_path: str | None, *, num_classes: int,
              normalization: str = 'zscore', clip_percentiles: Sequence[float] | None = None,
              label_map: io.LabelMap | None = None, in_channels: int | None = None,
              target_spacing: Sequence[float] | None = None,
              ct_stats: Sequence[Sequence[float]] | None = None,
              label_resampling: str = 'linear', resample_label: bool = True) -> dict[str, Any]:
  """Reads, checks, normalises and (with `target_spacing`) resamples one case.

  Images are normalised on their own grid, then resampled (`resample.resample_image`: cubic
  spline, the coarse axis apart when anisotropic); labels by `label_resampling`. The example's
  `geometry` (`resample.Geometry`) says where it came from, so that a prediction can be brought
  back with `resample.to_original`.

  Args:
    image_path, label_path: the case's files (label optional, for prediction).
    num_classes, label_map, in_channels: as `config.data`.
    normalization, clip_percentiles, ct_stats: see `prepare.normalize`.
    target_spacing: the planned spacing (mm per axis); None keeps each case's own grid.
    label_resampling: 'linear' (one-hot, argmax) or 'nearest'.
    resample_label: False keeps the label on the input's grid (scoring at the original
      resolution); the image is resampled all the same.

  Returns:
    `{'image': float32 [X, Y, Z, C], 'label': int32 (if labelled), 'shape': the image's spatial
    shape [3], 'affine': float64 [4, 4] of the stored grid, 'case_id', 'file',
    'geometry': resample.Geometry}`.
  """
  volume = io.read_nifti(image_path)
  image = io.image_to_float(volume.array, image_path, SPATIAL_RANK)
  prepare.check_channels(image_path, image, in_channels)
  original_shape = image.shape[:SPATIAL_RANK]
  spacing = spacing_of(volume)
  image = prepare.normalize(image, normalization, clip_percentiles, ct_stats)
  geometry = resample.identity_geometry(original_shape, spacing, volume.affine)
  if target_spacing is not None and len(target_spacing):
    if len(target_spacing) != SPATIAL_RANK:
      raise ValueError(f'target_spacing {tuple(target_spacing)}: need {SPATIAL_RANK} values')
    shape = resample.target_shape(original_shape, spacing, target_spacing)
    geometry = resample.Geometry(original_shape, spacing, volume.affine, shape,
                                 resample.coarse_axis(spacing, target_spacing))
    image = resample.resample_image(image, shape, geometry.coarse_axis)
  example = {
      'image': image,
      'shape': np.array(geometry.shape, np.int32),
      'affine': resample.resampled_affine(volume.affine, original_shape, geometry.shape),
      'case_id': io.case_id(image_path),
      'file': os.path.basename(image_path),
      'geometry': geometry,
  }
  if label_path is not None:
    label_vol = io.read_nifti(label_path)
    label_raw = label_vol.array
    if label_raw.ndim == SPATIAL_RANK + 1 and label_raw.shape[-1] == 1:
      label_raw = label_raw[..., 0]
    io.check_pair(image_path, label_path, original_shape, label_raw.shape,
                  volume.affine, label_vol.affine)
    label = io.label_to_classes(label_raw, label_path, num_classes, label_map)
    if resample_label:
      label = resample.resample_labels(label, geometry.shape, geometry.coarse_axis,
                                       method=label_resampling, num_classes=num_classes)
    example['label'] = label
  return example


def find_cases(path: str, *, num_classes: int | None = None,
               in_channels: int | None = None,
               label_map: io.LabelMap | None = None) -> list[tuple[str, str, str]]:
  """(case_id, image_path, label_path) for every labelled case, sorted by id.

  Raises:
    io.DataError: missing/empty imagesTr, an image without label (or the reverse), or a
      `dataset.json` that is unreadable, malformed, or disagrees with `num_classes` /
      `in_channels` (then also: labels not numbered 0..K-1 without a `label_map`).
  """
  meta = _check_dataset_json(path, num_classes, in_channels, label_map)
  images = io.list_files(os.path.join(path, 'imagesTr'), io.NIFTI_SUFFIXES)
  labels_dir = os.path.join(path, 'labelsTr')
  if not os.path.isdir(labels_dir):
    raise io.DataError(f'{labels_dir}: folder not found (labels for {len(images)} images)')
  labels = {io.case_id(f): f for f in os.listdir(labels_dir)
            if not f.startswith('.') and f.lower().endswith(io.NIFTI_SUFFIXES)}
  cases = []
  for image_path in images:
    cid = io.case_id(image_path)
    if cid not in labels:
      raise io.DataError(f'{image_path}: missing label {os.path.join(labels_dir, cid)}.nii.gz')
    cases.append((cid, image_path, os.path.join(labels_dir, labels.pop(cid))))
  if labels:
    orphan = sorted(labels.values())[0]
    raise io.DataError(f'{os.path.join(labels_dir, orphan)}: label without an image in '
                       f'{os.path.join(path, "imagesTr")} ({len(labels)} such labels)')
  ids = [c[0] for c in cases]
  if len(set(ids)) != len(ids):
    raise io.DataError(f'{path}/imagesTr: duplicate case ids (.nii and .nii.gz of one case?)')
  _warn_listed_but_missing(path, meta, len(cases))
  return cases


_WARNED: set[str] = set()  # folders already warned about, once per process


def _warn_listed_but_missing(path: str, meta: dict[str, Any] | None, found: int) -> None:
  """Warns (once per folder) when dataset.json's `training` list (`meta`, None without the file)
  names images that are not in imagesTr/: an incomplete copy trains on what is there, but the
  user should know."""
  meta_path = os.path.join(path, 'dataset.json')
  listed = meta.get('training') if isinstance(meta, dict) else None
  if meta_path in _WARNED or not isinstance(listed, list):
    return
  images = [e.get('image') for e in listed if isinstance(e, dict) and e.get('image')]
  missing = [i for i in images if not os.path.exists(os.path.join(path, i))]
  if missing:
    _WARNED.add(meta_path)
    logging.warning('%s lists %d training images, %d of them not found (e.g. %s); using the %d '
                    'cases in imagesTr/', meta_path, len(images), len(missing),
                    os.path.normpath(os.path.join(path, missing[0])), found)


def read_dataset_json(path: str) -> dict[str, Any] | None:
  """`path`'s dataset.json as a dict, None without one."""
  meta_path = os.path.join(path, 'dataset.json')
  if not os.path.exists(meta_path):
    return None
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise io.DataError(f'{meta_path}: cannot read dataset.json ({e})') from e
  if not isinstance(meta, dict):
    raise io.DataError(f'{meta_path}: not a JSON object')
  return meta


def listed_label_values(meta_path: str, labels: Mapping[str, Any]) -> list[int]:
  """dataset.json's label values (its `labels` keys), sorted."""
  try:
    return sorted(int(k) for k in labels)
  except (TypeError, ValueError):
    raise io.DataError(f'{meta_path}: "labels" keys {list(labels)} are not integers (the label '
                       'values in the files, e.g. {"0": "background", "1": "tumour"})') from None


def modalities(meta_path: str, meta: Mapping[str, Any]) -> list[str] | None:
  """Channel names in channel order from dataset.json's `modality` (MSD) or `channel_names`
  (nnU-Net v2); None when it has neither."""
  key = 'modality' if 'modality' in meta else 'channel_names'
  names = meta.get(key)
  if names is None:
    return None
  if not isinstance(names, Mapping):
    raise io.DataError(f'{meta_path}: "{key}" must map channel indices to names, e.g. '
                       f'{{"0": "CT"}}; got {names!r}')
  try:
    return [str(names[k]) for k in sorted(names, key=int)]
  except (TypeError, ValueError):
    raise io.DataError(f'{meta_path}: "{key}" keys {list(names)} are not channel indices '
                       '0, 1, ...') from None


def _check_dataset_json(path: str, num_classes: int | None, in_channels: int | None,
                        label_map: io.LabelMap | None = None) -> dict[str, Any] | None:
  """`path`'s dataset.json (None without one), checked against `num_classes` / `in_channels`;
  with `num_classes` (training's preparation) its labels must be the class ids 0..K-1, or
  `label_map` must map the files' values."""
  meta = read_dataset_json(path)
  if meta is None:
    return None
  meta_path = os.path.join(path, 'dataset.json')
  labels = meta.get('labels')
  if num_classes and isinstance(labels, dict):
    if len(labels) != num_classes:
      raise io.DataError(f'{meta_path}: lists {len(labels)} labels {labels}, but '
                         f'data.num_classes is {num_classes}')
    values = listed_label_values(meta_path, labels)
    if not label_map and values != list(range(len(values))):
      raise io.DataError(
          f'{meta_path}: labels {values} are not the class ids 0..{len(values) - 1}: renumber '
          'the label files, or map them with --config.data.label_map='
          + ','.join(f'{v}:{c}' for c, v in enumerate(values)))
  names = modalities(meta_path, meta)
  if in_channels and names is not None and len(names) != in_channels:
    raise io.DataError(f'{meta_path}: lists {len(names)} modalities {names}, but '
                       f'data.in_channels is {in_channels}')
  return meta


def settings_from_config(data_cfg: Any) -> dict[str, Any]:
  """Every setting that changes the prepared data, with defaults, from `config.data`."""
  return prepare.common_settings(data_cfg, 'the MSD task folder (holding imagesTr/)')


class MsdFolder(prepare.LocalBuilder):
  """An MSD-style task folder; build with `config=make_config(settings)`."""

  name = 'unet_ds_msd'
  VERSION = tfds.core.Version(_VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='MSD-style NIfTI folder prepared by unet_ds.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(None,) * (SPATIAL_RANK + 1), dtype=np.float32,
                                          encoding='zlib'),
            'label': tfds.features.Tensor(shape=(None,) * SPATIAL_RANK, dtype=np.uint8,
                                          encoding='zlib'),
            'shape': tfds.features.Tensor(shape=(SPATIAL_RANK,), dtype=np.int32),
            'affine': tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
            'case_id': tfds.features.Text(),
            'file': tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # data is local
    s = self.builder_config.settings
    cases = find_cases(s['path'], num_classes=s['num_classes'], in_channels=s['in_channels'],
                       label_map=s['label_map'])
    splits = prepare.split_case_list(cases, s)
    self._channels = [s['in_channels'] or None]  # every case must match the first one read
    return {name: self._generate_examples(cases) for name, cases in splits.items()}

  def _generate_examples(self, cases):
    return prepare.generate(cases, read_case, self.builder_config.settings, self._channels)


def make_config(settings: dict[str, Any]) -> prepare.FolderConfig:
  """Config named by the folder and a hash of settings + file listing."""
  files = [f for c in find_cases(settings['path']) for f in c[1:]]
  return prepare.make_config(settings, files, _VERSION)


def load(data_cfg: Any) -> dict[str, prepare.CaseSource]:
  """Prepares the folder at `data_cfg.path` (once) and returns `{'train', 'validation'}` sources.

  `data_cfg` keys: path, num_classes (required); in_channels, normalization ('zscore' | 'minmax' |
  'none' | 'ct', or one per channel 'ct,zscore'), ct_stats (per channel (low, high, mean, std)),
  target_spacing (mm per axis; () keeps each case's grid), label_resampling ('linear' |
  'nearest'), clip_percentiles ((low, high) or ()), label_map ('value:class,...'), val_fraction,
  val_cases ('id,id' or list), seed (split seed), num_folds, fold, data_dir (where prepared data
  goes).
  """
  settings = settings_from_config(data_cfg)
  # Every launch, not only when the data is prepared: a dataset.json edited since (its cached
  # preparation is reused) is checked against the config too.
  _check_dataset_json(settings['path'], settings['num_classes'], settings['in_channels'],
                      dict(settings['label_map']) or None)
  return prepare.prepare_and_load(MsdFolder, make_config(settings),
                                  prepare.cfg_get(data_cfg, 'data_dir'))
