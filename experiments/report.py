"""Rebuilds the results tables and plots from the raw files of a suite.

  python -m experiments.report --suite=fashion_mnist_lenet_cpu

Reads ``<results_dir>/<suite>/<run>/{config.json,metrics.jsonl,summary.json}``
as :mod:`experiments.suite` leaves them, and writes
``<results_dir>/<suite>/tables.md`` and the plots ``<results_dir>/<suite>/*.png``.
Every number comes from those files; runs that differ only in the seed form one
row (mean and sample standard deviation over seeds). Under every table, the
commits and CPUs its runs came from.

``--readme=README.md,docs/results.md`` also replaces, in each file, what stands
between the suite's markers: ``<!-- BEGIN report:<suite> -->`` gets the full
tables, ``<!-- BEGIN report:<suite>:summary -->`` the short one for the README,
``<!-- BEGIN report:<suite>:sweep -->`` the budget sweep alone,
``<!-- BEGIN report:<suite>:flatness -->`` the flatness table of the reference
models (:mod:`experiments.report_flatness`, for runs with a ``flatness.json``;
the full tables add the replicas).

``--suite=cpu_kinds`` tabulates the runs under ``<results_dir>/cpu_kinds/``:
committed runs rerun on another CPU kind, each beside the run of the same name
(``<results_dir>/<suite>/<run>``), with the difference of their final errors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional, Sequence

import numpy as np
from absl import app, flags

from experiments import provenance, report_flatness, workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('results_dir', 'experiments/results', 'Suites live here.')
  flags.DEFINE_string('suite', 'fashion_mnist_lenet_cpu', 'Which suite to report.')
  flags.DEFINE_list('readme', [], 'Also replace the tables between the markers '
                    '<!-- BEGIN report:<suite>[:section] --> and <!-- END ... --> in these files.')

_SEED = re.compile(r'_seed(\d+)$')
_BUDGET = re.compile(r'^(.*)_r(\d+)$')  # budget-sweep groups: <method>_r<rounds>
GROUP_ORDER = ('parle_n3', 'entropy_sgd_n1', 'elastic_sgd_n3', 'sgd_n1', 'data_parallel_sgd_n3',
               'local_sgd_n3', 'diloco_n3')
REFERENCE_BASELINE = 'sgd_n1'  # time to accuracy: to reach this group's final test error
CPU_KINDS = 'cpu_kinds'  # <results_dir>/cpu_kinds/<suite>/<run>: reruns on another CPU kind
# Runs one suite borrows from another, renamed: the budget sweep's last point is the paper's budget.
BORROWED = {'fashion_mnist_lenet_sweep': (
    ('fashion_mnist_lenet_paper', {'parle_n3': 'parle_n3_r2345',
                                   'sgd_n1': 'sgd_replica_budget_r2345'}),)}


@dataclasses.dataclass
class Run:
  """One finished run: its name, config, metric records and final summary."""

  name: str
  config: dict[str, Any]
  records: list[dict[str, Any]]
  summary: dict[str, Any]

  @property
  def group(self) -> str:
    """The name without its seed: runs of one group differ only in the seed."""
    return _SEED.sub('', self.name)

  def evaluations(self) -> list[dict[str, Any]]:
    """The records holding a test evaluation, in round order."""
    return sorted((r for r in self.records if 'reference/test_error' in r),
                  key=lambda r: r['round'])


def load_runs(suite_dir: str) -> list[Run]:
  """The finished runs (those with a ``summary.json``) of a suite directory."""
  if not os.path.isdir(suite_dir):
    raise FileNotFoundError(f'no suite results in {suite_dir}; run experiments.suite first.')
  runs = []
  for name in sorted(os.listdir(suite_dir)):
    path = os.path.join(suite_dir, name)
    if not os.path.isfile(os.path.join(path, 'summary.json')):
      continue
    with open(os.path.join(path, workdir.CONFIG)) as f:
      config = json.load(f)
    with open(os.path.join(path, workdir.METRICS)) as f:
      records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(path, 'summary.json')) as f:
      summary = json.load(f)
    runs.append(Run(name, config, records, summary))
  return runs


def load_suite(results_dir: str, suite: str) -> list[Run]:
  """A suite's finished runs, with those it borrows from other suites (:data:`BORROWED`)."""
  runs = load_runs(os.path.join(results_dir, suite))
  for other, renames in BORROWED.get(suite, ()):
    other_dir = os.path.join(results_dir, other)
    if not os.path.isdir(other_dir):
      continue
    for run in load_runs(other_dir):
      if run.group in renames:
        name = renames[run.group] + run.name[len(run.group):]
        runs.append(dataclasses.replace(run, name=name))
  return sorted(runs, key=lambda run: run.name)


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
  """Runs by group, in the order of :data:`GROUP_ORDER`, then by name."""
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(run.group, []).append(run)
  rank = lambda group: (GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER),
                        group)
  return {group: groups[group] for group in sorted(groups, key=rank)}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float('nan')


