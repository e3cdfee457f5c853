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
# # Which deep-supervision weights? A sweep over DS loss weights and schedules
#
# `configs/ablation_synthetic.py:weights` sweeps the `deep` DS form over the per-level loss
# weights (`exp`: 1/2^i normalised, `nnunet`: the same with the lowest level at 0, `same`) and
# their schedule over training (`constant`, or side weights decaying `linear`ly to 0), with the
# no-DS baseline beside them, several seeds each. This notebook runs the sweep (skipping finished
# runs) and shows the report, the weights each run actually used and the per-level losses.

# %% tags=["parameters"]
SMOKE = True  # Tiny runs (minutes on CPU) to check the notebook; False: the real sweep (hours).
CONFIG = 'configs/ablation_synthetic.py'
CONFIG_ARG = 'weights'  # 'smoke' is added in SMOKE mode.
ROOT = ''  # '' -> runs/weight_sweep (runs/weight_sweep_smoke in SMOKE mode).
TRAIN = True  # False: only report on the runs already under ROOT.
TARGET_DICE = 0.8
EXTRA = {}  # Extra overrides for every run, e.g. {'train.steps': 500}.

# %%
import pathlib
import sys

# Jupyter starts in experiments/: the checkout's root holds the packages (this checkout's, not
# another one a shared venv may have installed), and the runs are launched from there, as on the
# command line.
_cwd = pathlib.Path.cwd()
sys.path.insert(0, str(_cwd if (_cwd / 'experiments').is_dir() else _cwd.parent))
from experiments import launch  # noqa: E402
from experiments import notebook_utils  # noqa: E402
from experiments import plots  # noqa: E402
from experiments import report  # noqa: E402

REPO = notebook_utils.enter_repo()

# %%
jobs, root = notebook_utils.sweep_jobs(CONFIG, CONFIG_ARG, smoke=SMOKE, root=ROOT,
                                       default_root='runs/weight_sweep', extra=EXTRA)
for job in jobs:
  print(job.name, job.overrides)

# %%
if TRAIN:
  status = launch.run(jobs)
  print(status)

# %% [markdown]
# ## The report

# %%
sweep_report = report.build(root, target_dice=TARGET_DICE)
paths = report.write(sweep_report)
sweep_report

# %% [markdown]
# ## The weights each variant used
# First and last logged `ds_weights` (`[final, head_1, ...]`) from `metrics.jsonl`: a decaying
# schedule shows side weights going to 0.

# %%
for variant in sweep_report.variants:
  run = variant.runs[0]
  first, last = run.metrics[0], run.metrics[-1]
  print(f'{variant.label}\n  step {first["step"]}: {first.get("ds_weights")}'
        f'\n  step {last["step"]}: {last.get("ds_weights")}')

# %%
plots.Png(paths['dice_vs_step.png'])

# %%
plots.Png(paths['level_losses.png'])
