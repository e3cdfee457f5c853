"""One U-Net class for 2D and 3D (rank from the input), with the four deep-supervision forms.

`UNet(config).apply(variables, x, train=...) -> (final, intermediates)`; the structure of the
return value never depends on `train` (see `ds.py` for the forms).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_ds.models import blocks
from unet_ds.models import ds
from unet_ds.models import layers

DOWNSAMPLING = ('maxpool', 'conv')
UPSAMPLING = ('transpose', 'resize')
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Typed, validated model hyper-parameters (built from `config.model` by `models.get_model`)."""
  num_classes: int
  depth: int = 4                # resolution levels, including the bottleneck
  base_filters: int = 16
  filter_growth: int = 2        # 2: double per level; 1: constant width (Brats18 FILTER_GROW=False)
  max_filters: int = 320
  convs_per_block: int = 2      # block='preact_residual': residual units per level
  residual: bool = False        # block='conv' only: add the (projected) input, nnU-Net ResEnc
  block: str = 'conv'           # conv (ConvBlock) | preact_residual (TGS salt's level)
  norm: str = 'instance'
  activation: str = 'leaky_relu'
  dropout: float = 0.0          # inside each conv block, after its first conv
  # Dropout rates after each downsampling (levels 1..depth-1) / decoder concatenation (lowest
  # level first); the last rate repeats: (0.25, 0.5) is 0.25 at level 1 and 0.5 further down.
  down_dropout: tuple[float, ...] = ()
  up_dropout: tuple[float, ...] = ()
  down: str = 'maxpool'
  up: str = 'transpose'
  up_kernel: int = 2            # transposed-conv kernel (stride 2): 2, or 3 ('SAME', as Keras)
  # Per-axis pooling factors (1 or 2) of levels 1..depth-1, e.g. ((2, 2, 1), (2, 2, 2), ...) for
  # anisotropic data whose coarse axis waits (unet_ds.plan); () halves every axis at every level.
  strides: tuple[tuple[int, ...], ...] = ()
  # Per-axis conv kernel sizes (1 or 3) of levels 0..depth-1, e.g. ((3, 3, 1), (3, 3, 3), ...):
  # 1 along an axis still much coarser than the others at that level (nnU-Net's rule, planned by
  # unet_ds.plan); () is 3 everywhere. Used by `block='conv'` levels, encoder and decoder alike.
  kernel_sizes: tuple[tuple[int, ...], ...] = ()
  ds_mode: str = 'deep'
  ds_levels: tuple[int, ...] | None = None  # None: every decoder level below full resolution
  ds_fusion: str = 'conv_norm_act'  # hypercolumn: conv_norm_act | conv_act (3x3) | conv1x1_norm_act
  ds_fusion_dropout: float = 0.0    # hypercolumn: dropout on the concatenated column
  conv_impl: str = 'auto'
  dtype: str = 'float32'        # compute dtype; params and logits stay float32
  remat: bool = False           # rematerialise each conv block in the backward pass

  def __post_init__(self):
    def check(cond: bool, msg: str):  # msg starts with the key: 'config.model.depth must ...'
      if not cond:
        raise ValueError(f'config.model.{msg}')
    check(self.num_classes >= 1, f'num_classes must be >= 1, got {self.num_classes}')
    check(self.depth >= 2, f'depth must be >= 2, got {self.depth}')
    check(self.base_filters >= 1, f'base_filters must be >= 1, got {self.base_filters}')
    check(self.filter_growth in (1, 2), f'filter_growth must be 1 or 2, got {self.filter_growth}')
    check(self.convs_per_block >= 1, f'convs_per_block must be >= 1, got {self.convs_per_block}')
    check(self.norm in blocks.NORMS, f'norm must be one of {blocks.NORMS}, got {self.norm!r}')
    check(self.activation in blocks.ACTIVATIONS,
          f'activation must be one of {blocks.ACTIVATIONS}, got {self.activation!r}')
    check(0.0 <= self.dropout < 1.0, f'dropout must be in [0, 1), got {self.dropout}')
    check(self.block in blocks.BLOCKS, f'block must be one of {blocks.BLOCKS}, got {self.block!r}')
    for key in ('down_dropout', 'up_dropout'):
      rates = getattr(self, key)
      check(len(rates) <= self.depth - 1,
            f'{key} has {len(rates)} rates {rates} for depth-1={self.depth - 1} levels')
      check(all(0.0 <= r < 1.0 for r in rates), f'{key} rates must be in [0, 1), got {rates}')
    check(0.0 <= self.ds_fusion_dropout < 1.0,
          f'ds.fusion_dropout must be in [0, 1), got {self.ds_fusion_dropout}')
    check(self.ds_fusion in ds.FUSIONS,
          f'ds.fusion must be one of {ds.FUSIONS}, got {self.ds_fusion!r}')
    if self.strides:
      check(len(self.strides) == self.depth - 1,
            f'strides has {len(self.strides)} levels {self.strides} but depth={self.depth} needs '
            f'depth-1={self.depth - 1} (set both, or strides=() to halve every axis)')
      check(len({len(s) for s in self.strides}) == 1 and all(f in (1, 2) for s in self.strides
                                                            for f in s),
            f'strides {self.strides}: one factor (1 or 2) per spatial axis at every level')
      check(self.up_kernel == 2, f'strides needs up_kernel=2 (kernel == stride), got '
            f'{self.up_kernel}')
    if self.kernel_sizes:
      check(len(self.kernel_sizes) == self.depth,
            f'kernel_sizes has {len(self.kernel_sizes)} levels {self.kernel_sizes} but '
            f'depth={self.depth} needs one per level (or kernel_sizes=() for 3 everywhere)')
      check(len({len(k) for k in self.kernel_sizes}) == 1 and all(
          k in (1, 3) for level in self.kernel_sizes for k in level),
            f'kernel_sizes {self.kernel_sizes}: one size (1 or 3) per spatial axis at every level')
      check(self.block == 'conv', f'kernel_sizes needs block=conv, got block={self.block!r}')
    check(not (self.ds_fusion == 'conv1x1_norm_act' and self.ds_fusion_dropout > 0),
          'ds.fusion_dropout needs a 3x3 fusion (conv_norm_act or conv_act)')
    check(self.up_kernel in (2, 3), f'up_kernel must be 2 or 3, got {self.up_kernel}')
    check(self.down in DOWNSAMPLING, f'down must be one of {DOWNSAMPLING}, got {self.down!r}')
    check(self.up in UPSAMPLING, f'up must be one of {UPSAMPLING}, got {self.up!r}')
    check(self.ds_mode in ds.MODES, f'ds.mode must be one of {ds.MODES}, got {self.ds_mode!r}')
    check(self.conv_impl in layers.IMPLS,
          f'conv_impl must be one of {layers.IMPLS}, got {self.conv_impl!r}')
    check(self.dtype in DTYPES, f'dtype must be one of {DTYPES}, got {self.dtype!r}')
    valid = tuple(range(1, self.depth - 1))
    levels = self.head_levels
    bad = [l for l in levels if l not in valid]
    check(not bad, f'ds.levels {tuple(self.ds_levels or ())} has {bad} outside the decoder levels '
          f'below full resolution {valid} for depth {self.depth}')
    check(len(set(levels)) == len(levels), f'ds.levels has duplicates: {self.ds_levels}')
    if self.ds_mode in ('deep', 'additive'):
      check(bool(levels), f'ds.mode={self.ds_mode!r} needs at least one head level; depth '
            f'{self.depth} has decoder levels {valid} (use depth >= 3 or ds.mode=none)')

  @property
  def head_levels(self) -> tuple[int, ...]:
    """Decoder levels that get a head, sorted highest resolution (level 1) first."""
    if self.ds_mode == 'none':
      return ()
    if self.ds_levels is None:
      return tuple(range(1, self.depth - 1))
    return tuple(sorted(self.ds_levels))

  @property
  def num_outputs(self) -> int:
    """1 (final) + the number of heads: the length of the DS weight vector."""
    return 1 + len(self.head_levels)

  def filters(self, level: int) -> int:
    return min(self.base_filters * self.filter_growth ** level, self.max_filters)

  def level_rate(self, key: str, index: int) -> float:
    """The `down_dropout` / `up_dropout` rate of the `index`-th downsampling / decoder step."""
    rates = getattr(self, key)
    if not rates:
      return 0.0
    return float(rates[min(index, len(rates) - 1)])

  @property
  def size_multiple(self) -> int:
    """Every spatial size must be divisible by this when every axis is halved per level (see
    `size_multiples` for per-axis `strides`)."""
    return 2 ** (self.depth - 1)

  def level_factors(self, rank: int) -> tuple[tuple[int, ...], ...]:
    """Per-axis pooling factors of levels 1..depth-1 (`strides`, default 2 everywhere)."""
    return self._per_level('strides', rank, 2, self.depth - 1)

  def level_kernels(self, rank: int) -> tuple[tuple[int, ...], ...]:
    """Per-axis conv kernel sizes of levels 0..depth-1 (`kernel_sizes`, default 3 everywhere)."""
    return self._per_level('kernel_sizes', rank, 3, self.depth)

  def _per_level(self, key: str, rank: int, default: int, levels: int
                 ) -> tuple[tuple[int, ...], ...]:
    value = getattr(self, key)
    if not value:
      return ((default,) * rank,) * levels
    if len(value[0]) != rank:
      raise ValueError(f'config.model.{key} {value} has {len(value[0])} axes per level; the '
                       f'data has {rank}')
    return tuple(tuple(v) for v in value)

  def size_multiples(self, rank: int) -> tuple[int, ...]:
    """What each spatial size must be divisible by: the product of its pooling factors."""
    out = [1] * rank
    for factors in self.level_factors(rank):
      out = [m * f for m, f in zip(out, factors)]
    return tuple(out)


