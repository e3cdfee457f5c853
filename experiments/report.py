"""Ablation report over a sweep root: which DS form (or weights) gave the best Dice, and how sure.

    python -m experiments.report ROOT [--target-dice 0.8] [--out DIR] [--ignore KEY ...]
                                      [--overlays N]

Reads every finished workdir `ROOT/*/` (see `experiments.runs` for what counts as finished and
what is skipped) and writes into `--out` (default ROOT):
  * `report.md`: a line naming the winner (only when its paired 95% interval against the
    baseline excludes 0; else the highest mean, marked unsettled), the per-variant table, the
    plots, the runs;
  * `report.csv`: one row per variant, full precision; `runs.csv`: one row per run;
  * `dice_vs_step.png` (validation Dice per variant, mean and spread over seeds) and
    `level_losses.png` (training loss of each output level per variant);
  * `overlays/<case>.png` for the first N held-out cases (`--overlays`, default 3 for runs on data
    files, none for synthetic data): the label, each variant's prediction and each of its DS
    heads' own, over the image (see `experiments.case_overlays`).

Variants: runs whose configs are equal once seeds (`seed`, `*_seed` keys), folds (`data.fold`,
`data.val_cases`: which cases are held out), workdir-like keys and `--ignore` keys are removed;
a key that some runs record and an older run lacks counts at its default for that run
(`config_lib.fill_defaults`: it trained with what is now the default), so code that gained config
keys while a sweep ran splits no variant.
A variant's label is the keys on which variants differ (e.g. `model.ds.mode=deep`). Numbers per
variant, over its seeds: mean ± std (ddof=1) of the final mean foreground Dice (`summary.json`:
the whole-image eval of the held-out cases) and of each class's Dice; the eval's HD95 and NSD
when the runs have them; steps to reach the target Dice (the first in-training eval in
`eval.jsonl` at or above it; mean ± std over the runs that reached it, and how many did); each DS
head's own final in-training Dice; and against the baseline (the variant with
`model.ds.mode == 'none'`; with several, the one differing in fewest keys) the paired difference
of final Dice, paired by seed, with a two-sided 95% t interval (n/a for a single pair).

Cross-validation (runs that differ in their fold): a fold is treated like a seed. Runs pair
across variants by (fold, seed), the numbers above are over all of a variant's runs, and
report.md adds a per-fold table (each variant's mean Dice per fold, and its paired difference to
the baseline within each fold), also written as `folds.csv`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import pathlib
import sys
from typing import Any, Sequence

from absl import logging

from experiments import case_overlays
from experiments import plots
from experiments import runs as runs_lib
from experiments import stats
from experiments import sweep
from unet_ds import config_lib

BASELINE_KEY = 'model.ds.mode'
BASELINE_VALUE = 'none'
# Keys that choose the held-out cases: runs that differ only in these are folds of one variant.
FOLD_KEYS = ('data.fold', 'data.val_cases')
BOUNDARY_METRICS = ('hd95', 'nsd')
_BOUNDARY_TITLES = {'hd95': 'HD95 (mm)', 'nsd': 'NSD'}
_PATH_LEAVES = frozenset({'workdir', 'checkpoint_dir', 'log_dir', 'output_dir'})
_UNSET = '<unset>'


@dataclasses.dataclass(frozen=True)
class Variant:
  """The runs of one variant (sorted by seed) and what the report says of them."""
  label: str
  settings: dict[str, Any]  # The keys on which variants differ, with this variant's values.
  config: dict[str, Any]  # The flattened config without seed and path keys.
  runs: list[runs_lib.Run]
  # Per run: the (key, value) pairs of its seed keys, and of its fold keys in cross-validation;
  # pairs runs across variants.
  seeds: list[tuple]
  folds: list[tuple]  # Per run: the (key, value) pairs of its fold keys; () without folds.
  dice: tuple[float, float]  # (mean, std) of the final mean foreground Dice.
  class_dice: list[tuple[float, float]]
  head_dice: list[tuple[float, float]]  # Highest -> lowest resolution.
  # (mean, std) of the eval's mean foreground HD95 (mm) and NSD, over the runs that have them.
  boundary: dict[str, tuple[float, float]]
  steps_to_target: list[int | None]  # Per run.
  is_baseline: bool
  baseline: str | None = None  # Label of the baseline this variant is compared with.
  vs_baseline: stats.PairedDifference | None = None

  @property
  def n(self) -> int:
    return len(self.runs)

  @property
  def steps_reached(self) -> list[int]:
    return [s for s in self.steps_to_target if s is not None]

  @property
  def train_seconds(self) -> float:
    values = [r.summary['train_seconds'] for r in self.runs if 'train_seconds' in r.summary]
    return stats.mean_std(values)[0]


@dataclasses.dataclass(frozen=True)
class Report:
  root: pathlib.Path
  target_dice: float
  variants: list[Variant]  # Baselines first, then by label.
  skipped: list[runs_lib.Skipped]
  folds: list[tuple] = dataclasses.field(default_factory=list)  # Sorted; [] without folds.
  baseline: tuple[str, str] = (BASELINE_KEY, BASELINE_VALUE)  # (key, value as labels show it)

  def _repr_markdown_(self) -> str:  # Notebooks show the report as its markdown.
    return markdown(self)

  @property
  def winners(self) -> list[Variant]:
    """The variants with the highest mean final Dice (NaN means never win)."""
    scored = [v for v in self.variants if not math.isnan(v.dice[0])]
    best = max((v.dice[0] for v in scored), default=None)
    return [v for v in scored if v.dice[0] == best]


def build(root: str | pathlib.Path, target_dice: float = 0.8,
          ignore: Sequence[str] = (), baseline: str | None = None) -> Report:
  """Reads the runs under root and computes every number of the report.

  `baseline`: 'KEY=VALUE', the variants every other one is compared with (default
  `model.ds.mode=none`); e.g. `loss.ds_weights=exp` for a sweep of DS weights without a no-DS run.
  """
  root = pathlib.Path(root)
  found, skipped = runs_lib.find_runs(root)
  if not found:
    one_run = (root / runs_lib.SUMMARY_FILE).is_file()
    raise ValueError(f'{root}: no finished runs (no */summary.json)'
                     + (f'; skipped {len(skipped)} unfinished' if skipped else '')
                     + (f'; {root} is one run: give the folder that holds the runs to compare '
                        f'({root.resolve().parent})' if one_run else ''))
  fold_keys = [k for k in FOLD_KEYS if k not in ignore
               and len({_hashable(r.config.get(k, _UNSET)) for r in found}) > 1]
  groups: dict[tuple, list[runs_lib.Run]] = {}
  for run, config in zip(found, with_missing_defaults([r.config for r in found])):
    groups.setdefault(_variant_key(config, ignore), []).append(run)
  keys = list(groups)
  all_config_keys = sorted({k for key in keys for k, _ in key})
  differing = [k for k in all_config_keys
               if len({dict(key).get(k, _UNSET) for key in keys}) > 1]

  labels = _labels([dict(key) for key in keys], differing)
  base_key, base_value = _parse_baseline(baseline, [dict(key) for key in keys])
  variants = []
  for key, label in zip(keys, labels):
    config = dict(key)
    settings = {k: config.get(k, _UNSET) for k in differing}
    is_baseline = _format(config.get(base_key, _UNSET)) == base_value
    variants.append(_summarise(label, settings, config, groups[key], target_dice, is_baseline,
                               ignore, fold_keys))
  variants.sort(key=lambda v: (not v.is_baseline, v.label))
  variants = _compare_with_baselines(variants)
  folds = _sorted({f for v in variants for f in v.folds}) if fold_keys else []
  return Report(root=root, target_dice=target_dice, variants=variants, skipped=skipped,
                folds=folds, baseline=(base_key, base_value))


def _parse_baseline(text: str | None, configs: Sequence[dict[str, Any]]) -> tuple[str, str]:
  """(key, value) of `--baseline=KEY=VALUE`; a key or value no variant has is named."""
  if not text:
    return BASELINE_KEY, BASELINE_VALUE
  key, sep, value = text.partition('=')
  key = key.strip().removeprefix('config.')
  if not sep or not key:
    raise ValueError(f'--baseline={text}: expected KEY=VALUE, e.g. loss.ds_weights=exp')
  values = sorted({_format(c[key]) for c in configs if key in c})
  if not values:
    raise ValueError(f'--baseline={text}: no run has the config key {key!r}')
  if value not in values:
    raise ValueError(f'--baseline={text}: no variant has {key}={value}; its values: '
                     + ', '.join(values))
  return key, value


def with_missing_defaults(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each flattened config with the keys that others of `configs` have and it lacks, at their
  defaults (`config_lib.fill_defaults`).

  A run written before a key existed trained with what is now its default, so it groups with the
  runs that record that default instead of forming a variant of its own. Only keys some run has
  are filled: a hand-made or trimmed config does not gain the whole base config (seed keys among
  them, which `_summarise` reads from the run's own config).
  """
  present = set().union(*configs) if configs else set()
  out = []
  for config in configs:
    missing = present - config.keys()
    if missing:
      data = {'ndim': config.get('data.ndim', 3), 'name': config.get('data.name')}
      defaults = sweep.flatten(config_lib.fill_defaults({'data': data}))
      config = {**{k: defaults[k] for k in missing if k in defaults}, **config}
    out.append(config)
  return out


