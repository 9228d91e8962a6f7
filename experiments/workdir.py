"""What a run writes into its ``--workdir``: the one place for the names.

=========================  ==========================================================
``config.json``            the run's config (written once the run is planned)
``metrics.jsonl``          one JSON record per log or evaluation (process 0)
``provenance.jsonl``       the commit, packages and CPU of each start or resume (process 0)
``tensorboard/``           the same records as TensorBoard events (process 0)
``checkpoints/<round>/``   orbax checkpoints of the whole replica state, with checksums
``checkpoints/corrupt/``   checkpoints that failed to read or verify, moved aside (kept)
``reference/``             the reference model as plain Flax variables
``flatness.json``          its curvature and sharpness (``experiments.landscape``)
``sgd_<budget>_budget/``   with ``compare_to_sgd``: the two SGD baselines, each a workdir
``lock.<process>``         held (``fcntl.flock``) by each process of the run that owns it
=========================  ==========================================================

The lock files stay behind when a run ends (an unheld lock file blocks
nothing) and ``--overwrite`` leaves them alone.
"""

from __future__ import annotations

import os

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
PROVENANCE = 'provenance.jsonl'  # see experiments.provenance
TENSORBOARD = 'tensorboard'
CHECKPOINTS = 'checkpoints'
REFERENCE = 'reference'
FLATNESS = 'flatness.json'  # see experiments.landscape
LOCK = 'lock'  # lock.<process index>: see experiments.faults.WorkdirLock
SGD_BUDGETS = ('per_replica', 'total')  # the SGD baselines of compare_to_sgd


def sgd_baseline(budget: str) -> str:
  """The sub-workdir of the SGD baseline on `budget` (one of :data:`SGD_BUDGETS`)."""
  if budget not in SGD_BUDGETS:
    raise ValueError(f'budget={budget!r}: choose one of {SGD_BUDGETS}.')
  return f'sgd_{budget}_budget'


# Everything a run writes: what --overwrite deletes.
OUTPUTS = (CHECKPOINTS, TENSORBOARD, REFERENCE, FLATNESS, METRICS, PROVENANCE, CONFIG) + tuple(
    sgd_baseline(budget) for budget in SGD_BUDGETS)


def path(workdir: str, name: str) -> str:
  """``<workdir>/<name>`` for one of the names above."""
  return os.path.join(workdir, name)


def lock_file(workdir: str, process_index: int) -> str:
  """``<workdir>/lock.<process_index>``: what that process locks while its run owns `workdir`."""
  return os.path.join(workdir, f'{LOCK}.{process_index}')


def lock_files(workdir: str) -> list[str]:
  """The lock files in `workdir` (of any process, held or not), by process index."""
  try:
    names = os.listdir(workdir)
  except OSError:  # no workdir yet (or not a directory: refused elsewhere)
    return []
  indices = sorted(int(name[len(LOCK) + 1:]) for name in names
                   if name.startswith(f'{LOCK}.') and name[len(LOCK) + 1:].isdigit())
  return [lock_file(workdir, index) for index in indices]
