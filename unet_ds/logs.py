"""Workdir logs that notebooks read: config.json, metrics.jsonl, eval.jsonl, summary.json, TensorBoard.

Formats (one JSON object per line in the .jsonl files):
- `metrics.jsonl`: `{"step", "loss", "level_losses": [final, head_1, ...], "ds_weights": [...],
  "lr", "grad_norm", "steps_per_s"}`.
- `eval.jsonl`: `{"step", "mean_foreground_dice", "final": M, "heads": [M, ...]}` with
  `M = {"dice": [per class], "iou": [...], "mean_foreground_dice", "mean_foreground_iou"}`.
- `summary.json`: the last eval plus run facts (`train_seconds`, `num_params`, ...).
Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np


def _clean(value: Any) -> Any:
  """JSON-safe: arrays to lists, NaN/Inf to null."""
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return _clean(np.asarray(value).tolist())
  if isinstance(value, (np.generic,)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class Writer:
  """Appends metrics to the workdir's files (and TensorBoard, when tensorboardX is there)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:
        self._tb = None

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def write_json(self, name: str, obj: Any) -> None:
    if self.enabled:
      tmp = self.path(name + '.tmp')
      with open(tmp, 'w') as f:
        json.dump(_clean(obj), f, indent=2)
      os.replace(tmp, self.path(name))  # never a half-written file

  def truncate_after(self, step: int) -> None:
    """Drops log lines past `step` (a resumed run re-does those steps)."""
    if not self.enabled:
      return
    for name in ('metrics.jsonl', 'eval.jsonl'):
      path = self.path(name)
      if os.path.exists(path):
        with open(path) as f:
          keep = [l for l in f if l.strip() and json.loads(l)['step'] <= step]
        with open(path, 'w') as f:
          f.writelines(keep)

  def _append(self, name: str, obj: dict[str, Any]) -> None:
    with open(self.path(name), 'a') as f:
      f.write(json.dumps(_clean(obj)) + '\n')

  def _scalars(self, prefix: str, step: int, obj: dict[str, Any]) -> None:
    if self._tb is None:
      return
    for key, value in obj.items():
      if key == 'step':
        continue
      if isinstance(value, dict):
        self._scalars(f'{prefix}/{key}', step, value)
      elif isinstance(value, (list, tuple, np.ndarray)):
        for i, v in enumerate(np.asarray(value, dtype=object).ravel()):
          if v is not None:
            self._scalars(prefix, step, {f'{key}/{i}': v})
      elif isinstance(value, (int, float, np.number)) and math.isfinite(float(value)):
        self._tb.add_scalar(f'{prefix}/{key}', float(value), step)

  def write_train(self, record: dict[str, Any]) -> None:
    if self.enabled:
      self._append('metrics.jsonl', record)
      self._scalars('train', record['step'], record)

  def write_eval(self, record: dict[str, Any]) -> None:
    if self.enabled:
      self._append('eval.jsonl', record)
      self._scalars('eval', record['step'], record)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
