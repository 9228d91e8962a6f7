"""The experiment binary: every config and optimizer on mock data, a real run, resume.

Tiny runs use TFDS mock data (random examples of the right shapes) and
shrunken budgets; WRN configs run with depth 10, width 1 so that they compile
in seconds. The real Fashion-MNIST run and the resume test use the files from
Debian's dataset-fashion-mnist (conftest prepares them once).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import distributed, errors, experiment, optimizers, provenance, train
from experiments.configs import (base, cifar100_wrn28_10, cifar10_allcnn, cifar10_wrn28_10,
                                 default, fashion_mnist_lenet, fashion_mnist_wrn16_4,
                                 mnist_lenet, svhn_wrn16_4)
from parle_jax import checkpoint, data, models

REPO = pathlib.Path(__file__).resolve().parent.parent
MOCK_EXAMPLES = 64
CONFIGS = {
    'mnist_lenet': mnist_lenet, 'fashion_mnist_lenet': fashion_mnist_lenet,
    'fashion_mnist_wrn16_4': fashion_mnist_wrn16_4, 'cifar10_allcnn': cifar10_allcnn,
    'cifar10_wrn28_10': cifar10_wrn28_10, 'cifar100_wrn28_10': cifar100_wrn28_10,
    'svhn_wrn16_4': svhn_wrn16_4, 'default': default,
}
# Trained end to end on mock data: LeNet on 28x28x1 data (the main job; Parle on the
# LeNet config trains in test_every_optimizer_runs_on_mock_data) and a WRN on augmented
# 32x32x3 data. The others (same code paths, minutes of CPU compilation each for the
# WRNs) are checked up to the models, plans and data they would train on.
TRAINED_CONFIGS = ('default', 'cifar10_wrn28_10')


def tiny(config, data_dir, rounds=2, **overrides):
  """Shrinks `config` to `rounds` rounds of 2 steps of batch 8."""
  config.data_dir = str(data_dir)
  config.L, config.batch_size = 2, 8
  config.bn_recompute_batches, config.eval_batch_size = 2, 32
  config.train_eval_examples, config.progress_bar = 32, False
  config.mapping, config.compare_to_sgd = 'vmap', False
  if config.model == 'wrn':
    config.model_kwargs.depth, config.model_kwargs.width = 10, 1
  config.update(overrides)
  examples = MOCK_EXAMPLES if config.data_fraction == 1 else round(
      config.data_fraction * MOCK_EXAMPLES)
  per_round = 1 if config.optimizer in ('parle', 'entropy_sgd') else config.L
  batches_per_epoch = -(-examples // (config.batch_size // (
      (config.num_replicas or 1) if config.optimizer == 'data_parallel_sgd' else 1)))
  config.epochs = rounds * per_round / batches_per_epoch
  return config


def run_mock(config, tmp_path):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    return train.train_and_evaluate(config, str(tmp_path / 'work'))


def check_results(results, workdir, num_replicas):
  assert 0 <= results['reference/test_error'] <= 100
  assert len(results['replica/test_error']) == num_replicas
  assert len(results['replica/train_error']) == num_replicas
  records = [json.loads(line) for line in
             pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  assert records[-1]['round'] == results['rounds']
  assert any('train/loss' in r and np.isfinite(r['train/loss']) for r in records)
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  variables = checkpoint.load_variables(os.path.join(workdir, 'reference'))
  assert set(variables) == {'params', 'batch_stats'}


@pytest.mark.parametrize('name', TRAINED_CONFIGS)
def test_config_trains_on_mock_data(name, tmp_path):
  config = tiny(CONFIGS[name].get_config(), tmp_path / 'data')
  results = run_mock(config, tmp_path)
  check_results(results, tmp_path / 'work', 3)
  assert results['rounds'] == 2 and results['gradient_evaluations'] == 3 * 2 * 2


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_resolves(name):
  """Every config validates, plans the paper's budget and builds its model."""
  config = CONFIGS[name].get_config()
  base.validate(config)
  info = data.dataset_info(config.dataset)
  plan = optimizers.make_plan(config, 50000, 1)
  assert plan.num_replicas == 3 and plan.steps_per_round == 25 and plan.batch_size == 128
  model = models.create_model(config.model, info.num_classes, **config.model_kwargs.to_dict())
  logits = jax.eval_shape(
      lambda: model.init_with_output(jax.random.PRNGKey(0),
                                     np.zeros((2,) + info.image_shape, np.float32),
                                     train=False)[0])
  assert logits.shape == (2, info.num_classes)


