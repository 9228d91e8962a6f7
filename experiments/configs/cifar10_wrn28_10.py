"""WRN-28-10 on CIFAR-10 (paper: Parle 3.24% with n=3, SGD 4.29%).

5 Parle epochs (125 effective epochs), lr 0.1 divided by 5 at epochs 1, 2 and 3,
weight decay 5e-4, dropout 0.25, random flips and 4-pixel pad + crop.
"""

from experiments.configs import base


def get_config():
  config = base.get_config()
  config.dataset = 'cifar10'
  config.augment = True
  config.model = 'wrn'
  config.model_kwargs.depth = 28
  config.model_kwargs.width = 10
  config.model_kwargs.dropout = 0.25
  config.weight_decay = 5e-4
  return config
