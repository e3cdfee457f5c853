"""The README's commands as a new user runs them (smoke-sized), in fresh processes on one CPU
device: the lane where `conv_impl=auto` resolves to oneDNN, as on every single-device machine."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """The user's environment: no simulated devices (conftest's), a private data cache."""
  e = {**os.environ, 'XLA_FLAGS': xla_env.flags()}
  e['UNET_DS_DATA_DIR'] = str(tmp_path_factory.mktemp('readme_tfds'))
  return e


def _run(args, env, timeout=600):
  res = subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def _json_line(res):
  return json.loads(res.stdout.strip().splitlines()[-1])


def test_readme_commands_are_the_tested_ones():
  """Each `python -m` module the README runs is one this file (or its named test) runs."""
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  modules = set(re.findall(r'python -m ([\w.]+)', readme))
  assert modules == {'unet_ds.main', 'unet_ds.plan', 'unet_ds.bench', 'experiments.launch',
                     'experiments.report', 'pytest'}, modules
  # unet_ds.plan: tests/plan_test.py; unet_ds.bench: tests/bench_test.py;
  # --executor=slurm: tests/submitit_test.py; --until: tests/until_test.py.


def test_quickstart_then_eval_with_overlays_on_onednn(tmp_path, env):
  workdir = tmp_path / 'default'
  line = _json_line(_run(['unet_ds.main', '--config=configs/default.py:smoke',
                          f'--workdir={workdir}'], env))
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['conv_impl'] == 'onednn' and summary['devices'] == 1
  assert line['mean_foreground_dice'] == summary['mean_foreground_dice']
  ev = _json_line(_run(['unet_ds.main', f'--workdir={workdir}', '--mode=eval',
                        '--overlays=1'], env))
  assert ev['mean_foreground_dice'] == pytest.approx(summary['mean_foreground_dice'])
  assert ev['overlays'] == 1 and (workdir / 'eval' / 'overlays' / 'val_0000.png').exists()


def test_binary_bce_dice_command_trains(tmp_path, env):
  workdir = tmp_path / 'binary'
  line = _json_line(_run(['unet_ds.main', '--config=configs/unet2d.py:smoke,ds=hypercolumn',
                          '--config.loss.name=bce_dice', '--config.model.num_classes=1',
                          f'--workdir={workdir}'], env))
  assert 0.0 <= line['mean_foreground_dice'] <= 1.0 and len(line['dice_per_class']) == 2


def test_sweep_print_and_report(tmp_path, env):
  root = tmp_path / 'ablation'
  res = _run(['experiments.launch', '--config=configs/ablation_synthetic.py:smoke',
              f'--root={root}', '--print'], env)
  commands = [l for l in res.stdout.splitlines() if 'unet_ds.main' in l]
  assert len(commands) >= 4 and all('--workdir=' in c for c in commands)
