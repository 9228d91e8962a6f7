"""Tests for parle_jax.flatness against closed forms and float64 NumPy references.

Quadratics ``0.5 (w - c)^T A (w - c)`` with ``A = Q diag(lam) Q^T`` (a random
orthogonal basis, eigenvalues over three decades) have a known Hessian; the
local-entropy Gibbs measure of a quadratic is Gaussian with precision
``(A + I / gamma) / T``; a small MLP's Hessian is checked against the dense
matrix of ``jax.hessian``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from parle_jax import flatness

SIZE = 120


def _spectrum_problem(size=SIZE, seed=0):
  """(A float64, lam float64, centre, loss, params): a quadratic over a two-leaf pytree."""
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.normal(size=(size, size)))
  lam = np.logspace(-1.0, 2.0, size)[::-1]  # 100 down to 0.1: three decades
  matrix = (basis * lam) @ basis.T
  centre = rng.normal(size=size)
  split = size // 3
  a32, c32 = jnp.asarray(matrix, jnp.float32), jnp.asarray(centre, jnp.float32)

  def loss(params):
    w = jnp.concatenate([params['bias'], params['kernel'].reshape(-1)]) - c32  # ravel order
    return 0.5 * w @ (a32 @ w)

  w0 = rng.normal(size=size).astype(np.float32)
  params = {'kernel': jnp.asarray(w0[:split].reshape(split // 4, 4)),
            'bias': jnp.asarray(w0[split:])}
  return matrix, lam, centre, loss, params


def test_hvp_is_the_matrix_times_the_vector():
  matrix, _, _, loss, params = _spectrum_problem()
  flat, unravel = ravel_pytree(params)
  vector = np.random.default_rng(1).normal(size=flat.shape[0])
  product = ravel_pytree(flatness.hvp(loss, params)(unravel(jnp.asarray(vector, jnp.float32))))[0]
  np.testing.assert_allclose(np.asarray(product), matrix @ vector, rtol=2e-4,
                             atol=2e-4 * np.abs(matrix @ vector).max())


def test_top_eigenvalues_of_a_known_spectrum():
  _, lam, _, loss, params = _spectrum_problem()
  top = jax.jit(functools.partial(flatness.top_eigenvalues, loss, k=5, num_iterations=64))(
      params, key=jax.random.PRNGKey(0))
  assert top.shape == (5,) and np.all(np.diff(np.asarray(top)) <= 0)
  np.testing.assert_allclose(np.asarray(top, np.float64), lam[:5], rtol=1e-4)


def test_lanczos_survives_an_invariant_subspace():
  """A 2-D problem with 2 iterations, and a Hessian with a repeated eigenvalue."""
  loss = lambda p: 0.5 * (2.0 * p[0] ** 2 + 2.0 * p[1] ** 2 + 0.5 * p[2] ** 2 + 0.5 * p[3] ** 2)
  top = flatness.top_eigenvalues(loss, jnp.ones(4), k=4, num_iterations=4,
                                 key=jax.random.PRNGKey(3))
  np.testing.assert_allclose(np.asarray(top), [2.0, 2.0, 0.5, 0.5], rtol=1e-5)


def test_hessian_trace_within_three_standard_errors():
  matrix, lam, _, loss, params = _spectrum_problem()
  estimate = jax.jit(functools.partial(flatness.hessian_trace, loss, num_samples=64))(
      params, key=jax.random.PRNGKey(1))
  # One Rademacher probe's variance: 2 (|A|_F^2 - sum_i A_ii^2).
  probe_std = np.sqrt(2 * (np.sum(matrix ** 2) - np.sum(np.diag(matrix) ** 2)))
  assert abs(float(estimate.trace) - lam.sum()) < 3 * probe_std / 8
  assert 0.6 * probe_std / 8 < float(estimate.standard_error) < 1.5 * probe_std / 8


def test_spectral_density_mass_and_mean():
  matrix, lam, _, loss, params = _spectrum_problem()
  num_probes = 8
  result = jax.jit(functools.partial(flatness.spectral_density, loss, num_iterations=48,
                                     num_probes=num_probes, grid_size=2048))(
      params, key=jax.random.PRNGKey(2))
  grid, density = np.asarray(result.grid, np.float64), np.asarray(result.density, np.float64)
  np.testing.assert_allclose(np.asarray(result.weights).sum(-1), 1.0, rtol=1e-5)
  assert abs(np.trapezoid(density, grid) - 1.0) < 1e-3
  # The first moment is Hutchinson's estimate of tr(A) / n, probe by probe.
  probe_std = np.sqrt(2 * (np.sum(matrix ** 2) - np.sum(np.diag(matrix) ** 2))) / SIZE
  mean = np.trapezoid(grid * density, grid)
  assert abs(mean - lam.mean()) < 3 * probe_std / np.sqrt(num_probes)
  # Every eigenvalue lies within the grid, and the largest Ritz value is the top eigenvalue.
  assert grid[0] < lam.min() and grid[-1] > lam.max()
  np.testing.assert_allclose(float(result.nodes.max()), lam[0], rtol=1e-4)


def _mlp_problem():
  rng = np.random.default_rng(4)
  inputs = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
  params = {'w1': jnp.asarray(rng.normal(size=(3, 5)) * 0.7, jnp.float32),
            'b1': jnp.asarray(rng.normal(size=5) * 0.1, jnp.float32),
            'w2': jnp.asarray(rng.normal(size=(5, 2)) * 0.7, jnp.float32)}

  def loss(p):
    hidden = jnp.tanh(inputs @ p['w1'] + p['b1'])
    return jnp.mean((hidden @ p['w2'] - targets) ** 2)

  flat, unravel = ravel_pytree(params)
  dense = np.asarray(jax.hessian(lambda v: loss(unravel(v)))(flat), np.float64)
  return loss, params, 0.5 * (dense + dense.T)


def test_mlp_hvp_and_top_eigenvalues_against_the_dense_hessian():
  loss, params, dense = _mlp_problem()
  flat, unravel = ravel_pytree(params)
  vector = np.random.default_rng(5).normal(size=flat.shape[0])
  product = ravel_pytree(flatness.hvp(loss, params)(unravel(jnp.asarray(vector, jnp.float32))))[0]
  np.testing.assert_allclose(np.asarray(product), dense @ vector, rtol=1e-4, atol=1e-5)
  eigenvalues = np.linalg.eigvalsh(dense)[::-1]  # indefinite: tanh's curvature
  assert eigenvalues[-1] < 0
  top = flatness.top_eigenvalues(loss, params, k=3, num_iterations=flat.shape[0],
                                 key=jax.random.PRNGKey(6))
  np.testing.assert_allclose(np.asarray(top), eigenvalues[:3], rtol=1e-4, atol=1e-5)


def test_sharpness_is_zero_for_a_constant_loss():
  params = {'w': jnp.ones((3, 4)), 'b': jnp.ones(4)}
  result = flatness.sharpness(lambda p: jnp.float32(2.5) + 0.0 * p['w'].sum(), params,
                              radius=0.1, key=jax.random.PRNGKey(0))
  assert float(result.worst) == 0.0 and float(result.random_mean) == 0.0
  assert float(result.loss) == 2.5


def test_sharpness_of_an_isotropic_quadratic_is_the_closed_form():
  """0.5 c |w - w0|^2 at w0: every point of the per-filter ball's surface gains 0.5 c r^2 |w0|^2."""
  rng = np.random.default_rng(7)
  w0 = {'kernel': jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
        'bias': jnp.asarray(rng.normal(size=4), jnp.float32)}
  norm2 = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in w0.values())
  radius = 0.05
  for curvature in (1.0, 4.0):
    loss = lambda p, c=curvature: 0.5 * c * sum(jnp.sum((p[k] - w0[k]) ** 2) for k in w0)
    result = flatness.sharpness(loss, w0, radius=radius, key=jax.random.PRNGKey(1))
    expected = 0.5 * curvature * radius ** 2 * norm2
    np.testing.assert_allclose(float(result.worst), expected, rtol=1e-4)
    np.testing.assert_allclose(float(result.random_mean), expected, rtol=1e-4)


