"""The Flax NNX adapter (parle_jax/nnx.py): the same rounds as the Linen path.

LeNet with batch norm and dropout on, n = 3 replicas, L = 2 inner steps,
4 images per step (random, 28x28x1): the NNX LeNet given the Linen LeNet's
initial weights runs the fused Parle round to the Linen numbers; dropout
repeats bitwise and differs across replicas; a checkpointed, resumed run equals
an uninterrupted one; the per-step nnx.Optimizer route under jax.pmap matches
the fused round; the saved reference loads into the NNX module.
"""

import functools
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import parle_jax
from parle_jax import checkpoint, models, training
from parle_jax import nnx as parle_nnx

N, L, BATCH = 3, 2, 4
IMAGE_SHAPE = (28, 28, 1)
PARLE = dict(gamma=0.03, rho=1.0, weight_decay=1e-3)


def make_batches(rounds, seed=0, same_for_all=False):
  """Per round, batches with leading axes [N, L] (all replicas alike if `same_for_all`)."""
  rng = np.random.default_rng(seed)
  shape = (1 if same_for_all else N, rounds * L, BATCH)
  images = rng.normal(size=shape + IMAGE_SHAPE).astype(np.float32)
  labels = rng.integers(0, 10, size=shape).astype(np.int32)
  images, labels = (np.broadcast_to(x, (N,) + x.shape[1:]) for x in (images, labels))
  return [{'image': images[:, k * L:(k + 1) * L], 'label': labels[:, k * L:(k + 1) * L]}
          for k in range(rounds)]


def nnx_split(dropout=0.25, same_init=False):
  return parle_nnx.init_replica_variables(
      lambda rngs: parle_nnx.LeNet(dropout=dropout, rngs=rngs), N, seed=0, same_init=same_init)


@functools.lru_cache(maxsize=None)
def round_for(kind, dropout=0.25, devices=1):
  """(replicas, parts, round_fn) of the 'linen' or 'nnx' LeNet, compiled once per test module."""
  replicas = parle_jax.Replicas(N, devices=jax.devices()[:devices], mapping='vmap')
  parts = parle_jax.parle_parts(0.1, L=L, axis_name=replicas.axis_name, **PARLE)
  if kind == 'linen':
    loss_fn = training.classification_loss(models.LeNet(dropout=dropout))
  else:
    loss_fn = parle_nnx.classification_loss(nnx_split(dropout), train=True)
  return replicas, parts, parle_jax.parts_round(loss_fn, parts, replicas)


def run_rounds(kind, params, model_state, batches, dropout=0.25, devices=1):
  """Fused Parle rounds from the given [N, ...] variables; returns (state, metrics, replicas)."""
  replicas, parts, round_fn = round_for(kind, dropout, devices)
  state = parle_jax.init_replicas(replicas, parts.inner, params, model_state, seed=7)
  metrics = []
  for batch in batches:
    state, m = round_fn(state, batch)
    metrics.append(replicas.unshard(m))
  return state, metrics, replicas


@pytest.fixture(scope='module')
def linen_variables():
  return training.init_replica_variables(models.LeNet(), jax.random.PRNGKey(3), N, IMAGE_SHAPE)


def test_fused_round_matches_linen_with_dropout_and_batch_norm(linen_variables):
  params, model_state = linen_variables
  split = nnx_split()
  # The same trees, key for key and shape for shape: the Linen weights go in as they are.
  assert jax.tree.structure(split.params) == jax.tree.structure(params)
  assert jax.tree.structure(split.model_state) == jax.tree.structure(dict(model_state))
  chex.assert_trees_all_equal_shapes(split.params, params)
  batches = make_batches(2)
  linen_state, linen_metrics, replicas = run_rounds('linen', params, dict(model_state), batches)
  nnx_state, nnx_metrics, _ = run_rounds('nnx', params, dict(model_state), batches)
  for got, want in zip(nnx_metrics, linen_metrics):
    assert sorted(got) == sorted(want) == ['error', 'loss']
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-5)
    np.testing.assert_array_equal(got['error'], want['error'])
  for name in ('params', 'model_state'):
    got, want = (replicas.unshard(getattr(s, name)) for s in (nnx_state, linen_state))
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
  # The rounds moved the weights, and dropout was on (rate 0 gives other losses).
  assert not np.allclose(replicas.unshard(nnx_state.params)['Dense_1']['kernel'],
                         params['Dense_1']['kernel'])
  _, no_dropout, _ = run_rounds('nnx', params, dict(model_state), batches[:1], dropout=0.0)
  assert np.abs(no_dropout[0]['loss'] - nnx_metrics[0]['loss']).max() > 1e-3


