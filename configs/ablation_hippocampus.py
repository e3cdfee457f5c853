"""DS ablation on an MSD-style task folder with hippocampus shapes (MSD Task04: 3 classes,
volumes ~36x51x36): `none` / `deep` / `additive` / `hypercolumn` x 3 seeds, the runs being
`configs/msd.py` (3D U-Net on 40x56x40 patches, 600 steps) with evals every 100 steps.

The task folder is required, as the `path=` arg:

  python -m experiments.launch \
      --config=configs/ablation_hippocampus.py:path=/data/Task04_Hippocampus --root=runs/hip_ablation
  python -m experiments.report runs/hip_ablation

Cross-validated (nnU-Net's 5 folds, one seed each: 20 runs):

  python -m experiments.launch --config=configs/ablation_hippocampus.py:path=DIR,folds=5,seeds=1 \
      --root=runs/hip_cv

The seed varies the initialisation and the patch order; the train/validation split stays fixed
(`data.seed`, or `fold=N`), so seeds pair across variants; with `folds=K` each (form, seed) runs
on every fold and the report pairs runs by (fold, seed). Args (comma-separated): `path=DIR`,
`weights`, `schedules=A+B`, `seeds=N`, `folds=K`, `forms=A+B`, `steps=N`, `side` (see `experiments.ablation`) and
those of msd.py (`fold=N`, `classes=K`, `channels=C`, `smoke`).
"""

from configs import msd
from experiments import ablation


def get_config(arg=None):
  _, _, rest = ablation.split_arg(arg)
  return ablation.configure(msd.get_config(rest), arg)


def get_sweep(arg=None):
  if not get_config(arg).data.path:
    raise ValueError('configs/ablation_hippocampus.py needs the task folder: '
                     '--config=configs/ablation_hippocampus.py:path=DIR')
  return ablation.sweep_points(arg)
