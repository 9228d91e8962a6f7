"""Logged runs are golden files: the start of committed runs, replayed from their own config.

Each replay trains a committed run's ``config.json`` up to its first logged
evaluation (the default job's two runs, whose first evaluation is at round 24
of 120, up to their first logged losses at round 4: the other four compare an
evaluation of the same code) in a subprocess with the run's ``XLA_FLAGS`` (so its device count)
and compares the log with :mod:`experiments.replay`: digit for digit on the
CPU kind the run came from, within the stated tolerance on another kind (a
warning then says so). A change that moves a logged number fails here until
the same change regenerates the affected results and the README.
"""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

from experiments import provenance, replay

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / 'experiments' / 'results'
# The default job's Parle run, SGD, local SGD, Elastic-SGD and the sweep: (run, --rounds).
REPLAYS = (
    ('default_job/parle_n3_seed0', 4),
    ('default_job/sgd_replica_budget_seed0', 4),
    ('fashion_mnist_lenet_sweep/parle_n3_r12_seed0', None),
    ('fashion_mnist_lenet_sweep/sgd_total_budget_r12_seed0', None),
    ('fashion_mnist_lenet_cpu/local_sgd_n3_seed0', None),
    ('fashion_mnist_lenet_cpu/elastic_sgd_n3_seed0', None),
)
REPLAYED = tuple(run for run, _ in REPLAYS)


@pytest.mark.parametrize('run, rounds', REPLAYS)
def test_replay_of_a_logged_run_matches_its_log(run, rounds, fashion_mnist_data_dir, tmp_path):
  run_dir = RESULTS / run
  summary = json.loads((run_dir / 'summary.json').read_text())
  segments = summary.get('provenance') or []
  # The tests' shared compilation cache (conftest) serves the replays too: the runs share their
  # evaluation programs, and JAX's cache key holds the XLA flags, so the device count.
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=segments[0]['xla_flags'] if segments else '')
  process = subprocess.run(
      [sys.executable, '-m', 'experiments.replay', f'--run={run_dir}',
       f'--data_dir={fashion_mnist_data_dir}'] + ([f'--rounds={rounds}'] if rounds else []),
      cwd=REPO, env=env, capture_output=True,
      text=True, timeout=900)
  lines = [l for l in process.stdout.splitlines() if l.startswith(('logged on', '  round')) or
           'values compared' in l]
  assert process.returncode == 0, '\n'.join(lines) + process.stderr[-3000:]
  assert any('values compared' in l and ': agree' in l for l in lines), process.stdout[-3000:]
  if rounds:  # round 4's train loss and error, no evaluation
    assert any(l.startswith('2 values compared') for l in lines), lines
  if 'bitwise' not in '\n'.join(lines):
    warnings.warn(f'{run}: ' + ' | '.join(lines))  # another CPU kind: says so, passes


def test_a_replay_of_fewer_rounds_than_the_log_starts_at_is_one_line(tmp_path):
  process = subprocess.run(
      [sys.executable, '-m', 'experiments.replay', f'--run={RESULTS / REPLAYED[0]}',
       '--rounds=3'], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
      text=True, timeout=300)
  assert process.returncode == 1, process.stderr[-3000:]
  assert 'Traceback' not in process.stderr, process.stderr[-3000:]
  assert process.stderr.strip().splitlines()[-1] == (
      f'error: --rounds=3 replays nothing that was logged: the log of {RESULTS / REPLAYED[0]} '
      'starts at round 4; give --rounds >= 4.'), process.stderr[-3000:]


def _log(*records):
  return [dict(r) for r in records]


