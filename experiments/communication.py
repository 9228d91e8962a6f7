r"""What Parle and the baselines (data-parallel SGD, Elastic-SGD, local SGD, DiLoCo) send.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.communication

Four parts, printed as tables:

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
4. **Islands** (``parle_jax.Replicas(devices_per_replica=k)``: a replica
   spans ``k`` devices, ``n`` islands): the exact all-reduces per round inside
   the islands (``n L`` gradient all-reduces of ``4 P``, each over ``k``
   devices) and between them (per coupling ``k`` parallel all-reduces of
   ``4 P``, one per device position, among ``n`` devices: once per round for
   Parle, local SGD and DiLoCo, every step for Elastic-SGD and data-parallel
   SGD); the compiled check for ``n = 2 x k = 4`` (8 devices), whose
   all-reduces are classified by their ``replica_groups``; and a model of
   islands joined by a link ``ratio`` times slower than the links inside them,
   Parle over islands against one data-parallel job over all ``n k`` devices
   (see :func:`island_network_model`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags

from experiments import hlo_allreduces

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
  flags.DEFINE_list('islands', ['2x8', '4x4'], 'NxK: N replicas (islands) of K devices, for '
                    'the island accounting and model.')
  flags.DEFINE_list('slow_link_ratios', ['10', '30', '100'], 'Links inside an island over '
                    'the links between islands (bandwidth ratio), for the island model.')
  flags.DEFINE_float('fast_gbps', 3600.0, 'Bandwidth inside an island, Gb/s per device '
                     '(NVLink-class).')
  flags.DEFINE_string('island_check', '2x4', 'NxK of the compiled island check (needs N*K '
                      "devices; '' skips it).")


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
# Islands: replicas of k devices each (parle_jax.Replicas(devices_per_replica=k)).

EVERY_STEP_BETWEEN = ('elastic_sgd', 'data_parallel_sgd')  # couple the islands every step


@dataclasses.dataclass(frozen=True)
class IslandAccounting:
  """All-reduces of one optimizer per round of ``L`` steps, ``n`` islands of ``k`` devices.

  Each all-reduce of one group of devices counts once and carries ``4 P``
  bytes. Inside: every step each island all-reduces its gradient over its
  ``k`` devices (``n L`` per round, all islands together). Between: a
  coupling (once per round for Parle, local SGD and DiLoCo; every step for
  Elastic-SGD and for data-parallel SGD, whose ``n k`` devices are one job)
  runs, as implemented, ``k`` parallel all-reduces of ``4 P``, one per device
  position, each among the ``n`` devices of that position: ``c k`` per round
  for ``c`` couplings. A hierarchical all-reduce (reduce-scatter inside the
  island, all-reduce of ``4 P / k`` between, all-gather) would send ``c 4 P``
  between the islands instead of ``c k 4 P``.
  """

  optimizer: str
  num_islands: int  # n, one replica (data-parallel SGD: one worker) each
  devices_per_replica: int  # k
  L: int
  bytes_per_allreduce: int  # 4 P

  @property
  def couplings_per_round(self) -> int:
    """Between-island couplings per round: ``L`` or 1 (0 for one island)."""
    if self.num_islands == 1:
      return 0
    return self.L if self.optimizer in EVERY_STEP_BETWEEN else 1

  @property
  def inside_allreduces_per_round(self) -> int:
    """``n L`` gradient all-reduces over ``k`` devices (0 for ``k = 1``)."""
    return self.num_islands * self.L if self.devices_per_replica > 1 else 0

  @property
  def inside_bytes_per_round(self) -> int:
    return self.inside_allreduces_per_round * self.bytes_per_allreduce

  @property
  def between_allreduces_per_round(self) -> int:
    """``c k`` all-reduces among ``n`` devices, ``k`` in parallel per coupling."""
    return self.couplings_per_round * self.devices_per_replica

  @property
  def between_bytes_per_round(self) -> int:
    return self.between_allreduces_per_round * self.bytes_per_allreduce

  @property
  def hierarchical_between_bytes_per_round(self) -> int:
    """What a hierarchical all-reduce would send between the islands: ``c 4 P``."""
    return self.couplings_per_round * self.bytes_per_allreduce


def island_accounting(optimizer: str, *, num_parameters: int, num_islands: int,
                      devices_per_replica: int, L: int) -> IslandAccounting:
  """The exact all-reduces per round over islands; see :class:`IslandAccounting`."""
  if optimizer not in COMMUNICATING:
    raise ValueError(f'optimizer={optimizer!r}: choose one of {COMMUNICATING}.')
  for name, value in (('num_parameters', num_parameters), ('num_islands', num_islands),
                      ('devices_per_replica', devices_per_replica), ('L', L)):
    if value < 1:
      raise ValueError(f'{name}={value!r} must be >= 1.')
  return IslandAccounting(optimizer, num_islands, devices_per_replica, L,
                          BYTES_PER_PARAMETER * num_parameters)


def parse_islands(specs: Sequence[str]) -> list[tuple[int, int]]:
  """``['2x8', '4x4']`` -> ``[(2, 8), (4, 4)]``: ``n`` islands (replicas) x ``k`` devices."""
  layouts = []
  for spec in specs:
    match = re.fullmatch(r'\s*(\d+)\s*x\s*(\d+)\s*', spec)
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
      raise ValueError(f"islands={spec!r}: expected NxK with N, K >= 1, e.g. '2x8'.")
    layouts.append((int(match.group(1)), int(match.group(2))))
  return layouts


def island_network_model(*, num_parameters: int, num_examples: int, batch_size: int, L: int,
                         step_seconds: float, islands: Sequence[tuple[int, int]],
                         slow_link_ratios: Sequence[float], fast_gbps: float, latency_s: float,
                         sgd_epochs: float = 200, parle_effective_epochs: float = 125
                         ) -> list[dict[str, Any]]:
  """A model (not a measurement) of Parle over islands against one data-parallel job.

  ``n`` islands of ``k`` devices; links inside an island of `fast_gbps` per
  device, between islands ``fast_gbps / ratio`` per device (each device of an
  island has its own share of the slow link). Per step, with ``t`` =
  `step_seconds` (one device, batch `batch_size`) split over ``k`` devices
  as ``t / k`` (optimistic: perfect scaling inside an island) and ``ring`` =
  :func:`ring_allreduce_seconds`:

  * data-parallel SGD over all ``n k`` devices, global batch ``n b``
    (``b / k`` per device, as for Parle), with a hierarchical all-reduce
    (reduce-scatter inside the island, all-reduce of ``4 P / k`` between,
    all-gather; its best case): ``t / k + ring(4P, k, fast) + ring(4P / k,
    n, slow)``;
  * Parle, ``n`` replicas of batch ``b``: ``t / k + ring(4P, k, fast) +
    ring(4P, n, slow) / L`` (its coupling as implemented: ``k`` parallel
    rings of ``4 P``, one per device position).

  Epochs: ``ceil(N / (n b))`` steps of data-parallel SGD, ``ceil(N / b)``
  steps of Parle (one effective epoch); budgets as :func:`network_model`.
  No overlap of communication and compute.
  """
  rows = []
  four_p = BYTES_PER_PARAMETER * num_parameters
  for ratio in slow_link_ratios:
    slow_gbps = fast_gbps / ratio
    for n, k in islands:
      compute = step_seconds / k
      inside = ring_allreduce_seconds(four_p, k, fast_gbps, latency_s)
      dp_between = ring_allreduce_seconds(four_p / k, n, slow_gbps, latency_s)
      parle_between = ring_allreduce_seconds(four_p, n, slow_gbps, latency_s) / L
      dp_step = compute + inside + dp_between
      parle_step = compute + inside + parle_between
      row = {
          'slow_link_ratio': ratio, 'slow_gbps': slow_gbps, 'islands': n,
          'devices_per_replica': k, 'compute_s': compute, 'inside_s': inside,
          'dp_sgd_between_s': dp_between, 'parle_between_s': parle_between,
          'dp_sgd_step_s': dp_step, 'parle_step_s': parle_step,
          'dp_sgd_between_share': dp_between / dp_step,
          'parle_between_share': parle_between / parle_step,
          'step_speedup': dp_step / parle_step,
          'dp_sgd_epoch_s': math.ceil(num_examples / (n * batch_size)) * dp_step,
          'parle_epoch_s': math.ceil(num_examples / batch_size) * parle_step,
      }
      row['dp_sgd_budget_s'] = sgd_epochs * row['dp_sgd_epoch_s']
      row['parle_budget_s'] = parle_effective_epochs * row['parle_epoch_s']
      rows.append(row)
  return rows


# ---------------------------------------------------------------------------
# The compiled programs (their all-reduces read by experiments.hlo_allreduces).



def _compiled_round(optimizer: str, model_name: str, *, num_replicas: int, L: int,
                    batch_size: int, devices_per_replica: int = 1) -> tuple[str, list[list[int]]]:
  """The HLO text of `optimizer`'s compiled round, and its islands as HLO device ids.

  ``num_replicas * devices_per_replica`` devices, each replica an island of
  ``devices_per_replica`` (:class:`parle_jax.Replicas`); the ids of island
  ``i`` are ``i k .. i k + k - 1`` (the mesh's device order).
  """
  from experiments import optimizers  # pylint: disable=g-import-not-at-top
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  import parle_jax  # pylint: disable=g-import-not-at-top
  from parle_jax import data, models, training  # pylint: disable=g-import-not-at-top

  k = devices_per_replica
  if k < 1:
    raise ValueError(f'devices_per_replica={k!r} must be >= 1.')
  if jax.device_count() < num_replicas * k:
    raise ValueError(f'counting the all-reduces of {num_replicas} replicas of {k} device(s) '
                     f'needs {num_replicas * k} devices, found {jax.device_count()}; set '
                     f'XLA_FLAGS=--xla_force_host_platform_device_count={num_replicas * k}.')
  args, kwargs, image_shape, _ = MODEL_SETUPS[model_name]
  config = base.get_config()
  config.optimizer, config.num_replicas, config.L = optimizer, num_replicas, L
  config.batch_size = batch_size * (num_replicas if optimizer == 'data_parallel_sgd' else 1)
  config.devices_per_replica = k
  num_examples = 4 * batch_size * num_replicas
  plan = optimizers.make_plan(config, num_examples, num_replicas)
  if k == 1:
    replicas = parle_jax.Replicas(num_replicas, devices=jax.devices()[:num_replicas],
                                  mapping='vmap')
  else:
    replicas = parle_jax.Replicas(num_replicas, devices=jax.devices()[:num_replicas * k],
                                  mapping='vmap', devices_per_replica=k)
  tx, couple = optimizers.make_optimizer(config, plan, replicas.axis_name)
  model = models.create_model(*args, **kwargs)
  params, model_state = training.init_replica_variables(
      model, jax.random.PRNGKey(0), num_replicas, image_shape,
      same_init=plan.same_init)
  state = parle_jax.init_replicas(replicas, tx, params, model_state)
  round_fn = parle_jax.make_round(
      training.classification_loss(model, batch_norm_axis_name=replicas.data_axis_name),
      tx, replicas, L=L, couple=couple,
      batch_fn=data.make_batch_fn(plan.batch_size, augment=False), mapping='vmap')
  rng = np.random.default_rng(0)
  arrays = {'image': rng.integers(0, 256, (num_examples, *image_shape), np.uint8),
            'label': rng.integers(0, 10, num_examples).astype(np.int32)}
  device_data = replicas.broadcast(data.device_data(arrays, *data.channel_stats(arrays['image'])))
  hlo = round_fn.lower(state, device_data).compile().as_text()
  return hlo, [list(range(i * k, (i + 1) * k)) for i in range(num_replicas)]


def compiled_allreduces(optimizer: str, model_name: str, *, num_replicas: int, L: int,
                        batch_size: int, devices_per_replica: int = 1) -> dict[str, int]:
  """Counts the all-reduces of `optimizer`'s compiled round (``count_allreduces``).

  One replica per device, or (``devices_per_replica = k > 1``) per island of
  ``k`` devices: then the dict also holds ``island_traffic``'s counts (both
  of :mod:`experiments.hlo_allreduces`).
  """
  hlo, islands = _compiled_round(optimizer, model_name, num_replicas=num_replicas, L=L,
                                 batch_size=batch_size, devices_per_replica=devices_per_replica)
  instructions = hlo_allreduces.allreduce_instructions(hlo)
  counts = hlo_allreduces.tally(instructions)
  if devices_per_replica > 1:
    counts.update(hlo_allreduces.island_traffic(instructions, islands, L))
  return counts


def compiled_island_instructions(optimizer: str, model_name: str, *, num_replicas: int,
                                 devices_per_replica: int, L: int, batch_size: int
                                 ) -> tuple[list[hlo_allreduces.AllReduce], list[list[int]]]:
  """The all-reduces of `optimizer`'s compiled round over islands, and the islands (ids)."""
  hlo, islands = _compiled_round(optimizer, model_name, num_replicas=num_replicas, L=L,
                                 batch_size=batch_size, devices_per_replica=devices_per_replica)
  return hlo_allreduces.allreduce_instructions(hlo), islands


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
    _print_islands(model_name, params, examples)


