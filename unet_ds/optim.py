"""Optimizers and learning-rate schedules from `config.optim`."""

from __future__ import annotations

from typing import Any

import optax


def lr_schedule(cfg: Any, total_steps: int) -> optax.Schedule:
  """constant | cosine with linear warmup | poly (nnU-Net: lr * (1 - t/T)^0.9)."""
  lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
  if cfg.schedule == 'constant':
    return optax.constant_schedule(lr)
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, total_steps - 1) if warmup else 0,
                                              max(total_steps, 1))
  if cfg.schedule == 'poly':
    return optax.polynomial_schedule(lr, 0.0, float(cfg.poly_power), max(total_steps, 1))
  raise ValueError(f'config.optim.schedule: unknown {cfg.schedule!r}')


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                        optax.Schedule]:
  """(optimizer, lr schedule): adamw or SGD with Nesterov momentum (nnU-Net), global-norm clip."""
  schedule = lr_schedule(cfg, total_steps)
  if cfg.name == 'adamw':
    tx = optax.adamw(schedule, weight_decay=float(cfg.weight_decay))
  elif cfg.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(float(cfg.weight_decay)),
                     optax.sgd(schedule, momentum=float(cfg.momentum), nesterov=True))
  else:
    raise ValueError(f'config.optim.name: unknown {cfg.name!r}')
  if cfg.grad_clip and cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)), tx)
  return tx, schedule
