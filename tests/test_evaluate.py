"""Tests for parle_jax.evaluate against independent NumPy computations.

A tiny network (a nested conv block with BN, dropout, dense + BN with another
momentum) keeps compilation short; LeNet checks the real model. Parameters
are random NumPy arrays shaped by ``jax.eval_shape`` (no init compile).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parle_jax
from parle_jax import data, evaluate, models

EPS = 1e-5
N_REPLICAS = 3
NUM_CLASSES = 5
IMAGE_SHAPE = (8, 8, 1)
MEAN, STD = np.array([0.45], np.float32), np.array([0.3], np.float32)


class Block(nn.Module):
  """3x3 SAME convolution and BN (momentum 0.9): a nested BN path."""

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(4, (3, 3))(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS)(x)


class Tiny(nn.Module):
  """block -> relu -> dropout -> dense 6 -> BN (momentum 0.7) -> relu -> dense."""

  dropout: float = 0.5

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.relu(Block(name='block')(x, train=train))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(6)(x.reshape((x.shape[0], -1)))
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.7, epsilon=EPS)(x))
    return nn.Dense(NUM_CLASSES)(x)


TINY = Tiny()


def random_variables(model, image_shape, num, seed):
  """`num` stacked random {'params', 'batch_stats'} of `model` (NumPy float32)."""
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False))
  rng = np.random.default_rng(seed)

  def param(path, s):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return rng.uniform(0.5, 1.5, (num, *s.shape)).astype(np.float32)
    return (0.3 * rng.standard_normal((num, *s.shape))).astype(np.float32)

  def stat(path, s):
    if 'var' in jax.tree_util.keystr(path):
      return rng.uniform(0.5, 2.0, (num, *s.shape)).astype(np.float32)
    return (0.2 * rng.standard_normal((num, *s.shape))).astype(np.float32)

  return (jax.tree_util.tree_map_with_path(param, shapes['params']),
          jax.tree_util.tree_map_with_path(stat, shapes['batch_stats']))


def take(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def random_split(num, seed, shape=IMAGE_SHAPE):
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (num, *shape), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, num).astype(np.int32)}


def bn_batches_of(num_batches, batch, seed, shape=IMAGE_SHAPE):
  images = random_split(num_batches * batch, seed, shape)['image']
  return np.asarray(data.normalize(images, MEAN, STD)).reshape(num_batches, batch, *shape)


# --- independent NumPy computations -------------------------------------------


def conv_numpy(x, kernel, bias, padding):
  """Cross-correlation NHWC x HWIO (+ bias), float64, 'SAME' (odd kernel) or 'VALID'."""
  kh, kw = kernel.shape[:2]
  if padding == 'SAME':
    x = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  patches = np.stack([x[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], 3)
  return np.einsum('bhwpc,pco->bhwo', patches,
                   kernel.reshape(kh * kw, *kernel.shape[2:]).astype(np.float64)) + bias


def batch_norm_numpy(x, mean, var, bn_params):
  return (x - mean) / np.sqrt(var + EPS) * bn_params['scale'] + bn_params['bias']


def tiny_stats_numpy(params, batches):
  """Per-batch BN mean/var of Tiny in train mode without dropout, averaged."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  sums = {k: np.zeros(n) for k, n in (('m1', 4), ('v1', 4), ('m2', 6), ('v2', 6))}
  for x in np.asarray(batches, np.float64):
    a1 = conv_numpy(x, p['block']['Conv_0']['kernel'], p['block']['Conv_0']['bias'], 'SAME')
    m1, v1 = a1.mean((0, 1, 2)), a1.var((0, 1, 2))
    h = np.maximum(batch_norm_numpy(a1, m1, v1, p['block']['BatchNorm_0']), 0)
    a2 = h.reshape(len(h), -1) @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
    m2, v2 = a2.mean(0), a2.var(0)
    for k, v in (('m1', m1), ('v1', v1), ('m2', m2), ('v2', v2)):
      sums[k] += v / len(batches)
  return {'block': {'BatchNorm_0': {'mean': sums['m1'], 'var': sums['v1']}},
          'BatchNorm_0': {'mean': sums['m2'], 'var': sums['v2']}}


@jax.jit
def _tiny_logits(variables, images):
  return TINY.apply(variables, images, train=False)


