"""2D DS U-Net on a folder of image/mask pairs (image/ + label/, PNG or TIFF), e.g. the ISBI 2012
EM membranes (binary: membrane vs cell).

  python -m unet_ds.main --config=configs/folder2d.py:path=/data/isbi/train,isbi --workdir=runs/em
  python -m unet_ds.main --workdir=runs/em --mode=eval --input=/data/isbi/train --output=runs/em/ev
  python -m unet_ds.main --workdir=runs/em --mode=predict \
      --input=/data/isbi/test --output=runs/em/pred

Args: path=DIR (or --config.data.path), classes=K, channels=C, isbi (membrane = class 1 from the
0/255 masks, slices 25-29 held out, whole 512x512 eval), fold=N (of 5), ds=MODE, seed=N, smoke.
"""

import ml_collections

from unet_ds import config_lib


def get_config(arg=None):
  c = config_lib.base_config(ndim=2)
  c.data.name = 'folder2d'
  c.data.path = ''                      # holds image/ and label/
  c.data.image_dir = 'image'
  c.data.label_dir = 'label'
  c.data.num_classes = 2                # background included
  c.data.in_channels = 1                # 3 for RGB
  c.data.patch_size = (256, 256)        # training patch; divisible by 2^(depth-1)
  c.data.shape = c.data.patch_size      # (synthetic-data field, kept consistent)
  c.data.eval_shape = (256, 256)        # in-training eval: centre pad/crop to this
  c.data.normalization = 'zscore'       # per image: zscore | minmax | none
  c.data.clip_percentiles = ()
  c.data.label_map = ''                 # mask value -> class, e.g. '0:1,255:0'
  c.data.val_fraction = 0.2             # seeded by data.seed
  c.data.val_cases = ''                 # 'name,name' (file names without suffix)
  c.data.num_folds = 0
  c.data.fold = 0
  c.data.fg_fraction = 1 / 3
  c.data.augment = True

  c.model.depth = 5
  c.model.base_filters = 16
  c.model.ds.mode = 'deep'
  c.loss.name = 'dice_ce'
  c.loss.ds_weights = 'nnunet'
  c.optim.lr = 3e-3
  c.train.steps = 500                   # ISBI: membrane Dice ~0.80 on slices 25-29
  c.train.batch_size = 2
  c.train.eval_batch_size = 2
  c.train.eval_every = c.train.checkpoint_every = 100
  c.train.log_every = 20

  c.inference = ml_collections.ConfigDict()
  c.inference.overlap = 0.5
  c.inference.batch_size = 2
  c.inference.sigma_scale = 1 / 8
  c.inference.tta_axes = ()             # e.g. (0, 1)
  c.inference.save_probs = False

  def isbi(c, _):
    c.data.label_map = '0:1,255:0'      # ISBI masks: 0 = membrane, 255 = cell
    c.data.val_cases = '25,26,27,28,29'  # adjacent slices correlate: hold out a block
    c.data.eval_shape = (512, 512)

  def smoke(c, _):
    c.data.patch_size = c.data.shape = c.data.eval_shape = (16, 16)
    c.model.depth, c.model.base_filters = 3, 4
    c.train.steps, c.train.batch_size, c.train.eval_batch_size = 4, 2, 2
    c.train.eval_every = c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.optim.warmup_steps = 1

  return config_lib.apply_args(c, arg, extra={
      'path': lambda c, v: setattr(c.data, 'path', v),
      'classes': lambda c, v: setattr(c.data, 'num_classes', int(v)),
      'channels': lambda c, v: setattr(c.data, 'in_channels', int(v)),
      'isbi': isbi,
      'fold': lambda c, v: (setattr(c.data, 'num_folds', 5), setattr(c.data, 'fold', int(v))),
      'smoke': smoke,
  })