def _format(mean: float, std: float, digits: int = 2) -> str:
  return f'{mean:.{digits}f}' if np.isnan(std) else f'{mean:.{digits}f} ± {std:.{digits}f}'


def _machine(runs: Sequence[Run]) -> str:
  machines = {(r.summary['machine']['device_kind'], r.summary['machine']['cpu_count'],
               r.summary['machine']['jax']) for r in runs}
  return '; '.join(f'{kind} ({cpus} cores), jax {version}' for kind, cpus, version in
                   sorted(machines))


def accuracy_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
  """One row per group: final errors (mean, std over seeds), budget, time, machine."""
  rows = []
  for group, members in group_runs(runs).items():
    summaries = [r.summary for r in members]
    config = members[0].config
    row = {
        'run': group, 'optimizer': summaries[0]['optimizer'],
        'replicas': summaries[0]['num_replicas'], 'batch': config['batch_size'],
        'data_fraction': config['data_fraction'], 'seeds': len(members),
        'reference_test_error': _mean_std([s['reference/test_error'] for s in summaries]),
        'ensemble_test_error': _mean_std([s['ensemble/test_error'] for s in summaries]),
        'replica_test_error': _mean_std([np.mean(s['replica/test_error']) for s in summaries]),
        'gradient_evaluations': summaries[0]['gradient_evaluations'],
        'effective_epochs': summaries[0]['effective_epochs'],
        'train_seconds': _mean_std([s['train_seconds'] for s in summaries]),
        'load_average': float(np.mean([np.mean([s['load_average_start'][0],
                                                s['load_average_end'][0]])
                                       for s in summaries])),
        'machine': _machine(members),
    }
    if all('reference/train_error' in s for s in summaries):
      row['reference_train_error'] = _mean_std([s['reference/train_error'] for s in summaries])
    rows.append(row)
  return rows


def time_to_accuracy(runs: Sequence[Run], target: float) -> list[dict[str, Any]]:
  """Per group: training seconds and gradients until the reference first reaches `target`.

  Measured at the evaluations logged during training; a seed that never gets
  there is counted in ``reached`` only.
  """
  rows = []
  for group, members in group_runs(runs).items():
    seconds, gradients = [], []
    for run in members:
      hit = next((r for r in run.evaluations() if r['reference/test_error'] <= target), None)
      if hit is not None:
        seconds.append(hit['train_seconds'])
        gradients.append(hit['gradient_evaluations'])
    rows.append({'run': group, 'reached': f'{len(seconds)}/{len(members)}',
                 'train_seconds': _mean_std(seconds) if seconds else None,
                 'gradient_evaluations': _mean_std(gradients) if gradients else None})
  return rows


def baseline_error(runs: Sequence[Run], group: str = REFERENCE_BASELINE) -> Optional[float]:
  """Mean final test error of `group` (SGD by default), or None if it has no runs."""
  errors = [r.summary['reference/test_error'] for r in runs if r.group == group]
  return float(np.mean(errors)) if errors else None


def provenance_line(runs: Sequence[Run]) -> str:
  """Under a table: the commits and CPUs its runs came from."""
  return 'Runs from: ' + provenance.describe_runs(
      [r.summary.get('provenance') or [] for r in runs]) + '.'


def _train_error(row: dict[str, Any]) -> str:
  return _format(*row['reference_train_error']) if 'reference_train_error' in row else '-'


