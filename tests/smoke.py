"""The tests' smoke-sized synthetic run config (one device; train keys as overrides) and the
small workdir helpers several test files share."""

import os
from typing import Any

import ml_collections

from unet_ds import checkpoint
from unet_ds import config_lib


def config(data_dir: str, ndim: int = 2, mode: str = 'deep', **train_kw) -> ml_collections.ConfigDict:
  c = config_lib.apply_args(config_lib.base_config(ndim), f'ds={mode},smoke')
  c.data.data_dir = data_dir
  c.mesh.data = 1
  c.train.update(train_kw)
  return c


def save_checkpoint(workdir: str, step: int, state: Any, config: ml_collections.ConfigDict,
                    max_to_keep: int | None = None) -> None:
  """Writes `state` as the workdir's checkpoint `step`, as the trainer saves it (complete)."""
  kw = {} if max_to_keep is None else {'max_to_keep': max_to_keep}
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, 'checkpoints'), **kw)
  ckpts.save(step, state, None, config_lib.to_json(config))
  ckpts.wait()
  ckpts.close()


def forbid_data(monkeypatch) -> None:
  """Makes building any data source fail the test (for checks that must come first)."""
  from unet_ds.data import datasets  # pylint: disable=g-import-not-at-top

  def no_data(*_):
    raise AssertionError('data built before the resume check')
  monkeypatch.setattr(datasets, 'get_sources', no_data)
