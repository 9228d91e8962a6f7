"""WRN-16-4 on Fashion-MNIST (28x28x1), Parle n=3, the SVHN setup's hyper-parameters."""

from experiments.configs import svhn_wrn16_4


def get_config():
  config = svhn_wrn16_4.get_config()
  config.dataset = 'fashion_mnist'
  return config
