"""Fields shared by every experiment config, their defaults (docs/algorithm.md) and checks.

Each config file defines ``get_config()`` returning ``base.get_config()`` with
the setup's own values. Any field can be overridden on the command line, e.g.
``--config.optimizer=sgd --config.num_replicas=6 --config.L=25``.
"""

import math
import numbers

import ml_collections
from ml_collections import config_dict

from parle_jax import data, models
from parle_jax.conv import CONV_IMPLEMENTATIONS
from parle_jax.replicas import DEVICE_MAPS, MAPPINGS

OPTIMIZERS = ('parle', 'entropy_sgd', 'elastic_sgd', 'sgd', 'data_parallel_sgd', 'local_sgd',
              'diloco')
ON_DIVERGENCE = ('stop', 'rollback')


def get_config() -> ml_collections.ConfigDict:
  """The paper's defaults (Parle n=3, L=25, ...); setups override what differs."""
  config = ml_collections.ConfigDict()
  # Data and model.
  config.dataset = 'fashion_mnist'
  config.data_dir = ''  # '' -> $PARLE_DATA_DIR, else ~/tensorflow_datasets
  config.augment = False  # random flip + 4-pixel pad and crop (CIFAR)
  config.data_fraction = 1.0  # split-data mode: each replica its own random share
  config.model = 'lenet'
  config.model_kwargs = ml_collections.ConfigDict()  # e.g. depth, width, dropout
  # Optimizer.
  config.optimizer = 'parle'
  config.num_replicas = config_dict.placeholder(int)  # None: 3, or 1 for sgd/entropy_sgd
  config.L = 25
  config.batch_size = 128  # per replica (data_parallel_sgd: split over the workers)
  config.epochs = 5.0  # of this optimizer: Parle epoch = nb rounds, SGD epoch = one pass
  config.learning_rate = 0.1  # outer (Parle) / only (SGD) learning rate
  config.lr_decay = 0.2  # multiplied in at each of lr_drop_epochs
  config.lr_drop_epochs = (1, 2, 3)
  config.inner_learning_rate = 0.1
  config.gamma_initial, config.gamma_max = 0.01, 1.0  # scoping of the proximal pull
  config.rho_initial, config.rho_max = 1.0, 10.0  # scoping of the elastic pull
  # nb in the scoping schedules (growth 1 + 0.5 / nb per round); 0: the data's nb.
  # Budgets scaled down from the paper's set it so the coefficients grow as they would.
  config.scoping_batches_per_epoch = 0
  config.alpha = 0.75
  config.momentum = 0.9
  # DiLoCo's outer Nesterov step on the all-reduced pseudo-gradient (Douillard et al.).
  config.outer_learning_rate = 0.7
  config.outer_momentum = 0.9
  config.weight_decay = 0.0
  config.noise = 0.0
  config.mapping = 'auto'  # local replica mapping: auto | vmap | sequential
  # The device axis: auto (pmap; shard_map for islands) | pmap | shard_map (jit over a Mesh).
  config.device_map = 'auto'
  # Devices one replica spans (an island, data-parallel inside: batch_size / k each, the
  # gradient all-reduced over the island every step); the replicas couple across islands.
  config.devices_per_replica = 1
  # Convolutions: auto (one matmul over patches on CPU, the backend's own elsewhere) |
  # xla | matmul (parle_jax.conv). A resumed run keeps what 'auto' chose at its start.
  config.conv = 'auto'
  config.seed = 0
  # Evaluation, logging, checkpoints.
  config.eval_every_rounds = 0  # 0: once per epoch of the optimizer
  config.bn_recompute_batches = 20
  config.eval_batch_size = 1000
  config.train_eval_examples = 10000  # replicas' train error on this many examples
  config.test_examples = 0  # test error on the test split's first N (0: all of it)
  config.checkpoint_every_rounds = 500
  config.keep_checkpoints = 3
  config.log_every_rounds = 10
  config.progress_bar = True
  config.compare_to_sgd = False  # also train SGD on the same gradient budget
  # A NaN/Inf loss or params: 'stop' (keep the last good checkpoint), or 'rollback':
  # restart from it with the learning rates times rollback_lr_factor, at most
  # max_rollbacks times.
  config.on_divergence = 'stop'
  config.rollback_lr_factor = 0.1
  config.max_rollbacks = 3
  return config


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


