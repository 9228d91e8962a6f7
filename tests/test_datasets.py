"""Tests for parle_jax.data.datasets: the registry, TFDS preparation, the .npz cache.

Fashion-MNIST is prepared for real from Debian's dataset-fashion-mnist files
(once per session by conftest: about 40 s on 2 idle cores); the other
datasets use `tfds.testing.mock_data`.
"""

import dataclasses
import os
import pathlib
import re
import sys

import numpy as np
import pytest

from parle_jax import data

FASHION_DIR = pathlib.Path(
    os.environ.get(data.FASHION_MNIST_DIR_ENV, data.DEFAULT_FASHION_MNIST_DIR))
NO_NETWORK = ConnectionError('no network in this test')


def _tfds():
  import tensorflow_datasets as tfds
  return tfds


def _fail_download(monkeypatch):
  """Makes every TFDS builder fail as it does offline (requests' error is an OSError)."""
  builders = []

  def download_and_prepare(self, *args, **kwargs):
    builders.append(type(self))
    raise NO_NETWORK

  monkeypatch.setattr(_tfds().core.DatasetBuilder, 'download_and_prepare',
                      download_and_prepare)
  return builders


# ----------------------------------------------------------------------------
# Registry.


def test_registry():
  assert set(data.DATASETS) == {'mnist', 'fashion_mnist', 'cifar10', 'cifar100',
                                'svhn_cropped'}
  cifar100 = data.dataset_info('cifar100')
  assert (cifar100.image_shape, cifar100.num_classes) == ((32, 32, 3), 100)
  assert data.dataset_info('fashion_mnist').image_shape == (28, 28, 1)
  assert data.dataset_info('svhn_cropped').train_split == 'train+extra'
  assert [info.augment for info in data.DATASETS.values()] == [
      False, False, True, True, False]
  with pytest.raises(dataclasses.FrozenInstanceError):
    cifar100.num_classes = 10


def test_unknown_dataset_name_lists_the_allowed_names(tmp_path):
  for call in (lambda: data.dataset_info('imagenet'),
               lambda: data.load('imagenet', 'train', tmp_path),
               lambda: data.prepare('imagenet', tmp_path)):
    with pytest.raises(ValueError) as error:
      call()
    message = str(error.value)
    assert "'imagenet'" in message
    assert all(name in message for name in data.DATASETS)


def test_unknown_split(tmp_path):
  with pytest.raises(ValueError,
                     match=r"`split` must be one of \('train', 'test'\) for "
                     r"cifar10, got 'validation'"):
    data.load('cifar10', 'validation', tmp_path)


# ----------------------------------------------------------------------------
# Fashion-MNIST from Debian's files, and the cache.


def test_fashion_mnist_from_local_files(fashion):
  data_dir, train, test = fashion
  assert train['image'].shape == (60_000, 28, 28, 1)
  assert test['image'].shape == (10_000, 28, 28, 1)
  for split in (train, test):
    assert split['image'].dtype == np.uint8
    assert split['label'].dtype == np.int32
    assert split['label'].min() == 0 and split['label'].max() == 9
  np.testing.assert_array_equal(np.bincount(train['label']), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test['label']), [1000] * 10)
  # The published Fashion-MNIST statistics: mean 0.2860, std 0.3530.
  mean, std = data.channel_stats(train['image'])
  np.testing.assert_allclose(mean, [0.28604], atol=1e-5)
  np.testing.assert_allclose(std, [0.35302], atol=1e-5)
  for split in ('train', 'test'):
    assert data.cache_path('fashion_mnist', split, data_dir).is_file()


def test_fashion_mnist_is_readable_by_the_stock_builder(fashion):
  data_dir, _, _ = fashion
  builder = _tfds().builder('fashion_mnist', data_dir=os.fspath(data_dir))
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 60_000
  assert builder.info.splits['test'].num_examples == 10_000


def test_load_reads_the_cache_without_tensorflow(fashion, monkeypatch):
  data_dir, train, test = fashion
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  monkeypatch.setitem(sys.modules, 'tensorflow', None)
  with pytest.raises(ImportError):
    _tfds()
  for split, expected in (('train', train), ('test', test)):
    again = data.load('fashion_mnist', split, data_dir)
    np.testing.assert_array_equal(again['image'], expected['image'])
    np.testing.assert_array_equal(again['label'], expected['label'])