def _variant_key(config: dict[str, Any], ignore: Sequence[str]) -> tuple:
  return tuple(sorted((k, v) for k, v in config.items()
                      if not _is_seed_key(k) and not _is_path_key(k) and k not in FOLD_KEYS
                      and k not in ignore))


def _hashable(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def _sorted(items: Any) -> list:
  try:
    return sorted(items)
  except TypeError:  # values of mixed types
    return sorted(items, key=repr)


def _is_seed_key(key: str) -> bool:
  leaf = key.rsplit('.', 1)[-1]
  return leaf == 'seed' or leaf.endswith('_seed')


def _is_path_key(key: str) -> bool:
  return key.rsplit('.', 1)[-1] in _PATH_LEAVES


def _inert(key: str, config: dict[str, Any]) -> bool:
  """A DS setting of a run without DS (`model.ds.mode=none`): it trains nothing, so a label
  showing it (`loss.ds_weights=exp` on the baseline) would suggest a weighted baseline."""
  return (config.get(BASELINE_KEY) == BASELINE_VALUE and key != BASELINE_KEY
          and key.startswith(('loss.ds_', 'model.ds.')))


def _labels(configs: Sequence[dict[str, Any]], differing: Sequence[str]) -> list[str]:
  """Each variant's label: the differing keys and values, without those `_inert` for it
  (unless that would give two variants one label)."""
  def label(config, drop):
    return ' '.join(f'{k}={_format(config.get(k, _UNSET))}' for k in differing
                    if not (drop and _inert(k, config))) or fallback(config)

  def fallback(config):  # one variant: say which form it is, not just that it is everything
    return (f'{BASELINE_KEY}={_format(config[BASELINE_KEY])} (all runs)'
            if BASELINE_KEY in config else '(all runs)')
  short = [label(c, True) for c in configs]
  return short if len(set(short)) == len(short) else [label(c, False) for c in configs]


def _summarise(label: str, settings: dict[str, Any], config: dict[str, Any],
               runs: list[runs_lib.Run], target_dice: float, is_baseline: bool,
               ignore: Sequence[str], fold_keys: Sequence[str] = ()) -> Variant:
  folds = [tuple((k, r.config.get(k, _UNSET)) for k in fold_keys) for r in runs]
  seeds = [f + tuple(sorted((k, v) for k, v in r.config.items()
                            if _is_seed_key(k) and k not in ignore))
           for r, f in zip(runs, folds)]
  try:
    order = sorted(range(len(runs)), key=lambda i: seeds[i])
  except TypeError:  # seed values of mixed types
    order = sorted(range(len(runs)), key=lambda i: repr(seeds[i]))
  runs, seeds, folds = ([runs[i] for i in order], [seeds[i] for i in order],
                        [folds[i] for i in order])
  for a, b in zip(seeds, seeds[1:]):
    if a == b:
      same = [str(r.path) for r, s in zip(runs, seeds) if s == a]
      raise ValueError(f'runs {" and ".join(same)} are the same variant with the same seeds '
                       f'{dict(a)}; they cannot be told apart (move one away or --ignore a key)')
  for what, get in (('classes', lambda r: len(r.class_dice)), ('DS heads', lambda r: len(r.head_dice))):
    counts = {get(r) for r in runs}
    if len(counts) > 1:
      detail = ', '.join(f'{r.path / runs_lib.SUMMARY_FILE}: {get(r)}' for r in runs)
      raise ValueError(f'variant {label}: runs have different numbers of {what} ({detail})')
  return Variant(
      label=label, settings=settings, config=config, runs=runs, seeds=seeds, folds=folds,
      dice=stats.mean_std([r.dice for r in runs]),
      class_dice=[stats.mean_std(c) for c in zip(*[r.class_dice for r in runs])],
      head_dice=[stats.mean_std(h) for h in zip(*[r.head_dice for r in runs])],
      boundary={m: stats.mean_std([x for r in runs if not math.isnan(x := r.boundary(m))])
                for m in BOUNDARY_METRICS},
      steps_to_target=[_steps_to_target(r, target_dice) for r in runs],
      is_baseline=is_baseline)


def heads_inert(variant: Variant) -> bool:
  """Whether a DS variant weighted every head 0 at every logged step (`metrics.jsonl`'s
  `ds_weights`, final output first): it trained as a plain U-Net."""
  weights = [m['ds_weights'] for r in variant.runs for m in r.metrics if m.get('ds_weights')]
  return bool(weights) and all(len(w) > 1 and not any(w[1:]) for w in weights)


def _steps_to_target(run: runs_lib.Run, target: float) -> int | None:
  for step, dice in run.eval_curve():
    if dice >= target:
      return step
  return None


def _compare_with_baselines(variants: list[Variant]) -> list[Variant]:
  """Each non-baseline variant compared with the baseline whose config differs in fewest keys."""
  baselines = [v for v in variants if v.is_baseline]
  out = []
  for v in variants:
    if v.is_baseline or not baselines:
      out.append(v)
      continue
    distance = {b.label: sum(v.config.get(k, _UNSET) != b.config.get(k, _UNSET)
                             for k in v.config.keys() | b.config.keys())
                for b in baselines}
    best = min(distance.values())
    nearest = [b for b in baselines if distance[b.label] == best]
    if len(nearest) > 1:
      logging.warning('variant %s: %d baselines are equally close, not compared', v.label,
                      len(nearest))
      out.append(v)
      continue
    base = nearest[0]
    diff = stats.paired_difference(dict(zip(v.seeds, (r.dice for r in v.runs))),
                                   dict(zip(base.seeds, (r.dice for r in base.runs))))
    out.append(dataclasses.replace(v, baseline=base.label, vs_baseline=diff))
  return out


@dataclasses.dataclass(frozen=True)
class FoldResult:
  """One variant on one fold: its runs' final Dice over seeds, and against its baseline."""
  variant: str
  fold: tuple  # (key, value) pairs of the fold keys.
  n: int
  dice: tuple[float, float]  # (mean, std) over the fold's seeds.
  vs_baseline: stats.PairedDifference | None  # Paired by seed within the fold.


def per_fold(report: Report) -> list[FoldResult]:
  """Each variant's results on each fold it ran (empty without cross-validation)."""
  if not report.folds:
    return []
  by_label = {v.label: v for v in report.variants}
  out = []
  for v in report.variants:
    base = by_label.get(v.baseline) if v.baseline else None
    for fold in report.folds:
      mine = _fold_dice(v, fold)
      if not mine:
        continue
      diff = stats.paired_difference(mine, _fold_dice(base, fold)) if base else None
      out.append(FoldResult(variant=v.label, fold=fold, n=len(mine),
                            dice=stats.mean_std(list(mine.values())), vs_baseline=diff))
  return out


def _fold_dice(v: Variant, fold: tuple) -> dict[tuple, float]:
  return {s: r.dice for r, s, f in zip(v.runs, v.seeds, v.folds) if f == fold}


def fold_label(fold: tuple) -> str:
  """'fold 3' (from `data.fold`), else the held-out cases."""
  values = dict(fold)
  if 'data.fold' in values:
    return f'fold {values["data.fold"]}'
  return ' '.join(f'{k}={_format(v)}' for k, v in fold)


# ----------------------------------------------------------------------------------------------
# Rendering.


def headline(report: Report) -> str:
  """One line: which variant won, named only when its paired 95% interval against the baseline
  excludes 0; otherwise the highest mean, marked as not settled."""
  winners = report.winners
  if not winners:
    return 'No variant has a final Dice (all are NaN).'
  if len(report.variants) == 1:
    v = winners[0]
    return f'Only one variant ({v.label}): mean foreground Dice {_pm(v.dice, v.n)}.'
  if len(winners) > 1:
    return ('No winner: ' + ', '.join(f'`{w.label}`' for w in winners)
            + f' share the highest mean foreground Dice, {winners[0].dice[0]:.4f}.')
  w = winners[0]
  top = f'`{w.label}`, mean foreground Dice {_pm(w.dice, w.n)}'
  # The top mean against means over other run counts (a failed or missing seed) is no ranking.
  rivals = [v for v in report.variants if v.label == w.baseline] if not w.is_baseline else [
      v for v in report.variants if v is not w]
  counts = sorted({w.n, *(v.n for v in rivals)})
  uneven = ('' if len(counts) == 1 else
            f' (run counts differ, {counts[0]} to {counts[-1]}: the means are over different '
            'seeds; the paired differences in the table are the comparison)')
  pairs = '(fold, seed) runs' if report.folds else 'seeds'
  if w.is_baseline:
    ahead = [v for v in report.variants if uneven and v.vs_baseline is not None
             and v.vs_baseline.n > 0 and v.vs_baseline.mean > 0]
    if ahead:  # the baseline's mean is over other runs than theirs: say what pairing shows
      a = max(ahead, key=lambda v: v.vs_baseline.mean)
      d = a.vs_baseline
      ci = (f', 95% CI [{d.ci_low:+.4f}, {d.ci_high:+.4f}]' if d.excludes_zero is not None
            else ', no interval')
      return (f'No winner named: the highest mean is the baseline {top}{uneven}; paired with it, '
              f'`{a.label}` is {d.mean:+.4f} over {d.n} {pairs if d.n > 1 else pairs[:-1]}{ci}.')
    if not any(v.vs_baseline is not None and v.vs_baseline.excludes_zero is not None
               for v in report.variants):  # nothing to settle it: say so, no bold claim
      return (f'No variant beat the baseline in these runs, but none has an interval (needs at '
              f'least 2 paired seeds): the highest mean is the baseline {top}{uneven}.')
    return (f'**No DS variant beat the baseline**: the highest mean is the baseline {top}'
            + _settled_elsewhere(report) + uneven + '.')
  if w.vs_baseline is None:
    if not any(v.is_baseline for v in report.variants):
      key, value = report.baseline
      return (f'No winner named: highest mean {top}; no `{key}={value}` baseline among the runs '
              'to compare with (--baseline=KEY=VALUE names another).')
    return f'No winner named: highest mean {top}; several baselines are equally close.'
  d = w.vs_baseline
  versus = f' vs baseline `{w.baseline}`: {d.mean:+.4f}'
  if d.n == 0:
    return f'No winner named: highest mean {top}{versus} (no {pairs} in common to pair){uneven}.'
  if d.excludes_zero is None:
    why = ('needs at least 2 pairs' if d.n < 2 else
           'a paired difference is not a number: a run\'s Dice is NaN')
    one = f'1 paired {pairs[:-1]}' if d.n == 1 else f'{d.n} paired {pairs}'
    return (f'No winner named: highest mean {top}{versus} over {one}, no interval ({why})'
            f'{uneven}.')
  ci = f', 95% CI [{d.ci_low:+.4f}, {d.ci_high:+.4f}] over {d.n} paired {pairs}'
  if d.ci_low > 0:
    return f'**Winner: {top}**{versus}{ci}, which excludes 0: better than the baseline{uneven}.'
  return (f'No winner: the highest mean is {top}{versus}{ci}, which includes 0: not '
          f'distinguishable from the baseline' + _settled_elsewhere(report) + uneven + '.')


def _settled_elsewhere(report: Report) -> str:
  """Other variants whose interval against the baseline excludes 0, either way."""
  better = [v for v in report.variants if v.vs_baseline is not None
            and v.vs_baseline.excludes_zero and v.vs_baseline.ci_low > 0]
  worse = [v for v in report.variants if v.vs_baseline is not None
           and v.vs_baseline.excludes_zero and v.vs_baseline.ci_high < 0]
  out = ''
  if better:
    out += '; better than the baseline at 95%: ' + ', '.join(f'`{v.label}`' for v in better)
  if worse:
    out += '; worse than the baseline at 95%: ' + ', '.join(f'`{v.label}`' for v in worse)
  return out


def markdown(report: Report, figures: Sequence[str] = (),
             overlays: case_overlays.Result | None = None) -> str:
  """report.md's text; figures are file names (relative to report.md) to embed; overlays the
  held-out cases' PNGs and notes."""
  target = f'{report.target_dice:g}'
  num_classes = max(len(v.class_dice) for v in report.variants)
  max_heads = max(len(v.head_dice) for v in report.variants)
  n_runs = sum(v.n for v in report.variants)
  lines = [f'# Ablation report: {report.root}', '', headline(report), '',
           f'{n_runs} finished runs in {len(report.variants)} variants'
           + (f'; {len(report.skipped)} skipped (listed at the end).' if report.skipped else '.'),
           '']
  no_ds_baseline = report.baseline == (BASELINE_KEY, BASELINE_VALUE)
  for v in report.variants:
    if heads_inert(v):
      lines += [f'Note: `{v.label}` weighted every DS head 0 at every logged step (e.g. '
                '`nnunet` weights, which drop the lowest head, on a model with one head): it '
                'trained as `none`' + (', so its difference from the `none` baseline is seed '
                                       'noise only.' if no_ds_baseline else '.'), '']
  header = (['variant', 'n', 'mean fg Dice'] + [f'Dice class {c}' for c in range(1, num_classes)]
            + [f'steps to Dice ≥ {target}'])
  if max_heads:
    header.append("DS heads' own Dice (high → low res)")
  boundary = _boundary_metrics(report)
  header += [_BOUNDARY_TITLES[m] for m in boundary]
  header += ['Δ Dice vs baseline [95% CI]', 'train s']
  lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for v in report.variants:
    row = [f'`{v.label}`', str(v.n), _pm(v.dice, v.n)]
    row += [_pm(c, v.n) for c in v.class_dice[1:]] + [''] * (num_classes - len(v.class_dice))
    row.append(_steps_cell(v))
    if max_heads:
      row.append(' / '.join(_pm(h, v.n) for h in v.head_dice) or '—')
    row += [_pm(v.boundary[m], v.n) for m in boundary]
    row += [_diff_cell(v), _fmt(v.train_seconds, '.0f')]
    lines.append('| ' + ' | '.join(row) + ' |')
  over = f'over (fold, seed) runs, {len(report.folds)} folds' if report.folds else 'over seeds'
  paired = 'paired by (fold, seed)' if report.folds else 'paired by seed'
  lines += ['', f'Mean ± std {over} (std with ddof=1). Steps to Dice ≥ {target}: the first eval '
            'at or above it, mean ± std over the runs that reached it (reached/runs). Δ: final mean '
            f'foreground Dice minus the baseline\'s, {paired}, with a two-sided 95% t '
            'interval.'
            + (' HD95 / NSD: the whole-image eval\'s 95th-percentile Hausdorff distance and '
               'normalised surface Dice, mean over foreground classes (unet_ds.surface_metrics).'
               if boundary else ''), '']
  lines += _fold_tables(report)
  for fig in figures:
    lines += [f'![{fig}]({fig})', '']
  if overlays is not None and (overlays.paths or overlays.notes):
    lines += ['## Held-out cases', '']
    lines += [line for note in overlays.notes for line in (note, '')]
    for path in overlays.paths:
      lines += [f'![{path.stem}]({path.as_posix()})', '']
  lines += ['## Runs', '', '| run | variant | seeds | mean fg Dice | steps to target | final step |',
            '|---|---|---|---|---|---|']
  for v in report.variants:
    for run, seed, steps in zip(v.runs, v.seeds, v.steps_to_target):
      lines.append(f'| {run.name} | `{v.label}` | {_seed_text(seed)} | {run.dice:.4f} | '
                   f'{steps if steps is not None else "not reached"} | '
                   f'{run.summary.get("step", "")} |')
  if report.skipped:
    lines += ['', '## Skipped', '']
    lines += [f'- `{s.path}`: {s.reason}' for s in report.skipped]
  return '\n'.join(lines) + '\n'


def _boundary_metrics(report: Report) -> list[str]:
  """The boundary metrics some run has (columns only then)."""
  return [m for m in BOUNDARY_METRICS
          if any(not math.isnan(r.boundary(m)) for v in report.variants for r in v.runs)]


def _fold_tables(report: Report) -> list[str]:
  results = per_fold(report)
  if not results:
    return []
  cells = {(r.variant, r.fold): r for r in results}
  header = ['variant'] + [fold_label(f) for f in report.folds]
  lines = ['## Per fold', '', 'Mean foreground Dice on each fold (mean ± std over its seeds, '
           '(n) runs), then Δ vs the baseline within the fold, paired by seed.', '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for v in report.variants:
    row = [f'`{v.label}`']
    for fold in report.folds:
      r = cells.get((v.label, fold))
      row.append(f'{_pm(r.dice, r.n)} ({r.n})' if r else '—')
    lines.append('| ' + ' | '.join(row) + ' |')
  compared = [v for v in report.variants if v.baseline]
  if compared:
    lines += ['', '| Δ vs baseline | ' + ' | '.join(header[1:]) + ' |', '|' + '---|' * len(header)]
    for v in compared:
      row = [f'`{v.label}`']
      for fold in report.folds:
        r = cells.get((v.label, fold))
        d = r.vs_baseline if r else None
        row.append('—' if d is None or d.n == 0 else f'{d.mean:+.4f}' if d.n == 1 else
                   f'{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}]')
      lines.append('| ' + ' | '.join(row) + ' |')
  return lines + ['']


def fold_rows(report: Report) -> list[dict[str, Any]]:
  """folds.csv's rows: one per (variant, fold), full precision."""
  rows = []
  for r in per_fold(report):
    d = r.vs_baseline
    rows.append({'variant': r.variant, 'fold': fold_label(r.fold), 'n': r.n,
                 'dice_mean': r.dice[0], 'dice_std': r.dice[1],
                 'diff_n': d.n if d else '', 'diff_mean': d.mean if d else math.nan,
                 'diff_ci_low': d.ci_low if d else math.nan,
                 'diff_ci_high': d.ci_high if d else math.nan})
  return rows


def variant_rows(report: Report) -> list[dict[str, Any]]:
  """report.csv's rows: one per variant, full precision, empty cells for n/a."""
  num_classes = max(len(v.class_dice) for v in report.variants)
  max_heads = max(len(v.head_dice) for v in report.variants)
  rows = []
  for v in report.variants:
    d = v.vs_baseline
    row = {'variant': v.label, 'is_baseline': v.is_baseline, 'n': v.n,
           'seeds': ';'.join(_seed_text(s) for s in v.seeds),
           'dice_mean': v.dice[0], 'dice_std': v.dice[1]}
    for c in range(num_classes):
      m, s = v.class_dice[c] if c < len(v.class_dice) else (math.nan, math.nan)
      row[f'dice_class_{c}_mean'], row[f'dice_class_{c}_std'] = m, s
    reached = stats.mean_std(v.steps_reached)
    row.update({'target_dice': report.target_dice, 'steps_to_target_mean': reached[0],
                'steps_to_target_std': reached[1], 'n_reached_target': len(v.steps_reached)})
    for h in range(max_heads):
      m, s = v.head_dice[h] if h < len(v.head_dice) else (math.nan, math.nan)
      row[f'head_{h + 1}_dice_mean'], row[f'head_{h + 1}_dice_std'] = m, s
    for metric in _boundary_metrics(report):
      row[f'{metric}_mean'], row[f'{metric}_std'] = v.boundary[metric]
    row.update({
        'baseline': v.baseline or '', 'diff_n': d.n if d else '',
        'diff_mean': d.mean if d else math.nan, 'diff_std': d.std if d else math.nan,
        'diff_ci_low': d.ci_low if d else math.nan, 'diff_ci_high': d.ci_high if d else math.nan,
        'ci_excludes_zero': '' if d is None or d.excludes_zero is None else d.excludes_zero,
        'train_seconds_mean': v.train_seconds})
    rows.append(row)
  return rows


def run_rows(report: Report) -> list[dict[str, Any]]:
  """runs.csv's rows: one per run."""
  rows = []
  for v in report.variants:
    for run, seed, fold, steps in zip(v.runs, v.seeds, v.folds, v.steps_to_target):
      row = {'run': run.name, 'variant': v.label, 'seeds': _seed_text(seed)}
      if report.folds:
        row['fold'] = fold_label(fold)
      row.update({'dice': run.dice, 'steps_to_target': steps if steps is not None else '',
                  'final_step': run.summary.get('step', ''),
                  'train_seconds': run.summary.get('train_seconds', '')})
      row.update({f'dice_class_{c}': d for c, d in enumerate(run.class_dice)})
      row.update({f'head_{h + 1}_dice': d for h, d in enumerate(run.head_dice)})
      row.update({m: run.boundary(m) for m in _boundary_metrics(report)})
      rows.append(row)
  return rows


DEFAULT_OVERLAYS = 3


def write(report: Report, out_dir: str | pathlib.Path | None = None,
          overlays: int | None = None) -> dict[str, pathlib.Path]:
  """Writes report.md, report.csv, runs.csv (folds.csv) and the PNGs; returns paths by name.

  `overlays`: how many held-out cases to draw (`overlays/<case>.png`, named `overlays/<case>`
  in the result; None: `DEFAULT_OVERLAYS`); runs on synthetic data have none (report.md says so).
  """
  out_dir = pathlib.Path(out_dir or report.root)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {'dice_vs_step.png': out_dir / 'dice_vs_step.png',
           'level_losses.png': out_dir / 'level_losses.png'}
  plots.dice_vs_step({v.label: v.runs for v in report.variants}, paths['dice_vs_step.png'],
                     target=report.target_dice)
  plots.level_losses({v.label: v.runs for v in report.variants}, paths['level_losses.png'])
  paths['report.csv'] = _write_csv(out_dir / 'report.csv', variant_rows(report))
  paths['runs.csv'] = _write_csv(out_dir / 'runs.csv', run_rows(report))
  if report.folds:
    paths['folds.csv'] = _write_csv(out_dir / 'folds.csv', fold_rows(report))
  figures = [p.relative_to(out_dir).as_posix() for k, p in paths.items() if k.endswith('.png')]
  drawn = case_overlays.write(report.variants, out_dir,
                              DEFAULT_OVERLAYS if overlays is None else overlays)
  paths.update({p.with_suffix('').as_posix(): out_dir / p for p in drawn.paths})
  paths['report.md'] = out_dir / 'report.md'
  paths['report.md'].write_text(markdown(report, figures, drawn))
  return paths


def _write_csv(path: pathlib.Path, rows: list[dict[str, Any]]) -> pathlib.Path:
  fields = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _csv_value(row.get(k, '')) for k in fields})
  return path


