"""The CPU path (matmul convolutions) and the accelerator path give the same training.

LeNet with batch norm and dropout, Parle with scoped coefficients, n = 3
replicas (a device each; one replica is the same program on an axis of 1),
three ways: the fused round with XLA's convolutions (what GPUs and TPUs run),
the fused round with matmul convolutions (what 'auto' picks on CPU), and the
drop-in optax transform stepped under ``jax.pmap`` (one replica per device,
XLA convolutions). All three draw the same mini-batches and
dropout masks (the keys documented on ``ReplicaState``) and must agree to
float rounding; a checkpoint taken on one path resumes on the other.
"""

import re

import chex
import jax
import numpy as np
import optax
import pytest

import parle_jax
from experiments import train
from parle_jax import checkpoint, data, models, training
from test_rounds import _all_reduces, _computations

L, ROUNDS, BATCH, SEED = 3, 2, 16, 7
IMAGE_SHAPE = (28, 28, 1)


def _coefficients():
  return dict(learning_rate=optax.piecewise_constant_schedule(0.1, {1: 0.5}),
              gamma=parle_jax.scoping(0.05, 1.0, 1), rho=parle_jax.scoping(0.5, 2.0, 1),
              L=L, weight_decay=1e-3)


@pytest.fixture(scope='module')
def setting():
  rng = np.random.default_rng(0)
  host = {'image': rng.integers(0, 256, (256, *IMAGE_SHAPE), dtype=np.uint8),
          'label': rng.integers(0, 10, 256).astype(np.int32)}
  mean, std = data.channel_stats(host['image'])
  return data.device_data(host, mean, std), data.make_batch_fn(BATCH, augment=False)


def _variables(n):
  model = models.LeNet(conv='xla')
  return training.init_replica_variables(model, jax.random.PRNGKey(SEED), n, IMAGE_SHAPE)


def run_fused(setting, n, conv, rounds=ROUNDS, state=None):
  """`rounds` fused rounds on one device; returns (state, replicas, losses [n, rounds * L])."""
  host_data, batch_fn = setting
  replicas = parle_jax.Replicas(n, devices=jax.devices()[:1],
                                mapping='sequential' if n > 1 else 'vmap')
  parts = parle_jax.parle_parts(axis_name=replicas.axis_name, **_coefficients())
  if state is None:
    params, model_state = _variables(n)
    state = parle_jax.init_replicas(replicas, parts.inner, params, model_state, seed=SEED)
  loss_fn = training.classification_loss(models.LeNet(conv=conv))
  round_fn = parle_jax.parle_round(loss_fn, parts, replicas, batch_fn=batch_fn)
  device_data = replicas.broadcast(host_data)
  losses = []
  for _ in range(rounds):
    state, metrics = round_fn(state, device_data)
    losses.append(replicas.unshard(metrics)['loss'])
  return state, replicas, np.concatenate(losses, axis=1) if losses else None


