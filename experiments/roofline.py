r"""How close a training step runs to this machine's matmul speed (a roofline).

  python -m experiments.roofline                     # LeNet b128, All-CNN b32, WRN-16-4 b8
  python -m experiments.roofline --models=lenet --json_out=/tmp/roofline.json

For each model, in ONE process, on ONE device:

* **FLOPs per training step**, counted from the model's shapes
  (:func:`parle_jax.models.layer_shapes`): per example, the forward pass of
  every convolution and dense layer (2 FLOPs per multiply-add), their weight
  gradients (as many again), and their input gradients except the first
  layer's (the images need none). Batch norm, activations, pooling and the
  optimizer are not counted: the step's time includes them, its FLOPs do not.
* **Time per step** of the project's own training rounds (built as
  ``experiments.train`` builds them: :func:`experiments.benchmark.build_training_round`):
  SGD with Nesterov momentum on one model (n=1), and Parle with n=3 replicas on
  the one device (``mapping='auto'``), reported per replica-step (round time /
  (L * n)). Each runs with the convolutions ``'auto'`` picks on this backend;
  for LeNet also with the other implementation, and as one jitted step per
  dispatch (a round of L=1 called L times), so the table shows what the choice
  is worth.
* **The matmul rate**: ``a @ b`` of two 1024x1024 float32 matrices under
  ``jax.jit``, in the same process.

All candidates are compiled first, then timed in turns (one round of each
per repeat, the matmul between them), so that the machine's drift (this
project's CPU machines share their host) touches all alike; each time is the
minimum over repeats. The ratio FLOP/s / matmul FLOP/s is the roofline
figure. Target (printed with PASS/MISS, never asserted): LeNet at batch 128,
SGD n=1 and Parle n=3 at :data:`TARGET_FRACTION` of the matmul rate or more.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import benchmark, machine
from parle_jax import conv as conv_lib
from parle_jax import models, training

FLAGS = flags.FLAGS
# name -> (create_model args, kwargs, image shape, batch per replica): the sizes.
MODELS = {
    'lenet': (('lenet', 10), {}, (28, 28, 1), 128),
    'allcnn': (('allcnn', 10), {}, (32, 32, 3), 32),
    'wrn16_4': (('wrn', 10), {'depth': 16, 'width': 4}, (28, 28, 1), 8),
}
TARGET_MODEL = 'lenet'
TARGET_FRACTION = 0.20
MATMUL_SIZE = 1024


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_list('models', list(MODELS), f'Models to measure, of {list(MODELS)}.')
  flags.DEFINE_integer('L', 10, 'Steps per round (one dispatch) for every run.')
  flags.DEFINE_integer('repeats', 5, 'Rounds timed per run (the minimum is reported).')
  flags.DEFINE_integer('dataset_size', 2048, 'Random examples kept on the device.')
  flags.DEFINE_string('json_out', None, 'Optional path for all measurements as JSON.')


def training_flops(model, image_shape: Sequence[int], batch: int) -> int:
  """FLOPs of one training step of `batch` examples, from the layer shapes (see above)."""
  layers = models.layer_shapes(model, image_shape)
  per_example = sum(layer.forward_flops * (2 if i == 0 else 3) for i, layer in enumerate(layers))
  return batch * per_example


def matmul_fn(size: int = MATMUL_SIZE) -> tuple[Callable[[], Any], float]:
  """(a thunk running one jitted ``a @ b``, its FLOPs)."""
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.standard_normal((size, size), np.float32)) for _ in range(2))
  product = jax.jit(jnp.matmul)
  jax.block_until_ready(product(a, b))
  return (lambda: product(a, b)), 2.0 * size ** 3


class _Run:
  """A compiled round and its state; ``tick()`` runs `calls` rounds and returns their time."""

  def __init__(self, label: str, round_fn, state, data, *, steps: int, replicas: int,
               calls: int = 1):
    self.label, self.round_fn, self.data = label, round_fn, data
    self.steps, self.replicas, self.calls = steps, replicas, calls
    self.compile_seconds = round_fn.warm_up(state, data)
    self.state = state
    self.seconds: list[float] = []

  def tick(self) -> None:
    start = time.perf_counter()
    for _ in range(self.calls):
      self.state = self.round_fn(self.state, self.data)[0]
    jax.block_until_ready(self.state)
    self.seconds.append(time.perf_counter() - start)

  @property
  def seconds_per_step(self) -> float:
    """Per replica-step: the best round's time over its steps of all replicas."""
    return min(self.seconds) / (self.steps * self.replicas)


