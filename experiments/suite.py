"""Runs a suite of experiments (optimizers x seeds) and keeps their raw metrics.

  python -m experiments.suite --suite=fashion_mnist_lenet_cpu --runs_dir=workdirs/suites
  python -m experiments.suite --suite=fashion_mnist_lenet_cpu --only=parle,sgd --seeds=0
  python -m experiments.suite --suite=default_job --seeds=0 --landscape

Each run trains through :func:`experiments.train.train_and_evaluate` in
``<runs_dir>/<suite>/<run>`` (checkpoints, TensorBoard, the reference model; a
killed suite resumes where it stopped) and, once finished, copies what the
report needs into ``<results_dir>/<suite>/<run>/``: ``config.json``,
``metrics.jsonl`` and ``summary.json`` (final numbers, budget, training time
and the machine it ran on). Finished runs are skipped. ``--landscape`` then
measures each finished run whose workdir still holds its reference model
(:mod:`experiments.landscape`) and keeps its ``flatness.json`` there too. ``experiments.report``
rebuilds the tables and plots from these files alone.

Suites:

* ``fashion_mnist_lenet_cpu``: LeNet on Fashion-MNIST, the paper's five
  optimizers with its defaults, and local SGD and DiLoCo with the same n, L
  and batch as Parle, on a budget a 2-core CPU can afford (``ROUNDS`` rounds of
  L=25 per run), plus the split-data runs (n=3 on 50%, n=6 on 25% of the data
  per replica).
* ``fashion_mnist_lenet_sweep``: the budget sweep: Parle n=3 against SGD on
  the mini-batches of one replica and on the same total, at ``SWEEP_ROUNDS``
  rounds each (schedules compressed to each budget), the first seed at every
  budget and all given seeds at the longest (the stored results: ``--seeds=0``).
  Its last point is the paper's budget (2,345 rounds): Parle and SGD on one
  replica's mini-batches are the paper suite's runs (``experiments.report``
  borrows them), and this suite adds SGD on the same total (the first seed).
* ``fashion_mnist_lenet_paper`` and ``fashion_mnist_wrn16_4_paper``: the
  paper's budget (5 Parle epochs = 125 effective epochs, schedules
  uncompressed); LeNet's fits a 2-core CPU, WRN-16-4's is a GPU's work.
* ``default_job``: ``make train``'s three runs (configs/default.py), so that
  the README's table of the default job is rebuilt like the others.
* ``default_job_islands``: the default job's Parle with n=2 and dropout off,
  over 2 islands of 4 devices and over 2 devices (8 devices: fake CPU devices
  on a CPU machine), the check that a replica spanning devices trains as one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Iterator, Optional

import jax
import ml_collections
from absl import app, flags, logging

from experiments import landscape, machine, metric_writer, optimizers, train
from experiments import workdir as workdir_lib
from experiments.configs import default, fashion_mnist_lenet, fashion_mnist_wrn16_4

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('suite', 'fashion_mnist_lenet_cpu', f'One of {sorted(SUITES)}.')
  flags.DEFINE_string('runs_dir', 'workdirs/suites', 'Where runs train (large).')
  flags.DEFINE_bool('landscape', False,
                    'After training, measure every finished run whose workdir still holds its '
                    'reference model (experiments.landscape) and keep flatness.json beside '
                    'summary.json.')
  flags.DEFINE_integer('landscape_examples', landscape.Settings.examples,
                       'Training images for --landscape.')
  flags.DEFINE_string('results_dir', 'experiments/results',
                      'Where the raw metrics of finished runs are kept (small).')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds to run.')
  flags.DEFINE_list('only', [], 'Run only these run-name prefixes (e.g. parle,sgd).')
  flags.DEFINE_string('data_dir', '', 'config.data_dir for every run.')


ROUNDS = 120  # rounds of L = 25 mini-batches per replica in the CPU suite
SWEEP_ROUNDS = (12, 50, 200, 469)  # 469 rounds: one Parle epoch, 25 passes per replica
FASHION_MNIST_TRAIN = 60000


def _scaled(config: ml_collections.ConfigDict, rounds: int) -> ml_collections.ConfigDict:
  """`config` trained for `rounds` rounds, its schedules compressed to fit them."""
  config = optimizers.compress_to_rounds(config, rounds, FASHION_MNIST_TRAIN, jax.device_count())
  with config.unlocked():
    config.eval_every_rounds = max(3, rounds // 20)
    config.log_every_rounds = 3
    config.train_eval_examples = 2000
    config.eval_batch_size = 250  # faster than 1000 on a 2-core CPU (its caches)
    config.checkpoint_every_rounds = config.eval_every_rounds
    if config.optimizer in ('parle', 'local_sgd', 'diloco'):
      config.mapping = 'sequential'  # what 'auto' chose in every CPU measurement
  return config


def _lenet_cpu_runs(seeds) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """The CPU suite, seed by seed: the five optimizers, then the split-data runs."""
  for seed in seeds:
    for optimizer, n, batch in (('parle', 3, 128), ('entropy_sgd', 1, 128),
                                ('elastic_sgd', 3, 128), ('sgd', 1, 128),
                                ('data_parallel_sgd', 3, 384),  # 128 per worker
                                ('local_sgd', 3, 128), ('diloco', 3, 128)):
      config = fashion_mnist_lenet.get_config()
      config.optimizer, config.num_replicas, config.batch_size = optimizer, n, batch
      config.seed = seed
      yield f'{optimizer}_n{n}_seed{seed}', _scaled(config, ROUNDS)
    for n, fraction in ((3, 0.5), (6, 0.25)):
      config = fashion_mnist_lenet.get_config()
      config.num_replicas, config.data_fraction, config.seed = n, fraction, seed
      yield f'parle_n{n}_data{round(fraction * 100)}_seed{seed}', _scaled(config, ROUNDS)


def _lenet_sweep_runs(seeds) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """Parle n=3 and SGD on both budgets at each of SWEEP_ROUNDS (see the module docstring)."""
  for rounds in SWEEP_ROUNDS:
    for seed in (seeds if rounds == max(SWEEP_ROUNDS) else seeds[:1]):
      config = fashion_mnist_lenet.get_config()
      config.num_replicas, config.seed = 3, seed
      config = _scaled(config, rounds)
      yield f'parle_n3_r{rounds}_seed{seed}', config
      plan = optimizers.make_plan(config, FASHION_MNIST_TRAIN, jax.device_count())
      for name, per_replica in (('replica', True), ('total', False)):
        yield (f'sgd_{name}_budget_r{rounds}_seed{seed}',
               optimizers.sgd_config_with_same_budget(config, plan, per_replica=per_replica))
  for seed in seeds[:1]:  # the paper's budget: SGD on the same total as the paper suite's Parle
    _, parle = next(_paper_runs(fashion_mnist_lenet.get_config, [seed], (('parle', 3),)))
    plan = optimizers.make_plan(parle, FASHION_MNIST_TRAIN, jax.device_count())
    yield (f'sgd_total_budget_r{plan.total_rounds}_seed{seed}',
           optimizers.sgd_config_with_same_budget(parle, plan, per_replica=False))


def _paper_runs(get_config, seeds, optimizers_and_sizes
                ) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """The paper's budget: 5 Parle epochs (125 effective epochs), its schedules uncompressed.

  Parle and Entropy-SGD run 5 Parle epochs; the optimizers that count epochs
  as passes over the data run 125. The learning rate drops 5x at a fifth,
  two fifths and three fifths of the run, as at Parle epochs 1, 2 and 3.
  """
  for seed in seeds:
    for optimizer, n in optimizers_and_sizes:
      config = get_config()
      config.optimizer, config.num_replicas, config.seed = optimizer, n, seed
      epochs = 5 if optimizer in ('parle', 'entropy_sgd') else 125
      config.epochs = epochs
      config.lr_drop_epochs = tuple(e * epochs / 5 for e in config.lr_drop_epochs)
      config.eval_every_rounds = PAPER_EVAL_EVERY_ROUNDS
      config.checkpoint_every_rounds = PAPER_EVAL_EVERY_ROUNDS
      config.log_every_rounds = 7
      config.train_eval_examples = 2000
      config.eval_batch_size = 250
      if optimizer in ('parle', 'local_sgd', 'diloco'):
        config.mapping = 'sequential'  # as in the CPU suites: what 'auto' chose there
      yield f'{optimizer}_n{n or "all"}_seed{seed}', config


PAPER_EVAL_EVERY_ROUNDS = 94  # 2,345 rounds in all: 25 evaluations (5 per Parle epoch)
PAPER_OPTIMIZERS = (('parle', 3), ('sgd', 1), ('entropy_sgd', 1), ('elastic_sgd', 3),
                    ('data_parallel_sgd', None), ('local_sgd', 3), ('diloco', 3))


def _lenet_paper_runs(seeds) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """LeNet on Fashion-MNIST at the paper's budget (fits a 2-core CPU: about 50 min per Parle run)."""
  return _paper_runs(fashion_mnist_lenet.get_config, seeds, PAPER_OPTIMIZERS)