@pytest.mark.parametrize('optimizer, num_replicas, expected_replicas', [
    ('sgd', None, 1), ('entropy_sgd', None, 1), ('elastic_sgd', None, 3),
    ('data_parallel_sgd', 2, 2), ('parle', 4, 4), ('local_sgd', None, 3), ('diloco', 2, 2)])
def test_every_optimizer_runs_on_mock_data(optimizer, num_replicas, expected_replicas, tmp_path):
  config = tiny(fashion_mnist_lenet.get_config(), tmp_path / 'data', optimizer=optimizer,
                num_replicas=num_replicas)
  results = run_mock(config, tmp_path)
  check_results(results, tmp_path / 'work', expected_replicas)
  assert results['optimizer'] == optimizer
  if optimizer in ('local_sgd', 'diloco'):  # every round ends with all replicas equal
    assert results['distance/l2_mean'] == pytest.approx(0, abs=1e-5)


def test_shard_map_device_map_trains_to_the_same_numbers(tmp_path):
  finals = {}
  for device_map in ('pmap', 'shard_map'):
    config = tiny(fashion_mnist_lenet.get_config(), tmp_path / 'data', device_map=device_map)
    results = run_mock(config, tmp_path / device_map)
    finals[device_map] = checkpoint.load_variables(str(tmp_path / device_map / 'work' / 'reference'))
    assert results['rounds'] == 2
  for a, b in zip(jax.tree.leaves(finals['shard_map']), jax.tree.leaves(finals['pmap'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_split_data_mode_on_mock_data(tmp_path):
  config = tiny(fashion_mnist_lenet.get_config(), tmp_path / 'data', data_fraction=0.5)
  results = run_mock(config, tmp_path)
  assert results['rounds'] == 2
  # Effective epochs are counted on a replica's half of the data.
  assert results['effective_epochs'] == pytest.approx(2 * 2 * 8 / 32)


def test_budget_accounting():
  config = fashion_mnist_lenet.get_config()
  plan = optimizers.make_plan(config, 60000, 1)
  assert plan.batches_per_epoch == 469 and plan.rounds_per_epoch == 469
  assert plan.total_rounds == 5 * 469
  assert plan.effective_epochs(plan.total_rounds) == pytest.approx(5 * 25 * 469 * 128 / 60000)
  config.optimizer, config.epochs = 'sgd', 125.0
  sgd = optimizers.make_plan(config, 60000, 1)
  assert sgd.num_replicas == 1 and sgd.rounds_per_epoch == pytest.approx(469 / 25)
  assert sgd.effective_epochs(sgd.total_rounds) == pytest.approx(125, rel=1e-3)
  config.optimizer, config.num_replicas = 'data_parallel_sgd', 4
  dp = optimizers.make_plan(config, 60000, 4)
  assert dp.batch_size == 32 and dp.batches_per_epoch == 469 and dp.same_init


def test_sgd_baseline_gets_the_same_gradient_budget():
  config = default.get_config()
  plan = optimizers.make_plan(config, 60000, 1)
  total = plan.gradient_evaluations(plan.total_rounds)
  sgd_plan = optimizers.make_plan(optimizers.sgd_config_with_same_budget(config, plan), 60000, 1)
  assert sgd_plan.gradient_evaluations(sgd_plan.total_rounds) == pytest.approx(total, rel=0.02)
  per_replica = optimizers.make_plan(
      optimizers.sgd_config_with_same_budget(config, plan, per_replica=True), 60000, 1)
  assert per_replica.gradient_evaluations(per_replica.total_rounds) == pytest.approx(
      total / 3, rel=0.05)


@pytest.mark.parametrize('optimizer', ['parle', 'entropy_sgd', 'elastic_sgd', 'sgd'])
def test_compress_to_rounds_fits_the_schedules_to_the_budget(optimizer):
  config = fashion_mnist_lenet.get_config()
  config.optimizer, config.num_replicas = optimizer, None
  compressed = optimizers.compress_to_rounds(config, 120, 60000)
  assert config.epochs == 5.0  # the argument is left alone
  plan = optimizers.make_plan(compressed, 60000, 1)
  assert plan.total_rounds == 120
  drops = [e * plan.rounds_per_epoch for e in compressed.lr_drop_epochs]
  assert drops == pytest.approx([60, 90])
  # Scoping grows over the 120 rounds (L steps each) about as over the paper's 5 epochs.
  steps_per_count = 1 if optimizer in ('parle', 'entropy_sgd') else 25  # SGD: unused
  assert compressed.scoping_batches_per_epoch == 24 * steps_per_count
  counts = 120 * steps_per_count
  assert (1 + 0.5 / compressed.scoping_batches_per_epoch) ** counts == pytest.approx(
      np.exp(2.5), rel=0.05)


@pytest.mark.parametrize('rounds', [0, 2.5, True])
def test_compress_to_rounds_refuses_bad_budgets(rounds):
  with pytest.raises(ValueError, match='`rounds` must be an integer >= 1'):
    optimizers.compress_to_rounds(fashion_mnist_lenet.get_config(), rounds, 60000)


def test_sgd_baselines_evaluate_at_the_same_fractions_of_the_run():
  config = default.get_config()
  plan = optimizers.make_plan(config, 60000, 1)
  evaluations = plan.total_rounds // config.eval_every_rounds
  for per_replica in (True, False):
    sgd = optimizers.sgd_config_with_same_budget(config, plan, per_replica=per_replica)
    sgd_plan = optimizers.make_plan(sgd, 60000, 1)
    assert sgd_plan.total_rounds // sgd.eval_every_rounds == evaluations


def test_compilation_cache_follows_flag_environment_and_processes(tmp_path, monkeypatch):
  updates = []
  monkeypatch.setattr(jax.config, 'update', lambda name, value: updates.append((name, value)))
  monkeypatch.setenv('PARLE_COMPILATION_CACHE', str(tmp_path / 'from_env'))
  assert distributed.enable_compilation_cache('') is None
  assert distributed.enable_compilation_cache(str(tmp_path / 'flag')) == str(tmp_path / 'flag')
  assert distributed.enable_compilation_cache(None) == str(tmp_path / 'from_env')
  assert updates == [('jax_compilation_cache_dir', str(tmp_path / 'flag')),
                     ('jax_compilation_cache_dir', str(tmp_path / 'from_env'))]
  assert (tmp_path / 'flag').is_dir()
  monkeypatch.setattr(jax, 'process_count', lambda: 2)  # CPU processes: their keys differ
  assert distributed.enable_compilation_cache(str(tmp_path / 'flag')) is None
  assert len(updates) == 2


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setenv('PARLE_FASHION_MNIST_DIR', str(tmp_path / 'empty'))
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', _no_network)
  config = fashion_mnist_lenet.get_config()
  config.data_dir = str(tmp_path / 'data')
  with pytest.raises(data.DataUnavailableError, match='apt-get install -y dataset-fashion-mnist'):
    train.Experiment(config)


def _no_network(*args, **kwargs):
  raise OSError('no network')


# --- real data -----------------------------------------------------------------
def real_config(data_dir, **overrides):
  config = fashion_mnist_lenet.get_config()
  config.data_dir = str(data_dir)
  config.L, config.mapping, config.progress_bar = 5, 'vmap', False
  config.bn_recompute_batches, config.train_eval_examples = 8, 2000
  config.update(overrides)
  return config


def test_real_fashion_mnist_run_learns(fashion_mnist_data_dir, tmp_path):
  """Parle n=3, 20 rounds of 5 steps (100 steps of 128 per replica): < 25% test error."""
  config = real_config(fashion_mnist_data_dir, epochs=20 / 469, log_every_rounds=10)
  results = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert results['rounds'] == 20
  assert results['reference/test_error'] < 25.0, results
  assert max(results['replica/test_error']) < 30.0, results
  assert results['distance/l2_mean'] > 0 and results['distance/cosine_mean'] > 0.9


def test_test_examples_are_the_test_splits_first(fashion_mnist_data_dir, tmp_path):
  """config.test_examples=N evaluates on the first N test images; more than the split: one line."""
  config = real_config(fashion_mnist_data_dir, test_examples=300)
  held = experiment.Experiment(config).test_arrays
  test = data.load('fashion_mnist', 'test', fashion_mnist_data_dir)
  for key in ('image', 'label'):
    np.testing.assert_array_equal(held[key], test[key][:300])
  config.test_examples = 0  # the whole split
  assert len(experiment.Experiment(config).test_arrays['label']) == 10000
  config.test_examples = 10001
  with pytest.raises(errors.ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert str(error.value) == ('config.test_examples=10001 is invalid: the fashion_mnist test '
                              'split holds 10000 examples (0: all of them).')
  assert not (tmp_path / 'work').exists()  # refused before anything is written


def train_command(workdir, config_overrides, *flags) -> list[str]:
  """The command line of experiments.train on the LeNet config, with `flags` and overrides."""
  return [sys.executable, '-m', 'experiments.train',
          f'--config={REPO}/experiments/configs/fashion_mnist_lenet.py', f'--workdir={workdir}',
          *flags] + [f'--config.{k}={v}' for k, v in config_overrides.items()]


def _launch(config_overrides, workdir, data_dir, log):
  """Starts the binary in a subprocess, its output going to the file `log`."""
  args = train_command(workdir, config_overrides, f'--config.data_dir={data_dir}')
  with open(log, 'w') as out:  # the child writes to its own copy of the file descriptor
    return subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def _finish(process, log):
  process.wait(timeout=300)
  output = pathlib.Path(log).read_text()
  assert process.returncode == 0, output[-5000:]
  return output


def _rounds_logged(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return max([json.loads(line)['round'] for line in f if line.strip()] or [0])


def test_killed_run_resumes_to_the_same_numbers(fashion_mnist_data_dir, tmp_path):
  """SIGKILL between checkpoints, start again: same final params as an uninterrupted run."""
  # 12 rounds (nb = 60000 / 32 = 1875 rounds per Parle epoch), a checkpoint every 4.
  overrides = dict(epochs=12 / 1875, L=2, batch_size=32, checkpoint_every_rounds=4,
                   log_every_rounds=1, eval_every_rounds=6, mapping='vmap',
                   progress_bar=False, bn_recompute_batches=2, train_eval_examples=256,
                   test_examples=1000)
  interrupted = tmp_path / 'interrupted'
  process = _launch(overrides, interrupted, fashion_mnist_data_dir, tmp_path / 'killed.log')
  deadline = time.time() + 300
  while _rounds_logged(interrupted) < 5 and process.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert process.poll() is None, (tmp_path / 'killed.log').read_text()[-5000:]
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = _rounds_logged(interrupted)
  assert 5 <= killed_at < 12
  with open(interrupted / 'metrics.jsonl', 'a') as f:
    f.write('{"round": 13, "train/lo')  # as a kill during a write leaves it: dropped on resume
  output = _finish(_launch(overrides, interrupted, fashion_mnist_data_dir,
                           tmp_path / 'resumed.log'), tmp_path / 'resumed.log')
  assert 'Resumed from the checkpoint after round' in output, output[-5000:]
  segments = provenance.read(str(interrupted))  # one record per start: the resume shows
  assert [s['start_round'] for s in segments][0] == 0 and len(segments) == 2
  assert segments[1]['start_round'] in (4, 8) and segments[1]['commit'] == segments[0]['commit']

  uninterrupted = tmp_path / 'uninterrupted'
  _finish(_launch(overrides, uninterrupted, fashion_mnist_data_dir, tmp_path / 'straight.log'),
          tmp_path / 'straight.log')
  a = checkpoint.load_variables(str(interrupted / 'reference'))
  b = checkpoint.load_variables(str(uninterrupted / 'reference'))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  records = [json.loads(line) for line in (interrupted / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in records if 'train/loss' in r] == list(range(1, 13))
  errors_logged = [r['reference/test_error'] for r in records if 'reference/test_error' in r]
  assert len(errors_logged) == 2 and all(  # rounds 6 and 12, on test_examples=1000 images
      np.isclose(e * 10, round(e * 10), rtol=0, atol=1e-6) for e in errors_logged)
  straight = [json.loads(line)
              for line in (uninterrupted / 'metrics.jsonl').read_text().splitlines()]
  numbers = lambda rs: [{k: v for k, v in r.items()  # noqa: E731  (clocks aside)
                         if k not in ('time', 'train_seconds', 'images_per_second')} for r in rs]
  assert numbers(records) == numbers(straight)  # every logged number, digit for digit
