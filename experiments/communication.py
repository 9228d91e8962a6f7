r"""What Parle and the baselines (data-parallel SGD, Elastic-SGD, local SGD, DiLoCo) send.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.communication

Three parts, printed as tables:

1. **Accounting** (exact, from the model size and the schedule): all-reduces
   and bytes per epoch. Every all-reduce carries one float32 copy of the
   weights (Parle, Elastic-SGD, local SGD), of the pseudo-gradients (DiLoCo)
   or of the gradients (data-parallel SGD): ``4 P`` bytes for ``P``
   parameters. Per mini-batch step of a worker, data-parallel SGD and
   Elastic-SGD all-reduce once, Parle, local SGD and DiLoCo once per ``L``.
   An epoch is one pass over the training set (``N`` examples) by every
   replica for all but data-parallel SGD (``ceil(N / b)`` steps each), and one pass
   shared by the ``n`` workers for data-parallel SGD (``ceil(N / (n b))``
   steps each, global batch ``n b``).
2. **Check against the compiled programs**: each optimizer's fused round (the
   ``lax.scan`` of ``L`` steps of :mod:`experiments.optimizers`, as training
   runs it) is compiled for ``n`` devices, and the all-reduce instructions in
   its HLO are counted: those inside the scan's loop run ``L`` times a round,
   the others once. Their payload must be the ``P`` parameters.
3. **A model beyond one machine** (labelled as a model, not a measurement):
   seconds per step and per epoch for ``n = 3..64`` workers, from a measured
   compute time per step and a ring all-reduce of ``4 P`` bytes,
   ``2 (n - 1) / n * 4 P * 8 / bandwidth + 2 (n - 1) * latency``, with
   bandwidths of 10, 25 and 100 Gb/s, and the time of the paper's budgets (200
   epochs of data-parallel SGD against 125 effective epochs of Parle). It
   ignores any overlap of communication with compute (which helps
   data-parallel SGD more than Parle).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags

COMMUNICATING = ('parle', 'elastic_sgd', 'data_parallel_sgd', 'local_sgd', 'diloco')
ONCE_PER_ROUND = ('parle', 'local_sgd', 'diloco')  # one all-reduce per L steps
BYTES_PER_PARAMETER = 4  # float32

# Measured compute time of one SGD step at batch 128 on one NVIDIA H100
# (JAX 0.11.2, float32), from the throughputs in docs/measurements.md:
# WRN-28-10 on CIFAR about 5,400 images/s, LeNet about 577,000 images/s.
H100_STEP_SECONDS = {'wrn28_10': 128 / 5400, 'lenet': 128 / 577000}
MODEL_SETUPS = {  # name -> (create_model args, kwargs, image shape, training examples)
    'lenet': (('lenet', 10), {}, (28, 28, 1), 60000),
    'wrn16_4': (('wrn', 10), {'depth': 16, 'width': 4}, (32, 32, 3), 604388),
    'wrn28_10': (('wrn', 10), {'depth': 28, 'width': 10}, (32, 32, 3), 50000),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_list('models', ['lenet', 'wrn28_10'], f'Models, of {list(MODEL_SETUPS)}.')
  flags.DEFINE_integer('L', 25, "Parle's inner steps per round.")
  flags.DEFINE_integer('batch', 128, 'Mini-batch per worker and step.')
  flags.DEFINE_integer('replicas', 3, 'n for the accounting table and the compiled check.')
  flags.DEFINE_list('workers', ['3', '4', '8', '16', '32', '64'], 'n for the network model.')
  flags.DEFINE_list('bandwidths_gbps', ['10', '25', '100'], 'Network bandwidths, Gb/s.')
  flags.DEFINE_float('latency_us', 5.0, 'Per-hop latency of the ring all-reduce, microseconds.')
  flags.DEFINE_bool('check_compiled', True, 'Count the all-reduces in the compiled rounds '
                    '(needs --replicas devices, e.g. fake CPU devices via XLA_FLAGS).')


def parameter_count(model_name: str) -> int:
  """Trainable parameters of a model of :data:`MODEL_SETUPS` (BN statistics excluded)."""
  from parle_jax import models  # pylint: disable=g-import-not-at-top
  args, kwargs, image_shape, _ = MODEL_SETUPS[model_name]
  model = models.create_model(*args, **kwargs)
  shapes = jax.eval_shape(lambda key: models.init_variables(model, key, image_shape),
                          jax.random.PRNGKey(0))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))


@dataclasses.dataclass(frozen=True)
class Accounting:
  """All-reduces of one optimizer, per step of a worker and per epoch."""

  optimizer: str
  allreduces_per_step: float
  steps_per_epoch: int  # of one worker
  bytes_per_allreduce: int

  @property
  def allreduces_per_epoch(self) -> float:
    return self.allreduces_per_step * self.steps_per_epoch

  @property
  def bytes_per_epoch(self) -> float:
    """Payload all-reduced per epoch (each all-reduce counted once)."""
    return self.allreduces_per_epoch * self.bytes_per_allreduce


def accounting(optimizer: str, *, num_parameters: int, num_examples: int, batch_size: int,
               num_workers: int, L: int) -> Accounting:
  """The exact schedule of all-reduces; see the module docstring for the epoch."""
  if optimizer not in COMMUNICATING:
    raise ValueError(f'optimizer={optimizer!r}: choose one of {COMMUNICATING}.')
  for name, value in (('num_parameters', num_parameters), ('num_examples', num_examples),
                      ('batch_size', batch_size), ('num_workers', num_workers), ('L', L)):
    if value < 1:
      raise ValueError(f'{name}={value!r} must be >= 1.')
  if optimizer == 'data_parallel_sgd':
    steps = math.ceil(num_examples / (num_workers * batch_size))
  else:
    steps = math.ceil(num_examples / batch_size)
  per_step = 1 / L if optimizer in ONCE_PER_ROUND else 1.0
  return Accounting(optimizer, per_step, steps, BYTES_PER_PARAMETER * num_parameters)


def ring_allreduce_seconds(num_bytes: float, num_workers: int, bandwidth_gbps: float,
                           latency_s: float) -> float:
  """Bandwidth-optimal ring all-reduce: 2 (n - 1) chunks of bytes / n each way."""
  if num_workers == 1:
    return 0.0
  return (2 * (num_workers - 1) / num_workers * num_bytes * 8 / (bandwidth_gbps * 1e9)
          + 2 * (num_workers - 1) * latency_s)


def network_model(*, num_parameters: int, num_examples: int, batch_size: int, L: int,
                  step_seconds: float, workers: Sequence[int], bandwidths_gbps: Sequence[float],
                  latency_s: float, sgd_epochs: float = 200, parle_effective_epochs: float = 125
                  ) -> list[dict[str, Any]]:
  """Modelled seconds per step and per epoch of data-parallel SGD and Parle.

  Also the time of whole budgets: by default the paper's WRN budgets, 200 epochs
  of data-parallel SGD (assuming its larger global batch needs no more epochs)
  against 5 Parle epochs = 125 effective epochs.
  """
  rows = []
  for bandwidth in bandwidths_gbps:
    for n in workers:
      allreduce = ring_allreduce_seconds(BYTES_PER_PARAMETER * num_parameters, n, bandwidth,
                                         latency_s)
      sgd_step, parle_step = step_seconds + allreduce, step_seconds + allreduce / L
      rows.append({
          'bandwidth_gbps': bandwidth, 'workers': n, 'allreduce_s': allreduce,
          'dp_sgd_step_s': sgd_step, 'parle_step_s': parle_step,
          'dp_sgd_communication': allreduce / sgd_step,
          'parle_communication': allreduce / L / parle_step,
          'dp_sgd_epoch_s': math.ceil(num_examples / (n * batch_size)) * sgd_step,
          'parle_epoch_s': math.ceil(num_examples / batch_size) * parle_step,
          'step_speedup': sgd_step / parle_step,
      })
      rows[-1]['dp_sgd_budget_s'] = sgd_epochs * rows[-1]['dp_sgd_epoch_s']
      rows[-1]['parle_budget_s'] = parle_effective_epochs * rows[-1]['parle_epoch_s']
  return rows


# ---------------------------------------------------------------------------
# The compiled programs.

_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_ALLREDUCE = re.compile(r'=\s*(.+?)\s+all-reduce(?:-start)?\(')
_SHAPE = re.compile(r'\b(?:f|bf|s|u|pred)\d*\[([\d,]*)\]')
_CALLED = re.compile(r'(?:body|condition|to_apply|calls|branch_computations|'
                     r'true_computation|false_computation)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)')


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """HLO module text -> {computation name: its instruction lines}."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line.strip()) if not line.startswith(' ') else None
    if match:
      current = match.group(1)
      computations[current] = []
    elif current is not None and line.strip() and line.strip() != '}':
      computations[current].append(line)
  return computations


