"""What a run is made of, built from its config: data, plan, replicas, model and round.

:class:`Experiment` is what :mod:`experiments.train` trains and what
:mod:`experiments.landscape` rebuilds from a finished run's workdir. This
module defines no flags, so that every binary can import it.
"""

from __future__ import annotations

import copy
import logging as std_logging
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

import parle_jax
from experiments import distributed, errors, optimizers
from experiments.configs import base
from parle_jax import data, evaluate, models, training
from parle_jax import conv as conv_lib


def data_dir(config) -> str:
  return (config.data_dir or os.environ.get('PARLE_DATA_DIR')
          or os.path.expanduser('~/tensorflow_datasets'))


def _first(arrays: dict[str, np.ndarray], count: int, field: str, split: str
           ) -> dict[str, np.ndarray]:
  """The first `count` examples of `arrays` (0: all); a ValueError if it holds fewer."""
  held = len(arrays['label'])
  if count > held:
    raise ValueError(f'config.{field}={count} is invalid: {split} holds {held} examples '
                     '(0: all of them).')
  return {k: v[:count] for k, v in arrays.items()} if count else arrays


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
      self.test_arrays = _first(self.test_arrays, config.test_examples, 'test_examples',
                                f'the {config.dataset} test split')
      self.mean, self.std = data.channel_stats(self.train_arrays['image'])
      num_train = len(self.train_arrays['label'])
      island = config.devices_per_replica
      self.plan = optimizers.make_plan(config, num_train, max(1, jax.device_count() // island))
      self.replicas = parle_jax.Replicas(
          self.plan.num_replicas, devices=optimizers.select_devices(self.plan, island),
          mapping=mapping or self.plan.mapping, devices_per_replica=island,
          device_map=None if config.device_map == 'auto' else config.device_map)
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
    loss_fn = training.classification_loss(
        self.model, batch_norm_axis_name=self.replicas.data_axis_name)
    round_fn = parle_jax.make_round(
        loss_fn, tx, self.replicas,
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


def quiet_orbax_logs() -> None:
  """Keeps only orbax's warnings in the absl log (it logs every step of every save at INFO).

  Also drops the noise of a save that failed for a full disk, which
  :func:`faults.exit_code` reports in one line (:func:`errors.quiet_failed_saves`).
  """
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname)
  errors.quiet_failed_saves()
