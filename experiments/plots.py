"""The ablation report's PNG figures (matplotlib's object API with the Agg canvas: no pyplot
state, no display needed)."""

from __future__ import annotations

import base64
import dataclasses
import math
import pathlib
from typing import Mapping, Sequence

from matplotlib import figure as mpl_figure
from matplotlib.backends import backend_agg
import numpy as np

from experiments import runs as runs_lib
from experiments import stats


@dataclasses.dataclass(frozen=True)
class Png:
  """A PNG file that notebooks display inline (the last expression of a cell)."""
  path: pathlib.Path

  def _repr_png_(self) -> bytes:
    return pathlib.Path(self.path).read_bytes()


@dataclasses.dataclass(frozen=True)
class Pngs:
  """Several PNG files that notebooks display one under the other (e.g. a report's overlays)."""
  paths: Sequence[pathlib.Path]

  def _repr_html_(self) -> str:
    return ''.join(
        f'<p>{pathlib.Path(p).stem}</p><img src="data:image/png;base64,'
        f'{base64.b64encode(pathlib.Path(p).read_bytes()).decode()}"/>' for p in self.paths)


def dice_vs_step(variants: Mapping[str, Sequence[runs_lib.Run]], path: pathlib.Path,
                 target: float | None = None) -> pathlib.Path:
  """Validation mean foreground Dice vs step per variant: mean over seeds, ± std band."""
  fig = mpl_figure.Figure(figsize=(7, 4.5), layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for label, runs in variants.items():
    curves = [run.eval_curve() for run in runs]
    steps, mean, std = stats.mean_curve(curves)
    if not steps.size:
      continue
    (line,) = ax.plot(steps, mean, marker='.', label=f'{label} (n={len(runs)})')
    band = ~np.isnan(std)
    if band.any():
      ax.fill_between(steps[band], (mean - std)[band], (mean + std)[band],
                      color=line.get_color(), alpha=0.2, linewidth=0)
  if target is not None:
    ax.axhline(target, color='gray', linestyle=':', linewidth=1, label=f'target {target:g}')
  ax.set_xlabel('step')
  ax.set_ylabel('validation mean foreground Dice')
  ax.set_title('Validation Dice (mean ± std over seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  fig.savefig(path, dpi=100)
  return pathlib.Path(path)


def level_losses(variants: Mapping[str, Sequence[runs_lib.Run]],
                 path: pathlib.Path) -> pathlib.Path:
  """Training loss of each output level (final, head 1, ...) vs step, one panel per variant."""
  n = len(variants)
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig = mpl_figure.Figure(figsize=(4.5 * cols, 3.5 * rows), layout='constrained')
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
  for ax, (label, runs) in zip(axes.flat, variants.items()):
    num_levels = max((len(r['level_losses']) for run in runs for r in run.metrics), default=0)
    for level in range(num_levels):
      curves = [[(r['step'], r['level_losses'][level]) for r in run.metrics
                 if level < len(r['level_losses']) and r['level_losses'][level] is not None]
                for run in runs]
      steps, mean, _ = stats.mean_curve(curves)
      ax.plot(steps, mean, label='final' if level == 0 else f'head {level}')
    if num_levels > 1:
      steps, mean, _ = stats.mean_curve([[(r['step'], r['loss']) for r in run.metrics
                                          if r['loss'] is not None] for run in runs])
      ax.plot(steps, mean, color='black', linestyle='--', linewidth=1, label='weighted total')
    ax.set_title(label, fontsize='small')
    ax.set_xlabel('step')
    if all(min(line.get_ydata(), default=1) > 0 for line in ax.get_lines()):
      ax.set_yscale('log')  # Losses span decades; log only where every value allows it.
    ax.grid(alpha=0.3)
    if num_levels:
      ax.legend(fontsize='x-small')
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  for ax in axes[:, 0]:
    ax.set_ylabel('train loss per level (mean over seeds)')
  fig.savefig(path, dpi=100)
  return pathlib.Path(path)
