"""Tests for parle_jax.models: shapes, parameter counts, batch norm, dropout, init."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from parle_jax.models import MODELS, AllCNN, LeNet, WideResNet, create_model, init_variables

MNIST_SHAPE = (28, 28, 1)
CIFAR_SHAPE = (32, 32, 3)
BATCH = 4

# One instance per configuration, shared by the tests, so that each compiled
# function below is built once per session.
LENET = LeNet()
ALLCNN_100 = AllCNN(num_classes=100)
WRN_10_1 = WideResNet(depth=10, width=1, dropout=0.3)

# Compiling dominates these tiny CPU runs (XLA takes seconds to optimise the
# random number generation of init and dropout), so the tests compile
# unoptimised. A top-level jit also compiles each test function as one program
# rather than running flax op by op.
_jit_o0 = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


@functools.partial(_jit_o0, static_argnums=(0, 2))
def _init(model, rng, image_shape):
  return init_variables(model, rng, image_shape)


@functools.partial(_jit_o0, static_argnames=('model', 'train'))
def _forward(model, variables, x, dropout_rng=None, *, train):
  """Eval mode returns logits; train mode returns (logits, new batch_stats)."""
  if not train:
    return model.apply(variables, x, train=False)
  rngs = None if dropout_rng is None else {'dropout': dropout_rng}
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)
  return logits, updates['batch_stats']


def _images(shape, batch=BATCH, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _num_params(model, image_shape):
  """Parameter count from shapes only (no real initialisation)."""
  shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize(
    'model, image_shape, num_classes',
    [(LENET, MNIST_SHAPE, 10), (ALLCNN_100, CIFAR_SHAPE, 100),
     (WRN_10_1, CIFAR_SHAPE, 10), (WRN_10_1, MNIST_SHAPE, 10)],
    ids=['lenet', 'allcnn', 'wrn-10-1-cifar', 'wrn-10-1-mnist'])
def test_output_shapes_and_collections(model, image_shape, num_classes):
  # Shapes only: traced, not compiled.
  variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), image_shape))
  assert set(variables) == {'params', 'batch_stats'}
  x = jax.ShapeDtypeStruct((3, *image_shape), jnp.float32)

  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert logits.shape == (3, num_classes)
  assert logits.dtype == jnp.float32

  logits, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                               rngs={'dropout': jax.random.key(1)}),
      variables, x)
  assert logits.shape == (3, num_classes)
  assert set(updates) == {'batch_stats'}
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(variables['batch_stats'])


@pytest.mark.parametrize(
    'model, image_shape',
    [(LENET, MNIST_SHAPE), (ALLCNN_100, CIFAR_SHAPE), (WRN_10_1, CIFAR_SHAPE)],
    ids=['lenet', 'allcnn', 'wrn-10-1'])
def test_forward_is_finite(model, image_shape):
  variables = _init(model, jax.random.key(0), image_shape)
  x = _images(image_shape)
  assert np.all(np.isfinite(_forward(model, variables, x, train=False)))
  logits, batch_stats = _forward(model, variables, x, jax.random.key(1), train=True)
  assert np.all(np.isfinite(logits))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(batch_stats))


def test_lenet_parameter_count():
  expected = (
      (5 * 5 * 1 * 20 + 20)  # conv1 kernel + bias = 520
      + 2 * 20  # bn1 scale + bias = 40
      + (5 * 5 * 20 * 50 + 50)  # conv2 = 25050
      + 2 * 50  # bn2 = 100
      + (2 * 2 * 50 * 500 + 500)  # dense 200 -> 500 = 100500
      + 2 * 500  # bn3 = 1000
      + (500 * 10 + 10))  # dense 500 -> 10 = 5010
  assert expected == 132_220
  assert _num_params(LENET, MNIST_SHAPE) == expected


def test_allcnn_parameter_count():
  # Bias-free conv kernels + BN scale and bias, as (kernel size, in, out):
  convs = [(3, 3, 96), (3, 96, 96), (3, 96, 96),
           (3, 96, 192), (3, 192, 192), (3, 192, 192),
           (3, 192, 192), (1, 192, 192), (1, 192, 10)]
  expected = sum(k * k * cin * cout + 2 * cout for k, cin, cout in convs)
  assert expected == 1_370_996
  assert _num_params(AllCNN(), CIFAR_SHAPE) == expected


def test_wrn_parameter_counts_match_paper():
  # Zagoruyko & Komodakis: WRN-28-10 has 36.5M parameters and WRN-16-4 2.7M
  # (36,479,194 and 2,748,890 in the reference PyTorch code).
  wrn_28_10 = _num_params(WideResNet(depth=28, width=10), CIFAR_SHAPE)
  assert abs(wrn_28_10 - 36.5e6) / 36.5e6 < 0.01
  assert wrn_28_10 == 36_479_194
  wrn_16_4 = _num_params(WideResNet(depth=16, width=4), CIFAR_SHAPE)
  assert abs(wrn_16_4 - 2.75e6) / 2.75e6 < 0.02
  assert wrn_16_4 == 2_748_890


def test_batch_norm_train_updates_stats_and_eval_uses_them():
  variables = _init(LENET, jax.random.key(0), MNIST_SHAPE)
  model = LeNet(dropout=0.0)  # same variables as LENET, deterministic in train mode
  x = _images(MNIST_SHAPE) * 2.0 + 1.0
  for bn in variables['batch_stats'].values():
    np.testing.assert_array_equal(bn['mean'], 0.0)
    np.testing.assert_array_equal(bn['var'], 1.0)

  out_train, new_stats = _forward(model, variables, x, train=True)
  # First BN: running mean = 0.9 * 0 + 0.1 * batch mean of conv1's output,
  # running var = 0.9 * 1 + 0.1 * (biased) batch variance.
  conv1 = nn.Conv(20, (5, 5), padding='VALID')
  conv1_out = np.asarray(conv1.apply({'params': variables['params']['Conv_0']}, x))
  batch_mean = conv1_out.mean(axis=(0, 1, 2))
  batch_var = conv1_out.var(axis=(0, 1, 2))
  bn1 = new_stats['BatchNorm_0']
  np.testing.assert_allclose(bn1['mean'], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bn1['var'], 0.9 + 0.1 * batch_var, rtol=1e-4)
  assert _max_diff(bn1['mean'], 0.0) > 1e-3

  # Train mode normalises with batch statistics: the stored ones do not
  # matter, and an example's output depends on the rest of the batch.
  updated = {'params': variables['params'], 'batch_stats': new_stats}
  out_train_updated, _ = _forward(model, updated, x, train=True)
  np.testing.assert_allclose(out_train, out_train_updated, rtol=1e-5, atol=1e-5)
  out_train_head, _ = _forward(model, updated, x[:2], train=True)
  assert _max_diff(out_train_head, out_train[:2]) > 1e-3

  # Eval mode normalises with the stored statistics: they change the
  # output, and examples are independent of the rest of the batch.
  out_eval_init = _forward(model, variables, x, train=False)
  out_eval_updated = _forward(model, updated, x, train=False)
  assert _max_diff(out_eval_init, out_eval_updated) > 1e-3
  np.testing.assert_allclose(_forward(model, updated, x[:2], train=False),
                             out_eval_updated[:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('model, image_shape',
                         [(LENET, MNIST_SHAPE), (WRN_10_1, CIFAR_SHAPE)],
                         ids=['lenet', 'wrn-10-1'])
def test_dropout_uses_rng_in_train_mode_only(model, image_shape):
  variables = _init(model, jax.random.key(0), image_shape)
  x = _images(image_shape)

  def train_out(seed):
    return _forward(model, variables, x, jax.random.key(seed), train=True)[0]

  np.testing.assert_array_equal(train_out(1), train_out(1))
  assert _max_diff(train_out(1), train_out(2)) > 1e-4
  # Eval mode needs no dropout rng and is deterministic.
  np.testing.assert_array_equal(_forward(model, variables, x, train=False),
                                _forward(model, variables, x, train=False))


def test_vmapped_init_gives_distinct_replicas():
  @_jit_o0
  def make_replicas(key):
    keys = jax.random.split(key, 3)
    # As the trainer builds its replicas.
    return keys, jax.vmap(lambda k: init_variables(WRN_10_1, k, CIFAR_SHAPE))(keys)

  keys, replicas = make_replicas(jax.random.key(0))
  plain = _init(WRN_10_1, keys[1], CIFAR_SHAPE)

  assert set(replicas) == {'params', 'batch_stats'}
  assert jax.tree.structure(replicas) == jax.tree.structure(plain)
  for stacked, leaf in zip(jax.tree.leaves(replicas), jax.tree.leaves(plain)):
    assert stacked.shape == (3, *leaf.shape)
    # Replica i is what a plain init with keys[i] gives.
    np.testing.assert_allclose(stacked[1], leaf, rtol=1e-6, atol=1e-6)

  for name in ('stem', 'classifier'):
    kernels = replicas['params'][name]['kernel']
    for i, j in ((0, 1), (0, 2), (1, 2)):
      assert _max_diff(kernels[i], kernels[j]) > 1e-3
  # BN running statistics start identical (0 mean, unit variance) in every replica.
  bn = replicas['batch_stats']['group0_block0']['bn1']
  np.testing.assert_array_equal(bn['mean'], 0.0)
  np.testing.assert_array_equal(bn['var'], 1.0)


def test_wrn_he_init_scale():
  # He-normal with fan_out: std = sqrt(2 / (3 * 3 * out_channels)).
  params = _init(WRN_10_1, jax.random.key(0), CIFAR_SHAPE)['params']
  kernel = np.asarray(params['group2_block0']['conv2']['kernel'])  # 3x3, 64 -> 64: 36864 draws
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 64)), rtol=0.02)
  np.testing.assert_allclose(kernel.mean(), 0.0, atol=0.003)


def test_create_model():
  assert MODELS == ('lenet', 'allcnn', 'wrn')
  assert create_model('lenet', 10) == LeNet(num_classes=10)
  assert create_model('allcnn', 100) == AllCNN(num_classes=100)
  wrn = create_model('wrn', 100, depth=16, width=4, dropout=0.4)
  assert wrn == WideResNet(depth=16, width=4, num_classes=100, dropout=0.4)


def test_create_model_unknown_name():
  with pytest.raises(ValueError, match='resnet50') as info:
    create_model('resnet50', 10)
  for name in MODELS:
    assert name in str(info.value)


@pytest.mark.parametrize('build, field', [
    (lambda: create_model('wrn', 10, depth=27), 'depth'),
    (lambda: WideResNet(depth=4), 'depth'),
    (lambda: WideResNet(width=0), 'width'),
    (lambda: WideResNet(dropout=-0.1), 'dropout'),
    (lambda: LeNet(dropout=1.0), 'dropout'),
    (lambda: create_model('lenet', 10, dropout=-0.5), 'dropout'),
    (lambda: AllCNN(input_dropout=1.5), 'input_dropout'),
    (lambda: AllCNN(dropout=1.0), 'dropout'),
    (lambda: create_model('allcnn', 0), 'num_classes'),
])
def test_bad_constructor_values(build, field):
  with pytest.raises(ValueError, match=field):
    build()


def test_lenet_sgd_lowers_loss():
  variables = _init(LENET, jax.random.key(0), MNIST_SHAPE)
  x = _images(MNIST_SHAPE, batch=16, seed=1)
  y = np.arange(16) % 10
  tx = optax.sgd(0.05, momentum=0.9, nesterov=True)

  def loss_fn(params, batch_stats, rng):
    logits, updates = LENET.apply({'params': params, 'batch_stats': batch_stats}, x,
                                  train=True, mutable=['batch_stats'], rngs={'dropout': rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates['batch_stats']

  @_jit_o0
  def step(params, batch_stats, opt_state, i):
    rng = jax.random.fold_in(jax.random.key(2), i)
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = _jit_o0(tx.init)(params)
  losses = []
  for i in range(15):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, i)
    losses.append(float(loss))
  assert losses[0] > 1.5  # about log(10) at init
  assert losses[-1] < 0.5 * losses[0], losses