def _elements(result_type: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(',') if d) for dims in
             _SHAPE.findall(result_type))


def count_allreduces(hlo_text: str) -> dict[str, int]:
  """All-reduce instructions of a compiled module, inside and outside its loops.

  Returns ``in_loop`` / ``outside`` (instruction counts) and
  ``in_loop_elements`` / ``outside_elements`` (their payloads, in elements).
  Loop bodies include every computation they call.
  """
  computations = _computations(hlo_text)
  called = {name: {c.strip().lstrip('%') for m in _CALLED.findall('\n'.join(lines))
                   for c in m.split(',')} for name, lines in computations.items()}
  loop_bodies = set()
  for lines in computations.values():
    for line in lines:
      if ' while(' in line:
        loop_bodies.update(re.findall(r'body=%?([\w.\-]+)', line))
  in_loop, frontier = set(), list(loop_bodies)
  while frontier:
    name = frontier.pop()
    if name in in_loop:
      continue
    in_loop.add(name)
    frontier.extend(called.get(name, ()))
  counts = {'in_loop': 0, 'outside': 0, 'in_loop_elements': 0, 'outside_elements': 0}
  for name, lines in computations.items():
    where = 'in_loop' if name in in_loop else 'outside'
    for line in lines:
      match = _ALLREDUCE.search(line)
      if match:
        counts[where] += 1
        counts[f'{where}_elements'] += _elements(match.group(1))
  return counts