def test_sharpness_grows_with_curvature_and_ascent_beats_random():
  _, _, _, loss, params = _spectrum_problem()
  base = {k: v for k, v in params.items()}
  results = [flatness.sharpness(lambda p, s=s: s * loss(p), base, radius=0.02,
                                key=jax.random.PRNGKey(2), num_steps=20)
             for s in (1.0, 10.0)]
  for result in results:
    random_error = float(result.random_std) / np.sqrt(8)
    assert float(result.worst) > float(result.random_mean) + 3 * random_error
  # A loss scaled by 10 has 10x the curvature: the increases scale with it.
  np.testing.assert_allclose(float(results[1].worst), 10 * float(results[0].worst), rtol=0.05)
  np.testing.assert_allclose(float(results[1].random_mean), 10 * float(results[0].random_mean),
                             rtol=1e-3)


def test_local_entropy_of_a_quadratic_against_the_gaussian_closed_form():
  rng = np.random.default_rng(8)
  size, gamma, temperature, step = 6, 0.5, 0.2, 0.004
  basis, _ = np.linalg.qr(rng.normal(size=(size, size)))
  lam = np.linspace(0.5, 3.0, size)
  matrix = (basis * lam) @ basis.T
  centre, anchor = rng.normal(size=size), rng.normal(size=size)
  a32, c32 = jnp.asarray(matrix, jnp.float32), jnp.asarray(centre, jnp.float32)
  loss = lambda y: 0.5 * (y - c32) @ (a32 @ (y - c32))
  run = jax.jit(jax.vmap(lambda key: flatness.local_entropy(
      loss, jnp.asarray(anchor, jnp.float32), gamma=gamma, num_steps=6000, step_size=step,
      key=key, temperature=temperature, burn_in=1500)))
  result = run(jax.random.split(jax.random.PRNGKey(0), 128))
  precision = (matrix + np.eye(size) / gamma) / temperature
  covariance = np.linalg.inv(precision)
  mean = np.linalg.solve(matrix + np.eye(size) / gamma, matrix @ centre + anchor / gamma)
  mean_loss = 0.5 * (mean - centre) @ matrix @ (mean - centre) + 0.5 * np.trace(matrix @ covariance)
  np.testing.assert_allclose(np.asarray(result.mean_params).mean(0), mean, atol=0.01)
  np.testing.assert_allclose(float(result.distance.mean()), np.linalg.norm(anchor - mean),
                             rtol=0.01)
  np.testing.assert_allclose(float(result.mean_loss.mean()), mean_loss, rtol=0.02)
  np.testing.assert_allclose(float(result.loss[0]),
                             0.5 * (anchor - centre) @ matrix @ (anchor - centre), rtol=1e-5)


