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
#
# On real data, cross-validated: `CONFIG = 'configs/ablation_hippocampus.py'` with
# `CONFIG_ARG = 'path=/data/Task04_Hippocampus,folds=5,seeds=1'` (each form on each of 5 folds; the
# report pairs runs by (fold, seed) and adds a per-fold table), or `configs/ablation_isbi.py`. The
# report then also draws `OVERLAYS` held-out cases: the label, each form's prediction and each of
# its DS heads' own.

# %% tags=["parameters"]
SMOKE = True  # Tiny runs (minutes on CPU) to check the notebook; False: the real ablation (hours).
CONFIG = 'configs/ablation_synthetic.py'  # Any config file with a get_sweep(arg).
CONFIG_ARG = ''  # Its argument; 'smoke' is added in SMOKE mode.
ROOT = ''  # Where the runs go; '' -> runs/ds_ablation (runs/ds_ablation_smoke in SMOKE mode).
TRAIN = True  # False: only report on the runs already under ROOT.
TARGET_DICE = 0.8
EXTRA = {}  # Extra overrides for every run, e.g. {'train.steps': 500}.
OVERLAYS = 3  # Held-out cases drawn for real-data runs (synthetic runs have none).

# %%
import pathlib
import sys

# Jupyter starts in experiments/: the checkout's root holds the packages, and the runs are
# launched from there, as on the command line.
_cwd = pathlib.Path.cwd()
sys.path.insert(0, str(_cwd if (_cwd / 'experiments').is_dir() else _cwd.parent))
from experiments import launch  # noqa: E402
from experiments import notebook_utils  # noqa: E402
from experiments import plots  # noqa: E402
from experiments import report  # noqa: E402

REPO = notebook_utils.enter_repo()

# %%
jobs, root = notebook_utils.sweep_jobs(CONFIG, CONFIG_ARG, smoke=SMOKE, root=ROOT,
                                       default_root='runs/ds_ablation', extra=EXTRA)
for job in jobs:
  print(job.command())

# %%
if TRAIN:
  status = launch.run(jobs)
  print(status)

# %% [markdown]
# ## The report
# Written to `ROOT/report.md`, `ROOT/report.csv` (one row per variant), `ROOT/runs.csv`
# (`ROOT/folds.csv` when cross-validated) and the PNGs below.

# %%
ablation = report.build(root, target_dice=TARGET_DICE)
paths = report.write(ablation, overlays=OVERLAYS)
ablation

# %%
plots.Png(paths['dice_vs_step.png'])

# %%
plots.Png(paths['level_losses.png'])

# %% [markdown]
# ## Held-out cases (real data only)
# `ROOT/overlays/<case>.png`: the label, then each form's prediction and its DS heads' own.

# %%
plots.Pngs([path for name, path in paths.items() if name.startswith('overlays/')])
