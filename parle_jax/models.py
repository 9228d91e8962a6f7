"""Networks used in the Parle experiments, as Flax linen modules.

Parle (Chaudhari et al., "Parle: parallel training of deep neural networks",
arXiv:1707.00424) is evaluated on four networks, reproduced here:

* ``LeNet``: the small convolutional network the authors train on MNIST
  (conv 20 / conv 50, 5x5 kernels, max-pool 3 and 2, FC 500, batch norm and
  dropout), following their PyTorch code.
* ``AllCNN``: the All-Convolutional Net of Springenberg et al., "Striving for
  simplicity: the all convolutional net" (arXiv:1412.6806), with batch norm
  after every convolution, as the authors use it on CIFAR-10.
* ``WideResNet``: the wide residual networks of Zagoruyko & Komodakis, "Wide
  residual networks" (arXiv:1605.07146); WRN-28-10 on CIFAR and WRN-16-4 on
  SVHN in the paper.

Every network has a ``conv`` field choosing how its convolutions run
(:mod:`parle_jax.conv`): ``'xla'`` (the backend's own), ``'matmul'`` (one
matmul over image patches, fast on CPU) or ``'auto'`` (``'matmul'`` on CPU,
``'xla'`` elsewhere). The variables and the results are the same either way,
to float rounding, so a checkpoint trained with one runs with the other.

Every module is called as ``model.apply(variables, x, train=...)`` with
float32 NHWC images and returns logits of shape ``[B, num_classes]``. The
variables are exactly ``{'params', 'batch_stats'}``: batch norm keeps its
running statistics in the ``'batch_stats'`` collection (update them with
``mutable=['batch_stats']`` in train mode) and dropout draws from the
``'dropout'`` rng in train mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parle_jax import checks
from parle_jax import conv as conv_lib

# PyTorch's BatchNorm defaults: running = 0.9 * running + 0.1 * batch.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5

# He-normal with fan_out, as ``nn.init.kaiming_normal_(mode='fan_out')`` in the
# reference wide-ResNet code.
_he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _batch_norm(train: bool, name: str | None = None,
                axis_name: str | None = None) -> nn.BatchNorm:
  """Batch norm that normalises with batch statistics only in train mode.

  With `axis_name`, train-mode statistics are averaged over that mapped axis
  (the devices of a replica's island), so they are those of the whole batch.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                      epsilon=_BN_EPSILON, name=name, axis_name=axis_name if train else None)


def _check_fields(module: nn.Module, *rates: str) -> None:
  """Checks a network's ``num_classes``, ``conv`` and the dropout rates named."""
  checks.integer('num_classes', module.num_classes)
  for rate in rates:
    checks.fraction(rate, getattr(module, rate))
  checks.choice('conv', module.conv, conv_lib.CONV_IMPLEMENTATIONS)


def _conv(features: int, kernel_size: int, strides: int = 1, *, conv: str,
          **kwargs: Any) -> nn.Conv:
  """Bias-free square convolution with PyTorch-style symmetric padding.

  The padding keeps the spatial size at stride 1; `conv` is the
  implementation (:mod:`parle_jax.conv`); ``kwargs`` go to ``nn.Conv``.
  """
  pad = (kernel_size - 1) // 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=strides,
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 conv_general_dilated=conv_lib.conv_general_dilated_fn(conv), **kwargs)