class UNet(nn.Module):
  """U-Net over channels-last 2D (NHWC) or 3D (NDHWC) inputs."""
  config: UNetConfig

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim not in (4, 5):
      raise ValueError(f'UNet input must be [B, H, W, C] or [B, D, H, W, C], got shape {x.shape}')
    spatial = x.shape[1:-1]
    m = self.config.size_multiples(len(spatial))
    if any(s % k for s, k in zip(spatial, m)):
      needed = tuple(-(-s // k) * k for s, k in zip(spatial, m))
      what = (f'{m[0]} (2^(depth-1), depth={self.config.depth})' if not self.config.strides else
              f'{m} per axis (the pooling factors of strides={self.config.strides})')
      raise ValueError(
          f'UNet input spatial shape {spatial} must be divisible by {what}; pad it to {needed} '
          'or crop it (sliding-window prediction pads automatically)')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    cfg = self.config
    self._check_input(x)
    impl = layers.resolve_impl(cfg.conv_impl)
    dtype = jnp.bfloat16 if cfg.dtype == 'bfloat16' else None
    remat = (lambda cls: nn.remat(cls, static_argnums=(2,))) if cfg.remat else (lambda cls: cls)

    kernels = cfg.level_kernels(x.ndim - 2)

    def block(level: int, strides: int, name: str):
      features = cfg.filters(level)
      if cfg.block == 'preact_residual':
        return remat(blocks.PreActResidualStage)(features, cfg.convs_per_block, strides, cfg.norm,
                                                 cfg.activation, impl, dtype, name=name)
      return remat(blocks.ConvBlock)(features, cfg.convs_per_block, strides, cfg.residual,
                                     cfg.norm, cfg.activation, cfg.dropout, impl, dtype,
                                     kernel_size=kernels[level], name=name)

    def dropout(x: jax.Array, rate: float) -> jax.Array:
      return nn.Dropout(rate, deterministic=not train)(x) if rate > 0 else x

    # Encoder: level l has resolution 1/2^l (per axis: the product of its factors).
    factors = cfg.level_factors(x.ndim - 2)
    skips = []
    for level in range(cfg.depth):
      strides = 1
      if level > 0:
        if cfg.down == 'maxpool':
          x = layers.max_pool(x, factors[level - 1], impl)
        else:
          strides = factors[level - 1]
        x = dropout(x, cfg.level_rate('down_dropout', level - 1))
      x = block(level, strides, f'enc_l{level}')(x, train)
      skips.append(x)

    # Decoder: features[l] is the decoder output at level l (0 = full resolution).
    features = [None] * (cfg.depth - 1)
    for step, level in enumerate(reversed(range(cfg.depth - 1))):
      skip = skips[level]
      f = cfg.filters(level)
      if cfg.up == 'transpose' and cfg.up_kernel == 3:
        x = blocks.SameConvTranspose(f, impl, dtype, name=f'up_l{level}')(x)
      elif cfg.up == 'transpose':
        x = layers.ConvTranspose(f, factors[level], factors[level], impl, dtype,
                                 name=f'up_l{level}')(x)
      else:
        x = layers.resize(x, skip.shape[1:-1], 'linear', impl)
        x = layers.Conv(f, 1, impl=impl, dtype=dtype, name=f'up_l{level}')(x)
      rate = cfg.level_rate('up_dropout', step)
      if rate > 0:
        x = dropout(jnp.concatenate([x.astype(skip.dtype), skip], axis=-1), rate)
      else:  # the block's convs take [x, skip] as parts: no concatenated copy (layers.Conv)
        x = (x.astype(skip.dtype), skip)
      x = block(level, 1, f'dec_l{level}')(x, train)
      features[level] = x

    return ds.DSOutput(cfg.ds_mode, cfg.head_levels, cfg.num_classes, cfg.filters(0),
                       cfg.norm, cfg.activation, impl, dtype, fusion=cfg.ds_fusion,
                       fusion_dropout=cfg.ds_fusion_dropout, name='ds')(features, train)

