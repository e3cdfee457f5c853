"""Workdir logs: torn last lines, malformed lines named by file and line, atomic rewrites."""
import json
import os

import numpy as np
import pytest

from unet_ds import logs
from unet_ds import workdir


def _write(path, rows, tail=''):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + tail)


def test_read_jsonl_drops_a_torn_last_line_with_a_warning(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  _write(path, [{'step': 1}, {'step': 2}], tail='{"step": 3, "loss": 1.0')  # the disk filled
  assert logs.read_jsonl(path) == [{'step': 1}, {'step': 2}]
  assert f'{path}:3: dropping a torn last line' in caplog.text


def test_read_jsonl_names_file_and_line_of_other_bad_lines(tmp_path):
  path = tmp_path / 'eval.jsonl'
  _write(path, [{'step': 1}], tail='{"step": 2, "lo\n{"step": 3}\n')
  with pytest.raises(logs.LogFileError, match=f'{path}:2: not valid JSON'):
    logs.read_jsonl(path)
  _write(path, [{'step': 1}], tail='{"step": 2, "lo\n')  # complete line (newline): not torn
  with pytest.raises(logs.LogFileError, match=f'{path}:2: not valid JSON'):
    logs.read_jsonl(path)
  _write(path, [{'step': 1}, [2], {'step': 3}])
  with pytest.raises(logs.LogFileError, match=f'{path}:2: expected a JSON object, got list'):
    logs.read_jsonl(path)
  _write(path, [{'step': 1}, {'loss': 2}])
  with pytest.raises(logs.LogFileError, match=f'{path}:2: missing key.s. step'):
    logs.read_jsonl(path, required=('step',))
  with pytest.raises(FileNotFoundError):
    logs.read_jsonl(tmp_path / 'none.jsonl')


def test_truncate_after_drops_later_steps_and_a_torn_line_by_rename(tmp_path, monkeypatch):
  writer = logs.Writer(str(tmp_path))
  for step in (1, 2, 3):
    writer.write_train({'step': step, 'loss': np.float32(step / 4), 'grad_norm': float('nan')})
  writer.write_eval({'step': 2, 'mean_foreground_dice': 0.5})
  with open(writer.path('metrics.jsonl'), 'a') as f:
    f.write('{"step": 4, "lo')  # killed mid-write
  metrics_before = open(writer.path('metrics.jsonl')).read().split('\n')
  inode = os.stat(writer.path('metrics.jsonl')).st_ino
  writer.truncate_after(2)
  assert open(writer.path('metrics.jsonl')).read().split('\n') == metrics_before[:2] + ['']
  assert logs.read_jsonl(writer.path('metrics.jsonl')) == [
      {'step': 1, 'loss': 0.25, 'grad_norm': None}, {'step': 2, 'loss': 0.5, 'grad_norm': None}]
  assert logs.read_jsonl(writer.path('eval.jsonl')) == [{'step': 2, 'mean_foreground_dice': 0.5}]
  assert os.stat(writer.path('metrics.jsonl')).st_ino != inode  # a new file, renamed into place

  def fail(path, data):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(workdir, 'atomic_write', fail)
  before = open(writer.path('metrics.jsonl')).read()
  with pytest.raises(OSError, match='No space left'):
    writer.truncate_after(1)
  assert open(writer.path('metrics.jsonl')).read() == before  # never rewritten in place
  writer.close()


def test_truncate_after_names_a_bad_middle_line(tmp_path):
  writer = logs.Writer(str(tmp_path))
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
  with pytest.raises(logs.LogFileError, match='metrics.jsonl:2: not valid JSON'):
    writer.truncate_after(3)
  writer.close()


def test_write_json_and_text_are_atomic(tmp_path, monkeypatch):
  writer = logs.Writer(str(tmp_path))
  writer.write_json('summary.json', {'dice': float('nan'), 'x': np.arange(2)})
  assert json.loads((tmp_path / 'summary.json').read_text()) == {'dice': None, 'x': [0, 1]}
  writer.write_text('config.json', '{"seed": 0}')
  assert (tmp_path / 'config.json').read_text() == '{"seed": 0}'
  calls = []
  real = workdir.atomic_write
  monkeypatch.setattr(workdir, 'atomic_write', lambda p, d: calls.append(p) or real(p, d))
  writer.write_json('summary.json', {'a': 1})
  writer.write_text('config.json', '{}')
  assert calls == [writer.path('summary.json'), writer.path('config.json')]
  writer.close()
