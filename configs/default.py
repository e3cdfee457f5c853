"""The README's main job: a 3D U-Net with `deep` DS on the synthetic volumes, sized to reach a
useful Dice in a few minutes on 2 CPU cores. Args as unet3d.py: ds=MODE, smoke, seed=N."""

from unet_ds import config_lib


def get_config(arg=None):
  c = config_lib.base_config(ndim=3)
  c.data.num_train, c.data.num_val = 256, 32
  c.train.steps = 300
  c.train.eval_every = c.train.checkpoint_every = 100
  return config_lib.apply_args(c, arg)
