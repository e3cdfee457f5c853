"""Deterministic train/validation splits of case ids: seeded fraction, explicit list, or k-fold.

The result depends only on the set of ids (sorted first), the seed and the fold, never on the order
files were listed in, so the same folder gives the same split on every machine.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def parse_case_list(spec: str | Sequence[str] | None) -> tuple[str, ...]:
  """'a,b , c' or a sequence -> ('a', 'b', 'c'); None/'' -> ()."""
  if spec is None:
    return ()
  if isinstance(spec, str):
    return tuple(s.strip() for s in spec.split(',') if s.strip())
  return tuple(str(s) for s in spec)


def kfold(case_ids: Sequence[str], num_folds: int, seed: int) -> list[tuple[list[str], list[str]]]:
  """All `num_folds` (train, validation) pairs; every id is validated exactly once.

  Fold sizes differ by at most one.
  """
  ids = _sorted_unique(case_ids)
  if not 2 <= num_folds <= len(ids):
    raise ValueError(f'num_folds={num_folds}: need 2 <= num_folds <= number of cases ({len(ids)})')
  order = np.random.default_rng(seed).permutation(len(ids))
  chunks = np.array_split(order, num_folds)
  folds = []
  for chunk in chunks:
    held = set(chunk.tolist())
    folds.append(([ids[i] for i in range(len(ids)) if i not in held], sorted(ids[i] for i in held)))
  return folds


def split_cases(case_ids: Sequence[str], *, val_fraction: float = 0.2, seed: int = 0,
                val_cases: str | Sequence[str] | None = None, num_folds: int = 0,
                fold: int = 0) -> tuple[list[str], list[str]]:
  """Splits case ids into sorted (train, validation) lists.

  Precedence: an explicit `val_cases` list, else k-fold when `num_folds > 1`, else a seeded random
  `val_fraction` (at least one validation case when the fraction is > 0, at least one train case).

  Raises:
    ValueError: unknown ids in `val_cases`, a fold out of range, or a fraction outside [0, 1).
  """
  ids = _sorted_unique(case_ids)
  if not ids:
    raise ValueError('no cases to split')
  val_list = parse_case_list(val_cases)
  if val_list:
    unknown = sorted(set(val_list) - set(ids))
    if unknown:
      raise ValueError(f'config.data.val_cases {unknown[:10]} are not among the {len(ids)} '
                       f'cases (e.g. {ids[:3]})')
    held = set(val_list)
    return [i for i in ids if i not in held], sorted(held)
  if num_folds and num_folds > 1:
    if not 0 <= fold < num_folds:
      raise ValueError(f'config.data.fold={fold}: need 0 <= fold < data.num_folds={num_folds}')
    return kfold(ids, num_folds, seed)[fold]
  if not 0 <= val_fraction < 1:
    raise ValueError(f'config.data.val_fraction={val_fraction}: need 0 <= val_fraction < 1')
  num_val = int(round(len(ids) * val_fraction))
  if val_fraction > 0:
    num_val = min(max(num_val, 1), len(ids) - 1)
  order = np.random.default_rng(seed).permutation(len(ids))
  held = {ids[i] for i in order[:num_val]}
  return [i for i in ids if i not in held], sorted(held)


def _sorted_unique(case_ids: Sequence[str]) -> list[str]:
  ids = sorted(str(i) for i in case_ids)
  dupes = sorted({i for i, j in zip(ids, ids[1:]) if i == j})
  if dupes:
    raise ValueError(f'duplicate case ids {dupes[:10]}')
  return ids
