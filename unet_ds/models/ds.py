"""Deep-supervision output stages: how decoder features become `(final, intermediates)`.

All four forms share one contract: `intermediates` holds one logit map per chosen decoder level,
ordered from the highest resolution to the lowest, each at its own resolution (`()` for `none`).

- `none`: a 1x1 head on the full-resolution decoder features.
- `deep`: the same, plus a 1x1 head per chosen level, each trained with its own weighted loss
  (CPM, nnU-Net, MONAI DynUNet).
- `additive`: the per-level heads are accumulated from the lowest level upwards,
  `acc = up(acc) + head_l`, and added into the final logits (3DUnet-Tensorflow-Brats18); one loss
  on `final`, heads may get side losses.
- `hypercolumn`: decoder features of every level resized to full size, concatenated and fused by
  a 3x3 conv-norm-act (`fusion='conv_norm_act'`) or conv-act with a bias (`'conv_act'`, the TGS
  kernel), after an optional dropout, + 1x1 into the final logits (Kaggle TGS salt); per-level
  heads for optional side losses. `'conv1x1_norm_act'` fuses by a 1x1 conv-norm-act instead,
  computed without building the column: a 1x1 conv of the column is the sum of each level's own
  1x1 projection, resized (linear resizing and channel mixing commute), so every projection
  runs at its level's resolution (about the FLOPs of `none`, the 3x3 fusion about twice). Its
  remaining CPU cost over `none` is largely the full-size linear resizes (oneDNN resampling
  under `conv_impl=onednn`, `layers.resize`), the rest the full-resolution projection and norm;
  docs/results.md, "DS cost per form", has the measurements.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_ds.models import blocks
from unet_ds.models import layers

MODES = ('none', 'deep', 'additive', 'hypercolumn')
FUSIONS = ('conv_norm_act', 'conv_act', 'conv1x1_norm_act')


class Head(nn.Module):
  """1x1 conv to class logits; logits are always float32 (losses are computed in fp32)."""
  num_classes: int
  impl: str = 'native'
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.Conv(self.num_classes, 1, impl=self.impl, dtype=self.dtype)(x)
    return y.astype(jnp.float32)


class DSOutput(nn.Module):
  """Turns decoder features `features[l]` (level l = resolution 1/2^l) into `(final, intermediates)`."""
  mode: str
  levels: tuple[int, ...]
  num_classes: int
  fusion_features: int
  norm: str = 'instance'
  act: str = 'leaky_relu'
  impl: str = 'native'
  dtype: Any = None
  fusion: str = 'conv_norm_act'
  fusion_dropout: float = 0.0

  @nn.compact
  def __call__(self, features: Sequence[jax.Array],
               train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    if self.mode not in MODES:
      raise ValueError(f'model.ds.mode must be one of {MODES}, got {self.mode!r}')
    full = features[0]
    heads = tuple(Head(self.num_classes, self.impl, self.dtype, name=f'head_l{l}')(features[l])
                  for l in self.levels)

    if self.mode == 'hypercolumn':
      if self.fusion not in FUSIONS:
        raise ValueError(f'model.ds.fusion must be one of {FUSIONS}, got {self.fusion!r}')
      size = full.shape[1:-1]
      if self.fusion == 'conv1x1_norm_act':
        if self.fusion_dropout > 0:
          raise ValueError('model.ds.fusion_dropout needs a 3x3 fusion (the 1x1 one never builds '
                           'the column it would drop from)')
        projections = [
            layers.Conv(self.fusion_features, 1, use_bias=self.norm == 'none', impl=self.impl,
                        dtype=self.dtype, name=f'fusion_l{l}')(f)
            for l, f in enumerate(features)]
        column = sum(layers.resize(p, size, impl=self.impl) for p in projections)
        fused = blocks.norm_act(column, self.norm, self.act, self.impl, self.dtype, train,
                                name='fusion_norm')
      else:
        column = jnp.concatenate([layers.resize(f, size, impl=self.impl) for f in features],
                                 axis=-1)
        if self.fusion_dropout > 0:
          column = nn.Dropout(self.fusion_dropout, deterministic=not train)(column)
        norm = self.norm if self.fusion == 'conv_norm_act' else 'none'  # 'none': conv with bias
        fused = blocks.ConvNormAct(self.fusion_features, 3, 1, norm, self.act, self.impl,
                                   self.dtype, name='fusion')(column, train)
      final = Head(self.num_classes, self.impl, self.dtype, name='final_head')(fused)
    else:
      final = Head(self.num_classes, self.impl, self.dtype, name='final_head')(full)

    if self.mode == 'additive':
      acc = None
      for head in reversed(heads):  # lowest resolution first: acc = up(acc) + head
        acc = head if acc is None else head + layers.resize(acc, head.shape[1:-1], impl=self.impl)
      final = final + layers.resize(acc, final.shape[1:-1], impl=self.impl)

    return final, (() if self.mode == 'none' else heads)
