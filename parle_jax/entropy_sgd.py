"""The inner step of Parle: Entropy-SGD's proximal step around a fixed anchor, as optax.

Pure optax (no Flax). References: Chaudhari et al., `Entropy-SGD: biasing
gradient descent into wide valleys <https://arxiv.org/abs/1611.01838>`_, ICLR
2017; `Parle <https://arxiv.org/abs/1707.00424>`_, SysML 2018.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from parle_jax import checks
from parle_jax.checks import AxisName
from parle_jax.elastic import nesterov

Params = optax.Params
ScalarOrSchedule = optax.ScalarOrSchedule



class EntropySGDInnerState(NamedTuple):
  """State of :func:`entropy_sgd_inner`, one replica.

  Attributes:
    count: inner steps taken so far (int32 scalar). The round index used by the
      schedules is ``count // L``.
    anchor: the anchor ``x^a`` that the proximal term pulls the inner iterate
      towards. Held fixed by this transform; the coupling moves it.
    average: ``z``, the exponential average of the inner iterates
      (``z <- alpha * z + (1 - alpha) * y`` after every step).
    momentum: ``v_y``, the inner Nesterov velocity (kept across rounds).
    key: PRNG key for the Langevin noise; differs between replicas when the
      state was initialised with `axis_name` bound (see :func:`parle`).
  """

  count: jax.Array
  anchor: Params
  average: Params
  momentum: Params
  key: jax.Array


def entropy_sgd_inner(
    inner_learning_rate: ScalarOrSchedule = 0.1,
    gamma: ScalarOrSchedule = 0.01,
    *,
    L: int = 25,
    alpha: float = 0.75,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """One inner Entropy-SGD step per update, around a fixed anchor.

  With ``y`` the current params and ``g`` the mini-batch gradient at ``y``::

    d   = g + weight_decay * y + gamma(k) * (y - anchor) [+ noise term]
    v_y = momentum * v_y + d ;  d = d + momentum * v_y
    y   = y - inner_learning_rate(k) * d
    z   = alpha * z + (1 - alpha) * y

  with ``k = count // L``. The optional Langevin noise adds
  ``noise * sqrt(2 / inner_learning_rate) * N(0, I)`` to ``d`` (so ``y`` moves by
  ``noise * sqrt(2 * inner_learning_rate)`` per step, Langevin dynamics at
  temperature ``noise ** 2``, as in the Entropy-SGD code). The anchor never
  moves here: :func:`elastic_coupling` (or the caller) moves it. Alone, this is
  proximal SGD around the initial params that also tracks the average ``z``.

  Examples:
    >>> import jax.numpy as jnp, optax, parle_jax
    >>> tx = parle_jax.entropy_sgd_inner(0.1, gamma=1.0, L=5)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(2 * params, state, params)  # grad of |y|^2
    >>> optax.apply_updates(params, updates)
    Array([ 0.62, -1.24], dtype=float32)

  Args:
    inner_learning_rate: step size of the inner steps (0.1 in the paper).
    gamma: coefficient of the proximal pull ``(y - anchor)`` (``1 / gamma`` in
      the local-entropy notation), a float or a schedule of the round index.
    L: inner steps per round, >= 1; only used to compute the round index.
    alpha: weight of the old average in ``z``, in [0, 1).
    momentum: inner Nesterov momentum, in [0, 1); 0 turns it off.
    weight_decay: L2 coefficient added to the inner gradient, >= 0.
    noise: Langevin noise scale, >= 0 (0 in the paper's experiments).
    seed: seed of the noise; each replica folds in its index at ``init``.
    axis_name: replica axis (or axes). Only used at ``init``, when ``noise`` may
      be non-zero, to give every replica its own noise stream.

  Returns:
    An optax ``GradientTransformation`` with state :class:`EntropySGDInnerState`.
  """
  checks.integer('L', L)
  init_fn, step_fn = inner_step_fns(inner_learning_rate, gamma, alpha=alpha, momentum=momentum,
                                 weight_decay=weight_decay, noise=noise, seed=seed,
                                 axis_name=axis_name)

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('entropy_sgd_inner needs `params` in update().')
    return step_fn(grads, state, params, state.count // L)

  return optax.GradientTransformation(init_fn, update_fn)


def inner_step_fns(inner_learning_rate, gamma, *, alpha, momentum, weight_decay, noise, seed,
                axis_name):
  """(init, step) of the inner Entropy-SGD step; ``step(grads, state, params, k)``.

  The round index ``k`` of the schedules is an argument: :func:`entropy_sgd_inner`
  derives it from its step count, Parle reads it from its coupling count.
  Checks the arguments (ValueError naming the bad one).
  """
  checks.nonnegative('inner_learning_rate', inner_learning_rate)
  checks.nonnegative('gamma', gamma)
  checks.fraction('alpha', alpha)
  checks.fraction('momentum', momentum)
  checks.nonnegative('weight_decay', weight_decay)
  if callable(noise):
    raise ValueError(f'`noise` must be a number >= 0, got the callable {noise!r}.')
  checks.nonnegative('noise', noise)
  checks.axis_name(axis_name)
  axis_name = checks.normalize_axis(axis_name)
  gamma_fn = checks.as_schedule(gamma)
  lr_fn = checks.as_schedule(inner_learning_rate)
  noisy = checks.concrete_float(noise) != 0.0  # True when noise is traced

  def init_fn(params):
    key = jax.random.PRNGKey(seed)
    if noisy and axis_name is not None:
      try:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
      except NameError as error:
        raise ValueError(
            f'entropy_sgd_inner/parle with noise > 0 and axis_name={axis_name!r} '
            'must be initialised inside the mapped function that binds that '
            'axis (e.g. jax.pmap(tx.init, axis_name=...)), so that each replica '
            f'gets its own noise; got: {error}') from None
    return EntropySGDInnerState(
        count=jnp.zeros([], jnp.int32),
        anchor=params,
        average=params,
        momentum=optax.tree.zeros_like(params),
        key=key,
    )

  def step_fn(grads, state, params, k):
    step_size, pull = lr_fn(k), gamma_fn(k)
    direction = jax.tree.map(
        lambda g, y, x: g + weight_decay * y + pull * (y - x),
        grads, params, state.anchor)
    if noisy:
      leaves, treedef = jax.tree.flatten(direction)
      keys = jax.random.split(jax.random.fold_in(state.key, state.count),
                              len(leaves))
      scale = noise * jnp.sqrt(2.0 / step_size)
      leaves = [
          d + scale * jax.random.normal(key, d.shape, d.dtype)
          for d, key in zip(leaves, keys)
      ]
      direction = jax.tree.unflatten(treedef, leaves)
    direction, velocity = nesterov(direction, state.momentum, momentum)
    updates = jax.tree.map(lambda d: -step_size * d, direction)
    new_params = optax.apply_updates(params, updates)
    average = jax.tree.map(lambda z, y: alpha * z + (1 - alpha) * y,
                           state.average, new_params)
    return updates, state._replace(
        count=optax.safe_increment(state.count),
        average=average,
        momentum=velocity)

  return init_fn, step_fn

