"""DS ablation on the synthetic 3D volumes: `none` / `deep` / `additive` / `hypercolumn` x 3 seeds.

The runs are `configs/default.py` (3D U-Net, 32^3 synthetic shapes, 300 steps) with a finer eval
interval; only the DS form and the seed change between them.

  python -m experiments.launch --config=configs/ablation_synthetic.py --root=runs/ds_ablation
  python -m experiments.report runs/ds_ablation

Args (comma-separated, beside those of default.py, e.g. `smoke`):
  weights  the DS weight sweep instead: `deep` with loss.ds_weights exp / nnunet / same x
           loss.ds_schedule constant / linear, plus the `none` baseline;
  seeds=N  seeds per variant (default 3; 2 with smoke, 1 with weights,smoke);
  steps=N  training steps (default 300; evals every steps/6);
  side     `additive` / `hypercolumn` heads also get side losses (off by default: those forms
           train through the fused output only).
"""

from configs import default
from experiments import sweep
from unet_ds import config_lib

MODES = ('none', 'deep', 'additive', 'hypercolumn')
WEIGHT_SCHEMES = ('exp', 'nnunet', 'same')
WEIGHT_SCHEDULES = ('constant', 'linear')
_OWN_ARGS = ('weights', 'seeds', 'steps', 'side')


def _split_arg(arg):
  """This file's args, and the rest (as a string) for default.py."""
  parsed = config_lib.parse_arg(arg)
  own = {k: v for k, v in parsed.items() if k in _OWN_ARGS}
  rest = ','.join(k if v is True else f'{k}={v}' for k, v in parsed.items() if k not in own)
  return own, parsed, rest or None


def get_config(arg=None):
  own, parsed, rest = _split_arg(arg)
  c = default.get_config(rest)
  if not parsed.get('smoke'):
    if 'steps' in own:
      c.train.steps = int(own['steps'])
    c.train.eval_every = max(1, c.train.steps // 6)  # enough evals for steps-to-target
    c.train.checkpoint_every = max(1, c.train.steps // 3)
  c.loss.side_losses = bool(own.get('side', False))
  return c


def get_sweep(arg=None):
  own, parsed, _ = _split_arg(arg)
  smoke = bool(parsed.get('smoke'))
  default_seeds = (1 if 'weights' in own else 2) if smoke else 3
  seeds = sweep.axis('seed', range(int(own.get('seeds', default_seeds))))
  if 'weights' in own:
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
  return sweep.product(sweep.axis('model.ds.mode', modes), seeds)
