"""The optimizers of the experiments, all as fused rounds of one training loop.

Every optimizer becomes a :class:`Plan` (replicas, batch per replica, steps per
round, number of rounds, how the budget is counted) and a per-step optax
transform plus an optional end-of-round coupling, so that Parle and the
baselines run through the same loop, data pipeline and evaluation:

==================  ==========  =======================================================
optimizer           replicas    per step / per round
==================  ==========  =======================================================
parle               n (3)       Entropy-SGD inner step / elastic coupling (1 all-reduce)
entropy_sgd         1           Entropy-SGD inner step / outer step (Parle, n=1, rho=0)
elastic_sgd         n (3)       Elastic-SGD step, all-reduce of the weights every step
sgd                 1           Nesterov SGD
data_parallel_sgd   n (devices) gradients all-reduced every step; batch split over n
local_sgd           n (3)       Nesterov SGD step / params averaged (1 all-reduce)
diloco              n (3)       Nesterov SGD step / outer Nesterov step on the mean
                                pseudo-gradient (1 all-reduce)
==================  ==========  =======================================================

Local SGD and DiLoCo train one model (the replicas start equal) with the same
n, L and batch per replica as Parle, and count epochs as passes per replica.

Epochs are the paper's: one Parle (or Entropy-SGD) epoch is ``nb`` rounds of
``L`` mini-batches, i.e. ``L`` passes over the data per replica; for the
SGD-type optimizers an epoch is one pass. ``effective epochs`` (passes over a
replica's data) make the two comparable; ``nb`` is the number of mini-batches
in one pass over a replica's share of the training set.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import jax
import optax
from jax import lax

import parle_jax
from experiments.configs.base import OPTIMIZERS
from parle_jax import replicas as replicas_lib
from parle_jax import rounds

_ENTROPY_TYPE = ('parle', 'entropy_sgd')
_SINGLE_MODEL = ('sgd', 'entropy_sgd')
_ONE_MODEL = ('data_parallel_sgd', 'local_sgd', 'diloco')  # replicas start from the same weights


@dataclasses.dataclass(frozen=True)
class Plan:
  """How an optimizer spends its budget.

  Attributes:
    optimizer: one of :data:`OPTIMIZERS`.
    num_replicas: replicas (models) trained at once.
    batch_size: mini-batch of one replica per step.
    steps_per_round: steps fused into one dispatch (``L`` for Parle).
    total_rounds: rounds to run.
    batches_per_epoch: ``nb``, mini-batches per pass over a replica's data.
    rounds_per_epoch: rounds in one epoch of this optimizer.
    examples_per_replica: size of a replica's share of the training set.
    same_init: whether all replicas start from the same weights.
    mapping: local replica mapping (``'vmap'`` where steps use collectives).
  """

  optimizer: str
  num_replicas: int
  batch_size: int
  steps_per_round: int
  total_rounds: int
  batches_per_epoch: int
  rounds_per_epoch: float
  examples_per_replica: int
  same_init: bool
  mapping: str

  def epochs(self, rounds_done: int) -> float:
    """Epochs of this optimizer completed after `rounds_done` rounds."""
    return rounds_done / self.rounds_per_epoch

  def effective_epochs(self, rounds_done: int) -> float:
    """Passes over one replica's data after `rounds_done` rounds."""
    return rounds_done * self.steps_per_round * self.batch_size / self.examples_per_replica

  def gradient_evaluations(self, rounds_done: int) -> int:
    """Mini-batch gradients computed by all replicas together."""
    return rounds_done * self.steps_per_round * self.num_replicas


