"""The dataset loss of the project's models and experiments.landscape on tiny workdirs.

The loss is checked against model.apply and a float64 NumPy cross-entropy;
the binary runs on runs trained on TFDS mock data, and its figures are checked
where they must agree (the loss at the ends of its paths, the density's mass,
sorted eigenvalues, the same compiled program for every model).
"""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import errors, landscape, report, suite, train
from experiments.configs import base
from experiments.configs import fashion_mnist_lenet
from parle_jax import evaluate, models
from parle_jax.batch_norm import recompute_batch_stats
from tests.test_train import MOCK_EXAMPLES, tiny

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL = landscape.Settings(examples=48, batch_size=16, num_eigenvalues=3, lanczos_iterations=6,
                           trace_samples=4, density_probes=2, density_points=64, ascent_steps=2,
                           random_perturbations=3, langevin_steps=4, line_points=5)


def _numpy_mean_cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return float(-log_probs[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize('recompute', [False, True])
def test_dataset_loss_is_the_mean_cross_entropy(recompute):
  model = models.create_model('lenet', 10, conv='xla')
  variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  rng = np.random.default_rng(0)
  arrays = {'image': rng.integers(0, 256, (10, 28, 28, 1), dtype=np.uint8),
            'label': rng.integers(0, 10, 10)}
  mean, std = np.array([0.3], np.float32), np.array([0.35], np.float32)
  images = ((arrays['image'] / np.float32(255) - mean) / std).astype(np.float32)
  bn_batches = images[:8].reshape(2, 4, 28, 28, 1)
  params, stats = variables['params'], variables['batch_stats']
  if recompute:
    stats = recompute_batch_stats(model, params, stats, bn_batches)
  logits = model.apply({'params': params, 'batch_stats': stats}, images, train=False)
  loss = evaluate.dataset_loss(model, {'batch_stats': variables['batch_stats']}, arrays,
                               mean=mean, std=std, batch_size=4,  # 3 batches, the last padded
                               bn_batches=bn_batches if recompute else None)
  expected = _numpy_mean_cross_entropy(logits, arrays['label'])
  np.testing.assert_allclose(float(jax.jit(lambda f, p: f(p))(loss, params)), expected, rtol=1e-5)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(parle workdir with 2 replicas, sgd workdir), trained 2 rounds on mock data."""
  root = tmp_path_factory.mktemp('landscape')
  workdirs = {}
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
    for name, overrides in (('parle', dict(num_replicas=2)), ('sgd', dict(optimizer='sgd'))):
      config = tiny(fashion_mnist_lenet.get_config(), root / 'data', **overrides)
      workdirs[name] = str(root / name)
      results = train.train_and_evaluate(config, workdirs[name])
      with open(os.path.join(workdirs[name], 'summary.json'), 'w') as f:  # as suite keeps it
        json.dump(suite._summary(results, 0.0, (0.0, 0.0, 0.0)), f)
  return workdirs


def _measure(*args, **kwargs):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
    return landscape.measure(*args, progress_bar=False, **kwargs)


@pytest.fixture(scope='module')
def suite_results(runs, tmp_path_factory):
  """The tiny runs as a default_job suite, measured by suite.measure_flatness.

  Returns (results dir, entries). Every model of both runs is measured with
  one compilation of each program.

  Its third run's workdir is gone, so it is skipped (with a warning).
  """
  root = tmp_path_factory.mktemp('suite')
  runs_dir, results_dir = root / 'runs' / 'default_job', root / 'results' / 'default_job'
  entries = []
  for name, key in (('parle_n3_seed0', 'parle'), ('sgd_replica_budget_seed0', 'sgd'),
                    ('sgd_total_budget_seed0', None)):
    kept = results_dir / name
    kept.mkdir(parents=True)
    source = runs[key or 'sgd']
    for file in ('config.json', 'metrics.jsonl', 'summary.json'):
      shutil.copy(os.path.join(source, file), kept)
    if key:
      runs_dir.mkdir(parents=True, exist_ok=True)
      os.symlink(source, runs_dir / name)
    config, _ = base.with_defaults(json.load(open(os.path.join(source, 'config.json'))))
    entries.append((name, config))
  programs = (landscape._curvature, landscape._density, landscape._sharpness,
              landscape._local_entropy, landscape._random_direction)
  before = [program._cache_size() for program in programs]
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
    measured = suite.measure_flatness('default_job', entries, str(runs_dir.parent),
                                      str(results_dir.parent), SMALL)
  assert measured == ['parle_n3_seed0', 'sgd_replica_budget_seed0']
  # Both runs' four models, one compilation of each figure's program.
  assert [program._cache_size() for program in programs] == [n + 1 for n in before]
  return results_dir, entries


def _flatness(results_dir, name):
  return json.load(open(results_dir / name / 'flatness.json'))


def test_figures_of_a_two_replica_run(suite_results):
  result = _flatness(suite_results[0], 'parle_n3_seed0')
  assert sorted(result['models']) == ['reference', 'replica_0', 'replica_1']
  assert result['replicas_round'] == 2 and result['settings']['examples'] == 48
  for figures in result['models'].values():
    top = np.array(figures['top_eigenvalues'])
    assert top.shape == (3,) and np.all(np.diff(top) <= 0) and np.all(np.isfinite(top))
    assert figures['trace_standard_error'] > 0
    grid, density = np.array(figures['density']['grid']), np.array(figures['density']['density'])
    assert abs(np.trapezoid(density, grid) - 1.0) < 0.02
    assert figures['sharpness_worst'] >= 0 and figures['local_entropy_distance'] > 0
    line = figures['random_direction']
    assert line['t'][2] == 0.0 and len(line['loss']) == 5
  reference = result['models']['reference']
  # The reference's saved statistics were recomputed on the run's BN batches, as the paths'
  # are at every point: at t = 0 and alpha = 0 the paths give the loss itself.
  np.testing.assert_allclose(reference['random_direction']['loss'][2], reference['loss'],
                             rtol=1e-5)
  alphas = np.array(result['against']['alpha'])
  np.testing.assert_allclose(result['against']['loss'][int(np.argmin(np.abs(alphas)))],
                             reference['loss'], rtol=1e-5)
  assert result['provenance']['cpu']['model']
  assert result['models']['replica_0']['loss'] != result['models']['replica_1']['loss']


def test_one_scope_per_suite_and_segments_to_sgd(runs, suite_results):
  results_dir, entries = suite_results
  parle, sgd = (_flatness(results_dir, name) for name in ('parle_n3_seed0',
                                                           'sgd_replica_budget_seed0'))
  assert parle['gamma'] == sgd['gamma'] == pytest.approx(suite.suite_gamma(entries))
  assert os.path.basename(parle['against']['workdir']) == 'sgd_replica_budget_seed0'
  assert 'against' not in sgd and list(sgd['models']) == ['reference']
  assert not os.path.exists(results_dir / 'sgd_total_budget_seed0' / 'flatness.json')
  # written whole: no temporary file left in the workdir
  assert [n for n in os.listdir(runs['sgd']) if n.startswith('flatness')] == ['flatness.json']


def test_the_report_tabulates_and_plots_flatness(suite_results):
  results_dir, _ = suite_results
  sgd = _flatness(results_dir, 'sgd_replica_budget_seed0')
  other = dict(sgd, settings=dict(sgd['settings'], examples=96))
  other['models'] = {'reference': dict(sgd['models']['reference'], loss=1.25)}
  (results_dir / 'sgd_replica_budget_seed0' / 'flatness_96.json').write_text(json.dumps(other))
  sections = report.report(str(results_dir.parent), 'default_job')
  # The figures at other image counts are in the full section, not in the README's table.
  assert (f"| loss | {sgd['models']['reference']['loss']:.4g} | 1.25 |"
          in sections[''].splitlines())
  assert 'sgd_replica_budget_seed0, reference model, by the number of training images:' in (
      sections[''])
  assert 'by the number of training images' not in sections['flatness']
  # The README's table holds the reference models; the full one adds the replicas.
  assert [line.split(' | ')[:2] for line in sections['flatness'].splitlines()
          if ' | reference | ' in line or ' | replicas | ' in line] == [
              ['| parle_n3', 'reference'], ['| sgd_replica_budget', 'reference']]
  rows = [line for line in sections[''].split('### Flatness')[1].splitlines()
          if ' | reference | ' in line or ' | replicas | ' in line]
  assert [row.split(' | ')[:3] for row in rows] == [
      ['| parle_n3', 'reference', '1'], ['| parle_n3', 'replicas', '1'],
      ['| sgd_replica_budget', 'reference', '1']]
  parle = _flatness(results_dir, 'parle_n3_seed0')['models']
  assert f"{parle['reference']['top_eigenvalues'][0]:.3g}" in rows[0]
  replicas_trace = np.mean([parle[f'replica_{i}']['trace'] for i in range(2)])
  assert f'{replicas_trace:.3g}' in rows[1]
  assert os.path.isfile(results_dir / 'spectral_density.png')
  assert os.path.isfile(results_dir / 'loss_paths.png')


def test_more_examples_than_the_split_is_refused(runs):
  with pytest.raises(errors.ConfigError) as error:
    _measure(runs['sgd'], dataclasses.replace(SMALL, examples=MOCK_EXAMPLES + 1))
  assert str(error.value) == (f'--examples={MOCK_EXAMPLES + 1} is outside 1..{MOCK_EXAMPLES}, '
                              "the examples of fashion_mnist's training split.")


def test_a_reference_of_another_model_is_refused(runs, tmp_path):
  other = tmp_path / 'other'
  other.mkdir()
  config = json.load(open(os.path.join(runs['sgd'], 'config.json')))
  os.symlink(os.path.join(runs['sgd'], 'reference'), other / 'reference')
  config['model'] = 'allcnn'
  (other / 'config.json').write_text(json.dumps(config))
  with pytest.raises(errors.WorkdirError, match='does not match the model its config builds'):
    _measure(str(other), SMALL)


def _landscape_binary(*args):
  process = subprocess.run([sys.executable, '-m', 'experiments.landscape', *args], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
  return process.returncode, process.stderr.strip().splitlines()


def test_bad_workdirs_get_one_line_and_exit_1(tmp_path):
  status, lines = _landscape_binary(f'--workdir={tmp_path}')
  assert status == 1 and lines[-1] == (f'error: --workdir={tmp_path} holds no config.json: not '
                                       'the workdir of a run.')
  (tmp_path / 'config.json').write_text('{}')
  status, lines = _landscape_binary(f'--workdir={tmp_path}')
  assert status == 1 and lines[-1] == (f'error: --workdir={tmp_path} holds no reference model '
                                       f'({tmp_path}/reference): the run has not finished.')
  status, lines = _landscape_binary(f'--workdir={tmp_path}', '--radius=0')
  assert status == 1 and lines[-1] == 'error: --radius=0.0 must be > 0.'
  status, lines = _landscape_binary(f'--workdir={tmp_path}', '--output=a/b.json')
  assert status == 1 and lines[-1] == ("error: --output='a/b.json' must be a file name ending in "
                                       '.json (it is written into the workdir).')



def test_a_suite_scope_is_its_parle_runs_final_gamma_in_closed_form():
  """The paper budget: c_gamma = min(0.01 (1 + 0.5 / 469)^2345, 1) after 2,345 rounds."""
  runs = list(suite.SUITES['fashion_mnist_lenet_paper']([0]))
  expected = 1 / min(0.01 * (1 + 0.5 / 469) ** 2345, 1.0)
  # The schedule runs in float32: 2,345 powers of a float32 growth factor, about 1.4e-4 relative.
  assert suite.suite_gamma(runs) == pytest.approx(expected, rel=2e-4)
  # Without a Parle run (e.g. --only=sgd), there is none: run_suite passes the whole suite's.
  assert suite.suite_gamma([r for r in runs if r[1].optimizer != 'parle']) is None