def test_islands_train_as_one_device_per_replica(linen_variables):
  """Replicas over islands of 2 devices (half the batch each, BN over the island) = 1 device."""
  params, model_state = linen_variables
  batches = make_batches(1)
  results = {}
  for k in (1, 2):
    replicas = parle_jax.Replicas(N, devices=jax.devices()[:N * k], mapping='vmap',
                                  devices_per_replica=k)
    split = parle_nnx.init_replica_variables(
        lambda rngs, k=k: parle_nnx.LeNet(dropout=0.0, rngs=rngs, batch_norm_axis_name=(
            'data' if k > 1 else None)), N, seed=0)
    parts = parle_jax.parle_parts(0.1, L=L, axis_name=replicas.axis_name, **PARLE)
    round_fn = parle_jax.parts_round(parle_nnx.classification_loss(split, train=True), parts,
                                     replicas)
    state = parle_jax.init_replicas(replicas, parts.inner, params, dict(model_state), seed=7)
    state, metrics = round_fn(state, batches[0])
    results[k] = replicas.gather((state.params, state.model_state, metrics))
  chex.assert_trees_all_close(results[2], results[1], rtol=1e-4, atol=1e-5)


def test_dropout_repeats_bitwise_and_differs_across_replicas():
  split = nnx_split(same_init=True)  # equal replicas on equal batches: only dropout differs
  batches = make_batches(1, same_for_all=True)
  runs = [run_rounds('nnx', split.params, split.model_state, batches) for _ in range(2)]
  (state_a, metrics_a, replicas), (state_b, metrics_b, _) = runs
  chex.assert_trees_all_equal(replicas.unshard(state_a), replicas.unshard(state_b))
  chex.assert_trees_all_equal(metrics_a, metrics_b)
  losses = metrics_a[0]['loss']  # [N, L]
  assert len({float(x) for x in losses[:, 0]}) == N, losses
  # Without dropout the replicas' first steps agree.
  _, plain, _ = run_rounds('nnx', split.params, split.model_state, batches, dropout=0.0)
  assert len({float(x) for x in plain[0]['loss'][:, 0]}) == 1


class DropoutKeeper(nnx.Module):
  """A module that keeps its dropout RNG stream (the usual NNX style)."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 3, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.dropout(self.linear(x))


def test_module_rng_streams_are_reseeded_from_the_round_rng_not_carried():
  split = parle_nnx.init_replica_variables(DropoutKeeper, N, same_init=True)
  assert parle_nnx._rng_streams(split.rng_state) == ['default']  # pylint: disable=protected-access
  assert sorted(split.params) == ['linear'] and split.model_state == {}
  loss_fn = parle_nnx.classification_loss(split, pass_rng=False)
  batch = {'image': jnp.ones((8, 4)), 'label': jnp.zeros(8, jnp.int32)}
  params = jax.tree.map(lambda x: x[0], split.params)
  losses = [float(loss_fn(params, {}, batch, jax.random.PRNGKey(k))[0]) for k in (0, 0, 1)]
  assert losses[0] == losses[1] != losses[2]  # the rng decides the mask, nothing else does


def test_resumed_through_checkpointer_equals_uninterrupted(tmp_path):
  split = nnx_split()
  batches = make_batches(2, seed=1)
  whole, whole_metrics, replicas = run_rounds('nnx', split.params, split.model_state, batches)
  first, _, _ = run_rounds('nnx', split.params, split.model_state, batches[:1])
  checkpointer = checkpoint.Checkpointer(str(tmp_path / 'ckpt'))
  checkpointer.save(1, first, {'note': 'after one round'})
  restored, record = checkpointer.restore(first)
  checkpointer.close()
  assert record['round'] == 1
  resumed, metrics = round_for('nnx')[2](restored, batches[1])  # the round, called again
  chex.assert_trees_all_equal(replicas.unshard(resumed), replicas.unshard(whole))
  np.testing.assert_array_equal(replicas.unshard(metrics)['loss'], whole_metrics[1]['loss'])


def test_per_step_nnx_optimizer_under_pmap_matches_fused_round():
  """nnx.Optimizer with parle_jax.parle, one replica per device: the fused round's numbers."""
  split = nnx_split()
  batches = make_batches(2, seed=2)
  fused, fused_metrics, replicas = run_rounds('nnx', split.params, split.model_state, batches,
                                              devices=N)
  tx = parle_jax.parle(0.1, L=L, axis_name='replica', **PARLE)

  def build(params, model_state):
    model = parle_nnx.merge(split, params, model_state)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, _ = nnx.split(build(*jax.tree.map(lambda x: x[0], (split.params,
                                                                split.model_state))))
  devices = jax.devices()[:N]
  state = jax.pmap(lambda p, s: nnx.state(build(p, s)), axis_name='replica',
                   devices=devices)(split.params, split.model_state)

  def step(state, batch, rng):
    model, optimizer = nnx.merge(graphdef, state)

    def loss(model):
      logits = model(batch['image'], train=True, rngs=rng)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), value

  # The coupling stays a branch: the one all-reduce of the step lies inside its lax.cond.
  one = jax.tree.map(lambda x: x[0], state)
  jaxpr = jax.make_jaxpr(step, axis_env=[('replica', N)])(
      one, jax.tree.map(lambda x: x[0, 0], batches[0]), jax.random.PRNGKey(0)).jaxpr
  conds = [e for e in jaxpr.eqns if e.primitive.name == 'cond']
  assert len(conds) == 1
  coupling = str(conds[0].params['branches'][1])  # printed with every nested jaxpr
  assert str(jaxpr).count('psum') == coupling.count('psum') > 0
  step = jax.pmap(step, axis_name='replica', devices=devices)
  # The round's rngs: replica i's key, then fold_in(fold_in(key, 1), step).
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(7), i))(jnp.arange(N))
  losses = []
  for t in range(2 * L):
    batch = jax.tree.map(lambda x: x[:, t % L], batches[t // L])
    rngs = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, 1), t))(keys)
    state, loss = step(state, batch, rngs)
    losses.append(np.asarray(loss))
  np.testing.assert_allclose(np.stack(losses[L:], 1), fused_metrics[1]['loss'], rtol=1e-5)
  model_state = nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)
  chex.assert_trees_all_close(nnx.to_pure_dict(model_state), replicas.unshard(fused.params),
                              rtol=1e-4, atol=1e-6)


