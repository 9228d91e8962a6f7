"""Tests for parle_jax.data.sampling: statistics, subsets, sampling, batches.

Sampling tests use synthetic images whose pixels identify the example they
came from; the normalisation test also runs on real Fashion-MNIST (the
`fashion` fixture of conftest).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parle_jax import data


def _mnist_like(n=5):
  return np.zeros((n, 28, 28, 1), np.uint8), np.arange(n, dtype=np.int32)


# ----------------------------------------------------------------------------
# Normalisation.


def test_normalize_gives_zero_mean_unit_std_on_the_train_set(fashion):
  _, train, _ = fashion
  mean, std = data.channel_stats(train['image'])
  normalised = data.normalize(train['image'], mean, std)
  assert normalised.dtype == np.float32
  np.testing.assert_allclose(normalised.mean(dtype=np.float64), 0.0, atol=1e-5)
  np.testing.assert_allclose(normalised.std(dtype=np.float64), 1.0, atol=1e-5)


def test_channel_stats_are_exact():
  rng = np.random.default_rng(0)
  images = np.concatenate([rng.integers(0, 256, (50, 6, 7, 1)),
                           rng.integers(100, 140, (50, 6, 7, 1)),
                           rng.integers(0, 2, (50, 6, 7, 1))], -1).astype(np.uint8)
  mean, std = data.channel_stats(images)
  assert mean.dtype == std.dtype == np.float32 and mean.shape == (3,)
  as_float = images.astype(np.float64) / 255
  np.testing.assert_allclose(mean, as_float.mean((0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, as_float.std((0, 1, 2)), rtol=1e-6)
  normalised = data.normalize(images, mean, std)
  np.testing.assert_allclose(normalised.mean((0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(normalised.std((0, 1, 2)), 1, atol=1e-5)
  # The same numbers from JAX arrays inside jit.
  jitted = jax.jit(data.normalize)(jnp.asarray(images), jnp.asarray(mean),
                                   jnp.asarray(std))
  np.testing.assert_allclose(jitted, normalised, rtol=1e-6, atol=1e-6)


def test_normalisation_arguments_are_checked():
  with pytest.raises(ValueError, match='constant channel'):
    data.channel_stats(np.full((2, 3, 3, 1), 7, np.uint8))
  with pytest.raises(ValueError, match=r'uint8 \[N, H, W, C\], got float32'):
    data.channel_stats(np.zeros((2, 3, 3, 1), np.float32))
  with pytest.raises(ValueError, match=r'shape \(3,\)'):
    data.normalize(np.zeros((2, 3, 3, 3), np.uint8), np.zeros(1), np.ones(1))


# ----------------------------------------------------------------------------
# Subsets and the device pytree.


def test_make_subsets():
  subsets = data.make_subsets(100, 3, 0.3, seed=0)
  assert subsets.shape == (3, 30) and subsets.dtype == np.int32
  for row in subsets:
    assert len(np.unique(row)) == 30
    assert 0 <= row.min() and row.max() < 100
  assert not np.array_equal(subsets[0], subsets[1])
  assert not np.array_equal(subsets[1], subsets[2])
  np.testing.assert_array_equal(subsets, data.make_subsets(100, 3, 0.3, seed=0))
  assert not np.array_equal(subsets, data.make_subsets(100, 3, 0.3, seed=1))
  assert data.make_subsets(1000, 6, 0.25, seed=0).shape == (6, 250)
  np.testing.assert_array_equal(data.make_subsets(10, 2, 1.0, seed=0),
                                [np.arange(10)] * 2)


@pytest.mark.parametrize('fraction', [0.0, -0.5, 1.5])
def test_make_subsets_rejects_bad_fractions(fraction):
  with pytest.raises(ValueError, match=rf'data_fraction.*\(0, 1\], got {fraction}'):
    data.make_subsets(100, 3, fraction, seed=0)


def test_make_subsets_rejects_empty_subsets():
  with pytest.raises(ValueError, match='data_fraction.*no data'):
    data.make_subsets(100, 3, 0.001, seed=0)


def test_device_data():
  image, label = _mnist_like(5)
  built = data.device_data({'image': image, 'label': label.astype(np.int64)},
                           [0.5], [0.25])
  assert set(built) == {'image', 'label', 'mean', 'std'}
  assert built['label'].dtype == np.int32 and built['mean'].dtype == np.float32
  with_subsets = data.device_data({'image': image, 'label': label}, [0.5],
                                  [0.25], subsets=np.array([[0, 4], [1, 2]]))
  assert with_subsets['subsets'].dtype == np.int32
  with pytest.raises(ValueError, match=r'`subsets` must index 0\.\.4'):
    data.device_data({'image': image, 'label': label}, [0.5], [0.25],
                     subsets=np.array([[0, 5]]))
  with pytest.raises(ValueError, match=r'`mean` and `std` must have shape \(1,\)'):
    data.device_data({'image': image, 'label': label}, [0.5, 0.5], [0.25])


# ----------------------------------------------------------------------------
# Sampling and augmentation.


def _indexed_data(n=200, size=8, subsets=None):
  """Images whose every pixel is the example's index (n <= 256), labels 7i % 10."""
  image = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                          (n, size, size, 1))
  arrays = {'image': image, 'label': (7 * np.arange(n)) % 10}
  return data.device_data(arrays, [0.0], [1.0], subsets)


