"""Local SGD and DiLoCo: the methods that now fill Parle's niche, as round parts.

Both let ``n`` replicas take ``L`` local steps and then communicate once, like
Parle; they differ in what the one all-reduce carries and what follows it:

* :func:`local_sgd` (Lin, Stich, Patel, Jaggi, "Don't use large mini-batches,
  use local SGD", `arXiv:1808.07217 <https://arxiv.org/abs/1808.07217>`_):
  ``L`` steps of Nesterov SGD per replica, then the params are averaged and
  every replica restarts from the average.
* :func:`diloco` (Douillard et al., "DiLoCo: Distributed Low-Communication
  Training of Language Models", `arXiv:2311.08105
  <https://arxiv.org/abs/2311.08105>`_): ``L`` steps of an inner optax
  optimizer per replica from the shared params ``theta``; then the
  pseudo-gradient ``theta - theta_local`` is averaged over the replicas and
  an outer Nesterov step (learning rate 0.7, momentum 0.9 in the paper) moves
  ``theta``; every replica restarts from it.

Each returns :class:`parle_jax.optim.RoundParts`, run by
:func:`parle_jax.rounds.parts_round` exactly as Parle's parts are: the inner
transform inside the fused ``lax.scan``, the coupling once per round. Pure
optax (no Flax).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from parle_jax import checks
from parle_jax.checks import AxisName
from parle_jax.elastic import replica_mean
from parle_jax.optim import RoundParts

Params = optax.Params
ScalarOrSchedule = optax.ScalarOrSchedule


def _nesterov_sgd(learning_rate: ScalarOrSchedule, momentum: float,
                  weight_decay: float) -> optax.GradientTransformation:
  """Nesterov SGD with L2 weight decay, as the SGD baselines of the experiments."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=momentum > 0))


def local_sgd(
    learning_rate: ScalarOrSchedule,
    *,
    L: int = 25,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    axis_name: AxisName = None,
) -> RoundParts:
  """Local SGD: ``L`` local Nesterov-SGD steps per replica, then the params are averaged.

  One round of replica ``a``::

    repeat L times:  x^a <- Nesterov SGD step on its own mini-batch
    xbar = pmean(x^a)                                  # the round's one all-reduce
    x^a  <- xbar                                       # every replica restarts there

  The momentum buffers stay local (they are not averaged), as in Lin et al.'s
  experiments; with ``L = 1`` and replicas that start equal this is
  data-parallel SGD (the average of the updated params is the update by the
  averaged gradient: every operation is linear in the gradients). The
  replicas should start from the same params.

  Examples:
    >>> import jax.numpy as jnp, optax, parle_jax
    >>> parts = parle_jax.local_sgd(0.1, L=2, momentum=0.0)  # one replica: plain SGD
    >>> params = jnp.array([1.0])
    >>> state = parts.inner.init(params)
    >>> for _ in range(parts.L):
    ...   updates, state = parts.inner.update(2 * params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> params, state = parts.couple(state, params)
    >>> params
    Array([0.64], dtype=float32)

  Args:
    learning_rate: local step size, a float or a schedule of the local step.
    L: local steps per round, >= 1.
    momentum: Nesterov momentum of the local steps, in [0, 1); 0 turns it off.
    weight_decay: L2 coefficient added to the local gradients, >= 0.
    axis_name: the replica axis (or axes) to average over; None for one replica.

  Returns:
    :class:`RoundParts`: the local step (optax state of Nesterov SGD) and the
    averaging ``couple(state, params) -> (mean params, state)``.
  """
  checks.nonnegative('learning_rate', learning_rate)
  checks.integer('L', L)
  checks.fraction('momentum', momentum)
  checks.nonnegative('weight_decay', weight_decay)
  checks.axis_name(axis_name)
  axis_name = checks.normalize_axis(axis_name)

  def couple(state, params):
    return replica_mean(params, axis_name), state

  return RoundParts(inner=_nesterov_sgd(learning_rate, momentum, weight_decay), couple=couple,
                    L=L, axis_name=axis_name)


