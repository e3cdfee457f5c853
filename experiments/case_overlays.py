"""The ablation report's overlays: a few held-out cases, with the label, each variant's prediction
and each of its DS heads' own prediction side by side (`unet_ds.overlays` draws them).

Every variant is shown by its run of one (fold, seed) pair, the first pair that most variants
ran, so that all columns come from runs that held out the same cases; variants without that pair
are left out, with a note. The cases are the first `num_cases` validation cases of that split
(`split.json` in the run's workdir). Each run's outputs are predicted over the whole case by the
sliding window of `--mode=eval`, from its latest checkpoint.

Runs on synthetic data have no held-out files: they are skipped, with a note.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

OVERLAY_DIR = 'overlays'
FILE_DATA = ('msd', 'folder2d')  # data.name of runs on files (with held-out cases)


@dataclasses.dataclass(frozen=True)
class Result:
  """What `write` made: the PNGs (relative to the report's folder) and notes for the report."""
  paths: list[pathlib.Path]
  notes: list[str]


@dataclasses.dataclass(frozen=True)
class RunModel:
  """One run's held-out cases and its outputs' predictions."""
  cases: list[tuple[str, str, str]]  # (case_id, image, label) of the validation split
  read: Callable[[str, str], dict[str, Any]]  # (image, label) -> example ('image', 'label', ...)
  labels: Callable[[np.ndarray], dict[str, np.ndarray]]  # image -> {'final'/'head k': labels}
  num_classes: int


def on_files(variants: Sequence[Any]) -> bool:
  """Whether the runs are on data files (MSD / 2D folders), so that overlays can be drawn."""
  return any(r.config.get('data.name') in FILE_DATA for v in variants for r in v.runs)


def load_run(workdir: pathlib.Path) -> RunModel:
  """A run's split, reader and every output's sliding-window prediction (latest checkpoint)."""
  # Imported here: the report reads runs without the model stack unless overlays are asked for.
  from unet_ds import overlays  # pylint: disable=g-import-not-at-top
  from unet_ds import predict  # pylint: disable=g-import-not-at-top
  from unet_ds import state as state_lib  # pylint: disable=g-import-not-at-top
  from unet_ds.data import cases as cases_lib  # pylint: disable=g-import-not-at-top

  config = predict.run_config(None, str(workdir))
  setup, state, _ = state_lib.restore(config, str(workdir))
  variables = state.variables()
  apply_fn = lambda x: setup.model.apply(variables, x, train=False)  # noqa: E731
  settings = predict.settings_from_config(config)
  reader = predict.Predictor(lambda x: apply_fn(x)[0], config.data, settings)
  windows = overlays.OutputWindows(apply_fn, settings, int(config.data.in_channels))
  cases = cases_lib.find_labelled(config.data.path, config.data, 'validation',
                                  split=cases_lib.saved_split(str(workdir)))
  return RunModel(cases=cases, read=reader.read, labels=windows.labels,
                  num_classes=max(int(config.data.num_classes), 2))


def common_pair(variants: Sequence[Any]) -> tuple[tuple, list[Any]]:
  """The first (fold, seed) pair run by the most variants, and those variants."""
  counts: dict[tuple, int] = {}
  for v in variants:
    for seed in set(v.seeds):
      counts[seed] = counts.get(seed, 0) + 1
  best = max(counts.values())
  try:
    pair = min(k for k, n in counts.items() if n == best)
  except TypeError:  # values of mixed types
    pair = min((k for k, n in counts.items() if n == best), key=repr)
  return pair, [v for v in variants if pair in v.seeds]


def short_name(variant: Any) -> str:
  """A column title: the variant's differing values ('deep', 'deep nnunet linear')."""
  return ' '.join(str(value) for value in variant.settings.values()) or 'run'


def write(variants: Sequence[Any], out_dir: pathlib.Path, num_cases: int,
          load: Callable[[pathlib.Path], RunModel] | None = None) -> Result:
  """Writes `out_dir/overlays/<case>.png` for the first `num_cases` held-out cases.

  `load` restores a run (default `load_run`).
  """
  from unet_ds import overlays  # pylint: disable=g-import-not-at-top

  load = load or load_run
  if num_cases <= 0 or not variants:
    return Result([], [])
  if not on_files(variants):
    return Result([], ['Overlays skipped: the runs are on synthetic data, which has no held-out '
                       'case files.'])
  pair, shown = common_pair(variants)
  notes = [f'Overlays: each variant\'s run with {pair_text(pair)}, on the first '
           f'{num_cases} validation cases of that split; columns: the label, then per variant its '
           'final prediction and each DS head\'s own (upsampled), by sliding window from the '
           'latest checkpoint.']
  left_out = [v.label for v in variants if v not in shown]
  if left_out:
    notes.append('Not in the overlays (no run with that fold and seed): '
                 + ', '.join(f'`{label}`' for label in left_out) + '.')
  examples: dict[str, dict[str, Any]] = {}
  preds: dict[str, dict[str, np.ndarray]] = {}
  num_classes = 2
  for v in shown:
    run = v.runs[v.seeds.index(pair)]
    try:
      model = load(run.path)
    except Exception as e:  # pylint: disable=broad-except  (the tables stand without overlays)
      logging.exception('overlays: cannot restore %s', run.path)
      notes.append(f'`{v.label}` left out of the overlays: {run.path}: {type(e).__name__}: {e}')
      continue
    num_classes = max(num_classes, model.num_classes)
    name = short_name(v)
    for case_id, image_path, label_path in model.cases[:num_cases]:
      if case_id not in examples:
        if len(examples) >= num_cases:
          continue
        examples[case_id] = model.read(image_path, label_path)
        preds[case_id] = {}
      for output, labels in model.labels(examples[case_id]['image']).items():
        preds[case_id][name if output == 'final' else f'{name} {output}'] = labels
  paths = []
  for case_id, example in examples.items():
    path = out_dir / OVERLAY_DIR / f'{case_id}.png'
    overlays.write_overlay(path, example['image'], example['label'], preds[case_id],
                           spacing=overlays.example_spacing(example), title=case_id,
                           num_classes=num_classes)
    paths.append(path.relative_to(out_dir))
  return Result(paths, notes)


def pair_text(pair: tuple) -> str:
  """'data.fold=0, seed=0' for a pairing key."""
  return ', '.join(f'{k}={v}' for k, v in pair) or 'its only seed'
