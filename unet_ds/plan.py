"""Dataset fingerprint and the training plan derived from it, in the manner of nnU-Net.

The fingerprint is read once per dataset (every case: spacing, shape, foreground intensity samples
per channel, class voxel counts; modality from dataset.json) and cached as JSON under the prepared
data folder, named like the prepared data (folder + hash of the files and settings). The plan
follows from it by fixed rules:

- target spacing: the median per axis; when the coarsest axis is more than 3x the others in
  spacing and 3x smaller in voxels, its 10th percentile instead (fewer invented slices);
- resampling: cubic spline for images, linear on one-hot for labels, the coarse axis apart with
  order 0 when a grid is anisotropic (`unet_ds.data.resample`);
- normalisation per channel: CT clips to the dataset's foreground 0.5/99.5 percentiles and uses
  its foreground mean/std; any other modality is z-scored per image;
- patch size: the median shape at the target spacing, shrunk (largest patch/median ratio first)
  until it fits a voxel budget sized for a CPU; per-axis pooling halves only axes whose current
  spacing is within 2x of the finest, and keeps feature maps >= 4 voxels; depth follows;
- conv kernels: 3 per axis, but 1 along an axis at the levels where its spacing is still 2x or
  more the finest (thick slices), until pooling has caught it up;
- spatial augmentation: rotations and scalings as nnU-Net's, in-plane only for patches thin
  along a coarse axis (`augmentation`);
- batch size: two patches at the voxel budget, more for smaller patches, capped by an activation
  memory estimate and by 5% of the dataset's voxels per batch.

  python -m unet_ds.plan --input=/data/Task04_Hippocampus   # prints plan.json
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import math
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import numpy as np

from unet_ds import cli
from unet_ds.data import folder2d
from unet_ds.data import io
from unet_ds.data import msd
from unet_ds.data import prepare
from unet_ds.data import resample

FINGERPRINT_VERSION = '1.0.0'
FINGERPRINT_FILE = 'fingerprint.json'
PLAN_FILE = 'plan.json'
PLANS_FOLDER = 'unet_ds_plans'  # under the prepared-data folder, beside unet_ds_msd/...

SAMPLES_PER_CASE = 10_000       # foreground voxels per case for the intensity statistics
CT_PERCENTILES = (0.5, 99.5)
ANISOTROPY_THRESHOLD = resample.ANISOTROPY_THRESHOLD
MIN_FEATURE_MAP = 4             # no pooling below this many voxels per axis
MAX_POOLS = 5
# CPU-sized budgets: 3D ~ nnU-Net's hippocampus patch (40 x 56 x 40), 2D 256 x 256.
PATCH_VOXELS = {2: 256 * 256, 3: 100_000}
BASE_FILTERS = {2: 16, 3: 8}
MEMORY_MB = 2048.0
MAX_FILTERS = 320
DATASET_FRACTION_PER_BATCH = 0.05


def dataset_kind(path: str, image_dir: str = 'image', label_dir: str = 'label') -> str:
  """'msd' for a folder with imagesTr/, 'folder2d' for one with `image_dir`/ (PNG/TIFF)."""
  if os.path.isdir(os.path.join(path, 'imagesTr')):
    return 'msd'
  if os.path.isdir(os.path.join(path, image_dir)):
    return 'folder2d'
  if not os.path.isdir(path):
    raise io.DataError(f'{path}: no such folder')
  others = sorted(f for f in os.listdir(path) if os.path.isdir(os.path.join(path, f)))
  raise io.DataError(f'{path}: neither an MSD task folder (imagesTr/ + labelsTr/) nor a 2D folder '
                     f'({image_dir}/ + {label_dir}/); it holds {others or "no folders"} (set '
                     'image_dir and label_dir for other subfolder names)')


# ----------------------------------------------------------------------------- fingerprint

def _cases(path: str, kind: str, image_dir: str, label_dir: str) -> list[tuple[str, str, str]]:
  if kind == 'msd':
    return msd.find_cases(path)
  return folder2d.find_cases(path, image_dir, label_dir)


def _read_raw(kind: str, image_path: str, label_path: str, label_map: io.LabelMap | None
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
  """(float image [*spatial, C], class ids [*spatial], spacing) on the case's own grid."""
  if kind == 'msd':
    volume = io.read_nifti(image_path)
    image = io.image_to_float(volume.array, image_path, msd.SPATIAL_RANK)
    spacing = msd.spacing_of(volume)
    label_vol = io.read_nifti(label_path)
    raw = label_vol.array
    if raw.ndim == msd.SPATIAL_RANK + 1 and raw.shape[-1] == 1:
      raw = raw[..., 0]
    io.check_pair(image_path, label_path, image.shape[:-1], raw.shape, volume.affine,
                  label_vol.affine)
  else:
    image = io.image_to_float(io.read_image2d(image_path), image_path, folder2d.SPATIAL_RANK)
    spacing = (1.0,) * folder2d.SPATIAL_RANK
    raw = folder2d.read_label2d(label_path)
    io.check_pair(image_path, label_path, image.shape[:-1], raw.shape)
  # 256: the label storage limit; the actual class count comes from the values found.
  return image, io.label_to_classes(raw, label_path, 256, label_map), spacing