def make_plan(config, num_train_examples: int, num_devices: int) -> Plan:
  """Derives the :class:`Plan` from a (validated) experiment config.

  `num_devices` counts the places a replica can go: devices, or islands of
  ``config.devices_per_replica`` devices.
  """
  optimizer = config.optimizer
  if optimizer not in OPTIMIZERS:
    raise ValueError(f'config.optimizer={optimizer!r} is unknown; choose one of {OPTIMIZERS}.')
  num_replicas = config.num_replicas
  if num_replicas is None:
    num_replicas = {'sgd': 1, 'entropy_sgd': 1, 'data_parallel_sgd': num_devices}.get(
        optimizer, 3)
  if optimizer in _SINGLE_MODEL and num_replicas != 1:
    raise ValueError(
        f'config.optimizer={optimizer!r} trains one model, but config.num_replicas='
        f'{num_replicas}; leave num_replicas unset (None) or set it to 1.')
  batch_size = config.batch_size
  if optimizer == 'data_parallel_sgd':  # one model; the global batch is split
    if batch_size % num_replicas:
      raise ValueError(
          f'config.batch_size={batch_size} must be divisible by the {num_replicas} '
          'data-parallel workers (config.num_replicas).')
    batch_size //= num_replicas
  if optimizer == 'data_parallel_sgd':
    examples = num_train_examples // num_replicas  # each worker's share of an epoch
  elif config.data_fraction < 1:
    examples = max(1, round(config.data_fraction * num_train_examples))
  else:
    examples = num_train_examples
  if batch_size > examples:
    raise ValueError(f'config.batch_size={config.batch_size} exceeds the {examples} '
                     'training examples of a replica.')
  island = config.get('devices_per_replica', 1)
  if batch_size % island:
    per_replica = (f'a worker\'s {batch_size} examples' if optimizer == 'data_parallel_sgd'
                   else f'{batch_size} examples')
    raise ValueError(
        f'config.batch_size={config.batch_size} is invalid with config.devices_per_replica='
        f'{island}: each device of a replica takes an equal share of its mini-batch, and '
        f'{per_replica} do not split {island} ways; use a multiple of {island}.')
  batches_per_epoch = math.ceil(examples / batch_size)
  steps_per_round = config.L
  if optimizer in _ENTROPY_TYPE:
    rounds_per_epoch = float(batches_per_epoch)
  else:
    rounds_per_epoch = batches_per_epoch / steps_per_round
  total_rounds = max(1, round(config.epochs * rounds_per_epoch))
  mapping = replicas_lib.local_mapping(
      config.mapping, per_device=max(1, num_replicas // num_devices),
      communicates_every_step=optimizer in ('elastic_sgd', 'data_parallel_sgd'),
      what=optimizer, name='config.mapping')
  return Plan(optimizer=optimizer, num_replicas=num_replicas, batch_size=batch_size,
              steps_per_round=steps_per_round, total_rounds=total_rounds,
              batches_per_epoch=batches_per_epoch, rounds_per_epoch=rounds_per_epoch,
              examples_per_replica=examples, same_init=optimizer in _ONE_MODEL,
              mapping=mapping)


# The paper's Parle runs last 5 Parle epochs; its scoping grows gamma and rho by
# (1 + 0.5 / nb) per round, about e ** 2.5 = 12 over such a run.
PAPER_PARLE_EPOCHS = 5


def compress_to_rounds(config, rounds: int, num_train_examples: int, num_devices: int = 1):
  """`config` trained for `rounds` rounds, its schedules compressed to fit them.

  For budgets far below the paper's: the learning rates drop (by
  config.lr_decay) at 50% and 75% of the run, and the scoping coefficients
  grow over the run as they would over the paper's 5 Parle epochs
  (``scoping_batches_per_epoch = rounds / 5``, counted in rounds for Parle and
  Entropy-SGD and in steps for Elastic-SGD). Returns a new config.
  """
  if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
    raise ValueError(f'`rounds` must be an integer >= 1, got {rounds!r}.')
  config = copy.deepcopy(config)
  plan = make_plan(config, num_train_examples, num_devices)
  with config.unlocked():
    config.epochs = rounds / plan.rounds_per_epoch
    config.lr_drop_epochs = (0.5 * config.epochs, 0.75 * config.epochs)
    per_epoch = max(1, round(rounds / PAPER_PARLE_EPOCHS))
    config.scoping_batches_per_epoch = per_epoch * (
        1 if config.optimizer in _ENTROPY_TYPE else config.L)
  return config


def learning_rate_schedule(config, plan: Plan) -> optax.Schedule:
  """Step decay: ``learning_rate * lr_decay ** (epoch drops passed)``.

  Parle's schedules count rounds (``nb`` per epoch); the SGD-type ones steps.
  """
  per_epoch = plan.batches_per_epoch
  boundaries = {int(round(epoch * per_epoch)): config.lr_decay
                for epoch in config.lr_drop_epochs}
  return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def average_gradients(axis_name) -> optax.GradientTransformation:
  """Data-parallel SGD's step: the mean of the replicas' gradients (one all-reduce)."""

  def update_fn(updates, state, params=None):
    del params
    return (updates if axis_name is None else lax.pmean(updates, axis_name)), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(config, plan: Plan, axis_name
                   ) -> tuple[optax.GradientTransformation, Optional[rounds.CoupleFn]]:
  """The per-step transform and the end-of-round coupling of `plan.optimizer`."""
  schedule = learning_rate_schedule(config, plan)
  nb = config.scoping_batches_per_epoch or plan.batches_per_epoch
  if plan.optimizer in _ENTROPY_TYPE:
    parts = parle_jax.parle_parts(
        schedule, L=plan.steps_per_round, inner_learning_rate=config.inner_learning_rate,
        gamma=parle_jax.scoping(config.gamma_initial, config.gamma_max, nb),
        rho=(parle_jax.scoping(config.rho_initial, config.rho_max, nb)
             if plan.optimizer == 'parle' else 0.0),
        alpha=config.alpha, momentum=config.momentum, weight_decay=config.weight_decay,
        noise=config.noise, seed=config.seed, axis_name=axis_name)
    return parts.inner, parts.couple
  if plan.optimizer == 'elastic_sgd':
    return parle_jax.elastic_sgd(
        schedule, parle_jax.scoping(config.rho_initial, config.rho_max, nb),
        momentum=config.momentum, weight_decay=config.weight_decay,
        axis_name=axis_name), None
  if plan.optimizer == 'local_sgd':
    parts = parle_jax.local_sgd(schedule, L=plan.steps_per_round, momentum=config.momentum,
                                weight_decay=config.weight_decay, axis_name=axis_name)
    return parts.inner, parts.couple
  sgd = optax.chain(optax.add_decayed_weights(config.weight_decay),
                    optax.sgd(schedule, momentum=config.momentum, nesterov=True))
  if plan.optimizer == 'diloco':
    parts = parle_jax.diloco(sgd, L=plan.steps_per_round,
                             outer_learning_rate=config.outer_learning_rate,
                             outer_momentum=config.outer_momentum, axis_name=axis_name)
    return parts.inner, parts.couple
  if plan.optimizer == 'data_parallel_sgd':
    return optax.chain(average_gradients(axis_name), sgd), None
  return sgd, None


def sgd_config_with_same_budget(config, plan: Plan, *, per_replica: bool = False):
  """SGD on one model with the mini-batch gradients `plan` spends.

  All of them (the same compute on one device), or with ``per_replica`` those
  of one replica (what ``n`` parallel workers do in the same wall-clock time).
  The learning rate drops, and the evaluations happen, at the same fractions
  of the run.
  """
  budget = plan.gradient_evaluations(plan.total_rounds)
  if per_replica:
    budget //= plan.num_replicas
  sgd = copy.deepcopy(config)
  with sgd.unlocked():
    sgd.optimizer, sgd.num_replicas, sgd.compare_to_sgd = 'sgd', None, False
    sgd.data_fraction = 1.0
    sgd.epochs = budget / plan.batches_per_epoch  # same batch size, one pass = nb steps
    scale = sgd.epochs / config.epochs
    sgd.lr_drop_epochs = tuple(e * scale for e in config.lr_drop_epochs)
    # Evaluations at the same fractions of the run as `config`'s (0: once per epoch).
    sgd_rounds = budget / config.L
    sgd.eval_every_rounds = config.eval_every_rounds and max(
        1, round(config.eval_every_rounds * sgd_rounds / plan.total_rounds))
  return sgd


def select_devices(plan: Plan, devices_per_replica: int = 1) -> list:
  """The devices the replicas run on: all of them, or fewer when there are fewer replicas.

  A replica spans `devices_per_replica` devices (an island, inside one host,
  see :func:`parle_jax.replicas.islands_of`). With several processes, every
  process must hold replicas: fewer replicas than islands take the same number
  of devices from each process.
  """
  devices, k = jax.devices(), devices_per_replica
  n, processes = plan.num_replicas, jax.process_count()
  if len(devices) % k:
    raise ValueError(
        f'config.devices_per_replica={k} is invalid: the {len(devices)} devices do not split '
        f'into islands of {k}; use a divisor of {len(devices)}.')
  islands = len(devices) // k
  if n < islands:
    if (n * k) % processes:
      raise ValueError(
          f'config.num_replicas={n} is invalid with {processes} processes of '
          f'{len(devices)} devices: every process must hold the same number of '
          + ('replicas' if k == 1 else f'devices ({n} x {k} do not split {processes} ways)')
          + f'; use a multiple of {processes} (or of {islands}).')
    per_process = n * k // processes
    return [d for p in range(processes)
            for d in [d for d in devices if d.process_index == p][:per_process]]
  if n % islands:
    places = (f'{islands} devices' if k == 1 else
              f'{islands} islands of {k} devices ({len(devices)} devices)')
    raise ValueError(
        f'config.num_replicas={n} is invalid: it must be a multiple of the '
        f'{places} (or at most their number).')
  return devices
