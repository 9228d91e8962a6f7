"""Datasets for Parle: TFDS preparation, a portable NumPy cache, on-device sampling.

The data path has three layers, each usable on its own:

1. :func:`prepare` makes TensorFlow Datasets (TFDS) write a dataset under
   ``data_dir``. This needs TensorFlow. Fashion-MNIST can be built offline
   from the files of Debian's ``dataset-fashion-mnist`` package; the other
   datasets are downloaded.
2. :func:`load` returns one split as NumPy arrays. The first call converts the
   TFDS copy into ``<data_dir>/<name>/<split>.npz``; later calls read that file
   with NumPy alone, so a machine without TensorFlow can train from a copied
   cache.
3. :func:`make_batch_fn` samples mini-batches *inside* ``jit``/``pmap``/
   ``lax.scan`` from a training set kept on the device (:func:`device_data`),
   so a fused Parle round of ``L`` inner steps never goes back to the host for
   data. As in the authors' code, each replica draws its own examples
   uniformly with replacement; in split-data mode (:func:`make_subsets`)
   replica ``a`` draws only from its own random subset of the training set.

Images stay uint8 until a batch is drawn; :func:`normalize` turns them into
float32 with the per-channel statistics of the training set
(:func:`channel_stats`). :func:`eval_batches` walks the test split in
fixed-shape, masked batches.

Example::

  info = dataset_info('cifar10')
  train = load('cifar10', info.train_split, '/data/tfds')
  mean, std = channel_stats(train['image'])
  data = jax.device_put(device_data(train, mean, std))
  batch_fn = jax.jit(make_batch_fn(128, augment=info.augment))
  batch = batch_fn(data, jax.random.PRNGKey(0), 0, 0)  # rng, step, replica

References:
  Chaudhari, Baldassi, Zecchina, Soatto, Talwalkar, Oberman, `Parle:
  parallelizing stochastic gradient descent <https://arxiv.org/abs/1707.00424>`_,
  SysML 2018. Data handling of the authors' code: github.com/pratikac/
  distributed-ensembles, ``code/loader.py``.
"""

from __future__ import annotations

import dataclasses
import gzip
import numbers
import os
import pathlib
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
  import tensorflow_datasets as tfds

PathLike = str | os.PathLike[str]
# batch_fn(data, rng, step, replica) -> {'image': float32, 'label': int32}.
BatchFn = Callable[[Mapping[str, Any], jax.Array, Any, Any],
                   dict[str, jax.Array]]


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
      pad-and-crop (see :func:`make_batch_fn`).
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
# Examples per tf.data batch when converting a TFDS split to NumPy. (The
# whole split at once, batch_size=-1, kills the process under
# tfds.testing.mock_data.)
_CONVERT_BATCH = 10_000
# Images per chunk in channel_stats, to bound its temporary memory.
_STATS_CHUNK = 10_000
_PAD_MODES = ('constant', 'edge', 'reflect', 'symmetric')


class DataUnavailableError(RuntimeError):
  """A dataset is not cached, not prepared, and cannot be prepared here."""


class CorruptCacheError(RuntimeError):
  """A cached ``<split>.npz`` file is unreadable or holds the wrong arrays."""


class CorruptFileError(DataUnavailableError):
  """A dataset's source file is truncated or is not the file it should be."""


# ----------------------------------------------------------------------------
# Argument checks: eager ValueErrors naming the argument.
# ----------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> None:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum):
    raise ValueError(f'`{name}` must be an integer >= {minimum}, got {value!r}.')


def _check_images(name: str, images: Any) -> None:
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'`{name}` must be uint8 [N, H, W, C], got '
                     f'{images.dtype} of shape {tuple(images.shape)}.')


def _check_labels(name: str, labels: Any, num_images: int) -> None:
  if tuple(labels.shape) != (num_images,):
    raise ValueError(f'`{name}` must have shape ({num_images},), one label per '
                     f'image, got {tuple(labels.shape)}.')