# The accuracy table's columns: (header, cell of an accuracy_table row).
FULL_COLUMNS = (
    ('run', lambda r: r['run']), ('replicas', lambda r: str(r['replicas'])),
    ('data per replica', lambda r: f"{100 * r['data_fraction']:.0f}%"),
    ('seeds', lambda r: str(r['seeds'])),
    ('reference test error %', lambda r: _format(*r['reference_test_error'])),
    ('reference train error %', _train_error),
    ('mean replica test error %', lambda r: _format(*r['replica_test_error'])),
    ('ensemble test error %', lambda r: _format(*r['ensemble_test_error'])),
    ('mini-batch gradients', lambda r: str(r['gradient_evaluations'])),
    ('effective epochs', lambda r: f"{r['effective_epochs']:.2f}"),
    ('training s', lambda r: _format(*r['train_seconds'], digits=0)),
    ('load', lambda r: f"{r['load_average']:.1f}"), ('machine', lambda r: r['machine']))
SUMMARY_COLUMNS = (  # the README's short table
    ('run', lambda r: r['run']), ('replicas', lambda r: str(r['replicas'])),
    ('seeds', lambda r: str(r['seeds'])),
    ('test error %', lambda r: _format(*r['reference_test_error'])),
    ('train error %', _train_error),
    ('ensemble test error %', lambda r: _format(*r['ensemble_test_error'])),
    ('mini-batch gradients', lambda r: f"{r['gradient_evaluations']:,}"),
    ('effective epochs', lambda r: f"{r['effective_epochs']:.1f}"))


def _accuracy_lines(runs: Sequence[Run], columns) -> list[str]:
  """The accuracy table of `runs` in the given columns, as Markdown lines."""
  lines = ['| ' + ' | '.join(header for header, _ in columns) + ' |', '|' + '---|' * len(columns)]
  for row in accuracy_table(runs):
    lines.append('| ' + ' | '.join(cell(row) for _, cell in columns) + ' |')
  return lines


def markdown(runs: Sequence[Run]) -> str:
  """The accuracy and time-to-accuracy tables as Markdown, each with its runs' provenance."""
  lines = _accuracy_lines(runs, FULL_COLUMNS)
  lines += ['', provenance_line(runs)]
  sweep = sweep_table(runs)
  if sweep:
    lines += ['', 'Final reference error against the budget (rounds of L mini-batches per '
              'replica; SGD on the mini-batches of one replica, and on the same total):', '',
              sweep_markdown(sweep).rstrip('\n'), '',
              provenance_line([r for r in runs if _BUDGET.match(r.group)])]
  target = baseline_error(runs)
  if target is not None:
    lines += ['', f'Time to reach SGD\'s final test error ({target:.2f}%, mean over its seeds), '
              'at the logged evaluations:', '',
              '| run | seeds that reach it | training s | mini-batch gradients |',
              '|---|---|---|---|']
    for row in time_to_accuracy(runs, target):
      seconds = '-' if row['train_seconds'] is None else _format(*row['train_seconds'], digits=0)
      grads = ('-' if row['gradient_evaluations'] is None
               else _format(*row['gradient_evaluations'], digits=0))
      lines.append(f"| {row['run']} | {row['reached']} | {seconds} | {grads} |")
    lines += ['', provenance_line(runs)]
  return '\n'.join(lines) + '\n'


def sweep_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
  """Budget-sweep rows: per budget (rounds) and method, final errors over seeds.

  Only groups named ``<method>_r<rounds>`` (experiments.suite's sweep) count;
  errors are (mean, std) in percent, ``train`` on the examples the run evaluates.
  """
  rows = []
  for group, members in group_runs(runs).items():
    match = _BUDGET.match(group)
    if not match:
      continue
    summaries = [r.summary for r in members]
    row = {'method': match.group(1), 'rounds': int(match.group(2)), 'seeds': len(members),
           'test_error': _mean_std([s['reference/test_error'] for s in summaries]),
           'gradient_evaluations': summaries[0]['gradient_evaluations'],
           'effective_epochs': summaries[0]['effective_epochs']}
    if all('reference/train_error' in s for s in summaries):
      row['train_error'] = _mean_std([s['reference/train_error'] for s in summaries])
    rows.append(row)
  return sorted(rows, key=lambda row: (row['rounds'], row['method']))


