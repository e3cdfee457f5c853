"""Would an ensemble help? Scores the mean of several runs' class probabilities on the held-out
cases they share, adding one run at a time, and prints one JSON line.

  python benchmarks/ensemble_eval.py runs/aniso15 runs/aniso15_s1 runs/aniso15_s2

Every run is restored from its latest checkpoint and predicts as `--mode=eval` does (its own
normalisation, sliding window and TTA, probabilities brought back to each input's grid); the runs
must have been trained on the same data with the same held-out split (`split.json`). Row k of
the output is the ensemble of the first k runs, so row 1 is the first run alone.
"""

from __future__ import annotations

from collections.abc import Sequence
import json

from absl import app
import numpy as np

from unet_ds import evaluate
from unet_ds import predict


def main(argv: Sequence[str]) -> None:
  workdirs = list(argv[1:])
  if not workdirs:
    raise app.UsageError('give the run folders to ensemble')
  predictors, selected = [], None
  for workdir in workdirs:
    config = predict.run_config(None, workdir)
    *_, cases = evaluate.select_cases(config, workdir, None, None)
    if selected is not None and [c for c, _, _ in cases] != [c for c, _, _ in selected]:
      raise ValueError(f'{workdir}: its held-out cases differ from {workdirs[0]}\'s')
    selected = cases
    apply_fn, _ = predict.restore_apply_fn(config, workdir)
    predictors.append(predict.Predictor(lambda x, f=apply_fn: f(x)[0], config.data,
                                        predict.settings_from_config(config)))
  cases = list(evaluate.file_cases(predictors[0], selected))
  probs = [[p.probs(case.example) for case in cases] for p in predictors]  # [run][case]
  index = {id(case.example): i for i, case in enumerate(cases)}
  num_classes = max(predictors[0].data_settings['num_classes'], 2)
  rows = []
  for k in range(1, len(workdirs) + 1):
    summary = evaluate.score_cases(
        lambda example: np.mean([run[index[id(example)]] for run in probs[:k]], axis=0),  # noqa: B023
        cases, num_classes, log=lambda _: None)
    rows.append({'runs': workdirs[:k], 'mean_foreground_dice': summary['mean_foreground_dice'],
                 'dice': summary['per_class']['dice']})
  print(json.dumps({'num_cases': len(cases), 'ensembles': rows}))


if __name__ == '__main__':
  app.run(main)
