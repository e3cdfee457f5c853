"""User journeys across modules, as a new user walks them: the command line's error paths end
with one `error:` line naming the flag, key, file or shape, before any data is built."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import xla_env
from unet_ds import evaluate
from unet_ds import predict
from unet_ds.data import cases
from unet_ds.data import io
from unet_ds.data import split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def env(tmp_path):
  """The user's environment: no simulated devices, a private (so checkable) data cache."""
  e = {**os.environ, 'XLA_FLAGS': xla_env.flags()}
  e['UNET_DS_DATA_DIR'] = str(tmp_path / 'tfds')
  return e


def _fail(args, env, timeout=300):
  """Runs `python -m unet_ds.main ARGS`, expects exit status 1; returns stderr's lines."""
  res = subprocess.run([sys.executable, '-m', 'unet_ds.main', *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert res.returncode == 1, (res.returncode, res.stderr[-3000:])
  return res.stderr.strip().splitlines()


@pytest.mark.parametrize('args, expected', [
    (['--config=configs/default.py', '--config.train.stepz=5'],
     ('--config.train.stepz', '"steps"')),
    (['--config.train.stepz=5'], ('--config.train.stepz', '"steps"')),  # default config
    (['--mode=eval', '--config.inference.tta=false'], ('--config.inference.tta',)),
    (['--mode=eval', '--config.model.depth=3'],
     ('--config.model.depth: --mode=eval uses the run', 'only --config.inference.* flags apply')),
    (['--config=configs/default.py:smok'], ('--config=configs/default.py:smok', "'smok'")),
    (['--config=configs/nope.py:smoke'], ('--config=configs/nope.py:smoke', 'not found')),
    (['--config=configs/default.py', '--mode=evaluate'], ('--mode', 'evaluate')),
    (['--config=configs/auto.py:path=/nonexistent/unet_ds'],
     ('--config=configs/auto.py:path=/nonexistent/unet_ds: /nonexistent/unet_ds: no such folder',)),
    (['--config=configs/auto.py'], ('config.data.path: set it to', 'configs/FILE.py:path=DIR')),
])
def test_command_line_mistakes_end_in_one_error_line(tmp_path, env, args, expected):
  lines = _fail([*args, f'--workdir={tmp_path / "run"}'], env)
  assert lines[-1].startswith('error: '), lines[-5:]
  assert all(e in lines[-1] for e in expected), lines[-1]
  assert not any('Traceback' in l for l in lines), lines  # no traceback without --traceback
  assert not (tmp_path / 'run').exists()


def test_the_error_line_is_its_own_line_after_a_progress_bar(env):
  code = ('import sys; from unet_ds import cli; sys.stderr.write("prepare:  50%|##   | 1/2"); '
          'cli.exit_with_error(ValueError("data/x.nii.gz: bad"))')
  res = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 1
  assert res.stderr.splitlines()[-1] == 'error: ValueError: data/x.nii.gz: bad'


def test_a_checkpoint_that_does_not_fit_ends_in_one_error_line(env):
  code = ('from unet_ds import checkpoint, cli; cli.exit_with_error(checkpoint.'
          'CheckpointMismatchError("checkpoint W/checkpoints/3 holds another model"))')
  res = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-2000:]
  assert res.stderr.splitlines()[-1] == (
      'error: CheckpointMismatchError: checkpoint W/checkpoints/3 holds another model')


def test_a_missing_workdir_ends_in_one_error_line(env):
  lines = _fail(['--config=configs/default.py'], env)
  assert lines[-1].startswith('error: ValueError: --workdir is required'), lines[-5:]
  assert len(lines) < 5, lines  # not absl's whole flag listing


def test_workdir_that_is_a_file_fails_before_the_data_is_built(tmp_path, env):
  afile = tmp_path / 'afile'
  afile.write_text('mine')
  lines = _fail(['--config=configs/default.py:smoke', f'--workdir={afile}'], env)
  assert lines[-1].startswith('error: ') and f'--workdir={afile}' in lines[-1], lines[-3:]
  assert 'not a folder' in lines[-1]
  assert afile.read_text() == 'mine' and not os.path.exists(env['UNET_DS_DATA_DIR'])


def _saved_run(workdir, data):
  """A workdir with only the run's config.json (enough for predict's up-front checks)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'data': data, 'inference': {}}, f)


def test_predict_with_another_tasks_workdir_names_the_mismatch(tmp_path):
  pngs = tmp_path / 'pngs'
  pngs.mkdir()
  (pngs / 'a.png').write_bytes(b'')
  _saved_run(tmp_path / 'hip', {'name': 'msd', 'patch_size': [8, 8, 8]})
  with pytest.raises(io.DataError, match=r'pngs: holds .png/.tif/.tiff images, but this run was '
                     r'trained on msd data and predicts .nii.gz/.nii'):
    predict.run(None, str(tmp_path / 'hip'), input_path=str(pngs), output=str(tmp_path / 'o'))
  _saved_run(tmp_path / 'syn', {'name': 'synthetic', 'patch_size': [8, 8, 8]})
  with pytest.raises(ValueError, match=r"syn: trained on config.data.name='synthetic', not on "
                     'files'):
    predict.run(None, str(tmp_path / 'syn'), input_path=str(pngs), output=str(tmp_path / 'o'))
  assert not (tmp_path / 'o').exists()


def test_split_errors_name_the_config_key():
  with pytest.raises(ValueError, match=r"config.data.val_cases \['27'\] are not among the 2"):
    split.split_cases(['25', '26'], val_cases='25,27')
  with pytest.raises(ValueError, match=r'config.data.fold=5: need 0 <= fold < data.num_folds=5'):
    split.split_cases(['25', '26'], num_folds=5, fold=5)


@pytest.mark.parametrize('kind, name', [('msd', 'case_1.nii.gz'), ('folder2d', '10.png')])
def test_output_folder_of_the_inputs_is_refused(tmp_path, kind, name):
  """`--output` = `--input` (predict) or = the labels folder (eval --output) would replace the
  user's files with predictions: refused before the model is restored."""
  images = tmp_path / 'images'
  images.mkdir()
  (images / name).write_bytes(b'original')
  _saved_run(tmp_path / 'run', {'name': kind, 'patch_size': [8] * (3 if kind == 'msd' else 2)})
  with pytest.raises(FileExistsError, match=rf'--output=.*images: the result .*{name} would '
                     'replace an input file'):
    predict.run(None, str(tmp_path / 'run'), input_path=str(images), output=str(images))
  assert (images / name).read_bytes() == b'original'
  labels = [str(tmp_path / 'labels' / name)]
  with pytest.raises(FileExistsError, match='would replace an input file'):
    predict.check_spares(kind, str(tmp_path / 'labels'), [str(images / name)],
                         [str(images / name), *labels])
  predict.check_spares(kind, str(tmp_path / 'out'), [str(images / name)], labels)  # no clash


@pytest.mark.parametrize('kind, images, labels, name', [
    ('msd', 'imagesTr', 'labelsTr', 'case_1.nii.gz'), ('msd', 'imagesTs', 'labelsTs', 'c.nii.gz'),
    ('folder2d', 'image', 'label', '10.png')])
def test_predict_into_the_datasets_labels_folder_is_refused(tmp_path, kind, images, labels, name):
  """`--input=TASK/imagesTr --output=TASK/labelsTr` used to replace the ground truth with
  predictions (same names); and `--output` = a task folder `--input` wrote into the dataset."""
  for sub in (images, labels):
    (tmp_path / 'task' / sub).mkdir(parents=True)
    (tmp_path / 'task' / sub / name).write_bytes(sub.encode())
  _saved_run(tmp_path / 'run', {'name': kind, 'patch_size': [8] * (3 if kind == 'msd' else 2)})
  run = lambda i, o: predict.run(None, str(tmp_path / 'run'), input_path=str(i), output=str(o))
  with pytest.raises(FileExistsError, match=rf'--output=.*{labels}: the result .*{labels}/{name} '
                     'would replace an input file'):
    run(tmp_path / 'task' / images, tmp_path / 'task' / labels)
  assert (tmp_path / 'task' / labels / name).read_bytes() == labels.encode()
  with pytest.raises(FileExistsError, match=r'--output=.*task: is the --input folder'):
    run(tmp_path / 'task', tmp_path / 'task')
  assert sorted(os.listdir(tmp_path / 'task')) == sorted([images, labels])


def test_predict_creates_no_output_folder_when_an_input_is_bad(tmp_path):
  (tmp_path / 'images').mkdir()
  (tmp_path / 'images' / 'a.nii.gz').write_bytes(b'not a nifti')
  _saved_run(tmp_path / 'run', {'name': 'msd', 'patch_size': [8, 8, 8], 'path': str(tmp_path),
                                'num_classes': 2})
  with pytest.raises(io.DataError, match=r'images/a.nii.gz: cannot read NIfTI'):
    predict.run(None, str(tmp_path / 'run'), input_path=str(tmp_path / 'images'),
                output=str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_eval_output_into_the_labels_folder_is_refused(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from configs import folder2d  # pylint: disable=g-import-not-at-top
  for sub in ('image', 'label'):
    (tmp_path / sub).mkdir()
    for name in ('a', 'b'):
      Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / sub / f'{name}.png')
  config = folder2d.get_config(f'path={tmp_path},smoke')
  before = (tmp_path / 'label' / 'a.png').read_bytes()
  with pytest.raises(FileExistsError, match=r'label/a.png would replace an input file'):
    evaluate.evaluate_run(config, str(tmp_path / 'run'), lambda x: 1 / 0, 1,
                          input_path=str(tmp_path), output=str(tmp_path / 'label'), cases='all',
                          write_predictions=True, log=lambda _: None)
  assert (tmp_path / 'label' / 'a.png').read_bytes() == before


def test_changed_config_on_resume_is_refused_before_the_data_is_built(tmp_path, data_dir,
                                                                       monkeypatch):
  from tests import smoke  # pylint: disable=g-import-not-at-top
  from unet_ds import train, workdir  # pylint: disable=g-import-not-at-top
  config = smoke.config(data_dir, 2)
  exp = train.Experiment.build(config, str(tmp_path))
  smoke.save_checkpoint(str(tmp_path), 1, exp.init_state(), config, max_to_keep=2)
  smoke.forbid_data(monkeypatch)
  changed = smoke.config(data_dir, 2)
  changed.data.patch_size = (16, 16)  # would prepare or read other data
  changed.model.base_filters = 8
  with pytest.raises(workdir.ConfigChangedError, match=r'data.patch_size.*model.base_filters|'
                     r'model.base_filters.*data.patch_size'):
    train.train_and_evaluate(changed, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']


def test_a_bad_value_on_resume_is_named_before_the_resume_check(tmp_path, data_dir,
                                                                monkeypatch):
  """Not 'resume refused ... allow loss.name', after which the value would fail anyway."""
  from tests import smoke  # pylint: disable=g-import-not-at-top
  from unet_ds import train  # pylint: disable=g-import-not-at-top
  config = smoke.config(data_dir, 2)
  exp = train.Experiment.build(config, str(tmp_path))
  smoke.save_checkpoint(str(tmp_path), 1, exp.init_state(), config)
  smoke.forbid_data(monkeypatch)
  config.loss.name = 'bogus'
  with pytest.raises(ValueError, match=r"^config.loss.name.*bogus"):
    train.train_and_evaluate(config, str(tmp_path))


def test_plan_of_a_missing_folder_ends_in_one_error_line(tmp_path, env):
  res = subprocess.run([sys.executable, '-m', 'unet_ds.plan', f'--input={tmp_path / "nope"}'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 1 and lines[-1].startswith('error: DataError: '), lines[-3:]
  assert lines[-1].endswith(f'{tmp_path / "nope"}: no such folder')
  assert not any('Traceback' in l for l in lines)


def test_eval_on_a_moved_copy_of_the_runs_data_scores_its_held_out_cases(tmp_path):
  """Data moved after training (cluster scratch, a new disk): `--input=NEW` holding the run's
  cases scores the held-out cases, as on the old path, not every case (training ones too)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from configs import folder2d  # pylint: disable=g-import-not-at-top
  moved = tmp_path / 'moved'
  for sub in ('image', 'label'):
    (moved / sub).mkdir(parents=True)
    for name in ('a', 'b', 'c', 'd'):
      Image.fromarray(np.zeros((16, 16), np.uint8)).save(moved / sub / f'{name}.png')
  config = folder2d.get_config(f'path={tmp_path / "gone"},smoke')
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'split.json').write_text(json.dumps({'train': ['a', 'b', 'c'], 'validation': ['d']}))
  logits = lambda x: np.zeros((*x.shape[:-1], 2), np.float32)  # noqa: E731
  kw = dict(output=str(tmp_path / 'ev'), log=lambda _: None)
  with pytest.raises(FileNotFoundError, match=r"data.path=.*gone is gone; pass --input=DIR"):
    evaluate.evaluate_run(config, str(run), logits, 1, **kw)
  s = evaluate.evaluate_run(config, str(run), logits, 1, input_path=str(moved), **kw)
  assert s['cases_selected'] == 'validation' and [c['case_id'] for c in s['cases']] == ['d']
  s = evaluate.evaluate_run(config, str(run), logits, 1, input_path=str(moved), cases='all', **kw)
  assert s['num_cases'] == 4
  # Without --output: the moved data's held-out scores are the run's own (WORKDIR/eval), but a
  # copy scored while the original is still in place goes beside them, not over them.
  s = evaluate.evaluate_run(config, str(run), logits, 1, input_path=str(moved), log=print)
  assert s['output'] == str(run / 'eval')
  (tmp_path / 'gone').mkdir()
  s = evaluate.evaluate_run(config, str(run), logits, 1, input_path=str(moved), log=print)
  assert s['output'] == str(run / 'eval_moved_validation') and s['num_cases'] == 1
  (tmp_path / 'gone').rmdir()
  (moved / 'image' / 'a.png').unlink()  # another folder: not the run's cases, all of them
  (moved / 'label' / 'a.png').unlink()
  s = evaluate.evaluate_run(config, str(run), logits, 1, input_path=str(moved), **kw)
  assert s['cases_selected'] == 'all' and s['num_cases'] == 3


def test_eval_or_predict_on_a_multirun_parent_names_its_members(tmp_path):
  (tmp_path / 'multirun.json').write_text(json.dumps({'runs': ['seed=0', 'seed=1']}))
  with pytest.raises(FileNotFoundError, match=r"a multi-run workdir \(multirun.json\); give one "
                     r"run's folder: .*seed=0, .*seed=1"):
    predict.run_config(None, str(tmp_path))


def test_ctrl_c_during_the_final_eval_stops_it_with_the_checkpoint_kept(tmp_path, data_dir,
                                                                          monkeypatch):
  """The last checkpoint is saved before the whole-image eval; Ctrl-C (or a SIGTERM) there must
  stop the run at once, saying how to score it, not be swallowed until the eval ends."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from tests import smoke  # pylint: disable=g-import-not-at-top
  from unet_ds import loop, train  # pylint: disable=g-import-not-at-top

  def slow_eval(self, state, step):
    del self, state, step
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(100):
      time.sleep(0.05)
    return [{'reached': 'only when the signal was swallowed'}]
  monkeypatch.setattr(train.Experiment, 'final_eval', slow_eval)
  with pytest.raises(loop.Interrupted, match=r'SIGINT: .*step 2 .*saved.*--mode=eval'):
    train.train_and_evaluate(smoke.config(data_dir, 2, steps=2), str(tmp_path))
  assert '2' in os.listdir(tmp_path / 'checkpoints')
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_eval_of_another_folder_keeps_the_runs_own_eval_files(tmp_path):
  """`--mode=eval --input=OTHER` without `--output` must not replace WORKDIR/eval/metrics.json
  (the run's held-out evaluation, which reports read) with another folder's numbers."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from configs import folder2d  # pylint: disable=g-import-not-at-top
  for folder, names in (('data', 'abcd'), ('other', 'xy')):
    for sub in ('image', 'label'):
      (tmp_path / folder / sub).mkdir(parents=True)
      for name in names:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / folder / sub / f'{name}.png')
  config = folder2d.get_config(f'path={tmp_path / "data"},smoke')
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'split.json').write_text(json.dumps({'train': ['a', 'b', 'c'], 'validation': ['d']}))
  logits = lambda x: np.zeros((*x.shape[:-1], 2), np.float32)  # noqa: E731
  own = evaluate.evaluate_run(config, str(run), logits, 1, log=lambda _: None)
  assert own['output'] == str(run / 'eval') and own['num_cases'] == 1
  other = evaluate.evaluate_run(config, str(run), logits, 1, input_path=str(tmp_path / 'other'),
                                log=lambda _: None)
  assert other['output'] == str(run / 'eval_other_all') and other['num_cases'] == 2
  train = evaluate.evaluate_run(config, str(run), logits, 1, cases='train', log=lambda _: None)
  assert train['output'] == str(run / 'eval_data_train') and train['num_cases'] == 3
  saved = json.loads((run / 'eval' / 'metrics.json').read_text())
  assert [c['case_id'] for c in saved['cases']] == ['d']
  assert saved['inference'] == json.loads(json.dumps(config.inference.to_dict()))
  # Each list of ids has its own folder; so has an evaluation with other inference settings.
  ids = evaluate.evaluate_run(config, str(run), logits, 1, cases='b,c', log=lambda _: None)
  assert ids['output'] == str(run / 'eval_data_cases_b_c')
  from unet_ds import config_lib  # pylint: disable=g-import-not-at-top
  (run / 'config.json').write_text(config_lib.to_json(config))
  flips = predict.run_config(None, str(run))
  flips.inference.batch_size = 7  # how, not what, it predicts: no folder of its own
  assert evaluate.changed_inference(flips, str(run)) == ''
  flips.inference.tta_axes = (1, 0)
  tag = evaluate.changed_inference(flips, str(run))
  assert tag == 'tta_axes=0x1'  # any order: the same flips
  other = evaluate.evaluate_run(flips, str(run), logits, 1, tag=tag, log=lambda _: None)
  assert other['output'] == str(run / 'eval_tta_axes=0x1')
  assert json.loads((run / 'eval' / 'metrics.json').read_text()) == saved


def test_ctrl_c_outside_the_training_loop_ends_in_one_line(tmp_path, env):
  """Ctrl-C while data is prepared, a model compiles, or predict / eval runs: status 130 and
  one line, not a KeyboardInterrupt traceback."""
  code = ('import sys\nfrom unet_ds import main\n'
          'def stop(*_):\n  raise KeyboardInterrupt\n'
          f'main._run = stop\nsys.argv = ["main", "--workdir={tmp_path}"]\nmain.run_cli()\n')
  res = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 130, res.stderr[-2000:]
  assert lines[-1].startswith('interrupted: SIGINT') and 'run the same command again' in lines[-1]
  assert not any('Traceback' in l for l in lines)


def test_eval_and_predict_keep_the_runs_inference_settings(tmp_path, env):
  """A run's config.json holds its inference settings (auto plans and tgs_salt: flip TTA);
  `--mode=eval|predict` without `--config` must use them, with only the `--config.inference.*`
  flags given on the command line changed (the default --config's group used to replace them)."""
  _saved_run(tmp_path, {'name': 'msd', 'patch_size': [8, 8, 8]})
  saved = json.loads((tmp_path / 'config.json').read_text())
  saved['inference'] = {'overlap': 0.5, 'tta_axes': [0, 1, 2], 'batch_size': 2}
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  code = ('import json, sys\nfrom unet_ds import main, predict\n'
          'main._parse_flags(sys.argv)\n'
          'cfg = predict.run_config(main.cli_config(main._MODE.value, main._CONFIG.value), '
          'main._WORKDIR.value)\nprint(json.dumps(cfg.inference.to_dict()))\n')
  for flags_given, expected in (
      ([], {'overlap': 0.5, 'tta_axes': [0, 1, 2], 'batch_size': 2}),
      (['--config.inference.overlap=0.25'], {'overlap': 0.25, 'tta_axes': [0, 1, 2],
                                             'batch_size': 2})):
    res = subprocess.run([sys.executable, '-c', code, f'--workdir={tmp_path}', '--mode=eval',
                          *flags_given], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected


def test_eval_of_a_folder_of_images_alone_points_to_predict(tmp_path):
  (tmp_path / 'case_1.nii.gz').write_bytes(b'')
  with pytest.raises(io.DataError, match=r'holds images without labels; eval needs imagesTr/ \+ '
                     r'labelsTr/ \(--mode=predict for images alone\)'):
    cases.find_labelled(str(tmp_path), {'name': 'msd', 'path': str(tmp_path), 'num_classes': 2})


def test_eval_of_another_tasks_folder_names_the_layout_it_needs(tmp_path):
  """A 2D image/ + label/ folder given to an MSD run's eval used to end in 'DIR/imagesTr: folder
  not found', which did not say that the folder is of another kind."""
  for sub in ('image', 'label'):
    (tmp_path / sub).mkdir()
  with pytest.raises(io.DataError, match=r"no imagesTr/ folder \(it holds \['image', 'label'\]\); "
                     'this run was trained on msd data, and eval needs imagesTr/ \\+ labelsTr/'):
    cases.find_labelled(str(tmp_path), {'name': 'msd', 'path': str(tmp_path), 'num_classes': 2})


def test_a_bad_config_argument_value_names_the_argument():
  from configs import msd  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"config argument fold='abc': invalid literal for int"):
    msd.get_config('path=/data,fold=abc')


def test_eval_without_config_warns_of_no_config_difference(tmp_path, env):
  """`--mode=eval|predict` with no `--config` used to warn "--config.model differs from the
  run's" about configs/default.py, a file the user never named; a `--config` they give still
  gets the warning when it differs."""
  _saved_run(tmp_path, {'name': 'synthetic', 'patch_size': [8, 8, 8]})
  saved = json.loads((tmp_path / 'config.json').read_text())
  saved['model'] = {'base_filters': 3}
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  code = ('import sys\nfrom unet_ds import main, predict\nmain._parse_flags(sys.argv)\n'
          'predict.run_config(main.cli_config(main._MODE.value, main._CONFIG.value), '
          'main._WORKDIR.value)\n')
  for flags_given, warned in (([], False), (['--config.inference.overlap=0.25'], False),
                              (['--config=configs/default.py'], True)):
    res = subprocess.run([sys.executable, '-c', code, f'--workdir={tmp_path}', '--mode=eval',
                          *flags_given], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ('--config.model differs' in res.stderr) == warned, (flags_given, res.stderr)


def test_a_synthetic_run_refuses_other_cases_before_restoring(tmp_path):
  """--cases / --input name what a synthetic run cannot score, before any checkpoint is read."""
  from unet_ds import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.apply_args(config_lib.base_config(2), 'smoke')
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text(config_lib.to_json(config))  # no checkpoint at all
  with pytest.raises(ValueError, match=r'--cases=train: a synthetic-data run is evaluated on its '
                     'own validation volumes'):
    evaluate.run(config, str(run), cases='train')
  with pytest.raises(ValueError, match='--input: a synthetic-data run'):
    evaluate.run(config, str(run), input_path=str(tmp_path))
