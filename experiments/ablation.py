"""What the ablation configs share: their extra config-file args and their sweeps.

An ablation config file starts from a base config file (e.g. `configs/default.py`), applies
`configure` for its own args, and returns `sweep_points` from `get_sweep`:

  args (comma-separated, beside the base file's, e.g. `smoke`):
    weights  the DS weight sweep instead of the DS forms: `deep` with loss.ds_weights
             exp / nnunet / same x loss.ds_schedule constant / linear, plus the `none` baseline;
    seeds=N  seeds per variant (default 3; 2 with smoke, 1 with weights,smoke);
    steps=N  training steps (default: the base's; evals every steps/6);
    side     `additive` / `hypercolumn` heads also get side losses (off by default: those forms
             train through the fused output only).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments import sweep
from unet_ds import config_lib

MODES = ('none', 'deep', 'additive', 'hypercolumn')
WEIGHT_SCHEMES = ('exp', 'nnunet', 'same')
WEIGHT_SCHEDULES = ('constant', 'linear')
ARGS = ('weights', 'seeds', 'steps', 'side')


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
  if not parsed.get('smoke'):
    if 'steps' in mine:
      c.train.steps = int(mine['steps'])
    c.train.eval_every = max(1, c.train.steps // 6)  # enough evals for steps-to-target
    c.train.checkpoint_every = max(1, c.train.steps // 3)
  c.loss.side_losses = bool(mine.get('side', False))
  return c


def sweep_points(arg: str | None) -> list[sweep.Point]:
  """The DS-form ablation (or with `weights`, the DS weight sweep) for a config-file arg."""
  mine, parsed, _ = split_arg(arg)
  smoke = bool(parsed.get('smoke'))
  default_seeds = (1 if 'weights' in mine else 2) if smoke else 3
  seeds = sweep.axis('seed', range(int(mine.get('seeds', default_seeds))))
  if 'weights' in mine:
    if smoke:  # two weightings that exercise both the scheme and the schedule
      weights = sweep.zip_axes(sweep.axis('loss.ds_weights', ['exp', 'same']),
                               sweep.axis('loss.ds_schedule', ['constant', 'linear']))
    else:
      weights = sweep.product(sweep.axis('loss.ds_weights', WEIGHT_SCHEMES),
                              sweep.axis('loss.ds_schedule', WEIGHT_SCHEDULES))
    return sweep.chain(
        sweep.product(sweep.axis('model.ds.mode', ['none']), seeds),
        sweep.product(sweep.axis('model.ds.mode', ['deep']), weights, seeds))
  modes = ('none', 'deep') if smoke else MODES
  points = sweep.product(sweep.axis('model.ds.mode', modes), seeds)
  # Seed-major order: a partly run ablation already holds every form at the first seeds.
  return sorted(points, key=lambda p: p['seed'])
