"""Whole-image evaluation of held-out cases: what `--mode=eval` and the end of training report.

Every held-out case is predicted whole by sliding window (`inference.Windows`), brought back to
its own grid when training resampled it, and scored there: Dice and IoU, and the boundary metrics
HD95 and normalised surface Dice in mm (`surface_metrics`, tolerance `eval.nsd_tolerance_mm`).
`mean_foreground_dice` follows nnU-Net's summary: per class, the mean Dice over cases (a case
where the class is absent from both label and prediction is skipped), then the mean over the
foreground classes. `pooled` scores the confusion counts summed over all cases.

The cases: a real-data run's validation cases (its `split.json`) or any labelled folder given with
`--input`; a synthetic run's validation volumes. Results go to `metrics.json` (summary and one
record per case) and `metrics.csv` (one row per case), both written atomically.

This is distinct from the in-training score (`eval.jsonl`'s `pooled_foreground_dice`): confusion
counts pooled over fixed-size validation crops, cheap enough to run every `eval_every` steps.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import csv
import dataclasses
import hashlib
import io as std_io
import itertools
import json
import os
from typing import Any

import numpy as np

from unet_ds import dirnames
from unet_ds import inference
from unet_ds import metrics
from unet_ds import overlays
from unet_ds import predict
from unet_ds import surface_metrics
from unet_ds import workdir as workdir_lib
from unet_ds.data import cases as cases_lib
from unet_ds.data import datasets

METRICS_FILE = 'metrics.json'
EVAL_DIR = 'eval'  # default output folder inside the workdir


@dataclasses.dataclass(frozen=True)
class Case:
  """One labelled case: its id, `{'image', 'label'}` arrays, and its file (None if synthetic)."""
  case_id: str
  example: dict[str, Any]
  image_path: str | None = None


def case_spacing(example: dict[str, Any]) -> tuple[float, ...]:
  """The voxel size (mm) of the input's own grid, 1 per axis where the format has none."""
  geometry = example.get('geometry')
  if geometry is not None and geometry.original_spacing is not None:
    return tuple(float(s) for s in geometry.original_spacing)
  return (1.0,) * np.ndim(example['label'])


