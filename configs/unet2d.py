"""2D U-Net base on the synthetic images. Args: ds=MODE, smoke, bench_ref, seed=N.

`bench_ref` is the 2D speed reference (MONAI DynUNet 2D side by side,
benchmarks/side_by_side.sh): 5 levels 32-64-128-256-512, residual blocks, instance norm,
stride-2 conv downsampling, deep DS with 3 heads, Dice+CE, SGD, batch 8 x 256^2 x 1, 3 classes.
"""

from unet_ds import config_lib


def bench_ref(c):
  config_lib.bench_ref(c)  # the settings shared with 3D: blocks, norm, DS form, loss, optimiser
  c.data.shape = (256, 256)
  c.model.update(depth=5, base_filters=32, max_filters=512)
  c.model.ds.levels = (1, 2, 3)
  c.train.batch_size = 8


def get_config(arg=None):
  c = config_lib.base_config(ndim=2)
  c.data.shape = (64, 64)
  c.data.num_train, c.data.num_val = 256, 32
  c.train.batch_size, c.train.eval_batch_size = 8, 16
  return config_lib.apply_args(c, arg, {'bench_ref': lambda c, v: bench_ref(c)})