def compute_fingerprint(path: str, *, label_map: io.LabelMap | None = None,
                        image_dir: str = 'image', label_dir: str = 'label',
                        samples_per_case: int = SAMPLES_PER_CASE) -> dict[str, Any]:
  """Reads every labelled case of `path` (MSD or 2D folder) once; see the module docstring.

  Returns:
    JSON-able dict: kind, ndim, channels, modalities, case_ids, spacings, shapes (per case, array
    axis order), class_voxels, class_cases (cases holding it) and class_first_case (per class id
    or label value), foreground (per channel: mean, std, median,
    percentile_00_5, percentile_99_5, min, max of the sampled foreground voxels), dataset_labels.
  """
  path = os.path.abspath(os.path.expanduser(path))
  kind = dataset_kind(path, image_dir, label_dir)
  meta = msd.read_dataset_json(path) or {}
  cases = _cases(path, kind, image_dir, label_dir)
  meta_path = os.path.join(path, 'dataset.json')
  listed = meta.get('labels') if isinstance(meta.get('labels'), Mapping) else None
  values = msd.listed_label_values(meta_path, listed) if listed else None
  modalities = msd.modalities(meta_path, meta) or []
  spacings, shapes, samples, class_voxels, channels = [], [], [], np.zeros(256, np.int64), None
  class_cases, first_case = np.zeros(256, np.int64), {}  # cases holding each value, the first
  for index, (case_id, image_path, label_path) in enumerate(cases):
    image, label, spacing = _read_raw(kind, image_path, label_path, label_map)
    channels = prepare.check_channels(image_path, image, channels)
    if modalities and len(modalities) != channels:
      raise io.DataError(f'{meta_path}: lists {len(modalities)} modalities {modalities}, but '
                         f'{image_path} has {channels} channel(s)')
    if values and not label_map and label.size:
      # every value in the files must be one dataset.json names, before a plan counts them
      bad = sorted(set(np.unique(label).tolist()) - set(values))
      if bad:
        raise io.DataError(f'{label_path}: label values {bad} that dataset.json does not list '
                           f'(it lists {values})')
    spacings.append(list(spacing))
    shapes.append(list(image.shape[:-1]))
    counts = np.bincount(label.ravel(), minlength=256)
    class_voxels += counts
    class_cases += counts > 0
    for value in np.nonzero(counts)[0]:
      first_case.setdefault(str(value), case_id)
    foreground = image[label > 0]  # [N, C]
    if len(foreground):
      rng = np.random.default_rng(index)  # seeded per case: the same samples on every run
      take = rng.choice(len(foreground), min(samples_per_case, len(foreground)), replace=False)
      samples.append(foreground[np.sort(take)])
  stacked = np.concatenate(samples) if samples else np.zeros((0, channels), np.float32)
  num_classes = int(np.nonzero(class_voxels)[0].max(initial=0)) + 1
  return {
      'version': FINGERPRINT_VERSION,
      'path': path,
      'kind': kind,
      'ndim': len(shapes[0]),
      'channels': int(channels),
      'modalities': modalities,
      'dataset_labels': listed,
      'label_map': sorted(label_map.items()) if label_map else [],
      'case_ids': [c[0] for c in cases],
      'spacings': spacings,
      'shapes': shapes,
      'class_voxels': class_voxels[:num_classes].tolist(),
      'class_cases': class_cases[:num_classes].tolist(),
      'class_first_case': first_case,
      'foreground': [_intensity_stats(stacked[:, c]) for c in range(channels)],
  }


