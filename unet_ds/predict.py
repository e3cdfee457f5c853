"""Whole-image prediction and evaluation of user files (`--mode=predict` / `--mode=eval`).

Inputs are read and normalised exactly as the run's dataset was prepared (`config.data`), predicted
by sliding window over the whole image (`inference.py`, the model's `final` output only), and
written back in the input's format: NIfTI label maps (uint8) with the input's affine and header, or
PNG masks in the folder's own label values (the inverse of `data.label_map` when it has one).

`--mode=eval` scores each labelled case and writes `metrics.json` (top-level
`mean_foreground_dice`) and `metrics.csv` (one row per case) into the output folder.

The model, its checkpoint and the data settings come from the run itself (`WORKDIR/config.json`),
so predictions always use the normalisation and label mapping the model was trained with; only
the `inference` group (window overlap, batch, TTA) is taken from `--config` when it has one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import csv
import dataclasses
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import nibabel
import numpy as np

from unet_ds import checkpoint
from unet_ds import config_lib
from unet_ds import inference
from unet_ds import metrics
from unet_ds import models
from unet_ds import optim
from unet_ds.data import folder2d
from unet_ds.data import io
from unet_ds.data import msd
from unet_ds.data import prepare

DATA_KINDS = ('msd', 'folder2d')


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to predict: window, blending, TTA, and what to write.

  Built from `config.data.patch_size` and the optional `config.inference` group.
  """
  patch_size: tuple[int, ...]
  overlap: float = 0.5
  batch_size: int = 2
  sigma_scale: float = 1 / 8
  tta_axes: tuple[int, ...] = ()
  save_probs: bool = False


def settings_from_config(config: Any) -> Settings:
  """`Settings` from a run config; `config.inference` keys override the defaults."""
  patch = prepare.cfg_get(config.data, 'patch_size') or prepare.cfg_get(config.data, 'shape')
  if not patch:
    raise ValueError('config.data.patch_size: needed for sliding-window prediction')
  inf = prepare.cfg_get(config, 'inference', {}) or {}
  return Settings(
      patch_size=tuple(int(p) for p in patch),
      overlap=float(prepare.cfg_get(inf, 'overlap', 0.5)),
      batch_size=int(prepare.cfg_get(inf, 'batch_size', 2)),
      sigma_scale=float(prepare.cfg_get(inf, 'sigma_scale', 1 / 8)),
      tta_axes=tuple(int(a) for a in prepare.cfg_get(inf, 'tta_axes', ())),
      save_probs=bool(prepare.cfg_get(inf, 'save_probs', False)),
  )


def data_kind(data_cfg: Any) -> str:
  """'msd' (3D NIfTI) or 'folder2d' (2D PNG/TIFF) from `config.data.name`."""
  name = prepare.cfg_get(data_cfg, 'name')
  if name not in DATA_KINDS:
    raise ValueError(f'config.data.name={name!r}: predict/eval on files supports {DATA_KINDS}')
  return name


def _data_settings(data_cfg: Any) -> dict[str, Any]:
  module = msd if data_kind(data_cfg) == 'msd' else folder2d
  return module.settings_from_config(data_cfg)


def find_inputs(path: str, data_cfg: Any) -> list[str]:
  """Images to predict: `path` itself if a file, else the image files in it (or in its
  `imagesTs`/`imagesTr` (MSD) / `image_dir` (2D) subfolder)."""
  kind = data_kind(data_cfg)
  suffixes = io.NIFTI_SUFFIXES if kind == 'msd' else io.IMAGE2D_SUFFIXES
  if os.path.isfile(path):
    if not path.lower().endswith(suffixes):
      raise io.DataError(f'{path}: not a {"/".join(suffixes)} file')
    return [path]
  if not os.path.isdir(path):
    raise io.DataError(f'{path}: no such file or folder')
  subdirs = (('imagesTs', 'imagesTr') if kind == 'msd' else
             (prepare.cfg_get(data_cfg, 'image_dir', 'image'),))
  for folder in (path, *(os.path.join(path, s) for s in subdirs)):
    if os.path.isdir(folder) and any(not f.startswith('.') and f.lower().endswith(suffixes)
                                     for f in os.listdir(folder)):
      return io.list_files(folder, suffixes)
  raise io.DataError(f'{path}: empty folder, no {"/".join(suffixes)} images (also looked in '
                     f'{", ".join(subdirs)})')


SPLIT_FILE = 'split.json'


def _all_labelled(path: str, data_cfg: Any) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
  settings = _data_settings({**_as_dict(data_cfg), 'path': path})
  if data_kind(data_cfg) == 'msd':
    return msd.find_cases(settings['path']), settings
  return folder2d.find_cases(settings['path'], settings['image_dir'], settings['label_dir']), settings