def sweep_markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The sweep as one row per budget: each method's test (train) error."""
  methods = list(dict.fromkeys(row['method'] for row in rows))
  lines = ['| rounds | ' + ' | '.join(f'{m} test (train) error %' for m in methods) + ' |',
           '|---|' + '---|' * len(methods)]
  for rounds in sorted({row['rounds'] for row in rows}):
    cells = []
    for method in methods:
      row = next((r for r in rows if r['rounds'] == rounds and r['method'] == method), None)
      if row is None:
        cells.append('-')
        continue
      train = f" ({_format(*row['train_error'])})" if 'train_error' in row else ''
      seeds = f" [{row['seeds']} seeds]" if row['seeds'] > 1 else ''
      cells.append(f"{_format(*row['test_error'])}{train}{seeds}")
    lines.append(f'| {rounds} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def summary_markdown(runs: Sequence[Run]) -> str:
  """The short table for the README: final errors per group over seeds, and provenance."""
  return '\n'.join(_accuracy_lines(runs, SUMMARY_COLUMNS) + ['', provenance_line(runs)]) + '\n'


def sweep_section(runs: Sequence[Run]) -> str:
  """The budget sweep alone (for the README), with its runs' provenance."""
  rows = sweep_table(runs)
  if not rows:
    return ''
  swept = [r for r in runs if _BUDGET.match(r.group)]
  return sweep_markdown(rows) + '\n' + provenance_line(swept) + '\n'


def _kind_and_commit(run: Run) -> str:
  segments = run.summary.get('provenance') or []
  if not segments:
    return 'not recorded'
  first = segments[0]
  return f'{provenance.short_cpu(first)} ({provenance.short_commit(first)})'


_ROUNDS_IN_NAME = re.compile(r'_r(\d+)_seed\d+$')


def _budget_rounds(run: Run, suite_runs: dict[str, Run]) -> int:
  """The budget a run belongs to, in Parle rounds: from its name (``_r<rounds>``), else the
  rounds of its suite's Parle run of the same seed, else its own."""
  match = _ROUNDS_IN_NAME.search(run.name)
  if match:
    return int(match.group(1))
  seed = _SEED.search(run.name)
  parle = next((r for name, r in sorted(suite_runs.items()) if name.startswith('parle_') and
                seed and name.endswith(seed.group(0))), None)
  if parle is not None:
    match = _ROUNDS_IN_NAME.search(parle.name)
    if match:
      return int(match.group(1))
  return max(r['round'] for r in (parle or run).records)


def cpu_kinds_table(results_dir: str) -> list[dict[str, Any]]:
  """Committed runs beside their reruns on another CPU kind: final errors and differences.

  Reads ``<results_dir>/cpu_kinds/<suite>/<run>`` and pairs each with
  ``<results_dir>/<suite>/<run>``; the fields of their configs that both have
  must be equal (else they are not the same run and a ValueError says so). ``rounds`` is the
  budget in Parle rounds (SGD on the same total runs 3x as many of its own).
  """
  kinds_dir = os.path.join(results_dir, CPU_KINDS)
  if not os.path.isdir(kinds_dir):
    raise FileNotFoundError(f'no reruns in {kinds_dir}; run experiments.suite with '
                            f'--results_dir={kinds_dir} on another CPU kind first.')
  rows = []
  for suite in sorted(os.listdir(kinds_dir)):
    if not os.path.isdir(os.path.join(kinds_dir, suite)):
      continue
    committed = {r.name: r for r in load_runs(os.path.join(results_dir, suite))}
    for rerun in load_runs(os.path.join(kinds_dir, suite)):
      run = committed.get(rerun.name)
      if run is None:
        continue
      # Fields one config lacks were added to the code later (at the default that keeps the old
      # behaviour); the others must agree.
      differing = sorted(k for k in set(run.config) & set(rerun.config)
                         if k not in ('data_dir', 'progress_bar') and
                         run.config[k] != rerun.config[k])
      if differing:
        raise ValueError(f'{suite}/{rerun.name}: the rerun\'s config differs in {differing}.')
      row = {'suite': suite, 'run': rerun.name, 'rounds': _budget_rounds(run, committed),
             'kinds': (_kind_and_commit(run), _kind_and_commit(rerun))}
      for key in ('reference/test_error', 'reference/train_error'):
        if key in run.summary and key in rerun.summary:
          row[key] = (run.summary[key], rerun.summary[key],
                      rerun.summary[key] - run.summary[key])
      rows.append(row)
  return sorted(rows, key=lambda row: (row['rounds'], row['suite'], row['run']))


def cpu_kinds_markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The spread across CPU kinds: one row per rerun, and the largest difference per budget."""
  lines = ['| budget, rounds | run | committed run: CPU (commit) | test (train) error % | '
           'rerun: CPU (commit) | test (train) error % | difference, points |',
           '|' + '---|' * 7]
  for row in rows:
    test, train = row['reference/test_error'], row.get('reference/train_error')
    def cell(i):
      return f'{test[i]:.2f}' + (f' ({train[i]:.2f})' if train else '')
    difference = f'{test[2]:+.2f}' + (f' ({train[2]:+.2f})' if train else '')
    lines.append(f"| {row['rounds']} | {row['suite']}/{row['run']} | {row['kinds'][0]} | "
                 f"{cell(0)} | {row['kinds'][1]} | {cell(1)} | {difference} |")
  return '\n'.join(lines + ['', cpu_kinds_summary(rows)]) + '\n'


def cpu_kinds_summary(rows: Sequence[dict[str, Any]]) -> str:
  """One line: the largest difference of the final test error per budget, and the kinds."""
  largest = {}
  for row in rows:
    largest[row['rounds']] = max(largest.get(row['rounds'], 0.0),
                                 abs(row['reference/test_error'][2]))
  kinds = sorted({re.sub(r' \(.*\)$', '', kind) for row in rows for kind in row['kinds']})
  return ('Largest difference of the final test error between CPU kinds: ' + ', '.join(
      f'{value:.2f} points at {rounds} rounds' for rounds, value in sorted(largest.items())) +
      f" ({len(rows)} pairs of runs; {' and '.join([', '.join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)}).")


def _curves(members: Sequence[Run], x_key: str, y_key: str):
  """x (mean over seeds) and y (mean, min, max over seeds) at the shared evaluations."""
  evaluations = [run.evaluations() for run in members]
  count = min(len(e) for e in evaluations)
  x = np.mean([[r[x_key] for r in e[:count]] for e in evaluations], axis=0)
  y = np.asarray([[r[y_key] for r in e[:count]] for e in evaluations], np.float64)
  return x, y.mean(0), y.min(0), y.max(0)


PANELS = (  # (x key, y key, x label, y label, file name)
    ('train_seconds', 'reference/test_error', 'training time (s)', 'reference test error (%)',
     'test_error_vs_time.png'),
    ('effective_epochs', 'reference/test_error', 'effective epochs (passes per replica)',
     'reference test error (%)', 'test_error_vs_effective_epochs.png'),
    ('gradient_evaluations', 'reference/test_error', 'mini-batch gradients (all replicas)',
     'reference test error (%)', 'test_error_vs_gradients.png'),
    ('effective_epochs', 'distance/l2_mean', 'effective epochs (passes per replica)',
     'mean L2 distance of a replica to the reference', 'replica_distance.png'),
)


def figures(runs: Sequence[Run]) -> dict[str, Any]:
  """The results plots as matplotlib figures, keyed by their PNG file name."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = group_runs(runs)
  out = {}
  for x_key, y_key, x_label, y_label, file in PANELS:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for group, members in groups.items():
      if y_key == 'distance/l2_mean' and members[0].summary['num_replicas'] == 1:
        continue
      x, mean, low, high = _curves(members, x_key, y_key)
      line, = ax.plot(x, mean, marker='o', markersize=3, label=f'{group} ({len(members)})')
      if len(members) > 1:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title='run (seeds); band: min-max', title_fontsize=7)
    fig.tight_layout()
    out[file] = fig
  sweep = sweep_table(runs)
  if sweep:
    out['sweep.png'] = _sweep_figure(sweep, plt)
  return out


