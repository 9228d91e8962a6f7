"""Tests for parle_jax.conv: matmul convolutions against lax.conv_general_dilated.

Every convolution shape the models use (read from the models themselves) is
checked in value and in both gradients, in float32 against XLA's convolution
with a tolerance scaled to the values' size.
"""

import functools
import re

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

  (_, logits_xla), g_xla = jax.jit(jax.value_and_grad(functools.partial(loss, model_xla),
                                                       has_aux=True))(variables['params'])
  (_, logits_mm), g_mm = jax.jit(jax.value_and_grad(functools.partial(loss, model_mm),
                                                    has_aux=True))(variables['params'])
  _assert_close(logits_mm, logits_xla, 'logits')
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g_mm), jax.tree.leaves(g_xla)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * (float(np.max(np.abs(want))) + 1e-3),
                               err_msg=jax.tree_util.keystr(path))


# Forward mode: the custom_jvp rules against XLA's convolution and float64 references.

JVP_SHAPES = [
    pytest.param((2, 9, 8, 3), (3, 3, 3, 4), (1, 1), 'SAME', id='3x3-s1-same'),
    pytest.param((2, 9, 8, 3), (3, 3, 3, 4), (2, 2), 'VALID', id='3x3-s2-valid'),
    pytest.param((1, 7, 6, 2), (2, 3, 2, 3), (2, 1), ((1, 0), (2, 1)), id='2x3-s21-explicit'),
    pytest.param((2, 6, 6, 4), (1, 1, 4, 5), (2, 2), 'VALID', id='1x1-s2'),
]


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _jvp(x, kernel, dx, dk, strides, padding, wrt, use_matmul):
  """jax.jvp of the convolution for `wrt` in ('input', 'kernel', 'both')."""
  fn = conv.matmul_conv_general_dilated if use_matmul else lax.conv_general_dilated
  f = lambda x, kernel: fn(x, kernel, strides, padding, dimension_numbers=NHWC)
  if wrt == 'input':
    return jax.jvp(lambda x: f(x, kernel), (x,), (dx,))
  if wrt == 'kernel':
    return jax.jvp(lambda kernel: f(x, kernel), (kernel,), (dk,))
  return jax.jvp(f, (x, kernel), (dx, dk))


@pytest.mark.parametrize('wrt', ['input', 'kernel', 'both'])
@pytest.mark.parametrize('input_shape, kernel_shape, strides, padding', JVP_SHAPES)
def test_jvp_matches_xla(input_shape, kernel_shape, strides, padding, wrt):
  rng = np.random.default_rng(2)
  x, dx = (rng.standard_normal(input_shape, np.float32) for _ in range(2))
  kernel, dk = (rng.standard_normal(kernel_shape, np.float32) for _ in range(2))
  y_xla, t_xla = _jvp(x, kernel, dx, dk, strides, padding, wrt, False)
  y, t = _jvp(x, kernel, dx, dk, strides, padding, wrt, True)
  assert t.shape == t_xla.shape == y_xla.shape
  assert float(np.max(np.abs(t_xla))) > 1  # not a zero tangent
  _assert_close(y, y_xla, 'value')
  _assert_close(t, t_xla, f'tangent for {wrt}')


@functools.partial(jax.jit, static_argnums=2)
def _bfloat16_derivatives(x, kernel, use_matmul):
  fn = conv.matmul_conv_general_dilated if use_matmul else lax.conv_general_dilated
  f = lambda x, k: fn(x, k, (2, 1), 'SAME', dimension_numbers=NHWC,
                      preferred_element_type=jnp.float32)
  y, t = jax.jvp(f, (x, kernel), (x, kernel))
  return (y, t, *jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), (0, 1))(x, kernel))


def test_bfloat16_derivatives_keep_the_operand_dtypes():
  # preferred_element_type=float32: float32 values and tangents, bfloat16 gradients (the casts
  # of the former custom_vjp, now JAX's transpose of dot_general), as XLA's convolution gives.
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 7, 7, 3)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.bfloat16)
  got, want = (_bfloat16_derivatives(x, kernel, use_matmul) for use_matmul in (True, False))
  for what, a, b in zip(('value', 'tangent', 'x gradient', 'kernel gradient'), got, want):
    assert a.dtype == b.dtype == (jnp.float32 if what in ('value', 'tangent') else jnp.bfloat16)
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * float(np.max(np.abs(b))), err_msg=what)

