"""The labelled cases of a user's data folder, and a run's train/validation split of them.

Training writes the split (`WORKDIR/split.json`, `case_split`) so that a later eval scores exactly
the held-out cases of that run, even if files were added to the folder since; `find_labelled`
selects cases by that split, by explicit ids, or all of them.
"""
from __future__ import annotations

from collections.abc import Sequence
import json
import os
from typing import Any

import nibabel
import numpy as np

from unet_ds import config_lib
from unet_ds import dirnames
from unet_ds.data import folder2d
from unet_ds.data import io
from unet_ds.data import msd
from unet_ds.data import prepare

FILE_KINDS = config_lib.FILE_DATA  # data.name values backed by files on disk
SPLIT_FILE = 'split.json'
GEOMETRY_FILE = 'data_geometry.json'  # the training images' spacings and orientations (3D)
SPACING_TOLERANCE = 0.1  # relative: inputs beyond the training range by more get a warning


def data_kind(data_cfg: Any) -> str:
  """'msd' (3D NIfTI) or 'folder2d' (2D PNG/TIFF) from `config.data.name`."""
  name = prepare.cfg_get(data_cfg, 'name')
  if name not in FILE_KINDS:
    raise ValueError(f'config.data.name={name!r}: predict/eval on files supports {FILE_KINDS}')
  return name


def data_settings(data_cfg: Any) -> dict[str, Any]:
  """The data module's settings (paths, normalisation, label map, split) of `config.data`."""
  module = msd if data_kind(data_cfg) == 'msd' else folder2d
  return module.settings_from_config(data_cfg)


def _as_dict(cfg: Any) -> dict[str, Any]:
  return dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)


def _all_labelled(path: str, data_cfg: Any) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
  settings = data_settings({**_as_dict(data_cfg), 'path': path})
  if data_kind(data_cfg) == 'msd':
    return msd.find_cases(settings['path']), settings
  return folder2d.find_cases(settings['path'], settings['image_dir'], settings['label_dir']), settings


def _split_ids(found: Sequence[tuple[str, ...]], settings: dict[str, Any]
               ) -> dict[str, list[str]]:
  return {name: [c[0] for c in cases]
          for name, cases in prepare.split_case_list(found, settings).items()}


def case_split(data_cfg: Any) -> dict[str, list[str]]:
  """`{'train': [ids], 'validation': [ids]}` of the run's data path, as training prepares it."""
  return _split_ids(*_all_labelled(data_cfg.path, data_cfg))


def find_labelled(path: str, data_cfg: Any, cases: str | Sequence[str] = 'all',
                  split: dict[str, list[str]] | None = None) -> list[tuple[str, str, str]]:
  """(case_id, image, label) to evaluate: every pair under `path`, or a subset.

  Args:
    path: an MSD task folder (imagesTr/ + labelsTr/) or a 2D folder (image/ + label/).
    data_cfg: `config.data` (layout, split settings).
    cases: 'all'; 'validation' / 'train' (the run's own split of `path`); or a list of case ids
      ('id,id').
    split: the run's saved split (`case_split`); without it, 'validation' / 'train' recompute
      the split from the files now in `path`.
  """
  kind = data_kind(data_cfg)
  folders = (('imagesTr', 'labelsTr') if kind == 'msd' else
             (prepare.cfg_get(data_cfg, 'image_dir', 'image'),
              prepare.cfg_get(data_cfg, 'label_dir', 'label')))
  suffixes = io.NIFTI_SUFFIXES if kind == 'msd' else io.IMAGE2D_SUFFIXES
  if (os.path.isdir(path) and not os.path.isdir(os.path.join(path, folders[0])) and
      any(f.lower().endswith(suffixes) for f in os.listdir(path))):
    raise io.DataError(f'{path}: holds images without labels; eval needs {folders[0]}/ + '
                       f'{folders[1]}/ (--mode=predict for images alone)')
  if os.path.isdir(path) and not os.path.isdir(os.path.join(path, folders[0])):
    others = [f for f in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, f))]
    raise io.DataError(f'{path}: no {folders[0]}/ folder (it holds {others or "no folders"}); this '
                       f'run was trained on {kind} data, and eval needs {folders[0]}/ + '
                       f'{folders[1]}/')
  found, settings = _all_labelled(path, data_cfg)
  if cases == 'all':
    return found
  from_split = cases in ('train', 'validation') and split is not None
  if cases in ('train', 'validation'):
    if split is None:
      split = _split_ids(found, settings)
    if not split.get(cases):
      raise ValueError(f'{path}: the run\'s split has no {cases!r} cases')
    which, cases = cases, split[cases]
  wanted = [c.strip() for c in cases.split(',')] if isinstance(cases, str) else list(cases)
  by_id = {c[0]: c for c in found}
  missing = [c for c in wanted if c not in by_id]
  if missing and from_split:
    raise io.DataError(f'{path}: the run\'s {which} cases {missing[:10]} (its {SPLIT_FILE}) are '
                       'not in this folder (renamed or removed since training?); --cases=all or '
                       '--cases=ID,ID scores others')
  if missing:
    some = ', '.join(sorted(by_id)[:5]) + (', ...' if len(by_id) > 5 else '')
    raise io.DataError(f'{path}: cases {missing[:10]} not found; --cases takes all, train, '
                       f'validation or case ids ({some})')
  return [by_id[c] for c in wanted]


