"""2D DS U-Net on a folder of image/mask pairs (image/ + label/, PNG or TIFF), e.g. the ISBI 2012
EM membranes (binary: membrane vs cell).

  python -m unet_ds.main --config=configs/folder2d.py:path=/data/isbi/train,isbi --workdir=runs/em
  python -m unet_ds.main --workdir=runs/em --mode=eval --input=/data/isbi/train --output=runs/em/ev
  python -m unet_ds.main --workdir=runs/em --mode=predict \
      --input=/data/isbi/test --output=runs/em/pred

Args: path=DIR (or --config.data.path), classes=K, channels=C, isbi (membrane = class 1 from the
0/255 masks, slices 25-29 held out, whole 512x512 eval), fold=N (of 5), ds=MODE, seed=N, smoke.
"""

from unet_ds import config_lib


def get_config(arg=None):
  c = config_lib.real_data_config(ndim=2, name='folder2d')  # + path, split, inference defaults
  c.data.image_dir = 'image'            # data.path holds image/ and label/
  c.data.label_dir = 'label'
  c.data.num_classes = 2                # background included
  c.data.patch_size = (256, 256)        # training patch; divisible by 2^(depth-1)
  c.data.shape = c.data.patch_size      # (synthetic-data field, kept consistent)
  c.data.eval_shape = (256, 256)        # in-training eval: centre pad/crop to this

  c.model.depth = 5
  c.model.base_filters = 16
  c.train.steps = 800                   # ISBI: membrane Dice 0.80 on slices 25-29, ~8 min on 2 cores
  c.train.eval_batch_size = 2
  c.train.eval_every = c.train.checkpoint_every = 100

  def isbi(c, _):
    c.data.label_map = '0:1,255:0'      # ISBI masks: 0 = membrane, 255 = cell
    c.data.val_cases = '25,26,27,28,29'  # adjacent slices correlate: hold out a block
    c.data.eval_shape = (512, 512)

  return config_lib.apply_args(c, arg, extra={**config_lib.REAL_DATA_ARGS, 'isbi': isbi})
