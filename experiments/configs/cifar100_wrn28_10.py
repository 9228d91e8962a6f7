"""WRN-28-10 on CIFAR-100 (paper: Parle 17.64% with n=3, SGD 18.85%); as CIFAR-10."""

from experiments.configs import cifar10_wrn28_10


def get_config():
  config = cifar10_wrn28_10.get_config()
  config.dataset = 'cifar100'
  return config
