"""Would an ensemble help? Scores the mean of several runs' class probabilities on the held-out
cases they share, adding one run at a time, and prints one JSON line.

  python benchmarks/ensemble_eval.py runs/aniso15 runs/aniso15_s1 runs/aniso15_s2

Every run is restored from its latest checkpoint and predicts as `--mode=eval` does: it reads
each case itself (its own plan's resampling and normalisation), slides its own window with its
TTA and brings the probabilities back to the input's grid, where the runs are averaged and
scored against the label file. The runs must share their classes and held-out split
(`split.json`); their plans may differ. Row k is the ensemble of the first k runs, so row 1 is
the first run alone.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from typing import Any

from absl import app
import numpy as np

from unet_ds import evaluate
from unet_ds import predict


def ensembles(workdirs: Sequence[str]) -> dict[str, Any]:
  """{'num_cases', 'ensembles': [{'runs', 'mean_foreground_dice', 'dice'}] for the first k runs}."""
  if not workdirs:
    raise ValueError('give the run folders to ensemble')
  selected, num_classes, probs, labelled = None, None, [], []  # probs[run][case]
  for workdir in workdirs:
    config = predict.run_config(None, workdir)
    *_, cases = evaluate.select_cases(config, workdir, None, None)
    if selected is not None and [c for c, _, _ in cases] != [c for c, _, _ in selected]:
      raise ValueError(f'{workdir}: its held-out cases differ from {workdirs[0]}\'s')
    classes = max(int(config.data.num_classes), 2)
    if num_classes is not None and classes != num_classes:
      raise ValueError(f'{workdir}: {classes} classes, {workdirs[0]} has {num_classes}')
    selected, num_classes = cases, classes
    apply_fn, _ = predict.restore_apply_fn(config, workdir)
    predictor = predict.Predictor(lambda x, f=apply_fn: f(x)[0], config.data,
                                  predict.settings_from_config(config))
    read = list(evaluate.file_cases(predictor, selected))  # this run's own plan
    probs.append([predictor.probs(case.example) for case in read])  # on each input's grid
    labelled = labelled or read  # the labels, on the input grid whatever the plan
  index = {id(case.example): i for i, case in enumerate(labelled)}
  rows = []
  for k in range(1, len(workdirs) + 1):
    summary = evaluate.score_cases(
        lambda example, k=k: np.mean([run[index[id(example)]] for run in probs[:k]], axis=0),
        labelled, num_classes, log=lambda _: None)
    rows.append({'runs': list(workdirs[:k]),
                 'mean_foreground_dice': summary['mean_foreground_dice'],
                 'dice': summary['per_class']['dice']})
  return {'num_cases': len(labelled), 'ensembles': rows}


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError('give the run folders to ensemble')
  print(json.dumps(ensembles(argv[1:])))


if __name__ == '__main__':
  app.run(main)
