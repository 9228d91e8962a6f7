"""The benchmark binary runs end to end with tiny settings and reports consistent numbers.

Timings are never compared with the targets here (they depend on the machine);
only their structure, positivity and the arithmetic of the ratios are checked.
"""

import contextlib
import io
import json
import math

import jax
import pytest
from absl import flags
from absl.testing import flagsaver

from experiments import benchmark
from experiments.configs import base

L, BATCH, N = 2, 8, 2
# The optimizers timed here (each compiles its round), one per branch of the benchmark's
# build_training_round: one replica (SGD), replicas with the per-replica batch (Parle), and the
# batch split over the workers (data-parallel SGD, which also needs 'vmap' for its per-step
# all-reduce). The other optimizers take Parle's branch; every optimizer trains in test_train.py.
TIMED = ('sgd', 'parle', 'data_parallel_sgd')


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  """Runs `benchmark.main` once (LeNet only): (printed text, JSON written).

  XLA compiles are almost all of this test's time on CPU (five programs: init,
  SGD scan, Parle n=1, Parle n=2 with each mapping), and dropout's random bits
  double them; LeNet without dropout and 'rbg' keys compile in about half the
  time. The benchmark itself runs the models as defined, with JAX's default PRNG.
  """
  path = tmp_path_factory.mktemp('benchmark') / 'results.json'
  if 'optimizer_replicas' not in flags.FLAGS:
    benchmark.define_flags()
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  out = io.StringIO()
  with pytest.MonkeyPatch.context() as patch, jax.default_prng_impl('rbg'), \
       flagsaver.flagsaver(models=['lenet'], L=L, batch=BATCH, replicas=[str(N)], repeats=1,
                           dataset_size=64, json_out=str(path),
                           optimizers=list(TIMED), optimizer_replicas=N), \
       contextlib.redirect_stdout(out):
    patch.setitem(benchmark.MODELS, 'lenet', (('lenet', 10), {'dropout': 0.0}, (28, 28, 1)))
    benchmark.main([])
  return out.getvalue(), json.loads(path.read_text())