def _csv_value(value: Any) -> Any:
  if isinstance(value, float):
    return '' if math.isnan(value) else repr(value)
  return value


def _format(value: Any) -> str:
  if isinstance(value, tuple):
    return '(' + ','.join(_format(v) for v in value) + ')'
  return str(value)


def _fmt(value: float, spec: str = '.4f') -> str:
  return 'n/a' if value is None or math.isnan(value) else format(value, spec)


def _pm(mean_std: tuple[float, float], n: int) -> str:
  mean, std = mean_std
  if n < 2 or math.isnan(std):
    return f'{_fmt(mean)}'
  return f'{mean:.4f} ± {std:.4f}'


def _steps_cell(v: Variant) -> str:
  reached = v.steps_reached
  if not reached:
    return f'not reached (0/{v.n})'
  mean, std = stats.mean_std(reached)
  value = f'{mean:.0f}' if len(reached) < 2 else f'{mean:.0f} ± {std:.0f}'
  return f'{value} ({len(reached)}/{v.n})'


def _diff_cell(v: Variant) -> str:
  if v.is_baseline:
    return 'baseline'
  d = v.vs_baseline
  if d is None:
    return '—'
  if d.n == 0:
    return 'n/a (no common seeds)'
  if d.n == 1:
    return f'{d.mean:+.4f} [n/a, n=1]'
  return f'{d.mean:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}]'


