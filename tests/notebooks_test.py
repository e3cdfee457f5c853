"""The experiment notebooks: paired .py/.ipynb in sync with outputs stripped, and both run in
smoke mode (tiny real training runs through `experiments.launch`, then the report)."""

import asyncio
import json
import os
import pathlib

import jupytext
import nbclient
import nbformat
import pytest

from tests import xla_env

_REPO = pathlib.Path(__file__).resolve().parents[1]
_NOTEBOOKS = ('ds_ablation', 'weight_sweep')


def _code(nb):
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize('name', _NOTEBOOKS)
def test_pair_in_sync_and_stripped(name):
  py = jupytext.read(_REPO / 'experiments' / f'{name}.py', fmt='py:percent')
  ipynb = nbformat.read(_REPO / 'experiments' / f'{name}.ipynb', as_version=4)
  assert _code(py) == _code(ipynb), f'{name}.py and {name}.ipynb differ: run jupytext --sync'
  for cell in ipynb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, f'{name}.ipynb has outputs'
  params = [c for c in ipynb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(params) == 1 and 'SMOKE = True' in params[0].source
  # Only the project's own packages (and the standard library) are imported.
  imports = [line.split()[1] for c in py.cells if c.cell_type == 'code'
             for line in c.source.splitlines() if line.startswith(('import ', 'from '))]
  assert set(imports) <= {'os', 'pathlib', 'sys', 'experiments', 'unet_ds'}, imports


def _kernel_env(data_dir):
  """The kernel's (and its training subprocesses') environment: one CPU device (the test
  session's 4 simulated devices would not divide the smoke batch), the session's compilation
  cache (runs with one architecture compile once), and the notebook's own data dir."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_env.flags()
  env['JAX_PLATFORMS'] = 'cpu'
  env['UNET_DS_DATA_DIR'] = str(data_dir)
  env['MPLBACKEND'] = 'Agg'
  return env


def _client(name, **params):
  nb = jupytext.read(_REPO / 'experiments' / f'{name}.py', fmt='py:percent')
  index = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  # Injected after the parameters cell, as papermill does.
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      '\n'.join(f'{k} = {v!r}' for k, v in params.items()), metadata={'tags': ['injected']}))
  return nbclient.NotebookClient(
      nb, timeout=900, kernel_name='python3',
      resources={'metadata': {'path': str(_REPO / 'experiments')}})  # Jupyter's cwd.


@pytest.fixture(scope='module')
def executed(tmp_path_factory):
  """{name: (executed notebook, its ROOT)}: every notebook run in smoke mode, all at once (one
  kernel each, so the two CPU cores each train one notebook's runs)."""
  runs, envs = {}, {}
  for name in _NOTEBOOKS:
    root = tmp_path_factory.mktemp(name) / 'runs'
    envs[name] = _kernel_env(tmp_path_factory.mktemp(f'{name}_data'))
    runs[name] = (_client(name, SMOKE=True, ROOT=str(root)), root)

  async def execute_all():
    await asyncio.gather(*(client.async_execute(env=envs[name])
                           for name, (client, _) in runs.items()))
  asyncio.run(execute_all())
  return {name: (client.nb, root) for name, (client, root) in runs.items()}


def _outputs(nb, kind):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
          if kind in o.get('data', {})]


@pytest.mark.parametrize('name', _NOTEBOOKS)
def test_runs_in_smoke_mode(name, executed):
  nb, root = executed[name]
  markdown = [o['data']['text/markdown'] for o in _outputs(nb, 'text/markdown')]
  assert len(markdown) == 1 and '# Ablation report' in markdown[0]
  assert len(_outputs(nb, 'image/png')) == 2
  summaries = sorted(root.glob('*/summary.json'))
  assert len(summaries) >= 3
  for path in summaries:
    assert 0.0 <= json.loads(path.read_text())['mean_foreground_dice'] <= 1.0
  assert (root / 'report.md').read_text().startswith('# Ablation report')
  with open(root / 'report.csv') as f:
    assert sum(1 for _ in f) >= 3  # Header, baseline and at least one DS variant.
