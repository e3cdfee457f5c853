"""Experiment tooling for unet_ds: sweeps, a local launcher, ablation reports, notebooks.

Modules:
  sweep:  building sweeps beside a config (`get_sweep(arg)`), point names, checking points.
  launch: `python -m experiments.launch`, runs or prints one `unet_ds.main` command per point.
  runs:   reading the workdirs that `unet_ds.main` writes.
  stats:  mean/std and paired differences with t intervals.
  report: `python -m experiments.report ROOT`, the ablation table, CSV and plots.
  plots:  the report's PNG figures.
"""
