"""Overlay PNGs: the label and each prediction drawn over the image, side by side.

One PNG per case, a grid of panels: columns are the label, then each prediction in the order
given (e.g. each variant's final output, each DS head's own prediction); rows are the views, the
image itself for 2D, or for 3D the three orthogonal slices through the label's foreground centroid
(through the centre when the label is empty): axis 0, axis 1, axis 2. A prediction of a coarser
grid (a DS head's logits' argmax) is upsampled to the image's grid by nearest neighbour, each
voxel taking the class of the coarse voxel that covers it.

Every panel is `PANEL_PX` pixels square, so a grid of R x C panels is a PNG of
`R * PANEL_PX` x `C * PANEL_PX` pixels. Drawing uses matplotlib's object API with the Agg canvas
(no pyplot state, no display).

`output_predict_fns` turns a model into one window function per output (the final logits and
each DS head's, resized to the window), and `OutputWindows` predicts every output of a run over a
whole image by the same sliding window as the final one:

  windows = overlays.OutputWindows(lambda x: model.apply(variables, x, train=False), settings,
                                   in_channels)
  overlays.write_overlay(path, example['image'], example['label'], windows.labels(
      example['image']), spacing=overlays.example_spacing(example), title=case_id)

or, for one run's first cases, `overlays.write_run_overlays(out_dir, windows, [(case_id,
example), ...])`.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
from matplotlib import colors as mpl_colors
from matplotlib import figure as mpl_figure
from matplotlib.backends import backend_agg
import numpy as np

from unet_ds import inference

PANEL_PX = 200
_DPI = 100
_ALPHA = 0.45
_CLASS_COLOURS = ('#e6194b', '#3cb44b', '#4363d8', '#ffe119', '#f58231', '#911eb4', '#46f0f0',
                  '#f032e6', '#bcf60c', '#fabebe')


def output_predict_fns(apply_fn: Callable[[jax.Array], tuple[jax.Array, Sequence[jax.Array]]],
                       window_shape: Sequence[int]
                       ) -> dict[str, Callable[[jax.Array], jax.Array]]:
  """`{'final': fn, 'head 1': fn, ...}`: each `[B, *patch, C] -> logits [B, *patch, K]`.

  `apply_fn` is the model's `x -> (final, intermediates)` (e.g. `lambda x: model.apply(variables,
  x, train=False)`); `window_shape` is one input `[B, *patch, C]`, used to count the heads
  (highest resolution first, as the model returns them). A head's logits are resized to the
  window by nearest neighbour, so its prediction keeps its own resolution.
  """
  _, heads = jax.eval_shape(apply_fn, jax.ShapeDtypeStruct(tuple(window_shape), 'float32'))
  fns = {'final': lambda x: apply_fn(x)[0]}
  for h in range(len(heads)):
    fns[f'head {h + 1}'] = lambda x, h=h: _resize_to(apply_fn(x)[1][h], x.shape)
  return fns


def _resize_to(logits: jax.Array, input_shape: Sequence[int]) -> jax.Array:
  return jax.image.resize(logits, (*input_shape[:-1], logits.shape[-1]), method='nearest')


class OutputWindows:
  """Every output of a model (final, head 1, ...) predicted over whole images by sliding window.

  `settings` is the run's sliding-window settings (`patch_size`, `overlap`, `batch_size`,
  `sigma_scale`, `tta_axes`: `predict.settings_from_config(config)`); each output is jitted
  once and reused across images.
  """

  def __init__(self, apply_fn: Callable[[jax.Array], tuple[jax.Array, Sequence[jax.Array]]],
               settings: Any, in_channels: int):
    self.settings = settings
    patch = tuple(int(p) for p in settings.patch_size)
    weight = inference.gaussian_importance(patch, settings.sigma_scale)
    fns = output_predict_fns(apply_fn, (int(settings.batch_size), *patch, int(in_channels)))
    self._window_fns = {name: inference.make_window_fn(fn, weight, settings.tta_axes)
                        for name, fn in fns.items()}

  @property
  def names(self) -> list[str]:
    return list(self._window_fns)

  def labels(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """`{output: integer map [*spatial]}` of one image `[*spatial, C]`."""
    s = self.settings
    return {name: np.argmax(inference.sliding_window_predict(
                None, image, patch_size=s.patch_size, overlap=s.overlap,
                batch_size=s.batch_size, sigma_scale=s.sigma_scale, tta_axes=s.tta_axes,
                window_fn=window_fn), -1)
            for name, window_fn in self._window_fns.items()}


def write_run_overlays(out_dir: str | pathlib.Path, windows: OutputWindows,
                       examples: Iterable[tuple[str, Mapping[str, Any]]],
                       num_classes: int | None = None) -> list[pathlib.Path]:
  """One run's overlays: `out_dir/<case_id>.png` per (case_id, example with 'image', 'label'),
  columns the label, the final prediction and each DS head's. Returns the paths."""
  paths = []
  for case_id, example in examples:
    paths.append(write_overlay(
        pathlib.Path(out_dir) / f'{case_id}.png', example['image'], example['label'],
        windows.labels(np.asarray(example['image'])), spacing=example_spacing(example),
        title=case_id, num_classes=num_classes))
  return paths


def example_spacing(example: Mapping[str, Any]) -> tuple[float, ...] | None:
  """The voxel size (mm) of an example's grid from its `geometry` (None: no physical size)."""
  g = example.get('geometry')
  if g is None or g.original_spacing is None:
    return None
  return tuple(float(sp) * n0 / n for sp, n0, n in zip(g.original_spacing, g.original_shape,
                                                       g.shape))


def grid_shape(ndim: int, num_predictions: int) -> tuple[int, int]:
  """(rows, columns) of panels: one row (2D) or three (3D); the label plus each prediction."""
  if ndim not in (2, 3):
    raise ValueError(f'overlays: need a 2D or 3D image, got {ndim} spatial axes')
  return (1 if ndim == 2 else 3), 1 + num_predictions


def upsample_nearest(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """An integer map on a coarser grid brought to `shape`: each output voxel takes the class of
  the input voxel covering it (the grids span the same extent)."""
  labels = np.asarray(labels)
  if labels.ndim != len(shape):
    raise ValueError(f'overlays: prediction shape {labels.shape} and image shape {tuple(shape)} '
                     'have different numbers of axes')
  index = np.ix_(*[np.minimum((np.arange(n) * m) // n, m - 1)
                   for n, m in zip(shape, labels.shape)])
  return labels[index]


def slice_centre(label: np.ndarray) -> tuple[int, ...]:
  """The voxel nearest the label's foreground centroid (the centre if it has no foreground)."""
  fg = np.argwhere(np.asarray(label) > 0)
  if not fg.size:
    return tuple(n // 2 for n in label.shape)
  return tuple(int(round(c)) for c in fg.mean(0))


def write_overlay(path: str | pathlib.Path, image: np.ndarray, label: np.ndarray,
                  preds: Mapping[str, np.ndarray], *, spacing: Sequence[float] | None = None,
                  title: str | None = None, num_classes: int | None = None) -> pathlib.Path:
  """Writes one case's overlay grid (module doc) to `path` (a PNG); returns the path.

  Args:
    path: the PNG to write (its folder is created).
    image: `[*spatial]` or `[*spatial, C]` (the first channel is shown), 2D or 3D.
    label: integer map of the image's spatial shape (0 = background, not drawn).
    preds: column title -> integer map of the image's shape or of a coarser grid (upsampled).
    spacing: voxel size per axis, for the panels' aspect ratio (default: square voxels).
    title: a line above the grid (e.g. the case id).
    num_classes: fixes the colour of each class across files (default: the largest class shown).
  """
  image, label = np.asarray(image), np.asarray(label)
  if image.ndim == label.ndim + 1:
    image = image[..., 0]
  if image.shape != label.shape:
    raise ValueError(f'overlays: image shape {image.shape} != label shape {label.shape}')
  rows, cols = grid_shape(label.ndim, len(preds))
  spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * label.ndim
  if len(spacing) != label.ndim:
    raise ValueError(f'overlays: spacing {spacing} needs {label.ndim} values')
  maps = {'label': label}
  for name, pred in preds.items():
    pred = np.asarray(pred)
    maps[name] = pred if pred.shape == label.shape else upsample_nearest(pred, label.shape)
  top = (num_classes if num_classes is not None
         else max(int(m.max(initial=0)) for m in maps.values()) + 1)
  cmap = mpl_colors.ListedColormap(['none'] + [_CLASS_COLOURS[i % len(_CLASS_COLOURS)]
                                               for i in range(max(top - 1, 1))])
  norm = mpl_colors.BoundaryNorm(np.arange(-0.5, max(top, 2) + 0.5), cmap.N)
  lo, hi = np.percentile(image, (0.5, 99.5)) if image.size else (0.0, 1.0)

  inch = PANEL_PX / _DPI
  fig = mpl_figure.Figure(figsize=(cols * inch, rows * inch), dpi=_DPI)
  backend_agg.FigureCanvasAgg(fig)
  fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0, hspace=0)
  axes = fig.subplots(rows, cols, squeeze=False)
  views = _views(label)
  for r, (view_name, index, aspect_axes) in enumerate(views):
    aspect = spacing[aspect_axes[0]] / spacing[aspect_axes[1]]
    for c, (name, labels) in enumerate(maps.items()):
      ax = axes[r, c]
      ax.imshow(image[index], cmap='gray', vmin=lo, vmax=hi, aspect=aspect,
                interpolation='nearest')
      ax.imshow(np.ma.masked_equal(labels[index], 0), cmap=cmap, norm=norm, alpha=_ALPHA,
                aspect=aspect, interpolation='nearest')
      ax.set_axis_off()
      text = name if r == 0 else ''
      if c == 0 and view_name:
        text = f'{text} ({view_name})' if text else view_name
      if text:
        ax.text(0.02, 0.98, text, transform=ax.transAxes, va='top', ha='left', fontsize=7,
                color='white', bbox={'facecolor': 'black', 'alpha': 0.6, 'pad': 1.5,
                                     'linewidth': 0})
  if title:
    fig.text(0.5, 0.0, title, ha='center', va='bottom', fontsize=7, color='white',
             bbox={'facecolor': 'black', 'alpha': 0.6, 'pad': 1.5, 'linewidth': 0})
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=_DPI, facecolor='black')
  return path


def _views(label: np.ndarray) -> list[tuple[str, tuple, tuple[int, int]]]:
  """(name, index into the volume, the (row, column) axes the slice shows) per row."""
  if label.ndim == 2:
    return [('', (slice(None), slice(None)), (0, 1))]
  centre = slice_centre(label)
  views = []
  for axis in range(3):
    index = [slice(None)] * 3
    index[axis] = centre[axis]
    shown = tuple(a for a in range(3) if a != axis)
    views.append((f'axis {axis} = {centre[axis]}', tuple(index), shown))
  return views
