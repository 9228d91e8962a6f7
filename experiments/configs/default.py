"""The README's main job: LeNet on Fashion-MNIST, Parle n=3, sized for a 2-core CPU.

The paper's algorithm and defaults (L=25, batch 128 per replica, lr 0.1,
alpha 0.75, Nesterov 0.9) on a budget of ROUNDS rounds, i.e. ROUNDS * 25
mini-batches per replica (6.4 passes over the data), with the schedules
compressed to fit the budget as the CPU suite does
(:func:`experiments.optimizers.compress_to_rounds`): the learning rates drop
by 5x at half and at three quarters of the run, and the scoping of gamma and
rho grows as over the paper's 5 Parle epochs. ``compare_to_sgd`` then trains
SGD twice: with the mini-batches of one replica (what 3 parallel workers do in
the same wall-clock time) and with the same total (the same compute on one
device). All of it takes about 14 minutes on a 2-core CPU from a fresh clone,
environment and data included. For the paper's full budget use
fashion_mnist_lenet.py.
"""

from experiments import optimizers
from experiments.configs import fashion_mnist_lenet

ROUNDS = 120
FASHION_MNIST_TRAIN = 60000


def get_config():
  config = fashion_mnist_lenet.get_config()
  config.num_replicas = 3
  config = optimizers.compress_to_rounds(config, ROUNDS, FASHION_MNIST_TRAIN)
  config.eval_every_rounds = 24
  config.checkpoint_every_rounds = 24
  config.train_eval_examples = 2000
  config.eval_batch_size = 250  # faster than 1000 on a 2-core CPU (its caches)
  config.log_every_rounds = 4
  config.compare_to_sgd = True
  return config
