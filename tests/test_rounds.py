"""Parle against the float64 NumPy reference; fused vs per-step; replica layouts; HLO.

Problem: least squares, n = 3 replicas, L = 4, 3 rounds, weight decay on.
Each replica starts from its own random weights and reads its own batches.
"""

import re

import chex
import jax
import numpy as np
import optax
import pytest

import parle_jax
import problems
import reference_parle

N, L, ROUNDS = 3, 4, 3
WEIGHT_DECAY = 1e-2
# Constant coefficients, and a scoping schedule that grows fast enough to matter
# (nb = 2 batches per epoch: (1 + 0.5/2)^k = 1.25^k) with an lr step at k = 2.
SETTINGS = {
    'constant': dict(
        jax=dict(learning_rate=0.5, gamma=0.3, rho=0.7),
        numpy=dict(lr=lambda k: 0.5, gamma=lambda k: 0.3, rho=lambda k: 0.7)),
    'scoped': dict(
        jax=dict(learning_rate=optax.piecewise_constant_schedule(0.5, {2: 0.2}),
                 gamma=parle_jax.scoping(0.2, 0.3, 2), rho=parle_jax.scoping(1.0, 1.4, 2)),
        numpy=dict(lr=lambda k: 0.5 if k < 2 else 0.1,
                   gamma=lambda k: min(0.2 * 1.25 ** k, 0.3),
                   rho=lambda k: min(1.0 * 1.25 ** k, 1.4))),
}
TOLERANCE = 1e-5


def numpy_history(setting, x0, inputs, targets):
  return reference_parle.parle(x0, inputs, targets, L=L, rounds=ROUNDS,
                               weight_decay=WEIGHT_DECAY, **SETTINGS[setting]['numpy'])


def run_fused(setting, x0, inputs, targets, devices, mapping):
  """Runs ROUNDS fused rounds; returns per round (params [n,d], anchors, reference, losses)."""
  replicas = parle_jax.Replicas(len(x0), devices=devices, mapping=mapping)
  parts = parle_jax.parle_parts(weight_decay=WEIGHT_DECAY, L=L, axis_name=replicas.axis_name,
                                **SETTINGS[setting]['jax'])
  state = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(x0))
  round_fn = parle_jax.parle_round(problems.loss_fn, parts, replicas, with_reference=True)
  history = []
  for k in range(ROUNDS):
    batches = problems.to_batches(inputs, targets, slice(k * L, (k + 1) * L))
    state, metrics, reference = round_fn(state, batches)
    history.append(dict(
        params=problems.from_params(replicas.unshard(state.params)),
        anchors=problems.from_params(replicas.unshard(state.opt_state.inner.anchor)),
        reference=problems.from_params(jax.tree.map(lambda x: np.asarray(x)[0], reference)),
        losses=replicas.unshard(metrics)['loss']))
  return history, state, replicas


