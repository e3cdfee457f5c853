"""One training subprocess of a sweep point, its output shown and kept in the point's workdir.

Used by the local runner (`experiments.launch`) and by the submitit job of a point
(`experiments.cluster.PointJob`). A thread copies the child's output line by line to stdout and to
`WORKDIR/launch.log`, then records the exit status. Waiting is a sleep loop on that record, never a
blocking `Popen.wait`, so a signal handler (submitit's preemption handler, SIGTERM forwarding) may
stop and wait for the child while the main thread is itself waiting for it.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

LOG_FILE = 'launch.log'
_POLL_S = 0.1


class LoggedProcess:
  """`argv` running in `cwd`, its stdout and stderr copied to stdout and `workdir/launch.log`."""

  def __init__(self, argv: Sequence[str], workdir: pathlib.Path, cwd: str | None = None,
               ignore_usr2: bool = False):
    """`ignore_usr2`: the child ignores SIGUSR2, which SLURM sends to every process of a job
    before its time limit and which would kill a Python child; the job's own handler decides."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.returncode: int | None = None
    self._log = open(workdir / LOG_FILE, 'a')  # pylint: disable=consider-using-with
    self._log.write(f'$ {shlex.join(argv)}\n')
    self._log.flush()
    preexec: Callable[[], None] | None = None
    if ignore_usr2:
      preexec = lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # noqa: E731
    self._proc = subprocess.Popen(  # pylint: disable=consider-using-with
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env=child_env(), cwd=cwd, preexec_fn=preexec)
    self.pid = self._proc.pid
    self._thread = threading.Thread(target=self._copy_output, daemon=True)
    self._thread.start()

  def _copy_output(self) -> None:
    for line in self._proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      self._log.write(line)
      self._log.flush()
    code = self._proc.wait()
    self._log.close()
    self.returncode = code  # last: a waiter that sees it also sees the whole log

  def wait(self, timeout: float | None = None) -> int | None:
    """The exit status, or None if the child still runs after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while self.returncode is None:
      if deadline is not None and time.monotonic() >= deadline:
        return None
      time.sleep(_POLL_S)
    return self.returncode

  def send_signal(self, signum: int) -> None:
    if self.returncode is None:
      self._proc.send_signal(signum)

  def stop(self, grace_s: float) -> int:
    """SIGTERM (the trainer saves a checkpoint and exits), SIGKILL after `grace_s`; the status."""
    self.send_signal(signal.SIGTERM)
    if self.wait(grace_s) is None:
      self.send_signal(signal.SIGKILL)
    return self.wait()


def child_env() -> dict[str, str]:
  """This environment with the child's output unbuffered, so that lines reach launch.log as
  they are printed. (The package is installed, `pip install -e .`: `-m unet_ds.main` imports
  from any directory.)"""
  return {**os.environ, 'PYTHONUNBUFFERED': '1'}