def log_softmax_numpy(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def metrics_numpy(log_probs, labels):
  """(error %, mean cross-entropy) from float64 log-probabilities."""
  error = 100.0 * np.mean(log_probs.argmax(-1) != labels)
  loss = -np.mean(log_probs[np.arange(len(labels)), labels])
  return error, loss


def replica_log_probs(params, stats, split):
  images = data.normalize(split['image'], MEAN, STD)
  return [log_softmax_numpy(_tiny_logits({'params': take(params, a),
                                          'batch_stats': take(stats, a)}, images))
          for a in range(N_REPLICAS)]


# --- fixtures -------------------------------------------------------------------

REPLICAS = {
    (3, 'vmap'): parle_jax.Replicas(N_REPLICAS, devices=jax.devices()[:3]),
    (1, 'vmap'): parle_jax.Replicas(N_REPLICAS, devices=jax.devices()[:1]),
}
REPLICAS[(1, 'sequential')] = REPLICAS[(1, 'vmap')]


def make_state(replicas, params, stats):
  """Replica state on the devices (evaluation reads only params and model_state)."""
  host = parle_jax.ReplicaState(step=np.zeros(N_REPLICAS, np.int32), params=params,
                                opt_state=(), model_state={'batch_stats': stats},
                                key=np.zeros((N_REPLICAS, 2), np.uint32))
  return replicas.shard(host)


@pytest.fixture(scope='module')
def setup():
  params, stats = random_variables(TINY, IMAGE_SHAPE, N_REPLICAS, seed=1)
  test = random_split(250, seed=2)
  bn_batches = bn_batches_of(3, 40, seed=3)
  replicas = REPLICAS[(3, 'vmap')]
  state = make_state(replicas, params, stats)
  results = evaluate.evaluate(TINY, replicas, state, test, mean=MEAN, std=STD,
                              bn_batches=bn_batches, batch_size=100)
  return dict(params=params, stats=stats, test=test, bn_batches=bn_batches,
              state=state, results=results)


# --- recompute_batch_stats --------------------------------------------------------


def test_recompute_batch_stats_matches_numpy_average_of_batch_statistics():
  params, stats = random_variables(TINY, IMAGE_SHAPE, 1, seed=4)
  params, stats = take(params, 0), take(stats, 0)
  batches = bn_batches_of(3, 16, seed=5)
  got = evaluate.recompute_batch_stats(TINY, params, stats, batches)
  want = tiny_stats_numpy(params, batches)
  assert jax.tree.structure(got) == jax.tree.structure(stats)
  # Tiny applies dropout 0.5 in train mode; the NumPy statistics have none, so
  # a match of the second layer (after the dropout) shows dropout is off; the
  # second BN has momentum 0.7, the first 0.9.
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5), got, want)
  # Equal weights: not the running average a train-mode pass would leave.
  ema = np.zeros(6)
  for m in [tiny_stats_numpy(params, b[None])['BatchNorm_0']['mean'] for b in batches]:
    ema = 0.7 * ema + 0.3 * m
  assert np.max(np.abs(got['BatchNorm_0']['mean'] - ema)) > 1e-2


def test_recompute_batch_stats_lenet_first_layer():
  model = models.LeNet(dropout=0.25)
  params, stats = random_variables(model, (28, 28, 1), 1, seed=6)
  params, stats = take(params, 0), take(stats, 0)
  batches = bn_batches_of(2, 8, seed=7, shape=(28, 28, 1))
  got = evaluate.recompute_batch_stats(model, params, stats, batches)
  conv = params['Conv_0']
  activations = [conv_numpy(np.asarray(b, np.float64), conv['kernel'], conv['bias'], 'VALID')
                 for b in batches]
  np.testing.assert_allclose(got['BatchNorm_0']['mean'],
                             np.mean([a.mean((0, 1, 2)) for a in activations], 0),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got['BatchNorm_0']['var'],
                             np.mean([a.var((0, 1, 2)) for a in activations], 0),
                             rtol=1e-4, atol=1e-5)
  assert jax.tree.structure(got) == jax.tree.structure(stats)
  for leaf in jax.tree.leaves(got):
    assert np.all(np.isfinite(leaf))


def test_recompute_batch_stats_rejects_bad_batches():
  params, stats = random_variables(TINY, IMAGE_SHAPE, 1, seed=4)
  params, stats = take(params, 0), take(stats, 0)
  with pytest.raises(ValueError, match='at least one batch'):
    evaluate.recompute_batch_stats(TINY, params, stats, np.zeros((0, 4, *IMAGE_SHAPE), np.float32))
  with pytest.raises(ValueError, match='normalised float'):
    evaluate.recompute_batch_stats(TINY, params, stats, np.zeros((1, 4, *IMAGE_SHAPE), np.uint8))
  with pytest.raises(ValueError, match='num_batches'):
    evaluate.recompute_batch_stats(TINY, params, stats, np.zeros((4, 8), np.float32))


