"""Fused rounds: ``L`` inner steps under ``lax.scan``, then one coupling, in one dispatch.

A round of Parle (or of any optax optimizer, for baselines) on all replicas is
one ``pmap``-ed call: every replica scans over its ``L`` mini-batches (given, or
drawn on the device by a ``batch_fn``), then all replicas couple once. The
replica state is donated, so peak memory is the state plus one step's
activations per replica.

The loss function is the single-replica contract::

  loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))

where ``model_state`` holds non-trainable per-replica variables (e.g. BatchNorm
statistics, never averaged across replicas) and ``metrics`` is a dict of
scalars reported for every step.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax

from parle_jax import checks
from parle_jax import replicas as replicas_lib
from parle_jax.optim import RoundParts

LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict]]]
# batch_fn(data, rng, step, replica) -> batch, traced inside the round.
BatchFn = Callable[[Any, jax.Array, jax.Array, jax.Array], Any]
# couple(opt_state, params) -> (params, opt_state), run once at the end of a round.
CoupleFn = Callable[[Any], tuple[Any, Any]]


class ReplicaState(NamedTuple):
  """Training state of the replicas; every leaf has leading axes ``[D, R]``.

  Attributes:
    step: inner steps taken by each replica (int32).
    params: the current params ``y`` of each replica (after a Parle round they
      equal its anchor ``x^a``).
    opt_state: the optimizer state of each replica (e.g. :class:`ParleState`).
    model_state: non-trainable per-replica variables (BatchNorm statistics);
      an empty dict when the model has none. Never reduced across replicas.
    key: each replica's PRNG key; the data and dropout keys of a step are
      derived from it and the step.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  key: jax.Array


def init_replicas(replicas: replicas_lib.Replicas, tx: optax.GradientTransformation,
                  params: Any, model_state: Any = None, *, seed: int = 0) -> ReplicaState:
  """Builds the replica state from per-replica params stacked on axis 0.

  Args:
    replicas: the layout.
    tx: the per-step optimizer (for Parle, ``parts.inner``); its ``init`` runs
      on every replica with the replica axes bound, so per-replica noise keys
      differ.
    params: params of this process's replicas, leading axis ``n_local``
      (different initialisations, as in the paper).
    model_state: per-replica model state with the same leading axis, or None.
    seed: seed of the replicas' data and dropout keys.

  Returns:
    A :class:`ReplicaState` on the devices, leading axes ``[D, R]``.
  """
  model_state = {} if model_state is None else model_state
  replica_ids = replicas.local_replica_ids
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(replica_ids)
  sharded = replicas.shard(jax.device_get(ReplicaState(
      step=jnp.zeros_like(replica_ids), params=params, opt_state=(),
      model_state=model_state, key=keys)))
  init = replicas.per_replica(lambda _, p: tx.init(p))
  return sharded._replace(opt_state=init(sharded.params))


def parts_round(loss_fn: LossFn, parts: RoundParts, replicas: replicas_lib.Replicas,
                **kwargs) -> 'RoundFn':
  """:func:`make_round` for round parts: ``L`` inner steps, then the coupling.

  `parts` come from :func:`parle_jax.parle_parts`, :func:`parle_jax.local_sgd`
  or :func:`parle_jax.diloco`; ``kwargs`` go to :func:`make_round`.
  """
  if parts.axis_name != replicas.axis_name:
    raise ValueError(
        f'the round parts reduce over axis_name={parts.axis_name!r}, but these '
        f'replicas need axis_name={replicas.axis_name!r}; build them with '
        'axis_name=replicas.axis_name (e.g. parle_jax.parle_parts(..., '
        'axis_name=replicas.axis_name)).')
  return make_round(loss_fn, parts.inner, replicas, L=parts.L, couple=parts.couple,
                    **kwargs)


parle_round = parts_round  # Parle's parts are the first the rounds ran


