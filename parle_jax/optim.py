"""Parle, Entropy-SGD and Elastic-SGD as optax gradient transformations.

Parle (Chaudhari et al., 2017) trains ``n`` replicas of one network. Each replica
runs ``L`` Entropy-SGD inner steps (proximal SGD around its anchor ``x^a``);
then the replicas couple once: each anchor takes an outer Nesterov step on
``(x^a - z^a) + rho * (x^a - mean_b z^b)``, where ``z`` is a running average of
the inner iterates. The mean over replicas is the only collective: one
all-reduce of the weights per ``L`` mini-batches.

This module is pure optax (no Flax, no data): it provides

* :func:`parle` -- the drop-in, per-step transform: every ``update`` is one
  inner step; every ``L``-th also couples (``lax.pmean`` inside a conditional).
* :func:`parle_parts` -- the same algorithm split into its inner step and its
  end-of-round coupling, for fused rounds (``lax.scan`` of ``L`` inner steps,
  then one coupling) built by :mod:`parle_jax.rounds`.
* The two building blocks, each an optax transform usable alone:
  :func:`entropy_sgd_inner` and :func:`elastic_coupling`.
* :func:`elastic_sgd` (the Elastic-SGD baseline) and :func:`scoping`.

The building blocks live in :mod:`parle_jax.entropy_sgd` and
:mod:`parle_jax.elastic` (argument checks in :mod:`parle_jax.checks`); this
module assembles Parle from them and re-exports them.

References:
  Chaudhari, Baldassi, Zecchina, Soatto, Talwalkar, Oberman, `Parle:
  parallelizing stochastic gradient descent <https://arxiv.org/abs/1707.00424>`_,
  SysML 2018.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from parle_jax import checks
from parle_jax.checks import AxisName
from parle_jax.elastic import (ElasticCouplingState, ElasticSGDState, coupling_schedules,
                               elastic_coupling, elastic_sgd, outer_step, replica_mean, scoping)
from parle_jax.entropy_sgd import EntropySGDInnerState, entropy_sgd_inner, inner_step_fns

Params = optax.Params
ScalarOrSchedule = optax.ScalarOrSchedule

__all__ = ['ElasticCouplingState', 'ElasticSGDState', 'EntropySGDInnerState', 'ParleParts',
           'ParleState', 'RoundParts', 'elastic_coupling', 'elastic_sgd', 'entropy_sgd_inner', 'parle',
           'parle_parts', 'reference_params', 'scoping']


class ParleState(NamedTuple):
  """State of :func:`parle` (and of :func:`parle_parts`), one replica.

  Attributes:
    inner: state of the inner Entropy-SGD steps (step count, anchor ``x^a``,
      average ``z``, inner momentum, noise key).
    coupling: state of the elastic coupling (rounds completed ``k``, outer
      momentum).
  """

  inner: EntropySGDInnerState
  coupling: ElasticCouplingState


class RoundParts(NamedTuple):
  """A method split at the round boundary, for fused rounds (Parle, local SGD, DiLoCo).

  Attributes:
    inner: a ``GradientTransformation`` whose updates are the local steps
      only: no communication.
    couple: ``couple(state, params) -> (params, state)``, the end of a round
      (one all-reduce over `axis_name`): it takes each replica's optimizer
      state and its params after the local steps, and returns the params the
      next round starts from. Parle's coupling moves the anchor (the returned
      params equal the new anchor; ``z`` is reset to it) and reads the anchor
      from the state, so its ``params`` may be omitted.
    L: local steps per round.
    axis_name: the replica axis (or axes) the coupling reduces over.
  """

  inner: optax.GradientTransformation
  couple: Callable[..., tuple[Params, Any]]
  L: int
  axis_name: AxisName


ParleParts = RoundParts  # the name Parle's parts have always had


def parle_parts(
    learning_rate: ScalarOrSchedule,
    *,
    batches_per_epoch: Optional[int] = None,
    L: int = 25,
    inner_learning_rate: ScalarOrSchedule = 0.1,
    gamma: Optional[ScalarOrSchedule] = None,
    rho: Optional[ScalarOrSchedule] = None,
    alpha: float = 0.75,
    momentum: float = 0.9,
    outer_momentum: Optional[float] = None,
    weight_decay: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
    axis_name: AxisName = None,
) -> RoundParts:
  """Parle's inner step and its end-of-round coupling, for fused rounds.

  One round of replica ``a`` (docs/algorithm.md, "One round"): `L` updates of
  ``parts.inner`` (inner Entropy-SGD steps on ``y`` around the anchor ``x^a``,
  no communication), then ``parts.couple``::

    zbar = pmean(z, axis_name)                       # the round's one all-reduce
    D    = (x^a - z) + rho(k) * (x^a - zbar)          # then outer Nesterov
    x^a  = x^a - learning_rate(k) * D                 # y and z restart at x^a

  Every schedule is evaluated at ``k``, the rounds completed before the
  current one (``state.coupling.count``, the one round counter). :func:`parle`
  runs the same two parts step by step.

  Examples:
    >>> import jax.numpy as jnp, optax, parle_jax
    >>> parts = parle_jax.parle_parts(0.1, L=2, gamma=0.1, rho=1.0)  # one replica
    >>> params = jnp.array([1.0, -1.0])
    >>> state = parts.inner.init(params)
    >>> for _ in range(parts.L):
    ...   updates, state = parts.inner.update(2 * params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> params, state = parts.couple(state)
    >>> int(state.coupling.count), bool(jnp.all(params == state.inner.anchor))
    (1, True)

  Args:
    learning_rate: outer learning rate (0.1 in the paper, divided by 5 each
      Parle epoch), a float or a schedule of ``k``.
    batches_per_epoch: mini-batches per epoch of one replica (``nb``); required
      when `gamma` or `rho` is None.
    L: inner steps per round (25), >= 1.
    inner_learning_rate: inner step size (0.1, fixed).
    gamma: proximal coefficient multiplying ``(y - x^a)``; None means the
      paper's scoping ``scoping(0.01, 1.0, batches_per_epoch)``.
    rho: elastic coefficient multiplying ``(x^a - zbar)``; None means
      ``scoping(1.0, 10.0, batches_per_epoch)``.
    alpha: weight of the old ``z`` in the running average (0.75), in [0, 1).
    momentum: inner Nesterov momentum (0.9), in [0, 1).
    outer_momentum: outer Nesterov momentum; None means `momentum`.
    weight_decay: L2 coefficient, inner gradient only.
    noise: Langevin noise scale of the inner steps (0, see
      :func:`entropy_sgd_inner`).
    seed: seed of the Langevin noise.
    axis_name: the replica axis (or tuple of axes) for ``lax.pmean``; None
      means a single replica.

  Returns:
    :class:`RoundParts`; its transform's state is :class:`ParleState`.
  """
  if gamma is None or rho is None:
    if batches_per_epoch is None:
      missing = [name for name, value in (('gamma', gamma), ('rho', rho))
                 if value is None]
      raise ValueError(
          f'`batches_per_epoch` is required when {" and ".join(missing)} '
          'use the default scoping schedule; pass batches_per_epoch=<mini-'
          'batches per epoch of one replica> or give gamma/rho explicitly.')
    if gamma is None:
      gamma = scoping(0.01, 1.0, batches_per_epoch)
    if rho is None:
      rho = scoping(1.0, 10.0, batches_per_epoch)
  checks.integer('L', L)
  inner_init, inner_step = inner_step_fns(
      inner_learning_rate, gamma, alpha=alpha, momentum=momentum,
      weight_decay=weight_decay, noise=noise, seed=seed, axis_name=axis_name)
  if outer_momentum is None:
    outer_momentum = momentum  # checked above
  lr_fn, rho_fn, axis_name = coupling_schedules(learning_rate, rho, outer_momentum, axis_name,
                                                 momentum_name='outer_momentum')

  def init_fn(params):
    return ParleState(inner=inner_init(params), coupling=ElasticCouplingState(
        count=jnp.zeros([], jnp.int32), momentum=optax.tree.zeros_like(params)))

  def inner_update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('parle needs `params` in update().')
    updates, inner_state = inner_step(grads, state.inner, params, state.coupling.count)
    return updates, state._replace(inner=inner_state)

  def couple(state, params=None):
    del params  # the round ends at the anchor, whatever the last inner iterate
    anchor, average, k = state.inner.anchor, state.inner.average, state.coupling.count
    updates, velocity = outer_step(jax.tree.map(jnp.subtract, anchor, average), anchor,
                                    average, state.coupling.momentum, lr_fn(k), rho_fn(k),
                                    outer_momentum, axis_name)
    new_anchor = optax.apply_updates(anchor, updates)
    return new_anchor, ParleState(
        inner=state.inner._replace(anchor=new_anchor, average=new_anchor),
        coupling=ElasticCouplingState(count=optax.safe_increment(k), momentum=velocity))

  return RoundParts(
      inner=optax.GradientTransformation(init_fn, inner_update_fn),
      couple=couple,
      L=L,
      axis_name=axis_name,
  )


def parle(learning_rate: ScalarOrSchedule, **kwargs: Any) -> optax.GradientTransformation:
  """Parle as a per-step optax transform: a drop-in replacement for ``optax.sgd``.

  Every ``update`` is one Entropy-SGD inner step on the current params ``y``
  (``grads`` is the mini-batch gradient at ``y``). Every ``L``-th update also
  couples the replicas (docs/algorithm.md, "One round")::

    zbar = pmean(z, axis_name)                       # the one all-reduce
    D    = (x^a - z) + rho(k) * (x^a - zbar)          # then outer Nesterov
    x^a  = x^a - learning_rate(k) * D

  and its updates move the params to the new anchor, where the next round
  starts. The coupling sits in a ``lax.cond``: under ``jax.pmap`` with one
  replica per device the all-reduce runs once per ``L`` steps. (Under ``vmap``
  a per-replica counter turns the cond into a select that runs the all-reduce
  every step; use the fused rounds of :mod:`parle_jax.rounds` there.)

  Schedules are evaluated at ``k``, the number of rounds completed before the
  current one (the whole first round, its coupling included, uses ``k = 0``).
  The model to evaluate is the reference, the mean of the anchors
  (``state.inner.anchor``) over replicas; see :func:`reference_params`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, parle_jax
    >>> tx = parle_jax.parle(0.1, L=5, gamma=0.03, rho=1.0)  # one replica
    >>> params = {'w': jnp.ones(3)}
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p['w'] ** 2)
    >>> for _ in range(10):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> int(state.coupling.count)  # rounds completed
    2

  Under ``jax.pmap(..., axis_name='replica')`` pass ``axis_name='replica'``
  (and initialise with ``jax.pmap(tx.init, axis_name='replica')`` when
  ``noise > 0``). It chains like any transform, e.g.
  ``optax.chain(optax.clip_by_global_norm(1.0), parle_jax.parle(...))``, and
  works under ``optax.inject_hyperparams`` (schedules given to the injector are
  evaluated per step; to keep round-indexed schedules, pass them through
  ``static_args``).

  Args:
    learning_rate: outer learning rate, a float or a schedule of ``k``.
    **kwargs: the keyword arguments of :func:`parle_parts` (``batches_per_epoch``,
      ``L``, ``inner_learning_rate``, ``gamma``, ``rho``, ``alpha``,
      ``momentum``, ``outer_momentum``, ``weight_decay``, ``noise``, ``seed``,
      ``axis_name``), documented there.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ParleState`.
  """
  parts = parle_parts(learning_rate, **kwargs)
  L = parts.L

  def update_fn(grads, state, params=None):
    updates, state = parts.inner.update(grads, state, params)

    def end_round(operand):
      _, round_state, current = operand
      new_params, round_state = parts.couple(round_state)
      return jax.tree.map(lambda new, old: new - old, new_params, current), round_state

    return lax.cond(state.inner.count % L == 0, end_round,
                    lambda operand: operand[:2], (updates, state, params))

  return optax.GradientTransformation(parts.inner.init, update_fn)


parle.__signature__ = inspect.signature(parle_parts).replace(  # the arguments, for help()
    return_annotation=optax.GradientTransformation)


def reference_params(state: ParleState, axis_name: AxisName = None) -> Params:
  """The reference model: the mean over replicas of the anchors ``x^a``.

  Call inside the mapped function (``pmap``/``vmap`` binding `axis_name`); it
  costs one all-reduce. With ``axis_name=None`` it is the anchor itself.
  For replica-stacked states outside any map, see
  :meth:`parle_jax.replicas.Replicas.reference`.
  """
  return replica_mean(state.inner.anchor, checks.normalize_axis(axis_name))


