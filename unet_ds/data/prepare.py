"""Shared plumbing for the user-folder TFDS builders (`msd`, `folder2d`).

A prepared dataset's config name is a readable prefix plus a hash of every generation setting and of
the source files' names, sizes and mtimes, so two settings (another fold, another normalisation, an
edited file) never share a prepared copy, and the same settings reuse it. The sources' identity, which
a checkpointed data iterator is checked against on resume, leaves out the folder's location and
the mtimes: a run resumes on a copy of its data (a cluster job staging data to local scratch).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import fcntl
import hashlib
import json
import os
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from unet_ds.data import io
from unet_ds.data import resample
from unet_ds.data import split as split_lib



def default_data_dir() -> str:
  """Where prepared data (synthetic and user folders) goes when `data.data_dir` is unset:
  $UNET_DS_DATA_DIR, else ~/.cache/unet_ds/tfds."""
  return os.environ.get('UNET_DS_DATA_DIR') or os.path.expanduser('~/.cache/unet_ds/tfds')


@dataclasses.dataclass(eq=False, repr=False)
class FolderConfig(tfds.core.BuilderConfig):
  """BuilderConfig carrying the generation settings (JSON-able dict) of a user folder."""
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  content_id: str = ''  # settings (but the path) + files' relative names and sizes

  def __repr__(self) -> str:  # tfds logs it; the settings are in `description`
    return f'FolderConfig({self.name})'


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  """`cfg.key` for a ConfigDict/dict/object, `default` when absent or None."""
  if isinstance(cfg, Mapping) or hasattr(cfg, 'get'):
    value = cfg.get(key, default)
  else:
    value = getattr(cfg, key, default)
  return default if value is None else value


def jsonable(value: Any) -> Any:
  """Settings -> plain JSON types (tuples -> lists, numpy scalars -> python)."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def files_fingerprint(files: Sequence[str]) -> list[Any]:
  """(name, size, mtime) per file: a changed or replaced file changes the config hash."""
  out = []
  for f in sorted(files):
    st = os.stat(f)
    out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
  return out


def make_config(settings: Mapping[str, Any], files: Sequence[str], version: str) -> FolderConfig:
  """A FolderConfig named `<last two folders of path>_<hash of settings + files>`."""
  settings = jsonable(settings)
  prefix = '_'.join(os.path.normpath(settings['path']).split(os.sep)[-2:])
  fingerprint = files_fingerprint(files)
  blob = json.dumps({'settings': settings, 'files': fingerprint}, sort_keys=True)
  digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
  slug = re.sub(r'[^a-z0-9]+', '_', prefix.lower()).strip('_')[-48:].strip('_') or 'data'
  content = json.dumps({'settings': {k: v for k, v in settings.items() if k != 'path'},
                        'files': [[os.path.relpath(f, settings['path']), size]
                                  for f, size, _ in fingerprint]}, sort_keys=True)
  return FolderConfig(name=f'{slug}_{digest}', version=version,
                      description=json.dumps(settings, sort_keys=True), settings=dict(settings),
                      content_id=hashlib.sha256(content.encode()).hexdigest()[:16])


