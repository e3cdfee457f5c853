"""Sweep points as submitit jobs: a SLURM job array, or local processes through the same code.

`experiments.launch --executor=slurm` submits one job array (one task per unfinished point);
`--executor=submitit_local` runs the same jobs as local processes with submitit's LocalExecutor
(what the tests use). Each job is a `PointJob`: it runs the point's `unet_ds.main` command in a
subprocess, exactly as the local runner does, so configs parse the same way.

Preemption and time limits: SLURM sends SIGUSR2 `signal_delay_s` (90 s) before the end; submitit's
handler calls `PointJob.checkpoint`, which sends SIGTERM to the trainer (it saves a checkpoint and
exits), waits for it, and hands submitit the same point to requeue. The requeued job runs the same
command, and `unet_ds.main` resumes from the workdir's latest checkpoint. A SIGTERM to the job
(`scancel`) is forwarded to the trainer too. Time-limit requeues are capped by `max_timeouts`;
preemptions are not.

Submissions are recorded in `ROOT/jobs.json` (`{"executor", "folder", "points": {name: {"job_id",
"round"}}}`), so that launching again neither resubmits a point whose job is still queued or
running nor loses track of where its logs are (`ROOT/submitit/<job id>_0_log.out`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
from typing import Any, Mapping, Sequence

import submitit

from experiments import process

EXECUTORS = ('submitit_local', 'slurm')  # Beside the launcher's own 'local' runner.
JOBS_FILE = 'jobs.json'
SUBMITIT_DIR = 'submitit'
SUMMARY_FILE = 'summary.json'
# SLURM job states in which a job may still write to its workdir.
_SLURM_ACTIVE = frozenset({'PENDING', 'CONFIGURING', 'RUNNING', 'COMPLETING', 'REQUEUED',
                           'REQUEUE_HOLD', 'REQUEUE_FED', 'RESIZING', 'SUSPENDED', 'STAGE_OUT',
                           'SIGNALING'})


class PointFailed(RuntimeError):
  """A point's trainer exited with an error (the message names its log)."""


@dataclasses.dataclass(frozen=True)
class Resources:
  """What each job asks for. `slurm` holds extra sbatch settings by submitit's names
  (`account`, `qos`, `constraint`, `mem`, ...)."""
  time_min: int = 240
  partition: str | None = None
  gpus: int = 0
  cpus: int | None = None
  array_parallelism: int = 256
  max_timeouts: int = 10  # Requeues after hitting the time limit (preemptions don't count).
  signal_delay_s: int = 90  # SIGUSR2 this long before the time limit: time to save and exit.
  slurm: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for name in ('time_min', 'gpus', 'array_parallelism', 'max_timeouts', 'signal_delay_s'):
      if getattr(self, name) < (1 if name in ('time_min', 'array_parallelism') else 0):
        raise ValueError(f'--{name}={getattr(self, name)} is out of range')
    if self.cpus is not None and self.cpus < 1:
      raise ValueError(f'--cpus={self.cpus}: need at least 1')


class PointJob(submitit.helpers.Checkpointable):
  """One sweep point as a submitit job (see the module doc for preemption and requeueing)."""

  def __init__(self, name: str, workdir: str | pathlib.Path, argv: Sequence[str], cwd: str,
               stop_grace_s: float = 60.0):
    self.name = name
    self.workdir = pathlib.Path(workdir)
    self.argv = tuple(argv)
    self.cwd = cwd  # Config paths in argv are relative to the launcher's directory.
    self.stop_grace_s = stop_grace_s
    self._child: process.LoggedProcess | None = None
    self._stopping = False

  def __call__(self) -> dict[str, Any]:
    """Trains the point; {'name', 'status'} with status 'done', 'skipped' (already finished) or
    'stopped' (exited early on a signal or at `train.stop_at_step`; a relaunch continues)."""
    if (self.workdir / SUMMARY_FILE).is_file():
      return {'name': self.name, 'status': 'skipped'}
    step = latest_checkpoint_step(self.workdir)
    print(f'{self.name}: ' + (f'resuming from checkpoint step {step}' if step is not None
                              else 'starting') + f' in {self.workdir}', flush=True)
    self._stopping = False
    self._child = process.LoggedProcess(self.argv, self.workdir, cwd=self.cwd, ignore_usr2=True)
    previous = signal.signal(signal.SIGTERM, self._forward_sigterm)
    try:
      code = self._child.wait()
    except BaseException:  # submitit's requeue exit, Ctrl-C: the trainer saves and stops too.
      self._child.stop(self.stop_grace_s)
      raise
    finally:
      signal.signal(signal.SIGTERM, previous)
    if (self.workdir / SUMMARY_FILE).is_file():
      return {'name': self.name, 'status': 'done'}
    if code == 0 or self._stopping:
      return {'name': self.name, 'status': 'stopped'}
    raise PointFailed(f'{self.name}: unet_ds.main exited with status {code}; log: '
                      f'{self.workdir / process.LOG_FILE}')

  def _forward_sigterm(self, signum: int, frame: Any) -> None:
    del frame
    self._stopping = True
    if self._child is not None:
      self._child.send_signal(signum)

  def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
    """Called by submitit on preemption or time-out: stop the trainer (it saves a checkpoint),
    then requeue this same point, which resumes from that checkpoint."""
    if self._child is not None:
      self._stopping = True
      code = self._child.stop(self.stop_grace_s)
      print(f'{self.name}: stopped for requeueing (trainer exit status {code}, latest checkpoint '
            f'step {latest_checkpoint_step(self.workdir)})', flush=True)
    return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

  def __getstate__(self) -> dict[str, Any]:
    # The running child is this process's own; a requeued job starts a new one.
    return {k: v for k, v in self.__dict__.items() if k not in ('_child', '_stopping')}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _child=None, _stopping=False)


