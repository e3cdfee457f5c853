"""Synthetic 2D/3D multi-class segmentation data as a TFDS builder (array_record, no TensorFlow).

Each example is a 2D image or 3D volume holding a few rotated objects, one foreground class per object:

* the shape family depends on the class (ellipsoid, box, shell = hollow ellipsoid, cycling with the class
  id) and so does the size range; the families stay distinct in 2D (ellipse, rectangle, ring);
* the mean intensity rises with the class id, but per-object jitter, a smooth multiplicative bias field and
  gaussian noise make neighbouring classes overlap in intensity, so a model needs the shape (context) too;
* every foreground class appears in every example (the first objects cover each class once).

Image values: background ~ N(0, 0.2); class c has mean intensity 1 + 0.5 (c - 1) before the bias field.

Multi-channel mode (`in_channels` > 1, like MRI modalities): channel 0 is the single-channel image above;
every further channel has its own bias field and noise and a channel-dependent contrast, the class ramp
rotated by the channel index with one class hidden at background level (`channel_means`), so no channel
alone tells every class apart and a model gains from combining them. Single-channel data are unchanged.

Generation is vectorised numpy and deterministic: example `i` of a split depends only on
`(seed, split, i)`. The builder config name encodes every generation parameter and the builder VERSION the
algorithm, so different parameters never share files; `load()` prepares a config on first use and reuses it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from unet_ds.data import prepare

# The constants below define the data: change any of them, or the generator, and bump VERSION.
# Shape families, cycled over the foreground classes (class c uses family (c - 1) % 3).
_FAMILIES = ('ellipsoid', 'box', 'shell')
# Per-axis half-size range of each family as a fraction of the smallest side; roughly equal volumes
# (ellipsoid 4.2abc, box 8abc, shell 3.3abc in 3D), e.g. radii 4-8 voxels in a 32^3 volume.
_HALF_SIZE = {'ellipsoid': (0.12, 0.25), 'box': (0.10, 0.19), 'shell': (0.15, 0.30)}
_SHELL_INNER = 0.6  # Inner radius of a shell as a fraction of its outer radius.
_HALF_SIZE_SCALE_2D = 0.7  # An ellipse covers far more of an image than an ellipsoid of a volume.
_BASE_INTENSITY = 1.0  # Mean intensity of class 1; background is 0.
_INTENSITY_STEP = 0.5  # Mean intensity increase per class id.
_INTENSITY_JITTER = 0.12  # Std of an object's mean intensity around its class mean.
_BIAS_AMPLITUDE = 0.25  # Multiplicative bias field lies in [1 - a, 1 + a].
_NOISE_STD = 0.2  # Additive gaussian noise.
_CENTER_DRAWS = 8  # Candidate centers per object; the one farthest from the others wins.
_SPLIT_CODES = {'train': 0, 'validation': 1}


class _DropCustomConfigWarning(logging.Filter):
  """tfds warns on every builder made from a config outside BUILDER_CONFIGS; ours all are."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Using custom data configuration')


logging.getLogger('absl').addFilter(_DropCustomConfigWarning())


def config_name(*, ndim: int, shape: Sequence[int], num_classes: int, num_train: int, num_val: int,
                seed: int, in_channels: int = 1) -> str:
  """The builder config name; it encodes every generation parameter, e.g. `3d_32x32x32_k3_n64v16_s0`
  (`_c4` appended for 4 channels; single-channel names predate the multi-channel mode)."""
  dims = 'x'.join(str(int(s)) for s in shape)
  channels = f'_c{in_channels}' if in_channels != 1 else ''
  return f'{ndim}d_{dims}_k{num_classes}_n{num_train}v{num_val}_s{seed}{channels}'


def _validate(*, ndim: int, shape: Sequence[int], num_classes: int, num_train: int, num_val: int,
              seed: int, in_channels: int = 1) -> tuple[int, ...]:
  """Checks the generation parameters; returns the shape as a tuple of ints."""
  if ndim not in (2, 3):
    raise ValueError(f'synthetic data: ndim must be 2 or 3, got {ndim!r}')
  shape = tuple(shape)
  if len(shape) != ndim or not all(isinstance(s, (int, np.integer)) for s in shape):
    raise ValueError(f'synthetic data: shape must be {ndim} ints for ndim={ndim}, got {shape!r}')
  if min(shape) < 8:
    raise ValueError(f'synthetic data: every side of shape must be >= 8, got {shape!r}')
  if not 2 <= num_classes <= 255:
    raise ValueError(f'synthetic data: num_classes must be in [2, 255] (background included), '
                     f'got {num_classes!r}')
  for key, value in (('num_train', num_train), ('num_val', num_val)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'synthetic data: {key} must be a positive int, got {value!r}')
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'synthetic data: seed must be a non-negative int, got {seed!r}')
  if isinstance(in_channels, bool) or not isinstance(in_channels, (int, np.integer)) or not (
      1 <= in_channels <= 16):
    raise ValueError(f'synthetic data: in_channels must be an int in [1, 16], got {in_channels!r}')
  return tuple(int(s) for s in shape)


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
  """A uniformly random rotation matrix [ndim, ndim] (QR of a gaussian matrix, signs fixed)."""
  q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
  q = q * np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return q


