"""WRN-16-4 on Fashion-MNIST (28x28x1), Parle n=3, the SVHN setup's hyper-parameters."""

from experiments.configs import base


def get_config():
  config = base.get_config()
  config.dataset = 'fashion_mnist'
  config.model = 'wrn'
  config.model_kwargs.depth = 16
  config.model_kwargs.width = 4
  config.model_kwargs.dropout = 0.4
  config.weight_decay = 5e-4
  return config