def saved_split(workdir: str) -> dict[str, list[str]] | None:
  """The split a training run wrote (`WORKDIR/split.json`), or None (older runs)."""
  path = os.path.join(workdir, SPLIT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_same_cases(data_cfg: Any, workdir: str) -> None:
  """Raises `io.DataError` if the run's data folder no longer holds the cases its `split.json`
  lists (added or removed since the run started): a resumed run's data position and split are
  for the cases it started with."""
  split = saved_split(workdir)
  names = dirnames.multirun_members(workdir) if split is None else None
  if names:  # K runs on one split: each member has it
    split = saved_split(os.path.join(workdir, names[0]))
  if split is None or data_kind(data_cfg) not in FILE_KINDS or not os.path.isdir(data_cfg.path):
    return
  now = case_split(data_cfg)
  before = {i for ids in split.values() for i in ids}
  after = {i for ids in now.values() for i in ids}
  if before == after:
    return
  added, removed = sorted(after - before), sorted(before - after)
  what = '; '.join(f'{name} {ids[:5]}{f" and {len(ids) - 5} more" if len(ids) > 5 else ""}'
                   for name, ids in (('added', added), ('removed', removed)) if ids)
  raise io.DataError(
      f'{data_cfg.path}: its cases changed since the run in {workdir} started ({what}); a '
      f'resumed run trains on the cases it started with ({os.path.join(workdir, SPLIT_FILE)}): '
      'restore the folder to resume, or train the new set in a new --workdir')


def _header_geometry(path: str) -> tuple[tuple[float, ...], str]:
  img = nibabel.load(path)  # the header only: the data stays on disk
  return (tuple(float(z) for z in img.header.get_zooms()[:3]),
          ''.join(nibabel.aff2axcodes(img.affine)))


def training_geometry(data_cfg: Any, case_ids: Sequence[str]) -> dict[str, Any]:
  """Spacing range (mm, per axis) and orientation codes of the training cases' NIfTI headers."""
  by_id = {c[0]: c for c in _all_labelled(data_cfg.path, data_cfg)[0]}
  geoms = [_header_geometry(by_id[i][1]) for i in case_ids if i in by_id]
  spacings = np.asarray([g[0] for g in geoms], np.float64)
  return {'spacing_min': spacings.min(0).tolist(), 'spacing_max': spacings.max(0).tolist(),
          'spacing_median': np.median(spacings, 0).tolist(),
          'orientations': sorted({g[1] for g in geoms})}


def geometry_mismatch(path: str, trained: dict[str, Any]) -> str | None:
  """Why the NIfTI image `path` does not look like the training data (None if it does)."""
  spacing, codes = _header_geometry(path)
  lo = np.asarray(trained['spacing_min']) * (1 - SPACING_TOLERANCE)
  hi = np.asarray(trained['spacing_max']) * (1 + SPACING_TOLERANCE)
  problems = []
  if len(spacing) == len(lo) and (np.any(np.asarray(spacing) < lo) or
                                  np.any(np.asarray(spacing) > hi)):
    problems.append(f'spacing {tuple(round(s, 3) for s in spacing)} mm is outside the training '
                    f'range {tuple(trained["spacing_min"])}..{tuple(trained["spacing_max"])}')
  if codes not in trained['orientations']:
    problems.append(f'orientation {codes} differs from the training data\'s '
                    f'{"/".join(trained["orientations"])}')
  return '; '.join(problems) or None
