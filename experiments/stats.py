"""Small statistics for ablation reports: mean/std over seeds, paired t intervals, curves."""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample std (ddof=1) of values; std is nan for fewer than 2, both nan for none."""
  values = np.asarray(values, dtype=np.float64)
  if values.size == 0:
    return math.nan, math.nan
  std = float(values.std(ddof=1)) if values.size > 1 else math.nan
  return float(values.mean()), std


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """Mean of a - b over paired keys with a two-sided t interval (nan bounds when n < 2)."""
  n: int
  mean: float
  std: float
  ci_low: float
  ci_high: float
  confidence: float

  @property
  def half_width(self) -> float:
    """Half the interval's width (nan when there is no interval)."""
    return (self.ci_high - self.ci_low) / 2

  @property
  def excludes_zero(self) -> bool | None:
    """Whether the interval excludes 0; None when there is no interval (n < 2)."""
    if math.isnan(self.ci_low):
      return None
    return self.ci_low > 0 or self.ci_high < 0


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                      confidence: float = 0.95) -> PairedDifference:
  """Paired difference a - b over the keys both have (e.g. seeds)."""
  keys = [k for k in a if k in b]
  diffs = np.asarray([a[k] - b[k] for k in keys], dtype=np.float64)
  mean, std = mean_std(diffs)
  if len(keys) < 2:
    low = high = math.nan
  else:
    half = scipy_stats.t.ppf(0.5 + confidence / 2, df=len(keys) - 1) * std / math.sqrt(len(keys))
    low, high = mean - half, mean + half
  return PairedDifference(n=len(keys), mean=mean, std=std, ci_low=float(low), ci_high=float(high),
                          confidence=confidence)


def mean_curve(curves: Sequence[Sequence[tuple[float, float]]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps, mean, std) over runs' (step, value) curves, at every step any run has.

  At each step the mean is over the runs that have that step; std (ddof=1) is nan where fewer
  than two do.
  """
  by_step = {}
  for curve in curves:
    for step, value in curve:
      by_step.setdefault(step, []).append(value)
  steps = sorted(by_step)
  pairs = [mean_std(by_step[s]) for s in steps]
  return (np.asarray(steps, dtype=np.float64), np.asarray([m for m, _ in pairs]),
          np.asarray([s for _, s in pairs]))