# ----------------------------------------------------------------------------
# Other datasets (mocked) and missing data.


@pytest.mark.parametrize('name', ['cifar10', 'svhn_cropped', 'cifar100'])
def test_mocked_datasets_load_with_the_right_shapes(name, tmp_path):
  tfds = _tfds()
  info = data.dataset_info(name)
  with tfds.testing.mock_data(num_examples=13,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    train = data.load(name, info.train_split, tmp_path)
  test = data.load(name, info.test_split, tmp_path)  # from the cache
  for split in (train, test):
    assert split['image'].shape == (13, *info.image_shape)
    assert split['image'].dtype == np.uint8
    assert split['label'].shape == (13,) and split['label'].dtype == np.int32
    assert 0 <= split['label'].min() <= split['label'].max() < info.num_classes
  assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(
      [f'{info.train_split}.npz', f'{info.test_split}.npz'])


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
  empty = tmp_path / 'empty'
  empty.mkdir()
  monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, os.fspath(empty))
  builders = _fail_download(monkeypatch)
  with pytest.raises(data.DataUnavailableError) as error:
    data.load('fashion_mnist', 'train', tmp_path / 'tfds')
  message = str(error.value)
  assert 'apt-get install -y dataset-fashion-mnist' in message
  assert 'internet access' in message
  assert os.fspath(empty) in message
  assert error.value.__cause__ is NO_NETWORK
  # Without local files the stock builder (the one that downloads) is used.
  assert builders == [_tfds().builder_cls('fashion_mnist')]


def test_manual_dir_argument_overrides_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, os.fspath(FASHION_DIR))
  builders = _fail_download(monkeypatch)
  manual_dir = tmp_path / 'manual'
  with pytest.raises(data.DataUnavailableError,
                     match=f'not in {re.escape(os.fspath(manual_dir))} '):
    data.prepare('fashion_mnist', tmp_path / 'tfds', manual_dir=manual_dir)
  assert builders == [_tfds().builder_cls('fashion_mnist')]


def test_missing_cifar_says_to_download_once(tmp_path, monkeypatch):
  _fail_download(monkeypatch)
  with pytest.raises(data.DataUnavailableError,
                     match=r'internet access \(TFDS downloads cifar10 to '):
    data.load('cifar10', 'test', tmp_path)
  assert not (tmp_path / 'cifar10').exists()


def test_missing_cache_without_tfds_says_what_to_copy(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(data.DataUnavailableError,
                     match=f'pip install tensorflow-datasets.*copy '
                     f'{re.escape(os.fspath(tmp_path / "cifar10"))}/\\*.npz'):
    data.load('cifar10', 'train', tmp_path)


def _write_cache(tmp_path, name, image, label):
  path = data.cache_path(name, 'train', tmp_path)
  path.parent.mkdir(parents=True)
  np.savez(path, image=image, label=label)
  return path


def _mnist_like(n=5):
  return np.zeros((n, 28, 28, 1), np.uint8), np.arange(n, dtype=np.int32)


def test_truncated_cache_names_the_file(tmp_path):
  path = _write_cache(tmp_path, 'mnist', *_mnist_like())
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(data.CorruptCacheError,
                     match=f'cannot read {re.escape(os.fspath(path))}.*delete'):
    data.load('mnist', 'train', tmp_path)


@pytest.mark.parametrize('image, label, problem', [
    (np.zeros((5, 32, 32, 3), np.uint8), np.zeros(5, np.int32), 'image shape'),
    (np.zeros((5, 28, 28, 1), np.uint8), np.full(5, 10, np.int32), 'labels'),
    (np.zeros((5, 28, 28, 1), np.uint8), np.zeros(4, np.int32), 'label shape'),
    (np.zeros((5, 28, 28, 1), np.float32), np.zeros(5, np.int32), 'dtypes'),
])
def test_cache_with_wrong_arrays_names_the_file(tmp_path, image, label, problem):
  path = _write_cache(tmp_path, 'mnist', image, label)
  with pytest.raises(data.CorruptCacheError,
                     match=f'{re.escape(os.fspath(path))}: {problem}.*delete'):
    data.load('mnist', 'train', tmp_path)