def _sweep_figure(rows: Sequence[dict[str, Any]], plt) -> Any:
  """Final test and train error of each method against the budget in rounds."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  for ax, key, label in ((axes[0], 'test_error', 'reference test error (%)'),
                         (axes[1], 'train_error', 'reference train error (%)')):
    for method in dict.fromkeys(row['method'] for row in rows):
      points = [r for r in rows if r['method'] == method and key in r]
      if not points:
        continue
      x = [r['rounds'] for r in points]
      mean = [r[key][0] for r in points]
      spread = [0.0 if np.isnan(r[key][1]) else r[key][1] for r in points]
      ax.errorbar(x, mean, yerr=spread, marker='o', markersize=4, capsize=3, label=method)
    ax.set_xscale('log')
    ax.set_xlabel('budget: rounds of L=25 mini-batches per replica')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot(runs: Sequence[Run], out_dir: str) -> list[str]:
  """Writes the results plots as PNG files; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  paths = []
  for file, fig in figures(runs).items():
    path = os.path.join(out_dir, file)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def report(results_dir: str, suite: str, write: bool = True) -> dict[str, str]:
  """Writes tables.md and the plots of a suite (unless `write` is False); returns its sections.

  Keys: ``''`` (the full tables, also in tables.md), ``'summary'`` and
  ``'sweep'`` (see the module docstring). For ``suite='cpu_kinds'``, ``''``
  (the spread across CPU kinds, also in ``cpu_kinds/tables.md``) and
  ``'summary'`` (its largest differences in one line).
  """
  suite_dir = os.path.join(results_dir, suite)
  if suite == CPU_KINDS:
    rows = cpu_kinds_table(results_dir)
    sections = {'': cpu_kinds_markdown(rows), 'summary': cpu_kinds_summary(rows) + '\n'}
  else:
    runs = load_suite(results_dir, suite)
    if not runs:
      raise FileNotFoundError(f'no finished runs in {suite_dir}; run experiments.suite first.')
    sections = {'': markdown(runs), 'summary': summary_markdown(runs),
                'sweep': sweep_section(runs)}
    flatness = report_flatness.load(suite_dir, [run.name for run in runs])
    if flatness:
      rows = report_flatness.table(group_runs(runs), flatness)
      # The README's section: the reference models. The full one adds their replicas and
      # the figures at other image counts.
      sections['flatness'] = report_flatness.markdown(
          [row for row in rows if row['models'] == 'reference'], flatness)
      sections[''] += ('\n### Flatness\n\n' + report_flatness.markdown(rows, flatness)
                       + report_flatness.examples_markdown(suite_dir, flatness))
    if write:
      plot(runs, suite_dir)
      if flatness:
        report_flatness.plot(flatness, suite_dir)
  if write:
    with open(os.path.join(suite_dir, 'tables.md'), 'w') as f:
      f.write(sections[''])
  return sections


