"""LeNet on Fashion-MNIST, Parle n=3 with the paper's MNIST defaults (5 Parle epochs)."""

from experiments.configs import base


def get_config():
  config = base.get_config()
  config.dataset = 'fashion_mnist'
  config.model = 'lenet'
  config.model_kwargs.dropout = 0.25
  return config
