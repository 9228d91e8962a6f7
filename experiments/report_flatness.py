"""The flatness table and plots of a suite, from the ``flatness.json`` of its runs.

:mod:`experiments.report` calls this for every suite whose runs carry a
``flatness.json`` (written by ``experiments.suite --landscape``, see
:mod:`experiments.landscape`). Rows are the report's groups (runs that differ
only in the seed), with mean ± sample standard deviation over seeds; runs of
several replicas add a row for their replicas (the mean over replicas per seed,
then over seeds). Two plots: the Hessian's spectral density of each Parle
reference against the SGD reference it was joined to, and the loss along a
filter-normalised random direction and along the segment between the two.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np
from scipy import stats

from experiments import provenance

FLATNESS = 'flatness.json'
_SEED = re.compile(r'_seed(\d+)$')
COLUMNS = (  # (header, key in a model's figures)
    ('top eigenvalue', 'top_eigenvalue'), ('5th eigenvalue', 'fifth_eigenvalue'),
    ('trace', 'trace'), ('sharpness (worst)', 'sharpness_worst'),
    ('sharpness (random)', 'sharpness_random'), ('Gibbs loss', 'local_entropy_loss'),
    ('loss', 'loss'),
)


def load(suite_dir: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
  """``{run name: flatness.json}`` for the runs in `names` that have one."""
  found = {}
  for name in names:
    path = os.path.join(suite_dir, name, FLATNESS)
    if os.path.isfile(path):
      with open(path) as f:
        found[name] = json.load(f)
  return found


_SCALARS = ('loss', 'trace', 'sharpness_worst', 'sharpness_random', 'local_entropy_loss',
            'local_entropy_distance')


def _figures(model: dict[str, Any]) -> dict[str, float]:
  values = {key: model[key] for key in _SCALARS}
  values['top_eigenvalue'] = model['top_eigenvalues'][0]
  values['fifth_eigenvalue'] = model['top_eigenvalues'][-1]
  return values


def _cell(values: Sequence[float], mean_format: str = '.3g', std_format: str = '.2g') -> str:
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f'{values[0]:{mean_format}}'
  return f'{values.mean():{mean_format}} ± {values.std(ddof=1):{std_format}}'


def table(groups: dict[str, Sequence[Any]], flatness: dict[str, dict[str, Any]]
          ) -> list[dict[str, Any]]:
  """Rows ``{'group', 'models', 'seeds', 'test_error', <figure>: [per seed]}``.

  `groups` maps a group name to its runs (objects with ``name`` and ``summary``).
  """
  rows = []
  for group, runs in groups.items():
    measured = [run for run in runs if run.name in flatness]
    if not measured:
      continue
    for models in ('reference', 'replicas'):
      per_seed: dict[str, list[float]] = {}
      for run in measured:
        found = flatness[run.name]['models']
        chosen = ([found['reference']] if models == 'reference' else
                  [v for k, v in sorted(found.items()) if k.startswith('replica_')])
        if not chosen:
          break
        for key, value in _figures(chosen[0]).items():
          per_seed.setdefault(key, []).append(
              float(np.mean([_figures(model)[key] for model in chosen])))
      else:
        errors = ([run.summary['reference/test_error'] for run in measured]
                  if models == 'reference' else
                  [float(np.mean(run.summary['replica/test_error'])) for run in measured])
        rows.append(dict(per_seed, group=group, models=models, seeds=len(measured),
                         test_error=errors))
  return rows


def markdown(rows: Sequence[dict[str, Any]], flatness: dict[str, dict[str, Any]]) -> str:
  """The flatness table, its settings and where the figures came from."""
  if not rows:
    return ''
  header = ['method', 'model', 'seeds', 'test error %'] + [name for name, _ in COLUMNS]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows:
    cells = [row['group'], row['models'], str(row['seeds']),
             _cell(row['test_error'], '.2f', '.2f')]  # as the accuracy tables
    cells += [_cell(row[key]) if key in row else '' for _, key in COLUMNS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  first = next(iter(flatness.values()))
  settings = first['settings']
  gammas = sorted({round(f['gamma'], 6) for f in flatness.values()})
  records = [[f['provenance']] for f in flatness.values()]
  lines += ['', f"Hessian figures on {settings['examples']:,} training images in eval mode "
            f"(batch-norm statistics fixed): the {settings['num_eigenvalues']} largest eigenvalues "
            f"(Lanczos, "
            f"{settings['lanczos_iterations']} steps), the trace (Hutchinson, "
            f"{settings['trace_samples']} probes); sharpness: the loss increase within a "
            f"per-filter ball of radius {settings['radius']} (worst by {settings['ascent_steps']} "
            f"ascent steps, random over {settings['random_perturbations']} directions); "
            f"Gibbs loss: "
            f"the mean loss of a Langevin chain ({settings['langevin_steps']} steps) around the "
            f"model at gamma = {', '.join(f'{g:.4g}' for g in gammas)}. "
            f'Measured on {provenance.describe_runs(records)}.', '']
  correlations = correlations_markdown(rows)
  return '\n'.join(lines) + (f'\n{correlations}' if correlations else '')


RANKED = (('top eigenvalue', 'top_eigenvalue'), ('trace', 'trace'),
          ('sharpness (worst)', 'sharpness_worst'), ('sharpness (random)', 'sharpness_random'),
          ('Gibbs loss', 'local_entropy_loss'), ('loss', 'loss'))


def rank_correlations(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Spearman's rank correlation, across methods, of each figure with the test error.

  One point per method: the mean over seeds of its reference model (the
  ``'reference'`` rows of :func:`table`). Positive: the lower the figure (the
  flatter, for curvature and sharpness), the lower the test error. Empty with
  fewer than 3 methods.
  """
  references = [row for row in rows if row['models'] == 'reference']
  if len(references) < 3:
    return {}
  errors = [np.mean(row['test_error']) for row in references]
  return {key: float(stats.spearmanr([np.mean(row[key]) for row in references], errors).statistic)
          for _, key in RANKED}


