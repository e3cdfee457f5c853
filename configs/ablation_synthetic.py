"""DS ablation on the synthetic 3D volumes: `none` / `deep` / `additive` / `hypercolumn` x 3 seeds.

The runs are `configs/default.py` (3D U-Net, 32^3 synthetic shapes, 300 steps) with a finer eval
interval; only the DS form and the seed change between them.

  python -m experiments.launch --config=configs/ablation_synthetic.py --root=runs/ds_ablation
  python -m experiments.report runs/ds_ablation

Args (comma-separated): `weights` (the DS weight sweep instead), `seeds=N`, `forms=A+B`, `steps=N`,
`side` (see `experiments.ablation`), and those of default.py (e.g. `smoke`).
"""

from configs import default
from experiments import ablation


def get_config(arg=None):
  _, _, rest = ablation.split_arg(arg)
  return ablation.configure(default.get_config(rest), arg)


def get_sweep(arg=None):
  return ablation.sweep_points(arg)
