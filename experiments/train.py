"""Trains Parle or a baseline on a TFDS dataset; the experiments' one binary.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/run
  python -m experiments.train --config=experiments/configs/cifar10_wrn28_10.py \
      --workdir=/tmp/wrn --config.optimizer=sgd --config.epochs=200

The workdir receives ``config.json``, ``metrics.jsonl``, TensorBoard events
(``tensorboard/``), orbax checkpoints (``checkpoints/``) and the reference model
(``reference/``). Running again with the same workdir resumes from the newest
checkpoint and ends with the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import logging as std_logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

import parle_jax
from experiments import metric_writer, optimizers
from experiments.configs import base
from parle_jax import checkpoint, data, evaluate, models, training

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, checkpoints and the model.')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)


class DivergenceError(FloatingPointError):
  """Training produced a NaN or Inf; the last good checkpoint is kept."""


def data_dir(config) -> str:
  return (config.data_dir or os.environ.get('PARLE_DATA_DIR')
          or os.path.expanduser('~/tensorflow_datasets'))


class Experiment:
  """Everything a run needs, built from a validated config."""

  def __init__(self, config: ml_collections.ConfigDict):
    base.validate(config)
    self.config = config
    self.info = data.dataset_info(config.dataset)
    self.train_arrays = data.load(config.dataset, self.info.train_split, data_dir(config))
    self.test_arrays = data.load(config.dataset, self.info.test_split, data_dir(config))
    self.mean, self.std = data.channel_stats(self.train_arrays['image'])
    num_train = len(self.train_arrays['label'])
    self.plan = optimizers.make_plan(config, num_train, jax.device_count())
    self.replicas = parle_jax.Replicas(self.plan.num_replicas,
                                       devices=optimizers.select_devices(self.plan),
                                       mapping=self.plan.mapping)
    self.model = models.create_model(config.model, self.info.num_classes,
                                     **config.model_kwargs.to_dict())
    self.tx, couple = optimizers.make_optimizer(config, self.plan, self.replicas.axis_name)
    subsets = None
    if config.data_fraction < 1 and self.plan.optimizer != 'data_parallel_sgd':
      subsets = data.make_subsets(num_train, self.plan.num_replicas, config.data_fraction,
                                  config.seed)
    self.device_data = self.replicas.broadcast(
        data.device_data(self.train_arrays, self.mean, self.std, subsets))
    self.round_fn = parle_jax.make_round(
        training.classification_loss(self.model), self.tx, self.replicas,
        L=self.plan.steps_per_round, couple=couple,
        batch_fn=data.make_batch_fn(self.plan.batch_size, augment=config.augment))
    bn_count = config.bn_recompute_batches * self.plan.batch_size
    chosen = np.random.default_rng(config.seed).permutation(num_train)[:bn_count]
    self.bn_batches = data.normalize(self.train_arrays['image'][chosen], self.mean, self.std
                                     ).reshape((-1, self.plan.batch_size) + self.info.image_shape)

  def init_state(self) -> parle_jax.ReplicaState:
    params, model_state = training.init_replica_variables(
        self.model, jax.random.PRNGKey(self.config.seed), self.plan.num_replicas,
        self.info.image_shape, same_init=self.plan.same_init)
    local = self.replicas.local_replica_ids
    params, model_state = jax.tree.map(lambda x: np.asarray(x)[local], (params, model_state))
    return parle_jax.init_replicas(self.replicas, self.tx, params, model_state,
                                   seed=self.config.seed)

  def evaluate(self, state) -> dict[str, Any]:
    mapping = 'vmap' if self.round_fn.mapping == 'auto' else self.round_fn.mapping
    train_subset = None
    if self.config.train_eval_examples:
      train_subset = {k: v[:self.config.train_eval_examples] for k, v in self.train_arrays.items()}
    results = evaluate.evaluate(
        self.model, self.replicas, state, self.test_arrays, mean=self.mean, std=self.std,
        bn_batches=self.bn_batches, batch_size=self.config.eval_batch_size, mapping=mapping,
        train_arrays=train_subset)
    if self.config.train_eval_examples:
      results.update(evaluate.train_error_and_loss(
          self.model, self.replicas, state, self.train_arrays, mean=self.mean, std=self.std,
          batch_size=self.config.eval_batch_size,
          max_examples=self.config.train_eval_examples, mapping=mapping))
    return results

  def reference_variables(self, state) -> dict[str, Any]:
    """The reference model as plain Flax variables, BN statistics recomputed."""
    variables, _ = evaluate.reference_variables(self.model, self.replicas, state,
                                                self.bn_batches)
    return jax.device_get(variables)


def _first_non_finite(losses: np.ndarray, replica_ids: np.ndarray):
  """(replica, step in round) of the first NaN/Inf loss, or None."""
  bad = np.argwhere(~np.isfinite(losses.reshape(len(replica_ids), -1)))
  return None if not len(bad) else (int(replica_ids[bad[0][0]]), int(bad[0][1]))


def _round_summary(plan, rounds_done, losses, errors, images_per_second) -> dict[str, Any]:
  return {
      'epoch': plan.epochs(rounds_done),
      'effective_epochs': plan.effective_epochs(rounds_done),
      'gradient_evaluations': plan.gradient_evaluations(rounds_done),
      'train/loss': float(np.mean(losses)), 'train/error': 100 * float(np.mean(errors)),
      'images_per_second': images_per_second,
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains as `config` says, evaluating and checkpointing in `workdir`.

  Returns the last evaluation (test error of the reference model and of each
  replica and their ensemble, distances, train error) with the budget spent.
  """
  experiment = Experiment(config)
  plan, replicas = experiment.plan, experiment.replicas
  os.makedirs(workdir, exist_ok=True)
  config_json = config.to_json_best_effort(sort_keys=True)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                         max_to_keep=config.keep_checkpoints)
  state = experiment.init_state()
  start_round, train_seconds = 0, 0.0
  if checkpointer.latest_round() is not None:
    state, record = checkpointer.restore(state)
    start_round, train_seconds = record['round'], record.get('train_seconds', 0.0)
    logging.info('Resumed from the checkpoint after round %d in %s', start_round, workdir)
  elif jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_json)
  writer = metric_writer.MetricWriter(workdir, resume_round=start_round)
  logging.info('%s on %s: %s', plan.optimizer, replicas, plan)

  eval_every = config.eval_every_rounds or max(1, round(plan.rounds_per_epoch))
  samples_per_round = plan.steps_per_round * plan.batch_size * plan.num_replicas
  bar = tqdm.tqdm(total=plan.total_rounds, initial=start_round, unit='round',
                  disable=not config.progress_bar or jax.process_index() != 0,
                  dynamic_ncols=True)
  if start_round < plan.total_rounds:  # compile (and time the mappings) outside the clock
    warm_up_seconds = experiment.round_fn.warm_up(state, experiment.device_data)
    logging.info('compiled the round in %.1f s; mapping %s', warm_up_seconds,
                 experiment.round_fn.mapping)
  window_losses, window_errors, window_start = [], [], time.perf_counter()
  last_checkpoint, results = checkpointer.latest_round(), {}
  for rounds_done in range(start_round + 1, plan.total_rounds + 1):
    round_start = time.perf_counter()
    state, metrics = experiment.round_fn(state, experiment.device_data)
    losses = replicas.unshard(metrics['loss'])  # [n_local, L]; waits for the round
    train_seconds += time.perf_counter() - round_start
    bad = _first_non_finite(losses, replicas.local_replica_ids)
    if bad is not None:
      bar.close()
      raise DivergenceError(
          f'the loss became non-finite in round {rounds_done} (step {bad[1]} of the round) '
          f'on replica {bad[0]}; stopping. The last good checkpoint '
          f'(after round {last_checkpoint}) in {checkpointer.directory} is kept; '
          'lower config.learning_rate / config.inner_learning_rate and run again.')
    window_losses.append(losses)
    window_errors.append(replicas.unshard(metrics['error']))
    bar.update(1)
    final = rounds_done == plan.total_rounds
    if rounds_done % config.log_every_rounds == 0 or final:
      elapsed = time.perf_counter() - window_start
      summary = _round_summary(plan, rounds_done, window_losses, window_errors,
                               len(window_losses) * samples_per_round / elapsed)
      summary['train_seconds'] = train_seconds
      writer.write(rounds_done, summary)
      bar.set_postfix(epoch=f"{summary['epoch']:.2f}", loss=f"{summary['train/loss']:.3f}",
                      img_s=f"{summary['images_per_second']:.0f}")
      window_losses, window_errors, window_start = [], [], time.perf_counter()
    if rounds_done % eval_every == 0 or final:
      results = experiment.evaluate(state)
      writer.write(rounds_done, dict(results, epoch=plan.epochs(rounds_done),
                                     effective_epochs=plan.effective_epochs(rounds_done),
                                     gradient_evaluations=plan.gradient_evaluations(rounds_done),
                                     train_seconds=train_seconds))
      bar.write(f"round {rounds_done} (epoch {plan.epochs(rounds_done):.2f}): reference "
                f"test error {results['reference/test_error']:.2f}%, replicas "
                + ', '.join(f'{e:.2f}%' for e in results['replica/test_error']))
    if rounds_done % config.checkpoint_every_rounds == 0 or final:
      checkpointer.save(rounds_done, state, {'config': json.loads(config_json),
                                             'train_seconds': train_seconds})
      last_checkpoint = rounds_done
  bar.close()
  writer.close()
  if start_round == plan.total_rounds:  # nothing left to train: report the saved state
    results = experiment.evaluate(state)
  checkpointer.close()
  if jax.process_index() == 0:
    checkpoint.save_variables(os.path.join(workdir, 'reference'),
                              experiment.reference_variables(state))
  results = dict(results, optimizer=plan.optimizer, num_replicas=plan.num_replicas,
                 rounds=plan.total_rounds, epochs=plan.epochs(plan.total_rounds),
                 effective_epochs=plan.effective_epochs(plan.total_rounds),
                 gradient_evaluations=plan.gradient_evaluations(plan.total_rounds),
                 train_seconds=train_seconds, mapping=experiment.round_fn.mapping)
  print(f"{plan.optimizer} ({plan.num_replicas} replica{'s' * (plan.num_replicas > 1)}, "
        f"{results['effective_epochs']:.1f} effective epochs): reference test error "
        f"{results['reference/test_error']:.2f}%, ensemble {results['ensemble/test_error']:.2f}%")
  if config.compare_to_sgd and plan.optimizer != 'sgd':
    results['sgd_baselines'] = _compare_to_sgd(config, plan, results, workdir)
  return results