def _wrn_paper_runs(seeds) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """WRN-16-4 on Fashion-MNIST at the paper's budget (a GPU's work)."""
  return _paper_runs(fashion_mnist_wrn16_4.get_config, seeds, PAPER_OPTIMIZERS)


def _default_job_runs(seeds) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """``make train`` (configs/default.py) as a suite: Parle, then SGD on both budgets."""
  for seed in seeds:
    config = default.get_config()
    config.compare_to_sgd, config.seed = False, seed
    yield f'parle_n3_seed{seed}', config
    plan = optimizers.make_plan(config, FASHION_MNIST_TRAIN, jax.device_count())
    for name, per_replica in (('replica', True), ('total', False)):
      yield (f'sgd_{name}_budget_seed{seed}',
             optimizers.sgd_config_with_same_budget(config, plan, per_replica=per_replica))


ISLAND_DEVICES = 8  # default_job_islands: 2 replicas over islands of 4, against 2 devices


def _default_job_islands_runs(seeds) -> Iterator[tuple[str, ml_collections.ConfigDict]]:
  """The default job's Parle, n=2 and dropout off, over 2 islands of 4 devices and over 2 devices.

  Runs on 8 devices (fake CPU devices: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``);
  the two runs differ in the island layout only, so their numbers differ by float rounding.
  """
  if jax.device_count() < ISLAND_DEVICES:
    raise ValueError(
        f'--suite=default_job_islands needs {ISLAND_DEVICES} devices, found '
        f'{jax.device_count()}: on a CPU, set XLA_FLAGS='
        f'--xla_force_host_platform_device_count={ISLAND_DEVICES}.')
  for seed in seeds:
    for devices_per_replica in (4, 1):
      config = default.get_config()
      config.compare_to_sgd, config.seed, config.num_replicas = False, seed, 2
      config.devices_per_replica = devices_per_replica
      config.model_kwargs.dropout = 0.0
      yield f'parle_n2_k{devices_per_replica}_seed{seed}', config


