"""experiments.report rebuilds tables and plots from a suite's raw files; experiments.suite's plumbing."""

import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import machine, optimizers, report, report_flatness, suite

MACHINE = {'device_kind': 'cpu', 'cpu_count': 2, 'jax': '0.10.2', 'platform': 'cpu',
           'device_count': 1, 'hostname': 'h', 'processor': 'x86_64'}


def _write_run(directory, name, optimizer, n, final_error, curve, seconds):
  """A finished run as experiments.suite leaves it; `curve` = test errors at rounds 1, 2, ..."""
  path = os.path.join(directory, name)
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'batch_size': 128, 'data_fraction': 1.0, 'optimizer': optimizer}, f)
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    for i, (error, t) in enumerate(zip(curve, seconds)):
      f.write(json.dumps({'round': i + 1, 'train/loss': 1.0}) + '\n')
      f.write(json.dumps({'round': i + 1, 'reference/test_error': error,
                          'distance/l2_mean': 1.0 + i, 'train_seconds': t,
                          'effective_epochs': 0.1 * (i + 1),
                          'gradient_evaluations': 10 * n * (i + 1)}) + '\n')
  with open(os.path.join(path, 'summary.json'), 'w') as f:
    json.dump({'optimizer': optimizer, 'num_replicas': n, 'reference/test_error': final_error,
               'reference/train_error': final_error - 1, 'ensemble/test_error': final_error + 1,
               'replica/test_error': [final_error + 2] * n, 'gradient_evaluations': 10 * n * 3,
               'effective_epochs': 0.3, 'train_seconds': seconds[-1], 'machine': MACHINE,
               'load_average_start': [1.0, 1, 1], 'load_average_end': [3.0, 1, 1]}, f)


@pytest.fixture
def suite_dir(tmp_path):
  directory = tmp_path / 'suite'
  _write_run(directory, 'sgd_n1_seed0', 'sgd', 1, 20.0, [40.0, 30.0, 20.0], [1.0, 2.0, 3.0])
  _write_run(directory, 'sgd_n1_seed1', 'sgd', 1, 22.0, [41.0, 31.0, 22.0], [1.0, 2.0, 3.0])
  _write_run(directory, 'parle_n3_seed0', 'parle', 3, 15.0, [35.0, 19.0, 15.0], [3.0, 6.0, 9.0])
  _write_run(directory, 'parle_n3_seed1', 'parle', 3, 17.0, [30.0, 25.0, 17.0], [3.0, 7.0, 9.0])
  os.makedirs(directory / 'unfinished_seed0')  # no summary.json: ignored
  return str(directory)


def test_accuracy_table_means_and_spreads_over_seeds(suite_dir):
  rows = {row['run']: row for row in report.accuracy_table(report.load_runs(suite_dir))}
  assert set(rows) == {'sgd_n1', 'parle_n3'}
  parle = rows['parle_n3']
  assert parle['seeds'] == 2 and parle['replicas'] == 3
  assert parle['reference_test_error'] == pytest.approx((16.0, np.sqrt(2.0)))
  assert parle['reference_train_error'] == pytest.approx((15.0, np.sqrt(2.0)))
  assert parle['ensemble_test_error'][0] == pytest.approx(17.0)
  assert parle['train_seconds'] == pytest.approx((9.0, 0.0))
  assert parle['load_average'] == pytest.approx(2.0)
  assert parle['machine'] == 'cpu (2 cores), jax 0.10.2'


def test_time_to_accuracy_takes_the_first_evaluation_at_the_target(suite_dir):
  runs = report.load_runs(suite_dir)
  target = report.baseline_error(runs)
  assert target == pytest.approx(21.0)
  rows = {row['run']: row for row in report.time_to_accuracy(runs, target)}
  # parle seed 0 reaches 19 <= 21 at its 2nd evaluation (6 s), seed 1 at its 3rd (9 s).
  assert rows['parle_n3']['reached'] == '2/2'
  assert rows['parle_n3']['train_seconds'][0] == pytest.approx(7.5)
  assert rows['parle_n3']['gradient_evaluations'][0] == pytest.approx(75)
  # sgd seed 0 ends at 20 (reached at 3 s); seed 1 ends at 22 and never gets there.
  assert rows['sgd_n1']['reached'] == '1/2'
  assert rows['sgd_n1']['train_seconds'][0] == pytest.approx(3.0)


