"""LeNet on MNIST (paper: Parle 0.44% test error with n=6, SGD 0.50%); as Fashion-MNIST."""

from experiments.configs import fashion_mnist_lenet


def get_config():
  config = fashion_mnist_lenet.get_config()
  config.dataset = 'mnist'
  return config
