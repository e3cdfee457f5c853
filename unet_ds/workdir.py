"""Keeping a workdir consistent: atomic file writes, a one-trainer lock, resume config checks.

* `atomic_path` / `atomic_write` / `write_json`: a file is written under a hidden temp name in its
  own folder, fsynced and renamed over the target, so a kill or a full disk leaves the old file or
  the new one, never a truncated file that looks complete. The temp name keeps the suffix
  (`.x.tmp-<pid>.nii.gz`) so nibabel and PIL pick the format, and starts with a dot so folder
  listings (`io.list_files`) skip it.
* `WorkdirLock`: `WORKDIR/.lock`, held with `fcntl.flock` while the trainer lives. The OS drops
  the lock when the process dies (even by SIGKILL), so a lock left by a dead trainer is taken over;
  a live holder refuses the second trainer, naming its pid, host and start time.
* `resume_conflicts` / `describe_conflicts` / `check_resume`: which config keys changed since a
  checkpoint, among those that change what the run computes (everything but `SAFE_CHANGES`).

Only process 0 of a multi-host run writes: pass `enabled=jax.process_index() == 0`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import socket
from typing import Any

import numpy as np

from unet_ds import cli

LOCK_FILE = '.lock'

# Config keys (dotted; a key names itself and everything under it) that may change between a
# checkpoint and its resume without changing what is trained: how long this slice runs, how often
# it logs, evaluates and checkpoints, where data caches live, the device layout and inference.
# Anything else (model, loss, data, optim, seed, multirun, train.steps and train.batch_size) is
# refused unless the user allows it by name. train.steps is not safe: the LR schedule and the DS
# weight decay are laid out over it. data.worker_count is not safe: the data iterator checkpoint
# holds one position per worker.
SAFE_CHANGES: tuple[str, ...] = (
    'train.stop_at_step',
    'train.eval_every',
    'train.log_every',
    'train.checkpoint_every',
    'train.max_to_keep',
    'train.eval_batch_size',
    'data.data_dir',
    # Where the plan is cached: named by the folder's files and their times, so a touched or
    # restored file moves it; added or removed cases are checked on their own (`cases`).
    'plan.plan_dir',
    'model.conv_impl',  # same parameters and maths, another kernel
    'mesh',
    'inference',
)


# ---------------------------------------------------------------------------------------------
# Atomic writes.


def json_safe(value: Any) -> Any:
  """A JSON-safe copy: arrays and numpy scalars to Python, tuples to lists, NaN/Inf to None."""
  if isinstance(value, Mapping):
    return {k: json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  elif hasattr(value, '__array__') and not isinstance(value, (str, bytes)):
    return json_safe(np.asarray(value).tolist())  # np.ndarray, jax.Array
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def temp_name(path: str) -> str:
  """The hidden temp file `atomic_path` writes before renaming: 'd/x.nii.gz' -> 'd/.x.tmp-<pid>.nii.gz'."""
  folder, name = os.path.split(os.fspath(path))
  dot = name.find('.', 1)  # the suffix starts at the first dot after a leading one
  stem, suffix = (name, '') if dot < 0 else (name[:dot], name[dot:])
  return os.path.join(folder, f'.{stem}.tmp-{os.getpid()}{suffix}')


def _fsync_dir(folder: str) -> None:
  try:
    fd = os.open(folder or '.', os.O_RDONLY)
  except OSError:
    return  # not every filesystem lets a directory be opened
  try:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
      os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
  """Yields a temp path to write `path`'s new content to; renamed over `path` on success.

    with workdir.atomic_path('out/case.nii.gz') as tmp:
      nibabel.save(img, tmp)

  On an exception the temp file is removed and `path` is untouched.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f'{path}: is a folder, cannot write a file there')
  tmp = temp_name(path)
  try:
    yield tmp
    if not os.path.isfile(tmp):
      raise FileNotFoundError(f'{path}: nothing was written to its temp file {tmp}')
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  _fsync_dir(os.path.dirname(path))  # the rename itself survives a crash


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
  """Writes `data` (text as UTF-8) to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
  """Writes `json_safe(obj)` to `path` atomically (NaN/Inf as null, never bare NaN tokens)."""
  atomic_write(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False) + '\n')


# ---------------------------------------------------------------------------------------------
# One trainer per workdir.


class WorkdirLockedError(cli.BusyError):
  """Another live process holds the workdir's lock; the message names it."""


# flock is missing on some cluster filesystems (Lustre without -o flock): fall back to the pid.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLock:
  """`WORKDIR/.lock`: held from `acquire()` (or `with`) until `release()` or process death.

  Raises `WorkdirLockedError` when another live process holds it. With `enabled=False` (processes
  other than 0 of a multi-host run) acquire and release do nothing.
  """

  def __init__(self, workdir: str | os.PathLike[str], enabled: bool = True):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.enabled = enabled
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> None:
    if not self.enabled:
      return
    if self._fd is not None:
      raise RuntimeError(f'{self.path}: this lock is already held by this object')
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirLockedError(self._refusal(holder)) from None
    except OSError as e:
      if e.errno not in _NO_FLOCK:
        os.close(fd)
        raise
      holder = _read_holder(fd)
      if holder and _alive(holder):
        os.close(fd)
        raise WorkdirLockedError(self._refusal(holder) + f' (if it is gone, delete {self.path})'
                                 ) from None
    info = {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + '\n').encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # an empty lock file: nobody holds it
    finally:
      os.close(fd)  # closing drops the flock

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()

  def _refusal(self, holder: dict[str, Any]) -> str:
    if not holder:
      who = 'another process (it has not written its pid yet)'
    else:
      who = (f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")} since '
             f'{holder.get("started", "?")}')
    return (f'{self.workdir} is in use by {who} (another trainer); wait for it or use another '
            '--workdir')


