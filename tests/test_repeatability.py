"""Repeatability on one machine: the same config gives bitwise-equal params and metrics.

Three cases (the third, a killed and resumed run, is in test_train.py):
two runs of one small config, and the same config with other log, evaluation
and checkpoint cadences. Real Fashion-MNIST, Parle n=3 with BN and dropout.
"""

import json

import jax
import numpy as np

from experiments import train
from experiments.configs import fashion_mnist_lenet
from parle_jax import checkpoint

ROUNDS = 6
TIMING = ('time', 'train_seconds', 'images_per_second')  # clocks, not numbers of the run


def _config(data_dir, **cadence):
  config = fashion_mnist_lenet.get_config()
  config.data_dir = str(data_dir)
  config.epochs = ROUNDS / 1875  # batch 32: 1875 rounds per Parle epoch
  config.L, config.batch_size, config.mapping, config.progress_bar = 2, 32, 'sequential', False
  config.bn_recompute_batches, config.train_eval_examples, config.eval_batch_size = 2, 256, 500
  config.test_examples = 1000
  config.log_every_rounds, config.eval_every_rounds, config.checkpoint_every_rounds = 1, 3, 3
  config.update(cadence)
  return config


def _run(config, workdir):
  train.train_and_evaluate(config, str(workdir))
  with open(workdir / 'metrics.jsonl') as f:
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]
  return checkpoint.load_variables(str(workdir / 'reference')), records


def _assert_bitwise(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_same_config_twice_and_other_cadences_give_bitwise_equal_numbers(
    fashion_mnist_data_dir, tmp_path):
  first, first_records = _run(_config(fashion_mnist_data_dir), tmp_path / 'first')
  second, second_records = _run(_config(fashion_mnist_data_dir), tmp_path / 'second')
  _assert_bitwise(first, second)
  assert first_records == second_records  # every loss, error and distance, digit for digit

  other, other_records = _run(
      _config(fashion_mnist_data_dir, log_every_rounds=2, eval_every_rounds=2,
              checkpoint_every_rounds=4), tmp_path / 'other_cadence')
  _assert_bitwise(first, other)
  evaluations = {r['round']: r for r in first_records if 'reference/test_error' in r}
  other_evaluations = {r['round']: r for r in other_records if 'reference/test_error' in r}
  assert sorted(other_evaluations) == [2, 4, 6] and sorted(evaluations) == [3, 6]
  assert other_evaluations[6] == evaluations[6]  # the shared evaluation, every field
  # The log windows differ (2 rounds against 1), so the losses are compared as their means.
  losses = {r['round']: r['train/loss'] for r in first_records if 'train/loss' in r}
  for r in other_records:
    if 'train/loss' in r:
      assert np.isclose(r['train/loss'], np.mean([losses[r['round'] - 1], losses[r['round']]]),
                        rtol=1e-6, atol=0)