def _check_channel_stats(mean: Any, std: Any, channels: int) -> None:
  if tuple(mean.shape) != (channels,) or tuple(std.shape) != (channels,):
    raise ValueError(f'`mean` and `std` must have shape ({channels},), one '
                     f'value per channel, got {tuple(mean.shape)} and '
                     f'{tuple(std.shape)}.')


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
  """Writes an .npz so that no reader ever sees a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f'.{path.name}.',
                                   suffix='.tmp', delete=False) as f:
    try:
      np.savez(f, **arrays)
    except BaseException:
      os.unlink(f.name)
      raise
  os.replace(f.name, path)


def _build_cache(info: DatasetInfo, data_dir: PathLike,
                 manual_dir: PathLike | None) -> None:
  """Prepares a dataset with TFDS and caches its two splits as .npz files."""
  builder = prepare(info.name, data_dir, manual_dir=manual_dir)
  for split in (info.train_split, info.test_split):
    _save_atomically(cache_path(info.name, split, data_dir),
                     _split_to_numpy(builder, split))


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


# ----------------------------------------------------------------------------
# Normalisation.
# ----------------------------------------------------------------------------
def _histograms(images: np.ndarray) -> np.ndarray:
  """Counts of each uint8 value per channel: int64 [C, 256]."""
  counts = np.zeros((images.shape[-1], 256), np.int64)
  for start in range(0, images.shape[0], _STATS_CHUNK):
    chunk = images[start:start + _STATS_CHUNK]
    for channel, channel_counts in enumerate(counts):
      channel_counts += np.bincount(chunk[..., channel].ravel(), minlength=256)
  return counts


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of uint8 images, in [0, 1] units.

  Computed exactly from per-channel histograms, without a float copy of the
  data.

  Args:
    images: uint8 [N, H, W, C], normally the whole training set.

  Returns:
    ``(mean, std)``: float32 arrays of shape [C] (``std`` with ddof 0).

  Raises:
    ValueError: if ``images`` is not uint8 [N, H, W, C] with N >= 1, or has a
      constant channel (zero std).
  """
  _check_images('images', images)
  if images.shape[0] == 0:
    raise ValueError('`images` must hold at least one image, got none.')
  frequencies = _histograms(images) / float(images[..., 0].size)
  values = np.arange(256) / 255.0
  mean = frequencies @ values
  std = np.sqrt(np.sum(frequencies * (values - mean[:, None])**2, axis=1))
  if np.any(std == 0):
    raise ValueError(f'`images` has a constant channel (std {std}), which '
                     f'cannot be normalised.')
  return mean.astype(np.float32), std.astype(np.float32)


def normalize(images: Any, mean: Any, std: Any) -> Any:
  """Maps uint8 images to float32 ``(images / 255 - mean) / std``.

  Works on NumPy arrays and on JAX arrays (also inside ``jit``), returning
  the same kind of array.

  Args:
    images: uint8 [..., C].
    mean: float [C], from :func:`channel_stats`.
    std: float [C], from :func:`channel_stats`.

  Returns:
    float32 array of the shape of ``images``.

  Raises:
    ValueError: if ``images`` is not uint8 or ``mean``/``std`` are not of
      shape [C].
  """
  if images.dtype != np.uint8:
    raise ValueError(f'`images` must be uint8, got {images.dtype}.')
  _check_channel_stats(mean, std, images.shape[-1])
  scaled = images.astype(np.float32) / np.float32(255.0)
  return (scaled - mean.astype(np.float32)) / std.astype(np.float32)