# --- evaluate -----------------------------------------------------------------------


def test_replica_and_ensemble_metrics_match_numpy_with_padding(setup):
  results, test = setup['results'], setup['test']
  log_probs = replica_log_probs(setup['params'], setup['stats'], test)
  want = [metrics_numpy(lp, test['label']) for lp in log_probs]
  # 250 examples in batches of 100: the padded last batch counts 50 examples once.
  np.testing.assert_allclose(results['replica/test_error'], [e for e, _ in want], atol=1e-9)
  np.testing.assert_allclose(results['replica/test_loss'], [l for _, l in want], rtol=1e-5)
  mean_softmax = np.mean([np.exp(lp) for lp in log_probs], 0)
  error, loss = metrics_numpy(np.log(mean_softmax), test['label'])
  assert results['ensemble/test_error'] == pytest.approx(error, abs=1e-9)
  assert results['ensemble/test_loss'] == pytest.approx(loss, rel=1e-5)
  # The replicas differ, so a mix-up of replicas or of their stats would show.
  assert len(set(results['replica/test_loss'])) == N_REPLICAS


def test_reference_metrics_and_distances_match_numpy(setup):
  results, test, params = setup['results'], setup['test'], setup['params']
  flat = np.stack([np.concatenate([np.ravel(x) for x in jax.tree.leaves(take(params, a))])
                   for a in range(N_REPLICAS)]).astype(np.float64)
  center = flat.mean(0)
  assert results['distance/l2_mean'] == pytest.approx(
      np.mean(np.linalg.norm(flat - center, axis=1)), rel=1e-5)
  assert results['distance/cosine_mean'] == pytest.approx(
      np.mean(flat @ center / np.linalg.norm(flat, axis=1) / np.linalg.norm(center)), rel=1e-5)

  reference = jax.tree.map(lambda x: np.mean(np.asarray(x, np.float64), 0).astype(np.float32),
                           params)
  stats = evaluate.recompute_batch_stats(TINY, reference, take(setup['stats'], 0),
                                         setup['bn_batches'])
  images = data.normalize(test['image'], MEAN, STD)
  log_probs = log_softmax_numpy(_tiny_logits({'params': reference, 'batch_stats': stats}, images))
  error, loss = metrics_numpy(log_probs, test['label'])
  assert results['reference/test_error'] == pytest.approx(error, abs=100 / 250 + 1e-9)
  assert results['reference/test_loss'] == pytest.approx(loss, rel=1e-4)
  # With the first replica's running stats instead, the numbers would differ.
  own = log_softmax_numpy(_tiny_logits(
      {'params': reference, 'batch_stats': take(setup['stats'], 0)}, images))
  assert abs(metrics_numpy(own, test['label'])[1] - loss) > 1e-3


def test_reference_train_error_uses_the_same_reference(setup):
  """On another split, the reference is the same model: the numbers follow the split only."""
  train = random_split(130, seed=7)
  results = evaluate.evaluate(TINY, REPLICAS[(3, 'vmap')], setup['state'], setup['test'],
                              mean=MEAN, std=STD, bn_batches=setup['bn_batches'],
                              batch_size=100, train_arrays=train)
  on_train = evaluate.evaluate(TINY, REPLICAS[(3, 'vmap')], setup['state'], train,
                               mean=MEAN, std=STD, bn_batches=setup['bn_batches'],
                               batch_size=100)
  assert results['reference/test_error'] == setup['results']['reference/test_error']
  assert results['reference/train_error'] == pytest.approx(on_train['reference/test_error'])
  assert results['reference/train_loss'] == pytest.approx(on_train['reference/test_loss'])
  assert 'reference/train_error' not in setup['results']


