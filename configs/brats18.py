"""The 3DUnet-Tensorflow-Brats18 model as a preset: a 3D U-Net on multi-modal MRI with additive
deep supervision, generalised Dice loss and BraTS region scores.

  python -m unet_ds.main --config=configs/brats18.py --workdir=runs/brats   # synthetic, 4 channels
  python -m unet_ds.main --config=configs/brats18.py:path=/data/Task01_BrainTumour \
      --workdir=runs/brats                     # MSD Task01: 4D [X, Y, Z, 4] NIfTI, labels 0..3
  python -m unet_ds.main --config=configs/brats18.py:path=/data/Task04_Hippocampus,channels=1,\
num_class=3,depth=4,patch=40x56x40 --workdir=runs/brats_hip    # the same model on another task

The original's flags are preset args (lower case): `depth=5` (DEPTH: resolution levels),
`base_filter=16` (BASE_FILTER), `filter_grow=true` (FILTER_GROW: double the width per level, else
constant), `residual=true` (RESIDUAL: residual conv blocks), `instance_norm=true` (INSTANCE_NORM,
else batch norm), `deep_supervision=true` (DEEP_SUPERVISION: additive heads, else none),
`num_class=4` (NUM_CLASS, background included). As the original: downsampling by stride-2 convs,
two 3x3 convs per block, additive DS (per-level 1x1 heads summed from the lowest level upwards
into the final logits), generalised Dice loss (Sudre et al. 2017, square weights, background
included, `loss.name='generalized_dice'`), Adam.

Data: 4 modalities (FLAIR, T1, T1ce, T2) as channels, each normalised on its own (z-score per
case and modality, `data.normalization='zscore'` per channel). Without `path` the built-in
synthetic volumes run in their multi-channel mode (`data.in_channels=4`, channel-dependent
contrast), so the preset needs no download. Scores: per-class Dice and, beside it, the BraTS
regions (`eval.regions`): whole tumour, tumour core and enhancing tumour as unions of labels.
Label conventions: MSD Task01 stores 1 = oedema, 2 = non-enhancing tumour, 3 = enhancing
(core = {2, 3}); raw BraTS 2018 stores 1 = necrosis/non-enhancing, 2 = oedema, 4 = enhancing
(arg `brats_labels`: 4 mapped to class 3, core = {1, 3}). The synthetic data use the latter.
With `num_class` other than 4 no regions are scored (set `--config.eval.regions=...`).

What still differs from the original, and why:
- Normalisation: z-score over the whole volume per modality; the original normalised over
  brain (non-zero) voxels only (no such method in `io.normalize` yet).
- Patches: uniform random crops with nnU-Net's foreground oversampling (`data.fg_fraction`)
  and the project's augmentation, instead of the original's tumour-centred sampling and flips.
- Upsampling: 2x2x2 stride-2 transposed convs; the original's deconvolution/concat block
  differs in detail. Norm layers follow every conv (as INSTANCE_NORM/BN there); the residual
  block adds before its last activation (nnU-Net ResEnc style), with a 1x1 projection where
  the width changes.
- Optimiser: Adam(W) with warm-up + cosine, no weight decay; learning-rate schedule and
  epoch counts of the original are not reproduced (fixed `train.steps`).
- Heads on every decoder level below full resolution (`ds.levels`, default).

Args (comma-separated): the flags above, path=DIR, brats_labels, patch=XxYxZ, steps=N,
channels=C, classes=K (same as num_class), fold=N, ds=MODE, seed=N, smoke.
"""

from unet_ds import presets

# (name, labels) of the BraTS regions, by label convention.
_REGIONS = {
    'msd': 'whole_tumour=1,2,3;tumour_core=2,3;enhancing_tumour=3',
    'brats': 'whole_tumour=1,2,3;tumour_core=1,3;enhancing_tumour=3',
}


def _settings(c, real):
  c.data.num_classes = 4
  c.data.in_channels = 4
  c.model.update(depth=5, base_filters=16, filter_growth=2, convs_per_block=2, residual=True,
                 norm='instance', activation='relu', down='conv', up='transpose')
  c.model.ds.mode = 'additive'
  c.model.ds.levels = ()
  c.loss.name = 'generalized_dice'
  c.loss.include_background = True       # Sudre et al.: every class, square weights
  c.loss.side_losses = False
  c.optim.update(name='adamw', lr=1e-3, weight_decay=0.0, schedule='cosine', warmup_steps=20)
  if real:
    c.data.normalization = 'zscore'      # per case and per modality (channel)
    c.data.patch_size = c.data.shape = c.data.eval_shape = (128, 128, 128)
    c.train.update(steps=1000, batch_size=2, eval_batch_size=2, eval_every=200,
                   checkpoint_every=200)
  else:
    c.data.shape = (32, 32, 32)
    c.data.num_train, c.data.num_val = 128, 16
    c.train.update(steps=300, eval_every=100, checkpoint_every=100)
  c.eval.regions = _REGIONS['msd' if real else 'brats']


def _brats_labels(c, _):
  c.data.label_map = '0:0,1:1,2:2,4:3'
  c.eval.regions = _REGIONS['brats']


def _num_class(c, value):
  c.data.num_classes = int(value)


_FLAGS = {
    'depth': lambda c, v: setattr(c.model, 'depth', int(v)),
    'base_filter': lambda c, v: setattr(c.model, 'base_filters', int(v)),
    'filter_grow': lambda c, v: setattr(c.model, 'filter_growth', 2 if presets.flag(v) else 1),
    'residual': lambda c, v: setattr(c.model, 'residual', presets.flag(v)),
    'instance_norm': lambda c, v: setattr(c.model, 'norm',
                                          'instance' if presets.flag(v) else 'batch'),
    'deep_supervision': lambda c, v: setattr(c.model.ds, 'mode',
                                             'additive' if presets.flag(v) else 'none'),
    'num_class': _num_class,
    'classes': _num_class,
    'brats_labels': _brats_labels,
}


def get_config(arg=None):
  c = presets.build(arg, ndim=3, settings=_settings, extra=_FLAGS)
  if c.data.num_classes != 4 and c.eval.regions in _REGIONS.values():
    c.eval.regions = ''  # the BraTS regions need its 4 classes (any arg may have changed them)
  return c
