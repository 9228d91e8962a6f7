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
import copy
import dataclasses
import logging as std_logging
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import parle_jax
from experiments import distributed, errors, faults, loop, optimizers, provenance
from experiments import workdir as workdir_lib
from experiments.configs import base
from parle_jax import checkpoint, data, evaluate, models, training
from parle_jax import conv as conv_lib

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


def data_dir(config) -> str:
  return (config.data_dir or os.environ.get('PARLE_DATA_DIR')
          or os.path.expanduser('~/tensorflow_datasets'))


class Experiment:
  """Everything a run needs, built from a validated config.

  `mapping` and `conv`, when given, replace config.mapping and config.conv
  (a resumed run keeps what it started with, see :func:`started_with`).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, mapping: Optional[str] = None,
               conv: Optional[str] = None):
    with errors.config_errors():  # a ValueError here is a setting that does not fit
      base.validate(config)
      self.config = config
      self.conv = conv_lib.resolve_conv(conv or config.conv)
      self.info = data.dataset_info(config.dataset)
      self.train_arrays, self.test_arrays = distributed.primary_first(  # prepares data once
          lambda: [data.load(config.dataset, split, data_dir(config))
                   for split in (self.info.train_split, self.info.test_split)], 'data')
      self.mean, self.std = data.channel_stats(self.train_arrays['image'])
      num_train = len(self.train_arrays['label'])
      self.plan = optimizers.make_plan(config, num_train, jax.device_count())
      self.replicas = parle_jax.Replicas(self.plan.num_replicas,
                                         devices=optimizers.select_devices(self.plan),
                                         mapping=mapping or self.plan.mapping,
                                       device_map=config.device_map)
      if config.compare_to_sgd and jax.process_count() > 1:
        raise ValueError(
            f'config.compare_to_sgd=True is invalid with {jax.process_count()} processes: '
            'SGD trains one model on one device; run the SGD baselines on their own.')
    self.model = models.create_model(config.model, self.info.num_classes, conv=self.conv,
                                     **config.model_kwargs.to_dict())
    subsets = None
    if config.data_fraction < 1 and self.plan.optimizer != 'data_parallel_sgd':
      subsets = data.make_subsets(num_train, self.plan.num_replicas, config.data_fraction,
                                  config.seed)
    self.device_data = self.replicas.broadcast(
        data.device_data(self.train_arrays, self.mean, self.std, subsets))
    self.tx, self.round_fn = self._build_round(config)
    bn_count = config.bn_recompute_batches * self.plan.batch_size
    chosen = np.random.default_rng(config.seed).permutation(num_train)[:bn_count]
    self.bn_batches = data.normalize(self.train_arrays['image'][chosen], self.mean, self.std
                                     ).reshape((-1, self.plan.batch_size) + self.info.image_shape)

  def _build_round(self, config, mapping=None):
    tx, couple = optimizers.make_optimizer(config, self.plan, self.replicas.axis_name)
    round_fn = parle_jax.make_round(
        training.classification_loss(self.model), tx, self.replicas,
        L=self.plan.steps_per_round, couple=couple, mapping=mapping,
        batch_fn=data.make_batch_fn(self.plan.batch_size, augment=config.augment))
    return tx, round_fn

  def scale_learning_rates(self, scale: float) -> None:
    """Rebuilds the round with config.learning_rate and inner_learning_rate times `scale`."""
    config = copy.deepcopy(self.config)
    config.learning_rate *= scale
    config.inner_learning_rate *= scale
    self.tx, self.round_fn = self._build_round(config, self.round_fn.chosen_mapping)

  def init_state(self) -> parle_jax.ReplicaState:
    params, model_state = training.init_replica_variables(
        self.model, jax.random.PRNGKey(self.config.seed), self.plan.num_replicas,
        self.info.image_shape, same_init=self.plan.same_init)
    local = self.replicas.local_replica_ids
    params, model_state = jax.tree.map(lambda x: np.asarray(x)[local], (params, model_state))
    return parle_jax.init_replicas(self.replicas, self.tx, params, model_state,
                                   seed=self.config.seed)

  def evaluate(self, state) -> dict[str, Any]:
    mapping = self.round_fn.chosen_mapping or 'vmap'  # before any round: 'auto' measured nothing
    train_subset = None
    if self.config.train_eval_examples:
      train_subset = {k: v[:self.config.train_eval_examples] for k, v in self.train_arrays.items()}
    results = evaluate.evaluate(
        self.model, self.replicas, state, self.test_arrays, mean=self.mean, std=self.std,
        bn_batches=self.bn_batches, batch_size=self.config.eval_batch_size, mapping=mapping,
        train_arrays=train_subset)
    if train_subset is not None:
      results.update(evaluate.train_error_and_loss(
          self.model, self.replicas, state, train_subset, mean=self.mean, std=self.std,
          batch_size=self.config.eval_batch_size, mapping=mapping))
    return results

  def reference_variables(self, state) -> dict[str, Any]:
    """The reference model as plain Flax variables, BN statistics recomputed."""
    variables, _ = evaluate.reference_variables(self.model, self.replicas, state,
                                                self.bn_batches)
    return jax.device_get(variables)


def started_with(config: ml_collections.ConfigDict, record: dict) -> dict[str, str]:
  """The replica mapping and convolutions a resumed run keeps: those of its checkpoint.

  ``'auto'`` in the config resumes with what it chose at the start (measured
  then, not again); another explicit choice is used, with a warning that the
  numbers will differ from an uninterrupted run's by float rounding.
  """
  kept = {}
  for field in ('mapping', 'conv'):
    started = record.get(field)
    if started is None:
      continue
    if config[field] in ('auto', started):
      kept[field] = started
    else:
      logging.warning('config.%s=%r, but this run started with %r: resuming with %r, so its '
                      "numbers will differ from an uninterrupted run's by float rounding.",
                      field, config[field], started, config[field])
  return kept


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
          raise ValueError(f'stop_after_round={stop_after_round} is outside the plan\'s rounds '
                           f'1..{experiment.plan.total_rounds}.')
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


def quiet_orbax_logs() -> None:
  """Keeps only orbax's warnings in the absl log (it logs every step of every save at INFO).

  Also drops the noise of a save that failed for a full disk, which
  :func:`faults.exit_code` reports in one line (:func:`errors.quiet_failed_saves`).
  """
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname)
  errors.quiet_failed_saves()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _WORKDIR.value is None or _CONFIG.value is None:
    raise app.UsageError('--config and --workdir are required.')
  quiet_orbax_logs()

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