def test_saved_linen_reference_loads_into_nnx_lenet(tmp_path, linen_variables):
  params, model_state = linen_variables
  variables = jax.tree.map(lambda x: x[1], {'params': params, **model_state})
  path = str(tmp_path / 'reference')
  checkpoint.save_variables(path, variables)  # as the training binary saves the reference
  model = parle_nnx.load_variables(parle_nnx.LeNet(rngs=nnx.Rngs(0)),
                                   checkpoint.load_variables(path))
  images = jnp.asarray(make_batches(1)[0]['image'][0, 0])
  np.testing.assert_allclose(model(images, train=False),
                             models.LeNet().apply(variables, images, train=False), rtol=1e-5,
                             atol=1e-6)
  chex.assert_trees_all_equal(parle_nnx.to_variables(model), variables)


def test_reference_and_replica_modules():
  split = nnx_split()
  kernels = split.params['Dense_1']['kernel']  # [N, 500, 10]: one seed per replica
  assert all(not np.allclose(kernels[i], kernels[j]) for i in range(N) for j in range(i))
  same = nnx_split(same_init=True).params['Dense_1']['kernel']
  np.testing.assert_array_equal(same, np.broadcast_to(same[:1], same.shape))
  state, _, replicas = run_rounds('nnx', split.params, split.model_state, make_batches(1))
  mean = jax.tree.map(lambda x: x.mean(0), replicas.unshard(state.params))
  reference = parle_nnx.to_variables(parle_nnx.reference(split, replicas, state))
  chex.assert_trees_all_close(reference['params'], mean, rtol=1e-6)
  second = parle_nnx.to_variables(parle_nnx.replica(split, replicas, state, 2))
  chex.assert_trees_all_equal(second['params'],
                              jax.tree.map(lambda x: x[2], replicas.unshard(state.params)))


class NoParams(nnx.Module):
  def __init__(self, rngs):
    del rngs
    self.count = nnx.BatchStat(jnp.zeros(()))


def test_bad_input_gets_one_clear_value_error():
  with pytest.raises(ValueError, match=r'\(NoParams\) has no nnx.Param variables'):
    parle_nnx.init_replica_variables(NoParams, N)
  with pytest.raises(ValueError, match=r'`module` must be a flax.nnx.Module, got LeNet'):
    parle_nnx.split(models.LeNet())
  with pytest.raises(ValueError, match='`num_replicas` must be an integer >= 1, got 0'):
    parle_nnx.init_replica_variables(DropoutKeeper, 0)
  model = parle_nnx.LeNet(rngs=nnx.Rngs(0))
  variables = parle_nnx.to_variables(parle_nnx.LeNet(num_classes=5, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"`variables\['params'\]\['Dense_1'\]\['bias'\]` is "
                                       r'\(5,\) in the variables, \(10,\) in this LeNet'):
    parle_nnx.load_variables(model, variables)
  with pytest.raises(ValueError, match=r"collections \['batch_stats', 'params'\]"):
    parle_nnx.load_variables(model, {'params': variables['params']})
  stacked = nnx_split()
  with pytest.raises(ValueError, match='this Split holds 3 stacked replicas'):
    parle_nnx.merge(stacked)
  with pytest.raises(ValueError, match=r"`params\['BatchNorm_0'\]\['bias'\]` is \(3, 20\) here, "
                                       r'\(20,\) in one replica'):
    parle_nnx.merge(stacked, stacked.params, jax.tree.map(lambda x: x[0], stacked.model_state))
  with pytest.raises(ValueError, match='`split_` must be a parle_jax.nnx.Split'):
    parle_nnx.classification_loss(model)
  with pytest.raises(ValueError, match='`dropout` must be in'):
    parle_nnx.LeNet(dropout=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='needs a key: call it with rngs=key'):
    model(jnp.zeros((1,) + IMAGE_SHAPE), train=True)


def test_only_the_adapter_imports_flax_nnx():
  package = pathlib.Path(parle_jax.__file__).parent
  importing = sorted(
      path.relative_to(package).as_posix() for path in package.rglob('*.py')
      if re.search(r'^\s*(from\s+flax\s+import\s+.*\bnnx\b|import\s+flax\.nnx|from\s+flax\.nnx)',
                   path.read_text(encoding='utf-8'), re.MULTILINE))
  assert importing == ['nnx.py']