# ----------------------------------------------------------------------------
# Device-resident training data and sampling.
# ----------------------------------------------------------------------------
def make_subsets(num_examples: int, num_replicas: int, fraction: float,
                 seed: int) -> np.ndarray:
  """Random training subsets for split-data Parle, one per replica.

  Each replica gets ``M = round(fraction * num_examples)`` distinct indices,
  drawn independently of the other replicas (so subsets may overlap), sorted.
  The paper's split-data runs use n = 3 with 50% and n = 6 with 25% each.

  Args:
    num_examples: size N of the training set, >= 1.
    num_replicas: number of replicas n, >= 1.
    fraction: the config's ``data_fraction``, in (0, 1]. With 1 every replica
      gets all data; callers then usually leave subsets out altogether.
    seed: NumPy seed; the same seed gives the same subsets.

  Returns:
    int32 [num_replicas, M] indices into the training set.

  Raises:
    ValueError: for a bad ``num_examples`` or ``num_replicas``, a fraction
      outside (0, 1], or one that leaves a replica no example.
  """
  _check_int('num_examples', num_examples, 1)
  _check_int('num_replicas', num_replicas, 1)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'`data_fraction` (fraction of the training set per '
                     f'replica) must be in (0, 1], got {fraction!r}.')
  size = round(fraction * num_examples)
  if size < 1:
    raise ValueError(f'`data_fraction` = {fraction!r} of {num_examples} '
                     f'examples leaves each replica no data.')
  rng = np.random.default_rng(seed)
  return np.stack([
      np.sort(rng.choice(num_examples, size, replace=False))
      for _ in range(num_replicas)
  ]).astype(np.int32)