@pytest.mark.parametrize('layout', [(1, 'vmap'), (1, 'sequential')])
def test_layouts_and_mappings_agree(setup, layout):
  replicas = REPLICAS[layout]
  state = make_state(replicas, setup['params'], setup['stats'])
  results = evaluate.evaluate(TINY, replicas, state, setup['test'], mean=MEAN, std=STD,
                              bn_batches=setup['bn_batches'], batch_size=100, mapping=layout[1])
  assert results.keys() == setup['results'].keys()
  for key, value in setup['results'].items():
    np.testing.assert_allclose(results[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_padding_counts_every_example_once(setup):
  # One batch of 1000 holding 250 examples: the 750 padded rows must not count.
  results = evaluate.evaluate(TINY, REPLICAS[(3, 'vmap')], setup['state'], setup['test'],
                              mean=MEAN, std=STD, bn_batches=setup['bn_batches'],
                              batch_size=1000)
  for key, value in setup['results'].items():
    np.testing.assert_allclose(results[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_identical_replicas(setup):
  replicas = REPLICAS[(3, 'vmap')]
  params = jax.tree.map(lambda x: np.repeat(x[:1], N_REPLICAS, 0), setup['params'])
  # Running stats unrelated to the weights: the reference must not use them.
  stats = jax.tree.map(lambda x: np.repeat(x[:1], N_REPLICAS, 0), setup['stats'])
  kwargs = dict(mean=MEAN, std=STD, bn_batches=setup['bn_batches'], batch_size=100)
  results = evaluate.evaluate(TINY, replicas, make_state(replicas, params, stats),
                              setup['test'], **kwargs)
  assert results['distance/l2_mean'] == pytest.approx(0.0, abs=1e-5)
  assert results['distance/cosine_mean'] == pytest.approx(1.0, abs=1e-6)
  assert results['replica/test_loss'] == pytest.approx([results['ensemble/test_loss']] * 3)
  assert abs(results['reference/test_loss'] - results['replica/test_loss'][0]) > 1e-3

  # Once the replicas' stats are those recomputed on bn_batches, the reference
  # (the same weights, its stats recomputed on the same data) is the replica.
  recomputed = evaluate.recompute_batch_stats(TINY, take(params, 0), take(stats, 0),
                                              setup['bn_batches'])
  stats = jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], N_REPLICAS, 0), recomputed)
  results = evaluate.evaluate(TINY, replicas, make_state(replicas, params, stats),
                              setup['test'], **kwargs)
  assert results['reference/test_error'] == pytest.approx(results['replica/test_error'][0])
  assert results['reference/test_loss'] == pytest.approx(results['replica/test_loss'][0],
                                                         rel=1e-5)


def test_train_error_and_loss(setup):
  test = setup['test']
  results = evaluate.train_error_and_loss(TINY, REPLICAS[(3, 'vmap')], setup['state'], test,
                                          mean=MEAN, std=STD, batch_size=100)
  assert results == {'replica/train_error': setup['results']['replica/test_error'],
                     'replica/train_loss': setup['results']['replica/test_loss']}
  subset = evaluate.train_error_and_loss(TINY, REPLICAS[(3, 'vmap')], setup['state'], test,
                                         mean=MEAN, std=STD, batch_size=100, max_examples=130)
  first = {k: v[:130] for k, v in test.items()}
  want = [metrics_numpy(lp, first['label'])
          for lp in replica_log_probs(setup['params'], setup['stats'], first)]
  np.testing.assert_allclose(subset['replica/train_error'], [e for e, _ in want], atol=1e-9)
  np.testing.assert_allclose(subset['replica/train_loss'], [l for _, l in want], rtol=1e-5)


def test_evaluate_rejects_bad_inputs(setup):
  replicas, state, test = REPLICAS[(3, 'vmap')], setup['state'], setup['test']
  kwargs = dict(mean=MEAN, std=STD, bn_batches=setup['bn_batches'])
  with pytest.raises(ValueError, match='bn_batches images have shape'):
    evaluate.evaluate(TINY, replicas, state, random_split(10, 0, (9, 9, 1)), **kwargs)
  with pytest.raises(ValueError, match='at least one batch'):
    evaluate.evaluate(TINY, replicas, state, test, mean=MEAN, std=STD,
                      bn_batches=np.zeros((0, 4, *IMAGE_SHAPE), np.float32))
  with pytest.raises(ValueError, match='None'):
    evaluate.evaluate(TINY, replicas, state, test, mean=MEAN, std=STD, bn_batches=None)
  with pytest.raises(ValueError, match='no examples'):
    evaluate.evaluate(TINY, replicas, state, random_split(0, 0), **kwargs)
  with pytest.raises(ValueError, match='mapping'):
    evaluate.evaluate(TINY, replicas, state, test, mapping='auto', **kwargs)
  with pytest.raises(ValueError, match='mean and std'):
    evaluate.evaluate(TINY, replicas, state, test, mean=np.zeros(3), std=np.ones(3),
                      bn_batches=setup['bn_batches'])
  with pytest.raises(ValueError, match=r'\[D, R\]'):
    evaluate.evaluate(TINY, REPLICAS[(1, 'vmap')], state, test, **kwargs)
  with pytest.raises(ValueError, match='max_examples'):
    evaluate.train_error_and_loss(TINY, replicas, state, test, mean=MEAN, std=STD,
                                  max_examples=0)
