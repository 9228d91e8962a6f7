"""Fields shared by every experiment config, their defaults (PARLE.md) and checks.

Each config file defines ``get_config()`` returning ``base.get_config()`` with
the setup's own values. Any field can be overridden on the command line, e.g.
``--config.optimizer=sgd --config.num_replicas=6 --config.L=25``.
"""

import ml_collections
from ml_collections import config_dict

from parle_jax import data, models
from parle_jax.replicas import MAPPINGS

OPTIMIZERS = ('parle', 'entropy_sgd', 'elastic_sgd', 'sgd', 'data_parallel_sgd')


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
  config.weight_decay = 0.0
  config.noise = 0.0
  config.mapping = 'auto'  # local replica mapping: auto | vmap | sequential
  config.seed = 0
  # Evaluation, logging, checkpoints.
  config.eval_every_rounds = 0  # 0: once per epoch of the optimizer
  config.bn_recompute_batches = 20
  config.eval_batch_size = 1000
  config.train_eval_examples = 10000  # replicas' train error on this many examples
  config.checkpoint_every_rounds = 500
  config.keep_checkpoints = 3
  config.log_every_rounds = 10
  config.progress_bar = True
  config.compare_to_sgd = False  # also train SGD on the same gradient budget
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field up front; raises ValueError naming field, value and what is allowed."""
  def fail(field, allowed):
    raise ValueError(f'config.{field}={config[field]!r} is invalid: {allowed}.')

  if config.dataset not in data.DATASETS:
    fail('dataset', f'choose one of {sorted(data.DATASETS)}')
  if config.model not in models.MODELS:
    fail('model', f'choose one of {list(models.MODELS)}')
  if config.optimizer not in OPTIMIZERS:
    fail('optimizer', f'choose one of {list(OPTIMIZERS)}')
  if config.mapping not in MAPPINGS:
    fail('mapping', f'choose one of {list(MAPPINGS)}')
  if config.num_replicas is not None and config.num_replicas < 1:
    fail('num_replicas', 'must be >= 1 (or unset)')
  for field in ('L', 'batch_size', 'bn_recompute_batches', 'eval_batch_size',
                'checkpoint_every_rounds', 'keep_checkpoints', 'log_every_rounds'):
    if not isinstance(config[field], int) or config[field] < 1:
      fail(field, 'must be an integer >= 1')
  if not isinstance(config.scoping_batches_per_epoch, int) or config.scoping_batches_per_epoch < 0:
    fail('scoping_batches_per_epoch', "must be an integer >= 0 (0: the data's batches per epoch)")
  if config.eval_every_rounds < 0:
    fail('eval_every_rounds', 'must be >= 0 (0: once per epoch)')
  if not config.epochs > 0:
    fail('epochs', 'must be > 0')
  if not 0 < config.data_fraction <= 1:
    fail('data_fraction', 'must be in (0, 1]')
  for field in ('learning_rate', 'inner_learning_rate', 'gamma_initial', 'rho_initial',
                'weight_decay', 'noise', 'train_eval_examples'):
    if config[field] < 0:
      fail(field, 'must be >= 0')
  for field in ('alpha', 'momentum'):
    if not 0 <= config[field] < 1:
      fail(field, 'must be in [0, 1)')
  if not 0 < config.lr_decay <= 1:
    fail('lr_decay', 'must be in (0, 1]')
  if config.gamma_max < config.gamma_initial:
    fail('gamma_max', f'must be >= gamma_initial={config.gamma_initial}')
  if config.rho_max < config.rho_initial:
    fail('rho_max', f'must be >= rho_initial={config.rho_initial}')
  if list(config.lr_drop_epochs) != sorted(config.lr_drop_epochs) or any(
      e <= 0 for e in config.lr_drop_epochs):
    fail('lr_drop_epochs', 'must be increasing positive epochs')
