"""device_map='shard_map': the same rounds, references and evaluation as jax.pmap.

On 8 fake CPU devices with 1, 2 and 3 replicas per device (vmap and
sequential local mappings), Parle's fused rounds and the reference mean give
the same numbers through ``jax.jit(jax.shard_map(...))`` over a Mesh as
through ``jax.pmap``; the evaluation of a Flax model too; and the compiled
round still holds one all-reduce.
"""

import jax
import numpy as np
import pytest

import parle_jax
import problems
from parle_jax import data, evaluate, models, training
from test_rounds import _all_reduces

L = 4


def _run(device_map, n, mapping, problem, with_reference=True):
  replicas = parle_jax.Replicas(n, devices=jax.devices()[:8], mapping=mapping,
                                device_map=device_map)
  parts = parle_jax.parle_parts(0.5, L=L, gamma=parle_jax.scoping(0.3, 1.0, 2), rho=0.7,
                                weight_decay=1e-3, axis_name=replicas.axis_name)
  state = parle_jax.init_replicas(replicas, parts.inner, problems.to_params(problem[0]))
  round_fn = parle_jax.parts_round(problems.loss_fn, parts, replicas,
                                   with_reference=with_reference)
  for k in range(2):
    state, metrics, *_ = round_fn(
        state, problems.to_batches(*problem[1:], slice(k * L, (k + 1) * L)))
  return (problems.from_params(replicas.unshard(state.params)), replicas.unshard(metrics)['loss'],
          problems.from_params(replicas.reference(state.params)), round_fn, state, replicas)


@pytest.mark.parametrize('per_device, mapping', [(1, 'vmap'), (2, 'sequential'), (3, 'vmap')])
def test_rounds_and_reference_match_pmap(per_device, mapping):
  n = 8 * per_device
  problem = problems.make_problem(n, 2 * L, seed=per_device)
  with_pmap = _run('pmap', n, mapping, problem)
  with_shard_map = _run('shard_map', n, mapping, problem)
  for got, want in zip(with_shard_map[:3], with_pmap[:3]):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(with_shard_map[2], with_shard_map[0].mean(0), rtol=1e-5, atol=1e-6)
  # The state lives on the mesh: global arrays sharded over the 8 devices.
  state, replicas = with_shard_map[4], with_shard_map[5]
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding.mesh == replicas.mesh and leaf.shape[:2] == (8, per_device)


def test_shard_map_round_has_one_all_reduce_per_round():
  problem = problems.make_problem(8, 2 * L)
  *_, round_fn, state, replicas = _run('shard_map', 8, 'vmap', problem, with_reference=False)
  hlo = round_fn.lower(state, problems.to_batches(*problem[1:], slice(0, L))).compile().as_text()
  assert len(_all_reduces(hlo)) == 1, _all_reduces(hlo)


def test_evaluation_matches_pmap():
  rng = np.random.default_rng(0)
  test = {'image': rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8),
          'label': rng.integers(0, 10, 40).astype(np.int32)}
  mean, std = data.channel_stats(test['image'])
  bn_batches = data.normalize(test['image'][:32], mean, std).reshape(2, 16, 28, 28, 1)
  model = models.LeNet()
  params, model_state = training.init_replica_variables(model, jax.random.PRNGKey(0), 16,
                                                        (28, 28, 1))
  results = {}
  for device_map in parle_jax.replicas.DEVICE_MAPS:
    replicas = parle_jax.Replicas(16, devices=jax.devices()[:8], device_map=device_map)
    state = parle_jax.ReplicaState(step=None, params=replicas.shard(params), opt_state=(),
                                   model_state=replicas.shard(model_state), key=None)
    results[device_map] = evaluate.evaluate(model, replicas, state, test, mean=mean, std=std,
                                            bn_batches=bn_batches, batch_size=16,
                                            mapping='sequential')
  for key, want in results['pmap'].items():
    np.testing.assert_allclose(results['shard_map'][key], want, rtol=1e-5, atol=1e-5,
                               err_msg=key)


def test_unknown_device_map_is_refused():
  with pytest.raises(ValueError, match="`device_map` must be one of \\('pmap', 'shard_map'\\), "
                                       "got 'xmap'"):
    parle_jax.Replicas(2, device_map='xmap')