def score_cases(probs_fn: Callable[[dict[str, Any]], np.ndarray], cases: Iterable[Case],
                num_classes: int, *, ignore_index: int | None = None,
                tolerance_mm: float = 1.0, binary: bool = False,
                regions: metrics.Regions = (),
                on_prediction: Callable[[Case, np.ndarray, np.ndarray], None] | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
  """Predicts (`probs_fn(example)`: probabilities on the label's grid) and scores every case.

  Per case: Dice / IoU from its confusion counts, HD95 and normalised surface Dice at
  `tolerance_mm` in the input's physical units (`surface_metrics`). Returns the summary with one
  record per case (`cases`); `on_prediction(case, labels, probs)` sees each prediction.
  `binary`: a one-sigmoid-channel model, scored against the union of the foreground classes,
  with the TGS salt competition score per image beside; `regions`: unions of labels scored
  beside the classes (`eval.regions`).
  """
  num_classes = 2 if binary else num_classes
  rows, total = [], None
  for case in cases:
    probs = probs_fn(case.example)
    pred = np.argmax(probs, -1).astype(np.int64)
    label = case.example['label']
    if binary:
      label = np.asarray(metrics.foreground_label(label, ignore_index))
    counts = metrics.case_counts(pred, label, num_classes, ignore_index, regions)
    total = counts if total is None else total + counts
    extra = ({'tgs_score': float(metrics.tgs_scores(pred[None], label[None], ignore_index)[0])}
             if binary else {})
    rows.append({'case_id': case.case_id,
                 'file': os.path.basename(case.image_path) if case.image_path else '',
                 **metrics.summarize(counts, regions), **extra,
                 **surface_metrics.case_surface_metrics(
                     pred, label, case_spacing(case.example), num_classes,
                     tolerance_mm=tolerance_mm, ignore_index=ignore_index)})
    if on_prediction is not None:
      on_prediction(case, pred, probs)
    log(f'[{len(rows)}] {case.case_id}: mean foreground Dice '
        f'{_fmt(rows[-1]["mean_foreground_dice"]) or "n/a"}')
  if not rows:
    raise ValueError('evaluate: no cases to evaluate')
  per_class = {k: [_nanmean([r[k][c] for r in rows]) for c in range(num_classes)]
               for k in ('dice', 'iou')}
  surface = surface_metrics.mean_over_cases(rows)
  per_class.update(hd95=surface['hd95'], nsd=surface['nsd'])
  extra = {}
  if regions:  # per region, the mean over cases (as per class)
    extra['region_dice'] = {n: _nanmean([r['region_dice'][n] for r in rows]) for n, _ in regions}
  if binary:
    extra['mean_tgs_score'] = _nanmean([r['tgs_score'] for r in rows])
  return {
      **extra,
      'mean_foreground_dice': _nanmean(per_class['dice'][1:]),
      'mean_foreground_iou': _nanmean(per_class['iou'][1:]),
      'mean_foreground_hd95': surface['mean_foreground_hd95'],
      'mean_foreground_nsd': surface['mean_foreground_nsd'],
      'nsd_tolerance_mm': tolerance_mm,
      'per_class': per_class,
      'pooled': metrics.summarize(total, regions),
      'num_cases': len(rows),
      'cases': rows,
  }


def write_metrics(output_dir: str, summary: dict[str, Any]) -> None:
  """`metrics.json` (everything) and `metrics.csv` (one row per case, then the means)."""
  workdir_lib.write_json(os.path.join(output_dir, METRICS_FILE), summary)
  num_classes = len(summary['per_class']['dice'])
  buf = std_io.StringIO()
  writer = csv.writer(buf)
  columns = ('dice', 'iou', 'hd95', 'nsd')
  writer.writerow(['case_id', 'file', 'mean_foreground_dice',
                   *(f'{m}_{c}' for m in columns for c in range(num_classes))])
  for r in summary['cases']:
    writer.writerow([r['case_id'], r['file'], _fmt(r['mean_foreground_dice']),
                     *(_fmt(v) for m in columns for v in r[m])])
  writer.writerow(['mean', '', _fmt(summary['mean_foreground_dice']),
                   *(_fmt(v) for m in columns for v in summary['per_class'][m])])
  workdir_lib.atomic_write(os.path.join(output_dir, 'metrics.csv'), buf.getvalue())


def _nanmean(values: Sequence[float | None]) -> float | None:
  vals = [v for v in values if v is not None and not np.isnan(v)]
  return float(np.mean(vals)) if vals else None


def _fmt(value: float | None) -> str:
  return '' if value is None or np.isnan(value) else f'{value:.6f}'


# ----------------------------------------------------------------------------- a run's cases

def synthetic_cases(data_cfg: Any) -> Iterator[Case]:
  """The validation volumes of a synthetic run (whole volumes, as generated)."""
  source = datasets.get_sources(data_cfg)['validation']
  for i in range(len(source)):
    ex = source[i]
    yield Case(f'val_{i:04d}', {'image': np.asarray(ex['image'], np.float32),
                                'label': np.asarray(ex['label'], np.int64)})


def file_cases(predictor: predict.Predictor, selected: Sequence[tuple[str, str, str]]
               ) -> Iterator[Case]:
  """(case_id, image, label) files read and normalised as the run's training data."""
  for cid, image_path, label_path in selected:
    yield Case(cid, predictor.read(image_path, label_path), image_path)


def evaluate_cases(predictor: predict.Predictor, selected: Sequence[tuple[str, str, str]],
                   output_dir: str, *, ignore_index: int | None = None,
                   tolerance_mm: float = 1.0, binary: bool = False,
                   regions: metrics.Regions = (), write_predictions: bool = False,
                   facts: dict[str, Any] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Scores labelled files (case_id, image, label) with `predictor`; writes the metrics files
  (and each prediction when `write_predictions`) into `output_dir`. `facts` (e.g. the step)
  lead the summary."""
  output_dir = predict.check_output_dir(output_dir)
  on_prediction = None
  if write_predictions:
    save_probs = predictor.settings.save_probs
    on_prediction = lambda case, pred, probs: predictor.write(  # noqa: E731
        output_dir, case.image_path, pred.astype(np.uint8), probs if save_probs else None)
  summary = score_cases(predictor.probs, file_cases(predictor, selected),
                        max(predictor.data_settings['num_classes'], 2),
                        ignore_index=ignore_index, tolerance_mm=tolerance_mm, binary=binary,
                        regions=regions, on_prediction=on_prediction, log=log)
  summary = {**(facts or {}), **summary}
  write_metrics(output_dir, summary)
  return summary


def _own_path(config: Any) -> str:
  """The run's own data folder (`data.path`), absolute."""
  return os.path.abspath(os.path.expanduser(config.data.path))


def held_out_source(config: Any, workdir: str, input_path: str | None) -> tuple[str, str]:
  """(folder, default cases) of a file run's eval: its own `data.path` or `input_path`, whose
  held-out ('validation') cases are scored when it is the run's data, at its path or moved
  (every case of the run's `split.json` in it), else 'all' its cases."""
  own_path = _own_path(config)
  path = os.path.abspath(os.path.expanduser(input_path or own_path))
  if path == own_path:
    if not os.path.isdir(own_path):
      raise FileNotFoundError(f"{workdir}: the run's data.path={own_path} is gone; pass "
                              '--input=DIR where its cases are now')
    return path, 'validation'
  split = cases_lib.saved_split(workdir)
  if split and os.path.isdir(path):
    found = {c for c, _, _ in cases_lib.find_labelled(path, config.data, 'all')}
    if found.issuperset(split.get('train', []) + split.get('validation', [])):
      return path, 'validation'  # the run's data, moved since training
  return path, 'all'


# (folder, default cases, cases, [(case_id, image, label)]): what a file run's eval scores.
Selection = tuple[str, str, str, list[tuple[str, str, str]]]


def select_cases(config: Any, workdir: str, input_path: str | None, cases: str | None
                 ) -> Selection:
  """(folder, default cases, cases, [(case_id, image, label)]) a file run's eval scores
  (`evaluate_run`)."""
  input_path, default = held_out_source(config, workdir, input_path)
  cases = cases or default
  selected = cases_lib.find_labelled(input_path, config.data, cases,
                                     split=cases_lib.saved_split(workdir))
  return input_path, default, cases, selected


def evaluate_run(config: Any, workdir: str, predict_fn: inference.PredictFn, step: int, *,
                 input_path: str | None = None, output: str | None = None,
                 cases: str | None = None, write_predictions: bool = False,
                 selection: Selection | None = None, tag: str = '',
                 log: Callable[[str], None] = print) -> dict[str, Any]:
  """Scores `predict_fn` (the run's model at `step`) on whole held-out cases; writes metrics.

  Args:
    config: the run's config (its saved `config.json` for `--mode=eval`).
    workdir: the run's folder (its `split.json` says which cases are held out).
    predict_fn: `x -> final logits`.
    step: the checkpoint step, recorded in the summary.
    input_path: a labelled folder; default: the run's own `data.path` (real data) or its
      synthetic validation volumes.
    output: where metrics (and predictions) go; default `WORKDIR/eval` for the run's own
      held-out cases, else `WORKDIR/eval_<input folder>_<all|train|validation|cases>`.
    cases: 'all', 'validation', 'train' or 'id,id'; default: 'validation' on the run's own data
      (at `data.path`, or moved: `held_out_source`), 'all' on another folder.
    write_predictions: also write each case's label map (files only).
    selection: `select_cases(config, workdir, input_path, cases)`, when the caller has it.
    tag: appended to the default output folder's name (e.g. the inference settings changed for
      this evaluation), so that it does not replace the run's own.
  """
  settings = predict.settings_from_config(config)
  ignore = int(config.loss.get('ignore_index', -1)) if 'loss' in config else -1
  ignore = None if ignore < 0 else ignore
  tolerance = float(config.get('eval', {}).get('nsd_tolerance_mm', 1.0))
  binary = int(config.model.num_classes) == 1 if 'model' in config else False
  regions = () if binary else metrics.parse_regions(
      config.get('eval', {}).get('regions', ''), max(int(config.data.num_classes), 2))
  if config.data.name == 'synthetic':
    _check_synthetic_request(input_path, cases)
    if write_predictions:
      log('eval: synthetic volumes are generated, not files: metrics only, no predictions')
    output = predict.check_output_dir(output or os.path.join(
        workdir, dirnames.safe_name(f'{EVAL_DIR}_{tag}') if tag else EVAL_DIR))
    windows = inference.Windows(predict_fn, settings)
    summary = score_cases(lambda ex: windows.probs(ex['image']), synthetic_cases(config.data),
                          max(int(config.data.num_classes), 2), ignore_index=ignore,
                          tolerance_mm=tolerance, binary=binary, regions=regions, log=log)
    summary = {'step': step, 'cases_selected': 'validation', 'input': 'synthetic',
               'inference': _inference(config), **summary}
    write_metrics(output, summary)
  else:
    input_path, default, cases, selected = selection or select_cases(config, workdir,
                                                                     input_path, cases)
    if not output:  # WORKDIR/eval holds the run's own held-out evaluation; others beside it
      # A copy scored while the run's data is still in place is another evaluation.
      own_path = _own_path(config)
      held_out = default == cases == 'validation' and (
          input_path == own_path or not os.path.isdir(own_path))
      which = cases if cases in ('all', 'train', 'validation') else _ids_name(selected)
      name = EVAL_DIR if held_out else f'{EVAL_DIR}_{os.path.basename(input_path)}_{which}'
      output = os.path.join(workdir, dirnames.safe_name(f'{name}_{tag}' if tag else name))
    output = predict.check_output_dir(output)
    if write_predictions:  # a prediction must never replace one of the images or labels
      predict.check_spares(config.data.name, output, [i for _, i, _ in selected],
                           [f for _, i, l in selected for f in (i, l)])
    log(f'eval: {len(selected)} {cases} cases of {input_path}, checkpoint step {step}')
    predictor = predict.Predictor(predict_fn, config.data, settings)
    summary = evaluate_cases(predictor, selected, output, ignore_index=ignore,
                             tolerance_mm=tolerance, binary=binary, regions=regions,
                             write_predictions=write_predictions, log=log,
                             facts={'step': step, 'cases_selected': cases, 'input': input_path,
                                    'inference': _inference(config)})
  summary['output'] = output
  return summary


def _inference(config: Any) -> dict[str, Any]:
  """The inference settings an evaluation used (recorded in its metrics.json)."""
  settings = config.get('inference', {})
  settings = settings.to_dict() if hasattr(settings, 'to_dict') else dict(settings)
  return json.loads(json.dumps(settings, default=list))  # tuples as JSON lists, as saved


def _ids_name(selected: Sequence[tuple[str, str, str]]) -> str:
  """'cases_<id>_<id>' for a few short ids, else their count and a digest: one folder per list."""
  ids = [c for c, _, _ in selected]
  joined = '_'.join(ids)
  if len(joined) <= 40:
    return f'cases_{joined}'
  return f'cases_{len(ids)}_{hashlib.sha1(",".join(ids).encode()).hexdigest()[:8]}'


# Inference settings that do not change a prediction (only how it is computed).
_SAME_RESULTS = ('batch_size',)


def changed_inference(config: Any, workdir: str) -> str:
  """`key=value,...` of the inference settings that differ from the run's own and change the
  predictions ('' if none); flip axes in any order are the same TTA."""
  def norm(settings):
    out = {k: v for k, v in settings.items() if k not in _SAME_RESULTS}
    if isinstance(out.get('tta_axes'), list):
      out['tta_axes'] = sorted(out['tta_axes'])
    return out
  own = norm(_inference(predict.run_config(None, workdir)))
  now = norm(_inference(config))
  return ','.join(f'{k}={_short(v)}' for k, v in sorted(now.items()) if own.get(k) != v)


def _short(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return 'x'.join(map(str, value)) or 'none'
  return str(value)


def _check_synthetic_request(input_path: str | None, cases: str | None) -> None:
  """A synthetic-data run is scored on its own generated validation volumes, nothing else."""
  if input_path:
    raise ValueError('--input: a synthetic-data run is evaluated on its own validation volumes')
  if cases not in (None, '', 'validation'):
    raise ValueError(f'--cases={cases}: a synthetic-data run is evaluated on its own '
                     'validation volumes (--cases=validation)')


def write_overlays(config: Any, workdir: str, apply_fn: Callable[[Any], Any], output: str,
                   num: int, input_path: str | None = None) -> list[str]:
  """`output/overlays/<case>.png` for the first `num` held-out cases: label, final prediction
  and each DS head's own prediction over the image (on the model's grid)."""
  settings = predict.settings_from_config(config)
  windows = overlays.OutputWindows(apply_fn, settings, int(config.data.in_channels))
  if config.data.name == 'synthetic':
    examples = ((c.case_id, c.example) for c in itertools.islice(synthetic_cases(config.data), num))
  else:
    predictor = predict.Predictor(lambda x: apply_fn(x)[0], config.data, settings)
    path, cases = held_out_source(config, workdir, input_path)
    selected = cases_lib.find_labelled(path, config.data, cases,
                                       split=cases_lib.saved_split(workdir))[:num]
    examples = ((cid, predictor.read(image, label, label_on_input_grid=False))
                for cid, image, label in selected)
  paths = overlays.write_run_overlays(os.path.join(output, 'overlays'), windows, examples,
                                      num_classes=max(int(config.data.num_classes), 2))
  return [str(p) for p in paths]


def run(config: Any, workdir: str, *, input_path: str | None = None, output: str | None = None,
        cases: str | None = None, num_overlays: int = 0) -> dict[str, Any]:
  """`--mode=eval`: the latest checkpoint, scored on whole held-out cases (see `evaluate_run`).

  With `--output`, each case's prediction is written there too; `num_overlays` > 0 also writes
  that many overlay PNGs (`write_overlays`).
  """
  cfg = predict.run_config(config, workdir)
  selection = None
  if cfg.data.name == 'synthetic':  # every request error before the model is restored
    _check_synthetic_request(input_path, cases)
  else:  # and every file error
    selection = select_cases(cfg, workdir, input_path, cases)
    folder, default, _, selected = selection
    predict.check_cases(cfg.data, [(image, label) for _, image, label in selected])
    if default == 'validation' and folder != _own_path(cfg) and not cases:
      print(f'eval: {folder} holds every case of the run\'s split ({cases_lib.SPLIT_FILE}), so '
            'it is scored as the run\'s data moved there: its held-out cases only '
            '(--cases=all scores every case)', flush=True)
    predict.warn_on_geometry([image for _, image, _ in selected], workdir)
  tag = changed_inference(cfg, workdir)  # another evaluation: beside the run's own, not over it
  apply_fn, step = predict.restore_apply_fn(cfg, workdir)
  summary = evaluate_run(cfg, workdir, lambda x: apply_fn(x)[0], step, input_path=input_path,
                         output=output, cases=cases, write_predictions=bool(output),
                         selection=selection, tag=tag)
  if num_overlays > 0:
    summary['overlays'] = write_overlays(cfg, workdir, apply_fn, summary['output'],
                                         num_overlays, input_path)
  return summary