def _markers(suite: str, section: str = '') -> tuple[str, str]:
  name = f'{suite}:{section}' if section else suite
  return f'<!-- BEGIN report:{name} -->', f'<!-- END report:{name} -->'


def update_between_markers(path: str, suite: str, text: str, section: str = '') -> None:
  """Replaces what stands between a suite's (section's) report markers in `path` by `text`."""
  begin, end = _markers(suite, section)
  with open(path) as f:
    content = f.read()
  if content.count(begin) != 1 or content.count(end) != 1 or (
      content.index(begin) > content.index(end)):
    raise ValueError(f'{path} must hold the markers {begin} and {end} once each, in order.')
  head, rest = content.split(begin)
  tail = rest.split(end)[1]
  with open(path, 'w') as f:
    f.write(f'{head}{begin}\n{text}{end}{tail}')


def update_files(paths: Sequence[str], suite: str, sections: dict[str, str]) -> list[str]:
  """Fills every section's markers found in `paths`; returns 'path:section' for each.

  A ValueError if none of the files holds any of the suite's markers.
  """
  done = []
  for path in paths:
    with open(path) as f:
      content = f.read()
    for section, text in sections.items():
      if _markers(suite, section)[0] in content:
        update_between_markers(path, suite, text, section)
        done.append(f'{path}:{section or "tables"}')
  if not done:
    raise ValueError(f'none of {list(paths)} holds a marker <!-- BEGIN report:{suite}[:section] '
                     '-->; sections: ' + ', '.join(s or '(none)' for s in sections) + '.')
  return done


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  sections = report(FLAGS.results_dir, FLAGS.suite)
  if FLAGS.readme:
    for done in update_files(FLAGS.readme, FLAGS.suite, sections):
      print(f'updated {done}')
  print(sections[''])


if __name__ == '__main__':
  define_flags()
  app.run(main)