def run_per_step(setting, x0, inputs, targets):
  """The drop-in transform under jax.pmap, one replica per device."""
  tx = parle_jax.parle(weight_decay=WEIGHT_DECAY, L=L, axis_name='replica',
                       **SETTINGS[setting]['jax'])
  devices = jax.devices()[:len(x0)]

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(problems.single_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.pmap(train_step, axis_name='replica', devices=devices)
  params = problems.to_params(x0)
  opt_state = jax.pmap(tx.init, axis_name='replica', devices=devices)(params)
  history, losses = [], []
  for t in range(ROUNDS * L):
    batch = problems.to_batches(inputs, targets, t)
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(np.asarray(loss))
    if (t + 1) % L == 0:
      anchors = problems.from_params(opt_state.inner.anchor)
      history.append(dict(params=problems.from_params(params), anchors=anchors,
                          reference=anchors.mean(0), losses=np.stack(losses[-L:], 1)))
  return history


def assert_matches(history, expected):
  assert len(history) == len(expected) == ROUNDS
  for k, (got, want) in enumerate(zip(history, expected)):
    for name in ('params', 'anchors', 'reference', 'losses'):
      error = problems.relative_error(got[name], want[name])
      assert error < TOLERANCE, f'round {k} {name}: relative error {error:.2e}'


@pytest.fixture(scope='module')
def problem():
  return problems.make_problem(N, ROUNDS * L)


@pytest.mark.parametrize('setting', ['constant', 'scoped'])
@pytest.mark.parametrize('mapping', ['vmap', 'sequential'])
@pytest.mark.parametrize('num_devices', [1, 3])
def test_fused_round_matches_numpy(problem, setting, mapping, num_devices):
  history, _, _ = run_fused(setting, *problem, jax.devices()[:num_devices], mapping)
  assert_matches(history, numpy_history(setting, *problem))


@pytest.mark.parametrize('setting', ['constant', 'scoped'])
def test_per_step_transform_matches_numpy(problem, setting):
  assert_matches(run_per_step(setting, *problem), numpy_history(setting, *problem))


def test_per_step_and_fused_agree(problem):
  fused, _, _ = run_fused('scoped', *problem, jax.devices()[:1], 'sequential')
  per_step = run_per_step('scoped', *problem)
  for got, want in zip(fused, per_step):
    chex.assert_trees_all_close(got['params'], want['params'], rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(got['losses'], want['losses'], rtol=1e-6)


def test_reference_is_mean_of_anchors(problem):
  _, state, replicas = run_fused('constant', *problem, jax.devices()[:1], 'vmap')
  reference = problems.from_params(replicas.reference(state.params))
  anchors = problems.from_params(replicas.unshard(state.opt_state.inner.anchor))
  np.testing.assert_allclose(reference, anchors.mean(0), rtol=1e-6)
  # After a round every replica's params are its anchor and z was reset to it.
  np.testing.assert_array_equal(
      problems.from_params(replicas.unshard(state.params)), anchors)
  np.testing.assert_array_equal(
      problems.from_params(replicas.unshard(state.opt_state.inner.average)), anchors)


@pytest.mark.parametrize('per_device', [1, 2, 3])
def test_eight_devices_match_one_device(per_device):
  n = 8 * per_device
  problem = problems.make_problem(n, 2 * L, seed=per_device)
  results = {}
  for num_devices in (1, 8):
    replicas = parle_jax.Replicas(n, devices=jax.devices()[:num_devices], mapping='vmap')
    parts = parle_jax.parle_parts(0.5, L=L, gamma=0.3, rho=0.7, axis_name=replicas.axis_name)
    state = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(problem[0]))
    round_fn = parle_jax.parle_round(problems.loss_fn, parts, replicas)
    for k in range(2):
      state, _ = round_fn(state, problems.to_batches(*problem[1:], slice(k * L, (k + 1) * L)))
    results[num_devices] = problems.from_params(replicas.unshard(state.params))
  assert replicas.per_device == per_device
  np.testing.assert_allclose(results[8], results[1], rtol=1e-6, atol=1e-7)


def test_batch_fn_draws_on_device_and_matches_passed_batches(problem):
  """A batch_fn that indexes a device-resident copy gives the passed-batch numbers."""
  x0, inputs, targets = problem
  replicas = parle_jax.Replicas(N, devices=jax.devices()[:1])
  parts = parle_jax.parle_parts(0.5, L=L, gamma=0.3, rho=0.7, axis_name=replicas.axis_name)
  dataset = problems.to_batches(inputs, targets)  # [n, steps, B, ...]

  def batch_fn(data, rng, step, replica):
    del rng
    return jax.tree.map(lambda x: x[replica, step], data)

  on_device = parle_jax.parle_round(problems.loss_fn, parts, replicas, batch_fn=batch_fn)
  passed = parle_jax.parle_round(problems.loss_fn, parts, replicas)
  state_a = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(x0))
  state_b = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(x0))
  data = replicas.broadcast(dataset)
  for k in range(ROUNDS):
    state_a, _ = on_device(state_a, data)
    state_b, _ = passed(state_b, problems.to_batches(inputs, targets, slice(k * L, (k + 1) * L)))
  np.testing.assert_array_equal(replicas.unshard(state_a.step), [ROUNDS * L] * N)
  np.testing.assert_allclose(problems.from_params(replicas.unshard(state_a.params)),
                             problems.from_params(replicas.unshard(state_b.params)), rtol=1e-6)