def _intensity_stats(values: np.ndarray) -> dict[str, float]:
  if values.size == 0:
    return {}
  values = values.astype(np.float64)
  low, high = np.percentile(values, CT_PERCENTILES)
  return {'mean': float(values.mean()), 'std': float(values.std()),
          'median': float(np.median(values)), 'percentile_00_5': float(low),
          'percentile_99_5': float(high), 'min': float(values.min()), 'max': float(values.max())}


def plan_dir(path: str, data_dir: str | None = None, *, label_map: io.LabelMap | None = None,
             image_dir: str = 'image', label_dir: str = 'label') -> str:
  """Where the fingerprint and plan of `path` are cached: named like prepared data (folder +
  hash of the files' names, sizes, mtimes (dataset.json's too) and of the settings that change
  the fingerprint)."""
  path = os.path.abspath(os.path.expanduser(path))
  kind = dataset_kind(path, image_dir, label_dir)
  files = [f for c in _cases(path, kind, image_dir, label_dir) for f in c[1:]]
  meta = os.path.join(path, 'dataset.json')  # its modalities and labels are in the fingerprint
  files += [meta] if os.path.exists(meta) else []
  settings = {'path': path, 'kind': kind,
              'label_map': sorted(label_map.items()) if label_map else [],
              'image_dir': image_dir, 'label_dir': label_dir, 'samples': SAMPLES_PER_CASE}
  name = prepare.make_config(settings, files, FINGERPRINT_VERSION).name
  root = os.path.abspath(os.path.expanduser(data_dir or prepare.default_data_dir()))
  return os.path.join(root, PLANS_FOLDER, name)


def fingerprint(path: str, data_dir: str | None = None, *, label_map: io.LabelMap | None = None,
                image_dir: str = 'image', label_dir: str = 'label') -> dict[str, Any]:
  """`compute_fingerprint`, cached in `plan_dir(...)/fingerprint.json` (computed once)."""
  folder = plan_dir(path, data_dir, label_map=label_map, image_dir=image_dir, label_dir=label_dir)
  cached = os.path.join(folder, FINGERPRINT_FILE)
  if os.path.exists(cached):
    with open(cached) as f:
      return json.load(f)
  fp = compute_fingerprint(path, label_map=label_map, image_dir=image_dir, label_dir=label_dir)
  _write_json(cached, fp)
  return fp


def _write_json(path: str, value: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(prepare.jsonable(value), f, indent=1)
  os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one


# ----------------------------------------------------------------------------- plan

def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], int | None]:
  """(median spacing, with nnU-Net's anisotropic rule applied; the coarse axis or None).

  The coarse axis takes the 10th percentile of its spacings (never finer than the other axes)
  when its median spacing exceeds `ANISOTROPY_THRESHOLD` x the others' and its median size at
  that spacing is `ANISOTROPY_THRESHOLD` x smaller than theirs.
  """
  spacings = np.asarray(spacings, np.float64)
  target = np.median(spacings, 0)
  if len(target) < 3:
    return target.tolist(), None
  sizes = np.median(np.asarray(shapes) * spacings / target, 0)
  worst = int(np.argmax(target))
  others = [a for a in range(len(target)) if a != worst]
  if (target[worst] > ANISOTROPY_THRESHOLD * target[others].max()
      and sizes[worst] * ANISOTROPY_THRESHOLD < sizes[others].min()):
    finest_other = float(target[others].max())
    target[worst] = max(float(np.percentile(spacings[:, worst], 10)), finest_other + 1e-5)
    return target.tolist(), worst
  return target.tolist(), None


def pooling(patch: Sequence[float], spacing: Sequence[float], max_pools: int = MAX_POOLS
            ) -> list[list[int]]:
  """Per-level, per-axis pooling factors (1 or 2), finest level first.

  An axis is halved at a level when its current spacing is within 2x of the finest current
  spacing (coarse axes wait until the others have caught up) and the halved size stays >=
  `MIN_FEATURE_MAP`.
  """
  size = [float(p) for p in patch]
  current = [float(s) for s in spacing]
  strides = []
  for _ in range(max_pools):
    finest = min(current)
    axes = [a for a in range(len(size))
            if current[a] < 2 * finest and size[a] / 2 >= MIN_FEATURE_MAP]
    if not axes:
      break
    strides.append([2 if a in axes else 1 for a in range(len(size))])
    for a in axes:
      size[a] /= 2
      current[a] *= 2
  return strides


