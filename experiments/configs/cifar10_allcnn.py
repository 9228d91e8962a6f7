"""All-CNN on CIFAR-10 (paper: Parle 5.18% with n=3, SGD 6.15%).

10 Parle epochs, learning rate divided by 5 every 2; weight decay 1e-3; input
dropout 0.2; random flips and 4-pixel pad + crop.
"""

from experiments.configs import base


def get_config():
  config = base.get_config()
  config.dataset = 'cifar10'
  config.augment = True
  config.model = 'allcnn'
  config.model_kwargs.input_dropout = 0.2
  config.model_kwargs.dropout = 0.5
  config.weight_decay = 1e-3
  config.epochs = 10.0
  config.lr_drop_epochs = (2, 4, 6, 8)
  return config
