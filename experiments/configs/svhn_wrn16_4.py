"""WRN-16-4 on SVHN (train + extra; paper: Parle 1.68% with n=3, SGD 1.62%).

5 Parle epochs, lr 0.1 divided by 5 at epochs 1, 2 and 3, weight decay 5e-4, dropout 0.4.
"""

from experiments.configs import base


def get_config():
  config = base.get_config()
  config.dataset = 'svhn_cropped'
  config.model = 'wrn'
  config.model_kwargs.depth = 16
  config.model_kwargs.width = 4
  config.model_kwargs.dropout = 0.4
  config.weight_decay = 5e-4
  return config
