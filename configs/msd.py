"""3D DS U-Net on an MSD-style NIfTI task folder (imagesTr/ + labelsTr/), sized for Task04
hippocampus (3 classes, volumes ~36x51x36) on a few CPU cores.

  python -m unet_ds.main --config=configs/msd.py:path=/data/Task04_Hippocampus --workdir=runs/hip
  python -m unet_ds.main --workdir=runs/hip --mode=eval --input=/data/Task04_Hippocampus \
      --output=runs/hip/ev   # the run's own data path: its held-out validation cases
  python -m unet_ds.main --workdir=runs/hip --mode=predict \
      --input=/data/Task04_Hippocampus/imagesTs --output=runs/hip/pred

Args: path=DIR (or --config.data.path), classes=K, channels=C, fold=N (of 5; default: a seeded
80/20 split), ds=MODE, seed=N, smoke.
"""

import ml_collections

from unet_ds import config_lib


def get_config(arg=None):
  c = config_lib.base_config(ndim=3)
  c.data.name = 'msd'
  c.data.path = ''                      # the task folder, e.g. .../Task04_Hippocampus
  c.data.num_classes = 3                # background included
  c.data.in_channels = 1                # modalities (4D NIfTI images for > 1)
  c.data.patch_size = (40, 56, 40)      # training patch; divisible by 2^(depth-1)
  c.data.shape = c.data.patch_size     # (synthetic-data field, kept consistent)
  c.data.eval_shape = (48, 64, 48)      # in-training eval: whole hippocampus volumes, padded
  c.data.normalization = 'zscore'       # per volume: zscore | minmax | none
  c.data.clip_percentiles = ()          # e.g. (0.5, 99.5) before normalising
  c.data.label_map = ''                 # 'value:class,...' when labels are not 0..K-1
  c.data.val_fraction = 0.2             # seeded by data.seed
  c.data.val_cases = ''                 # 'id,id' overrides val_fraction
  c.data.num_folds = 0                  # > 1: k-fold, validation = fold `data.fold`
  c.data.fold = 0
  c.data.fg_fraction = 1 / 3            # patches forced onto foreground (nnU-Net)
  c.data.augment = True

  c.model.depth = 4
  c.model.base_filters = 8
  c.model.ds.mode = 'deep'
  c.loss.name = 'dice_ce'
  c.loss.ds_weights = 'nnunet'
  c.optim.lr = 3e-3
  c.train.steps = 600                   # hippocampus: held-out Dice ~0.83
  c.train.batch_size = 2
  c.train.eval_batch_size = 4
  c.train.eval_every = c.train.checkpoint_every = 200
  c.train.log_every = 20

  c.inference = ml_collections.ConfigDict()
  c.inference.overlap = 0.5             # sliding-window overlap (nnU-Net: 0.5)
  c.inference.batch_size = 2            # windows per model call
  c.inference.sigma_scale = 1 / 8       # Gaussian importance sigma / patch size
  c.inference.tta_axes = ()             # flip TTA over these spatial axes, e.g. (0, 1, 2)
  c.inference.save_probs = False        # also write class probabilities

  def smoke(c, _):
    c.data.patch_size = c.data.shape = c.data.eval_shape = (16, 16, 16)
    c.model.depth, c.model.base_filters = 3, 4
    c.train.steps, c.train.batch_size, c.train.eval_batch_size = 4, 2, 2
    c.train.eval_every = c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.optim.warmup_steps = 1

  return config_lib.apply_args(c, arg, extra={
      'path': lambda c, v: setattr(c.data, 'path', v),
      'classes': lambda c, v: setattr(c.data, 'num_classes', int(v)),
      'channels': lambda c, v: setattr(c.data, 'in_channels', int(v)),
      'fold': lambda c, v: (setattr(c.data, 'num_folds', 5), setattr(c.data, 'fold', int(v))),
      'smoke': smoke,
  })

