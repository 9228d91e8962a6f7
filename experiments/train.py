"""Trains Parle or a baseline on a TFDS dataset; the experiments' one binary.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/run
  python -m experiments.train --config=experiments/configs/cifar10_wrn28_10.py \
      --workdir=/tmp/wrn --config.optimizer=sgd --config.epochs=200

The workdir receives ``config.json``, ``metrics.jsonl``, TensorBoard events
(``tensorboard/``), orbax checkpoints (``checkpoints/``) and the reference model
(``reference/``). Running again with the same workdir resumes from the newest
checkpoint that reads and verifies (one that does not is moved to
``checkpoints/corrupt/``, with a warning) and ends with the same numbers as an
uninterrupted run; a workdir holding a run of another config is refused unless
``--overwrite`` is given, and one that another run holds (its ``lock.<process>``
files) is refused in any case.

Several processes (hosts) run one job with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (see :mod:`experiments.distributed`).

Exit status: 0 done; 1 an error: bad input (config, flags, data, workdir, a
full disk) prints one line saying what to fix (``--verbosity=1`` adds the
traceback), a bug its traceback; 3 (``faults.EXIT_DIVERGED``) a NaN/Inf in a
replica's loss or params, the last good checkpoint kept; 75
(``faults.EXIT_INTERRUPTED``) SIGTERM/SIGINT, a checkpoint saved at the end of
the round, run again to resume; 130 a second SIGINT, stopped at once; 69
(``distributed.EXIT_PEER_LOST``) a collective failed because another process
died (JAX may instead abort the process, status 134, when its heartbeats stop).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import distributed, errors, faults, loop, metric_writer, optimizers, provenance
from experiments.experiment import (  # re-exported: train.Experiment etc.
    Experiment, data_dir, quiet_orbax_logs, started_with)  # pylint: disable=unused-import
from experiments import workdir as workdir_lib
from experiments.configs import base
from parle_jax import checkpoint

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints and the model.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache_dir', None,
    "JAX's persistent compilation cache, so that a rerun or resumed run does not compile its "
    "rounds again; default $PARLE_COMPILATION_CACHE or ~/.cache/parle_jax/jax; '' turns it off. "
    'Off in multi-process CPU runs (see distributed.enable_compilation_cache).')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Delete the outputs of a previous run in --workdir and start afresh '
    '(without it, a workdir holding a run of another config is refused).')

DivergenceError = faults.DivergenceError
TrainingInterrupted = faults.TrainingInterrupted
ConfigMismatchError = faults.ConfigMismatchError


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overwrite: bool = False, stop_after_round: Optional[int] = None,
                       started: Optional[dict[str, str]] = None) -> dict[str, Any]:
  """Trains as `config` says, evaluating and checkpointing in `workdir`.

  `stop_after_round` ends the run after that many rounds of the plan (its
  schedules unchanged), evaluating there: what :mod:`experiments.replay` runs.
  `started` gives the ``mapping`` and ``conv`` that a logged run chose.

  With several processes (:mod:`experiments.distributed`), every process calls
  this; process 0 writes the files other than checkpoints.

  Returns the last evaluation (test error of the reference model and of each
  replica and their ensemble, distances, train error) with the budget spent.

  Raises:
    errors.ConfigError: (a ValueError) for an invalid config, or one that does
      not fit the data or devices (naming the field, its value and what is
      allowed); :class:`ConfigMismatchError` if `workdir` holds a run of
      another config and not `overwrite`. Nothing is written into `workdir`
      until the run is planned.
    errors.WorkdirError: `workdir` is a file, cannot be written, or holds a
      corrupt ``config.json``; no checkpoint in it reads and verifies (those
      that fail are moved to ``checkpoints/corrupt/``); or another run holds
      it (:class:`faults.WorkdirLockedError`, before anything is read or
      written: a run holds its workdir from before its first write to its end).
    DivergenceError: when a replica's loss or params become NaN/Inf (with
      ``config.on_divergence='rollback'``: again after ``config.max_rollbacks``
      rollbacks); the last good checkpoint is kept.
    TrainingInterrupted: after SIGTERM/SIGINT, once the round ended and a
      checkpoint was saved.
  """
  with errors.config_errors():
    base.validate(config)
  config_json = config.to_json_best_effort(sort_keys=True)
  with contextlib.ExitStack() as holding:
    with faults.StopSignals() as signals:
      faults.check_not_locked(workdir)  # another run writes there: touch nothing
      record = faults.check_workdir(workdir, config_json, overwrite=overwrite)  # before the data
      experiment = Experiment(config, **(started or started_with(config, record)))  # no writes
      if stop_after_round is not None:
        if not 0 < stop_after_round <= experiment.plan.total_rounds:
          raise errors.ConfigError(f'stop_after_round={stop_after_round} (a replay\'s --rounds) is '
                                   f'outside the plan\'s rounds 1..{experiment.plan.total_rounds}.')
        experiment.plan = dataclasses.replace(experiment.plan, total_rounds=stop_after_round)
      holding.enter_context(faults.WorkdirLock(workdir))  # held until the end, before any write
      checkpointer = faults.open_workdir(workdir, config_json, overwrite=overwrite,
                                         keep_checkpoints=config.keep_checkpoints)
      try:
        state, results, train_seconds = loop.TrainingLoop(experiment, workdir, config_json,
                                                          checkpointer, signals).run()
      finally:
        checkpointer.close()
    return _finish(config, experiment, state, results, train_seconds, workdir)


def _finish(config, experiment, state, results, train_seconds, workdir) -> dict[str, Any]:
  """Saves the reference model, prints the result and trains the SGD baselines if asked."""
  plan = experiment.plan
  variables = experiment.reference_variables(state)  # one all-reduce: on every process
  checkpoint.save_variables(workdir_lib.path(workdir, workdir_lib.REFERENCE), variables)
  results = dict(results, optimizer=plan.optimizer, num_replicas=plan.num_replicas,
                 rounds=plan.total_rounds, epochs=plan.epochs(plan.total_rounds),
                 effective_epochs=plan.effective_epochs(plan.total_rounds),
                 gradient_evaluations=plan.gradient_evaluations(plan.total_rounds),
                 train_seconds=train_seconds, mapping=experiment.round_fn.mapping,
                 conv=experiment.conv,
                 compile_seconds=sum(experiment.round_fn.compile_seconds.values()),
                 provenance=provenance.read(workdir))
  if distributed.is_primary():
    print(f"{plan.optimizer} ({plan.num_replicas} replica{'s' * (plan.num_replicas > 1)}, "
          f"{results['effective_epochs']:.1f} effective epochs): reference test error "
          f"{results['reference/test_error']:.2f}%, ensemble "
          f"{results['ensemble/test_error']:.2f}%")
  if config.compare_to_sgd and plan.optimizer != 'sgd':
    results['sgd_baselines'] = _compare_to_sgd(config, plan, results, workdir)
  return results


def _compare_to_sgd(config, plan, results, workdir) -> dict[str, Any]:
  """Trains SGD on the same budgets and prints the comparison table."""
  runs = {}
  for name in workdir_lib.SGD_BUDGETS:
    runs[name] = train_and_evaluate(
        optimizers.sgd_config_with_same_budget(config, plan, per_replica=name == 'per_replica'),
        workdir_lib.path(workdir, workdir_lib.sgd_baseline(name)))
  total = plan.gradient_evaluations(plan.total_rounds)
  rows = [(f'{plan.optimizer} n={plan.num_replicas} (reference model)', total,
           results['reference/test_error']),
          ('sgd, the mini-batches of one replica', total // plan.num_replicas,
           runs['per_replica']['reference/test_error']),
          ('sgd, the same total', total, runs['total']['reference/test_error'])]
  print(f"\n{'run':<40} {'mini-batch gradients':>20} {'test error':>11}")
  for name, gradients, error in rows:
    print(f'{name:<40} {gradients:>20} {error:>10.2f}%')
  return runs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _WORKDIR.value is None or _CONFIG.value is None:
    raise app.UsageError('--config and --workdir are required.')
  quiet_orbax_logs()
  metric_writer.tensorboard_without_tensorflow()  # 9 s less per process

  def run():
    with errors.config_errors():
      distributed.initialize()  # several processes if the flags or the environment say so
    distributed.enable_compilation_cache(_COMPILATION_CACHE.value)
    if not distributed.is_primary():
      logging.set_verbosity(logging.WARNING)  # process 0 tells the story
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)

  return faults.exit_code(run, workdir=_WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags)
