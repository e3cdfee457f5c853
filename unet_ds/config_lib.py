"""Base experiment configs, config-string arguments, and validation before any compute.

Config files under `configs/` call `base_config(ndim)` and `apply_args(config, arg)`, so every
file starts from the same fields and variants are small overrides. The config-file argument is a
comma-separated list of `key=value` or bare flags: `configs/unet3d.py:ds=hypercolumn,smoke`.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from unet_ds import inference
from unet_ds import losses
from unet_ds import metrics
from unet_ds import models
from unet_ds import targets

DATASETS = ('synthetic', 'msd', 'folder2d')
OPTIMIZERS = ('adamw', 'sgd')
LR_SCHEDULES = ('constant', 'cosine', 'poly')


def base_config(ndim: int = 3) -> ml_collections.ConfigDict:
  """Every field of an experiment, with defaults for a small DS U-Net on synthetic data."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'synthetic'
  c.data.ndim = ndim
  c.data.shape = (32,) * ndim          # synthetic volume size (= training size)
  c.data.num_classes = 3
  c.data.in_channels = 1
  c.data.num_train = 64
  c.data.num_val = 16
  c.data.seed = 0                     # data generation / split seed
  c.data.data_dir = ''                # '' -> $UNET_DS_DATA_DIR or ~/.cache/unet_ds/tfds
  c.data.worker_count = 0             # grain worker processes (keep fixed across resumes)

  c.model = ml_collections.ConfigDict()
  # Output channels: data.num_classes unless set (1: one sigmoid channel for two-class data).
  # A one-way reference: setting it leaves data.num_classes (the label values) alone.
  c.model.num_classes = c.data.get_ref('num_classes').identity()
  c.model.depth = 4
  c.model.base_filters = 8
  c.model.filter_growth = 2
  c.model.max_filters = 320
  c.model.convs_per_block = 2
  c.model.residual = False
  c.model.norm = 'instance'
  c.model.activation = 'leaky_relu'
  c.model.dropout = 0.0
  c.model.down = 'maxpool'
  c.model.up = 'transpose'
  c.model.strides = ()                # per level, per-axis pooling ((2, 2, 1), ...); (): all 2
  c.model.kernel_sizes = ()           # per level, per-axis conv kernels ((3, 3, 1), ...); (): all 3
  c.model.conv_impl = 'auto'
  c.model.dtype = 'float32'
  c.model.remat = False
  c.model.ds = ml_collections.ConfigDict()
  c.model.ds.mode = 'deep'
  c.model.ds.levels = ()              # () -> every decoder level below full resolution
  c.model.ds.fusion = 'conv_norm_act'  # hypercolumn: conv_norm_act | conv_act (3x3) | conv1x1_norm_act
  c.model.ds.fusion_dropout = 0.0     # hypercolumn: dropout on the concatenated column

  c.loss = ml_collections.ConfigDict()
  c.loss.name = 'dice_ce'
  c.loss.ds_weights = 'exp'           # exp | nnunet | same | comma-separated floats '1,0.5,0.25'
  c.loss.side_losses = False          # additive/hypercolumn: also train the heads ('deep' always does)
  c.loss.ds_schedule = 'constant'     # side-weight decay: constant | linear | cosine
  c.loss.ds_decay_steps = 0           # 0 -> train.steps
  c.loss.ds_floor = 0.0
  c.loss.target = 'downsample'        # downsample | upsample
  c.loss.downsample = 'nearest'       # nearest | maxpool
  c.loss.include_background = False
  c.loss.batch_dice = True
  c.loss.ignore_index = -1            # < 0: none

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adamw'
  c.optim.lr = 3e-3
  c.optim.schedule = 'cosine'         # constant | cosine (with warmup) | poly (nnU-Net, power 0.9)
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 1e-4
  c.optim.momentum = 0.99             # sgd (Nesterov, nnU-Net)
  c.optim.poly_power = 0.9
  c.optim.grad_clip = 12.0            # global norm; <= 0: off

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300
  c.train.batch_size = 2
  c.train.eval_batch_size = 4
  c.train.eval_every = 100
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.max_to_keep = 2
  c.train.stop_at_step = 0            # > 0: checkpoint and stop there (a job slice); rerun resumes
  c.train.minutes = 0.0               # > 0: a wall-clock budget that sets train.steps (unet_ds.budget)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                    # devices on the data axis; -1: all
  c.mesh.space = 1                    # devices splitting the first spatial axis
  c.mesh.distributed = False          # call jax.distributed.initialize() (multi-host)
  c.mesh.coordinator_address = ''     # 'host:port' of process 0; '': from env / auto-detection
  c.mesh.num_processes = -1           # -1: from env / auto-detection
  c.mesh.process_id = -1              # -1: from env / auto-detection

  c.inference = inference_group()     # --mode=eval/predict: sliding-window overlap, batch, TTA
  c.eval = ml_collections.ConfigDict()
  c.eval.regions = ''                 # 'wt=1,2,3;tc=1,3;et=3': unions of labels scored beside classes
  c.eval.nsd_tolerance_mm = 1.0       # normalised surface Dice tolerance (whole-image eval)

  # K runs trained together in one vmapped program (unet_ds.multirun); per-run lists: () = same.
  c.multirun = ml_collections.ConfigDict()
  c.multirun.k = 0                    # 0 or 1: off
  c.multirun.seeds = ()               # () -> seed, seed + 1, ...
  c.multirun.ds_weights = ()          # per run, as loss.ds_weights ('exp', '1,0.5,0.25', ...)
  c.multirun.ds_schedule = ()         # per run, as loss.ds_schedule
  c.multirun.ds_floor = ()            # per run, as loss.ds_floor
  c.multirun.vectorize = 'vmap'       # vmap (batched ops) | map (a loop over runs, in one program)
  return c


