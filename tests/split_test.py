"""Tests for unet_ds.data.split: seeded, order-independent splits and k-fold."""
import pytest

from unet_ds.data import split

IDS = [f'case_{i:03d}' for i in range(23)]


def test_split_is_seeded_and_order_independent():
  train, val = split.split_cases(IDS, val_fraction=0.2, seed=3)
  assert (train, val) == split.split_cases(list(reversed(IDS)), val_fraction=0.2, seed=3)
  assert len(val) == 5 and sorted(train + val) == IDS and not set(train) & set(val)
  assert val != split.split_cases(IDS, val_fraction=0.2, seed=4)[1]


def test_split_keeps_one_case_each_side():
  assert [len(x) for x in split.split_cases(['a', 'b'], val_fraction=0.01)] == [1, 1]
  assert split.split_cases(['a', 'b'], val_fraction=0.0) == (['a', 'b'], [])


def test_explicit_val_cases():
  train, val = split.split_cases(IDS, val_cases='case_003, case_001')
  assert val == ['case_001', 'case_003'] and len(train) == 21
  with pytest.raises(ValueError, match=r"val_cases \['nope'\]"):
    split.split_cases(IDS, val_cases=['nope'])


def test_kfold_partitions_cases():
  folds = split.kfold(IDS, 5, seed=0)
  vals = [v for _, v in folds]
  assert sorted(sum(vals, [])) == IDS
  assert sorted(len(v) for v in vals) == [4, 4, 5, 5, 5]
  for fold, (train, val) in enumerate(folds):
    assert split.split_cases(IDS, num_folds=5, fold=fold, seed=0) == (train, val)
    assert sorted(train + val) == IDS
  with pytest.raises(ValueError, match='fold=5'):
    split.split_cases(IDS, num_folds=5, fold=5)


def test_bad_inputs():
  with pytest.raises(ValueError, match='duplicate'):
    split.split_cases(['a', 'a', 'b'])
  with pytest.raises(ValueError, match='val_fraction'):
    split.split_cases(IDS, val_fraction=1.0)
