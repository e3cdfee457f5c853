"""Orbax checkpoints of the train state, the data iterator position and the config, verified.

A workdir holds `checkpoints/<step>/{state,data,config,checksum}`. `Checkpoints.restore(abstract)`
resumes a run exactly (same parameters, optimiser state, rng and next batch) from the latest
checkpoint that reads back intact:

* `checksum` holds a sha256 of every state leaf (dtype, shape and bytes), computed on the host
  from the state being saved; a restore recomputes it, so a flipped bit is an error, not silently
  different weights (tensorstore only notices what breaks its decoding).
* A checkpoint that fails to read or verify is reported in one line naming its path and the
  reason, and the previous one is used; `CheckpointError` names the folder when none is readable.
  `set_aside_after(step)` then moves the bad later steps out of the way of the resumed run.
* The dozens of 'Event loop is closed' tracebacks that orbax/tensorstore leave behind a failed
  read are dropped (`_drop_failed_restore_noise`), so the one line above is what the user sees.
* A checkpoint whose state has other leaves, shapes or dtypes than the one asked for (the model
  changed) raises `CheckpointMismatchError` at once, naming the leaves: that is no corruption, and
  an older checkpoint of the same run would not fit either.

Checkpoints written before the checksum item existed restore without that verification.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from unet_ds import cli


class CheckpointError(cli.UserError, RuntimeError):
  """No checkpoint in a folder could be read; the message names the folder and the reasons."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint's state has other leaves, shapes or dtypes than the state asked for."""


def _key_name(key: Any) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_names(tree: Any) -> list[tuple[str, Any]]:
  """(dotted path as orbax names it, leaf): 'opt_state.1.0.mu.params.conv.kernel'."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [('.'.join(_key_name(k) for k in path), leaf) for path, leaf in flat]


def _host_bytes(leaf: Any) -> np.ndarray | None:
  """The leaf on the host, or None when this process holds only part of it (sharded state)."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not leaf.is_fully_addressable:
      if not leaf.is_fully_replicated:
        return None
      leaf = leaf.addressable_data(0)
  return np.ascontiguousarray(jax.device_get(leaf))


def leaf_digests(tree: Any) -> dict[str, str] | None:
  """sha256 of each leaf (dtype, shape, bytes) by dotted path; None when a leaf is sharded
  across processes (no one host sees all of it, so there is nothing to verify against)."""
  out = {}
  for name, leaf in _leaf_names(tree):
    array = _host_bytes(leaf)
    if array is None:
      return None
    h = hashlib.sha256(f'{array.dtype.str}{array.shape}'.encode())
    h.update(array.reshape(-1).view(np.uint8))
    out[name] = h.hexdigest()
  return out


def _drop_failed_restore_noise() -> None:
  """Installs (once) a `sys.unraisablehook` that drops the noise of a failed orbax restore.

  When one array read fails, orbax closes its private event loop while tensorstore reads are
  still in flight; each then reports 'Event loop is closed' as an unraisable exception (dozens of
  tracebacks), and at interpreter exit their coroutines complain again ('sys.meta_path is None')
  or repeat the read error that `restore` already reported, with a page of tensorstore spec.
  Only those are dropped; everything else goes to the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_restore_noise', False):
    return

  def hook(unraisable: Any) -> None:
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    if (isinstance(error, ImportError) and 'likely shutting down' in str(error)
        and asyncio.iscoroutine(unraisable.object)):
      return
    if str(error).startswith('Encountered error while reading array index'):
      return
    previous(unraisable)

  hook.drops_restore_noise = True
  sys.unraisablehook = hook


def _reason(error: BaseException) -> str:
  """The innermost cause, on one line: tensorstore wraps the useful message twice."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = ' '.join(str(error).split()) or repr(error)
  text = text[:300] + ('...' if len(text) > 300 else '')
  return f'{type(error).__name__}: {text}'