def case_split(data_cfg: Any) -> dict[str, list[str]]:
  """`{'train': [ids], 'validation': [ids]}` of the run's data path, as the training data was
  prepared. Training writes it to `WORKDIR/split.json` so that a later eval scores the same
  held-out cases even if files were added to the folder since."""
  return _split_ids(*_all_labelled(data_cfg.path, data_cfg))


def _split_ids(found: Sequence[tuple[str, ...]], settings: dict[str, Any]
               ) -> dict[str, list[str]]:
  return {name: [c[0] for c in cases]
          for name, cases in prepare.split_case_list(found, settings).items()}


def find_labelled(path: str, data_cfg: Any, cases: str | Sequence[str] = 'all',
                  split: dict[str, list[str]] | None = None) -> list[tuple[str, str, str]]:
  """(case_id, image, label) to evaluate: every pair under `path`, or a subset.

  Args:
    path: an MSD task folder (imagesTr/ + labelsTr/) or a 2D folder (image/ + label/).
    data_cfg: `config.data` (layout, split settings).
    cases: 'all'; 'validation' / 'train' (the run's own split of `path`); or a list of case ids
      ('id,id').
    split: the run's saved split (`case_split`); without it, 'validation' / 'train' recompute
      the split from the files now in `path`.
  """
  found, settings = _all_labelled(path, data_cfg)
  if cases == 'all':
    return found
  if cases in ('train', 'validation'):
    if split is None:
      split = _split_ids(found, settings)
    if not split.get(cases):
      raise ValueError(f'{path}: the run\'s split has no {cases!r} cases')
    cases = split[cases]
  wanted = [c.strip() for c in cases.split(',')] if isinstance(cases, str) else list(cases)
  by_id = {c[0]: c for c in found}
  missing = [c for c in wanted if c not in by_id]
  if missing:
    raise io.DataError(f'{path}: cases {missing[:10]} not found')
  return [by_id[c] for c in wanted]


def saved_split(workdir: str) -> dict[str, list[str]] | None:
  """The split a training run wrote (`WORKDIR/split.json`), or None (older runs)."""
  path = os.path.join(workdir, SPLIT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _as_dict(cfg: Any) -> dict[str, Any]:
  return dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)