def device_data(arrays: Mapping[str, np.ndarray], mean: Any, std: Any,
                subsets: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Builds the training-data pytree read by :func:`make_batch_fn`'s batch_fn.

  Args:
    arrays: the training split, ``{'image': uint8 [N, H, W, C], 'label':
      int [N]}``, e.g. from :func:`load`.
    mean: per-channel mean [C], from :func:`channel_stats`.
    std: per-channel std [C], from :func:`channel_stats`.
    subsets: optional int [n_replicas, M] indices from :func:`make_subsets`;
      with them, replica ``a`` samples only from ``subsets[a]``.

  Returns:
    ``{'image': uint8 [N, H, W, C], 'label': int32 [N], 'mean': float32 [C],
    'std': float32 [C]}``, plus ``'subsets': int32 [n_replicas, M]`` when
    given: NumPy arrays, to be put on the devices by the caller.

  Raises:
    ValueError: if shapes, dtypes or subset indices do not fit together.
  """
  image, label = arrays['image'], np.asarray(arrays['label'])
  _check_images("arrays['image']", image)
  _check_labels("arrays['label']", label, image.shape[0])
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  _check_channel_stats(mean, std, image.shape[-1])
  data = {'image': image, 'label': label.astype(np.int32), 'mean': mean,
          'std': std}
  if subsets is not None:
    subsets = np.asarray(subsets)
    if subsets.ndim != 2 or subsets.size == 0:
      raise ValueError(f'`subsets` must be [n_replicas, M] with M >= 1, got '
                       f'shape {subsets.shape}.')
    if subsets.min() < 0 or subsets.max() >= image.shape[0]:
      raise ValueError(f'`subsets` must index 0..{image.shape[0] - 1}, got '
                       f'{subsets.min()}..{subsets.max()}.')
    data['subsets'] = subsets.astype(np.int32)
  return data


def make_batch_fn(batch_size: int, *, augment: bool, padding: int = 4,
                  pad_mode: str = 'constant') -> BatchFn:
  """Returns a jittable function that draws one training mini-batch.

  The returned ``batch_fn(data, rng, step, replica)`` takes

  * ``data``: the pytree of :func:`device_data` (NumPy or device arrays);
  * ``rng``: a PRNG key, already distinct per replica;
  * ``step``: int32 scalar, the global inner-step count (may be traced);
  * ``replica``: int32 scalar, the global replica index (may be traced),
    read only in split-data mode;

  and returns ``{'image': float32 [B, H, W, C] normalised, 'label': int32
  [B]}``. The indices are drawn uniformly with replacement, from the whole
  training set or, when ``data`` has ``'subsets'``, from
  ``data['subsets'][replica]``, with the key ``fold_in(rng, step)``: the same
  ``(rng, step, replica)`` always gives the same batch. With ``augment``,
  each image is flipped left-right with probability 1/2, padded by
  ``padding`` pixels on each side and cropped back to H x W at a uniformly
  random offset; labels are unchanged. All shapes are static.

  Args:
    batch_size: examples per batch B, >= 1.
    augment: whether to flip and pad-and-crop (the paper's CIFAR setting, see
      ``DatasetInfo.augment``).
    padding: pixels added on each side before the random crop, >= 0.
    pad_mode: ``jnp.pad`` mode of that padding: ``'constant'`` pads with
      zeros (black), as torchvision's ``RandomCrop(32, padding=4)``; the
      authors' CIFAR code pads with ``cv2.BORDER_REFLECT``, which is
      ``'symmetric'``.

  Returns:
    ``batch_fn``, as above.

  Raises:
    ValueError: for a bad ``batch_size`` or ``padding``, or an unknown
      ``pad_mode``.
  """
  _check_int('batch_size', batch_size, 1)
  _check_int('padding', padding, 0)
  if pad_mode not in _PAD_MODES:
    raise ValueError(f'`pad_mode` must be one of {_PAD_MODES}, got '
                     f'{pad_mode!r}.')

  def batch_fn(data, rng, step, replica):
    index_key, augment_key = jax.random.split(jax.random.fold_in(rng, step))
    indices = _sample_indices(index_key, data, replica, batch_size)
    images = jnp.asarray(data['image'])[indices]
    if augment:
      images = _flip_and_crop(augment_key, images, padding, pad_mode)
    return {
        'image': normalize(images, jnp.asarray(data['mean']),
                           jnp.asarray(data['std'])),
        'label': jnp.asarray(data['label'])[indices],
    }

  return batch_fn


def _sample_indices(key: jax.Array, data: Mapping[str, Any], replica: Any,
                    batch_size: int) -> jax.Array:
  """Training-set indices of one batch, uniform with replacement."""
  if 'subsets' not in data:
    return jax.random.randint(key, (batch_size,), 0, data['label'].shape[0])
  subset = jax.lax.dynamic_index_in_dim(jnp.asarray(data['subsets']), replica,
                                        keepdims=False)
  positions = jax.random.randint(key, (batch_size,), 0, subset.shape[0])
  return subset[positions]


def _flip_and_crop(key: jax.Array, images: jax.Array, padding: int,
                   pad_mode: str) -> jax.Array:
  """Random left-right flip, then pad and random crop, per image."""
  num, height, width, channels = images.shape
  flip_key, crop_key = jax.random.split(key)
  flips = jax.random.bernoulli(flip_key, 0.5, (num,))
  offsets = jax.random.randint(crop_key, (num, 2), 0, 2 * padding + 1)
  images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
  pad = (padding, padding)
  padded = jnp.pad(images, ((0, 0), pad, pad, (0, 0)), mode=pad_mode)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                 (height, width, channels))

  return jax.vmap(crop)(padded, offsets)


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------
def eval_batches(arrays: Mapping[str, np.ndarray],
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Walks a split in fixed order, in batches of one shape.

  The last batch is padded with zero images (label 0) up to ``batch_size``,
  and ``mask`` is False on the padding, so a jitted evaluation step compiles
  once and counts only real examples.

  Args:
    arrays: ``{'image': uint8 [N, H, W, C], 'label': int [N]}``, e.g. from
      :func:`load`.
    batch_size: examples per batch B, >= 1.

  Returns:
    An iterator over ceil(N / B) batches ``{'image': uint8 [B, H, W, C],
    'label': int32 [B], 'mask': bool [B]}``.

  Raises:
    ValueError: for a bad ``batch_size`` or mismatched arrays (raised here,
      not when iterating).
  """
  _check_int('batch_size', batch_size, 1)
  image, label = arrays['image'], np.asarray(arrays['label'])
  _check_images("arrays['image']", image)
  _check_labels("arrays['label']", label, image.shape[0])
  return _padded_batches(image, label.astype(np.int32), batch_size)


def _padded_batches(image: np.ndarray, label: np.ndarray,
                    batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  for start in range(0, image.shape[0], batch_size):
    size = min(batch_size, image.shape[0] - start)
    pad = batch_size - size
    yield {
        'image': np.pad(image[start:start + size],
                        ((0, pad), (0, 0), (0, 0), (0, 0))),
        'label': np.pad(label[start:start + size], (0, pad)),
        'mask': np.arange(batch_size) < size,
    }
