"""Orbax checkpoints of the train state, the data iterator position and the config.

A workdir holds `checkpoints/<step>/{state,data,config}`; `Checkpoints.restore_latest` resumes a
run exactly (same parameters, optimiser state, rng and next batch).
"""

from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpoints:
  """Thin wrapper over `ocp.CheckpointManager` (paths must be absolute for orbax)."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=('state', 'data', 'config'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: bytes | None, config_json: str) -> None:
    data = {'iterator': data_state.decode() if data_state is not None else None}
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave(json.loads(config_json))))

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, bytes | None, int]:
    """(state, data iterator state, step) of `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    it = (out.data or {}).get('iterator')
    return out.state, (it.encode() if it is not None else None), step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
