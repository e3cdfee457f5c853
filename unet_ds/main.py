"""Command line: `python -m unet_ds.main --config=configs/FILE.py[:ARGS] --workdir=DIR [--mode=...]`.

Modes:
* `train`: trains (resuming from the workdir's latest checkpoint), then scores the held-out cases
  whole, as `eval` does; prints one JSON line.
* `eval`: the latest checkpoint on whole held-out cases (sliding window, per-case means as
  nnU-Net): the run's validation cases, or every labelled case of `--input`. Writes
  `metrics.json` / `metrics.csv` into `--output` (default `WORKDIR/eval` for the run's own
  held-out cases, else `WORKDIR/eval_<folder>_<cases>`), with each case's prediction when
  `--output` is given; prints one JSON line.
* `predict`: label maps of `--input` (a file or folder) into `--output`.
eval/predict use the run's own saved `config.json` (only `--config.inference.*` is taken from the
command line; another `--config.*` flag is an error, not silently ignored). Any config field can
be overridden: `--config.model.ds.mode=hypercolumn`.

Errors end with one line `error: <cause>` naming the file or key at fault (exit status 1; the
traceback is printed above it with `--traceback`); SIGTERM / SIGINT while training checkpoint the
current step and exit with status 128 + signal after one line saying so.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from unet_ds import cli

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# Without --config, ml_collections loads the default and applies the --config.* overrides from
# sys.argv right here, at import: a mistake in them is kept for `_parse_flags` to name.
_CONFIG_ERROR: Exception | None = None
try:
  _CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py',
                                            'Experiment config file (path[:args]).',
                                            lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as _e:
  _CONFIG, _CONFIG_ERROR = None, _e
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs).')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'What to do.')
_INPUT = flags.DEFINE_string('input', None, 'predict: image file or folder; eval: a labelled '
                             'folder (default: the run\'s own held-out cases).')
_OUTPUT = flags.DEFINE_string('output', None, 'predict/eval: output folder.')
_CASES = flags.DEFINE_string('cases', None, "eval: 'all', 'validation', 'train' or 'id,id'.")
_OVERLAYS = flags.DEFINE_integer('overlays', 0, 'eval: overlay PNGs (label, prediction, each DS '
                                 "head's) of the first N cases, in OUTPUT/overlays/.")
_PROBS = flags.DEFINE_bool('probabilities', False, 'predict: also write class probabilities.')
_ALLOW = flags.DEFINE_list('allow_config_change', [], 'train: config keys that may differ from '
                           'the checkpoint being resumed (e.g. train.steps,optim.lr).')
_TRACEBACK = flags.DEFINE_bool('traceback', False, 'Print the traceback above an error line.')

def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  try:
    if not _WORKDIR.value:
      raise ValueError('--workdir is required: the run folder to train into (created), or the '
                       'trained run to eval / predict from')
    workdir = os.path.expanduser(_WORKDIR.value)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise NotADirectoryError(f'--workdir={_WORKDIR.value}: exists and is not a folder')
    result = _run(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints first)
    print('interrupted: SIGINT; every file written so far is complete (written whole, then '
          'renamed); run the same command again', file=sys.stderr, flush=True)
    os._exit(130)  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except
    _exit_with(e)
  print(json.dumps(result))


def cli_config(mode: str, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config `mode` runs with: `--config` for training; for eval / predict (which read the
  run's own config.json), `--config` with `inference` holding only the `--config.inference.*`
  flags given, so the run's saved settings (e.g. its TTA) stay unless a flag changes them."""
  if mode == 'train':
    return config
  given = config_flags.get_override_values(flags.FLAGS['config'])
  # Where data caches live and the device layout do not change a prediction (eval and predict
  # read the files themselves, on one device), so scripts may pass them to every mode.
  ignored = sorted(k for k in given
                   if not k.startswith(('inference.', 'mesh.')) and k != 'data.data_dir')
  if ignored:  # it would be silently ignored: the run's own config.json decides
    raise ValueError(f'--config.{ignored[0]}: --mode={mode} uses the run\'s saved config.json; '
                     'only --config.inference.* flags apply')
  # Without --config the default configs/default.py is no choice of the user's: keep it out,
  # so no "--config.model differs" warning names it.
  chosen = flags.FLAGS['config'].present
  out = ml_collections.ConfigDict(config.to_dict() if chosen else {})
  out.inference = ml_collections.ConfigDict(
      {k.split('.', 1)[1]: v for k, v in given.items() if k.startswith('inference.')})
  return out


