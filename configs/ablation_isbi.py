"""DS ablation on the ISBI 2012 EM membranes (30 slices of 512x512): `none` / `deep` / `additive` /
`hypercolumn` x 3 seeds, the runs being `configs/folder2d.py` with its `isbi` settings (2D U-Net on
256x256 patches, 800 steps, whole-slice eval).

The folder holding image/ and label/ is required, as the `path=` arg:

  python -m experiments.launch \
      --config=configs/ablation_isbi.py:path=/data/isbi/train,folds=5,seeds=1 --root=runs/isbi_cv
  python -m experiments.report runs/isbi_cv

Without `folds`, every run holds out slices 25-29. With `folds=K`, fold k holds out the k-th block
of consecutive slices (5 folds of 6 slices for ISBI): adjacent sections are near-copies, so a
random fold would validate on neighbours of training slices. Args (comma-separated): `path=DIR`,
`weights`, `schedules=A+B`, `seeds=N`, `folds=K`, `forms=A+B`, `steps=N`, `side` (see `experiments.ablation`) and
those of folder2d.py (`classes=K`, `channels=C`, `smoke`).
"""

from configs import folder2d
from experiments import ablation
from unet_ds.data import folder2d as folder2d_data


def get_config(arg=None):
  _, _, rest = ablation.split_arg(arg)
  return ablation.configure(folder2d.get_config(','.join(filter(None, ('isbi', rest)))), arg)


def get_sweep(arg=None):
  c = get_config(arg)
  if not c.data.path:
    raise ValueError('configs/ablation_isbi.py needs the folder holding image/ and label/: '
                     '--config=configs/ablation_isbi.py:path=DIR')
  cases = [case[0] for case in folder2d_data.find_cases(c.data.path, c.data.image_dir,
                                                         c.data.label_dir)]
  return ablation.sweep_points(arg, folds=lambda k: ablation.block_fold_axis(cases, k))
