"""The least-squares test problem on the JAX side, and comparison helpers."""

import jax.numpy as jnp
import numpy as np

FEATURES = 4  # inputs per example, plus a bias column in the NumPy reference


def make_problem(n, steps, batch=8, seed=0):
  """Per-replica initial weights and mini-batches (float32), NumPy layout.

  Returns x0 [n, FEATURES + 1] (last entry is the bias), inputs
  [n, steps, batch, FEATURES + 1] with a constant-1 last column, targets
  [n, steps, batch].
  """
  rng = np.random.default_rng(seed)
  x0 = rng.normal(size=(n, FEATURES + 1)).astype(np.float32)
  features = rng.normal(size=(n, steps, batch, FEATURES)).astype(np.float32)
  inputs = np.concatenate([features, np.ones_like(features[..., :1])], axis=-1)
  true_w = rng.normal(size=FEATURES + 1)
  targets = (inputs @ true_w + 0.3 * rng.normal(size=(n, steps, batch))).astype(np.float32)
  return x0, inputs, targets


def to_params(x):
  """NumPy weights [..., FEATURES + 1] -> the JAX params pytree."""
  return {'w': x[..., :FEATURES], 'b': x[..., FEATURES]}


def from_params(params):
  return np.concatenate([np.asarray(params['w']), np.asarray(params['b'])[..., None]], -1)


def to_batches(inputs, targets, rounds_slice=slice(None)):
  return {'x': inputs[:, rounds_slice, :, :FEATURES], 'y': targets[:, rounds_slice]}


def loss_fn(params, model_state, batch, rng):
  """Single-replica loss in the parle_jax.rounds contract."""
  del rng
  residual = batch['x'] @ params['w'] + params['b'] - batch['y']
  loss = 0.5 * jnp.mean(residual ** 2)
  return loss, (model_state, {'mean_residual': jnp.mean(residual)})


def single_loss(params, batch):
  return loss_fn(params, {}, batch, None)[0]


def relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)
