"""Datasets for Parle: the registry, TFDS preparation and a portable NumPy cache.

:func:`prepare` makes TensorFlow Datasets (TFDS) write a dataset under
``data_dir``; Fashion-MNIST can be built offline from the files of Debian's
``dataset-fashion-mnist`` package, which are checked first. :func:`load`
returns one split as NumPy arrays: the first call converts the TFDS copy into
``<data_dir>/<name>/<split>.npz``, later calls read that file with NumPy
alone. TensorFlow is imported lazily, only when a dataset must be prepared.

Statistics and on-device sampling of the loaded arrays are in
:mod:`parle_jax.data.sampling`; :mod:`parle_jax.data` re-exports both.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import os
import pathlib
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the training loop needs to know about one dataset.

  Attributes:
    name: TFDS name of the dataset (also its key in ``DATASETS``).
    image_shape: ``(height, width, channels)`` of one image.
    num_classes: number of labels; labels are ``0 .. num_classes - 1``.
    train_split: TFDS split (or split expression) used for training.
    test_split: TFDS split used for evaluation.
    augment: whether the paper trains on this dataset with random flips and
      pad-and-crop (see :func:`parle_jax.data.sampling.make_batch_fn`).
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  train_split: str
  test_split: str
  augment: bool


DATASETS: Mapping[str, DatasetInfo] = {
    info.name: info for info in (
        DatasetInfo('mnist', (28, 28, 1), 10, 'train', 'test', augment=False),
        DatasetInfo('fashion_mnist', (28, 28, 1), 10, 'train', 'test',
                    augment=False),
        DatasetInfo('cifar10', (32, 32, 3), 10, 'train', 'test', augment=True),
        DatasetInfo('cifar100', (32, 32, 3), 100, 'train', 'test',
                    augment=True),
        # The authors train SVHN on train + extra (604,388 images), without
        # augmentation (distributed-ensembles, code/loader.py).
        DatasetInfo('svhn_cropped', (32, 32, 3), 10, 'train+extra', 'test',
                    augment=False),
    )
}

FASHION_MNIST_DIR_ENV = 'PARLE_FASHION_MNIST_DIR'
DEFAULT_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train_data': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_data': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}
_FASHION_MNIST_SIZES = {'train': 60_000, 'test': 10_000}
# Errors that writing into data_dir meets when it is read-only, not ours or full.
_CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)
# Examples per tf.data batch when converting a TFDS split to NumPy. (The
# whole split at once, batch_size=-1, kills the process under
# tfds.testing.mock_data.)
_CONVERT_BATCH = 10_000


class DataUnavailableError(RuntimeError):
  """A dataset is not cached, not prepared, and cannot be prepared here."""


class CorruptCacheError(RuntimeError):
  """A cached ``<split>.npz`` file is unreadable or holds the wrong arrays."""


class CorruptFileError(DataUnavailableError):
  """A dataset's source file is truncated or is not the file it should be."""


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------
def dataset_info(name: str) -> DatasetInfo:
  """Returns the registry entry of a dataset.

  Args:
    name: TFDS name, one of ``DATASETS``.

  Returns:
    The dataset's :class:`DatasetInfo`.

  Raises:
    ValueError: if ``name`` is not in ``DATASETS``.
  """
  if name not in DATASETS:
    raise ValueError(f'`name` must be one of {", ".join(DATASETS)}; got '
                     f'{name!r}.')
  return DATASETS[name]


def _check_split(info: DatasetInfo, split: str) -> None:
  allowed = (info.train_split, info.test_split)
  if split not in allowed:
    raise ValueError(f'`split` must be one of {allowed} for {info.name}, got '
                     f'{split!r}.')


