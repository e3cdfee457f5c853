"""Tests for unet_ds.data.synthetic: determinism, shapes, classes, reuse of prepared data."""

import os

import numpy as np
import pytest
from scipy import ndimage

from unet_ds.data import prepare
from unet_ds.data import synthetic

_TINY = dict(ndim=3, shape=(16, 16, 16), num_classes=3, num_train=6, num_val=2, seed=0)


def _arrays(source):
  examples = [source[i] for i in range(len(source))]
  return (np.stack([e['image'] for e in examples]), np.stack([e['label'] for e in examples]))


def _snapshot(root):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return data_dir, synthetic.load(**_TINY, data_dir=data_dir)


@pytest.mark.parametrize('ndim,shape,num_classes', [(2, (24, 20), 4), (3, (16, 12, 16), 3)])
def test_shapes_dtypes_and_classes(tmp_path, ndim, shape, num_classes):
  data = synthetic.load(ndim=ndim, shape=shape, num_classes=num_classes, num_train=5, num_val=3,
                        seed=1, data_dir=str(tmp_path))
  assert sorted(data) == ['train', 'validation']
  assert (len(data['train']), len(data['validation'])) == (5, 3)
  for split in ('train', 'validation'):
    images, labels = _arrays(data[split])
    assert images.dtype == np.float32 and images.shape == (len(data[split]),) + shape + (1,)
    assert labels.dtype == np.int32 and labels.shape == (len(data[split]),) + shape
    assert np.isfinite(images).all()
    # Every class, background included, appears in every example.
    for label in labels:
      np.testing.assert_array_equal(np.unique(label), np.arange(num_classes))


def test_same_seed_same_data_other_seed_other_data(tiny, tmp_path):
  _, data = tiny
  again = synthetic.load(**_TINY, data_dir=str(tmp_path / 'again'))
  other = synthetic.load(**{**_TINY, 'seed': 1}, data_dir=str(tmp_path / 'again'))
  for split in ('train', 'validation'):
    for a, b in zip(_arrays(data[split]), _arrays(again[split])):
      np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_arrays(data[split])[1], _arrays(other[split])[1])
  # Train and validation examples differ too.
  assert not np.array_equal(_arrays(data['train'])[1][:2], _arrays(data['validation'])[1])


def test_example_i_depends_only_on_seed_split_and_index(tiny, tmp_path):
  _, data = tiny
  more = synthetic.load(**{**_TINY, 'num_train': 8}, data_dir=str(tmp_path))
  for a, b in zip(_arrays(data['train']), _arrays(more['train'])):
    np.testing.assert_array_equal(a, b[:6])


def test_second_load_reuses_prepared_files(tiny, monkeypatch):
  data_dir, data = tiny
  before = _snapshot(data_dir)
  assert any('train.array_record' in p for p in before)

  def _fail(*args, **kwargs):
    raise AssertionError('regenerated an already prepared dataset')

  monkeypatch.setattr(synthetic, 'generate_example', _fail)
  again = synthetic.load(**_TINY, data_dir=data_dir)
  assert _snapshot(data_dir) == before
  np.testing.assert_array_equal(_arrays(again['train'])[0], _arrays(data['train'])[0])


def test_config_name_encodes_every_parameter():
  names = {synthetic.config_name(**_TINY)}
  for key, value in [('ndim', 2), ('shape', (16, 16, 8)), ('num_classes', 4), ('num_train', 7),
                     ('num_val', 3), ('seed', 2), ('in_channels', 4)]:
    names.add(synthetic.config_name(**{**_TINY, key: value}))
  assert len(names) == 8
  # Single-channel names predate the multi-channel mode: prepared copies stay valid.
  assert synthetic.config_name(**_TINY) == synthetic.config_name(**_TINY, in_channels=1)


