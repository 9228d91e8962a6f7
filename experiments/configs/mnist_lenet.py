"""LeNet on MNIST (paper: Parle 0.44% test error with n=6, SGD 0.50%)."""

from experiments.configs import base


def get_config():
  config = base.get_config()
  config.dataset = 'mnist'
  config.model = 'lenet'
  config.model_kwargs.dropout = 0.25
  return config