def run_per_step(setting, n):
  """The optax transform in a pmapped step, one replica per device, XLA convolutions."""
  host_data, batch_fn = setting
  tx = parle_jax.parle(axis_name='replica', **_coefficients())
  loss_fn = training.classification_loss(models.LeNet(conv='xla'))

  def train_step(params, opt_state, model_state, key, step, replica, dataset):
    # The keys of a fused round's step: data from fold_in(key, 0), dropout from
    # fold_in(fold_in(key, 1), step), the batch drawn by the same batch_fn.
    batch = batch_fn(dataset, jax.random.fold_in(key, 0), step, replica)
    rng = jax.random.fold_in(jax.random.fold_in(key, 1), step)
    (loss, (model_state, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, model_state, loss

  devices = jax.devices()[:n]
  step_fn = jax.pmap(train_step, axis_name='replica', devices=devices,
                     in_axes=(0, 0, 0, 0, None, 0, None))
  params, model_state = _variables(n)
  opt_state = jax.pmap(tx.init, axis_name='replica', devices=devices)(params)
  replica_ids = np.arange(n, dtype=np.int32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(SEED), i))(replica_ids)
  losses = []
  for t in range(ROUNDS * L):
    params, opt_state, model_state, loss = step_fn(params, opt_state, model_state, keys,
                                                   np.int32(t), replica_ids, host_data)
    losses.append(np.asarray(loss))
  return jax.device_get(params), jax.device_get(model_state), np.stack(losses, axis=1)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _relative(a, b):
  a, b = _flat(a), _flat(b)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_fused_xla_fused_matmul_and_per_step_agree(setting):
  n = 3
  xla_state, replicas, xla_losses = run_fused(setting, n, 'xla')
  matmul_state, _, matmul_losses = run_fused(setting, n, 'matmul')
  params, model_state, step_losses = run_per_step(setting, n)
  expected = {'params': replicas.unshard(xla_state.params),
              'batch_stats': replicas.unshard(xla_state.model_state)}
  for name, got in (('fused matmul', {'params': replicas.unshard(matmul_state.params),
                                      'batch_stats': replicas.unshard(matmul_state.model_state)}),
                    ('per step', {'params': params, 'batch_stats': model_state})):
    for part in ('params', 'batch_stats'):
      error = _relative(got[part], expected[part])
      assert error < 2e-5, f'{name} {part}: relative difference {error:.2e}'
  np.testing.assert_allclose(matmul_losses, xla_losses, rtol=1e-4)
  np.testing.assert_allclose(step_losses, xla_losses, rtol=1e-4)
  chex.assert_tree_all_finite((xla_state, matmul_state, params, model_state))
  # The runs moved: the paths agree on a trajectory, not on the starting point.
  assert _relative(expected['params'], _variables(n)[0]) > 1e-3
  assert np.all(np.isfinite(xla_losses))


def test_checkpoint_from_one_path_resumes_on_the_other(setting, tmp_path):
  uninterrupted, replicas, _ = run_fused(setting, 3, 'xla', rounds=2)
  first, _, _ = run_fused(setting, 3, 'xla', rounds=1)
  saver = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  saver.save(1, first, {'conv': 'xla'})
  like, _, _ = run_fused(setting, 3, 'matmul', rounds=0)
  restored, record = saver.restore(like)
  saver.close()
  assert record['round'] == 1
  resumed, _, _ = run_fused(setting, 3, 'matmul', rounds=1, state=restored)
  np.testing.assert_array_equal(replicas.unshard(resumed.step), [2 * L] * 3)
  error = _relative(replicas.unshard(resumed.params), replicas.unshard(uninterrupted.params))
  assert error < 2e-5, error


def test_matmul_round_keeps_one_all_reduce_outside_the_loop(setting):
  host_data, batch_fn = setting
  replicas = parle_jax.Replicas(3, devices=jax.devices()[:3])
  parts = parle_jax.parle_parts(axis_name=replicas.axis_name, **_coefficients())
  params, model_state = _variables(3)
  state = parle_jax.init_replicas(replicas, parts.inner, params, model_state)
  round_fn = parle_jax.parle_round(training.classification_loss(models.LeNet(conv='matmul')),
                                   parts, replicas, batch_fn=batch_fn)
  hlo = round_fn.lower(state, replicas.broadcast(host_data)).compile().as_text()
  assert len(_all_reduces(hlo)) == 1, _all_reduces(hlo)
  for body in re.findall(r'while\([^\n]*body=%?([\w.\-]+)', hlo):
    assert 'all-reduce(' not in _computations(hlo)[body]


@pytest.mark.parametrize('field, configured, started, kept', [
    ('mapping', 'auto', 'sequential', 'sequential'),
    ('mapping', 'sequential', 'sequential', 'sequential'),
    ('mapping', 'vmap', 'sequential', None),
    ('conv', 'auto', 'xla', 'xla'),
    ('conv', 'matmul', 'xla', None),
])
def test_a_resumed_run_keeps_what_it_started_with(field, configured, started, kept):
  config = train.base.get_config()
  config[field] = configured
  chosen = train.started_with(config, {field: started})
  assert chosen.get(field) == kept
  assert train.started_with(config, {}) == {}
