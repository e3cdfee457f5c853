"""Whole-image prediction of user files (`--mode=predict`) with a run's latest checkpoint.

Inputs are read and normalised exactly as the run's dataset was prepared (`config.data`), predicted
by sliding window over the whole image (`inference.py`, the model's `final` output only), and
written back in the input's format: NIfTI label maps (uint8) with the input's affine and header, or
PNG masks, both in the data's own label values (the inverse of `data.label_map` when it has one).
Every file is written under a temporary name and renamed, so an interrupted run never leaves a
truncated file that looks complete.

The model, its checkpoint and the data settings come from the run itself (`WORKDIR/config.json`),
so predictions always use the normalisation and label mapping the model was trained with; only
the `inference` group (window overlap, batch, TTA) is taken from `--config` when it has one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import json
import os
from typing import Any

from absl import logging
import ml_collections
import nibabel
import numpy as np

from unet_ds import dirnames
from unet_ds import inference
from unet_ds import state as state_lib
from unet_ds import workdir as workdir_lib
from unet_ds.data import cases as cases_lib
from unet_ds.data import folder2d
from unet_ds.data import io
from unet_ds.data import msd
from unet_ds.data import prepare
from unet_ds.data import resample


def settings_from_config(config: Any) -> inference.Settings:
  """`inference.Settings` of a run config: its `inference` group over the defaults, and the
  training patch size as the window."""
  patch = prepare.cfg_get(config.data, 'patch_size') or prepare.cfg_get(config.data, 'shape')
  if not patch:
    raise ValueError('config.data.patch_size: needed for sliding-window prediction')
  inf = prepare.cfg_get(config, 'inference', {}) or {}
  inf = dict(inf.to_dict() if hasattr(inf, 'to_dict') else inf)
  return inference.Settings.from_dict({**inf, 'patch_size': tuple(int(p) for p in patch)})


def find_inputs(path: str, data_cfg: Any) -> list[str]:
  """Images to predict: `path` itself if a file, else the image files in it (or in its
  `imagesTs`/`imagesTr` (MSD) / `image_dir` (2D) subfolder)."""
  kind = cases_lib.data_kind(data_cfg)
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
  others = io.IMAGE2D_SUFFIXES if kind == 'msd' else io.NIFTI_SUFFIXES
  if any(f.lower().endswith(others) for f in os.listdir(path)):  # another task's images
    raise io.DataError(f'{path}: holds {"/".join(others)} images, but this run was trained on '
                       f'{kind} data and predicts {"/".join(suffixes)} images')
  raise io.DataError(f'{path}: empty folder, no {"/".join(suffixes)} images (also looked in '
                     f'{", ".join(subdirs)})')


def check_output_dir(output: str, create: bool = True) -> str:
  """`output` as an absolute folder, created if `create`; an existing non-folder is an error."""
  output = os.path.abspath(os.path.expanduser(output))
  if os.path.exists(output) and not os.path.isdir(output):
    raise NotADirectoryError(f'--output={output}: exists and is not a folder')
  if create:
    os.makedirs(output, exist_ok=True)
  return output


def output_files(kind: str, output_dir: str, image_path: str) -> tuple[str, str]:
  """(label map, probabilities) paths `Predictor.write` uses for `image_path` of a `kind` run."""
  cid = io.case_id(image_path)
  ext, probs_ext = ('.nii.gz', '.nii.gz') if kind == 'msd' else ('.png', '.npy')
  return (os.path.join(output_dir, f'{cid}{ext}'),
          os.path.join(output_dir, f'{cid}_probs{probs_ext}'))


def check_spares(kind: str, output_dir: str, images: Sequence[str], keep: Sequence[str]) -> None:
  """Raises before any compute when writing the results of `images` into `output_dir` would
  replace one of the files `keep` (the inputs, their labels): e.g. `--output` = `--input`."""
  kept = {os.path.realpath(f) for f in keep}
  for image in images:
    for out in output_files(kind, output_dir, image):
      if os.path.realpath(out) in kept:
        raise FileExistsError(f'--output={output_dir}: the result {out} would replace an input '
                              'file; write into another folder')


def dataset_labels(data_cfg: Any, images: Sequence[str]) -> list[str]:
  """The label files paired with `images` in their dataset's layout (MSD `imagesTr`/`imagesTs`
  -> `labelsTr`/`labelsTs`, 2D `image_dir` -> `label_dir`): ground truth that a prediction
  written into that labels folder under the same name would silently replace."""
  kind = cases_lib.data_kind(data_cfg)
  pairs = ({'imagesTr': 'labelsTr', 'imagesTs': 'labelsTs'} if kind == 'msd' else
           {prepare.cfg_get(data_cfg, 'image_dir', 'image'):
            prepare.cfg_get(data_cfg, 'label_dir', 'label')})
  labels = []
  for folder in sorted({os.path.dirname(os.path.abspath(i)) for i in images}):
    label_dir = pairs.get(os.path.basename(folder))
    label_dir = label_dir and os.path.join(os.path.dirname(folder), label_dir)
    if label_dir and os.path.isdir(label_dir):
      ids = {io.case_id(i) for i in images if os.path.dirname(os.path.abspath(i)) == folder}
      labels += [os.path.join(label_dir, f) for f in sorted(os.listdir(label_dir))
                 if io.case_id(f) in ids]
  return labels


def check_not_input_folder(output: str, input_path: str) -> None:
  """Predictions never go into the `--input` folder itself (a task folder's root included)."""
  if os.path.isdir(input_path) and os.path.realpath(output) == os.path.realpath(input_path):
    raise FileExistsError(f'--output={output}: is the --input folder; write into another folder')


_READERS = {'msd': msd.read_case, 'folder2d': folder2d.read_case}  # by cases_lib.data_kind


class Predictor:
  """Holds a jitted window function; predicts whole images and writes results."""

  def __init__(self, predict_fn: inference.PredictFn, data_cfg: Any,
               settings: inference.Settings):
    self.kind = cases_lib.data_kind(data_cfg)
    self.data_settings = cases_lib.data_settings(data_cfg)
    self.settings = settings
    rank = 3 if self.kind == 'msd' else 2
    if len(settings.patch_size) != rank:
      raise ValueError(f'config.data.patch_size={settings.patch_size}: need {rank} sizes for '
                       f'{self.kind}')
    self.window = inference.Windows(predict_fn, settings)
    label_map = dict(self.data_settings['label_map'])
    inverse = {c: v for v, c in label_map.items()}
    self._inverse_map = inverse if len(inverse) == len(label_map) and label_map else None

  def read(self, image_path: str, label_path: str | None = None,
           label_on_input_grid: bool = True) -> dict[str, Any]:
    """The image as the model saw its training data (resampled, normalised); the label, if
    any, on the input's own grid, where predictions are scored (or on the image's grid)."""
    kwargs = prepare.read_kwargs(self.data_settings)
    if self.kind == 'msd':
      kwargs['resample_label'] = not label_on_input_grid
    return _READERS[self.kind](image_path, label_path, **kwargs)

  def probs(self, example: dict[str, Any]) -> np.ndarray:
    """Class probabilities `[*spatial, K]` on the input's own grid."""
    probs = self.window.probs(example['image'])
    geometry = example.get('geometry')
    return resample.to_original(probs, geometry) if geometry is not None else probs

  def write(self, output_dir: str, image_path: str, labels: np.ndarray,
            probs: np.ndarray | None = None) -> str:
    """Writes the label map, in the input's own label values (the inverse of
    `data.label_map`), and the probabilities if asked, next to each other; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    out, probs_out = output_files(self.kind, output_dir, image_path)
    if self._inverse_map is not None:
      lut = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
      for c, v in self._inverse_map.items():
        if c < lut.size:
          lut[c] = v
      labels = lut[labels]
    if self.kind == 'msd':
      ref = nibabel.load(image_path)  # header only; the input's geometry is copied as is
      with workdir_lib.atomic_path(out) as tmp:
        io.write_nifti(tmp, labels, ref.affine, ref.header, dtype=np.uint8)
      if probs is not None:
        with workdir_lib.atomic_path(probs_out) as tmp:
          io.write_nifti(tmp, probs, ref.affine, ref.header, dtype=np.float32)
      return out
    with workdir_lib.atomic_path(out) as tmp:
      io.write_image2d(tmp, labels)
    if probs is not None:
      with workdir_lib.atomic_path(probs_out) as tmp:
        with open(tmp, 'wb') as f:
          np.save(f, probs.astype(np.float16))
    return out


def check_cases(data_cfg: Any, pairs: Sequence[tuple[str, str | None]]) -> None:
  """Reads and checks every (image, label or None) pair as prediction will, without resampling,
  so that a bad file stops the command before any prediction, naming the file, and not after
  the cases before it were predicted and written."""
  read = _READERS[cases_lib.data_kind(data_cfg)]
  kwargs = prepare.read_kwargs(cases_lib.data_settings(data_cfg))
  kwargs.pop('target_spacing', None)  # resampling checks nothing the read has not
  for image, label in pairs:
    read(image, label, **kwargs)


def warn_on_geometry(inputs: Sequence[str], workdir: str) -> list[str]:
  """Warns for each NIfTI input whose spacing or orientation differs from the training data's
  (`WORKDIR/data_geometry.json`); returns the warnings."""
  path = os.path.join(workdir, cases_lib.GEOMETRY_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    trained = json.load(f)
  warnings = []
  for image in inputs:
    if image.lower().endswith(io.NIFTI_SUFFIXES):
      why = cases_lib.geometry_mismatch(image, trained)
      if why:
        warnings.append(f'{image}: {why}; predicted anyway')
        logging.warning('%s', warnings[-1])
  return warnings


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


# ----------------------------------------------------------------------------- the run's model

def run_config(config: Any, workdir: str) -> ml_collections.ConfigDict:
  """The run's saved config, its `inference` settings updated by those `config` has."""
  path = os.path.join(workdir, 'config.json')
  names = dirnames.multirun_members(workdir)
  if not os.path.exists(path) and names is not None:  # K runs: each has its own folder
    raise FileNotFoundError(f'{workdir}: a multi-run workdir ({state_lib.MULTIRUN_FILE}); give one '
                            f'run\'s folder: {", ".join(os.path.join(workdir, n) for n in names)}')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: train a model in this workdir first '
                            '(--mode=train)')
  with open(path) as f:
    try:
      saved = ml_collections.ConfigDict(_tuples(json.load(f)))
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None
  passed = config.get('inference') if config is not None else None
  if passed:  # over the run's own settings (the command line gives only the flags it changes)
    inf = dict(saved.get('inference') or {})
    inf.update(passed.to_dict() if hasattr(passed, 'to_dict') else dict(passed))
    saved.inference = ml_collections.ConfigDict(inf)
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


