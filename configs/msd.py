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

from unet_ds import config_lib


def get_config(arg=None):
  c = config_lib.real_data_config(ndim=3, name='msd')  # + path, split, inference defaults
  c.data.num_classes = 3                # background included
  c.data.patch_size = (40, 56, 40)      # training patch; divisible by 2^(depth-1)
  c.data.shape = c.data.patch_size      # (synthetic-data field, kept consistent)
  # In-training eval: centre pad/crop to the patch size. Padding far beyond what training saw
  # shifts the instance-norm statistics: on 48x64x48 (whole volumes, padded) a 600-step run read
  # 0.75 where the same checkpoint reads 0.86 on patch-size crops and 0.85 with --mode=eval's
  # sliding window, the whole-volume score.
  c.data.eval_shape = c.data.patch_size

  c.model.depth = 4
  c.model.base_filters = 8
  c.train.steps = 600                   # hippocampus: held-out Dice ~0.85, ~5 min on 2 cores
  c.train.eval_batch_size = 4
  c.train.eval_every = c.train.checkpoint_every = 200
  return config_lib.apply_args(c, arg, extra=config_lib.REAL_DATA_ARGS)
