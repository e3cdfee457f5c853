"""The tests' smoke-sized synthetic run config (one device; train keys as overrides)."""

import ml_collections

from unet_ds import config_lib


def config(data_dir: str, ndim: int = 2, mode: str = 'deep', **train_kw) -> ml_collections.ConfigDict:
  c = config_lib.apply_args(config_lib.base_config(ndim), f'ds={mode},smoke')
  c.data.data_dir = data_dir
  c.mesh.data = 1
  c.train.update(train_kw)
  return c
