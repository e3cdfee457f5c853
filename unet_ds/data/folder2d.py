"""2D image/mask folders (PNG or TIFF) as a TFDS dataset (array_record, no TF).

Layout: `PATH/image/<name>.png` + `PATH/label/<name>.png` (folder names configurable), paired by
file name without suffix. Label pixel values map to classes through `data.label_map`, e.g. ISBI EM
membranes store 0 = membrane, 255 = cell, so `label_map='0:1,255:0'` makes membrane class 1.
Images are stored normalised at their own size, with their file name for writing back.

  sources = folder2d.load(config.data)  # {'train': CaseSource, 'validation': CaseSource}
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from unet_ds.data import io
from unet_ds.data import prepare

SPATIAL_RANK = 2
_VERSION = '1.1.0'  # 1.1.0: palette images read as their gray/RGB values, not indices


def read_label2d(path: str) -> np.ndarray:
  """A mask file as `[H, W]`; grey masks saved as RGB(A) are reduced to one channel."""
  raw = io.read_image2d(path, kind='label')
  if raw.ndim == 3:
    if not all(np.array_equal(raw[..., 0], raw[..., c]) for c in range(1, min(raw.shape[-1], 3))):
      raise io.DataError(f'{path}: label is a colour image (channels differ); save masks as '
                         'single-channel class or value maps')
    raw = raw[..., 0]
  return raw


def read_case(image_path: str, label_path: str | None, *, num_classes: int,
              normalization: str = 'zscore', clip_percentiles=None,
              label_map: io.LabelMap | None = None, in_channels: int | None = None,
              ct_stats=None) -> dict[str, Any]:
  """Reads, checks and normalises one image (+ optional mask); see `prepare.normalize`.

  Returns:
    `{'image': float32 [H, W, C], 'label': int32 [H, W] (if labelled), 'shape', 'case_id',
    'file'}`.
  """
  image = io.image_to_float(io.read_image2d(image_path), image_path, SPATIAL_RANK)
  prepare.check_channels(image_path, image, in_channels)
  example = {
      'image': prepare.normalize(image, normalization, clip_percentiles, ct_stats),
      'shape': np.array(image.shape[:SPATIAL_RANK], np.int32),
      'case_id': io.case_id(image_path),
      'file': os.path.basename(image_path),
  }
  if label_path is not None:
    label_raw = read_label2d(label_path)
    io.check_pair(image_path, label_path, image.shape[:SPATIAL_RANK], label_raw.shape)
    example['label'] = io.label_to_classes(label_raw, label_path, num_classes, label_map)
  return example


def find_cases(path: str, image_dir: str = 'image',
               label_dir: str = 'label') -> list[tuple[str, str, str]]:
  """(case_id, image_path, label_path) per image, sorted by id.

  Raises:
    io.DataError: a missing/empty folder, an image without mask or a mask without image.
  """
  images = io.list_files(os.path.join(path, image_dir), io.IMAGE2D_SUFFIXES)
  labels_path = os.path.join(path, label_dir)
  if not os.path.isdir(labels_path):
    raise io.DataError(f'{labels_path}: folder not found (masks for {len(images)} images)')
  labels = {}
  for f in sorted(os.listdir(labels_path)):
    if not f.startswith('.') and f.lower().endswith(io.IMAGE2D_SUFFIXES):
      labels.setdefault(io.case_id(f), f)
  cases = []
  for image_path in images:
    cid = io.case_id(image_path)
    if cid not in labels:
      raise io.DataError(f'{image_path}: missing label {os.path.join(labels_path, cid)}.png '
                         '(or .tif)')
    cases.append((cid, image_path, os.path.join(labels_path, labels.pop(cid))))
  if labels:
    orphan = sorted(labels.values())[0]
    raise io.DataError(f'{os.path.join(labels_path, orphan)}: mask without an image in '
                       f'{os.path.join(path, image_dir)} ({len(labels)} such masks)')
  if len({c[0] for c in cases}) != len(cases):
    raise io.DataError(f'{path}/{image_dir}: duplicate names (e.g. a.png and a.tif)')
  return cases


def settings_from_config(data_cfg: Any) -> dict[str, Any]:
  """Every setting that changes the prepared data, with defaults, from `config.data`."""
  if prepare.cfg_get(data_cfg, 'target_spacing'):
    raise ValueError('config.data.target_spacing: 2D image folders keep their pixel grid (PNG/TIFF '
                     'hold no spacing); leave it empty')
  return {**prepare.common_settings(data_cfg, 'the folder holding image/ and label/'),
          'image_dir': prepare.cfg_get(data_cfg, 'image_dir', 'image'),
          'label_dir': prepare.cfg_get(data_cfg, 'label_dir', 'label')}


class Folder2d(prepare.LocalBuilder):
  """A folder of 2D image/mask pairs; build with `config=make_config(settings)`."""

  name = 'unet_ds_folder2d'
  VERSION = tfds.core.Version(_VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='2D image/mask folder prepared by unet_ds.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(None,) * (SPATIAL_RANK + 1), dtype=np.float32,
                                          encoding='zlib'),
            'label': tfds.features.Tensor(shape=(None,) * SPATIAL_RANK, dtype=np.uint8,
                                          encoding='zlib'),
            'shape': tfds.features.Tensor(shape=(SPATIAL_RANK,), dtype=np.int32),
            'case_id': tfds.features.Text(),
            'file': tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # data is local
    s = self.builder_config.settings
    splits = prepare.split_case_list(find_cases(s['path'], s['image_dir'], s['label_dir']), s)
    self._channels = [s['in_channels'] or None]  # every case must match the first one read
    return {name: self._generate_examples(cases) for name, cases in splits.items()}

  def _generate_examples(self, cases):
    return prepare.generate(cases, read_case, self.builder_config.settings, self._channels)


def make_config(settings: dict[str, Any]) -> prepare.FolderConfig:
  """Config named by the folder and a hash of settings + file listing."""
  cases = find_cases(settings['path'], settings['image_dir'], settings['label_dir'])
  files = [f for c in cases for f in c[1:]]
  return prepare.make_config(settings, files, _VERSION)


def load(data_cfg: Any) -> dict[str, prepare.CaseSource]:
  """Prepares the folder at `data_cfg.path` (once) and returns `{'train', 'validation'}` sources.

  `data_cfg` keys: path, num_classes (required); image_dir ('image'), label_dir ('label'),
  in_channels, normalization, clip_percentiles, label_map ('value:class,...'), val_fraction,
  val_cases, seed (split seed), num_folds, fold, data_dir (where prepared data goes).
  """
  settings = settings_from_config(data_cfg)
  return prepare.prepare_and_load(Folder2d, make_config(settings),
                                  prepare.cfg_get(data_cfg, 'data_dir'))
