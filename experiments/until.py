"""Adaptive ablations: add seeds to the variants whose comparison with the baseline is unsettled.

    python -m experiments.launch --config=... --root=ROOT --until=ci_halfwidth:0.01,max_seeds:10

After each round of runs, every variant (a sweep point without its seed and fold keys) is compared
with its baseline (the variant with `model.ds.mode=none`; with several, the one differing in
fewest keys, as in `experiments.report`): the paired difference of final Dice (`summary.json`'s
`mean_foreground_dice`), paired by (fold, seed), with a two-sided 95% t interval. A comparison is
  * settled when the interval's half-width is at most `ci_halfwidth`;
  * capped when it is not, but the variant already ran `max_seeds` seeds;
  * open otherwise: the variant and its baseline get the next unused seed value (on every fold
    they run), as new sweep points named like the others (`mode=deep,seed=3`).
Rounds go on until no comparison is open. `ROOT/until.json` says, after every round, which
comparisons settled and which did not. Launching again re-derives the same rounds from the
finished workdirs, so an interrupted adaptive sweep continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

from experiments import report
from experiments import stats
from experiments import sweep

SEED_KEY = 'seed'
UNTIL_FILE = 'until.json'
_RULE_KEYS = ('ci_halfwidth', 'max_seeds')

Variant = tuple  # The (key, value) pairs of a point without its seed and fold keys.


@dataclasses.dataclass(frozen=True)
class Rule:
  """When to stop adding seeds: interval half-width target and seeds per variant at most."""
  ci_halfwidth: float
  max_seeds: int = 10
  confidence: float = 0.95

  def __post_init__(self):
    if not self.ci_halfwidth > 0:
      raise ValueError(f'--until ci_halfwidth={self.ci_halfwidth}: need a number > 0')
    if self.max_seeds < 2:
      raise ValueError(f'--until max_seeds={self.max_seeds}: need at least 2 (an interval needs '
                       'two pairs)')


def parse_rule(text: str) -> Rule:
  """`'ci_halfwidth:0.01,max_seeds:10'` -> Rule; unknown or malformed parts raise, naming them."""
  values: dict[str, str] = {}
  for part in filter(None, (p.strip() for p in text.split(','))):
    key, sep, value = part.partition(':')
    if not sep or key not in _RULE_KEYS:
      raise ValueError(f'--until={text}: bad part {part!r}; expected '
                       'ci_halfwidth:FLOAT[,max_seeds:INT]')
    values[key] = value
  if 'ci_halfwidth' not in values:
    raise ValueError(f'--until={text}: ci_halfwidth:FLOAT is required')
  try:
    return Rule(ci_halfwidth=float(values['ci_halfwidth']),
                max_seeds=int(values.get('max_seeds', Rule.max_seeds)))
  except ValueError as e:
    if str(e).startswith('--until'):
      raise
    raise ValueError(f'--until={text}: {e}') from None


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A variant against its baseline after a round."""
  variant: str  # Label: the variant's settings as in a point name, e.g. `mode=deep`.
  baseline: str
  seeds: int  # Seed values the variant ran.
  diff: stats.PairedDifference  # variant - baseline, paired by (fold, seed).
  # 'settled', 'capped', 'open', or 'identical': every pair equals the baseline's to the bit
  # (the settings change nothing, e.g. every DS head weighted 0); nothing to settle.
  status: str
  variant_key: Variant = ()
  baseline_key: Variant = ()

  def as_json(self) -> dict[str, Any]:
    d = self.diff
    return {'variant': self.variant, 'baseline': self.baseline, 'status': self.status,
            'seeds': self.seeds, 'pairs': d.n, 'mean': _num(d.mean), 'ci_low': _num(d.ci_low),
            'ci_high': _num(d.ci_high), 'half_width': _num(d.half_width)}

  def line(self) -> str:
    d = self.diff
    interval = (f'[{d.ci_low:+.4f}, {d.ci_high:+.4f}], half-width {d.half_width:.4f}'
                if not math.isnan(d.ci_low) else 'no interval')
    status = self.status + (' (every run scores as its baseline: the settings change nothing)'
                            if self.status == 'identical' else '')
    return (f'{self.variant} vs {self.baseline}: {d.mean:+.4f} {interval} over {d.n} pairs '
            f'({self.seeds} seeds): {status}')


def variant_of(point: Mapping[str, Any]) -> Variant:
  return tuple((k, v) for k, v in point.items() if k != SEED_KEY and k not in report.FOLD_KEYS)


def pair_key(point: Mapping[str, Any]) -> tuple:
  """What pairs runs across variants: the fold settings and the seed."""
  return tuple((k, point[k]) for k in report.FOLD_KEYS if k in point) + (point[SEED_KEY],)


