"""DS U-Net planned from the data itself, as nnU-Net plans (`unet_ds.plan`): target spacing and
resampling, per-channel normalisation (CT: dataset foreground statistics), patch size, depth and
batch size, for an MSD-style 3D folder (imagesTr/ + labelsTr/) or a 2D folder (image/ + label/).

  python -m unet_ds.main --config=configs/auto.py:path=/data/Task04_Hippocampus --workdir=runs/auto
  python -m unet_ds.main --config=configs/auto.py:path=/data/isbi/train,label_map=0:1;255:0 \
      --config.data.val_cases=25,26,27,28,29 --workdir=runs/em_auto
  python -m unet_ds.plan --input=/data/Task04_Hippocampus   # the plan alone, as JSON

Anisotropic data gets per-axis pooling (`model.strides`: the coarse axis is pooled only once the
others have caught up in spacing), conv kernels of size 1 along that axis at the levels where it is
still over 2x coarser (`model.kernel_sizes`), and a patch that is not padded along that axis.
Training adds nnU-Net's spatial augmentation as planned (`data.aug_*`: rotations and scalings,
in-plane only for patches thin along a coarse axis).

The plan is computed when the config is built (the fingerprint once per dataset, cached beside the
prepared data) and recorded in the run's config.json: the planned fields of `data`, `model` and
`train`, plus the whole plan under `config.plan`. Explicit `--config.*` flags are applied after
and win (`--config.data.patch_size=...`, `--config.train.batch_size=...`).

Args: path=DIR (needed to plan), label_map=V:C;V:C (label values -> classes, ';'-separated),
image_dir=NAME, label_dir=NAME (a 2D folder's subfolders; default image/ and label/),
data_dir=DIR (prepared data and the plan cache), fold=N (of 5), classes=K, channels=C, ds=MODE,
seed=N, smoke.
"""

from typing import Any

import ml_collections

from unet_ds import config_lib
from unet_ds import plan as plan_lib

STEPS = {2: 800, 3: 600}  # as configs/folder2d.py and configs/msd.py: a few minutes on 2 cores


def config_from_plan(plan: dict[str, Any]) -> ml_collections.ConfigDict:
  """The run config for a plan (`plan_lib.plan_for`)."""
  ndim = int(plan['ndim'])
  c = config_lib.real_data_config(ndim=ndim, name=plan['kind'])  # + split, inference defaults
  c.data.path = plan['path']
  c.data.num_classes = int(plan['num_classes'])
  c.data.in_channels = int(plan['in_channels'])
  c.data.label_map = ','.join(f'{v}:{k}' for v, k in plan['label_map'])
  methods = list(plan['normalization'])
  c.data.normalization = methods[0] if len(set(methods)) == 1 else ','.join(methods)
  c.data.ct_stats = tuple(tuple(row) for row in plan['ct_stats'])
  c.data.target_spacing = tuple(plan['target_spacing'])
  c.data.label_resampling = 'linear'
  if plan['kind'] == 'folder2d':
    c.data.image_dir, c.data.label_dir = 'image', 'label'
  patch = tuple(int(p) for p in plan['patch_size'])
  depth = int(plan['depth'])
  strides = tuple(tuple(int(v) for v in level) for level in plan['strides'])
  if any(f != 2 for level in strides for f in level):  # anisotropic: the coarse axis waits
    c.model.strides = strides
  # Plans from before kernel sizes were planned have none: 3 everywhere, as they trained.
  kernels = tuple(tuple(int(v) for v in level) for level in plan.get('kernel_sizes', ()))
  if any(k != 3 for level in kernels for k in level):  # 1 across still-thick slices
    c.model.kernel_sizes = kernels
  aug = plan.get('augmentation')  # plans from before augmentation was planned have none
  if aug:
    c.data.aug_rotate_p, c.data.aug_scale_p = float(aug['p_rotate']), float(aug['p_scale'])
    c.data.aug_rotate_degrees = float(aug['degrees'])
    c.data.aug_plane = tuple(int(a) for a in aug['plane'])
    c.data.aug_scale = tuple(float(v) for v in aug['scale'])
    c.data.aug_scale_axes = tuple(int(a) for a in aug['scale_axes'])
  c.data.patch_size = c.data.shape = c.data.eval_shape = patch
  c.model.depth = depth
  c.model.base_filters = int(plan['base_filters'])
  c.train.batch_size = int(plan['batch_size'])
  c.train.steps = STEPS[ndim]
  c.train.eval_batch_size = 4 if ndim == 3 else 2
  c.train.eval_every = c.train.checkpoint_every = 200 if ndim == 3 else 100
  # nnU-Net's mirroring at inference: training flips every axis, so each flip is in-distribution.
  c.inference.tta_axes = tuple(range(ndim))
  c.plan = ml_collections.ConfigDict(_plan_record(plan))
  return c


def _plan_record(plan: dict[str, Any]) -> dict[str, Any]:
  """The plan as ConfigDict-friendly values (None -> -1 / ''; lists -> tuples)."""
  def convert(value):
    if isinstance(value, dict):
      return {k: convert(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return tuple(convert(v) for v in value)
    return value
  record = convert(plan)
  record['anisotropic_axis'] = -1 if plan['anisotropic_axis'] is None else plan['anisotropic_axis']
  return record


def _label_map_arg(value: str) -> str:
  return value.replace(';', ',')


def get_config(arg=None):
  args = config_lib.parse_arg(arg)
  path = args.get('path')
  if path and path is not True:
    folders = {k: str(args[k]) for k in ('image_dir', 'label_dir') if args.get(k)}
    plan = plan_lib.plan_for(path, args.get('data_dir') or None,
                             label_map=_label_map_arg(str(args.get('label_map') or '')) or None,
                             **folders)
    c = config_from_plan(plan)
    if plan['kind'] == 'folder2d':
      c.data.update(folders)
  else:  # nothing to plan from: the 3D defaults; training asks for path=
    c = config_lib.real_data_config(ndim=3, name='msd')
    c.data.num_classes = 3
    c.data.patch_size = c.data.shape = c.data.eval_shape = (32, 32, 32)
    c.model.depth, c.model.base_filters = 4, 8
  def smoke(c, value):  # tiny model: every axis pooled
    config_lib.REAL_DATA_ARGS['smoke'](c, value)
    c.model.strides = c.model.kernel_sizes = ()

  extra = {
      **config_lib.REAL_DATA_ARGS,
      'smoke': smoke,
      'label_map': lambda c, v: setattr(c.data, 'label_map', _label_map_arg(v)),
      'data_dir': lambda c, v: setattr(c.data, 'data_dir', v),
      'image_dir': lambda c, v: None,  # planned with (above): a 2D folder's subfolders
      'label_dir': lambda c, v: None,
  }
  return config_lib.apply_args(c, arg, extra=extra)
