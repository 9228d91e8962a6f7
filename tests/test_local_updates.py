"""Local SGD and DiLoCo as round parts: float64 references, exact reductions, one all-reduce.

Problem: least squares, n = 3 replicas that start from the same weights (both
methods train one model), each reading its own batches.
"""

import re

import jax
import numpy as np
import optax
import pytest

import parle_jax
import problems
import reference_parle
from test_rounds import _all_reduces, _computations

N, L, ROUNDS = 3, 4, 3
LR, WEIGHT_DECAY = 0.05, 1e-2
TOLERANCE = 1e-5


def run_rounds(make_parts, x0, inputs, targets, *, devices, mapping, L=L, rounds=ROUNDS):
  """Fused rounds of the parts; returns every replica's params after each round [rounds, n, d]."""
  replicas = parle_jax.Replicas(N, devices=devices, mapping=mapping)
  parts = make_parts(replicas.axis_name)
  state = parle_jax.init_replicas(replicas, parts.inner,
                                  problems.to_params(np.tile(x0, (N, 1))))
  round_fn = parle_jax.parts_round(problems.loss_fn, parts, replicas)
  history = []
  for k in range(rounds):
    state, _ = round_fn(state, problems.to_batches(inputs, targets, slice(k * L, (k + 1) * L)))
    history.append(problems.from_params(replicas.unshard(state.params)))
  return np.stack(history)


def _local_sgd(axis_name, L=L):
  return parle_jax.local_sgd(LR, L=L, weight_decay=WEIGHT_DECAY, axis_name=axis_name)


def _diloco(axis_name):
  return parle_jax.diloco(optax.sgd(LR, momentum=0.9, nesterov=True), L=L,
                          outer_learning_rate=0.7, outer_momentum=0.9, axis_name=axis_name)


@pytest.fixture(scope='module')
def problem():
  x0, inputs, targets = problems.make_problem(N, ROUNDS * L, seed=5)
  return x0[0], inputs, targets


@pytest.mark.parametrize('mapping, num_devices', [('vmap', 1), ('sequential', 1), ('vmap', 3)])
def test_local_sgd_matches_the_reference(problem, mapping, num_devices):
  got = run_rounds(_local_sgd, *problem, devices=jax.devices()[:num_devices], mapping=mapping)
  want = reference_parle.local_sgd(*problem, L=L, rounds=ROUNDS, lr=LR,
                                   weight_decay=WEIGHT_DECAY)
  for k in range(ROUNDS):
    for a in range(N):  # every replica restarts from the average
      assert problems.relative_error(got[k, a], want[k]) < TOLERANCE, (k, a)


def test_local_sgd_with_one_step_per_round_is_data_parallel_sgd(problem):
  x0, inputs, targets = problem
  got = run_rounds(lambda axis: _local_sgd(axis, L=1), x0, inputs, targets,
                   devices=jax.devices()[:1], mapping='vmap', L=1, rounds=ROUNDS * L)
  want = reference_parle.data_parallel_sgd(x0, inputs, targets, steps=ROUNDS * L, lr=LR,
                                           weight_decay=WEIGHT_DECAY)
  for t in range(ROUNDS * L):
    assert problems.relative_error(got[t, 0], want[t]) < TOLERANCE, t


@pytest.mark.parametrize('mapping, num_devices', [('sequential', 1), ('vmap', 3)])
def test_diloco_matches_the_reference(problem, mapping, num_devices):
  got = run_rounds(_diloco, *problem, devices=jax.devices()[:num_devices], mapping=mapping)
  want = reference_parle.diloco(*problem, L=L, rounds=ROUNDS, inner_lr=LR, outer_lr=0.7)
  for k in range(ROUNDS):
    for a in range(N):
      assert problems.relative_error(got[k, a], want[k]) < TOLERANCE, (k, a)


def test_diloco_with_one_replica_unit_outer_step_is_its_inner_optimizer(problem):
  x0, inputs, targets = problem
  inner = optax.sgd(LR, momentum=0.9, nesterov=True)
  parts = parle_jax.diloco(inner, L=L, outer_learning_rate=1.0, outer_momentum=0.0)
  replicas = parle_jax.Replicas(1, devices=jax.devices()[:1])
  state = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(x0[None]))
  round_fn = parle_jax.parts_round(problems.loss_fn, parts, replicas)
  params, opt_state = problems.to_params(x0), inner.init(problems.to_params(x0))
  for k in range(ROUNDS):
    state, _ = round_fn(state, problems.to_batches(inputs[:1], targets[:1],
                                                   slice(k * L, (k + 1) * L)))
    for t in range(k * L, (k + 1) * L):  # the inner optimizer alone
      batch = {'x': inputs[0, t, :, :problems.FEATURES], 'y': targets[0, t]}
      grads = jax.grad(problems.single_loss)(params, batch)
      updates, opt_state = inner.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(problems.from_params(replicas.unshard(state.params))[0],
                               problems.from_params(params), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('make_parts', [_local_sgd, _diloco], ids=['local_sgd', 'diloco'])
def test_one_all_reduce_per_round_outside_the_loop(make_parts):
  x0, inputs, targets = problems.make_problem(4, L)
  replicas = parle_jax.Replicas(4, devices=jax.devices()[:2], mapping='vmap')
  parts = make_parts(replicas.axis_name)
  state = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(x0))
  round_fn = parle_jax.parts_round(problems.loss_fn, parts, replicas)
  hlo = round_fn.lower(state, problems.to_batches(inputs, targets)).compile().as_text()
  assert len(_all_reduces(hlo)) == 1, _all_reduces(hlo)
  for body in re.findall(r'while\([^\n]*body=%?([\w.\-]+)', hlo):
    assert 'all-reduce(' not in _computations(hlo)[body]


@pytest.mark.parametrize('build, message', [
    (lambda: parle_jax.local_sgd(-0.1), '`learning_rate` must be >= 0'),
    (lambda: parle_jax.local_sgd(0.1, L=0), '`L` must be an integer >= 1'),
    (lambda: parle_jax.local_sgd(0.1, momentum=1.0), r'`momentum` must be in \[0, 1\)'),
    (lambda: parle_jax.local_sgd(0.1, weight_decay=-1.0), '`weight_decay` must be >= 0'),
    (lambda: parle_jax.local_sgd(0.1, axis_name=3), '`axis_name` must be None'),
    (lambda: parle_jax.diloco(0.1), '`inner` must be an optax.GradientTransformation'),
    (lambda: parle_jax.diloco(optax.sgd(0.1), L=2.5), '`L` must be an integer >= 1'),
    (lambda: parle_jax.diloco(optax.sgd(0.1), outer_learning_rate=-0.7),
     '`outer_learning_rate` must be >= 0'),
    (lambda: parle_jax.diloco(optax.sgd(0.1), outer_momentum=1.5),
     r'`outer_momentum` must be in \[0, 1\)'),
])
def test_bad_arguments_raise(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_parts_of_another_axis_are_refused():
  replicas = parle_jax.Replicas(2, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match='the round parts reduce over axis_name=None'):
    parle_jax.parts_round(problems.loss_fn, parle_jax.local_sgd(0.1), replicas)
