"""Reads the workdirs that `python -m unet_ds.main` writes (formats in the project conventions).

A workdir directly under a sweep root is:
  * finished when it holds `summary.json`. Its `config.json`, `summary.json`, `eval.jsonl` and
    `metrics.jsonl` must then all exist and parse: anything missing or malformed raises
    `RunFileError` naming the file (and line), because a report that quietly drops a finished
    seed would be wrong without anyone noticing;
  * unfinished when it holds `config.json` but no `summary.json` (still training, or
    interrupted). It is skipped, with a warning naming it, and listed in the report;
  * skipped with a warning when it holds run files but no `config.json`;
  * ignored when it holds none of these files (e.g. a folder of plots).

What a run's numbers are (`unet_ds.logs` has the formats): the final Dice and its per-class values
are `summary.json`'s whole-image eval of the held-out cases (`mean_foreground_dice`,
`dice_per_class`); the Dice curve and each DS head's own Dice are the in-training scores
(`eval.jsonl`'s `pooled_foreground_dice` per step, `summary.json`'s `heads`). Workdirs of older
versions (in-training scores under `mean_foreground_dice`, per-class Dice in `final`) read the same.
Boundary metrics (`hd95`, `nsd`: per class and their foreground means) are read from the eval
summary (`summary.json`'s `eval`) when the run has them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Sequence

from absl import logging

from experiments import sweep
from unet_ds import logs

CONFIG_FILE = 'config.json'
SUMMARY_FILE = 'summary.json'
EVAL_FILE = 'eval.jsonl'
METRICS_FILE = 'metrics.jsonl'
_RUN_FILES = (CONFIG_FILE, SUMMARY_FILE, EVAL_FILE, METRICS_FILE)


class RunFileError(ValueError):
  """A finished run's file is missing or malformed; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished training run."""
  path: pathlib.Path
  config: dict[str, Any]  # Flattened: {'model.ds.mode': 'deep', ...}, lists as tuples.
  summary: dict[str, Any]
  evals: list[dict[str, Any]]  # Sorted by step.
  metrics: list[dict[str, Any]]  # Sorted by step.

  @property
  def name(self) -> str:
    return self.path.name

  @property
  def dice(self) -> float:
    return number(self.summary['mean_foreground_dice'])

  @property
  def class_dice(self) -> list[float]:
    return [number(d) for d in _class_dice(self.summary)]

  @property
  def head_dice(self) -> list[float]:
    return [number(h['mean_foreground_dice']) for h in self.summary.get('heads', [])]

  def boundary(self, metric: str) -> float:
    """The eval's mean foreground `metric` ('hd95' or 'nsd'); nan when the run has none."""
    return number(self.summary.get('eval', {}).get(f'mean_foreground_{metric}'))

  def eval_curve(self) -> list[tuple[int, float]]:
    """(step, in-training mean foreground Dice) of every eval with a number (NaN is logged as
    null)."""
    return [(int(r['step']), float(d)) for r in self.evals
            if (d := _curve_dice(r)) is not None]


CURVE_KEYS = ('pooled_foreground_dice', 'mean_foreground_dice')  # eval.jsonl: now, then before


def _curve_dice(row: dict[str, Any]) -> float | None:
  return next((row[k] for k in CURVE_KEYS if k in row), None)


def _class_dice(summary: dict[str, Any]) -> list[Any]:
  if 'dice_per_class' in summary:
    return summary['dice_per_class']
  return summary['final']['dice']


def number(value: Any) -> float:
  """A logged number as float; null (how the trainer logs NaN/Inf) becomes nan."""
  return math.nan if value is None else float(value)


@dataclasses.dataclass(frozen=True)
class Skipped:
  path: pathlib.Path
  reason: str


def read_json(path: pathlib.Path) -> Any:
  if not path.is_file():
    raise RunFileError(f'{path}: missing')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise RunFileError(f'{path}: not valid JSON ({e})') from None


def read_jsonl(path: pathlib.Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
  """`logs.read_jsonl` (a torn last line dropped with a warning), errors as RunFileError."""
  if not path.is_file():
    raise RunFileError(f'{path}: missing')
  try:
    return logs.read_jsonl(path, required)
  except logs.LogFileError as e:
    raise RunFileError(str(e)) from None


def load_run(path: pathlib.Path) -> Run:
  """A finished run's files, checked; raises RunFileError naming the file at fault."""
  path = pathlib.Path(path)
  config = read_json(path / CONFIG_FILE)
  if not isinstance(config, dict):
    raise RunFileError(f'{path / CONFIG_FILE}: expected a JSON object')
  summary = read_json(path / SUMMARY_FILE)
  _check_summary(path / SUMMARY_FILE, summary)
  evals = read_jsonl(path / EVAL_FILE, required=('step',))
  for i, row in enumerate(evals):
    if not any(k in row for k in CURVE_KEYS):
      raise RunFileError(f'{path / EVAL_FILE}: record {i + 1} (step {row["step"]}) has none of '
                         f'{", ".join(CURVE_KEYS)}')
  metrics = read_jsonl(path / METRICS_FILE, required=('step', 'loss', 'level_losses'))
  return Run(path=path, config=sweep.flatten(config), summary=summary,
             evals=sorted(evals, key=lambda r: r['step']),
             metrics=sorted(metrics, key=lambda r: r['step']))


def find_runs(root: pathlib.Path) -> tuple[list[Run], list[Skipped]]:
  """Finished runs in the folders directly under root, and the skipped ones (module doc)."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f'{root}: no such directory')
  runs, skipped = [], []
  for path in sorted(p for p in root.iterdir() if p.is_dir()):
    present = [f for f in _RUN_FILES if (path / f).is_file()]
    if not present:
      continue
    if CONFIG_FILE not in present:
      skipped.append(Skipped(path, f'no {CONFIG_FILE} (has {", ".join(present)})'))
    elif SUMMARY_FILE not in present:
      skipped.append(Skipped(path, f'unfinished: no {SUMMARY_FILE}'))
    else:
      runs.append(load_run(path))
  for s in skipped:
    logging.warning('skipping %s: %s', s.path, s.reason)
  return runs, skipped


def _check_summary(path: pathlib.Path, summary: Any) -> None:
  if not isinstance(summary, dict):
    raise RunFileError(f'{path}: expected a JSON object')
  if 'mean_foreground_dice' not in summary:
    raise RunFileError(f'{path}: missing key \'mean_foreground_dice\'')
  if 'dice_per_class' in summary:
    if not isinstance(summary['dice_per_class'], list):
      raise RunFileError(f'{path}: "dice_per_class" must be a list (one per class)')
  elif not isinstance(summary.get('final'), dict) or not isinstance(summary['final'].get('dice'),
                                                                     list):
    raise RunFileError(f'{path}: needs "dice_per_class" or "final" holding a "dice" list (one per '
                       'class)')
  if not isinstance(summary.get('heads', []), list):
    raise RunFileError(f'{path}: "heads" must be a list')
  if not isinstance(summary.get('eval', {}), dict):
    raise RunFileError(f'{path}: "eval" must be an object')
  for i, head in enumerate(summary.get('heads', [])):
    if not isinstance(head, dict) or 'mean_foreground_dice' not in head:
      raise RunFileError(f'{path}: heads[{i}] has no "mean_foreground_dice"')