def conv_kernels(spacing: Sequence[float], strides: Sequence[Sequence[int]]) -> list[list[int]]:
  """Per-level, per-axis conv kernel sizes (1 or 3), finest level first, one per level
  (`len(strides) + 1`).

  An axis gets 3 from the first level where its spacing is within 2x of the finest, and keeps it;
  before that 1 (nnU-Net's rule: a 3-wide kernel across thick slices mixes structures that do
  not touch). The bottleneck is 3 everywhere.
  """
  current = [float(s) for s in spacing]
  kernel = [1] * len(current)
  kernels = []
  for factors in strides:
    finest = min(current)
    kernel = [3 if k == 3 or c < 2 * finest else 1 for k, c in zip(kernel, current)]
    kernels.append(list(kernel))
    current = [c * f for c, f in zip(current, factors)]
  kernels.append([3] * len(current))
  return kernels


def augmentation(spacing: Sequence[float], patch: Sequence[int]) -> dict[str, Any]:
  """nnU-Net's spatial augmentation for a plan: rotation (p 0.2) and scaling (p 0.2, 0.7-1.4).

  A 3D patch that is thin along its coarsest axis (longest patch side over that side > 3,
  nnU-Net's rule for augmenting in 2D) is rotated and scaled in the plane of the other two axes
  only, so no thick slice is tilted or stretched into its neighbours; any other 3D patch is
  rotated in the first two axes' plane (nnU-Net turns about all three) and scaled along every
  axis. 3D rotations go up to 30 degrees: nnU-Net turns thin patches up to 180, which scored
  lower on a thick-slice copy of hippocampus, whose anatomy has one orientation
  (docs/results.md). 2D data (no anatomical orientation assumed) turns up to 180.
  """
  out = {'p_rotate': 0.2, 'p_scale': 0.2, 'scale': [0.7, 1.4]}
  if len(patch) == 2:
    return {**out, 'plane': [0, 1], 'degrees': 180.0, 'scale_axes': []}
  out['degrees'] = 30.0
  coarse = int(np.argmax(spacing))
  if spacing[coarse] > min(spacing) and max(patch) / patch[coarse] > ANISOTROPY_THRESHOLD:
    plane = [a for a in range(len(patch)) if a != coarse]
    return {**out, 'plane': plane, 'scale_axes': plane}
  return {**out, 'plane': [0, 1], 'scale_axes': []}


def multiples(strides: Sequence[Sequence[int]], ndim: int) -> list[int]:
  """What each patch axis must be divisible by: the product of its pooling factors."""
  return [int(np.prod([s[a] for s in strides])) if strides else 1 for a in range(ndim)]


def patch_and_pooling(median_shape: Sequence[float], spacing: Sequence[float],
                      budget: int) -> tuple[list[int], list[list[int]]]:
  """(patch size, pooling factors): the median shape (at most a cube in mm of 16x the budget),
  rounded up to the pooling multiples, then shrunk until `prod(patch) <= budget`."""
  ndim = len(median_shape)
  inverse = 1.0 / np.asarray(spacing, np.float64)
  start = inverse * (16 * budget / np.prod(inverse)) ** (1.0 / ndim)  # a large cube in mm
  patch = [float(p) for p in np.minimum(start, median_shape)]
  while True:
    strides = pooling(patch, spacing)
    mult = multiples(strides, ndim)
    rounded = [int(math.ceil(p / m) * m) for p, m in zip(patch, mult)]
    if int(np.prod(rounded)) <= budget or all(r <= 1 for r in rounded):
      return rounded, strides
    # Shrink the axis that overshoots the data the most (nnU-Net's order).
    axis = int(np.argmax([r / m for r, m in zip(rounded, median_shape)]))
    patch = [float(r) for r in rounded]
    patch[axis] = max(1.0, rounded[axis] - mult[axis])


def activation_bytes(patch: Sequence[int], strides: Sequence[Sequence[int]], base_filters: int,
                     convs_per_block: int = 2) -> float:
  """Rough float32 activation memory of one training sample: per level, encoder and decoder
  conv outputs, norms and activations kept for the backward pass, plus the skip concatenation."""
  voxels = float(np.prod(patch))
  total = 0.0
  for level in range(len(strides) + 1):
    if level:
      voxels /= float(np.prod(strides[level - 1]))
    filters = min(base_filters * 2 ** level, MAX_FILTERS)
    tensors = 2 * convs_per_block * 3 + 2  # (encoder + decoder) x convs x (conv, norm, act) + cat
    total += voxels * filters * tensors * 4
  return total


