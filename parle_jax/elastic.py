"""The elastic pieces of Parle, as optax transforms: scoping, the coupling, Elastic-SGD.

* :func:`scoping` -- the paper's growing coefficients (``gamma``, ``rho``).
* :func:`elastic_coupling` -- Parle's outer step, the round's one all-reduce.
* :func:`elastic_sgd` -- the Elastic-SGD baseline (Zhang et al., 2015), which
  communicates every step.

Also the Nesterov step every transform here uses (``optax.trace``) and the
mean over replicas (``lax.pmean``).

Pure optax (no Flax). References: Chaudhari et al., `Parle: parallelizing
stochastic gradient descent <https://arxiv.org/abs/1707.00424>`_, SysML 2018;
Zhang, Choromanska, LeCun, `Deep learning with Elastic Averaging SGD
<https://arxiv.org/abs/1412.6651>`_, NeurIPS 2015.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from parle_jax import checks
from parle_jax.checks import AxisName

Params = optax.Params
ScalarOrSchedule = optax.ScalarOrSchedule


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
  checks.nonnegative('initial', initial)
  checks.integer('batches_per_epoch', batches_per_epoch)
  initial_value, maximum_value = checks.concrete_float(initial), checks.concrete_float(maximum)
  if (initial_value is not None and maximum_value is not None
      and not maximum_value >= initial_value):
    raise ValueError(
        f'`maximum` must be >= `initial`, got maximum={maximum!r}, '
        f'initial={initial!r}.')
  # initial * growth ** k, clipped at `maximum` (an upper bound, as growth > 1).
  return optax.exponential_decay(initial, transition_steps=1,
                                 decay_rate=1.0 + 0.5 / batches_per_epoch, end_value=maximum)


def replica_mean(tree: Params, axis_name: AxisName) -> Params:
  """Mean over all replicas: one all-reduce, or the identity for one replica."""
  return tree if axis_name is None else lax.pmean(tree, axis_name)


def nesterov(direction: Params, velocity: Params,
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
  direction, velocity = nesterov(direction, velocity, momentum)
  return jax.tree.map(lambda d: -step_size * d, direction), velocity


def _elastic_transform(name: str, state_class, lr_fn, rho_fn, momentum: float,
                       base_and_center) -> optax.GradientTransformation:
  """A transform whose update is :func:`_pulled_step` on ``base_and_center(grads, params)``.

  The shape shared by :func:`elastic_coupling` and :func:`elastic_sgd`: state
  ``state_class(count, momentum)``, schedules evaluated at ``count``.
  """

  def init_fn(params):
    return state_class(count=jnp.zeros([], jnp.int32), momentum=optax.tree.zeros_like(params))

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError(f'{name} needs `params` in update().')
    base, center = base_and_center(grads, params)
    updates, velocity = _pulled_step(base, params, center, state.momentum,
                                     rho_fn(state.count), lr_fn(state.count), momentum)
    return updates, state_class(count=optax.safe_increment(state.count), momentum=velocity)

  return optax.GradientTransformation(init_fn, update_fn)


def outer_step(entropy_grad: Params, anchor: Params, average: Params, velocity: Params,
                step_size: jax.Array, pull: jax.Array, momentum: float,
                axis_name: AxisName) -> tuple[Params, Params]:
  """One coupling of Parle, in the paper's order (docs/algorithm.md, "One round").

  ``zbar = pmean(z)`` (the round's one all-reduce), ``D = (x - z) + rho (x - zbar)``
  with ``entropy_grad = x - z``, outer Nesterov, ``x <- x - lr D``. Returns
  (updates of the anchor, outer velocity).
  """
  zbar = replica_mean(average, axis_name)
  return _pulled_step(entropy_grad, anchor, zbar, velocity, pull, step_size, momentum)



def coupling_schedules(learning_rate, rho, momentum, axis_name, momentum_name='momentum'):
  """Checks the coupling's arguments; returns (learning-rate schedule, rho schedule, axis).

  `momentum_name` is what the caller calls the outer momentum in its errors.
  """
  checks.nonnegative('learning_rate', learning_rate)
  checks.nonnegative('rho', rho)
  checks.fraction(momentum_name, momentum)
  checks.axis_name(axis_name)
  return checks.as_schedule(learning_rate), checks.as_schedule(rho), checks.normalize_axis(axis_name)


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
  lr_fn, rho_fn, axis_name = coupling_schedules(learning_rate, rho, momentum, axis_name)

  def base_and_center(entropy_grad, anchor):  # D = (x - z) + rho (x - zbar), z = x - g
    return entropy_grad, replica_mean(jax.tree.map(jnp.subtract, anchor, entropy_grad),
                                      axis_name)

  return _elastic_transform('elastic_coupling', ElasticCouplingState, lr_fn, rho_fn, momentum,
                            base_and_center)



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
  checks.nonnegative('weight_decay', weight_decay)
  lr_fn, rho_fn, axis_name = coupling_schedules(learning_rate, rho, momentum, axis_name)

  def base_and_center(grads, params):  # D = g + wd x + rho (x - xbar): an all-reduce per step
    return (jax.tree.map(lambda g, x: g + weight_decay * x, grads, params),
            replica_mean(params, axis_name))

  return _elastic_transform('elastic_sgd', ElasticSGDState, lr_fn, rho_fn, momentum,
                            base_and_center)