def _print_islands(model_name: str, params: int, examples: int) -> None:
  """The island tables of one model: accounting, compiled check, model."""
  L, batch = FLAGS.L, FLAGS.batch
  print(f'\n### {model_name} over islands: n replicas of k devices, L = {L}, per round\n')
  print('Exact: each all-reduce of one group of devices counts once and carries 4P = '
        f'{_gb(4 * params)}; between islands, as implemented, k parallel all-reduces of 4P '
        '(one per device position) per coupling.\n')
  print('| n x k | optimizer | inside islands: all-reduces per round (bytes) | '
        'between: all-reduces per round (bytes) | between if hierarchical (bytes) |')
  print('|---|---|---|---|---|')
  for n, k in parse_islands(FLAGS.islands):
    for optimizer in COMMUNICATING:
      acc = island_accounting(optimizer, num_parameters=params, num_islands=n,
                              devices_per_replica=k, L=L)
      print(f'| {n} x {k} | {optimizer} | {acc.inside_allreduces_per_round} '
            f'({_gb(acc.inside_bytes_per_round)}) | {acc.between_allreduces_per_round} '
            f'({_gb(acc.between_bytes_per_round)}) | '
            f'{_gb(acc.hierarchical_between_bytes_per_round)} |')
  if FLAGS.check_compiled and FLAGS.island_check:
    ((n, k),) = parse_islands([FLAGS.island_check])
    if jax.device_count() >= n * k:
      print(f'\nCompiled rounds over islands (jax {jax.__version__}, n = {n} x k = {k} on '
            f'{n * k} {jax.devices()[0].platform} devices, batch {batch} per replica): '
            f'all-reduce instructions (elements of one group), and per round of L = {L} '
            'steps the elements over all groups and runs, over P (the accounting in '
            'brackets); the last column is what the island all-reduces beyond the gradient '
            'each step (BatchNorm statistics, loss and metrics)\n')
      print('| optimizer | inside: in the loop | inside: outside | between: in the loop | '
            'between: outside | inside per round / P | between per round / P | '
            'inside extra elements per step |')
      print('|---|---|---|---|---|---|---|---|')
      for optimizer in COMMUNICATING:
        instructions, islands = compiled_island_instructions(
            optimizer, model_name, num_replicas=n, devices_per_replica=k, L=L,
            batch_size=batch)
        t = hlo_allreduces.island_traffic(instructions, islands, L)
        acc = island_accounting(optimizer, num_parameters=params, num_islands=n,
                                devices_per_replica=k, L=L)
        extra = (t['inside_elements_per_round'] - acc.inside_allreduces_per_round * params) / (
            n * L)
        cells = [f"{t[f'{w}_{where}']} ({t[f'{w}_{where}_elements']:,})"
                 for w in ('inside', 'between') for where in ('in_loop', 'outside')]
        print(f"| {optimizer} | {' | '.join(cells)} | "
              f"{t['inside_elements_per_round'] / params:.2f} "
              f'({acc.inside_allreduces_per_round}) | '
              f"{t['between_elements_per_round'] / params:.2f} "
              f'({acc.between_allreduces_per_round}) | {extra:,.0f} |')
  if model_name in H100_STEP_SECONDS:
    step = H100_STEP_SECONDS[model_name]
    print(f'\nMODEL (not measured) of islands: compute {1000 * step:.2f} ms per step of one '
          f'H100 (measured) split perfectly over k devices (t / k), ring all-reduces with '
          f'{FLAGS.latency_us} us per hop, {FLAGS.fast_gbps:g} Gb/s per device inside an '
          'island, that / ratio per device between islands. Data-parallel SGD: all n k '
          f'devices, global batch n x {batch}, hierarchical all-reduce (ring of 4P inside, '
          f'ring of 4P/k between). Parle: n replicas of batch {batch}, ring of 4P inside every '
          f'step, k parallel rings of 4P between once per L = {L} steps. Budgets: 200 dp-SGD '
          'epochs against 125 Parle effective epochs.\n')
    print('| ratio (slow Gb/s) | n x k | compute ms | inside ms | dp-SGD ms/step '
          '(between %) | Parle ms/step (between %) | step speed-up | speed-up needed (0.625 n) | '
          'dp-SGD budget / Parle budget |')
    print('|---|---|---|---|---|---|---|---|---|')
    for row in island_network_model(
        num_parameters=params, num_examples=examples, batch_size=batch, L=L,
        step_seconds=step, islands=parse_islands(FLAGS.islands),
        slow_link_ratios=[float(r) for r in FLAGS.slow_link_ratios],
        fast_gbps=FLAGS.fast_gbps, latency_s=FLAGS.latency_us * 1e-6):
      print(f"| {row['slow_link_ratio']:g} ({row['slow_gbps']:g}) | {row['islands']} x "
            f"{row['devices_per_replica']} | {1000 * row['compute_s']:.2f} | "
            f"{1000 * row['inside_s']:.2f} | {1000 * row['dp_sgd_step_s']:.2f} "
            f"({100 * row['dp_sgd_between_share']:.0f}%) | {1000 * row['parle_step_s']:.2f} "
            f"({100 * row['parle_between_share']:.0f}%) | {row['step_speedup']:.2f}x | "
            f"{0.625 * row['islands']:.2f} | "
            f"{row['dp_sgd_budget_s'] / row['parle_budget_s']:.2f} |")


if __name__ == '__main__':
  define_flags()
  app.run(main)