def compiled_allreduces(optimizer: str, model_name: str, *, num_replicas: int, L: int,
                        batch_size: int) -> dict[str, int]:
  """Counts the all-reduces of `optimizer`'s compiled round, one replica per device."""
  from experiments import optimizers  # pylint: disable=g-import-not-at-top
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  import parle_jax  # pylint: disable=g-import-not-at-top
  from parle_jax import data, models, training  # pylint: disable=g-import-not-at-top

  if jax.device_count() < num_replicas:
    raise ValueError(f'counting the all-reduces of {num_replicas} replicas needs as many '
                     f'devices, found {jax.device_count()}; set XLA_FLAGS='
                     f'--xla_force_host_platform_device_count={num_replicas}.')
  args, kwargs, image_shape, _ = MODEL_SETUPS[model_name]
  config = base.get_config()
  config.optimizer, config.num_replicas, config.L = optimizer, num_replicas, L
  config.batch_size = batch_size * (num_replicas if optimizer == 'data_parallel_sgd' else 1)
  num_examples = 4 * batch_size * num_replicas
  plan = optimizers.make_plan(config, num_examples, num_replicas)
  replicas = parle_jax.Replicas(num_replicas, devices=jax.devices()[:num_replicas],
                                mapping='vmap')
  tx, couple = optimizers.make_optimizer(config, plan, replicas.axis_name)
  model = models.create_model(*args, **kwargs)
  params, model_state = training.init_replica_variables(
      model, jax.random.PRNGKey(0), num_replicas, image_shape,
      same_init=plan.same_init)
  state = parle_jax.init_replicas(replicas, tx, params, model_state)
  round_fn = parle_jax.make_round(
      training.classification_loss(model), tx, replicas, L=L, couple=couple,
      batch_fn=data.make_batch_fn(plan.batch_size, augment=False), mapping='vmap')
  rng = np.random.default_rng(0)
  arrays = {'image': rng.integers(0, 256, (num_examples, *image_shape), np.uint8),
            'label': rng.integers(0, 10, num_examples).astype(np.int32)}
  device_data = replicas.broadcast(data.device_data(arrays, *data.channel_stats(arrays['image'])))
  hlo = round_fn.lower(state, device_data).compile().as_text()
  return count_allreduces(hlo)


