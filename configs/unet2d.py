"""2D U-Net base on the synthetic images. Args: ds=MODE, smoke, seed=N."""

from unet_ds import config_lib


def get_config(arg=None):
  c = config_lib.base_config(ndim=2)
  c.data.shape = (64, 64)
  c.data.num_train, c.data.num_val = 256, 32
  c.train.batch_size, c.train.eval_batch_size = 8, 16
  return config_lib.apply_args(c, arg)
