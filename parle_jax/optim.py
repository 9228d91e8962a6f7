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

References:
  Chaudhari, Baldassi, Zecchina, Soatto, Talwalkar, Oberman, `Parle:
  parallelizing stochastic gradient descent <https://arxiv.org/abs/1707.00424>`_,
  SysML 2018.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

Params = optax.Params
AxisName = Union[None, str, Sequence[str]]
ScalarOrSchedule = optax.ScalarOrSchedule


# ----------------------------------------------------------------------------
# Argument validation: eager ValueErrors naming the argument.
# ----------------------------------------------------------------------------
def _concrete_float(value: Any) -> Optional[float]:
  """`value` as a Python float when it is a concrete number, else None.

  Schedules (callables) and traced arrays (as under `optax.inject_hyperparams`
  inside `jit`) cannot be checked eagerly and give None.
  """
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (str, bytes)):
    raise ValueError(f'expected a number or a schedule, got {value!r}')
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f'expected a number or a schedule, got {value!r}') from None


def _check_nonnegative(name: str, value: Any) -> None:
  number = _concrete_float(value)
  if number is not None and not number >= 0:
    raise ValueError(
        f'`{name}` must be >= 0 (a float or a schedule), got {value!r}.')


def _check_fraction(name: str, value: Any) -> None:
  number = _concrete_float(value)
  if number is not None and not 0 <= number < 1:
    raise ValueError(f'`{name}` must be in [0, 1), got {value!r}.')


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  integral = isinstance(value, numbers.Integral) or (
      hasattr(value, 'dtype') and jnp.issubdtype(value.dtype, jnp.integer)
      and jnp.ndim(value) == 0)
  if isinstance(value, bool) or not integral or int(value) < 1:
    raise ValueError(f'`{name}` must be an integer >= 1, got {value!r}.')


def _check_axis_name(axis_name: AxisName) -> None:
  if axis_name is None or isinstance(axis_name, str):
    return
  if (isinstance(axis_name, (tuple, list)) and axis_name
      and all(isinstance(a, str) for a in axis_name)):
    return
  raise ValueError(
      '`axis_name` must be None (a single replica), a string or a tuple of '
      f'strings naming the replica axes, got {axis_name!r}.')


def _as_schedule(value: ScalarOrSchedule) -> Callable[[jax.Array], jax.Array]:
  return value if callable(value) else (lambda _: value)


def _normalize_axis(axis_name: AxisName) -> AxisName:
  return tuple(axis_name) if isinstance(axis_name, list) else axis_name


# ----------------------------------------------------------------------------
# Small pieces shared by the transforms.
# ----------------------------------------------------------------------------
def scoping(initial: float, maximum: float,
            batches_per_epoch: int) -> optax.Schedule:
  """The paper's scoping schedule for a coupling coefficient.

  Returns ``k -> min(initial * (1 + 0.5 / batches_per_epoch) ** k, maximum)``,
  where ``k`` counts completed rounds: ``optax.exponential_decay`` growing
  by ``1 + 0.5 / batches_per_epoch`` per round, clipped at `maximum`. The
  coefficient grows by about ``e ** 0.5 = 1.65`` per epoch
  (``batches_per_epoch`` rounds).

  Examples:
    >>> import parle_jax
    >>> schedule = parle_jax.scoping(0.01, 1.0, batches_per_epoch=100)
    >>> round(float(schedule(100)), 4)  # one epoch later
    0.0165

  Args:
    initial: value at ``k = 0``, >= 0.
    maximum: the value is clipped at this, >= ``initial``.
    batches_per_epoch: mini-batches per epoch of one replica (``nb``), >= 1.

  Returns:
    An optax schedule of the round count ``k``.
  """
  _check_nonnegative('initial', initial)
  _check_positive_int('batches_per_epoch', batches_per_epoch)
  initial_value, maximum_value = _concrete_float(initial), _concrete_float(maximum)
  if (initial_value is not None and maximum_value is not None
      and not maximum_value >= initial_value):
    raise ValueError(
        f'`maximum` must be >= `initial`, got maximum={maximum!r}, '
        f'initial={initial!r}.')
  # initial * growth ** k, clipped at `maximum` (an upper bound, as growth > 1).
  return optax.exponential_decay(initial, transition_steps=1,
                                 decay_rate=1.0 + 0.5 / batches_per_epoch, end_value=maximum)