SUITES: dict[str, Callable[..., Iterator[tuple[str, ml_collections.ConfigDict]]]] = {
    'fashion_mnist_lenet_cpu': _lenet_cpu_runs,
    'fashion_mnist_lenet_sweep': _lenet_sweep_runs,
    'fashion_mnist_lenet_paper': _lenet_paper_runs,
    'fashion_mnist_wrn16_4_paper': _wrn_paper_runs,
    'default_job': _default_job_runs,
    'default_job_islands': _default_job_islands_runs,
}


def _summary(results: dict, started: float, load_before) -> dict:
  scalars = {k: v for k, v in results.items() if k != 'sgd_baselines'}
  return dict(scalars, machine=machine.describe(), wall_seconds=time.time() - started,
              load_average_start=load_before, load_average_end=os.getloadavg())


# The run each suite's Parle runs are joined to by a straight path (same seed): SGD.
SEGMENT_TO = {'default_job': 'sgd_replica_budget', 'fashion_mnist_lenet_cpu': 'sgd_n1',
              'fashion_mnist_lenet_paper': 'sgd_n1', 'fashion_mnist_wrn16_4_paper': 'sgd_n1'}


def run_suite(name: str, runs_dir: str, results_dir: str, seeds, only=(), data_dir='',
              flatness: Optional[landscape.Settings] = None) -> list[str]:
  """Trains the suite's unfinished runs; returns the names of the runs it trained.

  With `flatness`, then measures every finished run that has no
  ``flatness.json`` yet and whose workdir still holds its reference model
  (:func:`measure_flatness`).
  """
  if name not in SUITES:
    raise ValueError(f'--suite={name!r} is unknown; choose one of {sorted(SUITES)}.')
  trained, runs, every_run = [], [], list(SUITES[name](seeds))
  for run, config in every_run:
    if only and not any(run.startswith(prefix) for prefix in only):
      continue
    runs.append((run, config))
    kept = os.path.join(results_dir, name, run)
    if os.path.exists(os.path.join(kept, 'summary.json')):
      logging.info('%s: already finished, skipping', run)
      continue
    if data_dir:
      config.data_dir = data_dir
    config.progress_bar = False
    logging.info('%s: training', run)
    started, load_before = time.time(), os.getloadavg()
    run_dir = os.path.join(runs_dir, name, run)
    results = train.train_and_evaluate(config, run_dir)
    if jax.process_index() == 0:
      os.makedirs(kept, exist_ok=True)
      for file in (workdir_lib.CONFIG, workdir_lib.METRICS):
        shutil.copyfile(os.path.join(run_dir, file), os.path.join(kept, file))
      with open(os.path.join(kept, 'summary.json'), 'w') as f:
        json.dump(_summary(results, started, load_before), f, indent=1, sort_keys=True)
    trained.append(run)
    # Each run compiles its own programs. XLA:CPU keeps memory mappings per
    # program, and a long suite in one process would otherwise reach Linux's
    # vm.max_map_count, where the next compile segfaults.
    jax.clear_caches()
  if flatness is not None:
    measure_flatness(name, runs, runs_dir, results_dir, flatness, data_dir,
                     gamma=suite_gamma(every_run))  # --only leaves the scope unchanged
  return trained


