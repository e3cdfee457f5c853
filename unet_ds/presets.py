"""What the seed-system presets (`configs/tgs_salt.py`, `brats18.py`, `dsn3d.py`) share.

A preset runs on the built-in synthetic data by default (no download) and on a user's folder with
`path=DIR`: 2D image/mask folders (`folder2d`) or 3D MSD-style NIfTI task folders (`msd`). The
preset's own settings are applied first and the config-file arguments last, so `smoke` and the
common arguments (`classes=`, `channels=`, `fold=`, `ds=`, `seed=`) shrink or override them.

  c = presets.build(arg, ndim=2, settings=_tgs_settings, extra={'isbi': _isbi})
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import ml_collections

from unet_ds import config_lib

Handler = Callable[[ml_collections.ConfigDict, Any], None]


def _set_patch(c: ml_collections.ConfigDict, value: str) -> None:
  """`patch=40x56x40`: the training patch (and synthetic size), and the in-training eval crop
  unless that was set apart from the patch (e.g. whole 512x512 slices by `isbi`)."""
  try:
    size = tuple(int(v) for v in str(value).split('x'))
  except ValueError:
    raise ValueError(f'config argument patch={value!r}: expected sizes like 40x56x40') from None
  if len(size) != c.data.ndim:
    raise ValueError(f'config argument patch={value!r}: {len(size)} sizes for ndim={c.data.ndim}')
  c.data.shape = size
  if 'patch_size' in c.data:
    if tuple(c.data.eval_shape or ()) in ((), tuple(c.data.patch_size)):
      c.data.eval_shape = size
    c.data.patch_size = size


# Arguments every preset takes, with synthetic or real data.
PRESET_ARGS: dict[str, Handler] = {
    'patch': _set_patch,
    'steps': lambda c, v: setattr(c.train, 'steps', int(v)),
}
_SYNTHETIC_ARGS: dict[str, Handler] = {
    'classes': lambda c, v: setattr(c.data, 'num_classes', int(v)),
    'channels': lambda c, v: setattr(c.data, 'in_channels', int(v)),
}


def uses_real_data(arg: str | None) -> bool:
  """Whether the config argument names a data folder (`path=DIR`)."""
  return bool(config_lib.parse_arg(arg).get('path'))


def build(arg: str | None, *, ndim: int,
          settings: Callable[[ml_collections.ConfigDict, bool], None],
          extra: Mapping[str, Handler] | None = None) -> ml_collections.ConfigDict:
  """The preset's config: base fields, then `settings(c, real)`, then the config arguments.

  `real` is True with `path=DIR`: the data are the folder (`folder2d` in 2D, `msd` in 3D) with
  the real-data defaults (normalisation, split, patches, `inference` group) of `config_lib`.
  """
  real = uses_real_data(arg)
  if real:
    c = config_lib.real_data_config(ndim, 'folder2d' if ndim == 2 else 'msd')
    if ndim == 2:
      c.data.image_dir, c.data.label_dir = 'image', 'label'
    handlers = dict(config_lib.REAL_DATA_ARGS)
  else:
    c = config_lib.base_config(ndim)
    handlers = dict(_SYNTHETIC_ARGS)
  if 'eval' not in c:
    c.eval = ml_collections.ConfigDict()
    c.eval.regions = ''  # e.g. 'whole_tumour=1,2,3;tumour_core=1,3' (metrics.parse_regions)
  settings(c, real)
  return config_lib.apply_args(c, arg, extra={**handlers, **PRESET_ARGS, **(extra or {})})


def flag(value: Any) -> bool:
  """A preset's boolean argument: bare `flag`, `flag=true/1/yes` or `flag=false/0/no`."""
  if isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text in ('1', 'true', 'yes', 'on'):
    return True
  if text in ('0', 'false', 'no', 'off'):
    return False
  raise ValueError(f'config argument value {value!r}: expected true/false')
