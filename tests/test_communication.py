"""Communication accounting, the all-reduce count of compiled rounds, the network model."""

import jax
import pytest

from experiments import communication, hlo_allreduces


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
  assert hlo_allreduces.count_allreduces(hlo) == {
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


# ---------------------------------------------------------------------------
# Islands: replicas of k devices.


def test_replica_groups_reads_explicit_iota_and_empty_forms():
  groups = hlo_allreduces.replica_groups
  assert groups('%a = f32[4] all-reduce(%x), replica_groups={{0,1},{2,3}}, to_apply=%add') == (
      (0, 1), (2, 3))
  # Iota: arange(8) reshaped to [2, 4] -> 2 groups of 4; transposed (1, 0) -> 4 groups of 2.
  assert groups('all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add') == (
      (0, 1, 2, 3), (4, 5, 6, 7))
  assert groups('all-reduce(%x), replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add') == (
      (0, 4), (1, 5), (2, 6), (3, 7))
  # [2,2,2] transposed (2, 0, 1): element [a, b, c] is a*4 + b*2 + c at position [c, a, b].
  assert groups('replica_groups=[2,4]<=[2,2,2]T(2,0,1)') == ((0, 2, 4, 6), (1, 3, 5, 7))
  assert groups('all-reduce(%x), replica_groups={}, to_apply=%add') == ()
  with pytest.raises(ValueError, match=r"replica_groups='\[3,3\]<=\[8\]'"):
    groups('replica_groups=[3,3]<=[8]')


_ISLAND_HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %r = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[3,4])) -> (s32[], f32[3,4]) {
  %x = f32[3,4]{1,0} get-tuple-element(%p), index=1
  %grad = f32[3,4]{1,0} all-reduce(f32[3,4]{1,0} %x), replica_groups=[2,4]<=[8], to_apply=%add
  %stats = (f32[2], f32[1]) all-reduce(%y, %z), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  ROOT %t = (s32[], f32[3,4]) tuple(%i, %grad)
}