def _bias_field(rng: np.random.Generator, grid: np.ndarray, side: float) -> np.ndarray:
  """A smooth multiplicative field in [1 - a, 1 + a]: a few cosines of at most one cycle per image."""
  ndim = grid.shape[0]
  field = np.zeros(grid.shape[1:], np.float32)
  for _ in range(3):
    freq = rng.uniform(-1.0, 1.0, size=ndim) * (2 * np.pi / side)
    phase = np.tensordot(freq, grid, axes=1) + rng.uniform(0, 2 * np.pi)
    field += rng.normal() * np.cos(phase).astype(np.float32)
  field /= max(float(np.abs(field).max()), 1e-6)
  return 1.0 + _BIAS_AMPLITUDE * field


def _spread_center(rng: np.random.Generator, shape: tuple[int, ...],
                   taken: list[np.ndarray]) -> np.ndarray:
  """An object center in the middle 60% of each axis, the farthest of a few draws from `taken`."""
  candidates = rng.uniform(0.2, 0.8, size=(_CENTER_DRAWS, len(shape))) * np.asarray(shape)
  if not taken:
    return candidates[0]
  dists = np.linalg.norm(candidates[:, None, :] - np.asarray(taken)[None, :, :], axis=-1)
  return candidates[np.argmax(dists.min(axis=1))]


def channel_means(channel: int, num_classes: int) -> np.ndarray:
  """Mean intensity of background and of each class `[num_classes]` in `channel` (before jitter).

  Channel 0: `1 + 0.5 (c - 1)` for class c. Channel j > 0: the ramp rotated by j, and class
  `1 + (j - 1) % (K - 1)` at background level 0 (with two or more foreground classes).
  """
  num_fg = num_classes - 1
  c = np.arange(1, num_classes)
  if channel == 0:
    fg = _BASE_INTENSITY + _INTENSITY_STEP * (c - 1)
  else:
    fg = _BASE_INTENSITY + _INTENSITY_STEP * ((c - 1 + channel) % num_fg)
    if num_fg > 1:
      fg = np.where(c - 1 == (channel - 1) % num_fg, 0.0, fg)
  return np.concatenate([[0.0], fg]).astype(np.float32)


def generate_example(rng: np.random.Generator, shape: Sequence[int],
                     num_classes: int, in_channels: int = 1) -> dict[str, np.ndarray]:
  """One synthetic example: `{'image': float32 [*shape, in_channels], 'label': uint8 [*shape]}`."""
  shape = tuple(shape)
  ndim = len(shape)
  side = float(min(shape))
  size_scale = 1.0 if ndim == 3 else _HALF_SIZE_SCALE_2D
  grid = np.indices(shape, dtype=np.float32)  # [ndim, *shape]
  num_fg = num_classes - 1
  # Every class once (random order), then up to num_fg extra objects of random classes.
  classes = np.concatenate([rng.permutation(np.arange(1, num_classes)),
                            rng.integers(1, num_classes, size=rng.integers(0, num_fg + 1))])
  half_sizes = []
  for c in classes:
    lo, hi = _HALF_SIZE[_FAMILIES[(c - 1) % len(_FAMILIES)]]
    half_sizes.append(rng.uniform(lo, hi, size=ndim) * side * size_scale)
  label = np.zeros(shape, np.uint8)
  intensity = np.zeros(shape, np.float32)
  painted = np.full(shape, -1, np.int16)  # index of the object on top (-1: background)
  jitter = np.zeros(len(classes), np.float32)
  centers = []
  # Paint the largest objects first so small ones stay visible on top.
  for i in np.argsort([-np.prod(h) for h in half_sizes], kind='stable'):
    c = int(classes[i])
    family = _FAMILIES[(c - 1) % len(_FAMILIES)]
    center = _spread_center(rng, shape, centers)
    centers.append(center)
    offsets = grid - center.astype(np.float32).reshape((ndim,) + (1,) * ndim)
    local = np.tensordot(_random_rotation(rng, ndim).T.astype(np.float32), offsets, axes=1)
    u = np.abs(local / half_sizes[i].astype(np.float32).reshape((ndim,) + (1,) * ndim))
    if family == 'box':
      inside = u.max(0) <= 1.0
    else:
      r2 = (u**2).sum(0)
      inside = r2 <= 1.0 if family == 'ellipsoid' else (r2 <= 1.0) & (r2 >= _SHELL_INNER**2)
    jitter[i] = _INTENSITY_JITTER * rng.normal()
    label[inside] = c
    intensity[inside] = _BASE_INTENSITY + _INTENSITY_STEP * (c - 1) + jitter[i]
    painted[inside] = i
  image = intensity * _bias_field(rng, grid, side) + rng.normal(0.0, _NOISE_STD, shape)
  channels = [image.astype(np.float32)]
  # Further channels draw after every draw of channel 0, which so stays the single-channel image.
  for channel in range(1, in_channels):
    object_means = channel_means(channel, num_classes)[classes] + jitter
    object_means = np.where(channel_means(channel, num_classes)[classes] > 0, object_means, 0.0)
    mean = np.where(painted >= 0, object_means[np.maximum(painted, 0)], 0.0).astype(np.float32)
    channels.append((mean * _bias_field(rng, grid, side)
                     + rng.normal(0.0, _NOISE_STD, shape)).astype(np.float32))
  return {'image': np.stack(channels, axis=-1), 'label': label}


