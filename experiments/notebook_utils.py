"""What the experiment notebooks share: the checkout as working directory and a sweep's jobs.

A notebook (started by Jupyter in `experiments/`) calls `enter_repo()`, so that `configs/...`
paths and the launched `python -m unet_ds.main` resolve as they do on the command line.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

from experiments import launch

REPO = pathlib.Path(__file__).resolve().parents[1]


def enter_repo() -> pathlib.Path:
  """Makes the checkout's root the working directory; returns it."""
  os.chdir(REPO)
  return REPO


def sweep_jobs(config: str, config_arg: str, *, smoke: bool, root: str, default_root: str,
               extra: Mapping[str, Any]) -> tuple[list[launch.Job], pathlib.Path]:
  """The launch jobs of `config`'s sweep and the folder they train into.

  `config_arg` is the config file's argument, with `smoke` added in smoke mode; `root` '' means
  `default_root` (with `_smoke` appended in smoke mode); `extra` maps config keys to values set
  for every point (`{'train.steps': 500}`).
  """
  arg = ','.join(a for a in (config_arg, 'smoke' if smoke else '') if a)
  root_path = pathlib.Path(root or (default_root + '_smoke' if smoke else default_root))
  overrides = [(key, launch.cli_value(value)) for key, value in extra.items()]
  return launch.plan(f'{config}:{arg}' if arg else config, root_path, overrides), root_path
