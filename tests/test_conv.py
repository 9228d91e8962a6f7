"""Tests for parle_jax.conv: matmul convolutions against lax.conv_general_dilated.

Every convolution shape the models use (read from the models themselves) is
checked in value and in both gradients, in float32 against XLA's convolution
with a tolerance scaled to the values' size.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from parle_jax import conv, models

NHWC = ('NHWC', 'HWIO', 'NHWC')
BATCH = 2
MODEL_SHAPES = {
    'lenet-28x28x1': (models.LeNet(), (28, 28, 1)),
    'allcnn-32x32x3': (models.AllCNN(), (32, 32, 3)),
    'wrn16_4-28x28x1': (models.WideResNet(depth=16, width=4), (28, 28, 1)),
    'wrn16_4-32x32x3': (models.WideResNet(depth=16, width=4), (32, 32, 3)),
}


def _model_convolutions():
  """(id, input shape, kernel shape, strides, padding) of every distinct conv the models run."""
  seen = {}
  for model_name, (model, image_shape) in MODEL_SHAPES.items():
    for layer in models.layer_shapes(model, image_shape, batch=BATCH):
      if layer.kind != 'conv':
        continue
      padding = layer.padding if isinstance(layer.padding, str) else tuple(
          tuple(p) for p in layer.padding)
      key = (layer.input_shape, layer.kernel_shape, layer.strides, padding)
      seen.setdefault(key, f'{model_name}:{layer.name}')
  return [pytest.param(*key, id=name) for key, name in seen.items()]


_jit_o0 = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0},
                            static_argnums=(2, 3, 4))


@_jit_o0
def _value_and_grads(x, kernel, strides, padding, use_matmul):
  """The convolution, and the gradients of a nonlinear function of it for x and kernel."""
  fn = conv.matmul_conv_general_dilated if use_matmul else lax.conv_general_dilated

  def objective(x, kernel):
    y = fn(x, kernel, strides, padding, dimension_numbers=NHWC)
    return jnp.sum(jnp.sin(y)), y

  (_, y), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(x, kernel)
  return y, grads


def _assert_close(actual, expected, what):
  scale = float(np.max(np.abs(expected))) + 1e-6
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0,
                             atol=2e-5 * scale, err_msg=what)


def test_every_model_convolution_is_listed():
  # LeNet's two, All-CNN's seven 3x3/1x1 shapes, WRN's stem, blocks and shortcuts.
  ids = [p.id for p in _model_convolutions()]
  assert len(ids) == len(set(ids))
  assert sum(i.startswith('lenet') for i in ids) == 2
  assert any('shortcut' in i for i in ids)
  assert any(p.values[2] == (2, 2) for p in _model_convolutions())


@pytest.mark.parametrize('input_shape, kernel_shape, strides, padding', _model_convolutions())
def test_matches_xla_in_value_and_both_gradients(input_shape, kernel_shape, strides, padding):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(input_shape, np.float32)
  kernel = rng.standard_normal(kernel_shape, np.float32) / np.sqrt(np.prod(kernel_shape[:3]))
  y_xla, (dx_xla, dk_xla) = _value_and_grads(x, kernel, strides, padding, False)
  y, (dx, dk) = _value_and_grads(x, kernel, strides, padding, True)
  assert y.shape == y_xla.shape
  _assert_close(y, y_xla, 'value')
  _assert_close(dx, dx_xla, 'input gradient')
  _assert_close(dk, dk_xla, 'kernel gradient')


def test_small_case_against_a_direct_sum():
  # One 2x2 kernel, stride 2, asymmetric padding, written out by hand in float64.
  x = np.arange(1 * 3 * 4 * 2, dtype=np.float64).reshape(1, 3, 4, 2) / 10
  kernel = np.arange(2 * 2 * 2 * 3, dtype=np.float64).reshape(2, 2, 2, 3) / 7 - 1
  padded = np.pad(x, ((0, 0), (1, 0), (0, 1), (0, 0)))
  out_h, out_w = (padded.shape[1] - 2) // 2 + 1, (padded.shape[2] - 2) // 2 + 1
  expected = np.zeros((1, out_h, out_w, 3))
  for h in range(out_h):
    for w in range(out_w):
      window = padded[0, 2 * h:2 * h + 2, 2 * w:2 * w + 2]  # [2, 2, C]
      expected[0, h, w] = np.einsum('ijc,ijcd->d', window, kernel)
  y = conv.matmul_conv_general_dilated(x.astype(np.float32), kernel.astype(np.float32), (2, 2),
                                       ((1, 0), (0, 1)), dimension_numbers=NHWC)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_same_padding_and_vmap_over_replicas():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 2, 9, 7, 4), np.float32)  # 3 replicas
  kernel = rng.standard_normal((3, 3, 3, 4, 5), np.float32)
  fn = lambda x, k: conv.matmul_conv_general_dilated(x, k, (2, 1), 'SAME',
                                                     dimension_numbers=NHWC)
  ref = lambda x, k: lax.conv_general_dilated(x, k, (2, 1), 'SAME', dimension_numbers=NHWC)
  loss = lambda f: lambda x, k: jnp.sum(jnp.tanh(jax.vmap(f)(x, k)))
  _assert_close(jax.vmap(fn)(x, kernel), jax.vmap(ref)(x, kernel), 'vmapped value')
  for got, want in zip(jax.grad(loss(fn), (0, 1))(x, kernel),
                       jax.grad(loss(ref), (0, 1))(x, kernel)):
    _assert_close(got, want, 'vmapped gradient')


@pytest.mark.parametrize('kwargs, message', [
    ({'rhs_dilation': (2, 2)}, 'rhs_dilation'),
    ({'lhs_dilation': (2, 1)}, 'lhs_dilation'),
    ({'feature_group_count': 2}, 'feature_group_count=2'),
    ({'dimension_numbers': ('NCHW', 'OIHW', 'NCHW')}, 'dimension_numbers'),
    ({'dimension_numbers': None}, 'dimension_numbers'),
])
def test_unsupported_arguments_are_refused(kwargs, message):
  args = dict(dimension_numbers=NHWC)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    conv.matmul_conv_general_dilated(jnp.ones((1, 6, 6, 4)), jnp.ones((3, 3, 4, 4)), (1, 1),
                                     'VALID', **args)


def test_shape_errors_are_refused():
  with pytest.raises(ValueError, match='input channels'):
    conv.matmul_conv_general_dilated(jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 4, 4)), (1, 1),
                                     'VALID', dimension_numbers=NHWC)
  with pytest.raises(ValueError, match='does not fit'):
    conv.matmul_conv_general_dilated(jnp.ones((1, 2, 2, 1)), jnp.ones((3, 3, 1, 1)), (1, 1),
                                     'VALID', dimension_numbers=NHWC)


def test_resolve_conv_picks_matmul_on_cpu_only():
  assert conv.resolve_conv('auto', 'cpu') == 'matmul'
  assert conv.resolve_conv('auto', 'gpu') == 'xla'
  assert conv.resolve_conv('auto', 'tpu') == 'xla'
  assert conv.resolve_conv('xla', 'cpu') == 'xla'
  assert conv.resolve_conv('matmul', 'gpu') == 'matmul'
  assert conv.resolve_conv('auto') == 'matmul'  # these tests run on CPU
  with pytest.raises(ValueError, match="`conv` must be one of .* got 'cudnn'"):
    conv.resolve_conv('cudnn')


def test_model_conv_field_selects_the_implementation():
  used = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == '__call__':
      used.append(context.module.conv_general_dilated)
    return next_fun(*args, **kwargs)

  x = jnp.ones((1, 28, 28, 1))
  for name, expected in (('xla', lax.conv_general_dilated),
                         ('matmul', conv.matmul_conv_general_dilated),
                         ('auto', conv.matmul_conv_general_dilated)):
    used.clear()
    with nn.intercept_methods(spy):
      jax.eval_shape(lambda: models.LeNet(conv=name).init(jax.random.key(0), x, train=False))
    assert used == [expected, expected], name
  with pytest.raises(ValueError, match='`conv` must be one of'):
    models.create_model('wrn', 10, depth=10, width=1, conv='fast')


def test_models_give_the_same_logits_and_gradients_with_either_conv():
  # Same variables, train mode (batch statistics), both implementations.
  model_xla, model_mm = models.WideResNet(10, 1, conv='xla'), models.WideResNet(10, 1, conv='matmul')
  variables = models.init_variables(model_xla, jax.random.key(0), (32, 32, 3))
  x = np.random.default_rng(0).standard_normal((4, 32, 32, 3), np.float32)

  def loss(model, params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'])
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), logits

  (_, logits_xla), g_xla = jax.value_and_grad(functools.partial(loss, model_xla), has_aux=True)(
      variables['params'])
  (_, logits_mm), g_mm = jax.value_and_grad(functools.partial(loss, model_mm), has_aux=True)(
      variables['params'])
  _assert_close(logits_mm, logits_xla, 'logits')
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g_mm), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * (float(np.max(np.abs(want))) + 1e-3),
                               err_msg=jax.tree_util.keystr(path))