# ----------------------------------------------------------------------------
# TFDS preparation (needs tensorflow_datasets and TensorFlow, imported lazily).
# ----------------------------------------------------------------------------
def _import_tfds(name: str, data_dir: PathLike):
  """Imports tensorflow_datasets, or says how to do without it."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as err:
    cache_dir = pathlib.Path(data_dir) / name
    raise DataUnavailableError(
        f'{name} is not cached in {cache_dir} and tensorflow_datasets cannot '
        f'be imported ({err}): pip install tensorflow-datasets tensorflow-cpu, '
        f'or copy {cache_dir}/*.npz from a machine where load({name!r}, ...) '
        f'has run.') from err
  return tfds


def _fashion_mnist_dir(manual_dir: PathLike | None) -> pathlib.Path:
  """The directory searched for Debian's Fashion-MNIST files."""
  if manual_dir is None:
    manual_dir = os.environ.get(FASHION_MNIST_DIR_ENV, DEFAULT_FASHION_MNIST_DIR)
  return pathlib.Path(manual_dir)


def _has_fashion_mnist_files(directory: pathlib.Path) -> bool:
  return all((directory / f).is_file() for f in FASHION_MNIST_FILES.values())


def _check_fashion_mnist_files(directory: pathlib.Path) -> None:
  """Reads the four IDX files through; raises CorruptFileError naming a bad one."""
  for key, filename in FASHION_MNIST_FILES.items():
    split, kind = key.split('_')
    count = _FASHION_MNIST_SIZES[split]
    magic, shape = (2051, (count, 28, 28)) if kind == 'data' else (2049, (count,))
    path = directory / filename
    try:
      with gzip.open(path, 'rb') as f:
        content = f.read()
    except (OSError, EOFError, zlib.error) as err:
      problem = f'{type(err).__name__}: {err}'
    else:
      header = np.frombuffer(content[:4 * (1 + len(shape))], '>i4')
      expected = [magic, *shape]
      if list(header) != expected:
        problem = f'its IDX header is {header.tolist()}, expected {expected}'
      elif len(content) != 4 * len(expected) + int(np.prod(shape)):
        problem = (f'it holds {len(content)} bytes once decompressed, expected '
                   f'{4 * len(expected) + int(np.prod(shape))}')
      else:
        continue
    raise CorruptFileError(
        f'{path} is truncated or not the Fashion-MNIST file {filename} ({problem}). '
        f'Reinstall it (`apt-get install --reinstall dataset-fashion-mnist`), or put the '
        f'original {filename} (github.com/zalandoresearch/fashion-mnist) into {directory} '
        f'(${FASHION_MNIST_DIR_ENV} chooses another directory).')


def _local_fashion_mnist_builder(tfds, data_dir: PathLike):
  """TFDS's FashionMNIST builder, reading the four .gz files from manual_dir.

  The stock builder downloads the files and checks their checksums. Debian's
  package holds the same content recompressed, so the checksums differ; this
  builder extracts the files from ``dl_manager.manual_dir`` instead and
  otherwise runs the stock code, so it prepares the stock dataset (same name,
  version, features and example order).
  """
  from tensorflow_datasets.image_classification import mnist

  class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
    name = 'fashion_mnist'
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f'apt-get install -y dataset-fashion-mnist, or put '
        f'{", ".join(FASHION_MNIST_FILES.values())} into manual_dir.')

    def _split_generators(self, dl_manager):
      files = dl_manager.extract({
          key: dl_manager.manual_dir / filename
          for key, filename in FASHION_MNIST_FILES.items()
      })
      return [
          tfds.core.SplitGenerator(
              name=split,
              gen_kwargs=dict(num_examples=num_examples,
                              data_path=files[f'{split}_data'],
                              label_path=files[f'{split}_labels']))
          for split, num_examples in _FASHION_MNIST_SIZES.items()
      ]

  return LocalFashionMNIST(data_dir=os.fspath(data_dir))