def parse_arg(arg: str | None) -> dict[str, str | bool]:
  """'ds=deep,smoke' -> {'ds': 'deep', 'smoke': True}."""
  out = {}
  for part in filter(None, (arg or '').split(',')):
    key, sep, value = part.partition('=')
    out[key.strip()] = value.strip() if sep else True
  return out


def smoke(c: ml_collections.ConfigDict) -> None:
  """Tiny sizes for tests and quick checks: seconds on a CPU."""
  c.data.shape = (16,) * c.data.ndim
  c.data.num_train, c.data.num_val = 4, 2
  c.model.depth, c.model.base_filters = 3, 4
  c.train.steps, c.train.batch_size, c.train.eval_batch_size = 4, 2, 2
  c.train.eval_every = c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.optim.warmup_steps = 1


def bench_ref(c: ml_collections.ConfigDict) -> None:
  """The speed reference (MONAI DynUNet side by side): 4 levels 16-32-64-128, residual, IN,
  deep DS with 2 heads, Dice+CE, SGD Nesterov, batch 2 x 64^3 x 1, 3 classes.

  Downsampling by stride-2 convs, as DynUNet (the same FLOPs as max pool + conv).
  """
  c.data.shape = (64,) * c.data.ndim
  c.data.num_classes, c.data.in_channels = 3, 1
  c.model.update(depth=4, base_filters=16, filter_growth=2, residual=True, norm='instance',
                 down='conv')
  c.model.ds.mode, c.model.ds.levels = 'deep', (1, 2)
  c.loss.name = 'dice_ce'
  c.optim.name, c.optim.lr, c.optim.schedule = 'sgd', 1e-2, 'poly'
  c.train.batch_size = 2


COMMON_ARGS: dict[str, Callable[[ml_collections.ConfigDict, Any], None]] = {
    'ds': lambda c, v: setattr(c.model.ds, 'mode', v),
    'smoke': lambda c, v: smoke(c),
    'bench_ref': lambda c, v: bench_ref(c),
    'seed': lambda c, v: setattr(c, 'seed', int(v)),
}