def restore_apply_fn(config: ml_collections.ConfigDict, workdir: str
                     ) -> tuple[Callable[[Any], tuple[Any, Any]], int]:
  """(`x -> (final, intermediates)` with the latest checkpoint's weights, its step).

  Needs only the checkpoint and the config, not the training data.
  """
  setup, state, step = state_lib.restore(config, workdir)
  variables = state.variables()
  return (lambda x: setup.model.apply(variables, x, train=False)), step


def run(config: Any, workdir: str, *, input_path: str, output: str,
        probabilities: bool = False) -> dict[str, Any]:
  """`--mode=predict --input=... --output=...`: label maps of every input image.

  Args:
    config: the `--config` value (only its `inference` group is used).
    workdir: the training run's folder.
    input_path: an image file or folder.
    output: the folder to write into (created; must not be a file).
    probabilities: also write per-class probabilities.

  Returns:
    `{'written': [paths], 'step'}`.
  """
  if not input_path:
    raise ValueError('--input is required for --mode=predict (an image file or folder)')
  if not output:
    raise ValueError('--output is required for --mode=predict')
  cfg = run_config(config, workdir)
  if cfg.data.name not in cases_lib.FILE_KINDS:
    raise ValueError(f'--workdir={workdir}: trained on config.data.name={cfg.data.name!r}, not '
                     'on files; predict needs a run trained on NIfTI (msd, auto) or PNG/TIFF '
                     '(folder2d) data')
  settings = settings_from_config(cfg)
  if probabilities:
    settings = dataclasses.replace(settings, save_probs=True)
  inputs = find_inputs(input_path, cfg.data)  # every input error before any compute
  output = check_output_dir(output, create=False)
  check_spares(cases_lib.data_kind(cfg.data), output, inputs,
               [*inputs, *dataset_labels(cfg.data, inputs)])
  check_not_input_folder(output, input_path)
  check_cases(cfg.data, [(image, None) for image in inputs])
  os.makedirs(output, exist_ok=True)  # only once every input has been checked
  warn_on_geometry(inputs, workdir)
  apply_fn, step = restore_apply_fn(cfg, workdir)
  predictor = Predictor(lambda x: apply_fn(x)[0], cfg.data, settings)
  written = predict_files(predictor, inputs, output)
  return {'written': written, 'step': step}