def test_local_entropy_without_noise_is_proximal_descent():
  """T = 0: the chain converges to argmin f(y) + |y - x|^2 / (2 gamma), in closed form."""
  loss = lambda y: 0.5 * 4.0 * jnp.sum((y - 1.0) ** 2)
  result = flatness.local_entropy(loss, jnp.zeros(3), gamma=0.25, num_steps=400, step_size=0.05,
                                  key=jax.random.PRNGKey(0), temperature=0.0, burn_in=300)
  # argmin: 4 (y - 1) + y / 0.25 = 0 -> y = 0.5; the loss there 0.5 * 4 * 3 * 0.25.
  np.testing.assert_allclose(np.asarray(result.mean_params), 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(result.distance), 0.5 * np.sqrt(3), rtol=1e-5)
  np.testing.assert_allclose(float(result.mean_loss), 1.5, rtol=1e-5)


def test_interpolate_is_the_loss_along_the_segment():
  loss = lambda p: jnp.sum(p['w'] ** 2)
  a, b = {'w': jnp.array([0.0, 2.0])}, {'w': jnp.array([2.0, 0.0])}
  alphas = np.array([-0.5, 0.0, 0.25, 0.5, 1.0, 1.5])
  expected = [float(np.sum(((1 - t) * np.array([0, 2.0]) + t * np.array([2.0, 0])) ** 2))
              for t in alphas]
  np.testing.assert_allclose(np.asarray(flatness.interpolate(loss, a, b, alphas)), expected,
                             rtol=1e-6)


def test_filter_normalized_direction_matches_filter_norms():
  params = {'kernel': jnp.arange(24.0).reshape(2, 3, 4) - 5.0, 'bias': jnp.array([3.0, 4.0])}
  direction = flatness.filter_normalized_direction(params, jax.random.PRNGKey(0))
  kernel, d_kernel = np.asarray(params['kernel']), np.asarray(direction['kernel'])
  np.testing.assert_allclose(np.linalg.norm(d_kernel.reshape(-1, 4), axis=0),
                             np.linalg.norm(kernel.reshape(-1, 4), axis=0), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(direction['bias'])), 5.0, rtol=1e-5)


@pytest.mark.parametrize('call, message', [
    (lambda l, p: flatness.top_eigenvalues(l, p, k=4, num_iterations=3, key=jax.random.PRNGKey(0)),
     '`k` must be at most num_iterations=3, got 4'),
    (lambda l, p: flatness.top_eigenvalues(l, p, num_iterations=9, key=jax.random.PRNGKey(0)),
     'at most the number of parameters (4), got 9'),
    (lambda l, p: flatness.hessian_trace(l, p, num_samples=1, key=jax.random.PRNGKey(0)),
     '`num_samples`'),
    (lambda l, p: flatness.sharpness(l, p, radius=0.0, key=jax.random.PRNGKey(0)),
     '`radius` must be a positive float, got 0.0'),
    (lambda l, p: flatness.local_entropy(l, p, gamma=1.0, num_steps=10, step_size=0.1,
                                         burn_in=10, key=jax.random.PRNGKey(0)),
     '`burn_in` must be less than num_steps=10, got 10'),
    (lambda l, p: flatness.interpolate(l, p, jnp.ones(3), [0.5]),
     'same structure and shapes'),
])
def test_bad_arguments_raise_one_clear_error(call, message):
  with pytest.raises(ValueError, match=None) as error:
    call(lambda p: jnp.sum(p ** 2), jnp.ones(4))
  assert message in str(error.value)
