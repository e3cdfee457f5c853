"""U-Net family with deep supervision; `get_model(config.model)` is the one factory."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from unet_ds.models import unet

UNet = unet.UNet
UNetConfig = unet.UNetConfig


_RATE_TUPLES = ('down_dropout', 'up_dropout')


def model_config(cfg: Mapping[str, Any]) -> unet.UNetConfig:
  """Converts `config.model` (ConfigDict or dict, with a nested `ds`) to a validated `UNetConfig`.

  Unknown keys are errors that name the key, so a typo never silently falls back to a default.
  """
  cfg = dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
  ds = dict(cfg.pop('ds', {}) or {})
  known = {f.name for f in dataclasses.fields(unet.UNetConfig)}
  kwargs = {}
  ds_keys = sorted(k[3:] for k in known if k.startswith('ds_'))
  for key, value in cfg.items():
    if key not in known or key.startswith('ds_'):
      raise ValueError(f'config.model.{key}: unknown key; known keys: '
                       f'{sorted(k for k in known if not k.startswith("ds_"))} and ds.{ds_keys}')
    if key in _RATE_TUPLES:  # one rate for every level, or one per level
      value = tuple(float(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if key in ('strides', 'kernel_sizes'):  # per level, per axis; JSON lists or tuples
      try:
        value = tuple(tuple(int(f) for f in level) for level in (value or ()))
      except (TypeError, ValueError):
        raise ValueError(f'config.model.{key}: {value!r} is not per-level tuples of per-axis '
                         'values, e.g. ((2, 2, 1), (2, 2, 2))') from None
    kwargs[key] = value
  for key, value in ds.items():
    if key not in ds_keys:
      raise ValueError(f'config.model.ds.{key}: unknown key; known keys: {ds_keys}')
    if key == 'levels' and value is not None:
      value = tuple(int(v) for v in value) or None
    kwargs[f'ds_{key}'] = value
  return unet.UNetConfig(**kwargs)


def get_model(cfg: Mapping[str, Any] | unet.UNetConfig) -> unet.UNet:
  """Builds the U-Net described by `config.model` (or an already typed `UNetConfig`)."""
  if not isinstance(cfg, unet.UNetConfig):
    cfg = model_config(cfg)
  return unet.UNet(cfg)
