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

Layers 1 and 2 (the registry, TFDS and the cache) live in
:mod:`parle_jax.data.datasets`; layer 3 and the statistics in
:mod:`parle_jax.data.sampling`, which never imports the former. This package
re-exports the public names of both.

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

from parle_jax.data.datasets import (DATASETS, DEFAULT_FASHION_MNIST_DIR,
                                     FASHION_MNIST_DIR_ENV, FASHION_MNIST_FILES,
                                     CorruptCacheError, CorruptFileError,
                                     DatasetInfo, DataUnavailableError,
                                     PathLike, cache_path, dataset_info, load,
                                     prepare)
from parle_jax.data.sampling import (BatchFn, channel_stats, device_data,
                                     eval_batches, make_batch_fn, make_subsets,
                                     normalize)

__all__ = [
    'BatchFn', 'CorruptCacheError', 'CorruptFileError', 'DATASETS',
    'DEFAULT_FASHION_MNIST_DIR', 'DataUnavailableError', 'DatasetInfo',
    'FASHION_MNIST_DIR_ENV', 'FASHION_MNIST_FILES', 'PathLike', 'cache_path',
    'channel_stats', 'dataset_info', 'device_data', 'eval_batches', 'load',
    'make_batch_fn', 'make_subsets', 'normalize', 'prepare',
]