def _gb(num_bytes: float) -> str:
  return f'{num_bytes / 1e9:.3f} GB'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  n, L, batch = FLAGS.replicas, FLAGS.L, FLAGS.batch
  for model_name in FLAGS.models:
    params = parameter_count(model_name)
    examples = MODEL_SETUPS[model_name][3]
    print(f'\n## {model_name}: {params:,} parameters ({_gb(4 * params)} per all-reduce), '
          f'N = {examples:,}, batch {batch} per worker, n = {n}, L = {L}\n')
    print('| optimizer | all-reduces per step | steps per epoch (one worker) | '
          'all-reduces per epoch | bytes all-reduced per epoch |')
    print('|---|---|---|---|---|')
    for optimizer in COMMUNICATING:
      acc = accounting(optimizer, num_parameters=params, num_examples=examples,
                       batch_size=batch, num_workers=n, L=L)
      print(f'| {optimizer} | {acc.allreduces_per_step:.3g} | {acc.steps_per_epoch} | '
            f'{acc.allreduces_per_epoch:.1f} | {_gb(acc.bytes_per_epoch)} |')
    if FLAGS.check_compiled and jax.device_count() >= n:
      print(f'\nCompiled rounds (jax {jax.__version__}, {n} {jax.devices()[0].platform} '
            f'devices): all-reduce instructions, and executions per round of L = {L} steps\n')
      print('| optimizer | in the scan loop (elements) | outside (elements) | '
            'all-reduces per round | elements per round / P |')
      print('|---|---|---|---|---|')
      for optimizer in COMMUNICATING:
        c = compiled_allreduces(optimizer, model_name, num_replicas=n, L=L, batch_size=batch)
        per_round = c['in_loop'] * L + c['outside']
        elements = c['in_loop_elements'] * L + c['outside_elements']
        print(f"| {optimizer} | {c['in_loop']} ({c['in_loop_elements']:,}) | "
              f"{c['outside']} ({c['outside_elements']:,}) | {per_round} | "
              f'{elements / params:.3f} |')
    if model_name in H100_STEP_SECONDS:
      step = H100_STEP_SECONDS[model_name]
      print(f'\nMODEL (not measured end to end): compute {1000 * step:.2f} ms per step '
            f'(H100, measured), ring all-reduce with {FLAGS.latency_us} us per hop\n')
      print('| Gb/s | workers | all-reduce ms | dp-SGD ms/step (comm %) | '
            'Parle ms/step (comm %) | Parle step speed-up | dp-SGD s/epoch (shared by n) | '
            'Parle s/effective epoch | 200 dp-SGD epochs / 125 Parle effective epochs |')
      print('|---|---|---|---|---|---|---|---|---|')
      for row in network_model(
          num_parameters=params, num_examples=examples, batch_size=batch, L=L,
          step_seconds=step, workers=[int(w) for w in FLAGS.workers],
          bandwidths_gbps=[float(b) for b in FLAGS.bandwidths_gbps],
          latency_s=FLAGS.latency_us * 1e-6):
        print(f"| {row['bandwidth_gbps']:g} | {row['workers']} | "
              f"{1000 * row['allreduce_s']:.2f} | {1000 * row['dp_sgd_step_s']:.2f} "
              f"({100 * row['dp_sgd_communication']:.0f}%) | {1000 * row['parle_step_s']:.2f} "
              f"({100 * row['parle_communication']:.0f}%) | {row['step_speedup']:.2f}x | "
              f"{row['dp_sgd_epoch_s']:.3g} | {row['parle_epoch_s']:.3g} | "
              f"{row['dp_sgd_budget_s'] / row['parle_budget_s']:.2f} |")


if __name__ == '__main__':
  define_flags()
  app.run(main)