def _how_to_get(name: str, data_dir: PathLike, fashion_dir: pathlib.Path) -> str:
  if name == 'fashion_mnist':
    return (
        f'Fashion-MNIST is not prepared in {data_dir}, its files are not in '
        f'{fashion_dir} and the download failed. Either '
        f'`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; or set '
        f'{FASHION_MNIST_DIR_ENV} to a directory holding '
        f'{", ".join(FASHION_MNIST_FILES.values())}), or run with internet '
        f'access so TFDS can download it.')
  return (f'{name} is not prepared in {data_dir} and the download failed: run '
          f'once with internet access (TFDS downloads {name} to {data_dir}), '
          f'or copy a prepared {data_dir} from another machine.')


def prepare(name: str, data_dir: PathLike, *,
            manual_dir: PathLike | None = None) -> tfds.core.DatasetBuilder:
  """Makes sure TFDS has prepared a dataset under ``data_dir``.

  Fashion-MNIST is built offline from Debian's package files when they exist
  (looked for in ``manual_dir``, else ``$PARLE_FASHION_MNIST_DIR``, else
  /usr/share/datasets/fashion-mnist). Otherwise, and for every other dataset,
  the stock TFDS builder downloads the data; offline, TFDS retries for a few
  minutes before it gives up. A dataset already prepared under ``data_dir``
  is reused without touching the network.

  Args:
    name: TFDS name, one of ``DATASETS``.
    data_dir: TFDS data directory.
    manual_dir: directory holding the four Fashion-MNIST .gz files
      (``FASHION_MNIST_FILES``); only used for fashion_mnist.

  Returns:
    The prepared TFDS builder.

  Raises:
    ValueError: if ``name`` is unknown.
    DataUnavailableError: if tensorflow_datasets is missing, or the data is
      neither prepared, nor local, nor downloadable; the message says how to
      get it.
    CorruptFileError: (a DataUnavailableError) if a local Fashion-MNIST file
      is truncated or another file; the message names it and how to replace it.
  """
  dataset_info(name)
  tfds = _import_tfds(name, data_dir)
  fashion_dir = _fashion_mnist_dir(manual_dir)
  if name == 'fashion_mnist' and _has_fashion_mnist_files(fashion_dir):
    _check_fashion_mnist_files(fashion_dir)
    builder = _local_fashion_mnist_builder(tfds, data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=fashion_dir))
    return builder
  builder = tfds.builder(name, data_dir=os.fspath(data_dir))
  try:
    builder.download_and_prepare()
  except (OSError, tfds.download.DownloadError) as err:  # offline: OSError
    if isinstance(err, OSError) and err.errno in _CANNOT_WRITE:
      raise  # not the network: data_dir is read-only or full (see _build_cache)
    raise DataUnavailableError(_how_to_get(name, data_dir, fashion_dir)) from err
  return builder


def _split_to_numpy(builder: tfds.core.DatasetBuilder,
                    split: str) -> dict[str, np.ndarray]:
  """Reads a whole TFDS split into {'image': uint8, 'label': int32} arrays."""
  import tensorflow_datasets as tfds

  batches = list(tfds.as_numpy(
      builder.as_dataset(split=split, batch_size=_CONVERT_BATCH)))
  return {
      'image': np.concatenate([b['image'] for b in batches]).astype(np.uint8),
      'label': np.concatenate([b['label'] for b in batches]).astype(np.int32),
  }


# ----------------------------------------------------------------------------
# NumPy cache.
# ----------------------------------------------------------------------------
def cache_path(name: str, split: str, data_dir: PathLike) -> pathlib.Path:
  """Returns the file :func:`load` caches a split in.

  Args:
    name: TFDS name of the dataset.
    split: TFDS split.
    data_dir: TFDS data directory.

  Returns:
    ``<data_dir>/<name>/<split>.npz``.
  """
  return pathlib.Path(data_dir) / name / f'{split}.npz'