class Predictor:
  """Holds a jitted window function; predicts whole images and writes results."""

  def __init__(self, predict_fn: inference.PredictFn, data_cfg: Any, settings: Settings):
    self.kind = data_kind(data_cfg)
    self.data_settings = _data_settings(data_cfg)
    self.settings = settings
    rank = 3 if self.kind == 'msd' else 2
    if len(settings.patch_size) != rank:
      raise ValueError(f'config.data.patch_size={settings.patch_size}: need {rank} sizes for '
                       f'{self.kind}')
    self._window_fn = inference.make_window_fn(
        predict_fn, inference.gaussian_importance(settings.patch_size, settings.sigma_scale),
        settings.tta_axes)
    label_map = dict(self.data_settings['label_map'])
    inverse = {c: v for v, c in label_map.items()}
    self._inverse_map = inverse if len(inverse) == len(label_map) and label_map else None

  def read(self, image_path: str, label_path: str | None = None) -> dict[str, Any]:
    reader = msd.read_case if self.kind == 'msd' else folder2d.read_case
    return reader(image_path, label_path, **prepare.read_kwargs(self.data_settings))

  def probs(self, example: dict[str, Any]) -> np.ndarray:
    s = self.settings
    return inference.sliding_window_predict(
        None, example['image'], patch_size=s.patch_size, overlap=s.overlap,
        batch_size=s.batch_size, sigma_scale=s.sigma_scale, tta_axes=s.tta_axes,
        window_fn=self._window_fn)

  def write(self, output_dir: str, image_path: str, labels: np.ndarray,
            probs: np.ndarray | None = None) -> str:
    """Writes the label map (and probabilities if asked) next to each other; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    cid = io.case_id(image_path)
    if self.kind == 'msd':
      ref = nibabel.load(image_path)  # header only; the input's geometry is copied as is
      out = os.path.join(output_dir, f'{cid}.nii.gz')
      io.write_nifti(out, labels, ref.affine, ref.header, dtype=np.uint8)
      if probs is not None:
        io.write_nifti(os.path.join(output_dir, f'{cid}_probs.nii.gz'), probs, ref.affine,
                       ref.header, dtype=np.float32)
      return out
    out = os.path.join(output_dir, f'{cid}.png')
    if self._inverse_map is not None:
      lut = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
      for c, v in self._inverse_map.items():
        if c < lut.size:
          lut[c] = v
      labels = lut[labels]
    io.write_image2d(out, labels)
    if probs is not None:
      np.save(os.path.join(output_dir, f'{cid}_probs.npy'), probs.astype(np.float16))
    return out


def predict_files(predictor: Predictor, inputs: Sequence[str], output_dir: str,
                  log: Callable[[str], None] = print) -> list[str]:
  """Predicts every input image and writes one result per input; returns the written paths."""
  written = []
  for i, path in enumerate(inputs):
    example = predictor.read(path)
    probs = predictor.probs(example)
    labels = np.argmax(probs, -1).astype(np.uint8)
    written.append(predictor.write(output_dir, path, labels,
                                   probs if predictor.settings.save_probs else None))
    log(f'[{i + 1}/{len(inputs)}] {path} -> {written[-1]}')
  return written


def case_counts(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
  """`[3, K]` (tp, fp, fn) per class of two integer maps."""
  cm = np.bincount(label.ravel().astype(np.int64) * num_classes + pred.ravel(),
                   minlength=num_classes * num_classes).reshape(num_classes, num_classes)
  tp = np.diag(cm)
  return np.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp])


def evaluate_cases(predictor: Predictor, cases: Sequence[tuple[str, str, str]], output_dir: str,
                   *, write_predictions: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Scores every (case_id, image, label); writes `metrics.json` and `metrics.csv`.

  `mean_foreground_dice` follows nnU-Net's summary: per class, the mean Dice over cases (a case
  where the class is absent from both label and prediction is skipped), then the mean over the
  foreground classes. `pooled` scores the confusion counts summed over all cases (the trainer's
  eval convention).
  """
  if not cases:
    raise ValueError('evaluate: no cases to evaluate')
  num_classes = max(predictor.data_settings['num_classes'], 2)
  rows, total = [], np.zeros((3, num_classes), np.int64)
  for i, (cid, image_path, label_path) in enumerate(cases):
    example = predictor.read(image_path, label_path)
    probs = predictor.probs(example)
    pred = np.argmax(probs, -1).astype(np.int64)
    counts = case_counts(pred, example['label'], num_classes)
    total += counts
    rows.append({'case_id': cid, 'file': os.path.basename(image_path), **metrics.summarize(counts)})
    if write_predictions:
      predictor.write(output_dir, image_path, pred.astype(np.uint8),
                      probs if predictor.settings.save_probs else None)
    log(f'[{i + 1}/{len(cases)}] {cid}: mean foreground Dice '
        f'{rows[-1]["mean_foreground_dice"]:.4f}')
  per_class = {k: [_nanmean([r[k][c] for r in rows]) for c in range(num_classes)]
               for k in ('dice', 'iou')}
  summary = {
      'mean_foreground_dice': _nanmean(per_class['dice'][1:]),
      'mean_foreground_iou': _nanmean(per_class['iou'][1:]),
      'per_class': per_class,
      'pooled': metrics.summarize(total),
      'num_cases': len(rows),
      'cases': rows,
  }
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, 'metrics.json'), 'w') as f:
    json.dump(_json_safe(summary), f, indent=1)
  with open(os.path.join(output_dir, 'metrics.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['case_id', 'file', 'mean_foreground_dice',
                     *(f'dice_{c}' for c in range(num_classes)),
                     *(f'iou_{c}' for c in range(num_classes))])
    for r in rows:
      writer.writerow([r['case_id'], r['file'], _fmt(r['mean_foreground_dice']),
                       *map(_fmt, r['dice']), *map(_fmt, r['iou'])])
    writer.writerow(['mean', '', _fmt(summary['mean_foreground_dice']),
                     *map(_fmt, per_class['dice']), *map(_fmt, per_class['iou'])])
  return summary


def _nanmean(values: Sequence[float | None]) -> float | None:
  vals = [v for v in values if v is not None and not np.isnan(v)]
  return float(np.mean(vals)) if vals else None


def _fmt(value: float | None) -> str:
  return '' if value is None or np.isnan(value) else f'{value:.6f}'


