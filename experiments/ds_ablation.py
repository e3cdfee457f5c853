# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Does deep supervision help? A DS vs no-DS ablation
#
# Trains every point of an ablation sweep (by default `configs/ablation_synthetic.py`: DS form
# `none` / `deep` / `additive` / `hypercolumn` x 3 seeds on the synthetic 3D shapes) into one
# workdir per point under `ROOT`, then reads them back into the ablation report: mean ± std over
# seeds of the final Dice, steps to a target Dice, each DS head's own Dice and, for each DS form,
# the paired difference to the no-DS baseline with a 95% t interval.
#
# Finished points are skipped and interrupted ones resume, so re-running this notebook continues
# an ablation; `TRAIN = False` only reads what is under `ROOT`. The same from a shell:
# `python -m experiments.launch --config=configs/ablation_synthetic.py --root=runs/ds_ablation`
# then `python -m experiments.report runs/ds_ablation`.

# %% tags=["parameters"]
SMOKE = True  # Tiny runs (minutes on CPU) to check the notebook; False: the real ablation (hours).
CONFIG = 'configs/ablation_synthetic.py'  # Any config file with a get_sweep(arg).
CONFIG_ARG = ''  # Its argument; 'smoke' is added in SMOKE mode.
ROOT = ''  # Where the runs go; '' -> runs/ds_ablation (runs/ds_ablation_smoke in SMOKE mode).
TRAIN = True  # False: only report on the runs already under ROOT.
TARGET_DICE = 0.8
EXTRA = {}  # Extra overrides for every run, e.g. {'train.steps': 500}.

# %%
import os
import pathlib
import sys

# Run from the checkout's root (Jupyter starts in experiments/), so that `configs/...` and the
# launched `python -m unet_ds.main` resolve as on the command line.
_here = pathlib.Path.cwd()
REPO = _here if (_here / 'experiments').is_dir() else _here.parent
os.chdir(REPO)
sys.path.insert(0, str(REPO))

from experiments import launch  # noqa: E402
from experiments import plots  # noqa: E402
from experiments import report  # noqa: E402

# %%
arg = ','.join(a for a in (CONFIG_ARG, 'smoke' if SMOKE else '') if a)
config_arg = f'{CONFIG}:{arg}' if arg else CONFIG
root = pathlib.Path(ROOT or ('runs/ds_ablation_smoke' if SMOKE else 'runs/ds_ablation'))
extra = [(key, launch.cli_value(value)) for key, value in EXTRA.items()]
jobs = launch.plan(config_arg, root, extra)
for job in jobs:
  print(job.command())

# %%
if TRAIN:
  status = launch.run(jobs)
  print(status)

# %% [markdown]
# ## The report
# Written to `ROOT/report.md`, `ROOT/report.csv` (one row per variant), `ROOT/runs.csv` and the
# PNGs below.

# %%
ablation = report.build(root, target_dice=TARGET_DICE)
paths = report.write(ablation)
ablation

# %%
plots.Png(paths['dice_vs_step.png'])

# %%
plots.Png(paths['level_losses.png'])