def _save_atomically(path: pathlib.Path,
                     arrays: Mapping[str, np.ndarray]) -> None:
  """Writes an .npz so that no reader ever sees a partial file.

  The file gets the mode the umask gives new files (e.g. 0644), so that
  other users of a shared data directory can read it.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f'.{path.name}.',
                                   suffix='.tmp', delete=False) as f:
    try:
      np.savez(f, **arrays)
      os.chmod(f.name, 0o666 & ~_umask())  # NamedTemporaryFile made it 0600
    except BaseException:
      os.unlink(f.name)
      raise
  os.replace(f.name, path)


def _umask() -> int:
  mask = os.umask(0o022)  # reading the umask means setting it
  os.umask(mask)
  return mask


def _build_cache(info: DatasetInfo, data_dir: PathLike,
                 manual_dir: PathLike | None) -> None:
  """Prepares a dataset with TFDS and caches its two splits as .npz files."""
  try:
    builder = prepare(info.name, data_dir, manual_dir=manual_dir)
    for split in (info.train_split, info.test_split):
      _save_atomically(cache_path(info.name, split, data_dir),
                       _split_to_numpy(builder, split))
  except OSError as err:
    if err.errno not in _CANNOT_WRITE:
      raise
    where = f' ({err.filename})' if err.filename else ''
    raise DataUnavailableError(
        f'cannot prepare {info.name} in the data directory {data_dir}: '
        f'{err.strerror}{where}. Point the data directory (config.data_dir or '
        f'$PARLE_DATA_DIR) at a writable place with free space, or copy '
        f'{info.name}/*.npz there from a machine where it was prepared.') from err


def _cache_problem(arrays: Mapping[str, np.ndarray],
                   info: DatasetInfo) -> str | None:
  """Says what is wrong with the cached arrays of a dataset, if anything."""
  image, label = arrays['image'], arrays['label']
  if image.dtype != np.uint8 or label.dtype != np.int32:
    return f'dtypes are {image.dtype}/{label.dtype}, expected uint8/int32'
  if image.ndim != 4 or image.shape[1:] != info.image_shape:
    return f'image shape {image.shape} is not [N, *{info.image_shape}]'
  if label.shape != image.shape[:1]:
    return f'label shape {label.shape} does not match {image.shape[0]} images'
  if label.size and not 0 <= label.min() <= label.max() < info.num_classes:
    return (f'labels span {label.min()}..{label.max()}, outside '
            f'0..{info.num_classes - 1}')
  return None


def _read_cache(path: pathlib.Path, info: DatasetInfo) -> dict[str, np.ndarray]:
  """Reads and checks one cached split."""
  advice = f'delete {path} to rebuild it from TFDS'
  try:
    with np.load(path) as f:
      arrays = {'image': f['image'], 'label': f['label']}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
    raise CorruptCacheError(
        f'cannot read {path} ({type(err).__name__}: {err}); {advice}') from err
  problem = _cache_problem(arrays, info)
  if problem:
    raise CorruptCacheError(f'{path}: {problem}; {advice}')
  return arrays


def load(name: str, split: str, data_dir: PathLike, *,
         manual_dir: PathLike | None = None) -> dict[str, np.ndarray]:
  """Returns one split of a dataset as NumPy arrays.

  Reads ``<data_dir>/<name>/<split>.npz`` with NumPy alone. When that file is
  missing, prepares the dataset with TFDS (see :func:`prepare`) and caches
  both its train and test splits first.

  Args:
    name: TFDS name, one of ``DATASETS``.
    split: ``dataset_info(name).train_split`` or ``.test_split``.
    data_dir: TFDS data directory; it also holds the cache.
    manual_dir: where to look for the Fashion-MNIST files, see
      :func:`prepare`.

  Returns:
    ``{'image': uint8 [N, H, W, C], 'label': int32 [N]}``.

  Raises:
    ValueError: if ``name`` or ``split`` is unknown.
    DataUnavailableError: if the dataset must be prepared and cannot be.
    CorruptCacheError: if the cache file is unreadable or its arrays do not
      fit the dataset; the message names the file to delete.
  """
  info = dataset_info(name)
  _check_split(info, split)
  path = cache_path(name, split, data_dir)
  if not path.exists():
    _build_cache(info, data_dir, manual_dir)
  return _read_cache(path, info)
