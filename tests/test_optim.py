"""Exact reductions, optax composition, noise and argument checks of parle_jax.optim."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import parle_jax
import problems
import reference_parle


def run_per_replica(tx, x0, inputs, targets, steps):
  """Per-step training of ONE replica; returns params after every step [steps, d]."""
  params = problems.to_params(x0)
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, batch):
    grads = jax.grad(problems.single_loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for t in range(steps):
    params, state = train_step(params, state, {'x': inputs[t, :, :problems.FEATURES],
                                               'y': targets[t]})
    trajectory.append(problems.from_params(params))
  return np.stack(trajectory), state


@pytest.mark.parametrize('L', [1, 5])
def test_reduces_to_nesterov_sgd(L):
  """n=1, alpha=0, outer lr 1, outer momentum 0, gamma=rho=0: x_new = y_L."""
  x0, inputs, targets = problems.make_problem(1, 3 * L)
  parle = parle_jax.parle(1.0, L=L, inner_learning_rate=0.05, gamma=0.0, rho=0.0, alpha=0.0,
                          outer_momentum=0.0)
  sgd = optax.sgd(0.05, momentum=0.9, nesterov=True)
  got, _ = run_per_replica(parle, x0[0], inputs[0], targets[0], 3 * L)
  want, _ = run_per_replica(sgd, x0[0], inputs[0], targets[0], 3 * L)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_reduces_to_entropy_sgd():
  """n=1 (rho is then irrelevant, zbar = z): Entropy-SGD without noise."""
  L, rounds = 4, 3
  x0, inputs, targets = problems.make_problem(1, rounds * L)
  gamma = parle_jax.scoping(0.2, 1.0, 2)
  tx = parle_jax.parle(0.5, L=L, gamma=gamma, rho=0.0)
  got, state = run_per_replica(tx, x0[0], inputs[0], targets[0], rounds * L)
  want = reference_parle.entropy_sgd(x0[0].astype(np.float64), inputs[0], targets[0], L=L,
                                     rounds=rounds, lr=lambda k: 0.5,
                                     gamma=lambda k: min(0.2 * 1.25 ** k, 1.0))
  for k in range(rounds):
    assert problems.relative_error(got[(k + 1) * L - 1], want[k]) < 1e-5
  np.testing.assert_array_equal(int(state.coupling.count), rounds)


def test_zero_rho_gives_independent_replicas():
  n, L, rounds = 3, 4, 3
  x0, inputs, targets = problems.make_problem(n, rounds * L)
  replicas = parle_jax.Replicas(n, devices=jax.devices()[:1])
  parts = parle_jax.parle_parts(0.5, L=L, gamma=0.3, rho=0.0, axis_name=replicas.axis_name)
  state = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(x0))
  round_fn = parle_jax.parle_round(problems.loss_fn, parts, replicas)
  for k in range(rounds):
    state, _ = round_fn(state, problems.to_batches(inputs, targets, slice(k * L, (k + 1) * L)))
  together = problems.from_params(replicas.unshard(state.params))
  for a in range(n):
    alone, _ = run_per_replica(parle_jax.parle(0.5, L=L, gamma=0.3, rho=0.0),
                               x0[a], inputs[a], targets[a], rounds * L)
    np.testing.assert_allclose(together[a], alone[-1], rtol=1e-5, atol=1e-6)


def test_chains_with_other_transforms():
  """clip_by_global_norm before parle equals parle fed the clipped gradients."""
  x0, inputs, targets = problems.make_problem(1, 6)
  chained = optax.chain(optax.clip_by_global_norm(0.5),
                        parle_jax.parle(0.5, L=3, gamma=0.3, rho=1.0))
  got, state = run_per_replica(chained, x0[0], inputs[0], targets[0], 6)
  assert int(state[1].coupling.count) == 2

  # By hand: clip, then the plain transform.
  tx = parle_jax.parle(0.5, L=3, gamma=0.3, rho=1.0)
  params = problems.to_params(x0[0])
  opt_state = tx.init(params)
  for t in range(6):
    grads = jax.grad(problems.single_loss)(
        params, {'x': inputs[0, t, :, :problems.FEATURES], 'y': targets[0, t]})
    norm = optax.tree.norm(grads)
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, 0.5 / norm), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(got[-1], problems.from_params(params), rtol=1e-6)
  # Clipping was active (the gradients here have norm > 0.5), so it changed the result.
  plain, _ = run_per_replica(tx, x0[0], inputs[0], targets[0], 6)
  assert problems.relative_error(plain[-1], got[-1]) > 1e-3


def test_inject_hyperparams():
  x0, inputs, targets = problems.make_problem(1, 8)
  injected = optax.inject_hyperparams(parle_jax.parle)(0.5, L=4, gamma=0.3, rho=1.0)
  plain = parle_jax.parle(0.5, L=4, gamma=0.3, rho=1.0)
  got, state = run_per_replica(injected, x0[0], inputs[0], targets[0], 8)
  want, _ = run_per_replica(plain, x0[0], inputs[0], targets[0], 8)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(state.hyperparams['learning_rate']) == 0.5
  assert int(state.inner_state.coupling.count) == 2
  # Changing the injected outer learning rate changes only what happens at couplings.
  halved = optax.inject_hyperparams(parle_jax.parle)(0.25, L=4, gamma=0.3, rho=1.0)
  other, _ = run_per_replica(halved, x0[0], inputs[0], targets[0], 8)
  np.testing.assert_allclose(other[:3], got[:3], rtol=1e-6)
  assert problems.relative_error(other[3], got[3]) > 1e-3


def test_coupling_runs_every_L_steps_only():
  x0, inputs, targets = problems.make_problem(1, 7)
  _, state = run_per_replica(parle_jax.parle(0.5, L=3, gamma=0.3, rho=1.0),
                             x0[0], inputs[0], targets[0], 7)
  assert int(state.inner.count) == 7 and int(state.coupling.count) == 2
  # Between couplings the anchor stays where the last coupling put it.
  np.testing.assert_array_equal(
      problems.from_params(state.inner.anchor),
      run_per_replica(parle_jax.parle(0.5, L=3, gamma=0.3, rho=1.0),
                      x0[0], inputs[0], targets[0], 6)[0][-1])


def _noisy_replicas(seed, n=3, steps=6):
  """n replicas from IDENTICAL params, noise on: only the noise can separate them."""
  tx = parle_jax.parle(0.1, L=3, gamma=0.3, rho=1.0, noise=0.01, seed=seed,
                       axis_name='replica')
  devices = jax.devices()[:n]
  params = {'w': jnp.zeros((n, 4)), 'b': jnp.zeros((n,))}
  state = jax.pmap(tx.init, axis_name='replica', devices=devices)(params)

  def train_step(params, state):
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(train_step, axis_name='replica', devices=devices)
  for _ in range(steps - 1):  # stop before the last coupling
    params, state = step(params, state)
  return problems.from_params(params)


def test_noise_differs_per_replica_and_is_reproducible():
  first = _noisy_replicas(seed=0)
  assert np.min(np.abs(first[0] - first[1])) > 0 and np.min(np.abs(first[1] - first[2])) > 0
  np.testing.assert_array_equal(first, _noisy_replicas(seed=0))
  assert np.max(np.abs(first - _noisy_replicas(seed=1))) > 1e-4
  # Scale: after one noisy inner step from zero, y = -eta * sqrt(2/eta) * noise * xi
  # (momentum starts at zero, Nesterov doubles nothing on the first step: d + 0.9 * d).
  tx = parle_jax.parle(0.1, L=3, gamma=0.0, rho=0.0, noise=0.01, momentum=0.0)
  params = jnp.zeros(20000)
  updates, _ = tx.update(jnp.zeros(20000), tx.init(params), params)
  np.testing.assert_allclose(np.std(np.asarray(updates)), 0.01 * np.sqrt(2 * 0.1), rtol=0.03)


def test_noise_needs_axis_bound_at_init():
  tx = parle_jax.parle(0.1, gamma=0.1, rho=0.1, noise=0.01, axis_name='replica')
  with pytest.raises(ValueError, match='initialised inside the mapped function'):
    tx.init(jnp.zeros(3))


def test_scoping_values():
  schedule = parle_jax.scoping(0.01, 1.0, batches_per_epoch=100)
  ks = np.array([0, 1, 100, 500, 1000, 2000])
  want = np.minimum(0.01 * (1 + 0.5 / 100) ** ks, 1.0)
  np.testing.assert_allclose([float(schedule(k)) for k in ks], want, rtol=1e-5)
  # The default coefficients are the paper's scoping (gamma = 0.01.., rho = 1..).
  default = parle_jax.parle(0.1, batches_per_epoch=10, L=2, alpha=0.0, momentum=0.0)
  explicit = parle_jax.parle(0.1, L=2, alpha=0.0, momentum=0.0,
                             gamma=parle_jax.scoping(0.01, 1.0, 10),
                             rho=parle_jax.scoping(1.0, 10.0, 10))
  x0, inputs, targets = problems.make_problem(1, 40)
  got, _ = run_per_replica(default, x0[0], inputs[0], targets[0], 40)
  want_traj, _ = run_per_replica(explicit, x0[0], inputs[0], targets[0], 40)
  np.testing.assert_array_equal(got, want_traj)


def test_elastic_sgd_matches_numpy():
  """Every step d = g + wd x + rho (x - mean x), Nesterov; n=3 under pmap."""
  n, steps, lr, rho, wd = 3, 5, 0.1, 0.5, 0.01
  x0, inputs, targets = problems.make_problem(n, steps)
  tx = parle_jax.elastic_sgd(lr, rho, weight_decay=wd, axis_name='replica')
  devices = jax.devices()[:n]

  def train_step(params, state, batch):
    grads = jax.grad(problems.single_loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(train_step, axis_name='replica', devices=devices)
  params = problems.to_params(x0)
  state = jax.pmap(tx.init, devices=devices)(params)
  x = x0.astype(np.float64)
  velocity = np.zeros_like(x)
  for t in range(steps):
    params, state = step(params, state, problems.to_batches(inputs, targets, t))
    grads = np.stack([reference_parle.least_squares_grad(x[a], inputs[a, t], targets[a, t])[0]
                      for a in range(n)])
    d = grads + wd * x + rho * (x - x.mean(0))
    velocity = 0.9 * velocity + d
    x = x - lr * (d + 0.9 * velocity)
  assert problems.relative_error(problems.from_params(params), x) < 1e-5


@pytest.mark.parametrize('kwargs, argument', [
    (dict(L=0), '`L`'),
    (dict(L=2.5), '`L`'),
    (dict(learning_rate=-0.1), '`learning_rate`'),
    (dict(inner_learning_rate=-0.1), '`inner_learning_rate`'),
    (dict(gamma=-1.0), '`gamma`'),
    (dict(rho=-1.0), '`rho`'),
    (dict(alpha=1.0), '`alpha`'),
    (dict(alpha=-0.1), '`alpha`'),
    (dict(momentum=1.0), '`momentum`'),
    (dict(outer_momentum=-0.5), '`outer_momentum`'),
    (dict(weight_decay=-1e-4), '`weight_decay`'),
    (dict(noise=-0.1), '`noise`'),
    (dict(axis_name=3), '`axis_name`'),
])
def test_bad_arguments_raise(kwargs, argument):
  arguments = dict(learning_rate=0.1, gamma=0.1, rho=0.1)
  arguments.update(kwargs)
  with pytest.raises(ValueError, match=argument):
    parle_jax.parle(**arguments)


def test_missing_batches_per_epoch_raises():
  with pytest.raises(ValueError, match='`batches_per_epoch` is required when gamma and rho'):
    parle_jax.parle(0.1)
  with pytest.raises(ValueError, match='`batches_per_epoch` is required when rho'):
    parle_jax.parle(0.1, gamma=0.1)
  with pytest.raises(ValueError, match='`batches_per_epoch` is required'):
    parle_jax.elastic_sgd(0.1)
  with pytest.raises(ValueError, match='`batches_per_epoch`'):
    parle_jax.scoping(0.1, 1.0, 0)
  with pytest.raises(ValueError, match='`maximum`'):
    parle_jax.scoping(1.0, 0.5, 10)


def test_scoping_is_exponential_growth_clipped_at_the_maximum():
  schedule = parle_jax.scoping(0.01, 1.0, 4)  # growth 1.125 per round
  rounds = np.arange(0, 60)
  expected = np.minimum(0.01 * 1.125 ** rounds.astype(np.float64), 1.0)
  assert expected[0] == 0.01 and expected[-1] == 1.0  # both ends of the clip are reached
  np.testing.assert_allclose([float(schedule(k)) for k in rounds], expected, rtol=1e-6)


def test_elastic_coupling_names_its_own_momentum_argument():
  with pytest.raises(ValueError, match='`momentum` must be in'):
    parle_jax.elastic_coupling(0.1, 1.0, momentum=1.5)
  with pytest.raises(ValueError, match='`outer_momentum` must be in'):
    parle_jax.parle_parts(0.1, gamma=0.1, rho=0.1, outer_momentum=1.5)


def test_parle_takes_exactly_the_arguments_of_parle_parts():
  import inspect  # pylint: disable=g-import-not-at-top
  assert list(inspect.signature(parle_jax.parle).parameters) == list(
      inspect.signature(parle_jax.parle_parts).parameters)
  with pytest.raises(TypeError, match='lr'):
    parle_jax.parle(0.1, gamma=0.1, rho=0.1, lr=0.2)


class TransformVariantsTest(chex.TestCase):
  """The transforms compute the same steps jitted, not jitted and pmapped (chex variants).

  Each variant runs a few updates of one replica (``axis_name=None``; under
  ``with_pmap`` chex maps it over the devices, each with the same inputs) and
  is compared with the independent float64 references.
  """

  def _steps(self, tx, steps, x0, inputs, targets):
    params = problems.to_params(x0)
    state = tx.init(params)
    update = self.variant(lambda g, s, p: tx.update(g, s, p))
    trajectory = []
    for t in range(steps):
      grads = jax.grad(problems.single_loss)(params, {'x': inputs[t, :, :problems.FEATURES],
                                                      'y': targets[t]})
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
      trajectory.append(params)
    chex.assert_tree_all_finite(params)
    return trajectory, state

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_entropy_sgd_matches_the_reference(self):
    L, rounds = 3, 2
    x0, inputs, targets = problems.make_problem(1, rounds * L, seed=3)
    tx = parle_jax.parle(0.5, L=L, gamma=0.2, rho=0.0)
    trajectory, state = self._steps(tx, rounds * L, x0[0], inputs[0], targets[0])
    want = reference_parle.entropy_sgd(x0[0].astype(np.float64), inputs[0], targets[0], L=L,
                                       rounds=rounds, lr=lambda k: 0.5, gamma=lambda k: 0.2)
    for k in range(rounds):
      got = problems.from_params(jax.device_get(trajectory[(k + 1) * L - 1]))
      assert problems.relative_error(got, want[k]) < 1e-5
    chex.assert_trees_all_equal(int(np.asarray(state.coupling.count).reshape(-1)[0]), rounds)

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_elastic_sgd_with_one_replica_is_nesterov_sgd_with_weight_decay(self):
    x0, inputs, targets = problems.make_problem(1, 4, seed=4)
    elastic, _ = self._steps(parle_jax.elastic_sgd(0.05, rho=1.0, weight_decay=0.1), 4,
                             x0[0], inputs[0], targets[0])
    sgd = optax.chain(optax.add_decayed_weights(0.1),
                      optax.sgd(0.05, momentum=0.9, nesterov=True))
    reference, _ = self._steps(sgd, 4, x0[0], inputs[0], targets[0])
    chex.assert_trees_all_close(jax.device_get(elastic), jax.device_get(reference),
                                rtol=1e-6, atol=1e-7)