def test_report_writes_tables_and_plots(suite_dir):
  sections = report.report(os.path.dirname(suite_dir), os.path.basename(suite_dir))
  text = sections['']
  assert sections['sweep'] == ''  # no budget in these run names
  assert sections['summary'].splitlines()[2] == (
      '| parle_n3 | 3 | 2 | 16.00 ± 1.41 | 15.00 ± 1.41 | 17.00 ± 1.41 | 90 | 0.3 |')
  assert '| parle_n3 | 3 | 100% | 2 | 16.00 ± 1.41 |' in text
  assert "SGD's final test error (21.00%" in text
  with open(os.path.join(suite_dir, 'tables.md')) as f:
    assert f.read() == text
  for name in ('test_error_vs_time', 'test_error_vs_effective_epochs',
               'test_error_vs_gradients', 'replica_distance'):
    with open(os.path.join(suite_dir, f'{name}.png'), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_report_without_runs_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match='run experiments.suite first'):
    report.report(str(tmp_path), 'nothing_here')


def test_cpu_suite_runs_the_same_rounds_with_compressed_schedules():
  runs = dict(suite._lenet_cpu_runs([0]))
  assert sorted(runs) == sorted([
      'parle_n3_seed0', 'entropy_sgd_n1_seed0', 'elastic_sgd_n3_seed0', 'sgd_n1_seed0',
      'data_parallel_sgd_n3_seed0', 'local_sgd_n3_seed0', 'diloco_n3_seed0',
      'parle_n3_data50_seed0', 'parle_n6_data25_seed0'])
  for name, config in runs.items():
    plan = optimizers.make_plan(config, suite.FASHION_MNIST_TRAIN, jax.device_count())
    assert plan.total_rounds == suite.ROUNDS, name
    assert plan.steps_per_round == 25 and plan.batch_size == 128, name
    # The learning rate drops at half and three quarters of the run.
    drops = [round(e * plan.rounds_per_epoch) for e in config.lr_drop_epochs]
    assert drops == [suite.ROUNDS // 2, 3 * suite.ROUNDS // 4], name
  # Parle's coefficients grow over the run about as over the paper's 5 epochs (e^2.5 = 12.2).
  nb = runs['parle_n3_seed0'].scoping_batches_per_epoch
  assert nb == suite.ROUNDS // 5
  assert (1 + 0.5 / nb) ** suite.ROUNDS == pytest.approx(np.exp(2.5), rel=0.05)
  assert runs['elastic_sgd_n3_seed0'].scoping_batches_per_epoch == 25 * nb  # counted in steps


def test_sweep_runs_parle_and_sgd_on_both_budgets_at_each_length():
  runs = dict(suite._lenet_sweep_runs([0, 1]))
  longest = max(suite.SWEEP_ROUNDS)
  expected = [f'{kind}_r{rounds}_seed{seed}' for rounds in suite.SWEEP_ROUNDS
              for seed in ([0, 1] if rounds == longest else [0])
              for kind in ('parle_n3', 'sgd_replica_budget', 'sgd_total_budget')]
  assert list(runs) == expected + ['sgd_total_budget_r2345_seed0']
  # The paper's budget: SGD on the same total as the paper suite's Parle, 3 x 125 epochs.
  paper_parle = dict(suite._lenet_paper_runs([0]))['parle_n3_seed0']
  total = runs['sgd_total_budget_r2345_seed0']
  plan = optimizers.make_plan(total, suite.FASHION_MNIST_TRAIN, 1)
  assert plan.gradient_evaluations(plan.total_rounds) == pytest.approx(3 * 2345 * 25, rel=1e-3)
  assert total.epochs == pytest.approx(375, rel=1e-3) and total.seed == 0
  assert [e / total.epochs for e in total.lr_drop_epochs] == pytest.approx([0.2, 0.4, 0.6])
  assert total.model_kwargs == paper_parle.model_kwargs and total.batch_size == 128
  for rounds in suite.SWEEP_ROUNDS:
    parle = optimizers.make_plan(runs[f'parle_n3_r{rounds}_seed0'], suite.FASHION_MNIST_TRAIN, 1)
    assert parle.total_rounds == rounds and parle.num_replicas == 3
    steps = rounds * 25  # mini-batches of one replica
    for kind, gradients in (('sgd_replica_budget', steps), ('sgd_total_budget', 3 * steps)):
      config = runs[f'{kind}_r{rounds}_seed0']
      plan = optimizers.make_plan(config, suite.FASHION_MNIST_TRAIN, 1)
      assert config.optimizer == 'sgd' and plan.num_replicas == 1
      assert plan.gradient_evaluations(plan.total_rounds) == pytest.approx(gradients, rel=0.01)
      drops = [e / config.epochs for e in config.lr_drop_epochs]
      assert drops == pytest.approx([0.5, 0.75])


def test_compiled_programs_are_released_only_once_memory_mappings_run_high(monkeypatch):
  count, limit = machine.memory_maps()
  assert 0 < count < limit  # this process's mappings, under Linux's vm.max_map_count
  compiled = jax.jit(lambda x: 3 * x)
  compiled(jnp.ones(2))
  monkeypatch.setattr(machine, 'memory_maps', lambda: (500, 1000))
  assert not machine.release_compiled_programs_if_many()
  assert compiled._cache_size() == 1  # kept: later work shares it
  monkeypatch.setattr(machine, 'memory_maps', lambda: (501, 1000))
  assert machine.release_compiled_programs_if_many()
  assert compiled._cache_size() == 0


def test_run_suite_keeps_raw_files_and_skips_finished_runs(tmp_path, monkeypatch):
  trained = []

  def fake_train(config, workdir):
    trained.append(config.seed)
    os.makedirs(workdir, exist_ok=True)
    for file in ('config.json', 'metrics.jsonl'):
      with open(os.path.join(workdir, file), 'w') as f:
        f.write(f'{file} of seed {config.seed}\n')
    return {'reference/test_error': 12.5, 'sgd_baselines': {'dropped': True}}

  monkeypatch.setattr(suite.train, 'train_and_evaluate', fake_train)
  runs_dir, results_dir = str(tmp_path / 'runs'), str(tmp_path / 'results')
  compiled = jax.jit(lambda x: 2 * x)
  compiled(jnp.ones(3))
  assert compiled._cache_size() == 1
  names = suite.run_suite('fashion_mnist_lenet_cpu', runs_dir, results_dir, [0, 1],
                          only=['sgd_n1'])
  assert names == ['sgd_n1_seed0', 'sgd_n1_seed1'] and trained == [0, 1]
  # Compiled programs are released between runs (a long suite would otherwise
  # exhaust vm.max_map_count and segfault XLA).
  assert compiled._cache_size() == 0
  kept = os.path.join(results_dir, 'fashion_mnist_lenet_cpu', 'sgd_n1_seed1')
  with open(os.path.join(kept, 'metrics.jsonl')) as f:
    assert f.read() == 'metrics.jsonl of seed 1\n'
  with open(os.path.join(kept, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['reference/test_error'] == 12.5 and 'sgd_baselines' not in summary
  assert summary['machine']['platform'] == 'cpu'
  assert suite.run_suite('fashion_mnist_lenet_cpu', runs_dir, results_dir, [0, 1],
                         only=['sgd_n1']) == []  # finished: skipped
  with pytest.raises(ValueError, match="--suite='nope' is unknown"):
    suite.run_suite('nope', runs_dir, results_dir, [0])


def test_paper_suites_have_the_papers_budgets():
  from experiments.configs import base
  runs = {(model, name): config for model in ('lenet', 'wrn16_4')
          for name, config in suite.SUITES[f'fashion_mnist_{model}_paper']([0])}
  assert len(runs) == 2 * 7  # two models, seven optimizers
  for name, config in runs.items():
    base.validate(config)
    plan = optimizers.make_plan(config, suite.FASHION_MNIST_TRAIN, 1)
    # 5 Parle epochs = 125 effective epochs; the SGD-type optimizers get 125 epochs.
    assert plan.effective_epochs(plan.total_rounds) == pytest.approx(125, rel=0.01), name
    # The learning rate drops 5x at Parle epochs 1, 2 and 3 (a fifth of the run each).
    assert [e / config.epochs for e in config.lr_drop_epochs] == pytest.approx([0.2, 0.4, 0.6])
  parle = runs[('lenet', 'parle_n3_seed0')]
  assert optimizers.make_plan(parle, suite.FASHION_MNIST_TRAIN, 1).total_rounds == 2345


def test_update_between_markers_replaces_only_the_suites_tables(tmp_path):
  readme = tmp_path / 'README.md'
  readme.write_text('intro\n<!-- BEGIN report:s -->\nold table\n<!-- END report:s -->\nrest\n')
  report.update_between_markers(str(readme), 's', '| new |\n')
  assert readme.read_text() == (
      'intro\n<!-- BEGIN report:s -->\n| new |\n<!-- END report:s -->\nrest\n')
  with pytest.raises(ValueError, match='must hold the markers'):
    report.update_between_markers(str(readme), 'other', '| x |\n')


def test_update_files_fills_each_sections_markers_where_they_are(tmp_path):
  readme, details = tmp_path / 'README.md', tmp_path / 'results.md'
  readme.write_text('a\n<!-- BEGIN report:s:summary -->\nx\n<!-- END report:s:summary -->\nb\n')
  details.write_text('<!-- BEGIN report:s -->\n<!-- END report:s -->\n'
                     '<!-- BEGIN report:s:sweep -->\n<!-- END report:s:sweep -->\n')
  sections = {'': 'full\n', 'summary': 'short\n', 'sweep': 'budgets\n'}
  done = report.update_files([str(readme), str(details)], 's', sections)
  assert done == [f'{readme}:summary', f'{details}:tables', f'{details}:sweep']
  assert readme.read_text() == (
      'a\n<!-- BEGIN report:s:summary -->\nshort\n<!-- END report:s:summary -->\nb\n')
  assert 'report:s -->\nfull\n<!-- END' in details.read_text()
  assert 'report:s:sweep -->\nbudgets\n<!-- END' in details.read_text()
  with pytest.raises(ValueError, match='none of .* holds a marker <!-- BEGIN report:t'):
    report.update_files([str(readme)], 't', sections)


def _with_provenance(directory, name, model, commit):
  path = os.path.join(directory, name, 'summary.json')
  with open(path) as f:
    summary = json.load(f)
  summary['provenance'] = [{'commit': commit, 'code_changed': False, 'versions': {'jax': '0.10.2'},
                            'cpu': {'model': model, 'vector_extensions': ['avx2'],
                                    'usable_cores': 2}, 'xla_flags': ''}]
  with open(path, 'w') as f:
    json.dump(summary, f)


def test_cpu_kinds_pairs_each_rerun_with_the_committed_run_of_its_name(tmp_path):
  results = tmp_path / 'results'
  _write_run(results / 'sweep', 'parle_n3_r12_seed0', 'parle', 3, 15.41, [30.0, 15.41], [1, 2])
  _write_run(results / 'sweep', 'sgd_n1_seed0', 'sgd', 1, 10.0, [30.0, 20.0, 10.0], [1, 2, 3])
  _write_run(results / 'cpu_kinds' / 'sweep', 'parle_n3_r12_seed0', 'parle', 3, 15.60,
             [30.0, 15.60], [1, 2])
  _write_run(results / 'cpu_kinds' / 'sweep', 'sgd_n1_seed0', 'sgd', 1, 9.75, [30.0, 20.0, 9.75],
             [1, 2, 3])
  _write_run(results / 'cpu_kinds' / 'sweep', 'only_here_seed0', 'sgd', 1, 9.0, [9.0], [1])
  _with_provenance(results / 'sweep', 'sgd_n1_seed0', 'AMD EPYC', 'a' * 40)
  _with_provenance(results / 'cpu_kinds' / 'sweep', 'sgd_n1_seed0', 'Intel Xeon', 'b' * 40)
  rows = report.cpu_kinds_table(str(results))
  # The budget: from the name, else that of the suite's Parle run of the same seed.
  assert [(r['rounds'], r['run']) for r in rows] == [(12, 'parle_n3_r12_seed0'), (12, 'sgd_n1_seed0')]
  assert rows[0]['reference/test_error'] == (15.41, 15.60, pytest.approx(0.19))
  assert rows[1]['kinds'] == ('AMD EPYC, AVX2, 2 cores (aaaaaaa)',
                              'Intel Xeon, AVX2, 2 cores (bbbbbbb)')
  text = report.report(str(results), 'cpu_kinds')['']
  assert '| 12 | sweep/sgd_n1_seed0 | AMD EPYC, AVX2, 2 cores (aaaaaaa) | 10.00 (9.00) | ' \
         'Intel Xeon, AVX2, 2 cores (bbbbbbb) | 9.75 (8.75) | -0.25 (-0.25) |' in text
  summary = ('Largest difference of the final test error between CPU kinds: 0.25 points at 12 '
             'rounds (2 pairs of runs; AMD EPYC, AVX2, 2 cores, Intel Xeon, AVX2, 2 cores and '
             'not recorded).')
  assert summary in text
  assert report.report(str(results), 'cpu_kinds')['summary'] == summary + '\n'
  assert (results / 'cpu_kinds' / 'tables.md').read_text() == text
  with open(results / 'cpu_kinds' / 'sweep' / 'sgd_n1_seed0' / 'config.json', 'w') as f:
    json.dump({'batch_size': 128, 'data_fraction': 1.0, 'optimizer': 'sgd', 'added': 1}, f)
  assert len(report.cpu_kinds_table(str(results))) == 2  # a field added later: not a difference
  with open(results / 'cpu_kinds' / 'sweep' / 'sgd_n1_seed0' / 'config.json', 'w') as f:
    json.dump({'batch_size': 64, 'data_fraction': 1.0, 'optimizer': 'sgd'}, f)
  with pytest.raises(ValueError, match=r"sgd_n1_seed0: the rerun's config differs in \['batch_size'\]"):
    report.cpu_kinds_table(str(results))


def test_the_sweep_borrows_the_paper_suites_runs_as_its_last_budget(tmp_path):
  _write_run(tmp_path / 'fashion_mnist_lenet_sweep', 'parle_n3_r12_seed0', 'parle', 3, 15.0,
             [30.0, 15.0], [1, 2])
  _write_run(tmp_path / 'fashion_mnist_lenet_sweep', 'sgd_total_budget_r2345_seed0', 'sgd', 1,
             7.5, [30.0, 7.5], [1, 2])
  for seed, error in ((0, 8.0), (1, 8.2)):
    _write_run(tmp_path / 'fashion_mnist_lenet_paper', f'parle_n3_seed{seed}', 'parle', 3, error,
               [30.0, error], [1, 2])
  _write_run(tmp_path / 'fashion_mnist_lenet_paper', 'sgd_n1_seed0', 'sgd', 1, 8.6, [30.0, 8.6],
             [1, 2])
  _write_run(tmp_path / 'fashion_mnist_lenet_paper', 'elastic_sgd_n3_seed0', 'elastic_sgd', 3,
             8.1, [30.0, 8.1], [1, 2])
  runs = report.load_suite(str(tmp_path), 'fashion_mnist_lenet_sweep')
  assert [r.name for r in runs] == [
      'parle_n3_r12_seed0', 'parle_n3_r2345_seed0', 'parle_n3_r2345_seed1',
      'sgd_replica_budget_r2345_seed0', 'sgd_total_budget_r2345_seed0']  # not Elastic-SGD
  sweep = report.sweep_section(runs)
  assert '| 2345 | 8.10 ± 0.14 (7.10 ± 0.14) [2 seeds] | 8.60 (7.60) | 7.50 (6.50) |' in sweep


def test_sweep_table_and_plot_read_the_budget_from_the_run_names(tmp_path):
  directory = tmp_path / 'sweep'
  for name, optimizer, n, error in (('parle_n3_r12_seed0', 'parle', 3, 16.0),
                                    ('sgd_replica_budget_r12_seed0', 'sgd', 1, 15.0),
                                    ('parle_n3_r50_seed0', 'parle', 3, 11.0),
                                    ('parle_n3_r50_seed1', 'parle', 3, 13.0),
                                    ('sgd_replica_budget_r50_seed0', 'sgd', 1, 12.0)):
    _write_run(directory, name, optimizer, n, error, [30.0, error], [1.0, 2.0])
  runs = report.load_runs(str(directory))
  rows = {(r['rounds'], r['method']): r for r in report.sweep_table(runs)}
  assert sorted(rows) == [(12, 'parle_n3'), (12, 'sgd_replica_budget'), (50, 'parle_n3'),
                          (50, 'sgd_replica_budget')]
  mean, std = rows[(50, 'parle_n3')]['test_error']
  assert (mean, std, rows[(50, 'parle_n3')]['seeds']) == (12.0, pytest.approx(np.sqrt(2)), 2)
  assert rows[(12, 'parle_n3')]['train_error'][0] == 15.0  # the summary's train error
  text = report.markdown(runs)
  assert '| 50 | 12.00 ± 1.41 (11.00 ± 1.41) [2 seeds] | 12.00 (11.00) |' in text
  # Under each table: where its runs came from (these fakes recorded nothing).
  assert text.count('Runs from: commit and CPU not recorded (5 runs).') == 2
  assert 'sweep.png' in report.figures(runs)
  # The CPU suite's run names hold no budget: no sweep table, no sweep plot.
  _write_run(tmp_path / 'cpu', 'parle_n3_seed0', 'parle', 3, 15.0, [30.0, 15.0], [1.0, 2.0])
  cpu_runs = report.load_runs(str(tmp_path / 'cpu'))
  assert report.sweep_table(cpu_runs) == [] and 'sweep.png' not in report.figures(cpu_runs)


def test_rank_correlations_of_flatness_with_test_error_match_closed_forms():
  def row(group, error, figure, models='reference'):
    values = {key: [figure] for _, key in report_flatness.RANKED}
    return dict(values, group=group, models=models, seeds=1, test_error=[error])

  errors = [9.0, 9.5, 10.0, 11.0]
  # Ranks (1, 2, 3, 4) against (2, 1, 4, 3): 1 - 6 * 4 / (4 * (16 - 1)) = 0.6.
  rows = [row(f'm{i}', e, f) for i, (e, f) in enumerate(zip(errors, [0.2, 0.1, 0.4, 0.3]))]
  rows.append(row('m0', 99.0, -5.0, models='replicas'))  # replica rows do not count
  found = report_flatness.rank_correlations(rows)
  assert set(found) == {key for _, key in report_flatness.RANKED}
  np.testing.assert_allclose(list(found.values()), 0.6, rtol=1e-12)
  # Flatter with lower error: +1; sharper with lower error: -1.
  increasing = [row(f'm{i}', e, e * 2) for i, e in enumerate(errors)]
  assert report_flatness.rank_correlations(increasing)['trace'] == pytest.approx(1.0)
  decreasing = [row(f'm{i}', e, -e) for i, e in enumerate(errors)]
  assert report_flatness.rank_correlations(decreasing)['top_eigenvalue'] == pytest.approx(-1.0)
  line = report_flatness.correlations_markdown(decreasing)
  assert line.startswith("Spearman's rank correlation with the test error across the 4 methods'")
  assert 'top eigenvalue -1.00, trace -1.00' in line
  assert report_flatness.rank_correlations(increasing[:2]) == {}  # too few methods
  assert report_flatness.correlations_markdown(increasing[:2]) == ''


REPO = pathlib.Path(__file__).resolve().parent.parent
MARKED = re.compile(r'<!-- BEGIN report:(\w+)(?::(\w+))? -->\n(.*?)<!-- END report:\1(?::\2)? -->',
                    re.S)


def test_committed_tables_are_what_the_report_builds_from_the_committed_runs():
  """Every marked table in the README and docs/results.md, and every suite's tables.md."""
  built = {}
  for path in (REPO / 'README.md', REPO / 'docs' / 'results.md'):
    marked = MARKED.findall(path.read_text())
    assert marked, path
    for suite_name, section, text in marked:
      if suite_name not in built:
        built[suite_name] = report.report(str(REPO / 'experiments' / 'results'), suite_name,
                                          write=False)
      assert text == built[suite_name][section], (
          f'{path.name}: report:{suite_name}{":" + section if section else ""} is not what the '
          f'committed runs give; run python -m experiments.report --suite={suite_name} '
          '--readme=README.md,docs/results.md')
  for suite_name, sections in built.items():
    tables = REPO / 'experiments' / 'results' / suite_name / 'tables.md'
    assert tables.read_text() == sections[''], tables