def _dot_generals(jaxpr):
  """The dot_general equations of a closed jaxpr, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found.extend(_dot_generals(sub))
  return found


def _primitives(jaxpr):
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


def test_zero_tangents_compute_no_product_and_the_backward_pass_no_scatter():
  x, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  f = lambda x, kernel: conv.matmul_conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                                         dimension_numbers=NHWC)
  count = lambda fn, *args: len(_dot_generals(jax.make_jaxpr(fn)(*args).jaxpr))
  # The value's product, plus one per tangent that is not a symbolic zero.
  assert count(lambda x, t: jax.jvp(lambda x: f(x, kernel), (x,), (t,)), x, x) == 2
  assert count(lambda k, t: jax.jvp(lambda k: f(x, k), (k,), (t,)), kernel, kernel) == 2
  assert count(lambda x, k: jax.jvp(f, (x, k), (x, k)), x, kernel) == 3
  loss = lambda x, kernel: jnp.sum(jnp.sin(f(x, kernel)))
  assert count(jax.grad(loss, 1), x, kernel) == 2  # no input gradient
  assert count(jax.grad(loss, 0), x, kernel) == 2  # no kernel gradient
  grads = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, kernel).jaxpr
  products = _dot_generals(grads)
  assert len(products) == 3
  # The former custom_vjp's products: the weight gradient (dy^T @ patches)^T, dy^T [D, N]
  # contracting N with patches [N, K]; the input gradient dy [N, D] @ kernel^T [D, K].
  shapes = lambda e: tuple(v.aval.shape for v in (*e.invars, *e.outvars))
  plain = (((1,), (0,)), ((), ()))
  assert {shapes(e): e.params['dimension_numbers'] for e in products} == {
      ((128, 27), (27, 4), (128, 4)): plain,  # the value
      ((4, 128), (128, 27), (4, 27)): plain,  # the weight gradient, before its transpose
      ((128, 4), (4, 27), (128, 27)): plain}  # the input gradient
  assert [p for p in _primitives(grads) if 'scatter' in p] == []
  assert [p for p in _primitives(grads) if 'gather' in p] == ['gather']  # the value's only
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, kernel).compile().as_text()
  ops = re.findall(r'= \S+ ([a-z][\w-]*)\(', hlo)
  assert 'dot' in ops and 'gather' in ops
  assert [op for op in ops if 'scatter' in op] == []


def _np_conv_windows(x, kernel_hw, strides, padding):
  """float64 windows ``[B, Ho, Wo, kh, kw, C]`` of NHWC `x` with explicit `padding`."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  xp = np.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  out_h, out_w = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
  return np.stack([np.stack([xp[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
                             for j in range(kw)], axis=3) for i in range(kh)], axis=3)


def test_hessian_of_a_tiny_conv_loss_against_xla_and_a_float64_formula():
  # loss(x, k) = sum(sin(conv(x, k))), one image, stride (2, 1), asymmetric padding.
  strides, padding = (2, 1), ((1, 1), (0, 1))
  rng = np.random.default_rng(3)
  x = rng.standard_normal((1, 5, 4, 2))
  kernel = rng.standard_normal((3, 2, 2, 2)) / 2

  def loss(fn):
    return lambda x, k: jnp.sum(jnp.sin(fn(x, k, strides, padding, dimension_numbers=NHWC)))

  x32, k32 = x.astype(np.float32), kernel.astype(np.float32)
  hess = jax.jit(jax.hessian(loss(conv.matmul_conv_general_dilated), (0, 1)))(x32, k32)
  hess_xla = jax.jit(jax.hessian(loss(lax.conv_general_dilated), (0, 1)))(x32, k32)

  # y[o, d] = sum_p W[o, p](x) k[p, d], bilinear: with E the windows of the unit images,
  # dy[o, d]/dx_i = sum_p E[i, o, p] k[p, d], dy[o, d]/dk[p, d] = W[o, p], and the cross
  # derivative d2y[o, d]/dx_i dk[p, d'] = E[i, o, p] [d == d'].
  nx, (kh, kw, c, d) = x.size, kernel.shape
  k2 = kernel.reshape(-1, d)
  windows = _np_conv_windows(x, (kh, kw), strides, padding).reshape(-1, kh * kw * c)
  unit = _np_conv_windows(np.eye(nx).reshape((nx,) + x.shape[1:]), (kh, kw), strides,
                          padding).reshape(nx, -1, kh * kw * c)
  y = windows @ k2  # [O, D]
  fp, fpp = np.cos(y), -np.sin(y)
  j_x = np.einsum('iop,pd->odi', unit, k2)  # [O, D, nx]
  j_k = np.einsum('op,de->odpe', windows, np.eye(d))  # [O, D, P, D]
  h_xx = np.einsum('odi,od,odj->ij', j_x, fpp, j_x)
  h_kk = np.einsum('odpe,od,odqf->peqf', j_k, fpp, j_k)
  h_xk = (np.einsum('odi,od,odpe->ipe', j_x, fpp, j_k)
          + np.einsum('od,iop,de->ipe', fp, unit, np.eye(d)))
  expected = {(0, 0): h_xx.reshape(x.shape * 2), (1, 1): h_kk.reshape(kernel.shape * 2),
              (0, 1): h_xk.reshape(x.shape + kernel.shape),
              (1, 0): np.moveaxis(h_xk, 0, -1).reshape(kernel.shape + x.shape)}
  for (a, b), want in expected.items():
    assert hess[a][b].shape == want.shape
    assert float(np.max(np.abs(want))) > 1
    np.testing.assert_allclose(hess[a][b], want, rtol=0, atol=1e-5 * np.max(np.abs(want)),
                               err_msg=f'block {(a, b)} against float64')
    _assert_close(hess[a][b], hess_xla[a][b], f'block {(a, b)} against xla')


@functools.partial(jax.jit, static_argnums=4)
def _linearized(x, kernel, dx, dk, use_matmul):
  """The value, the linearization's tangent and its transpose, and a linearity residual."""
  fn = conv.matmul_conv_general_dilated if use_matmul else lax.conv_general_dilated
  f = lambda x, k: jnp.tanh(fn(x, k, (2, 1), 'SAME', dimension_numbers=NHWC))
  y, f_jvp = jax.linearize(f, x, kernel)
  tangent = f_jvp(dx, dk)
  cotangents = jax.linear_transpose(f_jvp, x, kernel)(tangent)
  residual = f_jvp(2 * dx, -dk) - 2 * f_jvp(dx, 0 * dk) + f_jvp(0 * dx, dk)
  return (y, tangent, *cotangents), residual


def test_linearize_and_its_transpose_match_xla():
  rng = np.random.default_rng(4)
  x, dx = (rng.standard_normal((2, 9, 8, 3), np.float32) for _ in range(2))
  kernel, dk = (rng.standard_normal((3, 3, 3, 4), np.float32) for _ in range(2))
  (got, residual), (want, _) = (_linearized(x, kernel, dx, dk, m) for m in (True, False))
  assert float(np.max(np.abs(residual))) <= 1e-4 * float(np.max(np.abs(got[1])))
  for what, a, b in zip(('value', 'tangent', 'x cotangent', 'kernel cotangent'), got, want):
    _assert_close(a, b, what)

def _lenet_loss(conv_name):
  model = models.LeNet(conv=conv_name)

  def loss(params, batch_stats, images, labels):
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
  return loss


@functools.partial(jax.jit, static_argnums=0,
                   compiler_options={'xla_backend_optimization_level': 0})
def _lenet_grad_and_hvp(conv_name, params, batch_stats, images, labels, direction):
  grad = jax.grad(_lenet_loss(conv_name))
  return jax.jvp(lambda p: grad(p, batch_stats, images, labels), (params,), (direction,))


def test_lenet_gradient_and_hessian_vector_product_match_xla():
  variables = models.init_variables(models.LeNet(conv='xla'), jax.random.key(0), (28, 28, 1))
  rng = np.random.default_rng(5)
  images = rng.standard_normal((4, 28, 28, 1), np.float32)
  labels = np.arange(4) % 10
  leaves, treedef = jax.tree.flatten(variables['params'])
  direction = treedef.unflatten([rng.standard_normal(l.shape, np.float32) for l in leaves])
  args = (variables['params'], variables['batch_stats'], images, labels, direction)
  g_xla, hvp_xla = _lenet_grad_and_hvp('xla', *args)
  g_mm, hvp_mm = _lenet_grad_and_hvp('matmul', *args)
  for what, got_tree, want_tree, tol in (('gradient', g_mm, g_xla, 2e-6),
                                         ('hvp', hvp_mm, hvp_xla, 1e-5)):
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_tree),
                                 jax.tree.leaves(want_tree)):
      scale = float(np.max(np.abs(want)))
      assert scale > 1e-4, (what, jax.tree_util.keystr(path))
      np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale,
                                 err_msg=f'{what} {jax.tree_util.keystr(path)}')