def batch_size(patch: Sequence[int], strides: Sequence[Sequence[int]], base_filters: int, *,
               budget: int, memory_mb: float, dataset_voxels: float) -> int:
  """Two patches at the voxel budget (more for smaller patches), at most 5% of the dataset's
  voxels per batch, at least 2, and never beyond the memory estimate (then at least 1)."""
  voxels = float(np.prod(patch))
  by_budget = int(2 * budget // voxels)
  by_dataset = int(DATASET_FRACTION_PER_BATCH * dataset_voxels // voxels)
  size = max(2, min(by_budget, by_dataset))
  by_memory = int(memory_mb * 2**20 // activation_bytes(patch, strides, base_filters))
  return max(1, min(size, by_memory))


def normalization_plan(fp: Mapping[str, Any]) -> tuple[list[str], list[list[float]]]:
  """(method per channel, CT statistics per channel (low, high, mean, std); [] without CT)."""
  modalities = list(fp.get('modalities') or [])
  methods = []
  for c in range(fp['channels']):
    is_ct = c < len(modalities) and modalities[c].strip().upper() == 'CT'
    methods.append('ct' if is_ct and fp['foreground'][c] else 'zscore')
  if 'ct' not in methods:
    return methods, []
  stats = []
  for c, method in enumerate(methods):
    s = fp['foreground'][c] if method == 'ct' else {}
    stats.append([s['percentile_00_5'], s['percentile_99_5'], s['mean'], s['std']] if s
                 else [0.0, 0.0, 0.0, 1.0])  # unused for z-scored channels
  return methods, stats


def classes_of(fp: Mapping[str, Any]) -> tuple[int, list[list[int]]]:
  """(number of classes, label map as [value, class] pairs).

  dataset.json's label count when present, else the largest class id seen + 1 (>= 2); label
  values that are not 0..K-1 (masks saved as 0/255, or dataset.json labels 0, 1, 5) map to 0..K-1
  in increasing order.
  """
  label_map = [list(pair) for pair in fp.get('label_map') or []]
  labels = fp.get('dataset_labels')
  if labels:
    values = msd.listed_label_values(os.path.join(fp['path'], 'dataset.json'), labels)
    if not label_map and values != list(range(len(values))):  # e.g. 0, 1, 5: classes 0, 1, 2
      return len(values), [[value, c] for c, value in enumerate(values)]
    return len(labels), label_map
  seen = [value for value, count in enumerate(fp['class_voxels']) if count]
  if not label_map and seen != list(range(len(seen))):
    return max(2, len(seen)), [[value, c] for c, value in enumerate(seen)]
  return max(2, len(fp['class_voxels'])), label_map


def stray_label_notes(fp: Mapping[str, Any]) -> list[str]:
  """One line per label value found in a single case of three or more when the classes come from
  the files (no dataset.json labels, no label_map): an anti-aliased mask, or one saved as 0/1
  among 0/255 ones, adds a class silently. Fingerprints from before `class_cases` give none."""
  cases, first = fp.get('class_cases'), fp.get('class_first_case') or {}
  if fp.get('dataset_labels') or fp.get('label_map') or not cases or len(fp['case_ids']) < 3:
    return []
  classes, label_map = classes_of(fp)
  to_class = dict((int(v), int(c)) for v, c in label_map)
  return [f'{fp["path"]}: label value {value} is only in case {first.get(str(value), "?")} '
          f'({fp["class_voxels"][value]} voxels of it) of {len(fp["case_ids"])}, and becomes '
          f'class {to_class.get(value, value)} of {classes}; if it is noise, fix that label file '
          f'or map the value (label_map)'
          for value, n in enumerate(cases) if value and n == 1]


def make_plan(fp: Mapping[str, Any], *, patch_voxels: int | None = None,
              memory_mb: float = MEMORY_MB, base_filters: int | None = None) -> dict[str, Any]:
  """The plan for a fingerprint (pure; see the module docstring for the rules)."""
  ndim = int(fp['ndim'])
  budget = int(patch_voxels or PATCH_VOXELS[ndim])
  base = int(base_filters or BASE_FILTERS[ndim])
  spacings = np.asarray(fp['spacings'], np.float64)
  shapes = np.asarray(fp['shapes'], np.float64)
  median_spacing = np.median(spacings, 0).tolist()
  target, coarse = target_spacing(spacings, shapes)
  at_target = shapes * spacings / np.asarray(target)
  median_shape = np.median(at_target, 0)
  patch, strides = patch_and_pooling(median_shape, target, budget)
  methods, ct_stats = normalization_plan(fp)
  classes, label_map = classes_of(fp)
  resampled = not np.allclose(spacings, np.asarray(target)[None], rtol=1e-3)
  plan = {
      'kind': fp['kind'],
      'ndim': ndim,
      'path': fp['path'],
      'num_cases': len(fp['shapes']),
      'num_classes': classes,
      'in_channels': int(fp['channels']),
      'modalities': list(fp.get('modalities') or []),
      'label_map': label_map,
      'median_spacing': median_spacing,
      # 3D: always, so that inputs of another spacing are resampled at prediction too (2D
      # folders keep their pixel grid).
      'target_spacing': target if ndim == 3 else [],
      'spacing': target,
      'anisotropic_axis': coarse,
      'median_shape': [float(round(s, 1)) for s in median_shape],
      'resampling': {
          'image': 'spline order 3',
          'label': 'linear on one-hot',
          'coarse_axis': 'order 0 when spacing max/min > %g' % ANISOTROPY_THRESHOLD,
          'needed': bool(resampled),
      },
      'normalization': methods,
      'ct_stats': ct_stats,
      'patch_size': patch,
      'strides': strides,
      'kernel_sizes': conv_kernels(target, strides),
      'augmentation': augmentation(target, patch),
      'depth': len(strides) + 1,
      'base_filters': base,
      'batch_size': batch_size(patch, strides, base, budget=budget, memory_mb=memory_mb,
                               dataset_voxels=float(np.prod(at_target, 1).sum())),
      'budget': {'patch_voxels': budget, 'memory_mb': float(memory_mb)},
  }
  plan['activation_mb_per_sample'] = round(activation_bytes(patch, strides, base) / 2**20, 1)
  return plan


def plan_for(path: str, data_dir: str | None = None, *, label_map: io.LabelMap | str | None = None,
             image_dir: str = 'image', label_dir: str = 'label', **plan_kwargs: Any
             ) -> dict[str, Any]:
  """Fingerprint (cached) + plan of `path`; writes `plan.json` beside the fingerprint.

  Args:
    path: an MSD task folder (imagesTr/ + labelsTr/) or a 2D folder (image/ + label/).
    data_dir: the prepared-data folder (default: `prepare.default_data_dir()`).
    label_map: label value -> class ('0:1,255:0' or a dict) when labels are not 0..K-1.
    image_dir, label_dir: the 2D folder's subfolders.
    **plan_kwargs: `make_plan` budgets (patch_voxels, memory_mb, base_filters).
  """
  label_map = io.parse_label_map(label_map) if isinstance(label_map, str) else label_map
  kwargs = {'label_map': label_map or None, 'image_dir': image_dir, 'label_dir': label_dir}
  fp = fingerprint(path, data_dir, **kwargs)
  for note in stray_label_notes(fp):
    logging.warning('%s', note)
  plan = make_plan(fp, **plan_kwargs)
  folder = plan_dir(path, data_dir, **kwargs)
  plan['plan_dir'] = folder
  _write_json(os.path.join(folder, PLAN_FILE), plan)
  return plan


# ----------------------------------------------------------------------------- CLI

def define_flags() -> None:
  """The CLI flags (defined only when run as a script: `unet_ds.main` has its own --input)."""
  flags.DEFINE_string('input', None, 'MSD task folder or 2D image/ + label/ folder.')
  flags.DEFINE_string('data_dir', None, 'prepared-data folder (fingerprint cache).')
  flags.DEFINE_string('label_map', None, "label value -> class, e.g. '0:1,255:0'.")
  flags.DEFINE_string('image_dir', 'image', "a 2D folder's image subfolder.")
  flags.DEFINE_string('label_dir', 'label', "a 2D folder's label subfolder.")
  flags.DEFINE_integer('patch_voxels', None, 'patch voxel budget.')
  flags.DEFINE_float('memory_mb', MEMORY_MB, 'activation memory budget (MB).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  if not f.input:
    raise app.UsageError('--input=DIR is required')
  try:
    plan = plan_for(f.input, f.data_dir, label_map=f.label_map, image_dir=f.image_dir,
                    label_dir=f.label_dir, patch_voxels=f.patch_voxels, memory_mb=f.memory_mb)
  except cli.USER_ERRORS as e:
    cli.exit_with_error(e)
  print(json.dumps(prepare.jsonable(plan), indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
