"""What the ablation configs share: their extra config-file args and their sweeps.

An ablation config file starts from a base config file (e.g. `configs/default.py`), applies
`configure` for its own args, and returns `sweep_points` from `get_sweep`:

  args (comma-separated, beside the base file's, e.g. `smoke`):
    weights  the DS weight sweep instead of the DS forms: `deep` (or with `forms=F`, the one
             form F; `additive` / `hypercolumn` need `side`, their heads having no loss
             otherwise) with loss.ds_weights exp / nnunet / same x loss.ds_schedule constant /
             linear, plus the `none` baseline;
    schedules=A+B  with `weights`: the schedules swept (default constant+linear; cosine too;
             with smoke, each with the `exp` weights);
    seeds=N  seeds per variant (default 3; 2 with smoke, 1 with weights,smoke);
    forms=A+B  the DS forms to compare, `+`-separated (default all four; none+deep with smoke);
    folds=K  K-fold cross-validation (real-data configs only): `data.num_folds=K` and a
             `data.fold` axis 0..K-1 beside the seed axis (nnU-Net's protocol is folds=5); the
             report pairs variants by (fold, seed) and shows each fold;
    steps=N  training steps (default: the base's; evals every steps/6);
    side     `additive` / `hypercolumn` heads also get side losses (off by default: those forms
             train through the fused output only).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import ml_collections

from experiments import sweep
from unet_ds import config_lib
from unet_ds import losses

MODES = ('none', 'deep', 'additive', 'hypercolumn')
WEIGHT_SCHEMES = ('exp', 'nnunet', 'same')
WEIGHT_SCHEDULES = ('constant', 'linear')
ARGS = ('weights', 'schedules', 'seeds', 'folds', 'forms', 'steps', 'side')
FOLD_KEY = 'data.fold'


def split_arg(arg: str | None, own: tuple[str, ...] = ARGS
              ) -> tuple[dict[str, Any], dict[str, Any], str | None]:
  """(the ablation's args, all args, the other args as a string for the base config file)."""
  parsed = config_lib.parse_arg(arg)
  mine = {k: v for k, v in parsed.items() if k in own}
  rest = ','.join(k if v is True else f'{k}={v}' for k, v in parsed.items() if k not in mine)
  return mine, parsed, rest or None


def configure(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the ablation's own args to a base config (in place; returns it)."""
  mine, parsed, _ = split_arg(arg)
  if 'steps' in mine:  # given explicitly, it wins over smoke's length too
    c.train.steps = _count(mine, 'steps', 0)
  if not parsed.get('smoke'):
    c.train.eval_every = max(1, c.train.steps // 6)  # enough evals for steps-to-target
    c.train.checkpoint_every = max(1, c.train.steps // 3)
  c.loss.side_losses = bool(mine.get('side', False))
  if 'folds' in mine:
    if 'fold' in parsed:
      raise ValueError(f'ablation args fold={parsed["fold"]} and folds={mine["folds"]}: give one '
                       '(folds=K sweeps every fold)')
    if 'num_folds' not in c.data:
      raise ValueError(f'ablation arg folds={mine["folds"]}: this config has no data.num_folds '
                       '(cross-validation needs a real-data config, e.g. '
                       'configs/ablation_hippocampus.py)')
    c.data.num_folds = num_folds(mine)
    c.data.val_cases = ''  # an explicit held-out list would override the folds
  return c


def num_folds(mine: dict[str, Any]) -> int:
  """The `folds=K` arg as an int >= 2 (0 without it)."""
  if 'folds' not in mine:
    return 0
  try:
    k = int(mine['folds'])
  except (TypeError, ValueError):
    k = 0
  if k < 2:
    raise ValueError(f'ablation arg folds={mine["folds"]}: need an integer >= 2')
  return k


def forms(mine: dict[str, Any]) -> tuple[str, ...]:
  """The `forms=A+B` arg as DS modes (() without it)."""
  if 'forms' not in mine:
    return ()
  chosen = tuple(str(mine['forms']).split('+'))
  unknown = [m for m in chosen if m not in MODES]
  if unknown or len(set(chosen)) != len(chosen):
    raise ValueError(f'ablation arg forms={mine["forms"]}: need distinct forms from {MODES}, '
                     'joined by +')
  return chosen


def weighted_form(mine: dict[str, Any]) -> str:
  """The DS form the weight sweep trains: `deep`, or the one `forms=F` (not `none`)."""
  chosen = forms(mine) or ('deep',)
  if len(chosen) != 1 or chosen[0] == 'none':
    raise ValueError(f'ablation args weights and forms={mine["forms"]}: the weight sweep trains '
                     'one DS form (deep, additive or hypercolumn) against `none`; give one form')
  if chosen[0] != 'deep' and not mine.get('side'):
    raise ValueError(f'ablation args weights,forms={chosen[0]}: {chosen[0]}\'s heads get no loss '
                     'without side losses, so the weights would change nothing; add side')
  return chosen[0]


def schedules(mine: dict[str, Any]) -> tuple[str, ...]:
  """The `schedules=A+B` arg (default: WEIGHT_SCHEDULES; any of `losses.SCHEDULES`)."""
  if 'schedules' not in mine:
    return WEIGHT_SCHEDULES
  chosen = tuple(str(mine['schedules']).split('+'))
  if any(s not in losses.SCHEDULES for s in chosen) or len(set(chosen)) != len(chosen):
    raise ValueError(f'ablation arg schedules={mine["schedules"]}: need distinct schedules from '
                     f'{losses.SCHEDULES}, joined by +')
  return chosen


def _count(mine: dict[str, Any], key: str, default: int) -> int:
  try:
    return int(mine.get(key, default))
  except (TypeError, ValueError):
    raise ValueError(f'ablation arg {key}={mine[key]}: not a whole number') from None


def fold_axis(k: int) -> list[sweep.Point]:
  """The folds of K-fold cross-validation as a sweep axis (`data.fold` 0..K-1)."""
  return sweep.axis(FOLD_KEY, range(k))


def block_fold_axis(case_ids: Sequence[str], k: int) -> list[sweep.Point]:
  """K folds of consecutive cases (`data.fold` k with `data.val_cases` its block).

  For slices of one stack (ISBI's 30 EM sections), where neighbours look alike and a random
  fold would validate on near-copies of training slices. Ids that are all integers are ordered
  numerically ('2' before '10').
  """
  ids = sorted(set(case_ids), key=lambda i: (int(i), i) if i.isdigit() else (math.inf, i))
  if not 2 <= k <= len(ids):
    raise ValueError(f'folds={k}: need 2 <= folds <= number of cases ({len(ids)})')
  blocks = [','.join(b) for b in (ids[len(ids) * f // k:len(ids) * (f + 1) // k] for f in range(k))]
  return sweep.zip_axes(fold_axis(k), sweep.axis('data.val_cases', blocks))


def sweep_points(arg: str | None,
                 folds: Callable[[int], list[sweep.Point]] = fold_axis) -> list[sweep.Point]:
  """The DS-form ablation (or with `weights`, the DS weight sweep) for a config-file arg.

  With `folds=K`, every (form, seed) point runs on each fold; `folds(K)` gives the fold axis (a
  config may pass one that also sets its own held-out cases per fold).
  """
  mine, parsed, _ = split_arg(arg)
  smoke = bool(parsed.get('smoke'))
  default_seeds = (1 if 'weights' in mine else 2) if smoke else 3
  seeds = sweep.axis('seed', range(_count(mine, 'seeds', default_seeds)))
  k = num_folds(mine)
  if k:
    seeds = sweep.product(folds(k), seeds)
  if 'weights' in mine:
    form = weighted_form(mine)
    if smoke and 'schedules' in mine:  # the schedules asked for, with one scheme
      weights = sweep.product(sweep.axis('loss.ds_weights', ['exp']),
                              sweep.axis('loss.ds_schedule', schedules(mine)))
    elif smoke:  # two weightings that exercise both the scheme and the schedule
      weights = sweep.zip_axes(sweep.axis('loss.ds_weights', ['exp', 'same']),
                               sweep.axis('loss.ds_schedule', ['constant', 'linear']))
    else:
      weights = sweep.product(sweep.axis('loss.ds_weights', WEIGHT_SCHEMES),
                              sweep.axis('loss.ds_schedule', schedules(mine)))
    points = sweep.chain(
        sweep.product(sweep.axis('model.ds.mode', ['none']), seeds),
        sweep.product(sweep.axis('model.ds.mode', [form]), weights, seeds))
  else:
    if 'schedules' in mine:
      raise ValueError(f'ablation arg schedules={mine["schedules"]}: only with weights')
    modes = forms(mine) or (('none', 'deep') if smoke else MODES)
    points = sweep.product(sweep.axis('model.ds.mode', modes), seeds)
  # Seed-major, then fold order: a partly run ablation already holds every form (or weighting)
  # at the first seeds (and folds).
  return sorted(points, key=lambda p: (p['seed'], p.get(FOLD_KEY, 0)))