def apply_args(c: ml_collections.ConfigDict, arg: str | None,
               extra: Mapping[str, Callable[[ml_collections.ConfigDict, Any], None]] | None = None
               ) -> ml_collections.ConfigDict:
  """Applies the config-file argument; an unknown argument is an error naming it."""
  handlers = {**COMMON_ARGS, **(extra or {})}
  for key, value in parse_arg(arg).items():
    if key not in handlers:
      raise ValueError(f'unknown config argument {key!r} in {arg!r}; known: {sorted(handlers)}')
    try:
      handlers[key](c, value)
    except (TypeError, ValueError) as e:  # e.g. int('abc'): say which argument
      if str(e).startswith(('config argument', 'config.')):  # says it already
        raise
      raise ValueError(f'config argument {key}={value!r}: {e}') from e
  return c


FILE_DATA = ('msd', 'folder2d')  # the data.name values of real_data_config (files on disk)


def real_data_config(ndim: int, name: str) -> ml_collections.ConfigDict:
  """`base_config(ndim)` for a user's data folder (`data.name`: msd | folder2d).

  The fields and defaults that configs/msd.py and configs/folder2d.py share: normalisation, split,
  patch sampling, a DS loss as nnU-Net's, and the `inference` group that --mode=predict/eval read.
  Each file then sets its data sizes, model size and training length.
  """
  c = base_config(ndim)
  c.data.name = name
  c.data.path = ''                      # the data folder (--config.data.path or the path= arg)
  c.data.in_channels = 1                # modalities / colour channels
  c.data.normalization = 'zscore'       # per volume / image: zscore | minmax | none
  c.data.clip_percentiles = ()          # e.g. (0.5, 99.5) before normalising
  c.data.label_map = ''                 # 'value:class,...' when labels are not 0..K-1
  c.data.val_fraction = 0.2             # seeded by data.seed
  c.data.val_cases = ''                 # 'id,id' (file names without suffix): overrides the fraction
  c.data.num_folds = 0                  # > 1: k-fold, validation = fold `data.fold`
  c.data.fold = 0
  c.data.fg_fraction = 1 / 3            # patches forced onto foreground (nnU-Net)
  c.data.augment = True
  # nnU-Net's spatial augmentation (off by default): per patch, a rotation in `aug_plane` (() =
  # in every plane, each by its own angle) of up to +-aug_rotate_degrees with probability
  # aug_rotate_p, a scaling by a factor in aug_scale along aug_scale_axes (() = all) with
  # probability aug_scale_p.
  c.data.aug_rotate_p = 0.0
  c.data.aug_rotate_degrees = 30.0
  c.data.aug_plane = (0, 1)
  c.data.aug_scale_p = 0.0
  c.data.aug_scale = (0.7, 1.4)
  c.data.aug_scale_axes = ()
  # Intensity augmentation: 'basic' (scale/shift p 0.5, noise p 0.15) or 'nnunet' (noise, blur,
  # brightness, contrast, low-resolution simulation, gamma, at nnU-Net's probabilities).
  c.data.aug_intensity = 'basic'

  c.model.ds.mode = 'deep'
  c.loss.name = 'dice_ce'
  c.loss.ds_weights = 'nnunet'
  c.optim.lr = 3e-3
  c.train.batch_size = 2
  c.train.log_every = 20

  return c


def inference_group() -> ml_collections.ConfigDict:
  """`config.inference` with `inference.Settings`' defaults (documented there)."""
  return ml_collections.ConfigDict(inference.Settings.config_defaults())


def _real_data_smoke(c: ml_collections.ConfigDict) -> None:
  """`smoke` for real data: the user's files, tiny patches, model and run."""
  c.data.patch_size = c.data.shape = c.data.eval_shape = (16,) * c.data.ndim
  c.model.depth, c.model.base_filters = 3, 4
  c.train.steps, c.train.batch_size, c.train.eval_batch_size = 4, 2, 2
  c.train.eval_every = c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.optim.warmup_steps = 1