def _seed_text(seed: tuple) -> str:
  return ','.join(f'{k}={v}' for k, v in seed) or '-'


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m experiments.report', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('root', help='sweep root: one workdir per run under it')
  parser.add_argument('--target-dice', '--target_dice', type=float, default=0.8,
                      help='Dice for the steps-to-target column (default 0.8)')
  parser.add_argument('--out', default=None, help='output folder (default: ROOT)')
  parser.add_argument('--ignore', action='append', default=[],
                      help='dotted config key to leave out of variants (repeatable)')
  parser.add_argument('--baseline', default=None, metavar='KEY=VALUE',
                      help='the variants the others are compared with (default '
                      f'{BASELINE_KEY}={BASELINE_VALUE}), e.g. loss.ds_weights=exp')
  parser.add_argument('--overlays', type=int, default=None,
                      help=f'held-out cases to draw (default {DEFAULT_OVERLAYS} for runs on data '
                      'files; synthetic runs have none); 0: no overlays')
  args = parser.parse_args(argv)
  try:
    report = build(args.root, target_dice=args.target_dice, ignore=args.ignore,
                   baseline=args.baseline)
  except (ValueError, FileNotFoundError) as e:
    parser.exit(2, f'error: {e}\n')
  paths = write(report, args.out, overlays=args.overlays)
  print(headline(report))
  drawn = sum(name.startswith(case_overlays.OVERLAY_DIR + '/') for name in paths)
  print(f'wrote {paths["report.md"]}, {paths["report.csv"]}, {paths["runs.csv"]} and plots'
        + (f', {drawn} overlays' if drawn else ''))
  if args.overlays and not drawn:  # asked for: say why there are none, not only in report.md
    print('no overlays: ' + ('the runs are on synthetic data, which has no held-out case files'
                             if not case_overlays.on_files(report.variants)
                             else f'see {paths["report.md"]}'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
