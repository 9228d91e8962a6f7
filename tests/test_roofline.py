"""The roofline benchmark: FLOPs counted from shapes, and its report on made-up timings."""

import pytest

from experiments import roofline
from parle_jax import models

# LeNet on 28x28x1, multiply-adds x 2 per example (written out by hand):
CONV1 = 24 * 24 * 20 * (5 * 5 * 1) * 2   # 576,000
CONV2 = 4 * 4 * 50 * (5 * 5 * 20) * 2    # 800,000
DENSE1 = 200 * 500 * 2                    # 200,000
DENSE2 = 500 * 10 * 2                     # 10,000


def test_lenet_training_flops_by_hand():
  forward = CONV1 + CONV2 + DENSE1 + DENSE2
  assert sum(layer.forward_flops for layer in models.layer_shapes(models.LeNet(), (28, 28, 1))
             ) == forward == 1_586_000
  # Forward and weight gradients of every layer; input gradients of all but the first.
  per_example = 2 * CONV1 + 3 * (CONV2 + DENSE1 + DENSE2)
  assert roofline.training_flops(models.LeNet(), (28, 28, 1), 128) == 128 * per_example
  assert 128 * per_example == 535_296_000


def test_wrn_flops_count_every_conv_and_the_classifier():
  layers = models.layer_shapes(models.WideResNet(depth=16, width=4), (28, 28, 1))
  assert [l.kind for l in layers].count('conv') == 1 + 3 * (2 * 2 + 1)  # stem, blocks, shortcuts
  assert layers[-1].kind == 'dense' and layers[-1].kernel_shape == (256, 10)
  stem = layers[0]
  assert stem.forward_flops == 28 * 28 * 16 * (3 * 3 * 1) * 2


def _made_up(fractions):
  rows = [{'run': run, 'conv': conv, 'dispatch': dispatch, 'mapping': 'vmap',
           'ms_per_step': 10.0, 'flops_per_second': 1e9 * f, 'fraction_of_matmul': f,
           'round_seconds': [0.1], 'compile_seconds': 1.0}
          for (run, conv, dispatch), f in fractions.items()]
  return {'machine': {'device_kind': 'cpu', 'cpu_count': 2, 'jax': '0.0'},
          'settings': {'L': 10, 'repeats': 1},
          'matmul': {'flops_per_second': 1e11},
          'models': {'lenet': {'batch': 128, 'flops_per_step': 535_296_000,
                               'auto_conv': 'matmul', 'runs': rows}}}


def test_verdicts_judge_the_fused_auto_runs_only():
  results = _made_up({('sgd n=1', 'matmul', 'fused'): 0.21, ('parle n=3', 'matmul', 'fused'): 0.19,
                      ('sgd n=1', 'xla', 'fused'): 0.5, ('sgd n=1', 'matmul', 'per step'): 0.5})
  assert roofline.verdicts(results) == [('sgd n=1', 0.21, True), ('parle n=3', 0.19, False)]
  text = roofline.format_report(results)
  assert 'PASS' in text and 'MISS' in text and '100.0 GFLOP/s' in text
  assert text.count('target:') == 2


@pytest.mark.parametrize('models_, change, match', [
    (['vgg'], {}, 'unknown models'),
    (['lenet'], {'L': 0}, '`L`'),
    (['lenet'], {'repeats': 0}, '`repeats`'),
])
def test_bad_settings_are_refused_before_any_work(models_, change, match):
  settings = dict(L=1, repeats=1, dataset_size=8)
  with pytest.raises(ValueError, match=match):
    roofline.measure(models_, **dict(settings, **change))


def test_measure_runs_end_to_end_on_a_small_batch(monkeypatch):
  monkeypatch.setitem(roofline.MODELS, 'lenet', (('lenet', 10), {'dropout': 0.0}, (28, 28, 1), 4))
  results = roofline.measure(['lenet'], L=2, repeats=1, dataset_size=16)
  lenet = results['models']['lenet']
  assert lenet['auto_conv'] == 'matmul' and lenet['flops_per_step'] == 4 * 4_182_000
  assert [(r['run'], r['conv'], r['dispatch']) for r in lenet['runs']] == [
      ('sgd n=1', 'matmul', 'fused'), ('parle n=3', 'matmul', 'fused'),
      ('sgd n=1', 'xla', 'fused'), ('parle n=3', 'xla', 'fused'),
      ('sgd n=1', 'matmul', 'per step'), ('sgd n=1', 'xla', 'per step')]
  rate = results['matmul']['flops_per_second']
  for row in lenet['runs']:
    assert row['ms_per_step'] > 0 and len(row['round_seconds']) == 1
    assert row['flops_per_second'] == pytest.approx(4 * 4_182_000 / (row['ms_per_step'] / 1000))
    assert row['fraction_of_matmul'] == pytest.approx(row['flops_per_second'] / rate)