def test_class_intensities_rise_but_overlap():
  rng = np.random.default_rng(0)
  examples = [synthetic.generate_example(rng, (24, 24, 24), 3) for _ in range(6)]
  image = np.concatenate([e['image'][..., 0].ravel() for e in examples])
  label = np.concatenate([e['label'].ravel() for e in examples])
  values = [image[label == c] for c in range(3)]
  means = [v.mean() for v in values]
  assert means[0] < means[1] < means[2]
  # Not separable by a threshold: the brighter 10% of class 1 is above the darker 10% of class 2.
  assert np.percentile(values[1], 90) > np.percentile(values[2], 10)
  # Objects are large enough to learn: foreground is several percent of the volume.
  assert 0.03 < (label > 0).mean() < 0.4


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv('UNET_DS_DATA_DIR', '/some/where')
  assert prepare.default_data_dir() == '/some/where'
  monkeypatch.delenv('UNET_DS_DATA_DIR')
  assert prepare.default_data_dir() == os.path.expanduser('~/.cache/unet_ds/tfds')


@pytest.mark.parametrize('override,match', [
    (dict(ndim=4), 'ndim'),
    (dict(shape=(16, 16)), 'shape'),
    (dict(shape=(16, 4, 16)), 'shape'),
    (dict(num_classes=1), 'num_classes'),
    (dict(num_train=0), 'num_train'),
    (dict(num_val=-1), 'num_val'),
    (dict(seed=-1), 'seed'),
    (dict(in_channels=0), 'in_channels'),
])
def test_bad_parameters_raise_before_writing(tmp_path, override, match):
  with pytest.raises(ValueError, match=match):
    synthetic.load(**{**_TINY, **override}, data_dir=str(tmp_path))
  assert not os.listdir(tmp_path)


def test_shells_are_hollow_and_distinct_from_filled_shapes():
  for i in range(4):
    label = synthetic.generate_example(np.random.default_rng(i), (64, 64), 4)['label']
    # Class 3 is a ring: filling its holes adds pixels; class 1 (ellipse) has no holes.
    ring, ellipse = label == 3, label == 1
    assert ndimage.binary_fill_holes(ring).sum() > 1.3 * ring.sum()
    assert ndimage.binary_fill_holes(ellipse).sum() == ellipse.sum()


def test_multichannel_channel_zero_is_the_single_channel_image():
  one = synthetic.generate_example(np.random.default_rng(5), (20, 20, 20), 4)
  four = synthetic.generate_example(np.random.default_rng(5), (20, 20, 20), 4, in_channels=4)
  assert four['image'].shape == (20, 20, 20, 4) and four['image'].dtype == np.float32
  np.testing.assert_array_equal(four['label'], one['label'])
  np.testing.assert_array_equal(four['image'][..., :1], one['image'])
  assert not np.allclose(four['image'][..., 1], four['image'][..., 2])


def test_multichannel_contrast_depends_on_the_channel():
  means = [synthetic.channel_means(j, 4) for j in range(4)]
  np.testing.assert_allclose(means[0], [0, 1.0, 1.5, 2.0])
  np.testing.assert_allclose(means[1], [0, 0.0, 2.0, 1.0])  # class 1 hidden, ramp rotated
  np.testing.assert_allclose(means[2], [0, 2.0, 0.0, 1.5])  # class 2 hidden
  rng = np.random.default_rng(0)
  examples = [synthetic.generate_example(rng, (24, 24, 24), 4, in_channels=3) for _ in range(4)]
  image = np.concatenate([e['image'].reshape(-1, 3) for e in examples])
  label = np.concatenate([e['label'].ravel() for e in examples])
  for j in range(3):
    measured = [image[label == c, j].mean() for c in range(4)]
    # Interior voxels follow the table within the bias field (+-25%) and jitter.
    np.testing.assert_allclose(measured, means[j], atol=0.3)


def test_multichannel_load(tmp_path):
  data = synthetic.load(**{**_TINY, 'num_train': 2, 'num_val': 1}, in_channels=2,
                        data_dir=str(tmp_path))
  images, labels = _arrays(data['train'])
  assert images.shape == (2, 16, 16, 16, 2) and labels.shape == (2, 16, 16, 16)


def test_preparing_says_what_it_prepares_once_and_nothing_of_downloads(tmp_path, capfd):
  kw = dict(ndim=2, shape=(8, 8), num_classes=2, num_train=2, num_val=1, seed=3,
            data_dir=str(tmp_path))
  synthetic.load(**kw)
  out = capfd.readouterr().out
  assert 'preparing synthetic_shapes/' in out and str(tmp_path) in out, out
  assert 'Downloading' not in out and 'Unknown size' not in out, out
  synthetic.load(**kw)  # prepared: reused without a word
  assert 'preparing' not in capfd.readouterr().out