def latest_checkpoint_step(workdir: pathlib.Path) -> int | None:
  """The highest finished checkpoint step under `workdir/checkpoints/` (orbax writes a step's
  folder under a temporary name first), or None."""
  steps = [int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').glob('*')
           if p.is_dir() and p.name.isdigit()]
  return max(steps, default=None)


def make_executor(kind: str, folder: pathlib.Path, resources: Resources) -> submitit.AutoExecutor:
  """A submitit executor for `kind` ('slurm' or 'submitit_local') with the resources set."""
  if kind not in EXECUTORS:
    raise ValueError(f'executor {kind!r}: expected one of {", ".join(EXECUTORS)}')
  cluster = 'slurm' if kind == 'slurm' else 'local'
  executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster,
                                   **{f'{cluster}_max_num_timeout': resources.max_timeouts})
  params: dict[str, Any] = {
      'name': 'unet_ds', 'timeout_min': resources.time_min, 'gpus_per_node': resources.gpus,
      'cpus_per_task': resources.cpus, 'slurm_partition': resources.partition,
      'slurm_array_parallelism': resources.array_parallelism,
      'slurm_signal_delay_s': resources.signal_delay_s,  # LocalExecutor: its own 30 s
  }
  params.update({f'slurm_{k}': v for k, v in resources.slurm.items()})
  try:
    executor.update_parameters(**params)
  except NameError as e:  # submitit's error for an unknown parameter
    raise ValueError(f'executor {kind}: {e}') from None
  return executor


def submit(executor: submitit.AutoExecutor, jobs: Sequence[PointJob]) -> list[submitit.Job]:
  """The points as one job array (SLURM) or one local process each; the submitit jobs."""
  with executor.batch():
    submitted = [executor.submit(job) for job in jobs]
  return submitted


def record_jobs(root: pathlib.Path, kind: str, folder: pathlib.Path,
                submitted: Mapping[str, str], round_: int = 0) -> pathlib.Path:
  """Adds {point name: job id} to `ROOT/jobs.json` (a later submission of a point replaces it)."""
  path = pathlib.Path(root) / JOBS_FILE
  record = read_jobs(root) or {'executor': kind, 'folder': str(folder), 'points': {}}
  record.update(executor=kind, folder=str(folder))
  for name, job_id in submitted.items():
    record['points'][name] = {'job_id': job_id, 'round': round_}
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(record, indent=2) + '\n')
  os.replace(tmp, path)
  return path


def read_jobs(root: pathlib.Path) -> dict[str, Any] | None:
  path = pathlib.Path(root) / JOBS_FILE
  if not path.is_file():
    return None
  try:
    record = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(record, dict) or not isinstance(record.get('points'), dict):
    raise ValueError(f'{path}: expected {{"executor", "folder", "points": {{name: ...}}}}')
  return record


def active_jobs(root: pathlib.Path) -> dict[str, str]:
  """{point name: job id} of the recorded jobs that are still queued or running."""
  record = read_jobs(root)
  if record is None:
    return {}
  out = {}
  for name, entry in record['points'].items():
    job_id = str(entry['job_id'])
    if _is_active(record['executor'], record['folder'], job_id):
      out[name] = job_id
  return out


def _is_active(kind: str, folder: str, job_id: str) -> bool:
  if kind == 'slurm':
    return submitit.SlurmJob(folder=folder, job_id=job_id).state in _SLURM_ACTIVE
  # A local job's id is the pid of its controller process.
  try:
    pid = int(job_id)
    os.kill(pid, 0)
  except (ProcessLookupError, PermissionError, ValueError):  # gone, or a recycled pid
    return False
  stat = pathlib.Path(f'/proc/{pid}/stat')
  try:  # an exited process that its parent has not reaped yet is not running
    return stat.read_text().rsplit(')', 1)[1].split()[0] != 'Z'
  except (OSError, IndexError):
    return True


def outcome(job: submitit.Job) -> tuple[str, str]:
  """(status, detail) of a finished submitit job: the point's status, or 'failed' and why."""
  try:
    result = job.result()
  except Exception as e:  # pylint: disable=broad-except  # submitit's job errors carry the trace
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return 'failed', (lines[-1] if lines else type(e).__name__)
  return result['status'], ''