def sgd_config_with_same_budget(config, plan, *, per_replica: bool = False
                                ) -> ml_collections.ConfigDict:
  """SGD on one model with the mini-batch gradients `plan` spends.

  All of them (the same compute on one device), or with ``per_replica`` those
  of one replica (what ``n`` parallel workers do in the same wall-clock time).
  The learning rate drops at the same fractions of the run.
  """
  budget = plan.gradient_evaluations(plan.total_rounds)
  if per_replica:
    budget //= plan.num_replicas
  sgd = copy.deepcopy(config)
  with sgd.unlocked():
    sgd.optimizer, sgd.num_replicas, sgd.compare_to_sgd = 'sgd', None, False
    sgd.data_fraction = 1.0
    sgd.epochs = budget / plan.batches_per_epoch  # same batch size, one pass = nb steps
    scale = sgd.epochs / config.epochs
    sgd.lr_drop_epochs = tuple(e * scale for e in config.lr_drop_epochs)
    sgd.eval_every_rounds = 0  # once per SGD epoch, and at the end
  return sgd


def _compare_to_sgd(config, plan, results, workdir) -> dict[str, Any]:
  """Trains SGD on the same budgets and prints the comparison table."""
  runs = {}
  for name, per_replica in (('per_replica', True), ('total', False)):
    runs[name] = train_and_evaluate(
        sgd_config_with_same_budget(config, plan, per_replica=per_replica),
        os.path.join(workdir, f'sgd_{name}_budget'))
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
  # orbax logs every step of every save at INFO; keep its warnings only.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