def _max_pool(x: jax.Array, window: int) -> jax.Array:
  """Max-pooling with stride = window (VALID), as a reshape and a max.

  Equal to ``nn.max_pool(x, (window, window), strides=(window, window))``; its
  gradient avoids XLA's select-and-scatter, which is about 6x slower on CPU.
  """
  batch, height, width, channels = x.shape
  height, width = height // window * window, width // window * window
  x = x[:, :height, :width].reshape(
      batch, height // window, window, width // window, window, channels)
  return x.max(axis=(2, 4))


def _global_avg_pool(x: jax.Array) -> jax.Array:
  """Averages an NHWC feature map over its spatial axes."""
  return jnp.mean(x, axis=(1, 2))


class LeNet(nn.Module):
  """LeNet for MNIST as in the Parle authors' code.

  conv5x5(20)-BN-ReLU-maxpool3-dropout, conv5x5(50)-BN-ReLU-maxpool2-dropout,
  FC 500-BN-ReLU-dropout, FC ``num_classes``. Convolutions are VALID, so a
  28x28 input reaches the first dense layer as 2x2x50 = 200 features.
  ``batch_norm_axis_name`` (here and in every model): the mapped axis over
  which train-mode batch statistics are averaged (a replica's island, see
  ``Replicas.data_axis_name``); None for the device's own batch.
  """

  num_classes: int = 10
  dropout: float = 0.25
  conv: str = 'auto'
  batch_norm_axis_name: str | None = None

  def __post_init__(self) -> None:
    _check_fields(self, 'dropout')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = conv_lib.conv_general_dilated_fn(self.conv)
    for features, pool in ((20, 3), (50, 2)):
      x = nn.Conv(features, (5, 5), padding='VALID', conv_general_dilated=conv)(x)
      x = nn.relu(_batch_norm(train, axis_name=self.batch_norm_axis_name)(x))
      x = _max_pool(x, pool)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(500)(x)
    x = nn.relu(_batch_norm(train, axis_name=self.batch_norm_axis_name)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class ConvBN(nn.Module):
  """Bias-free convolution, batch norm and ReLU; the size is kept at stride 1."""

  features: int
  kernel_size: int
  strides: int = 1
  conv: str = 'auto'
  batch_norm_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = _conv(self.features, self.kernel_size, self.strides, conv=self.conv)(x)
    return nn.relu(_batch_norm(train, axis_name=self.batch_norm_axis_name)(x))


class AllCNN(nn.Module):
  """All-CNN-C (Springenberg et al.) with batch norm, for 32x32 CIFAR images.

  dropout(input) -> 3x [3x3, 96] (last with stride 2) -> dropout
  -> 3x [3x3, 192] (last with stride 2) -> dropout
  -> [3x3, 192] -> [1x1, 192] -> [1x1, num_classes] -> global average pool.
  Every convolution is a ``ConvBN``, the last one included (as the authors
  do), so the logits are averages of ReLU outputs.
  """

  num_classes: int = 10
  input_dropout: float = 0.2
  dropout: float = 0.5
  conv: str = 'auto'
  batch_norm_axis_name: str | None = None

  def __post_init__(self) -> None:
    _check_fields(self, 'input_dropout', 'dropout')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv_bn = functools.partial(ConvBN, conv=self.conv,
                                batch_norm_axis_name=self.batch_norm_axis_name)
    x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
    for features in (96, 192):
      x = conv_bn(features, 3)(x, train=train)
      x = conv_bn(features, 3)(x, train=train)
      x = conv_bn(features, 3, strides=2)(x, train=train)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = conv_bn(192, 3)(x, train=train)
    x = conv_bn(192, 1)(x, train=train)
    x = conv_bn(self.num_classes, 1)(x, train=train)
    return _global_avg_pool(x)


def _wrn_conv(features: int, kernel_size: int, strides: int, name: str, conv: str) -> nn.Conv:
  """Wide-ResNet convolution: bias-free, He-initialised (fan_out)."""
  return _conv(features, kernel_size, strides, conv=conv, kernel_init=_he_normal_fan_out,
               name=name)


class WideBasicBlock(nn.Module):
  """Pre-activation basic block of a wide ResNet.

  BN-ReLU-conv3x3(stride)-dropout-BN-ReLU-conv3x3 plus the identity, or,
  when the shape changes, a strided 1x1 convolution applied to the
  pre-activated input (as in the reference implementation).
  """

  features: int
  strides: int
  dropout: float
  conv: str = 'auto'
  batch_norm_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    preact = nn.relu(_batch_norm(train, 'bn1', self.batch_norm_axis_name)(x))
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = _wrn_conv(self.features, 1, self.strides, 'shortcut', self.conv)(preact)
    else:
      shortcut = x
    y = _wrn_conv(self.features, 3, self.strides, 'conv1', self.conv)(preact)
    y = nn.relu(_batch_norm(train, 'bn2', self.batch_norm_axis_name)(y))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = _wrn_conv(self.features, 3, 1, 'conv2', self.conv)(y)
    return shortcut + y


class WideResNet(nn.Module):
  """WRN-depth-width of Zagoruyko & Komodakis.

  conv3x3(16), then three groups of ``(depth - 4) / 6`` ``WideBasicBlock``s
  with 16, 32 and 64 times ``width`` channels and strides 1, 2, 2, then
  BN-ReLU, global average pooling and a dense classifier.
  """

  depth: int = 28
  width: int = 10
  num_classes: int = 10
  dropout: float = 0.0
  conv: str = 'auto'
  batch_norm_axis_name: str | None = None

  def __post_init__(self) -> None:
    if self.depth < 10 or (self.depth - 4) % 6 != 0:
      raise ValueError(
          f'depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {self.depth!r}')
    checks.integer('width', self.width)
    _check_fields(self, 'dropout')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    blocks_per_group = (self.depth - 4) // 6
    x = _wrn_conv(16, 3, 1, 'stem', self.conv)(x)
    for group, (multiplier, strides) in enumerate(((16, 1), (32, 2), (64, 2))):
      for block in range(blocks_per_group):
        x = WideBasicBlock(features=multiplier * self.width,
                           strides=strides if block == 0 else 1,
                           dropout=self.dropout, conv=self.conv,
                           batch_norm_axis_name=self.batch_norm_axis_name,
                           name=f'group{group}_block{block}')(x, train=train)
    x = nn.relu(_batch_norm(train, 'bn_final', self.batch_norm_axis_name)(x))
    x = _global_avg_pool(x)
    return nn.Dense(self.num_classes, bias_init=nn.initializers.zeros, name='classifier')(x)


_CONSTRUCTORS: dict[str, Callable[..., nn.Module]] = {
    'lenet': LeNet,
    'allcnn': AllCNN,
    'wrn': WideResNet,
}
MODELS: tuple[str, ...] = tuple(_CONSTRUCTORS)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the network called ``name`` (one of ``MODELS``).

  ``kwargs`` go to the module's constructor, e.g. ``depth``, ``width`` and
  ``dropout`` for ``'wrn'``.
  """
  if name not in _CONSTRUCTORS:
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
  return _CONSTRUCTORS[name](num_classes=num_classes, **kwargs)


def init_variables(model: nn.Module, rng: jax.Array,
                   image_shape: Sequence[int]) -> dict[str, Any]:
  """Initialises ``model`` on a dummy ``(1, *image_shape)`` batch in eval mode.

  Returns ``{'params': ..., 'batch_stats': ...}``. Pure in ``rng``, so
  ``jax.vmap`` over a batch of keys gives differently-initialised replicas.
  """
  return _jitted_init(model, rng, tuple(image_shape))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_init(model: nn.Module, rng: jax.Array,
                 image_shape: tuple[int, ...]) -> dict[str, Any]:
  """``init_variables`` compiled once per (model, shape) rather than run op by op."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init({'params': rng}, dummy, train=False)
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


class LayerShape(NamedTuple):
  """One convolution or dense layer of a forward pass, as shapes.

  Attributes:
    name: the module's path, e.g. ``'Conv_0'`` or ``'group1_block0/conv1'``.
    kind: ``'conv'`` or ``'dense'``.
    input_shape: the layer's input, batch axis first.
    kernel_shape: ``(kh, kw, C, D)`` for a convolution, ``(C, D)`` for a dense layer.
    strides: ``(sh, sw)``; ``()`` for a dense layer.
    padding: as given to ``nn.Conv`` (``'VALID'``, ``'SAME'`` or pairs); None for dense.
    output_shape: the layer's output, batch axis first.
  """

  name: str
  kind: str
  input_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Any
  output_shape: tuple[int, ...]

  @property
  def forward_flops(self) -> int:
    """Multiply-adds of the layer for one example, times 2."""
    return 2 * int(np.prod(self.output_shape[1:-1], dtype=np.int64)) * int(
        np.prod(self.kernel_shape, dtype=np.int64))


def layer_shapes(model: nn.Module, image_shape: Sequence[int], batch: int = 1
                 ) -> list[LayerShape]:
  """The convolutions and dense layers of `model` on ``[batch, *image_shape]``, in call order.

  Computed from shapes only (``jax.eval_shape``): nothing runs.

  Examples:
    >>> from parle_jax import models
    >>> [(l.kind, l.kernel_shape) for l in models.layer_shapes(models.LeNet(), (28, 28, 1))]
    [('conv', (5, 5, 1, 20)), ('conv', (5, 5, 20, 50)), ('dense', (200, 500)), ('dense', (500, 10))]
  """
  found: list[LayerShape] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Conv, nn.Dense)):
      x = args[0] if args else kwargs['inputs']
      name = '/'.join(module.path)
      if isinstance(module, nn.Conv):
        strides = module.strides or 1
        strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
        found.append(LayerShape(name, 'conv', tuple(x.shape),
                                tuple(module.kernel_size) + (x.shape[-1], module.features),
                                strides, module.padding, tuple(out.shape)))
      else:
        found.append(LayerShape(name, 'dense', tuple(x.shape), (x.shape[-1], module.features),
                                (), None, tuple(out.shape)))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, *image_shape)),
                                      train=False))
  return found