def test_auto_mapping_times_both_and_matches(problem):
  x0, inputs, targets = problem
  replicas = parle_jax.Replicas(N, devices=jax.devices()[:1], mapping='auto')
  parts = parle_jax.parle_parts(weight_decay=WEIGHT_DECAY, L=L, axis_name=replicas.axis_name,
                                **SETTINGS['constant']['jax'])
  round_fn = parle_jax.parle_round(problems.loss_fn, parts, replicas)
  state = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(x0))
  state, _ = round_fn(state, problems.to_batches(inputs, targets, slice(0, L)))
  assert set(round_fn.timings) == set(round_fn.compile_seconds) == {'vmap', 'sequential'}
  assert all(t > 0 for t in [*round_fn.timings.values(), *round_fn.compile_seconds.values()])
  assert round_fn.mapping == min(round_fn.timings, key=round_fn.timings.get)
  with pytest.raises(ValueError, match='`mapping` must be one of'):
    round_fn.mapping = 'pmap'  # a mapping set by hand is checked
  expected = numpy_history('constant', x0, inputs, targets)[0]['params']
  # The trial rounds ran on copies: the state advanced by exactly one round.
  assert problems.relative_error(problems.from_params(replicas.unshard(state.params)),
                                 expected) < TOLERANCE


@pytest.mark.parametrize('mapping', ['auto', 'sequential'])
def test_warm_up_compiles_without_touching_the_state(problem, mapping):
  x0, inputs, targets = problem
  replicas = parle_jax.Replicas(N, devices=jax.devices()[:1], mapping=mapping)
  parts = parle_jax.parle_parts(weight_decay=WEIGHT_DECAY, L=L, axis_name=replicas.axis_name,
                                **SETTINGS['constant']['jax'])
  round_fn = parle_jax.parle_round(problems.loss_fn, parts, replicas)
  state = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(x0))
  batches = problems.to_batches(inputs, targets, slice(0, L))
  seconds = round_fn.warm_up(state, batches)
  assert seconds > 0
  assert round_fn.mapping in ('vmap', 'sequential')
  assert (set(round_fn.timings) == {'vmap', 'sequential'}) == (mapping == 'auto')
  np.testing.assert_array_equal(replicas.unshard(state.step), [0] * N)  # not donated, not run
  state, _ = round_fn(state, batches)
  expected = numpy_history('constant', x0, inputs, targets)[0]['params']
  assert problems.relative_error(problems.from_params(replicas.unshard(state.params)),
                                 expected) < TOLERANCE


# --- communication, read off the compiled programs ----------------------------
def _computations(hlo_text):
  """Maps computation name -> body text of an HLO module."""
  blocks = re.split(r'\n(?=(?:ENTRY )?%?[\w.\-]+ [^\n]*\{\n)', hlo_text)
  named = {}
  for block in blocks:
    match = re.match(r'(ENTRY )?%?([\w.\-]+) ', block)
    if match:
      named['ENTRY' if match.group(1) else match.group(2)] = block
  return named


def _all_reduces(hlo_text):
  return re.findall(r'= [^\n]*? all-reduce\(', hlo_text)


def _round_hlo(n, num_devices, with_reference=False):
  x0, inputs, targets = problems.make_problem(n, L)
  replicas = parle_jax.Replicas(n, devices=jax.devices()[:num_devices], mapping='vmap')
  parts = parle_jax.parle_parts(0.5, L=L, gamma=0.3, rho=0.7, axis_name=replicas.axis_name)
  state = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(x0))
  round_fn = parle_jax.parle_round(problems.loss_fn, parts, replicas,
                                   with_reference=with_reference)
  return round_fn.lower(state, problems.to_batches(inputs, targets)).compile().as_text()


@pytest.mark.parametrize('with_reference', [False, True])
def test_fused_round_has_one_all_reduce_per_round(with_reference):
  hlo = _round_hlo(n=4, num_devices=2, with_reference=with_reference)
  reduces = _all_reduces(hlo)
  assert len(reduces) == (2 if with_reference else 1), reduces
  # Each all-reduce carries the whole parameter pytree ({'b': f32[], 'w': f32[4]}),
  # and none of them sits inside the scan's loop body.
  for line in reduces:
    assert 'f32[4]' in line and 'f32[]' in line, line
  for name, body in _computations(hlo).items():
    if 'all-reduce(' in body:
      assert not re.search(r'while\(', body) or name == 'ENTRY', name
  loop_bodies = re.findall(r'while\([^\n]*body=%?([\w.\-]+)', hlo)
  assert loop_bodies
  for body in loop_bodies:
    assert 'all-reduce(' not in _computations(hlo)[body]


