"""Tests for unet_ds.data.pipeline: shuffling, determinism, resumable state, sharding, exact eval."""

import grain.python as grain
import numpy as np
import pytest

from unet_ds.data import pipeline
from unet_ds.data import synthetic


class _IndexedSource:
  """Example i has image filled with i and label filled with i % 3, so batches reveal their indices."""

  def __init__(self, n: int):
    self._n = n

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    return {'image': np.full((4, 4, 1), i, np.float32), 'label': np.full((4, 4), i % 3, np.int32)}

  def __repr__(self):
    return f'_IndexedSource({self._n})'


class _AddNoise(grain.RandomMapTransform):
  """Random per-example transform: the output depends on grain's per-record rng."""

  def random_map(self, example, rng):
    return {**example, 'noise': rng.normal(size=3).astype(np.float32)}


class _Double(grain.MapTransform):

  def map(self, example):
    return {**example, 'image': example['image'] * 2}


def _ids(batch):
  return [int(x) for x in batch['image'][:, 0, 0, 0]]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_shapes_and_epochs():
  loader = pipeline.make_train_loader(_IndexedSource(12), batch_size=4, seed=0)
  batches = _take(iter(loader), 6)
  assert batches[0]['image'].shape == (4, 4, 4, 1) and batches[0]['image'].dtype == np.float32
  assert batches[0]['label'].shape == (4, 4, 4) and batches[0]['label'].dtype == np.int32
  epoch1 = sum((_ids(b) for b in batches[:3]), [])
  epoch2 = sum((_ids(b) for b in batches[3:]), [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(12))  # Each epoch sees each example once.
  assert epoch1 != list(range(12)) and epoch1 != epoch2  # Shuffled, and reshuffled per epoch.


def test_train_loader_deterministic_given_seed():
  make = lambda seed: pipeline.make_train_loader(_IndexedSource(10), batch_size=3, seed=seed,
                                                 transforms=[_Double(), _AddNoise()])
  a, b, c = (_take(iter(make(s)), 5) for s in (7, 7, 8))
  _assert_same_batches(a, b)
  assert [_ids(x) for x in a] != [_ids(x) for x in c]
  assert all(i % 2 == 0 for x in a for i in _ids(x))  # _Double ran before batching.


def test_train_iterator_state_resumes_exactly():
  make = lambda: pipeline.make_train_loader(_IndexedSource(10), batch_size=3, seed=1,
                                            transforms=[_AddNoise()])
  iterator = iter(make())
  _take(iterator, 4)  # Into the second epoch (10 examples, 3 per batch).
  state = iterator.get_state()
  assert isinstance(state, bytes)
  expected = _take(iterator, 5)
  resumed = iter(make())
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 5), expected)


def test_train_state_resumes_with_worker_processes():
  make = lambda: pipeline.make_train_loader(_IndexedSource(8), batch_size=2, seed=2,
                                            transforms=[_AddNoise()], worker_count=1)
  iterator = iter(make())
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  resumed = iter(make())
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 3), expected)


def test_train_shards_are_disjoint_and_cover_the_data():
  seen = []
  for shard_index in range(2):
    loader = pipeline.make_train_loader(_IndexedSource(9), batch_size=2, seed=3,
                                        shard_index=shard_index, shard_count=2)
    # 9 examples over 2 shards: 4 each (the remainder is dropped); 4 batches = 2 epochs.
    ids = sum((_ids(b) for b in _take(iter(loader), 4)), [])
    assert sorted(ids[:4]) == sorted(ids[4:])
    seen.append(set(ids))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 8


def test_train_loader_reads_synthetic_source(tmp_path):
  data = synthetic.load(ndim=3, shape=(16, 16, 16), num_classes=3, num_train=8, num_val=2, seed=0,
                        data_dir=str(tmp_path))
  batch = next(iter(pipeline.make_train_loader(data['train'], batch_size=2, seed=0)))
  assert batch['image'].shape == (2, 16, 16, 16, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (2, 16, 16, 16) and batch['label'].dtype == np.int32


@pytest.mark.parametrize('n,batch_size', [(7, 3), (6, 3), (2, 4)])
def test_eval_batches_cover_each_example_once_in_order(n, batch_size):
  batches = list(pipeline.make_eval_batches(_IndexedSource(n), batch_size=batch_size))
  assert len(batches) == -(-n // batch_size)
  for b in batches:
    assert b['mask'].dtype == np.bool_ and b['mask'].shape == (batch_size,)
    assert b['image'].shape == (batch_size, 4, 4, 1)
    np.testing.assert_array_equal(b['image'][~b['mask']], 0)  # Padding is zeros.
  mask = np.concatenate([b['mask'] for b in batches])
  ids = np.concatenate([b['image'][:, 0, 0, 0] for b in batches])[mask]
  np.testing.assert_array_equal(ids, np.arange(n))
  np.testing.assert_array_equal(mask, np.arange(len(mask)) < n)


def test_eval_shards_cover_everything_with_equal_batch_counts():
  n, shards = 10, 3
  per_shard = [list(pipeline.make_eval_batches(_IndexedSource(n), batch_size=2, shard_index=i,
                                               shard_count=shards)) for i in range(shards)]
  # Shard sizes 4, 3, 3: every shard yields ceil(4 / 2) = 2 batches.
  assert [len(b) for b in per_shard] == [2, 2, 2]
  ids = [int(x) for batches in per_shard for b in batches
         for x in b['image'][b['mask'], 0, 0, 0]]
  assert ids == list(range(n))
  # More shards than examples: the empty shard still yields one fully masked batch.
  empty = list(pipeline.make_eval_batches(_IndexedSource(2), batch_size=4, shard_index=2,
                                          shard_count=3))
  assert len(empty) == 1 and not empty[0]['mask'].any()


@pytest.mark.parametrize('kwargs,match', [
    (dict(batch_size=0), 'batch_size'),
    (dict(shard_index=2, shard_count=2), 'shard_index'),
    (dict(seed=-1), 'seed'),
    (dict(transforms=[lambda x: x]), 'MapTransform'),
])
def test_train_loader_bad_arguments(kwargs, match):
  args = {'batch_size': 2, 'seed': 0, **kwargs}
  with pytest.raises((ValueError, TypeError), match=match):
    pipeline.make_train_loader(_IndexedSource(4), **args)


def test_eval_bad_arguments():
  with pytest.raises(ValueError, match='batch_size'):
    pipeline.make_eval_batches(_IndexedSource(4), batch_size=0)