%cond (p: (s32[], f32[3,4])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[3,4], b: f32[5]) -> (f32[3,4], f32[5]) {
  %w = (s32[], f32[3,4]) while(%init), condition=%cond, body=%body
  %couple = (f32[3,4], f32[5]) all-reduce-start(%a, %b), replica_groups=[4,2]<=[2,4]T(1,0)
  %done = (f32[3,4]{1,0}, f32[5]{0}) all-reduce-done(%couple)
  %all = f32[5]{0} all-reduce(%b), replica_groups={}, to_apply=%add
  ROOT %o = (f32[3,4], f32[5]) tuple(%a, %b)
}
"""
_TWO_ISLANDS = [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_allreduce_instructions_read_loops_payloads_and_groups():
  halves, pairs = ((0, 1, 2, 3), (4, 5, 6, 7)), ((0, 4), (1, 5), (2, 6), (3, 7))
  AllReduce = hlo_allreduces.AllReduce  # pylint: disable=invalid-name
  assert hlo_allreduces.allreduce_instructions(_ISLAND_HLO) == [
      AllReduce('grad', True, 12, halves), AllReduce('stats', True, 3, halves),
      AllReduce('couple', False, 17, pairs), AllReduce('all', False, 5, ())]
  assert hlo_allreduces.count_allreduces(_ISLAND_HLO) == {
      'in_loop': 2, 'in_loop_elements': 15, 'outside': 2, 'outside_elements': 22}
  assert hlo_allreduces.tally([AllReduce('couple', False, 17, pairs)]) == {
      'in_loop': 0, 'in_loop_elements': 0, 'outside': 1, 'outside_elements': 17}


def test_island_of_groups_classifies_inside_and_between():
  classify = hlo_allreduces.island_of_groups
  assert classify(((0, 1, 2, 3), (4, 5, 6, 7)), _TWO_ISLANDS) == 'inside'
  assert classify(((0, 1), (2, 3), (4, 5), (6, 7)), _TWO_ISLANDS) == 'inside'
  assert classify(((0, 4), (1, 5), (2, 6), (3, 7)), _TWO_ISLANDS) == 'between'
  assert classify(((0, 1), (2, 3, 4, 5), (6, 7)), _TWO_ISLANDS) == 'between'
  assert classify((), _TWO_ISLANDS) == 'between'  # {}: all devices in one group
  assert classify((), [[0, 1, 2, 3]]) == 'inside'
  with pytest.raises(ValueError, match=r'device 8 of replica group \(0, 8\) is in none'):
    classify(((0, 8),), _TWO_ISLANDS)


def test_island_traffic_counts_per_round():
  instructions = hlo_allreduces.allreduce_instructions(_ISLAND_HLO)
  traffic = hlo_allreduces.island_traffic(instructions, _TWO_ISLANDS, L=5)
  assert traffic == {
      # grad (12) and stats (3): in the loop, 2 groups each, 5 runs a round.
      'inside_in_loop': 2, 'inside_in_loop_elements': 15, 'inside_outside': 0,
      'inside_outside_elements': 0, 'inside_per_round': 2 * 2 * 5,
      'inside_elements_per_round': 2 * 5 * 15,
      # couple (17, 4 pairs) and all (5, one group of 8): once a round.
      'between_in_loop': 0, 'between_in_loop_elements': 0, 'between_outside': 2,
      'between_outside_elements': 22, 'between_per_round': 4 + 1,
      'between_elements_per_round': 4 * 17 + 5}
  with pytest.raises(ValueError, match='L=0 must be >= 1'):
    hlo_allreduces.island_traffic(instructions, _TWO_ISLANDS, L=0)


def test_island_accounting_per_round():
  # P = 1000 parameters (4P = 4000 bytes), n = 2 islands of k = 4 devices, L = 10.
  kwargs = dict(num_parameters=1000, num_islands=2, devices_per_replica=4, L=10)
  for optimizer in ('parle', 'local_sgd', 'diloco'):
    acc = communication.island_accounting(optimizer, **kwargs)
    # Inside: each of 2 islands all-reduces its gradient every step: 20 of 4000 bytes.
    assert (acc.inside_allreduces_per_round, acc.inside_bytes_per_round) == (20, 80_000)
    # Between: one coupling, 4 parallel all-reduces of 4P (one per device position).
    assert (acc.between_allreduces_per_round, acc.between_bytes_per_round) == (4, 16_000)
    assert acc.hierarchical_between_bytes_per_round == 4000
  for optimizer in ('elastic_sgd', 'data_parallel_sgd'):  # coupled every step
    acc = communication.island_accounting(optimizer, **kwargs)
    assert (acc.inside_allreduces_per_round, acc.inside_bytes_per_round) == (20, 80_000)
    assert (acc.between_allreduces_per_round, acc.between_bytes_per_round) == (40, 160_000)
    assert acc.hierarchical_between_bytes_per_round == 40_000
  one_device = communication.island_accounting('parle', num_parameters=1000, num_islands=3,
                                               devices_per_replica=1, L=10)
  assert (one_device.inside_bytes_per_round, one_device.between_bytes_per_round) == (0, 4000)
  one_island = communication.island_accounting('elastic_sgd', num_parameters=1000,
                                               num_islands=1, devices_per_replica=4, L=10)
  assert (one_island.inside_bytes_per_round, one_island.between_bytes_per_round) == (40_000, 0)
  with pytest.raises(ValueError, match='devices_per_replica=0 must be >= 1'):
    communication.island_accounting('parle', num_parameters=1, num_islands=1,
                                    devices_per_replica=0, L=1)
  assert communication.parse_islands(['2x8', ' 4 x 4 ']) == [(2, 8), (4, 4)]
  with pytest.raises(ValueError, match="islands='2x0': expected NxK"):
    communication.parse_islands(['2x0'])


def test_island_network_model_one_row_by_hand():
  # P = 250e6 (4P = 1e9 bytes = 8e9 bits), n = 2 islands of k = 4, 100 Gb/s inside,
  # 100 / 10 = 10 Gb/s per device between, 1 ms per hop, t = 0.4 s, L = 5.
  (row,) = communication.island_network_model(
      num_parameters=250_000_000, num_examples=1000, batch_size=10, L=5, step_seconds=0.4,
      islands=[(2, 4)], slow_link_ratios=[10], fast_gbps=100, latency_s=1e-3)
  compute = 0.4 / 4
  inside = 2 * 3 / 4 * 8e9 / 100e9 + 2 * 3 * 1e-3  # ring of 4P over 4 devices: 0.126 s
  dp_between = 2 * 1 / 2 * 8e9 / 4 / 10e9 + 2 * 1e-3  # ring of 4P/4 over 2: 0.202 s
  parle_between = (2 * 1 / 2 * 8e9 / 10e9 + 2 * 1e-3) / 5  # ring of 4P over 2, per L: 0.1604 s
  assert row['slow_gbps'] == 10
  assert row['compute_s'] == pytest.approx(compute)
  assert row['inside_s'] == pytest.approx(inside)
  assert row['dp_sgd_step_s'] == pytest.approx(compute + inside + dp_between)
  assert row['parle_step_s'] == pytest.approx(compute + inside + parle_between)
  assert row['dp_sgd_between_share'] == pytest.approx(dp_between / (0.1 + 0.126 + 0.202))
  assert row['parle_between_share'] == pytest.approx(parle_between / (0.1 + 0.126 + 0.1604))
  assert row['step_speedup'] == pytest.approx(0.428 / 0.3864)
  # Global batch n * 10 = 20: 50 steps a dp-SGD epoch; Parle: 100 steps an effective epoch.
  assert row['dp_sgd_budget_s'] == pytest.approx(200 * 50 * 0.428)
  assert row['parle_budget_s'] == pytest.approx(125 * 100 * 0.3864)


def test_compiled_parle_over_islands_couples_once_between_islands():
  """n = 2 x k = 4: gradients inside the islands every step, one coupling between, after it."""
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices (tests/conftest.py sets 8 fake CPU devices)')
  instructions, islands = communication.compiled_island_instructions(
      'parle', 'lenet', num_replicas=2, devices_per_replica=4, L=2, batch_size=8)
  assert islands == _TWO_ISLANDS
  in_loop = [i for i in instructions if i.in_loop]
  assert in_loop and all(hlo_allreduces.island_of_groups(i.groups, islands) == 'inside'
                         and {len(g) for g in i.groups} == {4} for i in in_loop)
  between = [i for i in instructions
             if hlo_allreduces.island_of_groups(i.groups, islands) == 'between']
  params = communication.parameter_count('lenet')
  assert [(i.in_loop, i.elements, i.groups) for i in between] == [
      (False, params, ((0, 4), (1, 5), (2, 6), (3, 7)))]
  traffic = hlo_allreduces.island_traffic(instructions, islands, L=2)
  assert (traffic['between_per_round'], traffic['between_elements_per_round']) == (4, 4 * params)