class CaseSource:
  """Random-access source over a prepared split: decodes ids to str, labels to int32.

  Elements: `{'image': float32 [*spatial, C], 'label': int32 [*spatial], 'shape': int32 [rank],
  'case_id': str, 'file': str}` plus `'affine': float64 [4, 4]` for NIfTI data.
  """

  def __init__(self, source: Any, name: str):
    self._source = source
    self._name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return _decode(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [_decode(r) for r in self._source.__getitems__(indices)]

  def __repr__(self) -> str:
    # Stable across processes: grain compares it when restoring an iterator state.
    return f'CaseSource({self._name})'


def _decode(record: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(record)
  out['label'] = np.asarray(record['label']).astype(np.int32)
  for key in ('case_id', 'file'):
    if isinstance(out.get(key), bytes):
      out[key] = out[key].decode()
  return out


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS builder of data generated here (files or synthetic): it says so in its own words.

  tfds's own lines ("Downloading and preparing dataset Unknown size ...") are about downloads,
  which these builders never do.
  """

  def _log_download_bytes(self) -> None:
    print(f'preparing {self.name}/{self.builder_config.name} under {self.data_dir} (once; '
          'later runs reuse it)', flush=True)

  def _log_download_done(self) -> None:
    """Says nothing: the line above already named the folder (tfds would add 'downloaded')."""


def build_once(builder_cls: type[tfds.core.GeneratorBasedBuilder], config: tfds.core.BuilderConfig,
               data_dir: str | None) -> tfds.core.GeneratorBasedBuilder:
  """The builder of `config` under `data_dir`, prepared on first use (array_record).

  Several processes may start at once: one prepares under a file lock, the others wait for it
  and then reuse what it wrote.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
  os.makedirs(data_dir, exist_ok=True)
  make = lambda: builder_cls(config=config, data_dir=data_dir, file_format='array_record')  # noqa
  builder = make()
  if not os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
    with open(os.path.join(data_dir, f'.{builder.name}.{config.name}.lock'), 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder = make()
      try:
        builder.download_and_prepare(file_format='array_record')
      except BaseException:  # bad data: leave no empty folders behind under the data dir
        _remove_empty_dirs(builder.data_dir, stop=data_dir)
        raise
  return builder


def _remove_empty_dirs(path: str, stop: str) -> None:
  """Removes `path` and its parents up to (not including) `stop`, while they are empty."""
  path, stop = os.path.abspath(path), os.path.abspath(stop)
  while path.startswith(stop + os.sep):
    if os.path.isdir(path):
      if os.listdir(path):
        return
      os.rmdir(path)
    path = os.path.dirname(path)


def prepare_and_load(builder_cls: type[tfds.core.GeneratorBasedBuilder], config: FolderConfig,
                     data_dir: str | None) -> dict[str, CaseSource]:
  """Prepares (once per config) and returns `{split: CaseSource}` for the non-empty splits."""
  builder = build_once(builder_cls, config, data_dir)
  sources = builder.as_data_source()
  # Named by content, not location: a checkpointed iterator resumes on a copy of the data.
  return {str(split): CaseSource(src, f'{builder.name}/{config.content_id}/{split}')
          for split, src in sources.items()}


def label_storage_dtype(num_classes: int, where: str) -> type:
  """Labels are stored as uint8: up to 256 classes."""
  if not 1 <= num_classes <= 256:
    raise ValueError(f'{where}: num_classes={num_classes}, need 1..256')
  return np.uint8


NORMALIZATIONS = io.NORMALIZATIONS + ('ct',)


def normalization_methods(normalization: str, channels: int | None = None) -> list[str]:
  """`'zscore'` or per channel `'ct,zscore'` -> one method per channel (checked)."""
  methods = [m.strip() for m in str(normalization).split(',')]
  bad = [m for m in methods if m not in NORMALIZATIONS]
  if bad:
    raise ValueError(f'config.data.normalization={normalization!r}: {bad[0]!r} is not one of '
                     f'{NORMALIZATIONS} (one method, or one per channel, comma-separated)')
  if channels is not None and len(methods) not in (1, channels):
    raise ValueError(f'config.data.normalization={normalization!r}: {len(methods)} methods for '
                     f'{channels} channels')
  return methods * channels if channels is not None and len(methods) == 1 else methods


def normalize(image: np.ndarray, normalization: str = 'zscore',
              clip_percentiles: Sequence[float] | None = None,
              ct_stats: Sequence[Sequence[float]] | None = None) -> np.ndarray:
  """Per-channel normalisation of a float `[*spatial, C]` image.

  One method for every channel, or one per channel (`'ct,zscore'`). 'ct' uses dataset-wide
  statistics, as nnU-Net does for CT: clip to the foreground's (low, high) percentiles, then
  subtract the foreground mean and divide by its std; `ct_stats[c]` is `(low, high, mean, std)`
  (from the dataset fingerprint, `unet_ds.plan`). Other methods are per image (`io.normalize`).
  """
  methods = normalization_methods(normalization, image.shape[-1])
  if 'ct' not in methods and len(set(methods)) == 1:
    return io.normalize(image, methods[0], clip_percentiles)
  out = np.empty(image.shape, np.float32)
  for c, method in enumerate(methods):
    channel = image[..., c:c + 1]
    if method != 'ct':
      out[..., c:c + 1] = io.normalize(channel, method, clip_percentiles)
      continue
    if not ct_stats or len(ct_stats) <= c or len(ct_stats[c]) != 4:
      raise ValueError(f'config.data.ct_stats={ct_stats!r}: normalization \'ct\' needs '
                       f'(low, high, mean, std) for channel {c} (run unet_ds.plan)')
    low, high, mean, std = (float(v) for v in ct_stats[c])
    out[..., c:c + 1] = (np.clip(channel, low, high) - mean) / max(std, 1e-8)
  return out


def check_channels(path: str, image: np.ndarray, expected: int | None) -> int:
  """Channel count of `image` ([..., C]) must equal `expected` (when known); returns it."""
  channels = image.shape[-1]
  if expected and channels != expected:
    raise io.DataError(f'{path}: image has {channels} channels, expected {expected} '
                       '(data.in_channels or the other cases)')
  return channels


def common_settings(data_cfg: Any, what: str) -> dict[str, Any]:
  """Generation settings shared by the folder builders, with defaults, from `config.data`.

  Args:
    data_cfg: `config.data` (ConfigDict or dict).
    what: what `path` should point at, for the error message.
  """
  path = cfg_get(data_cfg, 'path')
  if not path:
    raise ValueError(f'config.data.path: set it to {what}, with the config file\'s path=DIR '
                     'argument (--config=configs/FILE.py:path=DIR) or --config.data.path=DIR')
  num_classes = cfg_get(data_cfg, 'num_classes')
  if not num_classes:
    raise ValueError('config.data.num_classes: required (background included)')
  label_storage_dtype(int(num_classes), 'config.data.num_classes')
  label_map = io.parse_label_map(cfg_get(data_cfg, 'label_map'))
  normalization_methods(cfg_get(data_cfg, 'normalization', 'zscore'))
  return {
      'path': os.path.abspath(os.path.expanduser(path)),
      'num_classes': int(num_classes),
      'in_channels': int(cfg_get(data_cfg, 'in_channels', 0)),
      'normalization': cfg_get(data_cfg, 'normalization', 'zscore'),
      'clip_percentiles': list(cfg_get(data_cfg, 'clip_percentiles', ())),
      'label_map': sorted(label_map.items()) if label_map else [],
      'val_fraction': float(cfg_get(data_cfg, 'val_fraction', 0.2)),
      'val_cases': list(split_lib.parse_case_list(cfg_get(data_cfg, 'val_cases'))),
      'split_seed': int(cfg_get(data_cfg, 'seed', 0)),  # config.data.seed: the split seed
      'num_folds': int(cfg_get(data_cfg, 'num_folds', 0)),
      'fold': int(cfg_get(data_cfg, 'fold', 0)),
      **planned_settings(data_cfg),
  }


def planned_settings(data_cfg: Any) -> dict[str, Any]:
  """The settings a plan adds (`unet_ds.plan`), present only when set, so that data prepared
  without a plan keeps its name."""
  out = {}
  spacing = [float(s) for s in cfg_get(data_cfg, 'target_spacing', ())]
  if spacing:
    if min(spacing) <= 0:
      raise ValueError(f'config.data.target_spacing={tuple(spacing)}: spacings must be > 0')
    out['target_spacing'] = spacing
  ct_stats = [[float(v) for v in row] for row in cfg_get(data_cfg, 'ct_stats', ())]
  if ct_stats:
    if any(len(row) != 4 for row in ct_stats):
      raise ValueError(f'config.data.ct_stats={ct_stats}: need (low, high, mean, std) per channel')
    out['ct_stats'] = ct_stats
  label_resampling = cfg_get(data_cfg, 'label_resampling', 'linear')
  if label_resampling not in resample.LABEL_METHODS:
    raise ValueError(f'config.data.label_resampling={label_resampling!r}: expected one of '
                     f'{resample.LABEL_METHODS}')
  if label_resampling != 'linear':
    out['label_resampling'] = label_resampling
  return out


def read_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
  """`read_case` keyword arguments from settings (shared by the builders and predict/eval)."""
  return {
      'num_classes': settings['num_classes'],
      'normalization': settings['normalization'],
      'clip_percentiles': settings['clip_percentiles'] or None,
      'label_map': dict(settings['label_map']) or None,
      'in_channels': settings['in_channels'] or None,
      **{k: settings[k] for k in ('target_spacing', 'ct_stats', 'label_resampling')
         if k in settings},
  }


def split_case_list(cases: Sequence[tuple[str, ...]], settings: Mapping[str, Any]
                    ) -> dict[str, list[tuple[str, ...]]]:
  """`{'train': cases, 'validation': cases}` (validation only when non-empty) by case id."""
  train_ids, val_ids = split_lib.split_cases(
      [c[0] for c in cases], val_fraction=settings['val_fraction'], seed=settings['split_seed'],
      val_cases=settings['val_cases'], num_folds=settings['num_folds'], fold=settings['fold'])
  by_id = {c[0]: c for c in cases}
  splits = {'train': [by_id[i] for i in train_ids]}
  if val_ids:
    splits['validation'] = [by_id[i] for i in val_ids]
  return splits


def generate(cases: Sequence[tuple[str, str, str]], read_case: Any,
             settings: Mapping[str, Any], channels: list[int | None]):
  """Yields `(case_id, example)` for TFDS; `channels` ([C or None]) is shared across splits."""
  kwargs = read_kwargs(settings)
  for cid, image_path, label_path in cases:
    example = read_case(image_path, label_path, **{**kwargs, 'in_channels': channels[0]})
    channels[0] = example['image'].shape[-1]
    example.pop('geometry', None)  # for prediction only; not a stored feature
    example['label'] = example['label'].astype(np.uint8)
    yield cid, example