def _run(mode: str, config, workdir: str) -> dict:
  """The mode's work; returns the JSON line to print."""
  # pylint: disable=g-import-not-at-top  (fast --help)
  from unet_ds.models.ops import xla_flags
  xla_flags.configure_xla_flags()  # before the first jax computation
  config = cli_config(mode, config)
  if mode == 'train':
    from unet_ds import multirun, train
    trainer = multirun if config.get('multirun', {}).get('k', 0) > 1 else train  # K runs, 1 program
    summary = trainer.train_and_evaluate(config, workdir, allow_changes=_ALLOW.value)
    return _train_line(summary)
  if mode == 'eval':
    from unet_ds import evaluate
    s = evaluate.run(config, workdir, input_path=_INPUT.value, output=_OUTPUT.value,
                     cases=_CASES.value, num_overlays=_OVERLAYS.value)
    return {'step': s['step'], 'mean_foreground_dice': s['mean_foreground_dice'],
            'dice_per_class': s['per_class']['dice'],
            'mean_foreground_hd95': s['mean_foreground_hd95'],
            'mean_foreground_nsd': s['mean_foreground_nsd'], 'num_cases': s['num_cases'],
            'output': s['output'], **({'overlays': len(s['overlays'])} if 'overlays' in s else {})}
  from unet_ds import predict
  out = predict.run(config, workdir, input_path=_INPUT.value, output=_OUTPUT.value,
                    probabilities=_PROBS.value)
  return {'step': out['step'], 'written': len(out['written']),
          'output': os.path.abspath(_OUTPUT.value)}


def _train_line(summary: dict) -> dict:
  if 'runs' in summary:  # multi-run: one entry per run
    return {'step': summary['step'], 'runs': {name: _train_line(s)
                                              for name, s in summary['runs'].items()}}
  if 'mean_foreground_dice' not in summary:  # stopped early (train.stop_at_step)
    return summary
  return {'step': summary['step'], 'mean_foreground_dice': summary['mean_foreground_dice'],
          'dice_per_class': summary['dice_per_class'],
          'pooled_foreground_dice': summary.get('pooled_foreground_dice'),
          'heads_pooled_dice': [h['mean_foreground_dice'] for h in summary.get('heads', [])]}


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, where a missing config file, a bad config argument, an unknown
  `--config.*` key or a bad flag value ends in one error line naming it."""
  try:
    if _CONFIG_ERROR is not None:
      raise _CONFIG_ERROR
    for i, arg in enumerate(argv[1:], 1):
      value = (arg.split('=', 1)[1] if arg.startswith('--config=') else
               argv[i + 1] if arg == '--config' and i + 1 < len(argv) else None)
      if value is not None and not os.path.isfile(value.split(':', 1)[0]):
        raise FileNotFoundError(f'--config={value}: {value.split(":", 1)[0]} not found (paths '
                                'are relative to the current folder, e.g. configs/default.py)')
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    error = _flag_error(e, argv)
    error.__cause__ = error.__cause__ or (e if error is not e else None)  # for --traceback
    _exit_with(error, show_traceback='--traceback' in argv)
    raise  # not reached


def _flag_error(error: Exception, argv: list[str]) -> Exception:
  """`error` of flag parsing as one line naming the flag at fault."""
  if isinstance(error, (AttributeError, KeyError)):  # an unknown --config.* key
    cause = error
    while cause.args and isinstance(cause.args[0], BaseException):  # ml_collections nests them
      cause = cause.args[0]
    text = str(cause.args[0]) if cause.args else ''
    key = (re.findall(r"'(\w+)'", text) or [''])[0]
    bad = [a.split('=', 1)[0] for a in argv if a.startswith('--config.') and
           key in a.split('=', 1)[0].split('.')]
    hint = ''.join(f' ({line[0].lower()}{line[1:]})' for line in text.splitlines()
                   if line.startswith('Did you mean'))
    return ValueError(f'{bad[0] if bad else "--config." + key}: no such config key{hint}')
  text = str(error).strip()
  if 'Traceback (most recent call last)' in text:  # a config file's get_config raised
    flag = re.match(r'flag (--\S+?): ', text)
    cause = re.sub(r'^[\w.]+: ', '', text.splitlines()[-1].strip())
    return ValueError(f'{flag.group(1) if flag else "--config"}: {cause}')
  return error


def _exit_with(error: BaseException, show_traceback: bool | None = None) -> None:
  """One last line naming the cause; the process ends without shutdown noise after it."""
  loop = sys.modules.get('unet_ds.loop')  # only training raises Interrupted
  if loop is not None and isinstance(error, loop.Interrupted):
    print(f'interrupted: {error}', file=sys.stderr, flush=True)
    os._exit(128 + error.signum)  # pylint: disable=protected-access
  cli.exit_with_error(error, _TRACEBACK.value if show_traceback is None else show_traceback)


def run_cli() -> None:
  """The `unet-ds` console script (same flags as `python -m unet_ds.main`)."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run_cli()