def _set_fold(c: ml_collections.ConfigDict, fold: str) -> None:
  c.data.num_folds, c.data.fold = 5, int(fold)


# Arguments of every real-data config file (on top of COMMON_ARGS).
REAL_DATA_ARGS: dict[str, Callable[[ml_collections.ConfigDict, Any], None]] = {
    'path': lambda c, v: setattr(c.data, 'path', v),
    'classes': lambda c, v: setattr(c.data, 'num_classes', int(v)),
    'channels': lambda c, v: setattr(c.data, 'in_channels', int(v)),
    'fold': _set_fold,
    'smoke': lambda c, v: _real_data_smoke(c),
}


def weights_spec(spec: Any) -> str | tuple[float, ...]:
  """`loss.ds_weights` as a scheme name or a tuple of floats ('1,0.5' or (1, 0.5)); an error
  names no key (the caller's, e.g. `multirun.ds_weights[1]`, prefixes it)."""
  if isinstance(spec, str) and spec in losses.WEIGHT_SCHEMES:
    return spec
  try:
    values = tuple(float(v) for v in (spec.split(',') if isinstance(spec, str) else spec))
  except (TypeError, ValueError):
    raise ValueError(f'{spec!r} is neither one of '
                     f'{losses.WEIGHT_SCHEMES} nor a comma-separated list of floats') from None
  return values


def _check_choice(value: Any, choices: tuple[str, ...], key: str) -> None:
  if value not in choices:
    raise ValueError(f'config.{key}: must be one of {choices}, got {value!r}')


def _check_seed(seed: Any, key: str) -> None:
  # An int32 on device: runs that differ only in seed share their compiled init.
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
    raise ValueError(f'config.{key}: must be an int in [0, 2**31), got {seed!r}')