def timings(tree, key=''):
  """Every (name, value) of a timing field in the results."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from timings(v, k if key != 'ms_per_step' else f'{key}.{k}')
  elif isinstance(tree, list):
    for v in tree:
      yield from timings(v, key)
  elif key.startswith(('first_call_s', 'times_s', 'median_s', 'ms_per_step')):
    yield key, tree


def test_json_structure(report):
  _, results = report
  assert set(results['machine']) == {'platform', 'device_kind', 'device_count', 'cpu_count',
                                    'processor', 'hostname', 'jax'}
  assert results['settings']['L'] == L and results['settings']['replicas'] == [N]
  assert list(results['models']) == ['lenet']
  lenet = results['models']['lenet']
  assert {'sgd', 'parle_n1', 'replicas', 'ratios'} <= set(lenet)
  assert list(lenet['replicas']) == [str(N)]
  per_n = lenet['replicas'][str(N)]
  assert set(per_n) == {'vmap', 'sequential', 'auto'}
  assert len(per_n['vmap']['times_s']) == 1
  # With N > 1 replicas on one device, 'auto' timed both mappings and kept one.
  assert per_n['auto']['mapping'] in ('vmap', 'sequential')
  assert set(per_n['auto']['ms_per_step']) == {'vmap', 'sequential'}


def test_every_timing_is_a_positive_float(report):
  found = list(timings(report[1]))
  assert len(found) >= 3 * 4 + 2  # sgd, n=1, two mappings; plus auto's two
  for name, value in found:
    assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)


def test_ratios_are_quotients_of_the_timings(report):
  lenet = report[1]['models']['lenet']
  sgd, n1 = lenet['sgd']['ms_per_step'], lenet['parle_n1']['ms_per_step']
  for timing in (lenet['sgd'], lenet['parle_n1']):
    assert timing['ms_per_step'] == pytest.approx(1000 * timing['median_s'] / L)
  ratios = lenet['ratios']
  assert ratios['parle_n1_vs_sgd'] == pytest.approx(n1 / sgd)
  per_n, rq = lenet['replicas'][str(N)], ratios['replicas'][str(N)]
  ms = {m: per_n[m]['ms_per_step'] for m in benchmark.MAPPINGS}
  for mapping in benchmark.MAPPINGS:
    assert per_n[mapping]['vs_n1'] == pytest.approx(ms[mapping] / n1)
  assert rq['best_mapping'] == min(ms, key=ms.get)
  assert rq['best_vs_n_times_n1'] == pytest.approx(min(ms.values()) / (N * n1))
  assert rq['auto_picked_best'] == (rq['auto_mapping'] == rq['best_mapping'])


def test_printed_report_names_machine_and_targets(report):
  text, results = report
  assert results['machine']['device_kind'] in text
  assert 'optax sgd' in text and f'parle n={N}' in text
  target_lines = [line for line in text.splitlines() if 'target <=' in line]
  assert len(target_lines) == 2
  assert all(line.rstrip().endswith(('PASS', 'MISS')) for line in target_lines)
  assert any(line.startswith('  lenet     auto picked') for line in text.splitlines())


def test_every_optimizer_round_is_timed_as_training_builds_it(report):
  text, results = report
  timed = results['models']['lenet']['optimizers']
  assert list(timed) == list(TIMED)
  expected = {'parle': (N, BATCH), 'sgd': (1, BATCH),
              'data_parallel_sgd': (N, BATCH)}  # batch per replica/worker
  for optimizer, (replicas, batch) in expected.items():
    t = timed[optimizer]
    assert (t['replicas'], t['batch_per_replica']) == (replicas, batch), optimizer
    assert t['images_per_second'] == pytest.approx(replicas * batch * L / t['median_s'])
    assert t['ms_per_step'] == pytest.approx(1000 * t['median_s'] / L)
    assert t['mapping'] in benchmark.MAPPINGS, optimizer
  # Per-step collectives need 'vmap' for local replicas.
  assert timed['data_parallel_sgd']['mapping'] == 'vmap'
  rows = [line.split() for line in text.splitlines() if line.startswith('lenet ')]
  sgd_row = next(r for r in rows if r[1] == 'sgd')
  assert sgd_row[-1] == '1.00'
  assert {r[1] for r in rows if r[1] in base.OPTIMIZERS} == set(TIMED)  # a row each, no other


def test_verdict_and_ratios_on_made_up_numbers():
  assert benchmark.verdict(1.10, 1.10).endswith('PASS')
  assert benchmark.verdict(1.11, 1.10).endswith('MISS')
  made_up = {'sgd': {'ms_per_step': 2.0}, 'parle_n1': {'ms_per_step': 2.2},
             'replicas': {'3': {'vmap': {'ms_per_step': 9.0},
                                'sequential': {'ms_per_step': 6.0},
                                'auto': {'mapping': 'vmap', 'ms_per_step': {'vmap': 1.0}}}}}
  ratios = benchmark.ratios(made_up)
  assert ratios['parle_n1_vs_sgd'] == pytest.approx(1.1)
  assert ratios['replicas']['3'] == {
      'best_mapping': 'sequential', 'best_vs_n_times_n1': pytest.approx(6.0 / 6.6),
      'auto_mapping': 'vmap', 'auto_measured': True, 'auto_picked_best': False}


@pytest.mark.parametrize('models, change, match', [
    (['resnet50'], {}, 'unknown models'),
    (['lenet'], {'repeats': 0}, '`repeats`'),
    (['lenet'], {'replicas': [3, 0]}, '`replicas`'),
    (['lenet'], {'optimizers': ['adam']}, 'unknown optimizers'),
    (['lenet'], {'optimizer_replicas': 0}, '`optimizer_replicas`'),
])
def test_bad_settings_are_rejected_before_any_work(models, change, match):
  settings = dict(L=1, batch=1, replicas=[1], repeats=1, wrn_image_shape=[28, 28, 1],
                  dataset_size=8)
  with pytest.raises(ValueError, match=match):
    benchmark.run(models, **dict(settings, **change))