# Integer fields and their smallest allowed value (with what 0 means, where allowed).
_INTEGERS = {
    'L': (1, ''), 'batch_size': (1, ''), 'bn_recompute_batches': (1, ''),
    'eval_batch_size': (1, ''), 'checkpoint_every_rounds': (1, ''), 'keep_checkpoints': (1, ''),
    'log_every_rounds': (1, ''), 'seed': (0, ''), 'devices_per_replica': (1, ''),
    'scoping_batches_per_epoch': (0, " (0: the data's batches per epoch)"),
    'eval_every_rounds': (0, ' (0: once per epoch)'),
    'train_eval_examples': (0, ' (0: no train error)'),
    'test_examples': (0, ' (0: the whole test split)'),
    'max_rollbacks': (0, ''),
}
# Real fields: (lowest, lowest allowed?, highest, highest allowed?); None: unbounded.
_REALS = {
    'epochs': (0, False, None, False),
    'data_fraction': (0, False, 1, True),
    'lr_decay': (0, False, 1, True),
    'rollback_lr_factor': (0, False, 1, False),
    'learning_rate': (0, True, None, False),
    'inner_learning_rate': (0, True, None, False),
    'gamma_initial': (0, True, None, False),
    'rho_initial': (0, True, None, False),
    'weight_decay': (0, True, None, False),
    'noise': (0, True, None, False),
    'alpha': (0, True, 1, False),
    'momentum': (0, True, 1, False),
    'outer_learning_rate': (0, True, None, False),
    'outer_momentum': (0, True, 1, False),
}


def _interval(low, low_closed, high, high_closed) -> str:
  if high is None:
    return f'must be a finite number {">=" if low_closed else ">"} {low}'
  return (f'must be in {"[" if low_closed else "("}{low}, {high}{"]" if high_closed else ")"}')


def _inside(value, low, low_closed, high, high_closed) -> bool:
  above = value >= low if low_closed else value > low
  below = high is None or (value <= high if high_closed else value < high)
  return above and below


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field up front; raises ValueError naming field, value and what is allowed.

  What depends on the data or the devices (batch larger than the training set,
  replicas that do not divide among the devices, ...) is checked when the run
  is planned (:func:`experiments.optimizers.make_plan`, ``select_devices``).
  """
  def fail(field, allowed):
    raise ValueError(f'config.{field}={config[field]!r} is invalid: {allowed}.')

  for field, choices in (('dataset', sorted(data.DATASETS)), ('model', list(models.MODELS)),
                         ('optimizer', list(OPTIMIZERS)), ('mapping', list(MAPPINGS)),
                         ('conv', list(CONV_IMPLEMENTATIONS)),
                         ('device_map', ['auto'] + list(DEVICE_MAPS)),
                         ('on_divergence', list(ON_DIVERGENCE))):
    if not isinstance(config[field], str) or config[field] not in choices:
      fail(field, f'choose one of {choices}')
  if config.num_replicas is not None and (not _is_int(config.num_replicas)
                                          or config.num_replicas < 1):
    fail('num_replicas', 'must be an integer >= 1 (or unset)')
  for field, (lowest, meaning) in _INTEGERS.items():
    if not _is_int(config[field]) or config[field] < lowest:
      fail(field, f'must be an integer >= {lowest}{meaning}')
  for field, bounds in _REALS.items():
    if not _is_number(config[field]) or not _inside(config[field], *bounds):
      fail(field, _interval(*bounds))
  for field, initial in (('gamma_max', 'gamma_initial'), ('rho_max', 'rho_initial')):
    if not _is_number(config[field]) or config[field] < config[initial]:
      fail(field, f'must be a finite number >= {initial}={config[initial]}')
  drops = config.lr_drop_epochs
  if (not isinstance(drops, (tuple, list)) or not all(_is_number(e) and e > 0 for e in drops)
      or list(drops) != sorted(drops)):
    fail('lr_drop_epochs', 'must be increasing positive epochs')
  if config.devices_per_replica > 1 and config.device_map == 'pmap':
    fail('device_map', f'config.devices_per_replica={config.devices_per_replica} needs a 2-D mesh: '
         "use 'shard_map' or 'auto'")
  for field in ('augment', 'progress_bar', 'compare_to_sgd'):
    if not isinstance(config[field], bool):
      fail(field, 'must be True or False')
  if not isinstance(config.data_dir, str):
    fail('data_dir', "must be a path ('' for $PARLE_DATA_DIR or ~/tensorflow_datasets)")
  try:
    models.create_model(config.model, data.DATASETS[config.dataset].num_classes,
                        conv=config.conv, **config.model_kwargs.to_dict())
  except (TypeError, ValueError) as err:
    raise ValueError(f'config.model_kwargs={config.model_kwargs.to_dict()!r} is invalid for '
                     f'config.model={config.model!r}: {err}') from None


def with_defaults(logged_config: dict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A logged config with the fields that code added since it was logged, at their defaults.

  A field added later defaults to what the code did before it existed (the
  project's rule for new config fields), so an older run replays unchanged.
  Returns the config and the names of the added fields.
  """
  defaults = get_config().to_dict()
  added = sorted(set(defaults) - set(logged_config))
  merged = dict(logged_config)
  merged.update({name: defaults[name] for name in added})
  return ml_collections.ConfigDict(merged), added
