"""Host-side statistics and on-device sampling of the training data.

:func:`channel_stats` and :func:`normalize` turn uint8 images into float32
with the per-channel statistics of the training set. :func:`device_data`
builds the training pytree kept on the device, optionally with per-replica
subsets (:func:`make_subsets`); :func:`make_batch_fn` draws mini-batches from
it inside ``jit``/``pmap``/``lax.scan``; :func:`eval_batches` walks a split in
fixed-shape, masked batches. Needs JAX and NumPy only, never TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parle_jax import checks

# batch_fn(data, rng, step, replica) -> {'image': float32, 'label': int32}.
BatchFn = Callable[[Mapping[str, Any], jax.Array, Any, Any],
                   dict[str, jax.Array]]

# Images per chunk in channel_stats, to bound its temporary memory.
_STATS_CHUNK = 10_000
_PAD_MODES = ('constant', 'edge', 'reflect', 'symmetric')


# ----------------------------------------------------------------------------
# Argument checks: eager ValueErrors naming the argument.
# ----------------------------------------------------------------------------
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
  checks.images('images', images)
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
  checks.channel_stats(mean, std, images.shape[-1])
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
  checks.integer('num_examples', num_examples, 1)
  checks.integer('num_replicas', num_replicas, 1)
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
      int [N]}``, e.g. from :func:`parle_jax.data.datasets.load`.
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
  checks.images("arrays['image']", image)
  checks.labels("arrays['label']", label, image.shape[0])
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  checks.channel_stats(mean, std, image.shape[-1])
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
  checks.integer('batch_size', batch_size, 1)
  checks.integer('padding', padding, 0)
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
      :func:`parle_jax.data.datasets.load`.
    batch_size: examples per batch B, >= 1.

  Returns:
    An iterator over ceil(N / B) batches ``{'image': uint8 [B, H, W, C],
    'label': int32 [B], 'mask': bool [B]}``.

  Raises:
    ValueError: for a bad ``batch_size`` or mismatched arrays (raised here,
      not when iterating).
  """
  checks.integer('batch_size', batch_size, 1)
  image, label = arrays['image'], np.asarray(arrays['label'])
  checks.images("arrays['image']", image)
  checks.labels("arrays['label']", label, image.shape[0])
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