def test_compare_is_bitwise_on_the_same_kind_and_tolerant_on_another():
  logged = _log({'round': 3, 'train/loss': 0.5, 'train/error': 20.0},
                {'round': 3, 'reference/test_error': 15.41, 'replica/test_error': [16.0, 17.0]},
                {'round': 6, 'train/loss': 0.4})
  same = _log({'round': 3, 'train/loss': 0.5, 'train/error': 20.0},
              {'round': 3, 'reference/test_error': 15.41, 'replica/test_error': [16.0, 17.0]})
  rows, mismatches = replay.compare(logged, same, 3, same_kind=True)
  assert len(rows) == 4 and mismatches == []  # round 6 is past the replay
  nudged = _log({'round': 3, 'train/loss': 0.5 + 1e-9, 'train/error': 20.0},
                {'round': 3, 'reference/test_error': 15.42, 'replica/test_error': [16.0, 17.0]})
  _, mismatches = replay.compare(logged, nudged, 3, same_kind=True)
  assert [(m[0], m[1]) for m in mismatches] == [(3, 'reference/test_error'), (3, 'train/loss')]
  _, mismatches = replay.compare(logged, nudged, 3, same_kind=False)
  assert mismatches == []  # within 0.05 nats and 3 points on another kind
  far = _log({'round': 3, 'train/loss': 0.56, 'train/error': 20.0},
             {'round': 3, 'reference/test_error': 15.41, 'replica/test_error': [16.0, 24.5]})
  _, mismatches = replay.compare(logged, far, 3, same_kind=False)
  assert [(m[0], m[1]) for m in mismatches] == [(3, 'replica/test_error'), (3, 'train/loss')]
  # One replica 5 points off, their mean 2 points: within the tolerance on another kind.
  apart = _log({'round': 3, 'train/loss': 0.5, 'train/error': 20.0},
               {'round': 3, 'reference/test_error': 15.41, 'replica/test_error': [21.0, 16.0]})
  _, mismatches = replay.compare(logged, apart, 3, same_kind=False)
  assert mismatches == []
  _, mismatches = replay.compare(logged, same[:1], 3, same_kind=True)
  assert [m[1] for m in mismatches] == ['reference/test_error', 'replica/test_error']  # missing
  assert replay.first_evaluation_round(logged) == 3
  with pytest.raises(ValueError, match='no evaluation'):
    replay.first_evaluation_round(logged[:1])


def test_every_replayed_run_of_this_work_names_its_commit_and_cpu():
  for run in REPLAYED:
    summary = json.loads((RESULTS / run / 'summary.json').read_text())
    if run.startswith('fashion_mnist_lenet_cpu/'):
      continue  # the 120-round suite predates provenance: "CPU not recorded"
    segment = summary['provenance'][0]
    assert len(segment['commit']) == 40 and segment['cpu']['usable_cores'] >= 1, run
    assert provenance.cpu_kind(segment)


def test_a_config_logged_before_a_field_existed_replays_with_that_fields_default():
  from experiments.configs import base
  logged = base.get_config().to_dict()
  del logged['device_map'], logged['mapping'], logged['devices_per_replica']
  logged['L'] = 7
  config, added = replay.with_defaults(logged)
  assert added == ['device_map', 'devices_per_replica', 'mapping']
  # 'auto' maps one device per replica with pmap, as runs logged before it did.
  assert (config.device_map, config.devices_per_replica, config.mapping, config.L) == (
      'auto', 1, 'auto', 7)
  base.validate(config)


def test_a_replay_with_another_setting_reports_the_largest_differences():
  comparison = replay.Comparison(
      True, 'k', 'k', rows=[], changed={'mapping': 'vmap'},
      mismatches=[(3, 'train/loss', 0.5, 0.5001), (6, 'train/loss', 0.4, 0.3995),
                  (3, 'replica/test_error', [16.0, 17.0], [16.1, 16.5]),
                  (3, 'reference/test_error', 15.0, None)])
  largest = comparison.largest_differences()
  assert largest == {'train/loss': pytest.approx(5e-4), 'replica/test_error': pytest.approx(0.5)}
  text = comparison.summary()
  assert "replayed with mapping='vmap'" in text and 'largest difference of train/loss: 0.0005' in text
  other_kind = replay.Comparison(False, 'a', 'b', rows=[(3, 'train/loss', 0.5, 0.5),
                                                        (3, 'train/error', 20.0, 20.5)],
                                 mismatches=[])
  assert '2 values compared within loss 0.05, errors 3.0 points' in other_kind.summary()
  assert ': agree (1 of 2 bitwise equal)' in other_kind.summary()
  with pytest.raises(ValueError, match=r"a replay can change \['mapping', 'conv', 'device_map'\], not \['L'\]"):
    replay.replay('nowhere', changed={'L': 5})
