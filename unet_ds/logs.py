"""Workdir logs that notebooks read: config.json, metrics.jsonl, eval.jsonl, summary.json, TensorBoard.

Formats (one JSON object per line in the .jsonl files):
- `metrics.jsonl`: `{"step", "loss", "level_losses": [final, head_1, ...], "ds_weights": [...],
  "lr", "grad_norm", "steps_per_s"}`.
- `eval.jsonl`: `{"step", "mean_foreground_dice", "final": M, "heads": [M, ...]}` with
  `M = {"dice": [per class], "iou": [...], "mean_foreground_dice", "mean_foreground_iou"}`.
- `summary.json`: the last eval plus run facts (`train_seconds`, `num_params`, ...).
Only process 0 writes. Each line is one `write`, so a kill or a full disk can only tear the last
line, which then lacks its newline: `read_jsonl` drops such a line with a warning, and the
resume's `truncate_after` rewrites the file without it. Any other malformed line is an error
naming the file and line. Whole-file writes go through `workdir.atomic_write`.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import math
import os
from typing import Any

from absl import logging
import jax
import numpy as np

from unet_ds import workdir


class LogFileError(ValueError):
  """A malformed line in a .jsonl log; the message names the file and line."""


def _parse_jsonl(path: str | os.PathLike[str], required: Sequence[str] = ()
                 ) -> list[tuple[str, dict[str, Any]]]:
  """(line text, object) of each non-blank line; see `read_jsonl`."""
  path = os.fspath(path)
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = f.read().split('\n')
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if i == last == len(lines) - 1:  # no newline after it: a torn final write
        logging.warning('%s:%d: dropping a torn last line (%s): %.80s', path, i + 1, e, line)
        break
      raise LogFileError(f'{path}:{i + 1}: not valid JSON ({e})') from None
    if not isinstance(row, dict):
      raise LogFileError(f'{path}:{i + 1}: expected a JSON object, got {type(row).__name__}')
    missing = [k for k in required if k not in row]
    if missing:
      raise LogFileError(f'{path}:{i + 1}: missing key(s) {", ".join(missing)}')
    rows.append((line, row))
  return rows


def read_jsonl(path: str | os.PathLike[str], required: Sequence[str] = ()
               ) -> list[dict[str, Any]]:
  """The objects of a JSON-lines log, in file order (blank lines skipped).

  A last line without its newline that does not parse is a torn write: dropped with a warning.

  Raises:
    FileNotFoundError: no such file.
    LogFileError: any other malformed line, a non-object line, or one without a `required` key;
      the message starts with `path:line:`.
  """
  return [row for _, row in _parse_jsonl(path, required)]


class Writer:
  """Appends metrics to the workdir's files (and TensorBoard, when tensorboardX is there)."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    """`tensorboard=False`: a writer of workdir files only (no event file is opened)."""
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
    if self.enabled and tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:
        self._tb = None

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def write_json(self, name: str, obj: Any) -> None:
    """`WORKDIR/name` as JSON (NaN/Inf as null), written atomically."""
    if self.enabled:
      workdir.write_json(self.path(name), obj)

  def write_text(self, name: str, text: str) -> None:
    """`WORKDIR/name` holding `text` (e.g. config.json), written atomically."""
    if self.enabled:
      workdir.atomic_write(self.path(name), text)

  def truncate_after(self, step: int) -> None:
    """Drops log lines past `step` (a resumed run re-does those steps) and a torn last line.

    The file is rewritten under a temp name and renamed, so a kill here loses nothing.
    """
    if not self.enabled:
      return
    for name in ('metrics.jsonl', 'eval.jsonl'):
      path = self.path(name)
      if os.path.exists(path):
        keep = [line for line, row in _parse_jsonl(path, required=('step',))
                if row['step'] <= step]
        workdir.atomic_write(path, ''.join(line + '\n' for line in keep))

  def _append(self, name: str, obj: dict[str, Any]) -> None:
    with open(self.path(name), 'a') as f:
      f.write(json.dumps(workdir.json_safe(obj)) + '\n')

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