def suite_gamma(runs) -> Optional[float]:
  """The scope of the suite's first Parle run after its last round (one gamma for all runs)."""
  for _, config in runs:
    if config.optimizer == 'parle':
      plan = optimizers.make_plan(config, FASHION_MNIST_TRAIN, jax.device_count())
      return landscape.final_gamma(config, plan)
  return None


def measure_flatness(name: str, runs, runs_dir: str, results_dir: str,
                     settings: landscape.Settings, data_dir: str = '',
                     gamma: Optional[float] = None) -> list[str]:
  """Writes ``flatness.json`` for the finished `runs` of suite `name` that lack one.

  Every run is measured at the same scope (:func:`suite_gamma`) on the same
  images; a Parle run also along the segment to the SGD run of its seed
  (:data:`SEGMENT_TO`). A run whose workdir no longer holds its reference is
  skipped with a warning. `gamma` (default: :func:`suite_gamma` of `runs`)
  is the scope. Returns the names of the runs measured.
  """
  gamma = suite_gamma(runs) if gamma is None else gamma
  if settings.gamma is None and gamma is not None:
    settings = dataclasses.replace(settings, gamma=gamma)
  measured = []
  for run, config in runs:
    kept, run_dir = os.path.join(results_dir, name, run), os.path.join(runs_dir, name, run)
    if (not os.path.exists(os.path.join(kept, 'summary.json'))
        or os.path.exists(os.path.join(kept, landscape.FLATNESS))):
      continue
    if not os.path.isdir(workdir_lib.path(run_dir, workdir_lib.REFERENCE)):
      logging.warning('%s: no reference model in %s, so no flatness.json; train the run '
                      'again there to measure it.', run, run_dir)
      continue
    against = None
    if config.optimizer == 'parle' and name in SEGMENT_TO:
      other = os.path.join(runs_dir, name, f'{SEGMENT_TO[name]}_seed{config.seed}')
      against = other if os.path.isdir(workdir_lib.path(other, workdir_lib.REFERENCE)) else None
    logging.info('%s: measuring its flatness%s', run, f' (against {against})' if against else '')
    result = landscape.measure(run_dir, settings, against=against, data_dir=data_dir,
                               progress_bar=False)
    if jax.process_index() == 0:
      landscape.write(run_dir, result)
      shutil.copyfile(os.path.join(run_dir, landscape.FLATNESS),
                      os.path.join(kept, landscape.FLATNESS))
      logging.info('%s: %s', run, landscape.summary_line(result))
    measured.append(run)
    # The runs share the compiled programs (same model, same settings): kept
    # unless the process's memory mappings run high.
    machine.release_compiled_programs_if_many()
  return measured


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  train.quiet_orbax_logs()
  metric_writer.tensorboard_without_tensorflow()
  flatness = (landscape.Settings(examples=FLAGS.landscape_examples) if FLAGS.landscape
              else None)
  run_suite(FLAGS.suite, FLAGS.runs_dir, FLAGS.results_dir, [int(s) for s in FLAGS.seeds],
            FLAGS.only, FLAGS.data_dir, flatness)


if __name__ == '__main__':
  define_flags()
  app.run(main)
