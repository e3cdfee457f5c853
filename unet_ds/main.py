"""Command line: `python -m unet_ds.main --config=configs/FILE.py[:ARGS] --workdir=DIR [--mode=...]`.

Modes: `train` (resumes from the workdir's latest checkpoint); `eval` alone scores the latest
checkpoint on the validation split as during training; `predict`, and `eval` with `--output`
(and optionally `--input`), run whole images or volumes with sliding windows and write files
(see `unet_ds.predict`). predict/eval use the run's own saved `config.json`. Any config field can be overridden:
`--config.loss.ds_weights=exp --config.model.ds.mode=hypercolumn`.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py',
                                          'Experiment config file (path[:args]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs).')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'What to do.')
_INPUT = flags.DEFINE_string('input', None, 'predict/eval: image/volume file or folder.')
_OUTPUT = flags.DEFINE_string('output', None, 'predict/eval: output folder.')
_PROBS = flags.DEFINE_bool('probabilities', False, 'predict: also write class probabilities.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  from unet_ds import multirun, train  # pylint: disable=g-import-not-at-top  (fast --help)
  config = _CONFIG.value
  if _MODE.value == 'train':
    trainer = multirun if config.get('multirun', {}).get('k', 0) > 1 else train  # K runs, 1 program
    summary = trainer.train_and_evaluate(config, _WORKDIR.value)
    _print_summary(summary)
    return
  from unet_ds import predict  # pylint: disable=g-import-not-at-top
  if _MODE.value == 'eval' and not (_INPUT.value or _OUTPUT.value):
    # In-training-style scores of the latest checkpoint, with the run's own saved config.
    summary = train.evaluate_checkpoint(predict.run_config(config, _WORKDIR.value), _WORKDIR.value)
    _print_summary(summary)
    return
  result = predict.run(config, _WORKDIR.value, mode=_MODE.value, input_path=_INPUT.value,
                       output=_OUTPUT.value, probabilities=_PROBS.value)
  if _MODE.value == 'eval':
    print(json.dumps({'step': result.get('step'),
                      'mean_foreground_dice': result.get('mean_foreground_dice'),
                      'output': _OUTPUT.value}))


def _print_summary(summary: dict) -> None:
  if 'final' not in summary:  # stopped early (train.stop_at_step): nothing scored yet
    print(json.dumps(summary))
    return
  final = summary['final']
  print(json.dumps({'step': summary['step'],
                    'mean_foreground_dice': summary['mean_foreground_dice'],
                    'dice_per_class': final['dice'],
                    'heads_mean_foreground_dice': [h['mean_foreground_dice']
                                                   for h in summary['heads']]}))


if __name__ == '__main__':
  app.run(main)