def make_round(loss_fn: LossFn, tx: optax.GradientTransformation,
               replicas: replicas_lib.Replicas, *, L: int,
               couple: Optional[CoupleFn] = None,
               batch_fn: Optional[BatchFn] = None,
               with_reference: bool = False,
               mapping: Optional[str] = None) -> 'RoundFn':
  """Builds the fused round: ``L`` steps of `tx` per replica, then `couple`.

  Args:
    loss_fn: ``loss_fn(params, model_state, batch, rng) -> (loss, (model_state,
      metrics))`` for one replica.
    tx: per-step optimizer of one replica (``parts.inner`` for Parle, or e.g.
      ``optax.sgd`` for baselines; collectives inside it need ``'vmap'``).
    replicas: the layout.
    L: steps per round (the ``lax.scan`` length), >= 1.
    couple: ``couple(opt_state, params) -> (params, opt_state)`` at the end
      of the round, under ``vmap`` over the local replicas (``parts.couple``
      of :class:`parle_jax.optim.RoundParts`); None for none.
    batch_fn: None to pass the round's mini-batches, leading axes
      ``[n_local, L]``; or ``batch_fn(data, rng, step, replica) -> batch`` to
      draw them on the device from ``data`` (passed to the round already on
      the devices: ``replicas.broadcast(dataset)``).
    with_reference: also return the reference (mean of the replicas' params
      after the round), at the cost of a second all-reduce.
    mapping: local mapping, default ``replicas.mapping``; ``'auto'`` compiles
      and runs one round of each mapping (on a copy of the state) at the first
      call or :meth:`RoundFn.warm_up`, and keeps the faster.

  Returns:
    A :class:`RoundFn`: ``round_fn(state, data) -> (state, metrics)`` (plus the
    reference when asked), with metrics of shape ``[D, R, L]``.

  With islands (``replicas.devices_per_replica = k > 1``), each device of a
  replica's island takes its ``B / k`` examples of every mini-batch
  (:meth:`Replicas.batch_share`; all draw the same whole batch), draws
  dropout from the step's key folded with its index in the island, and the
  island averages the gradient, loss and metrics (one all-reduce over
  ``'data'`` per step) before `tx` runs, so `tx` and `couple` see what one
  device would. `loss_fn`'s batch norm must reduce its statistics over
  ``replicas.data_axis_name`` (e.g. ``classification_loss(model,
  batch_norm_axis_name=...)``) for train-mode statistics of the whole batch.
  """
  checks.integer('L', L)
  mapping = replicas_lib.check_mapping(replicas.mapping if mapping is None else mapping)
  islands = replicas.devices_per_replica > 1

  def replica_round(replica_id, state: ReplicaState, data):
    """The inner steps of one replica (no collectives)."""
    data_key = jax.random.fold_in(state.key, 0)
    loss_key = jax.random.fold_in(state.key, 1)

    def step(carry, batch):
      step_count, params, opt_state, model_state = carry
      if batch_fn is not None:
        batch = batch_fn(data, data_key, step_count, replica_id)
      rng = jax.random.fold_in(loss_key, step_count)
      if islands:  # this device's share of the batch, its own dropout key
        batch = replicas.batch_share(batch)
        rng = jax.random.fold_in(rng, lax.axis_index(replicas_lib.DATA_AXIS))
      (loss, (model_state, metrics)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(params, model_state, batch, rng)
      # The island's all-reduce: the gradient (and metrics) of the whole mini-batch.
      loss, metrics, grads = replicas.island_mean((loss, metrics, grads))
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (step_count + 1, params, opt_state, model_state), dict(metrics, loss=loss)

    carry = (state.step, state.params, state.opt_state, state.model_state)
    xs = None if batch_fn is not None else data
    (step_count, params, opt_state, model_state), metrics = lax.scan(
        step, carry, xs, length=L)
    return ReplicaState(step_count, params, opt_state, model_state, state.key), metrics

  def end_of_round(_, state: ReplicaState):
    """The coupling of one replica, under vmap (so its pmean sees all replicas)."""
    if couple is not None:
      params, opt_state = couple(state.opt_state, state.params)
      state = state._replace(params=params, opt_state=opt_state)
    reference = replicas.mean(state.params) if with_reference else None
    return state, reference

  def build(local_mapping):
    def device_round(state, data):
      if batch_fn is None:
        state, metrics = replicas.map_local(replica_round, local_mapping)(state, data)
      else:
        state, metrics = replicas.map_local(
            lambda i, s: replica_round(i, s, data), local_mapping)(state)
      state, reference = replicas.map_local(end_of_round, 'vmap')(state)
      if with_reference:
        return state, metrics, jax.tree.map(lambda x: x[0], reference)
      return state, metrics
    return replicas.pmap(device_round, donate_argnums=(0,))

  return RoundFn(build, replicas, mapping, L=L, passes_batches=batch_fn is None,
                 with_reference=with_reference)


class RoundFn:
  """A compiled fused round; call as ``round_fn(state, data)``.

  Attributes:
    mapping: the local mapping in use (``'auto'`` until the first call or
      :meth:`warm_up` resolves it). Setting it to another local mapping makes
      the next call use (and compile) that one.
    timings: seconds of one round of each mapping, when ``'auto'`` measured
      them (each candidate runs one round on a copy of the state).
    compile_seconds: seconds spent tracing and compiling each mapping's round.
  """

  def __init__(self, build, replicas, mapping, *, L, passes_batches, with_reference):
    self._build = build
    self._compiled = {}
    self.replicas = replicas
    self._mapping = replicas_lib.local_mapping(mapping, per_device=replicas.per_device)
    self.L = L
    self.passes_batches = passes_batches
    self.with_reference = with_reference
    self.timings: dict[str, float] = {}
    self.compile_seconds: dict[str, float] = {}

  @property
  def mapping(self) -> str:
    return self._mapping

  @property
  def chosen_mapping(self) -> Optional[str]:
    """The local mapping once decided; None while ``'auto'`` has not measured yet."""
    return None if self._mapping == 'auto' else self._mapping

  @mapping.setter
  def mapping(self, mapping: str) -> None:
    self._mapping = replicas_lib.check_mapping(mapping)

  def _fn(self, mapping):
    if mapping not in self._compiled:
      self._compiled[mapping] = self._build(mapping)
    return self._compiled[mapping]

  def _check_batches(self, batches):
    expected = (self.replicas.num_local_replicas, self.L)
    for path, leaf in jax.tree_util.tree_flatten_with_path(batches)[0]:
      if tuple(leaf.shape[:2]) != expected:
        raise ValueError(
            f'batch leaf {jax.tree_util.keystr(path)} has leading axes '
            f'{tuple(leaf.shape[:2])}; a round needs [num_local_replicas, L] = '
            f'{list(expected)} (one mini-batch per replica and inner step).')
    return self.replicas.shard(batches)

  def _first_call(self, mapping: str, state, data) -> tuple[float, float]:
    """Compiles `mapping`'s round and runs it once on a copy of `state`.

    Returns (seconds to trace and compile, seconds to run). XLA runs the
    round asynchronously, so the call returns once it is compiled and
    dispatched; should a backend run it inline (nothing left to wait for),
    a second round is timed instead.
    """
    trial = jax.tree.map(jnp.copy, state)
    start = time.perf_counter()
    trial = self._fn(mapping)(trial, data)[0]
    dispatched = time.perf_counter()
    jax.block_until_ready(trial)
    done = time.perf_counter()
    self.compile_seconds[mapping] = dispatched - start
    if done - dispatched < 1e-3:
      trial = self._fn(mapping)(trial, data)[0]
      jax.block_until_ready(trial)
      dispatched, done = done, time.perf_counter()
    return dispatched - start, done - dispatched

  def _choose_mapping(self, state, data):
    """Compiles and runs one round of each mapping on copies of the state; keeps the faster."""
    for candidate in replicas_lib.LOCAL_MAPPINGS:
      self.timings[candidate] = self._first_call(candidate, state, data)[1]
    if jax.process_count() > 1:  # every process must run the same program: process 0's timings
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      agreed = multihost_utils.broadcast_one_to_all(np.asarray(list(self.timings.values())))
      self.timings = dict(zip(self.timings, (float(t) for t in np.asarray(agreed))))
    self._mapping = min(self.timings, key=self.timings.get)
    logging.info('round mapping: %s (seconds per round %s; compiling took %s)', self._mapping,
                 {m: round(t, 3) for m, t in self.timings.items()},
                 {m: round(t, 1) for m, t in self.compile_seconds.items()})

  def warm_up(self, state: ReplicaState, data) -> float:
    """Compiles the round (choosing the mapping if ``'auto'``) on a copy of `state`.

    `state` itself is left untouched, so timing the calls that follow measures
    training only. Returns the seconds spent (:attr:`compile_seconds` and
    :attr:`timings` say on what).
    """
    start = time.perf_counter()
    if self.passes_batches:
      data = self._check_batches(data)
    if self._mapping == 'auto':
      self._choose_mapping(state, data)
    elif self._mapping not in self.compile_seconds:
      self._first_call(self._mapping, state, data)
    return time.perf_counter() - start

  def __call__(self, state: ReplicaState, data):
    self.replicas.check_stacked(state.params, 'state.params')
    if self.passes_batches:
      data = self._check_batches(data)
    if self._mapping == 'auto':
      self._choose_mapping(state, data)
    return self._fn(self._mapping)(state, data)

  def lower(self, state, data, mapping: Optional[str] = None):
    """``jax.stages.Lowered`` of the round (e.g. to inspect its HLO)."""
    if self.passes_batches:
      data = self._check_batches(data)
    mapping = mapping or self.chosen_mapping or 'vmap'
    return self._fn(mapping).lower(state, data)