def check_sweep(points: Sequence[Mapping[str, Any]]) -> None:
  """Raises unless every point has a seed and some variant is a baseline (before any run)."""
  missing = [p for p in points if SEED_KEY not in p]
  if missing:
    raise ValueError(f'--until adds seeds, but sweep point {dict(missing[0])!r} has no '
                     f'{SEED_KEY!r} axis')
  if not any(_is_baseline(variant_of(p)) for p in points):
    raise ValueError(f'--until compares with the baseline, but no sweep point sets '
                     f'{report.BASELINE_KEY}={report.BASELINE_VALUE}')


def compare(points: Sequence[Mapping[str, Any]], dice: Sequence[float], rule: Rule
            ) -> list[Comparison]:
  """Each non-baseline variant against its baseline; `dice[i]` is point i's final Dice (nan for
  a point without a result)."""
  check_sweep(points)
  by_variant: dict[Variant, dict[tuple, float]] = {}
  seeds: dict[Variant, set] = {}
  for point, value in zip(points, dice, strict=True):
    v = variant_of(point)
    by_variant.setdefault(v, {})[pair_key(point)] = value
    seeds.setdefault(v, set()).add(point[SEED_KEY])
  variants = list(by_variant)
  labels = dict(zip(variants, sweep.point_names([dict(v) for v in variants])))
  out = []
  for v in variants:
    if _is_baseline(v):
      continue
    base = _baseline_of(v, variants)
    diff = stats.paired_difference(by_variant[v], by_variant[base], rule.confidence)
    pairs = [k for k in by_variant[v] if k in by_variant[base]]
    if len(pairs) >= 2 and all(by_variant[v][k] == by_variant[base][k] for k in pairs):
      status = 'identical'
    elif diff.half_width <= rule.ci_halfwidth:  # False for nan: no interval yet
      status = 'settled'
    elif len(seeds[v]) >= rule.max_seeds:
      status = 'capped'
    else:
      status = 'open'
    out.append(Comparison(variant=labels[v], baseline=labels[base], seeds=len(seeds[v]),
                          diff=diff, status=status, variant_key=v, baseline_key=base))
  return out


def next_points(points: Sequence[Mapping[str, Any]], comparisons: Sequence[Comparison]
                ) -> list[sweep.Point]:
  """The points of the next round: the next unused seed for every open variant and its
  baseline, on each fold it runs; [] when no comparison is open."""
  grow = {v for c in comparisons if c.status == 'open' for v in (c.variant_key, c.baseline_key)}
  if not grow:
    return []
  seed = _next_seed([p[SEED_KEY] for p in points])
  new = []
  for v in [v for v in dict.fromkeys(map(variant_of, points)) if v in grow]:  # sweep order
    folds = {}  # fold settings -> one of the variant's points on that fold
    for p in points:
      if variant_of(p) == v:
        folds.setdefault(pair_key(p)[:-1], p)
    for p in folds.values():
      new.append({**p, SEED_KEY: seed})  # same key order: named like the existing points
  return new


def write(root: pathlib.Path, rule: Rule, rounds: Sequence[Mapping[str, Any]]) -> pathlib.Path:
  """`ROOT/until.json`: the rule, and per round the comparisons and the points it added."""
  last = rounds[-1]['comparisons'] if rounds else []
  record = {
      'rule': dataclasses.asdict(rule),
      'settled': [c['variant'] for c in last if c['status'] == 'settled'],
      'identical': [c['variant'] for c in last if c['status'] == 'identical'],
      'not_settled': [c['variant'] for c in last if c['status'] in ('capped', 'open')],
      'rounds': list(rounds),
  }
  path = pathlib.Path(root) / UNTIL_FILE
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(record, indent=2) + '\n')
  os.replace(tmp, path)
  return path


def _is_baseline(variant: Variant) -> bool:
  return dict(variant).get(report.BASELINE_KEY) == report.BASELINE_VALUE


def _baseline_of(variant: Variant, variants: Sequence[Variant]) -> Variant:
  mine = dict(variant)
  def distance(base: Variant) -> int:
    other = dict(base)
    return sum(mine.get(k, _MISSING) != other.get(k, _MISSING) for k in {*mine, *other})
  return min((b for b in variants if _is_baseline(b)), key=distance)


def _next_seed(seeds: Sequence[Any]) -> int:
  ints = [s for s in seeds if isinstance(s, int) and not isinstance(s, bool)]
  if len(ints) != len(seeds):
    raise ValueError('--until adds integer seeds, but the sweep has seeds '
                     f'{sorted(map(repr, seeds))}')
  return max(ints) + 1


def _num(x: float) -> float | None:
  return None if math.isnan(x) else float(x)


_MISSING = object()
