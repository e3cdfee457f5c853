"""A 3D U-Net with multi-level deep supervision (3D-DSN; Zeng et al. 2017, Dou et al. 2017) as a
preset: a `deep` head on every decoder level, each with its own loss, explicit per-level weights,
and side weights that decay over training so the final output dominates at the end.

  python -m unet_ds.main --config=configs/dsn3d.py --workdir=runs/dsn          # synthetic 3D
  python -m unet_ds.main --config=configs/dsn3d.py:path=/data/Task04_Hippocampus \
      --workdir=runs/dsn_hip

The loss is `sum_i w_i(t) * CE(output_i, label shrunk to output i)` over the final output and
the heads at levels 1..depth-2 (`ds.mode='deep'`, `ds.levels=()` = every level, `loss.target=
'downsample'`). The base weights are explicit, one per output, final first: 1 for the final
output and 0.5^level for the head at `level` (`loss.ds_weights='1,0.5,0.25'` for depth 4;
`weights=1+0.3+0.1` to choose), not normalised. The side weights (heads only) decay linearly to
`loss.ds_floor=0.1` of their value over `train.steps` (`loss.ds_schedule='linear'`), as 3D-DSN
decays its auxiliary-loss coefficients; the final output's weight stays 1.

What differs from the papers: their auxiliary heads upsample the side outputs to the input size
with deconvolutions (here the label is shrunk to each head, `loss.target='upsample'` resizes
the logits instead); SGD with step decay there, AdamW with warm-up + cosine here; instance norm
and 2 convs per level (the nnU-Net-style U-Net of this project) rather than their exact stacks.

Args (comma-separated): weights=W0+W1+... (one per output, final first), floor=F (side-weight
floor), loss=NAME (default ce, as the papers), path=DIR, patch=XxYxZ, steps=N, classes=K,
channels=C, fold=N, seed=N, smoke.
"""

from unet_ds import models
from unet_ds import presets


def _settings(c, real):
  c.model.update(depth=4, base_filters=16 if real else 8, filter_growth=2, convs_per_block=2,
                 residual=False, norm='instance', activation='leaky_relu', down='maxpool',
                 up='transpose')
  c.model.ds.mode = 'deep'
  c.model.ds.levels = ()                 # a head on every decoder level below full resolution
  c.loss.name = 'ce'
  c.loss.ds_weights = ''                 # '' -> 1, 0.5, 0.25, ... for the model's depth
  c.loss.ds_schedule = 'linear'
  c.loss.ds_decay_steps = 0              # 0 -> train.steps
  c.loss.ds_floor = 0.1
  c.loss.target = 'downsample'
  if real:
    c.data.num_classes = 3               # hippocampus-sized defaults (configs/msd.py)
    c.data.patch_size = c.data.shape = c.data.eval_shape = (40, 56, 40)
    c.train.update(steps=600, batch_size=2, eval_batch_size=4, eval_every=200,
                   checkpoint_every=200)
  else:
    c.data.num_train, c.data.num_val = 256, 32
    c.train.update(steps=300, eval_every=100, checkpoint_every=100)


def level_weights(head_levels) -> str:
  """'1,0.5,0.25,...': weight 1 for the final output, 0.5^level for the head at each level."""
  return ','.join(f'{0.5 ** level:g}' for level in (0, *head_levels))


_ARGS = {
    'weights': lambda c, v: setattr(c.loss, 'ds_weights', str(v).replace('+', ',')),
    'floor': lambda c, v: setattr(c.loss, 'ds_floor', float(v)),
    'loss': lambda c, v: setattr(c.loss, 'name', str(v)),
}


def get_config(arg=None):
  c = presets.build(arg, ndim=3, settings=_settings, extra=_ARGS)
  if not c.loss.ds_weights:  # after `smoke`, `ds=`...: one weight per output of this model
    c.loss.ds_weights = level_weights(models.model_config(c.model).head_levels)
  return c
