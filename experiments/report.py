"""Rebuilds the results tables and plots from the raw files of a suite.

  python -m experiments.report --suite=fashion_mnist_lenet_cpu

Reads ``<results_dir>/<suite>/<run>/{config.json,metrics.jsonl,summary.json}``
as :mod:`experiments.suite` leaves them, and writes
``<results_dir>/<suite>/tables.md`` and the plots ``<results_dir>/<suite>/*.png``.
Every number comes from those files; runs that differ only in the seed form one
row (mean and sample standard deviation over seeds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional, Sequence

import numpy as np
from absl import app, flags

from experiments import provenance, workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('results_dir', 'experiments/results', 'Suites live here.')
  flags.DEFINE_string('suite', 'fashion_mnist_lenet_cpu', 'Which suite to report.')
  flags.DEFINE_string('readme', None, 'Also replace the tables between the markers '
                      '<!-- BEGIN report:<suite> --> and <!-- END report:<suite> --> in this file.')

_SEED = re.compile(r'_seed(\d+)$')
_BUDGET = re.compile(r'^(.*)_r(\d+)$')  # budget-sweep groups: <method>_r<rounds>
GROUP_ORDER = ('parle_n3', 'entropy_sgd_n1', 'elastic_sgd_n3', 'sgd_n1', 'data_parallel_sgd_n3',
               'local_sgd_n3', 'diloco_n3')
REFERENCE_BASELINE = 'sgd_n1'  # time to accuracy: to reach this group's final test error


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


def markdown(runs: Sequence[Run]) -> str:
  """The accuracy and time-to-accuracy tables as Markdown, each with its runs' provenance."""
  lines = ['| run | replicas | data per replica | seeds | reference test error % | '
           'reference train error % | mean replica test error % | ensemble test error % | '
           'mini-batch gradients | effective epochs | training s | load | machine |',
           '|' + '---|' * 13]
  for row in accuracy_table(runs):
    train = _format(*row['reference_train_error']) if 'reference_train_error' in row else '-'
    lines.append(
        f"| {row['run']} | {row['replicas']} | {100 * row['data_fraction']:.0f}% | "
        f"{row['seeds']} | {_format(*row['reference_test_error'])} | {train} | "
        f"{_format(*row['replica_test_error'])} | {_format(*row['ensemble_test_error'])} | "
        f"{row['gradient_evaluations']} | {row['effective_epochs']:.2f} | "
        f"{_format(*row['train_seconds'], digits=0)} | {row['load_average']:.1f} | "
        f"{row['machine']} |")
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


def report(results_dir: str, suite: str) -> str:
  """Writes tables.md and the plots of a suite; returns the Markdown."""
  suite_dir = os.path.join(results_dir, suite)
  runs = load_runs(suite_dir)
  if not runs:
    raise FileNotFoundError(f'no finished runs in {suite_dir}; run experiments.suite first.')
  text = markdown(runs)
  with open(os.path.join(suite_dir, 'tables.md'), 'w') as f:
    f.write(text)
  plot(runs, suite_dir)
  return text


def update_between_markers(path: str, suite: str, text: str) -> None:
  """Replaces what stands between a suite's report markers in `path` by `text`."""
  begin, end = f'<!-- BEGIN report:{suite} -->', f'<!-- END report:{suite} -->'
  with open(path) as f:
    content = f.read()
  if content.count(begin) != 1 or content.count(end) != 1 or (
      content.index(begin) > content.index(end)):
    raise ValueError(f'{path} must hold the markers {begin} and {end} once each, in order.')
  head, rest = content.split(begin)
  tail = rest.split(end)[1]
  with open(path, 'w') as f:
    f.write(f'{head}{begin}\n{text}{end}{tail}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  text = report(FLAGS.results_dir, FLAGS.suite)
  if FLAGS.readme:
    update_between_markers(FLAGS.readme, FLAGS.suite, text)
  print(text)


if __name__ == '__main__':
  define_flags()
  app.run(main)