def test_one_replica_compiles_without_collectives():
  assert _all_reduces(_round_hlo(n=1, num_devices=1)) == []


def test_per_step_all_reduce_sits_in_a_conditional():
  tx = parle_jax.parle(0.5, L=L, gamma=0.3, rho=0.7, axis_name='replica')
  devices = jax.devices()[:2]

  def train_step(params, opt_state, batch):
    grads = jax.grad(problems.single_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  x0, inputs, targets = problems.make_problem(2, 1)
  params = problems.to_params(x0)
  opt_state = jax.pmap(tx.init, axis_name='replica', devices=devices)(params)
  hlo = jax.pmap(train_step, axis_name='replica', devices=devices).lower(
      params, opt_state, problems.to_batches(inputs, targets, 0)).compile().as_text()
  computations = _computations(hlo)
  assert 'all-reduce(' not in computations['ENTRY']
  branches = set()
  for line in re.findall(r'conditional\([^\n]*', hlo):
    branches.update(re.findall(r'(?:branch_computations=\{|true_computation=|'
                               r'false_computation=|, )%?([\w.\-]+)', line))
  holders = [name for name, body in computations.items() if 'all-reduce(' in body]
  assert holders and all(_reachable_from(branches, name, computations) for name in holders)


def _reachable_from(roots, target, computations):
  """Whether computation `target` is one of `roots` or called from one."""
  seen, stack = set(), list(roots)
  while stack:
    name = stack.pop()
    if name == target:
      return True
    if name in seen or name not in computations:
      continue
    seen.add(name)
    stack.extend(re.findall(r'(?:calls=|to_apply=|body=|condition=|computations=\{)%?([\w.\-]+)',
                            computations[name]))
  return False


def test_mismatched_batch_axes_raise():
  x0, inputs, targets = problems.make_problem(N, L + 1)
  replicas = parle_jax.Replicas(N, devices=jax.devices()[:1])
  parts = parle_jax.parle_parts(0.5, L=L, gamma=0.3, rho=0.7, axis_name=replicas.axis_name)
  state = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(x0))
  round_fn = parle_jax.parle_round(problems.loss_fn, parts, replicas)
  with pytest.raises(ValueError, match=r"batch leaf \['x'\].*\[3, 4\]"):
    round_fn(state, problems.to_batches(inputs, targets))  # L + 1 steps
  with pytest.raises(ValueError, match='batch leaf'):
    round_fn(state, problems.to_batches(inputs[:2], targets[:2], slice(0, L)))
  # A state of another layout (here: the replicas' params unstacked) is named, not
  # left to fail as a shape error inside pmap.
  flat = state._replace(params=jax.tree.map(lambda x: x[0], state.params))
  with pytest.raises(ValueError, match=r"state.params\['b'\] has leading axes \(3,\); "
                                       r'the replicas need \[D, R\] = \[1, 3\]'):
    round_fn(flat, problems.to_batches(inputs, targets, slice(0, L)))


def test_layout_errors():
  with pytest.raises(ValueError, match='`num_replicas`=3 is not divisible'):
    parle_jax.Replicas(3, devices=jax.devices()[:2])
  with pytest.raises(ValueError, match='`num_replicas`'):
    parle_jax.Replicas(0)
  with pytest.raises(ValueError, match='`mapping`'):
    parle_jax.Replicas(2, devices=jax.devices()[:1], mapping='pmap')
  replicas = parle_jax.Replicas(2, devices=jax.devices()[:1])
  parts = parle_jax.parle_parts(0.1, gamma=0.1, rho=0.1, axis_name=None)
  with pytest.raises(ValueError, match='axis_name'):
    parle_jax.parle_round(problems.loss_fn, parts, replicas)
  with pytest.raises(ValueError, match='`L`'):
    parle_jax.make_round(problems.loss_fn, optax.sgd(0.1), replicas, L=0)