def validate(c: ml_collections.ConfigDict) -> models.UNetConfig:
  """Checks the whole config before any compute; returns the typed model config.

  Every error names the config key at fault.
  """
  _check_choice(c.data.name, DATASETS, 'data.name')
  _check_seed(c.seed, 'seed')
  model_cfg = models.model_config(c.model)
  if c.data.ndim not in (2, 3):
    raise ValueError(f'config.data.ndim: must be 2 or 3, got {c.data.ndim}')
  _check_choice(c.loss.name, losses.LOSSES, 'loss.name')
  _check_outputs(c, model_cfg.num_classes)
  _check_choice(c.loss.ds_schedule, losses.SCHEDULES, 'loss.ds_schedule')
  _check_choice(c.loss.target, losses.TARGET_MODES, 'loss.target')
  _check_choice(c.loss.downsample, targets.DOWNSAMPLE_METHODS, 'loss.downsample')
  if not 0.0 <= c.loss.ds_floor <= 1.0:
    raise ValueError(f'config.loss.ds_floor: must be in [0, 1], got {c.loss.ds_floor}')
  try:
    losses.output_weights(weights_spec(c.loss.ds_weights), model_cfg.head_levels,
                          side_losses=side_losses(c))
  except ValueError as e:
    raise ValueError(f'config.loss.ds_weights: {e}') from None
  _check_choice(c.optim.name, OPTIMIZERS, 'optim.name')
  _check_choice(c.optim.schedule, LR_SCHEDULES, 'optim.schedule')
  if not float(c.train.get('minutes', 0) or 0) >= 0:
    raise ValueError(f'config.train.minutes: must be >= 0 (0: off), got {c.train.minutes}')
  for key in ('steps', 'batch_size', 'eval_batch_size', 'eval_every', 'log_every',
              'checkpoint_every', 'max_to_keep'):
    if int(c.train[key]) < 1:
      raise ValueError(f'config.train.{key}: must be >= 1, got {c.train[key]}')
  shape = tuple(c.data.get('patch_size') or c.data.shape)
  if len(shape) != c.data.ndim:
    raise ValueError(f'config.data.shape/patch_size {shape} has {len(shape)} axes but '
                     f'config.data.ndim is {c.data.ndim}')
  m = model_cfg.size_multiples(c.data.ndim)
  what = (f'2^(model.depth-1), depth={model_cfg.depth}' if not model_cfg.strides else
          f'the pooling factors of model.strides={model_cfg.strides}')
  if any(s % k for s, k in zip(shape, m)):
    raise ValueError(f'config.data training shape {shape} must be divisible by '
                     f'{_multiple_text(m)} ({what})')
  eval_shape = tuple(c.data.get('eval_shape') or ())
  if eval_shape and (len(eval_shape) != c.data.ndim
                     or any(s % k for s, k in zip(eval_shape, m))):
    raise ValueError(f'config.data.eval_shape {eval_shape}: needs {c.data.ndim} sizes divisible '
                     f'by {_multiple_text(m)} ({what})')
  if c.data.name != 'synthetic' and not c.data.get('val_cases') and (
      int(c.data.get('num_folds', 0) or 0) <= 1 and float(c.data.get('val_fraction', 0.2)) <= 0):
    raise ValueError('config.data.val_fraction=0 leaves no validation cases to evaluate; set '
                     'it in (0, 1), or data.val_cases=ID,..., or data.num_folds=5 with data.fold')
  if c.mesh.space > 1 and (shape[0] // m[0]) % c.mesh.space:
    raise ValueError(f'config.mesh.space={c.mesh.space} must divide the lowest-resolution size '
                     f'{shape[0] // m[0]} of the first spatial axis')
  if c.data.name != 'synthetic':
    from unet_ds.data import datasets  # pylint: disable=g-import-not-at-top
    try:
      datasets.intensity_augment(c.data)
      datasets.spatial_augment(c.data)
    except ValueError as e:
      raise ValueError(f'config.data.aug_*: {e}') from None
  _validate_multirun(c, model_cfg)
  return model_cfg


def _check_outputs(c: ml_collections.ConfigDict, channels: int) -> None:
  """Output channels, label values, loss and regions agree; errors say what to set.

  `data.num_classes` counts the label values (background included); `model.num_classes` the
  output channels: the same (softmax), or 1, one sigmoid channel for the foreground (class 1 of
  two-class data, the union of the foreground classes otherwise), trained by a binary loss.
  """
  k, loss = int(c.data.num_classes), c.loss.name
  regions = c.get('eval', {}).get('regions', '')
  if channels == 1:
    if loss not in losses.BINARY_LOSSES:
      raise ValueError(f'config.loss.name={loss!r} is a softmax loss but config.model.'
                       'num_classes=1 (one sigmoid channel); set --config.loss.name=bce_dice (or '
                       f'bce), or --config.model.num_classes={k} for a softmax over the classes')
    if regions:
      raise ValueError('config.eval.regions need a softmax output; with config.model.'
                       'num_classes=1 (foreground only) set --config.eval.regions=""')
  elif channels != k:
    raise ValueError(f'config.model.num_classes={channels} output channels for config.data.'
                     f'num_classes={k} label values; set --config.model.num_classes={k} (softmax) '
                     'or 1 (one sigmoid foreground channel, with loss.name=bce_dice)')
  elif loss in losses.BINARY_LOSSES:
    raise ValueError(f'config.loss.name: {loss} needs model.num_classes=1 (one sigmoid channel), '
                     f'got {channels}; set --config.model.num_classes=1 (foreground = every '
                     'label > 0), or a softmax loss (dice_ce, dice, ce, generalized_dice)')
  try:
    metrics.parse_regions(regions, k)
  except ValueError as e:
    raise ValueError(f'config.{e}') from None


def _multiple_text(multiples: tuple[int, ...]) -> str:
  """'8' when every axis needs the same multiple, else '(8, 8, 2)' per axis."""
  return str(multiples[0]) if len(set(multiples)) == 1 else f'{multiples} per axis'


MULTIRUN_LISTS = ('seeds', 'ds_weights', 'ds_schedule', 'ds_floor')
MULTIRUN_VECTORIZE = ('vmap', 'map')


def _validate_multirun(c: ml_collections.ConfigDict, model_cfg: models.UNetConfig) -> None:
  """`config.multirun`: list lengths, per-run values and distinct runs (see unet_ds.multirun)."""
  mr = c.get('multirun')
  if mr is None:
    return
  k = mr.k
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f'config.multirun.k: must be an int >= 0 (0 or 1: off), got {k!r}')
  for key in MULTIRUN_LISTS:
    values = mr.get(key) or ()
    if isinstance(values, str) or not isinstance(values, (tuple, list)):
      raise ValueError(f'config.multirun.{key}: must be a tuple (one value per run), '
                       f'got {values!r}')
    if values and k <= 1:
      raise ValueError(f'config.multirun.{key} has {len(values)} values but multirun.k={k} '
                       '(multi-run is off); set multirun.k to the number of runs')
    if values and len(values) != k:
      raise ValueError(f'config.multirun.{key}: has {len(values)} values {tuple(values)}, '
                       f'needs multirun.k={k} (or none: same for every run)')
  _check_choice(mr.get('vectorize', 'vmap'), MULTIRUN_VECTORIZE, 'multirun.vectorize')
  if k <= 1:
    return
  for i, seed in enumerate(mr.seeds or [c.seed + i for i in range(k)]):
    _check_seed(seed, f'multirun.seeds[{i}] (default: seed + {i})')
  for i, spec in enumerate(mr.ds_weights):
    try:
      losses.output_weights(weights_spec(spec), model_cfg.head_levels, side_losses=side_losses(c))
    except ValueError as e:
      raise ValueError(f'config.multirun.ds_weights[{i}]: {e}') from None
  for i, schedule in enumerate(mr.ds_schedule):
    _check_choice(schedule, losses.SCHEDULES, f'multirun.ds_schedule[{i}]')
  for i, floor in enumerate(mr.ds_floor):
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
      raise ValueError(f'config.multirun.ds_floor[{i}]: must be a number in [0, 1], got {floor!r}')

  def pick(key, i, default):
    return mr[key][i] if mr[key] else default
  runs = [(int(pick('seeds', i, c.seed + i)),
           weights_spec(pick('ds_weights', i, c.loss.ds_weights)),
           pick('ds_schedule', i, c.loss.ds_schedule), float(pick('ds_floor', i, c.loss.ds_floor)))
          for i in range(k)]
  for i, run in enumerate(runs):
    if run in runs[:i]:
      raise ValueError(f'config.multirun: runs {runs.index(run)} and {i} are the same run '
                       '(seed, ds_weights, ds_schedule, ds_floor) = '
                       f'{run!r}; give them distinct seeds or DS settings')


def side_losses(c: ml_collections.ConfigDict) -> bool:
  """Whether heads get their own losses: always for `deep`, on request for the fused forms."""
  return c.model.ds.mode == 'deep' or bool(c.loss.side_losses)


def fill_defaults(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config (a nested dict, as config.json) with the keys a newer unet_ds added, at their
  defaults: a run written before a key existed ran with what is now its default, so a resume or
  a comparison of runs sees no change."""
  ndim = int(saved.get('data', {}).get('ndim', 3))
  name = saved.get('data', {}).get('name')
  # A run on files also lacks the keys real_data_config added since (e.g. data.aug_*).
  defaults = json.loads(to_json(real_data_config(ndim, name) if name in FILE_DATA
                                else base_config(ndim)))

  def fill(into: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    out = dict(into)
    for key, value in base.items():
      if key not in out:
        out[key] = value
      elif isinstance(value, dict) and isinstance(out[key], dict):
        out[key] = fill(out[key], value)
    return out
  return fill(saved, defaults)


def to_json(c: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (tuples become lists)."""
  def default(o):
    if isinstance(o, np.generic):
      return o.item()
    return str(o)
  return json.dumps(c.to_dict(), indent=2, sort_keys=True, default=default)