def _runs(name: str, *, L: int, dataset_size: int) -> tuple[list[_Run], dict[str, Any]]:
  """The rounds measured for one model, compiled and warmed up, and the model's facts."""
  args, kwargs, image_shape, batch = MODELS[name]
  device = jax.devices()[0]
  host_data = benchmark.random_dataset(image_shape, dataset_size)
  chosen = conv_lib.resolve_conv('auto', device.platform)
  other = 'xla' if chosen == 'matmul' else 'matmul'
  variants = [(chosen, 'fused')]
  if name == TARGET_MODEL:
    variants += [(other, 'fused'), (chosen, 'per step'), (other, 'per step')]
  runs, flops = [], None
  for conv, dispatch in variants:
    model = models.create_model(*args, conv=conv, **kwargs)
    flops = training_flops(model, image_shape, batch)
    loss_fn = training.classification_loss(model)
    variables = jax.device_get(training.init_replica_variables(
        model, jax.random.PRNGKey(1), 3, image_shape))
    optimizers = ('sgd', 'parle') if dispatch == 'fused' else ('sgd',)
    for optimizer in optimizers:
      steps = L if dispatch == 'fused' else 1
      round_fn, state, data, plan = benchmark.build_training_round(
          optimizer, loss_fn=loss_fn, variables=variables, host_data=host_data, L=steps,
          batch=batch, num_replicas=3, device=device)
      label = f'{optimizer} n={plan.num_replicas}'
      runs.append(_Run(label, round_fn, state, data, steps=L, replicas=plan.num_replicas,
                       calls=L // steps))
      runs[-1].conv, runs[-1].dispatch = conv, dispatch
  facts = {'batch': batch, 'image_shape': list(image_shape), 'flops_per_step': flops,
           'auto_conv': chosen}
  return runs, facts


def measure(model_names: Sequence[str], *, L: int, repeats: int, dataset_size: int
            ) -> dict[str, Any]:
  """All measurements, interleaved: see the module docstring."""
  unknown = [m for m in model_names if m not in MODELS]
  if unknown:
    raise ValueError(f'unknown models {unknown}; expected some of {list(MODELS)}')
  for key, value in (('L', L), ('repeats', repeats), ('dataset_size', dataset_size)):
    if value < 1:
      raise ValueError(f'`{key}` must be >= 1, got {value}.')
  product, product_flops = matmul_fn()
  built = {name: _runs(name, L=L, dataset_size=dataset_size) for name in model_names}
  matmul_seconds = []
  for _ in range(repeats):
    for runs, _ in built.values():
      for run in runs:
        run.tick()
      start = time.perf_counter()
      for _ in range(10):
        out = product()
      jax.block_until_ready(out)
      matmul_seconds.append((time.perf_counter() - start) / 10)
  matmul_rate = product_flops / min(matmul_seconds)
  results = {'machine': machine.describe(), 'settings': {'L': L, 'repeats': repeats},
             'matmul': {'size': MATMUL_SIZE, 'flops_per_second': matmul_rate,
                        'seconds': matmul_seconds}, 'models': {}}
  for name, (runs, facts) in built.items():
    rows = []
    for run in runs:
      rate = facts['flops_per_step'] / run.seconds_per_step
      rows.append({'run': run.label, 'conv': run.conv, 'dispatch': run.dispatch,
                   'mapping': run.round_fn.mapping, 'ms_per_step': 1000 * run.seconds_per_step,
                   'flops_per_second': rate, 'fraction_of_matmul': rate / matmul_rate,
                   'round_seconds': run.seconds, 'compile_seconds': run.compile_seconds})
    results['models'][name] = dict(facts, runs=rows)
  return results


def verdicts(results: dict[str, Any]) -> list[tuple[str, float, bool]]:
  """(run, fraction of the matmul rate, meets the target) for the target model's fused, auto runs."""
  model = results['models'].get(TARGET_MODEL)
  if model is None:
    return []
  return [(row['run'], row['fraction_of_matmul'], row['fraction_of_matmul'] >= TARGET_FRACTION)
          for row in model['runs'] if row['dispatch'] == 'fused'
          and row['conv'] == model['auto_conv']]


def format_report(results: dict[str, Any]) -> str:
  """The roofline table, then the target verdicts."""
  m = results['machine']
  matmul = results['matmul']['flops_per_second']
  lines = [f"{m['device_kind']} ({m['cpu_count']} CPUs, jax {m['jax']}): "
           f"{MATMUL_SIZE}x{MATMUL_SIZE} float32 matmul {matmul / 1e9:.1f} GFLOP/s; "
           f"L={results['settings']['L']}, best of {results['settings']['repeats']} rounds",
           f"{'model':<9} {'batch':>5} {'MFLOP/step':>10} {'run':<9} {'conv':<7} "
           f"{'dispatch':<9} {'mapping':<11} {'ms/step':>8} {'GFLOP/s':>8} {'of matmul':>9}"]
  for name, model in results['models'].items():
    for row in model['runs']:
      lines.append(
          f"{name:<9} {model['batch']:>5} {model['flops_per_step'] / 1e6:>10.1f} "
          f"{row['run']:<9} {row['conv']:<7} {row['dispatch']:<9} {row['mapping']:<11} "
          f"{row['ms_per_step']:>8.2f} {row['flops_per_second'] / 1e9:>8.2f} "
          f"{100 * row['fraction_of_matmul']:>8.1f}%")
  lines.append('ms/step is per replica-step (Parle n=3: round time / (3 L)); FLOPs are '
               'those of convolutions and dense layers.')
  for run, fraction, ok in verdicts(results):
    lines.append(f"target: {TARGET_MODEL} {run} at {100 * fraction:.1f}% of the matmul rate "
                 f"(>= {100 * TARGET_FRACTION:.0f}%)  {'PASS' if ok else 'MISS'}")
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  results = measure(FLAGS.models, L=FLAGS.L, repeats=FLAGS.repeats,
                    dataset_size=FLAGS.dataset_size)
  benchmark.print_and_save(format_report(results), results, FLAGS.json_out)


if __name__ == '__main__':
  define_flags()
  app.run(main)