def _replica_mean(tree: Params, axis_name: AxisName) -> Params:
  """Mean over all replicas: one all-reduce, or the identity for one replica."""
  return tree if axis_name is None else lax.pmean(tree, axis_name)


def _nesterov(direction: Params, velocity: Params,
              momentum: float) -> tuple[Params, Params]:
  """``v = mu * v + d; d = d + mu * v``: ``optax.trace(mu, nesterov=True)`` on a bare velocity."""
  direction, state = optax.trace(momentum, nesterov=True).update(
      direction, optax.TraceState(trace=velocity))
  return direction, state.trace


def _pulled_step(base: Params, params: Params, center: Params, velocity: Params,
                 pull: jax.Array, step_size: jax.Array, momentum: float
                 ) -> tuple[Params, Params]:
  """The step of Parle's coupling and of Elastic-SGD: returns (updates, velocity).

  ``D = base + pull * (x - center)``, then Nesterov momentum, then
  ``-step_size * D``.
  """
  direction = jax.tree.map(lambda b, x, c: b + pull * (x - c), base, params, center)
  direction, velocity = _nesterov(direction, velocity, momentum)
  return jax.tree.map(lambda d: -step_size * d, direction), velocity


def _outer_step(entropy_grad: Params, anchor: Params, average: Params, velocity: Params,
                step_size: jax.Array, pull: jax.Array, momentum: float,
                axis_name: AxisName) -> tuple[Params, Params]:
  """One coupling of Parle, in the paper's order (docs/algorithm.md, "One round").

  ``zbar = pmean(z)`` (the round's one all-reduce), ``D = (x - z) + rho (x - zbar)``
  with ``entropy_grad = x - z``, outer Nesterov, ``x <- x - lr D``. Returns
  (updates of the anchor, outer velocity).
  """
  zbar = _replica_mean(average, axis_name)
  return _pulled_step(entropy_grad, anchor, zbar, velocity, pull, step_size, momentum)


