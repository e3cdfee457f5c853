"""What does the coarse grid itself cost? Scores a run trained on the fine data, its predictions
coarsened as `make_anisotropic.py` coarsened the labels, against the anisotropic copy's labels;
prints one JSON line.

  python -m benchmarks.coarsened_bound --workdir=runs/iso15 --copy=/data/hip_1x1x3  # repo root

The run predicts its held-out cases as `--mode=eval` does (its plan, sliding window and TTA, on
each input's grid); each case's class probabilities are then averaged over the slab a thick
voxel covers and sampled at the slab centres (`make_anisotropic.slab_argmax`, the labels' own
rule) and scored like `--mode=eval` on the copy's grid. This is the score of a model that saw
the fine slices, on the copy's labels: `isotropic - bound` is what the coarse grid costs in Dice,
`bound - copy` what training on the slab-averaged images costs.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
from typing import Any

from absl import app
from absl import flags
import numpy as np

from benchmarks import make_anisotropic
from unet_ds import evaluate
from unet_ds import predict
from unet_ds.data import io
from unet_ds.data import msd
from unet_ds.data import resample

_WORKDIR = flags.DEFINE_string('workdir', None, 'a run trained on the fine data.')
_COPY = flags.DEFINE_string('copy', None, 'the anisotropic copy (make_anisotropic.py --output).')


def bound(workdir: str, copy: str) -> dict[str, Any]:
  """`--mode=eval`'s summary of the run's coarsened predictions on the copy's held-out labels."""
  config = predict.run_config(None, workdir)
  *_, selected = evaluate.select_cases(config, workdir, None, None)
  apply_fn, _ = predict.restore_apply_fn(config, workdir)
  predictor = predict.Predictor(lambda x: apply_fn(x)[0], config.data,
                                predict.settings_from_config(config))
  num_classes = max(int(config.data.num_classes), 2)
  coarse = {}
  for case in evaluate.file_cases(predictor, selected):
    probs = predictor.probs(case.example)  # on the fine input's grid
    path = os.path.join(copy, 'labelsTr', os.path.basename(case.image_path))
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path}: no label of held-out case {case.case_id} in the copy')
    volume = io.read_nifti(path)
    label = io.label_to_classes(volume.array, path, num_classes)
    spacing = msd.spacing_of(volume)
    size = make_anisotropic.slab_size(evaluate.case_spacing(case.example), spacing)
    pred = make_anisotropic.slab_argmax(probs, label.shape, size)
    onehot = np.eye(num_classes, dtype=np.float32)[pred]
    coarse[case.case_id] = evaluate.Case(
        case.case_id, {'label': label, 'onehot': onehot,
                       'geometry': resample.identity_geometry(label.shape, spacing)},
        path)
  summary = evaluate.score_cases(lambda example: example['onehot'], coarse.values(), num_classes,
                                 log=lambda _: None)
  return {'workdir': workdir, 'copy': copy, 'num_cases': len(coarse),
          'mean_foreground_dice': summary['mean_foreground_dice'],
          'dice': summary['per_class']['dice'],
          'mean_foreground_hd95': summary['mean_foreground_hd95'],
          'mean_foreground_nsd': summary['mean_foreground_nsd']}


def main(argv: Sequence[str]) -> None:
  del argv
  if not (_WORKDIR.value and _COPY.value):
    raise app.UsageError('--workdir and --copy are required')
  print(json.dumps(bound(_WORKDIR.value, _COPY.value)))


if __name__ == '__main__':
  app.run(main)
