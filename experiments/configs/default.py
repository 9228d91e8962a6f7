"""The README's main job: LeNet on Fashion-MNIST, Parle n=3, sized for a 2-core CPU.

The paper's algorithm and defaults (L=25, batch 128 per replica, lr 0.1,
scoping of gamma and rho with nb = 469), on a budget of ROUNDS rounds, i.e.
ROUNDS * 25 mini-batches per replica. ``compare_to_sgd`` then trains SGD twice:
with the mini-batches of one replica (what 3 parallel workers do in the same
wall-clock time) and with the same total (the same compute on one device).
All of it takes about 10 minutes on a 2-core CPU. The learning rates drop by 5x
at half and at three quarters of each run. For the paper's full budget use
fashion_mnist_lenet.py.
"""

from experiments.configs import fashion_mnist_lenet

ROUNDS = 12
BATCHES_PER_EPOCH = 469  # ceil(60000 / 128)


def get_config():
  config = fashion_mnist_lenet.get_config()
  config.num_replicas = 3
  config.epochs = ROUNDS / BATCHES_PER_EPOCH
  config.lr_drop_epochs = (0.5 * config.epochs, 0.75 * config.epochs)
  config.eval_every_rounds = 6
  config.train_eval_examples = 2000
  config.log_every_rounds = 2
  config.compare_to_sgd = True
  return config
