"""Runs or prints one `unet_ds.main` training command per point of a config's sweep.

    python -m experiments.launch --config=configs/FILE.py[:ARG] --root=ROOT [--print] \
        [--config.key=value ...]

Each point trains into `ROOT/<point name>/` (names: `experiments.sweep.point_names`). Without
`--print` the points run one after another in subprocesses, their output shown and appended to
`ROOT/<name>/launch.log`:
  * a point whose workdir holds `summary.json` is finished and skipped;
  * any other point is (re)started with the same command; `unet_ds.main` resumes from the
    workdir's latest checkpoint;
  * before anything runs, each existing `ROOT/<name>/config.json` is checked against its point's
    overrides, so a sweep edited since the last launch cannot mix runs under the wrong name;
  * a failed point is reported and the next one runs (`--fail_fast` stops instead); the exit
    status is 1 if any point failed. A point that exits 0 without `summary.json` (stopped on
    purpose by `train.stop_at_step`) is not a failure: launching again continues it.
`--print` prints the shell-quoted commands (for a cluster) and touches nothing. Extra
`--config.key=value` flags go to every point; they may not set a key that the sweep sets.
`ROOT/sweep.json` records the config, the extra flags and each point's name and command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

from ml_collections import config_dict

from experiments import sweep

# Runs one command (argv, program first) for the given workdir; returns its exit status.
Runner = Callable[[Sequence[str], pathlib.Path], int]

MAIN_MODULE = 'unet_ds.main'
SUMMARY_FILE = 'summary.json'
CONFIG_FILE = 'config.json'
LOG_FILE = 'launch.log'
MANIFEST_FILE = 'sweep.json'


@dataclasses.dataclass(frozen=True)
class Job:
  """One sweep point: where it trains and the `unet_ds.main` arguments that train it."""
  name: str
  workdir: pathlib.Path
  overrides: dict[str, Any]
  args: tuple[str, ...]  # After `python`: ('-m', 'unet_ds.main', '--config=...', ...).

  def argv(self, python: str) -> list[str]:
    return [python, *self.args]

  def command(self, python: str = 'python') -> str:
    return shlex.join(self.argv(python))

  @property
  def finished(self) -> bool:
    return (self.workdir / SUMMARY_FILE).is_file()


def cli_value(value: Any) -> str:
  """A value as `--config.key=VALUE` text that ml_collections' config flags parse back."""
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return repr(value)  # int, float, bool, None.


def parse_extra_overrides(tokens: Sequence[str]) -> list[tuple[str, str]]:
  """`['--config.a.b=1', '--config.c', 'x']` -> `[('a.b', '1'), ('c', 'x')]`; anything else raises."""
  out = []
  tokens = list(tokens)
  while tokens:
    token = tokens.pop(0)
    if not token.startswith('--config.'):
      raise ValueError(f'unknown argument {token!r}: expected --config.KEY=VALUE overrides')
    key, sep, value = token[len('--config.'):].partition('=')
    if not sep:
      if not tokens or tokens[0].startswith('--'):
        raise ValueError(f'argument {token!r} has no value')
      value = tokens.pop(0)
    out.append((key, value))
  return out


def plan(config_arg: str, root: pathlib.Path,
         extra: Sequence[tuple[str, str]] = ()) -> list[Job]:
  """The jobs of a config's sweep, their existing workdirs checked (`check_workdirs`); raises on
  bad points, unknown extra keys, clashes, or workdirs made by a different sweep."""
  config, points = sweep.load(config_arg)
  return plan_points(config_arg, config, points, root, extra)


def plan_points(config_arg: str, config: config_dict.ConfigDict, points: Sequence[sweep.Point],
                root: pathlib.Path, extra: Sequence[tuple[str, str]] = ()) -> list[Job]:
  """`plan` for given points of the config's sweep (e.g. with seeds added by `--until`)."""
  swept = {k for p in points for k in p}
  for key, _ in extra:
    try:
      sweep.get_value(config, key)
    except KeyError as e:
      raise ValueError(f'--config.{key}: {e.args[0]}') from None
    if key in swept:
      raise ValueError(f'--config.{key} sets a key that the sweep of {config_arg} sets; '
                       'change the sweep instead')
  root = pathlib.Path(root)
  jobs = []
  for name, point in zip(sweep.point_names(points), points):
    workdir = root / name
    args = ['-m', MAIN_MODULE, f'--config={config_arg}', f'--workdir={workdir}']
    args += [f'--config.{k}={cli_value(v)}' for k, v in point.items()]
    args += [f'--config.{k}={v}' for k, v in extra]
    jobs.append(Job(name=name, workdir=workdir, overrides=dict(point), args=tuple(args)))
  check_workdirs(jobs)
  return jobs


def check_workdirs(jobs: Sequence[Job]) -> None:
  """Raises if an existing workdir's config.json disagrees with its point's overrides."""
  for job in jobs:
    path = job.workdir / CONFIG_FILE
    if not path.is_file():
      continue
    try:
      recorded = sweep.flatten(json.loads(path.read_text()))
    except (json.JSONDecodeError, OSError) as e:
      raise ValueError(f'{path}: cannot read the recorded config: {e}') from None
    for key, want in job.overrides.items():
      if key not in recorded:
        raise ValueError(f'{path} has no key {key!r}, which sweep point {job.name!r} sets')
      got = recorded[key]
      if not _same_value(got, want):
        raise ValueError(
            f'{path} has {key}={got!r} but sweep point {job.name!r} sets {want!r}: the sweep '
            'changed since this workdir was made; move it away or use another --root')