def _read_holder(fd: int) -> dict[str, Any]:
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
  except (ValueError, UnicodeDecodeError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _alive(holder: Mapping[str, Any]) -> bool:
  """Whether the holder may still run: another host's process is assumed alive."""
  if holder.get('host') != socket.gethostname():
    return True
  try:
    os.kill(int(holder['pid']), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, TypeError, ValueError):
    return True
  return True


# ---------------------------------------------------------------------------------------------
# Resume checks.


class ConfigChangedError(ValueError):
  """A resume would continue a checkpoint under a changed config; the message names the keys."""


def flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'model': {'ds': {'mode': 'deep'}}} -> {'model.ds.mode': 'deep'}; lists stay values."""
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def _covers(prefix: str, key: str) -> bool:
  return key == prefix or key.startswith(prefix + '.')


def changed_keys(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Sorted dotted keys whose values differ (a key present on one side only counts)."""
  a, b = flatten(json_safe(saved)), flatten(json_safe(new))
  return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or a[k] != b[k])


def resume_conflicts(saved: Mapping[str, Any], new: Mapping[str, Any],
                     allowed: Sequence[str] = ()) -> list[str]:
  """Changed keys that a resume must refuse: all but `SAFE_CHANGES` and the user's `allowed`.

  Args:
    saved: the config stored with the checkpoint (a nested dict, as config.json).
    new: the config of this launch, the same way.
    allowed: dotted keys or prefixes the user accepts changing (`optim.lr`, `train`); a leading
      'config.' is ignored.

  Raises:
    ValueError: an `allowed` entry that names no key of either config (a typo would otherwise
      allow nothing, silently).
  """
  keys = set(flatten(json_safe(saved))) | set(flatten(json_safe(new)))
  allowed = [a.strip().removeprefix('config.') for a in allowed if a.strip()]
  unknown = [a for a in allowed if not any(_covers(a, k) for k in keys)]
  if unknown:
    raise ValueError(f'--allow_config_change: no config key {", ".join(map(repr, unknown))}')
  accept = tuple(SAFE_CHANGES) + tuple(allowed)
  return [k for k in changed_keys(saved, new) if not any(_covers(p, k) for p in accept)]


# Keys (dotted prefixes) that change the shapes of the parameters or optimiser state: a
# checkpoint cannot continue under them whatever the user allows (its arrays would not fit).
# `model` is such a key except for the settings below, which change how, not what, is stored.
PARAMETER_KEYS: tuple[str, ...] = ('model', 'data.ndim', 'data.in_channels', 'data.num_classes',
                                   'optim.name', 'multirun.k')
SAME_PARAMETERS: tuple[str, ...] = ('model.conv_impl', 'model.dropout', 'model.remat',
                                    'model.dtype', 'model.activation', 'model.ds.fusion_dropout')


def changes_parameters(key: str) -> bool:
  """Whether a change of `key` changes the shapes of the state a checkpoint holds (it may: the
  list errs on the side of a new workdir, e.g. `model.depth` with the same filters)."""
  return (any(_covers(p, key) for p in PARAMETER_KEYS)
          and not any(_covers(p, key) for p in SAME_PARAMETERS))


def _show(config: Mapping[str, Any], key: str) -> str:
  flat = flatten(json_safe(config))
  if key not in flat:
    return '(absent)'
  value = flat[key]
  return value if isinstance(value, str) and value else json.dumps(value)


def describe_conflicts(keys: Sequence[str], saved: Mapping[str, Any], new: Mapping[str, Any],
                       source: str) -> str:
  """'resume refused: config.loss.name changed dice_ce -> ce, ... since the checkpoint in
  SOURCE; use a new --workdir, or --allow_config_change=KEY,... to accept'; only the new workdir
  when a key `changes_parameters`."""
  changes = ', '.join(f'config.{k} changed {_show(saved, k)} -> {_show(new, k)}' for k in keys)
  fixed = [k for k in keys if changes_parameters(k)]
  if fixed:  # allowing them would only fail at the restore: the arrays do not fit
    return (f'resume refused: {changes} since the checkpoint in {source}; use a new --workdir '
            f'(config.{fixed[0]} changes the model or optimiser state the checkpoint holds, so '
            'it cannot continue under it)')
  return (f'resume refused: {changes} since the checkpoint in {source}; use a new --workdir, or '
          f'--allow_config_change={",".join(keys)} to accept')


def check_resume(saved: Mapping[str, Any], new: Mapping[str, Any], allowed: Sequence[str],
                 source: str) -> list[str]:
  """Raises `ConfigChangedError` (see `describe_conflicts`) on conflicts; returns the keys that
  changed but are accepted (safe or allowed), for the caller to report."""
  conflicts = resume_conflicts(saved, new, allowed)
  if conflicts:
    raise ConfigChangedError(describe_conflicts(conflicts, saved, new, source))
  return changed_keys(saved, new)