def _example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _SPLIT_CODES[split], index])


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Generation parameters; build with `SyntheticConfig.create(...)` so the name encodes them."""

  ndim: int = 3
  shape: tuple[int, ...] = (32, 32, 32)
  num_classes: int = 3
  num_train: int = 64
  num_val: int = 16
  seed: int = 0
  in_channels: int = 1

  @classmethod
  def create(cls, *, ndim: int, shape: Sequence[int], num_classes: int, num_train: int,
             num_val: int, seed: int, in_channels: int = 1) -> 'SyntheticConfig':
    params = dict(ndim=ndim, shape=shape, num_classes=num_classes, num_train=num_train,
                  num_val=num_val, seed=seed, in_channels=in_channels)
    shape = _validate(**params)
    params['shape'] = shape
    return cls(name=config_name(**params), description=f'synthetic shapes {params}',
               ndim=int(ndim), shape=shape, num_classes=int(num_classes),
               num_train=int(num_train), num_val=int(num_val), seed=int(seed),
               in_channels=int(in_channels))


class SyntheticShapes(prepare.LocalBuilder):
  """Synthetic multi-class shapes in 2D images or 3D volumes (see the module docstring)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Ellipsoids, boxes, diamonds; bias field; gaussian noise 0.25.',
      '1.1.0': 'Shells replace diamonds (distinct from boxes in 2D); intensity step 0.5, noise 0.2.',
      # Multi-channel configs (`_cN` names) are new; single-channel data are bit-identical to 1.1.0,
      # so the version stays and prepared copies are reused.
  }
  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    if not isinstance(cfg, SyntheticConfig):
      raise ValueError('SyntheticShapes needs a SyntheticConfig, e.g. '
                       'SyntheticShapes(config=SyntheticConfig.create(...)); use synthetic.load().')
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # BYTES: raw float32 bytes (noise does not compress); labels compress well.
            'image': tfds.features.Tensor(shape=cfg.shape + (cfg.in_channels,), dtype=np.float32,
                                          encoding=tfds.features.Encoding.BYTES),
            'label': tfds.features.Tensor(shape=cfg.shape, dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
        }),
        supervised_keys=('image', 'label'),
        # Keep generation order on disk so that record i is example i of the split.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.num_train),
            'validation': self._generate_examples('validation', cfg.num_val)}

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    for index in range(num):
      yield index, generate_example(_example_rng(cfg.seed, split, index), cfg.shape, cfg.num_classes,
                                    cfg.in_channels)


class _Source:
  """Random-access view of one split with the pipeline's dtypes (float32 image, int32 label)."""

  def __init__(self, source: Sequence[dict[str, np.ndarray]], name: str):
    self._source = source
    self._name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self._source[index]
    return {'image': np.asarray(example['image'], np.float32),
            'label': np.asarray(example['label'], np.int32)}

  def __repr__(self) -> str:
    # Stable across processes: grain checks it when restoring an iterator state.
    return f'SyntheticSource({self._name})'


def load(*, ndim: int, shape: Sequence[int], num_classes: int, num_train: int, num_val: int,
         seed: int, data_dir: str, in_channels: int = 1) -> dict[str, Any]:
  """Returns `{'train': source, 'validation': source}`, generating into `data_dir` on first use.

  A source has `len()` and
  `source[i] -> {'image': float32 [*shape, in_channels], 'label': int32 [*shape]}`.
  """
  config = SyntheticConfig.create(ndim=ndim, shape=shape, num_classes=num_classes,
                                  num_train=num_train, num_val=num_val, seed=seed,
                                  in_channels=in_channels)
  builder = prepare.build_once(SyntheticShapes, config, data_dir)
  sources = builder.as_data_source()
  return {split: _Source(sources[split], f'{builder.info.full_name}/{split}')
          for split in ('train', 'validation')}
