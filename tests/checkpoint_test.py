"""Checkpoints: exact round trip, checksums, fallback past damaged checkpoints, clear errors."""
import json
import os
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_ds import checkpoint


def _state(scale):
  return {'w': jnp.arange(1000, dtype=jnp.float32).reshape(10, 100) * scale,
          'step': jnp.int32(scale), 'rng': jax.random.PRNGKey(scale)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.fixture
def saved(tmp_path):
  """Checkpoints of steps 1 and 2 in tmp_path/ckpt (closed)."""
  ckpts = checkpoint.Checkpoints(str(tmp_path / 'ckpt'), max_to_keep=3)
  for step in (1, 2):
    ckpts.save(step, _state(step), b'{"pos": %d}' % step, json.dumps({'seed': step}))
  ckpts.wait()
  ckpts.close()
  return tmp_path / 'ckpt'


def _data_file(folder, step):
  """The largest array data file of a checkpoint (where the leaf `w` lives)."""
  files = [p for p in (folder / str(step) / 'state').rglob('d/*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _flip_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _restore(folder, **kw):
  ckpts = checkpoint.Checkpoints(str(folder), max_to_keep=3)
  try:
    return ckpts.restore(_abstract(_state(1)), **kw), ckpts
  finally:
    ckpts.close()


def _assert_state(state, scale):
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(_state(scale))):
    np.testing.assert_array_equal(a, b)


def test_round_trip_of_latest_and_of_a_step(saved):
  (state, data_state, step), ckpts = _restore(saved)
  assert step == 2 and data_state == b'{"pos": 2}' and ckpts.unreadable == {}
  _assert_state(state, 2)
  (state, data_state, step), _ = _restore(saved, step=1)
  assert step == 1 and data_state == b'{"pos": 1}'
  _assert_state(state, 1)
  ckpts = checkpoint.Checkpoints(str(saved))
  assert ckpts.steps() == [1, 2]
  assert ckpts.saved_config() == {'seed': 2} and ckpts.saved_config(1) == {'seed': 1}
  ckpts.close()


def test_truncated_latest_falls_back_with_one_line(saved, caplog):
  data_file = _data_file(saved, 2)
  os.truncate(data_file, 100)
  (state, data_state, step), ckpts = _restore(saved)
  assert step == 1 and data_state == b'{"pos": 1}'
  _assert_state(state, 1)
  assert list(ckpts.unreadable) == [2]
  (line,) = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert line.startswith(f'checkpoint {saved}/2 is unreadable (ValueError: OUT_OF_RANGE')
  assert line.endswith('; using the previous readable one, step 1')


def test_a_flipped_bit_fails_the_checksum(saved, caplog):
  _flip_byte(_data_file(saved, 2))
  (state, _, step), ckpts = _restore(saved)
  assert step == 1
  _assert_state(state, 1)
  assert ckpts.unreadable == {2: 'ValueError: checksum mismatch in w'}
  assert f'checkpoint {saved}/2 is unreadable (ValueError: checksum mismatch in w)' in caplog.text


def test_every_checkpoint_damaged_names_the_folder(saved):
  _flip_byte(_data_file(saved, 2))
  (saved / '1' / 'data' / 'metadata').write_text('{"iterat')
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf'no readable checkpoint in {saved}: step 2: ValueError: checksum '
                     r'mismatch in w; step 1: JSONDecodeError'):
    _restore(saved)
  with pytest.raises(checkpoint.CheckpointError, match=f'no readable checkpoint in {saved}: step 2'):
    _restore(saved, step=2)  # an explicit step does not fall back


def test_empty_folder_and_a_config_that_does_not_read(tmp_path, saved):
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    _restore(tmp_path / 'empty')
  (saved / '2' / 'config' / 'metadata').write_text('{')
  ckpts = checkpoint.Checkpoints(str(saved))
  assert ckpts.saved_config() == {'seed': 1}
  with pytest.raises(checkpoint.CheckpointError, match=f'no readable config in {saved}: step 2'):
    ckpts.saved_config(2)
  ckpts.close()


def test_another_model_is_a_mismatch_not_a_fallback(saved):
  ckpts = checkpoint.Checkpoints(str(saved))
  other = {**_abstract(_state(1)), 'w': jax.ShapeDtypeStruct((10, 50), jnp.float32),
           'b': jax.ShapeDtypeStruct((3,), jnp.float32)}
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=rf'checkpoint {saved}/2 holds another model or optimiser state: b missing '
                     r'in the checkpoint; w is float32\(10, 100\) in the checkpoint, '
                     r'float32\(10, 50\) here'):
    ckpts.restore(other)
  ckpts.close()


def test_set_aside_clears_the_way_for_the_resumed_run(saved):
  _flip_byte(_data_file(saved, 2))
  (_, _, step), _ = _restore(saved)
  ckpts = checkpoint.Checkpoints(str(saved), max_to_keep=3)
  assert ckpts.set_aside_after(step) == [f'{saved}-unreadable/2']
  assert ckpts.steps() == [1]
  assert (pathlib.Path(f'{saved}-unreadable') / '2' / 'state').is_dir()  # kept for a look
  ckpts.save(2, _state(5), None, '{}')  # the resumed run saves step 2 again
  ckpts.wait()
  state, data_state, step = ckpts.restore(_abstract(_state(1)))
  assert step == 2 and data_state is None
  _assert_state(state, 5)
  ckpts.close()


def test_checkpoints_without_a_checksum_still_restore(saved):
  for step in (1, 2):  # as written before the checksum item existed
    for path in sorted((saved / str(step) / 'checksum').rglob('*'), reverse=True):
      path.rmdir() if path.is_dir() else path.unlink()
    (saved / str(step) / 'checksum').rmdir()
  (state, _, step), _ = _restore(saved)
  assert step == 2
  _assert_state(state, 2)


def test_leaf_digests_see_one_bit_and_name_leaves():
  state = {'a': np.zeros(4, np.float32), 'k': jax.random.key(0), 'n': [jnp.ones(2, jnp.bfloat16)]}
  digests = checkpoint.leaf_digests(state)
  assert sorted(digests) == ['a', 'k', 'n.0']
  flipped = np.zeros(4, np.float32)
  flipped.view(np.uint8)[5] = 1
  assert checkpoint.leaf_digests({**state, 'a': flipped})['a'] != digests['a']
  assert checkpoint.leaf_digests({**state, 'a': np.zeros((2, 2), np.float32)})['a'] != digests['a']
  assert checkpoint.leaf_digests(state) == digests


def test_failed_restore_noise_is_dropped_and_the_rest_passes(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  checkpoint._drop_failed_restore_noise()
  checkpoint._drop_failed_restore_noise()  # installed once

  async def pending():
    pass

  coroutine = pending()
  noise = [types.SimpleNamespace(exc_value=RuntimeError('Event loop is closed'), object=None),
           types.SimpleNamespace(exc_value=ImportError('sys.meta_path is None, Python is likely '
                                                       'shutting down'), object=coroutine),
           types.SimpleNamespace(exc_value=Exception('Encountered error while reading array '
                                                     'index: (slice(0, 2, 1),)'), object=None)]
  real = [types.SimpleNamespace(exc_value=RuntimeError('boom'), object=None),
          types.SimpleNamespace(exc_value=ImportError('no module x'), object=coroutine)]
  for u in noise + real:
    sys.unraisablehook(u)
  assert seen == real
  coroutine.close()
