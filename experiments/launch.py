"""Runs, submits or prints one `unet_ds.main` training command per point of a config's sweep.

    python -m experiments.launch --config=configs/FILE.py[:ARG] --root=ROOT [--print] \
        [--executor=local|slurm|submitit_local] [--until=ci_halfwidth:H,max_seeds:N] \
        [--config.key=value ...]

Each point trains into `ROOT/<point name>/` (names: `experiments.sweep.point_names`). Before
anything runs, each existing `ROOT/<name>/config.json` is checked against its point's overrides,
so a sweep edited since the last launch cannot mix runs under the wrong name. A point whose
workdir holds `summary.json` is finished and skipped; any other point is (re)started with the same
command, and `unet_ds.main` resumes from the workdir's latest checkpoint.

Executors:
  * `local` (default): the points run one after another in subprocesses here, their output shown
    and appended to `ROOT/<name>/launch.log`. A failed point is reported and the next one runs
    (`--fail_fast` stops instead); the exit status is 1 if any point failed. A point that exits 0
    without `summary.json` (stopped on purpose by `train.stop_at_step`) is not a failure:
    launching again continues it.
  * `slurm`: the unfinished points go to SLURM as one job array through submitit, with
    `--partition`, `--time_min`, `--gpus`, `--cpus`, `--array_parallelism`, `--slurm=KEY=VALUE`;
    a preempted or timed-out point is requeued and resumes from its checkpoint
    (`experiments.cluster`). Job ids go to `ROOT/jobs.json`; launching again skips points whose
    job is still queued or running. `--wait` waits for the jobs and reports how each ended.
  * `submitit_local`: the same submitit jobs as local processes (all points at once).
`--until` makes an adaptive ablation: after each round, variants whose paired interval against
the baseline is still wide get another seed (`experiments.until`; implies `--wait`).
`--print` prints the shell-quoted commands and touches nothing. Extra `--config.key=value` flags go
to every point; they may not set a key that the sweep sets. `ROOT/sweep.json` records the config,
the extra flags and each point's name and command.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import os
import pathlib
import shlex
import signal
import sys
import tempfile
import threading
from typing import Any, Callable, Iterator, Sequence

from ml_collections import config_dict

from experiments import cluster
from experiments import process
from experiments import runs as runs_lib
from experiments import sweep
from experiments import until
from unet_ds import budget
from unet_ds import cli
from unet_ds import config_lib
from unet_ds import workdir as workdir_lib

# Runs one command (argv, program first) for the given workdir; returns its exit status.
Runner = Callable[[Sequence[str], pathlib.Path], int]

MAIN_MODULE = 'unet_ds.main'
SUMMARY_FILE = 'summary.json'
CONFIG_FILE = 'config.json'
LOG_FILE = process.LOG_FILE
MANIFEST_FILE = 'sweep.json'
# A trainer's exit status after SIGINT / SIGTERM (it checkpoints first): 128 + the signal.
SIGNAL_EXITS = (128 + signal.SIGINT, 128 + signal.SIGTERM)
# Seconds a stopped point has to save its checkpoint and exit before it is killed.
STOP_GRACE_S = 60.0


@dataclasses.dataclass(frozen=True)
class Job:
  """One sweep point: where it trains and the `unet_ds.main` arguments that train it."""
  name: str
  workdir: pathlib.Path
  overrides: dict[str, Any]
  args: tuple[str, ...]  # After `python`: ('-m', 'unet_ds.main', '--config=...', ...).
  config: dict[str, Any] | None = None  # the point's whole config, as its config.json would be

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
  parsed = {}
  for key, text in extra:
    if key.split('.')[0] == 'multirun':
      raise ValueError(f'--config.{key}: a sweep point is one run; group runs with multirun in '
                       'one unet_ds.main command (README), not in a sweep')
    try:
      parsed[key] = _parse_value(sweep.get_value(config, key), text)
    except KeyError as e:
      raise ValueError(f'--config.{key}: {e.args[0]}') from None
    if key in swept:
      raise ValueError(f'--config.{key} sets a key that the sweep of {config_arg} sets; '
                       'change the sweep instead')
  root = pathlib.Path(root)
  experiment = all(group in config for group in ('data', 'model', 'train'))  # not a toy config
  jobs = []
  for name, point in zip(sweep.point_names(points), points):
    workdir = root / name
    args = ['-m', MAIN_MODULE, f'--config={config_arg}', f'--workdir={workdir}']
    args += [f'--config.{k}={cli_value(v)}' for k, v in point.items()]
    args += [f'--config.{k}={v}' for k, v in extra]
    try:  # a unet_ds config checked as unet_ds.main checks it, before any point runs
      resolved = sweep.apply_overrides(config, {**point, **parsed})
      if experiment:
        config_lib.validate(resolved)
    except (TypeError, ValueError) as e:
      raise ValueError(f'sweep point {name!r}: {e}') from None
    jobs.append(Job(name=name, workdir=workdir, overrides=dict(point), args=tuple(args),
                    config=json.loads(config_lib.to_json(resolved)) if experiment else None))
  check_workdirs(jobs)
  return jobs


def _parse_value(current: Any, text: str) -> Any:
  """`--config.KEY=text` as ml_collections' flags read it for a field holding `current`: text
  for a string field, else a Python literal (`0.5`, `(1, 2)`, `True`)."""
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return {'true': True, 'false': False}.get(text.lower(), text)


def check_workdirs(jobs: Sequence[Job]) -> None:
  """Raises if an existing workdir's config.json disagrees with its point's overrides, or with
  the rest of its config (another config argument or extra override since it was made: a
  finished run would otherwise be skipped as if it were this sweep's)."""
  for job in jobs:
    path = job.workdir / CONFIG_FILE
    if not path.is_file():
      continue
    try:
      saved = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
      raise ValueError(f'{path}: cannot read the recorded config: {e}') from None
    recorded = sweep.flatten(saved)
    if job.config is not None:
      changed = workdir_lib.resume_conflicts(config_lib.fill_defaults(saved), job.config)
      if float(job.config.get('train', {}).get('minutes') or 0) > 0:  # the budget sets these
        changed = [k for k in changed if k not in budget.PLANNED_KEYS]
      if changed:
        raise ValueError(
            f'{path} differs from this launch\'s sweep point {job.name!r} in '
            f'{", ".join(changed[:6])}{" ..." if len(changed) > 6 else ""}: the sweep\'s config '
            'or overrides changed since this workdir was made; move it away or use another '
            '--root')
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
  child = process.LoggedProcess(argv, workdir)
  try:
    return child.wait()
  except BaseException:  # Ctrl-C, or SIGTERM: stop the child too (it saves a checkpoint).
    child.stop(grace_s=STOP_GRACE_S)
    raise


def run(jobs: Sequence[Job], runner: Runner = subprocess_runner, python: str = sys.executable,
        fail_fast: bool = False, log: Callable[[str], None] = print) -> dict[str, str]:
  """Runs unfinished jobs one after another.

  Returns {name: status}, status one of 'skipped' (already finished), 'done', 'stopped' (exit 0
  before the last step), 'busy' (its workdir in use by another process), 'failed', 'not run'
  (after a failure with fail_fast). The jobs come
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
    if code in SIGNAL_EXITS:  # the trainer was stopped by a signal (it saved a checkpoint):
      # the user is stopping the sweep, also when this launcher did not get the signal itself
      status[job.name] = 'stopped'
      log(f'{tag}: interrupted (exit status {code}); its checkpoint is kept')
      raise KeyboardInterrupt
    if code == cli.BUSY:  # another launcher or trainer holds it: not this launch's failure
      status[job.name] = 'busy'
      log(f'{tag}: in use by another process (its lock), skipped; launch again once it is done')
      continue
    status[job.name] = 'failed'
    log(f'{tag}: FAILED (exit status {code}); log: {job.workdir / LOG_FILE}')
    if fail_fast:
      break
  return status


def submit(jobs: Sequence[Job], kind: str, resources: cluster.Resources, root: pathlib.Path,
           python: str = sys.executable, wait: bool = False, round_: int = 0,
           log: Callable[[str], None] = print) -> dict[str, str]:
  """Submits the unfinished jobs through submitit (`cluster`): one SLURM job array, or local
  processes. Points whose job from an earlier launch is still queued or running are not
  submitted again ('queued'). Returns {name: status}: 'skipped', 'queued', 'submitted', or with
  `wait` the finished job's 'done' / 'stopped' / 'failed'."""
  status = {}
  active = cluster.active_jobs(root)
  todo = []
  for job in jobs:
    if job.finished:
      status[job.name] = 'skipped'
    elif job.name in active:
      status[job.name] = 'queued'
      log(f'{job.name}: already queued or running as job {active[job.name]}, not submitted again')
    else:
      todo.append(job)
  if not todo:
    return status
  # One folder per job (submitit fills in %j; it also leaves a literal, empty `%j` folder).
  folder = pathlib.Path(root).resolve() / cluster.SUBMITIT_DIR / '%j'
  executor = cluster.make_executor(kind, folder, resources)
  cwd = os.getcwd()
  grace = min(STOP_GRACE_S, resources.signal_delay_s * 2 / 3)
  submitted = cluster.submit(executor, [
      cluster.PointJob(j.name, j.workdir.resolve(), j.argv(python), cwd=cwd, stop_grace_s=grace)
      for j in todo])
  cluster.record_jobs(root, kind, folder, {j.name: s.job_id for j, s in zip(todo, submitted)},
                      round_)
  if kind == 'submitit_local':
    log(f'submitit_local: {len(todo)} points start at once, as local processes')
  for job, sub in zip(todo, submitted):
    status[job.name] = 'submitted'
    log(f'{job.name}: submitted as job {sub.job_id} (log: {sub.paths.stdout})')
  if wait:
    for job, sub in zip(todo, submitted):
      status[job.name], detail = cluster.outcome(sub)
      log(f'{job.name}: job {sub.job_id} {status[job.name]}' + (f': {detail}' if detail else ''))
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


# Runs (or submits) one round's jobs, given the round's number; returns {name: status}.
RoundRunner = Callable[[Sequence[Job], int], dict[str, str]]


def run_rounds(config_arg: str, config: config_dict.ConfigDict, points: Sequence[sweep.Point],
               root: pathlib.Path, extra: Sequence[tuple[str, str]], run_round: RoundRunner,
               rule: until.Rule | None = None, log: Callable[[str], None] = print
               ) -> tuple[list[Job], dict[str, str]]:
  """The sweep's points (`sweep.load`), then with `rule` (`--until`) further rounds of added
  seeds until no comparison with the baseline is open (`experiments.until`). Returns every job
  and status; `ROOT/sweep.json` lists every point, `ROOT/until.json` the comparisons after each
  round."""
  if rule is not None:
    until.check_sweep(points)
  points = list(points)
  root = pathlib.Path(root)
  status: dict[str, str] = {}
  rounds: list[dict[str, Any]] = []
  while True:
    jobs = plan_points(config_arg, config, points, root, extra)
    write_manifest(root, config_arg, extra, jobs)
    status.update(run_round([j for j in jobs if j.name not in status], len(rounds)))
    if rule is None:
      return jobs, status
    unfinished = [j.name for j in jobs if not j.finished]
    if unfinished:
      log(f'--until: stopped after round {len(rounds)}: {len(unfinished)} point(s) without '
          f'{SUMMARY_FILE} ({", ".join(unfinished[:3])}{", ..." if len(unfinished) > 3 else ""}); '
          'launch again once they have finished')
      return jobs, status
    comparisons = until.compare(points, [final_dice(j.workdir) for j in jobs], rule)
    added = until.next_points(points, comparisons)
    names = sweep.point_names([*points, *added])[len(points):]
    rounds.append({'round': len(rounds), 'points': len(points),
                   'comparisons': [c.as_json() for c in comparisons], 'added': names})
    until.write(root, rule, rounds)
    for c in comparisons:
      log(f'--until round {len(rounds) - 1}: {c.line()}')
    if not added:
      settled = sum(c.status == 'settled' for c in comparisons)
      same = sum(c.status == 'identical' for c in comparisons)
      log(f'--until: done after {len(rounds)} round(s): {settled} of {len(comparisons)} '
          f'comparisons settled (half-width <= {rule.ci_halfwidth})'
          + (f', {same} identical to their baseline' if same else '')
          + f'; {root / until.UNTIL_FILE}')
      return jobs, status
    log(f'--until: adding {len(added)} point(s): {" ".join(names)}')
    points = [*points, *added]


def final_dice(workdir: pathlib.Path) -> float:
  """A finished run's final mean foreground Dice (`summary.json`; nan if logged as null)."""
  summary = runs_lib.read_json(pathlib.Path(workdir) / SUMMARY_FILE)
  if not isinstance(summary, dict) or 'mean_foreground_dice' not in summary:
    raise runs_lib.RunFileError(f'{workdir / SUMMARY_FILE}: no "mean_foreground_dice"')
  return runs_lib.number(summary['mean_foreground_dice'])


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner,
         out: Callable[[str], None] = print) -> int:
  parser = argparse.ArgumentParser(prog='python -m experiments.launch', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='configs/FILE.py[:ARG] with a get_sweep')
  parser.add_argument('--root', required=True, help='directory that gets one workdir per point')
  parser.add_argument('--print', dest='print_only', action='store_true',
                      help='print one command per point and run nothing')
  parser.add_argument('--fail_fast', '--fail-fast', action='store_true',
                      help='local: stop at the first failed point')
  parser.add_argument('--python', default=None,
                      help='interpreter in the commands (default: this one, so that a printed '
                      'command finds the same installed packages)')
  parser.add_argument('--executor', choices=('local', *cluster.EXECUTORS), default='local',
                      help='local: one point after another here; slurm: one SLURM job array '
                      'through submitit; submitit_local: submitit jobs as local processes')
  parser.add_argument('--wait', action='store_true',
                      help='submitit executors: wait for the jobs and report how they ended')
  parser.add_argument('--until', default=None, metavar='ci_halfwidth:H[,max_seeds:N]',
                      help='add seeds to variants whose paired 95%% interval against the '
                      'baseline is wider than +-H, up to N seeds (see experiments.until)')
  res = parser.add_argument_group('submitit executors: what each job asks for')
  res.add_argument('--partition', default=None, help='SLURM partition')
  res.add_argument('--time_min', type=int, default=cluster.Resources.time_min,
                   help='time limit per job in minutes; a point that hits it is requeued and '
                   'resumes from its checkpoint')
  res.add_argument('--gpus', type=int, default=0, help='GPUs per job')
  res.add_argument('--cpus', type=int, default=None, help='CPUs per job')
  res.add_argument('--array_parallelism', type=int, default=None,
                   help='SLURM: points running at once')
  res.add_argument('--max_timeouts', type=int, default=cluster.Resources.max_timeouts,
                   help='requeues after the time limit, per point (preemptions do not count)')
  res.add_argument('--slurm', action='append', default=[], metavar='KEY=VALUE',
                   help='other sbatch settings by submitit name, e.g. account=ab12 or qos=high')
  args, rest = parser.parse_known_args(argv)
  root = pathlib.Path(args.root)
  try:
    extra = parse_extra_overrides(rest)
    if args.print_only:
      for job in plan(args.config, root, extra):
        out(job.command(args.python or sys.executable))
      return 0
    if args.array_parallelism is not None and args.executor != 'slurm':
      raise ValueError(f'--array_parallelism is a SLURM setting; --executor={args.executor} '
                       + ('starts every point at once as a local process (--executor=local runs '
                          'them one after another)' if args.executor == 'submitit_local' else
                          'runs the points one after another'))
    rule = until.parse_rule(args.until) if args.until else None
    resources = cluster.Resources(
        time_min=args.time_min, partition=args.partition, gpus=args.gpus, cpus=args.cpus,
        array_parallelism=(cluster.Resources.array_parallelism if args.array_parallelism is None
                           else args.array_parallelism),
        max_timeouts=args.max_timeouts,
        slurm=_key_values(args.slurm, '--slurm'))
    config, points = sweep.load(args.config)
    plan_points(args.config, config, points, root, extra)  # errors before anything runs
    if rule is not None:
      until.check_sweep(points)
    if args.executor != 'local':
      with tempfile.TemporaryDirectory() as tmp:  # checks the settings, creates no folder
        cluster.make_executor(args.executor, pathlib.Path(tmp), resources)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    parser.exit(2, f'error: {e}\n')
  python = args.python or sys.executable
  if args.executor == 'local':
    def run_round(jobs: Sequence[Job], round_: int) -> dict[str, str]:
      del round_
      return run(jobs, runner=runner, python=python, fail_fast=args.fail_fast, log=out)
  else:
    def run_round(jobs: Sequence[Job], round_: int) -> dict[str, str]:
      return submit(jobs, args.executor, resources, root, python=python,
                    wait=args.wait or rule is not None, round_=round_, log=out)
  try:
    with _exit_on_sigterm():
      jobs, status = run_rounds(args.config, config, points, root, extra, run_round, rule,
                                log=out)
  except KeyboardInterrupt:  # the runner has stopped the running point (it checkpoints first)
    out(f'sweep {args.config}: interrupted; finished points are kept and the same command '
        'resumes the rest')
    return 130
  counts = {s: sum(v == s for v in status.values())
            for s in ('done', 'skipped', 'stopped', 'busy', 'failed', 'submitted', 'queued')}
  line = (f'sweep {args.config}: {counts["done"]} ran, {counts["skipped"]} already finished, '
          f'{counts["stopped"]} stopped early, {counts["failed"]} failed')
  if counts['busy']:
    line += f', {counts["busy"]} in use by another process'
  if args.executor != 'local':
    line += f', {counts["submitted"]} submitted and running, {counts["queued"]} already queued'
  out(f'{line}, of {len(jobs)} points in {args.root}')
  failed = [n for n, s in status.items() if s == 'failed']
  if failed:
    out('failed: ' + ' '.join(failed))
  return 1 if failed else 0


def _key_values(items: Sequence[str], flag: str) -> dict[str, str]:
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ValueError(f'{flag}={item}: expected KEY=VALUE')
    out[key] = value
  return out


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


def _same_value(recorded: Any, wanted: Any) -> bool:
  # config.json holds tuples as lists and int-valued floats as ints or floats.
  if isinstance(recorded, (list, tuple)) and isinstance(wanted, (list, tuple)):
    return len(recorded) == len(wanted) and all(map(_same_value, recorded, wanted))
  if isinstance(recorded, bool) or isinstance(wanted, bool):
    return recorded is wanted
  return recorded == wanted


if __name__ == '__main__':
  sys.exit(main())
