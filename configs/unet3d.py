"""3D U-Net base on the synthetic volumes. Args: ds=MODE, smoke, bench_ref, seed=N.

  python -m unet_ds.main --config=configs/unet3d.py:ds=hypercolumn,smoke --workdir=/tmp/run
"""

from unet_ds import config_lib


def get_config(arg=None):
  return config_lib.apply_args(config_lib.base_config(ndim=3), arg)