def _indices(batch):
  """Recovers the source indices from batches of `_indexed_data`.

  Crops keep at least half of each image, zero padding only adds zeros: the
  brightest pixel is the index.
  """
  values = np.rint(np.asarray(batch['image']) * 255).astype(np.int64)
  return values.max(axis=(-3, -2, -1))


def test_batch_fn_shapes_and_determinism():
  arrays = _indexed_data()
  batch_fn = jax.jit(data.make_batch_fn(16, augment=False))
  key = jax.random.PRNGKey(0)
  batch = batch_fn(arrays, key, 3, 0)
  assert batch['image'].shape == (16, 8, 8, 1)
  assert batch['image'].dtype == jnp.float32
  assert batch['label'].shape == (16,) and batch['label'].dtype == jnp.int32
  indices = _indices(batch)
  np.testing.assert_allclose(
      batch['image'], np.broadcast_to(indices[:, None, None, None] / 255,
                                      (16, 8, 8, 1)), rtol=1e-6)
  np.testing.assert_array_equal(batch['label'], (7 * indices) % 10)
  np.testing.assert_array_equal(_indices(batch_fn(arrays, key, 3, 0)), indices)
  # Without subsets the replica index does not matter: rng is already per replica.
  np.testing.assert_array_equal(_indices(batch_fn(arrays, key, 3, 2)), indices)
  assert not np.array_equal(_indices(batch_fn(arrays, key, 4, 0)), indices)
  assert not np.array_equal(
      _indices(batch_fn(arrays, jax.random.PRNGKey(1), 3, 0)), indices)


def _draw(batch_fn, arrays, steps, replicas):
  """Indices drawn by each replica over `steps` steps: [replicas, steps, B]."""
  keys = jax.random.split(jax.random.PRNGKey(0), replicas)

  def one_replica(key, replica):
    def step(_, t):
      return None, batch_fn(arrays, key, t, replica)
    return jax.lax.scan(step, None, jnp.arange(steps, dtype=jnp.int32))[1]

  batches = jax.jit(jax.vmap(one_replica))(keys, jnp.arange(replicas))
  return _indices(batches)


def test_batch_fn_samples_uniformly_with_replacement():
  arrays = _indexed_data(n=10)
  indices = _draw(data.make_batch_fn(8, augment=False), arrays, 250, 1)[0]
  counts = np.bincount(indices.ravel(), minlength=10)
  assert counts.sum() == 2000
  assert counts.min() > 140 and counts.max() < 260  # 200 +- 13 each
  # With replacement, 8 draws out of 10 repeat one with probability 0.98.
  repeats = np.mean([len(np.unique(batch)) < 8 for batch in indices])
  assert repeats > 0.9


def test_split_mode_draws_only_from_the_replicas_subset():
  subsets = data.make_subsets(200, 3, 0.1, seed=0)
  arrays = _indexed_data(n=200, subsets=subsets)
  indices = _draw(data.make_batch_fn(32, augment=False), arrays, 10, 3)
  for replica in range(3):
    # 320 draws from 20 examples: every one of them, and nothing else.
    np.testing.assert_array_equal(np.unique(indices[replica]), subsets[replica])