def correlations_markdown(rows: Sequence[dict[str, Any]]) -> str:
  """One line: :func:`rank_correlations` of the table's methods ('' for fewer than 3)."""
  found = rank_correlations(rows)
  if not found:
    return ''
  methods = sum(row['models'] == 'reference' for row in rows)
  cells = ', '.join(f'{name} {found[key]:+.2f}' for name, key in RANKED)
  return (f"Spearman's rank correlation with the test error across the {methods} methods' "
          f'reference models (positive: the lower the figure, the lower the error): {cells}.\n')


_OTHER_EXAMPLES = re.compile(r'^flatness_(\d+)\.json$')
COMPARED = (('loss', 'loss'), ('top eigenvalue', 'top_eigenvalue'),
            ('5th eigenvalue', 'fifth_eigenvalue'), ('trace', 'trace'),
            ('sharpness (worst)', 'sharpness_worst'), ('sharpness (random)', 'sharpness_random'),
            ('Gibbs loss', 'local_entropy_loss'), ('distance to <y>', 'local_entropy_distance'))


def examples_markdown(suite_dir: str, flatness: dict[str, dict[str, Any]]) -> str:
  """The reference's figures of ``flatness.json`` beside those of ``flatness_<examples>.json``."""
  lines = []
  for name, found in sorted(flatness.items()):
    others = sorted((int(m.group(1)), f) for f in os.listdir(os.path.join(suite_dir, name))
                    if (m := _OTHER_EXAMPLES.match(f)))
    if not others:
      continue
    columns = [(found['settings']['examples'], found)]
    for _, file in others:
      with open(os.path.join(suite_dir, name, file)) as f:
        other = json.load(f)
      columns.append((other['settings']['examples'], other))
    header = ['figure'] + [f'{examples:,} images' for examples, _ in columns]
    lines += [f'{name}, reference model, by the number of training images:', '',
              '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for label, key in COMPARED:
      values = [_figures(c['models']['reference'])[key] for _, c in columns]
      lines.append('| ' + ' | '.join([label] + [f'{v:.4g}' for v in values]) + ' |')
    seconds = ', '.join(f"{c['seconds']:.0f} s" for _, c in columns)
    lines += ['', f'Measured in {seconds}.', '']
  return '\n'.join(lines)


def _pairs(flatness: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
  """(Parle run, the run it was joined to) for every measured run with a segment."""
  pairs = []
  for name, found in sorted(flatness.items()):
    other = os.path.basename(found.get('against', {}).get('workdir', ''))
    if other in flatness:
      pairs.append((name, other))
  return pairs


def plot(flatness: dict[str, dict[str, Any]], out_dir: str) -> list[str]:
  """Writes ``spectral_density.png`` and ``loss_paths.png``; returns their paths ([] if no pair)."""
  pairs = _pairs(flatness)
  if not pairs:
    return []
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  # One color per method (the seeds' lines share it), each named once in the legend.
  groups = sorted({_SEED.sub('', run) for pair in pairs for run in pair})
  colors = {group: f'C{i}' for i, group in enumerate(groups)}
  runs = sorted({run for pair in pairs for run in pair})

  def draw(ax, run, x, y, labelled):
    group = _SEED.sub('', run)
    ax.plot(x, y, color=colors[group], alpha=0.8,
            label=group if group not in labelled else None)
    labelled.add(group)

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  labelled: set[str] = set()
  for run in runs:
    density = flatness[run]['models']['reference']['density']
    draw(ax, run, density['grid'], np.maximum(density['density'], 1e-12), labelled)
  ax.set_yscale('log')
  ax.set_ylim(bottom=1e-6)
  ax.set_xlabel('Hessian eigenvalue')
  ax.set_ylabel('density (SLQ)')
  ax.set_title('Spectral density of the reference models, one line per seed')
  ax.legend()
  fig.tight_layout()
  paths = [os.path.join(out_dir, 'spectral_density.png')]
  fig.savefig(paths[0], dpi=110)
  plt.close(fig)

  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  labelled = set()
  for run in runs:
    line = flatness[run]['models']['reference']['random_direction']
    draw(left, run, line['t'], line['loss'], labelled)
  labelled = set()
  for name, other in pairs:
    segment = flatness[name]['against']
    # alpha = 0 is the Parle run, 1 the other: drawn from the other (0) to the Parle run (1).
    draw(right, name, 1 - np.asarray(segment['alpha']), segment['loss'], labelled)
  left.set_xlabel('t (params + t * filter-normalised random direction)')
  left.set_ylabel('training loss (BN statistics recomputed)')
  left.set_yscale('log')
  left.legend()
  others = sorted({_SEED.sub('', other) for _, other in pairs})
  right.set_xlabel(f"0 = {', '.join(others)}, 1 = the method of the line")
  right.set_title('the straight path between the two, one line per seed')
  right.legend()
  fig.tight_layout()
  paths.append(os.path.join(out_dir, 'loss_paths.png'))
  fig.savefig(paths[1], dpi=110)
  plt.close(fig)
  return paths