def subprocess_runner(argv: Sequence[str], workdir: pathlib.Path) -> int:
  """Runs argv, streaming its output to stdout and appending it to `workdir/launch.log`."""
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / LOG_FILE, 'a') as log:
    log.write(f'$ {shlex.join(argv)}\n')
    log.flush()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env=_child_env())
    try:
      for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
      return proc.wait()
    except BaseException:  # Ctrl-C: don't leave the child training on its own.
      proc.terminate()
      proc.wait()
      raise


def run(jobs: Sequence[Job], runner: Runner = subprocess_runner, python: str = sys.executable,
        fail_fast: bool = False, log: Callable[[str], None] = print) -> dict[str, str]:
  """Runs unfinished jobs one after another.

  Returns {name: status}, status one of 'skipped' (already finished), 'done', 'stopped' (exit 0
  before the last step), 'failed', 'not run' (after a failure with fail_fast). The jobs come
  from `plan`, which has checked their workdirs.
  """
  status = {job.name: 'not run' for job in jobs}
  for i, job in enumerate(jobs):
    tag = f'[{i + 1}/{len(jobs)}] {job.name}'
    if job.finished:
      log(f'{tag}: finished ({job.workdir / SUMMARY_FILE} exists), skipped')
      status[job.name] = 'skipped'
      continue
    log(f'{tag}: {"resuming" if job.workdir.exists() else "starting"} in {job.workdir}')
    job.workdir.mkdir(parents=True, exist_ok=True)
    code = runner(job.argv(python), job.workdir)
    if code == 0:
      # Exit 0 without a summary: the run stopped early on purpose (train.stop_at_step).
      status[job.name] = 'done' if job.finished else 'stopped'
      if not job.finished:
        log(f'{tag}: stopped before the last step (no {SUMMARY_FILE}); launch again to go on')
      continue
    status[job.name] = 'failed'
    log(f'{tag}: FAILED (exit status {code}); log: {job.workdir / LOG_FILE}')
    if fail_fast:
      break
  return status


def write_manifest(root: pathlib.Path, config_arg: str, extra: Sequence[tuple[str, str]],
                   jobs: Sequence[Job]) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  path = root / MANIFEST_FILE
  manifest = {
      'config': config_arg,
      'extra_overrides': {k: v for k, v in extra},
      'points': [{'name': j.name, 'overrides': j.overrides, 'command': j.command()} for j in jobs],
  }
  path.write_text(json.dumps(manifest, indent=2) + '\n')
  return path


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner,
         out: Callable[[str], None] = print) -> int:
  parser = argparse.ArgumentParser(prog='python -m experiments.launch', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='configs/FILE.py[:ARG] with a get_sweep')
  parser.add_argument('--root', required=True, help='directory that gets one workdir per point')
  parser.add_argument('--print', dest='print_only', action='store_true',
                      help='print one command per point and run nothing')
  parser.add_argument('--fail_fast', '--fail-fast', action='store_true',
                      help='stop at the first failed point')
  parser.add_argument('--python', default=None,
                      help='interpreter in the commands (default: `python` with --print, '
                      'this interpreter otherwise)')
  args, rest = parser.parse_known_args(argv)
  try:
    extra = parse_extra_overrides(rest)
    jobs = plan(args.config, pathlib.Path(args.root), extra)
    if args.print_only:
      for job in jobs:
        out(job.command(args.python or 'python'))
      return 0
  except (ValueError, FileNotFoundError) as e:
    parser.exit(2, f'error: {e}\n')
  write_manifest(pathlib.Path(args.root), args.config, extra, jobs)
  with _exit_on_sigterm():
    status = run(jobs, runner=runner, python=args.python or sys.executable,
                 fail_fast=args.fail_fast, log=out)
  counts = {s: sum(v == s for v in status.values())
            for s in ('done', 'skipped', 'stopped', 'failed')}
  out(f'sweep {args.config}: {counts["done"]} ran, {counts["skipped"]} already finished, '
      f'{counts["stopped"]} stopped early, {counts["failed"]} failed, of {len(jobs)} points in '
      f'{args.root}')
  failed = [n for n, s in status.items() if s == 'failed']
  if failed:
    out('failed: ' + ' '.join(failed))
  return 1 if failed else 0


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
  """`kill` of the launcher stops the running point too (the runner terminates its child on
  SystemExit as on Ctrl-C) instead of leaving it training on its own."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def _child_env() -> dict[str, str]:
  # `-m unet_ds.main` must import from this checkout whatever the current directory is (a
  # notebook's is its own folder); the config path stays relative to the current directory.
  env = dict(os.environ)
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  env['PYTHONPATH'] = os.pathsep.join(p for p in (repo, env.get('PYTHONPATH')) if p)
  return env


def _same_value(recorded: Any, wanted: Any) -> bool:
  # config.json holds tuples as lists and int-valued floats as ints or floats.
  if isinstance(recorded, (list, tuple)) and isinstance(wanted, (list, tuple)):
    return len(recorded) == len(wanted) and all(map(_same_value, recorded, wanted))
  if isinstance(recorded, bool) or isinstance(wanted, bool):
    return recorded is wanted
  return recorded == wanted


if __name__ == '__main__':
  sys.exit(main())