# ----------------------------------------------------------------------------
# Building block 1: the inner Entropy-SGD step.
# ----------------------------------------------------------------------------
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
  _check_positive_int('L', L)
  init_fn, step_fn = _inner_step(inner_learning_rate, gamma, alpha=alpha, momentum=momentum,
                                 weight_decay=weight_decay, noise=noise, seed=seed,
                                 axis_name=axis_name)

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('entropy_sgd_inner needs `params` in update().')
    return step_fn(grads, state, params, state.count // L)

  return optax.GradientTransformation(init_fn, update_fn)


def _inner_step(inner_learning_rate, gamma, *, alpha, momentum, weight_decay, noise, seed,
                axis_name):
  """(init, step) of the inner Entropy-SGD step; ``step(grads, state, params, k)``.

  The round index ``k`` of the schedules is an argument: :func:`entropy_sgd_inner`
  derives it from its step count, Parle reads it from its coupling count.
  Checks the arguments (ValueError naming the bad one).
  """
  _check_nonnegative('inner_learning_rate', inner_learning_rate)
  _check_nonnegative('gamma', gamma)
  _check_fraction('alpha', alpha)
  _check_fraction('momentum', momentum)
  _check_nonnegative('weight_decay', weight_decay)
  if callable(noise):
    raise ValueError(f'`noise` must be a number >= 0, got the callable {noise!r}.')
  _check_nonnegative('noise', noise)
  _check_axis_name(axis_name)
  axis_name = _normalize_axis(axis_name)
  gamma_fn = _as_schedule(gamma)
  lr_fn = _as_schedule(inner_learning_rate)
  noisy = _concrete_float(noise) != 0.0  # True when noise is traced

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
    direction, velocity = _nesterov(direction, state.momentum, momentum)
    updates = jax.tree.map(lambda d: -step_size * d, direction)
    new_params = optax.apply_updates(params, updates)
    average = jax.tree.map(lambda z, y: alpha * z + (1 - alpha) * y,
                           state.average, new_params)
    return updates, state._replace(
        count=optax.safe_increment(state.count),
        average=average,
        momentum=velocity)

  return init_fn, step_fn


# ----------------------------------------------------------------------------
# Building block 2: the elastic coupling (the one collective).
# ----------------------------------------------------------------------------
def _coupling_schedules(learning_rate, rho, momentum, axis_name, momentum_name='momentum'):
  """Checks the coupling's arguments; returns (learning-rate schedule, rho schedule, axis).

  `momentum_name` is what the caller calls the outer momentum in its errors.
  """
  _check_nonnegative('learning_rate', learning_rate)
  _check_nonnegative('rho', rho)
  _check_fraction(momentum_name, momentum)
  _check_axis_name(axis_name)
  return _as_schedule(learning_rate), _as_schedule(rho), _normalize_axis(axis_name)


class ElasticCouplingState(NamedTuple):
  """State of :func:`elastic_coupling`, one replica.

  Attributes:
    count: couplings done so far (int32): the round index ``k`` of the schedules.
    momentum: ``v_x``, the outer Nesterov velocity.
  """

  count: jax.Array
  momentum: Params


def elastic_coupling(
    learning_rate: ScalarOrSchedule,
    rho: ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """The outer step of Parle: local-entropy gradient plus an elastic pull.

  Each update is one coupling. Its input ``grads`` is the local-entropy
  gradient estimate at the anchor, ``g = x - z`` (anchor minus the inner
  average), and ``params`` is the anchor ``x``. With ``zbar`` the mean of
  ``z = x - g`` over all replicas (one ``lax.pmean``)::

    D   = g + rho(k) * (x - zbar)
    v_x = momentum * v_x + D ;  D = D + momentum * v_x
    x   = x - learning_rate(k) * D

  where ``k`` counts couplings done before this one.

  Examples:
    >>> import jax.numpy as jnp, parle_jax
    >>> tx = parle_jax.elastic_coupling(0.5, rho=1.0, momentum=0.0)
    >>> anchor, average = jnp.array([1.0]), jnp.array([0.5])
    >>> updates, _ = tx.update(anchor - average, tx.init(anchor), anchor)
    >>> updates  # one replica: zbar = z, D = 0.5 + 1.0 * 0.5
    Array([-0.5], dtype=float32)

  Args:
    learning_rate: outer step size, a float or a schedule of ``k`` (the usual
      SGD schedule of the paper, in rounds).
    rho: coefficient of the elastic pull ``(x - zbar)`` (``1 / rho`` in the
      paper's objective), a float or a schedule of ``k``.
    momentum: outer Nesterov momentum, in [0, 1).
    axis_name: the replica axis (or tuple of axes) to average over; None for a
      single replica (no collective).

  Returns:
    An optax ``GradientTransformation`` with state :class:`ElasticCouplingState`.
  """
  lr_fn, rho_fn, axis_name = _coupling_schedules(learning_rate, rho, momentum, axis_name)

  def init_fn(params):
    return ElasticCouplingState(count=jnp.zeros([], jnp.int32),
                                momentum=optax.tree.zeros_like(params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('elastic_coupling needs `params` (the anchors) in update().')
    average = jax.tree.map(lambda x, g: x - g, params, grads)  # z = x - g
    updates, velocity = _outer_step(grads, params, average, state.momentum,
                                    lr_fn(state.count), rho_fn(state.count), momentum,
                                    axis_name)
    return updates, ElasticCouplingState(count=optax.safe_increment(state.count),
                                         momentum=velocity)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------
# Parle = inner steps + one coupling every L steps.
# ----------------------------------------------------------------------------
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


class ParleParts(NamedTuple):
  """Parle split at the round boundary, for fused rounds.

  Attributes:
    inner: a ``GradientTransformation`` on :class:`ParleState` whose updates are
      inner steps only: no communication, the anchor stays put.
    couple: ``couple(state) -> (params, state)``, the end of a round: the elastic
      coupling (one all-reduce over `axis_name`) moves the anchor, and the next
      round starts from it (the returned params equal the new anchor; ``z`` is
      reset to it).
    L: inner steps per round.
    axis_name: the replica axis (or axes) the coupling reduces over.
  """

  inner: optax.GradientTransformation
  couple: Callable[[ParleState], tuple[Params, ParleState]]
  L: int
  axis_name: AxisName


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
) -> ParleParts:
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
    :class:`ParleParts`; its transform's state is :class:`ParleState`.
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
  _check_positive_int('L', L)
  inner_init, inner_step = _inner_step(
      inner_learning_rate, gamma, alpha=alpha, momentum=momentum,
      weight_decay=weight_decay, noise=noise, seed=seed, axis_name=axis_name)
  if outer_momentum is None:
    outer_momentum = momentum  # checked above
  lr_fn, rho_fn, axis_name = _coupling_schedules(learning_rate, rho, outer_momentum, axis_name,
                                                 momentum_name='outer_momentum')

  def init_fn(params):
    return ParleState(inner=inner_init(params), coupling=ElasticCouplingState(
        count=jnp.zeros([], jnp.int32), momentum=optax.tree.zeros_like(params)))

  def inner_update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('parle needs `params` in update().')
    updates, inner_state = inner_step(grads, state.inner, params, state.coupling.count)
    return updates, state._replace(inner=inner_state)

  def couple(state):
    anchor, average, k = state.inner.anchor, state.inner.average, state.coupling.count
    updates, velocity = _outer_step(jax.tree.map(jnp.subtract, anchor, average), anchor,
                                    average, state.coupling.momentum, lr_fn(k), rho_fn(k),
                                    outer_momentum, axis_name)
    new_anchor = optax.apply_updates(anchor, updates)
    return new_anchor, ParleState(
        inner=state.inner._replace(anchor=new_anchor, average=new_anchor),
        coupling=ElasticCouplingState(count=optax.safe_increment(k), momentum=velocity))

  return ParleParts(
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
  return _replica_mean(state.inner.anchor, _normalize_axis(axis_name))


# ----------------------------------------------------------------------------
# The Elastic-SGD baseline.
# ----------------------------------------------------------------------------
class ElasticSGDState(NamedTuple):
  """State of :func:`elastic_sgd`, one replica.

  Attributes:
    count: steps taken (int32); the schedules' argument.
    momentum: Nesterov velocity.
  """

  count: jax.Array
  momentum: Params


def elastic_sgd(
    learning_rate: ScalarOrSchedule,
    rho: Optional[ScalarOrSchedule] = None,
    *,
    batches_per_epoch: Optional[int] = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Elastic-SGD (Zhang et al., 2015; symmetric form): communicates every step.

  Each update, with ``x`` the params of this replica and ``g`` its gradient::

    d = g + weight_decay * x + rho(t) * (x - pmean(x))    # one all-reduce
    v = momentum * v + d ;  d = d + momentum * v
    x = x - learning_rate(t) * d

  Examples:
    >>> import jax.numpy as jnp, parle_jax
    >>> tx = parle_jax.elastic_sgd(0.1, rho=1.0)  # one replica: plain Nesterov SGD
    >>> updates, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
    >>> updates
    Array([-0.19, -0.19], dtype=float32)

  Args:
    learning_rate: step size, a float or a schedule of the step ``t``.
    rho: coefficient of the elastic pull; None means the paper's scoping
      ``scoping(1.0, 10.0, batches_per_epoch)`` (each step is a round).
    batches_per_epoch: required when `rho` is None.
    momentum: Nesterov momentum, in [0, 1).
    weight_decay: L2 coefficient, >= 0.
    axis_name: the replica axis (or axes); None for one replica.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ElasticSGDState`.
  """
  if rho is None:
    if batches_per_epoch is None:
      raise ValueError(
          '`batches_per_epoch` is required when rho uses the default scoping '
          'schedule; pass batches_per_epoch or give rho explicitly.')
    rho = scoping(1.0, 10.0, batches_per_epoch)
  _check_nonnegative('weight_decay', weight_decay)
  lr_fn, rho_fn, axis_name = _coupling_schedules(learning_rate, rho, momentum, axis_name)

  def init_fn(params):
    return ElasticSGDState(count=jnp.zeros([], jnp.int32),
                           momentum=optax.tree.zeros_like(params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError('elastic_sgd needs `params` in update().')
    mean_params = _replica_mean(params, axis_name)  # one all-reduce per step
    decayed = jax.tree.map(lambda g, x: g + weight_decay * x, grads, params)
    updates, velocity = _pulled_step(decayed, params, mean_params, state.momentum,
                                     rho_fn(state.count), lr_fn(state.count), momentum)
    return updates, ElasticSGDState(count=optax.safe_increment(state.count),
                                    momentum=velocity)

  return optax.GradientTransformation(init_fn, update_fn)
