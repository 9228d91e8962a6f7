"""Communication accounting, the all-reduce count of compiled rounds, the network model."""

import jax
import pytest

from experiments import communication


def test_accounting_counts_allreduces_per_epoch():
  # P = 1000 parameters, N = 6400 examples, b = 32, n = 4 workers, L = 10.
  kwargs = dict(num_parameters=1000, num_examples=6400, batch_size=32, num_workers=4, L=10)
  parle = communication.accounting('parle', **kwargs)
  elastic = communication.accounting('elastic_sgd', **kwargs)
  sgd = communication.accounting('data_parallel_sgd', **kwargs)
  # Each replica passes over 6400 / 32 = 200 mini-batches; Parle couples every 10th.
  assert (parle.steps_per_epoch, parle.allreduces_per_epoch) == (200, 20)
  assert (elastic.steps_per_epoch, elastic.allreduces_per_epoch) == (200, 200)
  # 4 workers share the pass: 6400 / (4 * 32) = 50 steps, one all-reduce each.
  assert (sgd.steps_per_epoch, sgd.allreduces_per_epoch) == (50, 50)
  assert parle.bytes_per_allreduce == 4000
  assert parle.bytes_per_epoch == 80_000 and sgd.bytes_per_epoch == 200_000
  # Local SGD and DiLoCo: like Parle, one all-reduce of the weights per round.
  for optimizer in ('local_sgd', 'diloco'):
    other = communication.accounting(optimizer, **kwargs)
    assert (other.steps_per_epoch, other.allreduces_per_epoch, other.bytes_per_epoch) == (
        200, 20, 80_000)


def test_accounting_rejects_bad_input():
  with pytest.raises(ValueError, match="optimizer='sgd'"):
    communication.accounting('sgd', num_parameters=1, num_examples=1, batch_size=1,
                             num_workers=1, L=1)
  with pytest.raises(ValueError, match='L=0 must be >= 1'):
    communication.accounting('parle', num_parameters=1, num_examples=1, batch_size=1,
                             num_workers=1, L=0)


def test_ring_allreduce_and_network_model():
  # 4 workers, 1e9 bytes at 10 Gb/s: 2 * 3/4 * 8e9 bits / 1e10 b/s = 1.2 s, plus 6 hops * 1 ms.
  assert communication.ring_allreduce_seconds(1e9, 4, 10, 1e-3) == pytest.approx(1.206)
  assert communication.ring_allreduce_seconds(1e9, 1, 10, 1e-3) == 0
  (row,) = communication.network_model(
      num_parameters=250_000_000, num_examples=1000, batch_size=10, L=4, step_seconds=0.5,
      workers=[4], bandwidths_gbps=[10], latency_s=1e-3)
  assert row['dp_sgd_step_s'] == pytest.approx(1.706)
  assert row['parle_step_s'] == pytest.approx(0.5 + 1.206 / 4)
  assert row['dp_sgd_epoch_s'] == pytest.approx(25 * 1.706)  # 1000 / (4 * 10) steps
  assert row['parle_epoch_s'] == pytest.approx(100 * (0.5 + 1.206 / 4))
  assert row['step_speedup'] == pytest.approx(1.706 / (0.5 + 1.206 / 4))
  assert row['dp_sgd_budget_s'] == pytest.approx(200 * 25 * 1.706)
  assert row['parle_budget_s'] == pytest.approx(125 * 100 * (0.5 + 1.206 / 4))


def test_count_allreduces_parses_loops_and_payloads():
  hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %r = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[3,4])) -> (s32[], f32[3,4]) {
  %x = f32[3,4]{1,0} get-tuple-element(%p), index=1
  %ar = f32[3,4]{1,0} all-reduce(f32[3,4]{1,0} %x), replica_groups={}, to_apply=%add
  ROOT %t = (s32[], f32[3,4]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[3,4])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[3,4], b: f32[5]) -> (f32[3,4], f32[5]) {
  %w = (s32[], f32[3,4]) while(%init), condition=%cond, body=%body
  %ar2 = (f32[3,4]{1,0}, f32[5]{0}) all-reduce(%a, %b), replica_groups={}, to_apply=%add
  ROOT %o = (f32[3,4], f32[5]) tuple(%a, %b)
}
"""
  assert communication.count_allreduces(hlo) == {
      'in_loop': 1, 'in_loop_elements': 12, 'outside': 1, 'outside_elements': 17}


@pytest.mark.parametrize('optimizer, in_loop, outside', [
    ('parle', 0, 1), ('elastic_sgd', 1, 0), ('data_parallel_sgd', 1, 0), ('local_sgd', 0, 1),
    ('diloco', 0, 1)])
def test_compiled_rounds_allreduce_as_accounted(optimizer, in_loop, outside):
  """Parle's round all-reduces the weights once, after the scan; the others every step."""
  if jax.device_count() < 2:
    pytest.skip('needs 2 devices (tests/conftest.py sets 8 fake CPU devices)')
  counts = communication.compiled_allreduces(optimizer, 'lenet', num_replicas=2, L=3,
                                             batch_size=8)
  params = communication.parameter_count('lenet')
  assert counts['in_loop'] == in_loop and counts['outside'] == outside
  assert counts['in_loop_elements'] == in_loop * params
  assert counts['outside_elements'] == outside * params


def test_parameter_count_is_lenets():
  # conv 5x5 1->20 + BN, conv 5x5 20->50 + BN, dense 2*2*50->500 + BN, dense 500->10.
  convs = (25 * 1 * 20 + 20) + (25 * 20 * 50 + 50)
  dense = (200 * 500 + 500) + (500 * 10 + 10)
  batch_norm_scale_and_bias = 2 * (20 + 50 + 500)
  assert communication.parameter_count('lenet') == convs + dense + batch_norm_scale_and_bias