def _flips_and_crops(images, padding, pad_mode):
  """Maps the bytes of every flip-and-crop of every image to (index, flip, dy, dx)."""
  _, height, width, _ = images.shape
  pad = (padding, padding)
  crops = {}
  for flip in (0, 1):
    flipped = images[:, :, ::-1] if flip else images
    padded = np.pad(flipped, ((0, 0), pad, pad, (0, 0)), mode=pad_mode)
    for dy in range(2 * padding + 1):
      for dx in range(2 * padding + 1):
        for index, crop in enumerate(padded[:, dy:dy + height, dx:dx + width]):
          crops.setdefault(crop.tobytes(), []).append((index, flip, dy, dx))
  return crops


@pytest.mark.parametrize('pad_mode', ['constant', 'symmetric'])
def test_augmentation_flips_and_crops_and_keeps_labels(pad_mode):
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (40, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 40)
  arrays = data.device_data({'image': images, 'label': labels}, [0.0], [1.0])
  batch_fn = jax.jit(data.make_batch_fn(400, augment=True, pad_mode=pad_mode))
  batch = batch_fn(arrays, jax.random.PRNGKey(0), 0, 0)
  outputs = np.rint(np.asarray(batch['image']) * 255).astype(np.uint8)

  crops = _flips_and_crops(images, 4, pad_mode)
  found = []
  for output, label in zip(outputs, np.asarray(batch['label'])):
    sources = crops.get(output.tobytes())
    assert sources, 'output is no flip-and-crop of any training image'
    # Every training image that could have produced it carries the label.
    assert {labels[index] for index, *_ in sources} == {label}
    found.append(sources[0][1:])
  flips, dys, dxs = np.array(found).T
  assert 0.4 < flips.mean() < 0.6
  assert set(dys) == set(dxs) == set(range(9))
  if pad_mode == 'constant':  # zero padding: black borders in shifted crops
    assert (outputs == 0).any(axis=(1, 2, 3)).mean() > 0.5


def test_no_augmentation_returns_training_images():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (30, 4, 5, 3), dtype=np.uint8)
  arrays = data.device_data({'image': images, 'label': np.arange(30)},
                            [0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
  batch = jax.jit(data.make_batch_fn(64, augment=False))(
      arrays, jax.random.PRNGKey(3), 0, 0)
  expected = data.normalize(images[np.asarray(batch['label'])],
                            arrays['mean'], arrays['std'])
  np.testing.assert_allclose(batch['image'], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('kwargs, message', [
    (dict(batch_size=0, augment=False), '`batch_size` must be an integer >= 1, got 0'),
    (dict(batch_size=2.5, augment=False), '`batch_size` must be an integer >= 1, got 2.5'),
    (dict(batch_size=8, augment=True, padding=-1), '`padding` must be an integer >= 0'),
    (dict(batch_size=8, augment=True, pad_mode='wrap'), "`pad_mode` must be one of .*'wrap'"),
])
def test_make_batch_fn_checks_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    data.make_batch_fn(**kwargs)


# ----------------------------------------------------------------------------
# Evaluation batches.


@pytest.mark.parametrize('num, batch_size, num_batches', [(10, 4, 3), (8, 4, 2),
                                                           (3, 8, 1)])
def test_eval_batches_cover_each_example_once(num, batch_size, num_batches):
  rng = np.random.default_rng(0)
  arrays = {'image': rng.integers(0, 256, (num, 3, 3, 2), dtype=np.uint8),
            'label': rng.integers(0, 10, num)}
  batches = list(data.eval_batches(arrays, batch_size))
  assert len(batches) == num_batches
  for batch in batches:
    assert batch['image'].shape == (batch_size, 3, 3, 2)
    assert batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32 and batch['mask'].dtype == bool
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(num_batches * batch_size) < num)
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(images[mask], arrays['image'])
  np.testing.assert_array_equal(labels[mask], arrays['label'])
  assert not images[~mask].any() and not labels[~mask].any()


def test_eval_batches_checks_batch_size_eagerly():
  image, label = _mnist_like()
  with pytest.raises(ValueError, match='`batch_size` must be an integer >= 1, got 0'):
    data.eval_batches({'image': image, 'label': label}, 0)