class DiLoCoState(NamedTuple):
  """State of :func:`diloco`, one replica.

  Attributes:
    shared: ``theta``, the params every replica started the round from.
    inner: the inner optimizer's state (kept across rounds, per replica).
    outer: the outer Nesterov optimizer's state (its momentum; equal on all
      replicas, as its input is the all-reduced pseudo-gradient).
  """

  shared: Params
  inner: Any
  outer: Any


def diloco(
    inner: optax.GradientTransformation,
    *,
    L: int = 25,
    outer_learning_rate: ScalarOrSchedule = 0.7,
    outer_momentum: float = 0.9,
    axis_name: AxisName = None,
) -> RoundParts:
  """DiLoCo: ``L`` steps of `inner` per replica, then an outer Nesterov step on the mean change.

  One round of replica ``a``, from the shared params ``theta``::

    x^a = theta;  repeat L times:  x^a <- inner step on its own mini-batch
    delta = pmean(theta - x^a)                         # the round's one all-reduce
    theta <- theta - outer_learning_rate * Nesterov(delta)
    x^a   <- theta                                     # every replica restarts there

  The paper pairs an AdamW inner optimizer with outer learning rate 0.7 and
  momentum 0.9 for language models; for the convolutional nets here the
  experiments use the same Nesterov SGD as every other method as `inner`.
  With one replica, outer learning rate 1 and outer momentum 0 it is `inner`
  itself. The replicas should start from the same params.

  Examples:
    >>> import jax.numpy as jnp, optax, parle_jax
    >>> parts = parle_jax.diloco(optax.sgd(0.1), L=2, outer_learning_rate=0.5,
    ...                          outer_momentum=0.0)  # one replica, no outer momentum
    >>> theta = jnp.array([1.0])
    >>> state, x = parts.inner.init(theta), theta
    >>> for _ in range(parts.L):  # two inner steps on |x|^2: 1 -> 0.8 -> 0.64
    ...   updates, state = parts.inner.update(2 * x, state, x)
    ...   x = optax.apply_updates(x, updates)
    >>> theta, state = parts.couple(state, x)  # half of the way: 1 - 0.5 * (1 - 0.64)
    >>> theta
    Array([0.82], dtype=float32)

  Args:
    inner: the inner optimizer of every replica (any optax transform).
    L: inner steps per round, >= 1.
    outer_learning_rate: outer step size, a float or a schedule of the round.
    outer_momentum: outer Nesterov momentum, in [0, 1); 0 turns it off.
    axis_name: the replica axis (or axes) to average over; None for one replica.

  Returns:
    :class:`RoundParts` whose transform's state is :class:`DiLoCoState`.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(f'`inner` must be an optax.GradientTransformation, got {inner!r}.')
  checks.integer('L', L)
  checks.nonnegative('outer_learning_rate', outer_learning_rate)
  checks.fraction('outer_momentum', outer_momentum)
  checks.axis_name(axis_name)
  axis_name = checks.normalize_axis(axis_name)
  outer = optax.sgd(outer_learning_rate, momentum=outer_momentum or None,
                    nesterov=outer_momentum > 0)

  def init_fn(params):
    return DiLoCoState(shared=params, inner=inner.init(params), outer=outer.init(params))

  def inner_update_fn(grads, state, params=None):
    updates, inner_state = inner.update(grads, state.inner, params)
    return updates, state._replace(inner=inner_state)

  def couple(state, params):
    delta = replica_mean(jax.tree.map(jnp.subtract, state.shared, params), axis_name)
    updates, outer_state = outer.update(delta, state.outer, state.shared)
    shared = optax.apply_updates(state.shared, updates)
    return shared, state._replace(shared=shared, outer=outer_state)

  return RoundParts(inner=optax.GradientTransformation(init_fn, inner_update_fn), couple=couple,
                    L=L, axis_name=axis_name)