def _json_safe(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and np.isnan(value):
    return None
  return value


# ----------------------------------------------------------------------------- the run's model

def run_config(config: Any, workdir: str) -> ml_collections.ConfigDict:
  """The run's saved config, with `inference` from `config` when it has that group."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: train a model in this workdir first '
                            '(--mode=train)')
  with open(path) as f:
    saved = ml_collections.ConfigDict(_tuples(json.load(f)))
  passed = config.get('inference') if config is not None else None
  if passed is not None:
    saved.inference = ml_collections.ConfigDict(passed.to_dict() if hasattr(passed, 'to_dict')
                                                else dict(passed))
  same_data = config is not None and 'data' in config and config.data.get('name') == saved.data.name
  for group in ('model', 'data'):  # only worth a word when --config looks like the run's own
    if same_data and group in config and _differs(config[group], saved[group]):
      logging.warning('--config.%s differs from the run\'s; predicting with the run\'s saved '
                      'config (%s)', group, path)
  return saved


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (ConfigDict fields such as patch_size were tuples)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _differs(a: Any, b: Any) -> bool:
  to = lambda c: json.loads(json.dumps(c.to_dict() if hasattr(c, 'to_dict') else c,  # noqa: E731
                                       default=str, sort_keys=True))
  return to(a) != to(b)


def restore_predict_fn(config: ml_collections.ConfigDict, workdir: str
                       ) -> tuple[inference.PredictFn, int]:
  """(`x -> final logits` with the latest checkpoint's weights, its step).

  Needs only the checkpoint and the config, not the training data.
  """
  from unet_ds import train  # pylint: disable=g-import-not-at-top  (train imports the data stack)
  model_cfg = config_lib.validate(config)
  model = models.get_model(model_cfg)
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  patch = tuple(config.data.get('patch_size') or config.data.shape)
  shapes = jax.eval_shape(lambda: train.create_train_state(
      model, tx, int(config.seed), (1, *patch, int(config.data.in_channels))))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          shapes)
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoints in {directory}: train first (--mode=train)')
  ckpts = checkpoint.Checkpoints(directory, int(config.train.max_to_keep))
  state, _, step = ckpts.restore(abstract)
  ckpts.close()
  variables = state.variables()
  return (lambda x: model.apply(variables, x, train=False)[0]), int(step)


def run(config: Any, workdir: str, *, mode: str, input_path: str | None, output: str | None,
        probabilities: bool = False, cases: str | None = None) -> dict[str, Any]:
  """`--mode=predict|eval --input=... --output=...` on files, with the run's latest checkpoint.

  Args:
    config: the `--config` value (only its `inference` group is used).
    workdir: the training run's folder.
    mode: 'predict' (write label maps) or 'eval' (score labelled cases, write metrics).
    input_path: predict: an image file or folder; eval: a labelled folder (MSD task folder or
      image/ + label/ folder). Eval without it scores the run's validation cases on its own
      data path.
    output: the folder to write into.
    probabilities: also write per-class probabilities.
    cases: eval only: 'all', 'validation', 'train' or 'id,id'. Default: the held-out
      'validation' cases when `input_path` is the run's own `data.path`, else 'all'.

  Returns:
    predict: `{'written': [paths], 'step'}`; eval: the metrics summary.
  """
  if mode not in ('predict', 'eval'):
    raise ValueError(f'mode={mode!r}: predict.run handles predict and eval')
  if not output:
    raise ValueError(f'--output is required for --mode={mode} on files')
  if mode == 'predict' and not input_path:
    raise ValueError('--input is required for --mode=predict (an image file or folder)')
  cfg = run_config(config, workdir)
  settings = settings_from_config(cfg)
  if probabilities:
    settings = dataclasses.replace(settings, save_probs=True)
  predict_fn, step = restore_predict_fn(cfg, workdir)
  predictor = Predictor(predict_fn, cfg.data, settings)
  if mode == 'predict':
    written = predict_files(predictor, find_inputs(input_path, cfg.data), output)
    return {'written': written, 'step': step}
  own_path = os.path.abspath(os.path.expanduser(cfg.data.path))
  input_path = input_path or own_path
  if cases is None:
    cases = 'validation' if os.path.abspath(input_path) == own_path else 'all'
  selected = find_labelled(input_path, cfg.data, cases, split=saved_split(workdir))
  print(f'eval: {len(selected)} {cases} cases of {input_path}, checkpoint step {step}')
  summary = evaluate_cases(predictor, selected, output, write_predictions=True)
  summary = {'mean_foreground_dice': summary['mean_foreground_dice'], 'step': step,
             'cases_selected': cases, 'input': os.path.abspath(input_path),
             **{k: v for k, v in summary.items() if k != 'mean_foreground_dice'}}
  with open(os.path.join(output, 'metrics.json'), 'w') as f:
    json.dump(_json_safe(summary), f, indent=1)
  print(json.dumps({'mean_foreground_dice': summary['mean_foreground_dice'],
                    'per_class_dice': summary['per_class']['dice'], 'num_cases': len(selected),
                    'step': step, 'output': os.path.abspath(output)}))
  return summary