class Checkpoints:
  """`ocp.CheckpointManager` with verified, falling-back restores (paths made absolute)."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self.unreadable: dict[int, str] = {}  # step -> reason, from the last restore
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler(),
                       'checksum': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    """Every finished checkpoint's step, oldest first (unverified)."""
    return sorted(self._manager.all_steps())

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_state: bytes | None, config_json: str,
           train_seconds: float | None = None) -> None:
    """Saves asynchronously (see `wait`); the checksum is taken now, from `state` itself.

    `train_seconds`: the run's training time up to `step`, summed over every launch that
    trained it (read back by `train_seconds`).
    """
    data = {'iterator': data_state.decode() if data_state is not None else None,
            'train_seconds': train_seconds}
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave(json.loads(config_json)),
        checksum=ocp.args.JsonSave({'sha256': leaf_digests(state)})))

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, bytes | None, int]:
    """(state, data iterator state, step) of `step`, or of the latest readable checkpoint.

    Raises:
      FileNotFoundError: the folder holds no checkpoint.
      CheckpointError: `step` (or, without one, every checkpoint) is unreadable or fails its
        checksum; the message names the folder and each reason.
      CheckpointMismatchError: the checkpoint's state does not fit `abstract_state`.
    """
    steps = [step] if step is not None else self.steps()[::-1]
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    _drop_failed_restore_noise()
    self.unreadable = {}
    for s in steps:
      try:
        result = self._restore_step(abstract_state, s)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # orbax/tensorstore/json raise many types for damaged files
        self.unreadable[s] = _reason(e)
        continue
      for bad, reason in self.unreadable.items():
        logging.warning('checkpoint %s is unreadable (%s); using the previous readable one, '
                        'step %d', self.path(bad), reason, s)
      return result
    raise CheckpointError(
        f'no readable checkpoint in {self.directory}: ' +
        '; '.join(f'step {s}: {r}' for s, r in self.unreadable.items()) +
        '; move the folder away (or use a new --workdir) to train from scratch')

  def _restore_step(self, abstract_state: Any, step: int) -> tuple[Any, bytes | None, int]:
    self._check_fits(abstract_state, step)
    has_checksum = os.path.isdir(os.path.join(self.path(step), 'checksum'))
    args = {'state': ocp.args.StandardRestore(abstract_state), 'data': ocp.args.JsonRestore()}
    if has_checksum:
      args['checksum'] = ocp.args.JsonRestore()
    out = self._manager.restore(step, args=ocp.args.Composite(**args))
    if has_checksum:
      want = (out.checksum or {}).get('sha256')
      got = leaf_digests(out.state) if want is not None else None
      if want is not None and got is not None and got != want:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        more = f' and {len(bad) - 1} more' if len(bad) > 1 else ''
        raise ValueError(f'checksum mismatch in {bad[0]}{more}')
    it = (out.data or {}).get('iterator')
    return out.state, (it.encode() if it is not None else None), step

  def _check_fits(self, abstract_state: Any, step: int) -> None:
    """Raises CheckpointMismatchError when the saved leaves differ from the abstract ones."""
    saved = {leaf.name: leaf for leaf in jax.tree.leaves(self._manager.item_metadata(step).state)}
    wanted = dict(_leaf_names(abstract_state))
    problems = [f'{n} missing in the checkpoint' for n in sorted(wanted.keys() - saved.keys())]
    problems += [f'{n} only in the checkpoint' for n in sorted(saved.keys() - wanted.keys())]
    for name in sorted(wanted.keys() & saved.keys()):
      a, b = wanted[name], saved[name]
      if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
        problems.append(f'{name} is {np.dtype(b.dtype).name}{tuple(b.shape)} in the checkpoint, '
                        f'{np.dtype(a.dtype).name}{tuple(a.shape)} here')
    if problems:
      more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
      raise CheckpointMismatchError(
          f'checkpoint {self.path(step)} holds another model or optimiser state: '
          f'{"; ".join(problems[:3])}{more}; train this config in a new --workdir (or use the '
          'config the checkpoint was trained with)')

  def saved_config(self, step: int | None = None) -> dict[str, Any]:
    """The config saved with `step` (default: the latest checkpoint whose config reads)."""
    steps = [step] if step is not None else self.steps()[::-1]
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    reasons = []
    for s in steps:
      try:
        out = self._manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out.config)
      except Exception as e:  # pylint: disable=broad-except
        reasons.append(f'step {s}: {_reason(e)}')
    raise CheckpointError(f'no readable config in {self.directory}: {"; ".join(reasons)}')

  def train_seconds(self, step: int) -> float | None:
    """The training seconds saved with `step`; None for checkpoints written before they were."""
    out = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    value = (out.data or {}).get('train_seconds')
    return None if value is None else float(value)

  def set_aside(self, step: int) -> str:
    """Moves checkpoint `step` to `<directory>-unreadable/<step>` (kept for a look, out of the
    way of the resumed run's own save of that step); returns the new path."""
    target = os.path.join(self.directory + '-unreadable', str(step))
    n = 1
    while os.path.exists(target):
      target = os.path.join(self.directory + '-unreadable', f'{step}.{n}')
      n += 1
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(self.path(step), target)
    self._manager.reload()
    return target

  def set_aside_after(self, step: int) -> list[str]:
    """`set_aside` every checkpoint after `step` (call after a resume fell back to `step`)."""
    return [self.set_aside(s) for s in self.steps() if s > step]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
