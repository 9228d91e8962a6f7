r"""Speed of Parle's fused rounds against plain optax SGD, and local replica mapping.

Everything is measured in ONE run on ONE device, on random data with
``--batch`` examples per replica and step, drawn on the device from a
device-resident random dataset by ``jax.random`` indexing inside the scan:

1. ``sgd``: ``optax.sgd(0.1, momentum=0.9, nesterov=True)`` in a jitted,
   donated ``lax.scan`` of ``L`` steps, written directly with jax/optax (an
   independent reference, not built with :mod:`parle_jax.rounds`).
2. ``parle n=1``: the fused Parle round (``parle_parts`` + ``parle_round``)
   with one replica and the same loss and sampling: one dispatch per round.
3. ``parle n``: ``n`` replicas on one device with each local mapping
   (``vmap``, ``sequential``), as ms per round-step for all ``n`` replicas
   together (round wall time / L), its cost relative to ``parle n=1`` (ideal
   = n), and the mapping ``mapping='auto'`` picks (and its own timings).

Timing: the first call compiles, one more warms up, then ``--repeats`` calls
(each one dispatch of ``L`` steps) are timed with ``jax.block_until_ready``;
the median is reported. For ``n`` replicas, the ``'auto'`` round's first call
compiles (and times) both mappings; each is then timed on that same round.
On CPU the machine's load moves the numbers: run it on an idle machine. Targets (printed with PASS/MISS, never asserted):

* ``parle_n1 / sgd <= 1.10``: Parle's extra vector work is cheap;
* ``best mapping for n / (n * parle_n1) <= 1.05``: n local replicas cost at
  most n single replicas (stated for n=3; reported for each ``--replicas``);
* ``mapping='auto'`` picks the mapping measured fastest here.

Example: ``python -m experiments.benchmark --models=lenet --replicas=1,2,3,4,8``
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from jax import lax

import parle_jax
from experiments import machine
from experiments import optimizers as experiment_optimizers
from experiments.configs import base
from parle_jax import models, training

MODELS = {  # name -> (create_model args, kwargs, image shape; None: --wrn_image_shape)
    'lenet': (('lenet', 10), {}, (28, 28, 1)),
    'wrn16_4': (('wrn', 10), {'depth': 16, 'width': 4}, None),
}
MAPPINGS = parle_jax.replicas.LOCAL_MAPPINGS
TARGET_PARLE_VS_SGD = 1.10
TARGET_REPLICA_SCALING = 1.05

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_list('models', ['lenet', 'wrn16_4'], f'Models to time, of {list(MODELS)}.')
  flags.DEFINE_integer('L', 25, 'Inner steps per round (one dispatch).')
  flags.DEFINE_integer('batch', 128, 'Examples per replica and step.')
  flags.DEFINE_list('replicas', ['3'], 'Replica counts n to put on one device, e.g. 1,2,3,4,8.')
  flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement (median reported).')
  flags.DEFINE_list('wrn_image_shape', ['28', '28', '1'], 'WRN input H,W,C (32,32,3 for CIFAR).')
  flags.DEFINE_integer('dataset_size', 2048, 'Random examples kept on the device.')
  flags.DEFINE_list('optimizers', list(base.OPTIMIZERS),
                    'Optimizers whose training rounds to time (images/s); empty: none.')
  flags.DEFINE_integer('optimizer_replicas', 3,
                       'n for parle, elastic_sgd and data_parallel_sgd in the images/s table.')
  flags.DEFINE_string('json_out', None, 'Optional path for all measurements as JSON.')


def random_dataset(image_shape: Sequence[int], size: int, seed: int = 0) -> dict[str, Any]:
  """Random images (already normalised) and labels, on the host."""
  rng = np.random.default_rng(seed)
  return {'image': rng.standard_normal((size, *image_shape), np.float32),
          'label': rng.integers(0, 10, size, np.int32)}


def make_batch_fn(batch_size: int) -> Callable:
  """``batch_fn(data, rng, step, replica)``: a mini-batch drawn on the device."""
  def batch_fn(data, rng, step, replica):
    del replica
    indices = jax.random.randint(jax.random.fold_in(rng, step), (batch_size,), 0,
                                 data['label'].shape[0])
    return {'image': data['image'][indices], 'label': data['label'][indices]}
  return batch_fn


def build_sgd_scan(loss_fn, batch_fn, L: int) -> tuple[Callable, Callable]:
  """The baseline: ``run(state, data) -> state``, L donated optax SGD steps under jit.

  Returns `run` and ``init(params, model_state) -> state``.
  """
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)

  def init(params, model_state):
    return (jnp.int32(0), params, tx.init(params), model_state, jax.random.PRNGKey(0))

  def run(state, data):
    def step(carry, _):
      count, params, opt_state, model_state, key = carry
      batch = batch_fn(data, jax.random.fold_in(key, 0), count, 0)
      rng = jax.random.fold_in(jax.random.fold_in(key, 1), count)
      (_, (model_state, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, model_state, batch, rng)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (count + 1, optax.apply_updates(params, updates), opt_state, model_state,
              key), None
    return lax.scan(step, state, None, length=L)[0]

  return jax.jit(run, donate_argnums=0), jax.jit(init)


def build_parle_round(loss_fn, batch_fn, params, model_state, L: int, mapping: str,
                      device, batches_per_epoch: int):
  """A Parle round for ``len(params)`` replicas on `device`: (round_fn, state)."""
  replicas = parle_jax.Replicas(len(jax.tree.leaves(params)[0]), devices=[device],
                                mapping=mapping)
  parts = parle_jax.parle_parts(0.1, batches_per_epoch=batches_per_epoch, L=L,
                                axis_name=replicas.axis_name)
  state = parle_jax.init_replicas(replicas, parts.inner, params, model_state)
  return parle_jax.parle_round(loss_fn, parts, replicas, batch_fn=batch_fn), state


def time_calls(fn: Callable, state: Any, repeats: int) -> tuple[dict[str, Any], Any]:
  """Times `repeats` calls of ``fn: state -> state`` after a first call and a warm-up.

  Returns the timings (the first call, which compiles unless `fn` is already
  compiled, is reported alone) and the final state.
  """
  start = time.perf_counter()
  state = jax.block_until_ready(fn(state))
  first_call_s = time.perf_counter() - start
  state = jax.block_until_ready(fn(state))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = jax.block_until_ready(fn(state))
    times.append(time.perf_counter() - start)
  return {'first_call_s': first_call_s, 'times_s': times,
          'median_s': statistics.median(times)}, state


def build_training_round(optimizer: str, *, loss_fn, variables, host_data, L: int, batch: int,
                         num_replicas: int, device, mapping: str | None = None):
  """One training round of `optimizer` exactly as ``experiments.train`` builds it, on `device`.

  Uses :mod:`experiments.optimizers` (plan, per-step transform, coupling) and
  :func:`parle_jax.make_round`. ``sgd`` and ``entropy_sgd`` train one model;
  the others `num_replicas` (data-parallel SGD: a global batch of
  ``num_replicas * batch``, ``batch`` per worker). `variables` hold at least
  `num_replicas` replicas' (params, model_state) on axis 0.

  Returns ``(round_fn, state, data, plan)``; ``round_fn(state, data)`` runs a round.
  """
  config = base.get_config()
  config.optimizer, config.L = optimizer, L
  n = 1 if optimizer in ('sgd', 'entropy_sgd') else num_replicas
  config.num_replicas = n
  config.batch_size = batch * n if optimizer == 'data_parallel_sgd' else batch
  if mapping is not None:
    config.mapping = mapping
  plan = experiment_optimizers.make_plan(config, len(host_data['label']), 1)
  replicas = parle_jax.Replicas(n, devices=[device], mapping=plan.mapping)
  tx, couple = experiment_optimizers.make_optimizer(config, plan, replicas.axis_name)
  first = 1 if plan.same_init else n
  params, model_state = jax.tree.map(lambda x: np.repeat(x[:first], n // first, axis=0),
                                     jax.tree.map(lambda x: x[:n], variables))
  state = parle_jax.init_replicas(replicas, tx, params, model_state)
  round_fn = parle_jax.make_round(loss_fn, tx, replicas, L=L, couple=couple,
                                  batch_fn=make_batch_fn(plan.batch_size))
  return round_fn, state, replicas.broadcast(host_data), plan


def time_optimizer(optimizer: str, *, loss_fn, variables, host_data, L: int, batch: int,
                   num_replicas: int, repeats: int, device) -> dict[str, Any]:
  """One training round of `optimizer` as ``experiments.train`` builds it, timed.

  See :func:`build_training_round`. Images/s counts every example whose
  gradient is computed.
  """
  round_fn, state, data, plan = build_training_round(
      optimizer, loss_fn=loss_fn, variables=variables, host_data=host_data, L=L, batch=batch,
      num_replicas=num_replicas, device=device)
  round_fn.warm_up(state, data)  # compiles; 'auto' chooses its mapping
  timing, _ = time_calls(lambda s: round_fn(s, data)[0], state, repeats)
  n = plan.num_replicas
  images = n * plan.batch_size * L
  return dict(timing, replicas=n, batch_per_replica=plan.batch_size, mapping=round_fn.mapping,
              images_per_second=images / timing['median_s'],
              ms_per_step=1000 * timing['median_s'] / L)


def benchmark_model(name: str, *, L: int, batch: int, replicas: Sequence[int], repeats: int,
                    wrn_image_shape: Sequence[int], dataset_size: int,
                    optimizers: Sequence[str] = (), optimizer_replicas: int = 3
                    ) -> dict[str, Any]:
  """All measurements of one model; ms are per (round-)step of all replicas together."""
  args, kwargs, image_shape = MODELS[name]
  image_shape = tuple(image_shape or wrn_image_shape)
  model = models.create_model(*args, **kwargs)
  loss_fn = training.classification_loss(model)
  batch_fn = make_batch_fn(batch)
  device = jax.devices()[0]
  host_data = random_dataset(image_shape, dataset_size)
  batches_per_epoch = max(1, dataset_size // batch)
  ms = lambda timing: 1000 * timing['median_s'] / L
  variables = jax.device_get(training.init_replica_variables(  # host copies
      model, jax.random.PRNGKey(1), max([1, *replicas]), image_shape))

  # 1. optax SGD baseline (one replica, plain jit).
  run_sgd, init_sgd = build_sgd_scan(loss_fn, batch_fn, L)
  sgd_state = init_sgd(*jax.device_put(jax.tree.map(lambda x: x[0], variables), device))
  data = jax.device_put(host_data, device)
  sgd, _ = time_calls(lambda s: run_sgd(s, data), sgd_state, repeats)
  result = {'image_shape': list(image_shape), 'sgd': dict(sgd, ms_per_step=ms(sgd))}

  # 2. and 3. Parle rounds: n=1, then n replicas with 'auto' and each mapping.
  def parle(n, mapping):
    params, model_state = jax.tree.map(lambda x: x[:n], variables)
    round_fn, state = build_parle_round(loss_fn, batch_fn, params, model_state, L, mapping,
                                        device, batches_per_epoch)
    data = round_fn.replicas.broadcast(host_data)
    return round_fn, (lambda s: round_fn(s, data)[0]), state

  _, step, state = parle(1, 'vmap')
  n1, _ = time_calls(step, state, repeats)
  result['parle_n1'] = dict(n1, ms_per_step=ms(n1))
  result['replicas'] = {}
  for n in replicas:
    round_fn, step, state = parle(n, 'auto')
    start = time.perf_counter()
    if round_fn.mapping == 'auto':  # the first call compiles and times both, keeps one
      state = jax.block_until_ready(step(state))
    per_n = {'auto': {'mapping': round_fn.mapping, 'first_call_s': time.perf_counter() - start,
                      'ms_per_step': {m: 1000 * t / L for m, t in round_fn.timings.items()}}}
    for mapping in MAPPINGS:
      # RoundFn dispatches on its `mapping` attribute and keeps each mapping's
      # compiled round: setting it times that mapping without compiling it again.
      round_fn.mapping = mapping
      timing, state = time_calls(step, state, repeats)
      per_n[mapping] = dict(timing, ms_per_step=ms(timing),
                            vs_n1=ms(timing) / result['parle_n1']['ms_per_step'])
    result['replicas'][str(n)] = per_n
  result['ratios'] = ratios(result)
  result['optimizers'] = {
      optimizer: time_optimizer(optimizer, loss_fn=loss_fn, variables=variables,
                                host_data=host_data, L=L, batch=batch,
                                num_replicas=optimizer_replicas, repeats=repeats, device=device)
      for optimizer in optimizers}
  return result


def ratios(result: dict[str, Any]) -> dict[str, Any]:
  """The target ratios of one model's measurements."""
  n1 = result['parle_n1']['ms_per_step']
  out = {'parle_n1_vs_sgd': n1 / result['sgd']['ms_per_step'], 'replicas': {}}
  for n, per_n in result['replicas'].items():
    best = min(MAPPINGS, key=lambda m: per_n[m]['ms_per_step'])
    out['replicas'][n] = {
        'best_mapping': best,
        'best_vs_n_times_n1': per_n[best]['ms_per_step'] / (int(n) * n1),
        'auto_mapping': per_n['auto']['mapping'],
        'auto_measured': bool(per_n['auto']['ms_per_step']),
        'auto_picked_best': per_n['auto']['mapping'] == best}
  return out


def run(model_names: Sequence[str], **settings) -> dict[str, Any]:
  """Benchmarks `model_names` (keyword `settings` as in :func:`benchmark_model`)."""
  unknown = [m for m in model_names if m not in MODELS]
  if unknown:
    raise ValueError(f'unknown models {unknown}; expected some of {list(MODELS)}')
  for key in ('L', 'batch', 'repeats', 'dataset_size'):
    if settings[key] < 1:
      raise ValueError(f'`{key}` must be >= 1, got {settings[key]}.')
  if not settings['replicas'] or min(settings['replicas']) < 1:
    raise ValueError(f"`replicas` must be counts >= 1, got {settings['replicas']}.")
  unknown = [o for o in settings.get('optimizers', ()) if o not in base.OPTIMIZERS]
  if unknown:
    raise ValueError(f'unknown optimizers {unknown}; expected some of {list(base.OPTIMIZERS)}')
  if settings.get('optimizer_replicas', 1) < 1:
    raise ValueError(f"`optimizer_replicas` must be >= 1, got {settings['optimizer_replicas']}.")
  return {'machine': machine.describe(),
          'settings': {k: list(v) if isinstance(v, (list, tuple)) else v
                       for k, v in settings.items()},
          'models': {name: benchmark_model(name, **settings) for name in model_names}}


def verdict(value: float, target: float) -> str:
  return f'(target <= {target:.2f})  {"PASS" if value <= target else "MISS"}'


def format_report(results: dict[str, Any]) -> str:
  """The table of timings, then the ratios against their targets."""
  s = results['settings']
  lines = [f"L={s['L']} steps per dispatch, batch {s['batch']} per replica, median of "
           f"{s['repeats']} calls; ms per round-step for all n replicas together",
           f"{'model':<9} {'run':<12} {'mapping':<11} {'ms/step':>9} {'x n=1':>7} "
           f"{'img/s':>9} {'1st call s':>10}  auto picks"]
  row = '{:<9} {:<12} {:<11} {:>9.2f} {:>7} {:>9.1f} {:>10.1f}  {}'
  for name, r in results['models'].items():
    sgd, n1 = r['sgd'], r['parle_n1']
    images = lambda n, t: 1000 * n * s['batch'] / t['ms_per_step']
    lines.append(row.format(name, 'optax sgd', '-', sgd['ms_per_step'], '-',
                            images(1, sgd), sgd['first_call_s'], ''))
    lines.append(row.format(name, 'parle n=1', 'vmap', n1['ms_per_step'], '1.00',
                            images(1, n1), n1['first_call_s'], ''))
    for n, per_n in r['replicas'].items():
      auto = per_n['auto']
      picks = auto['mapping'] + (' (' + ', '.join(
          f'{m} {t:.2f}' for m, t in auto['ms_per_step'].items())
          + f"; 1st call {auto['first_call_s']:.1f} s)"
          if auto['ms_per_step'] else ' (one replica per device: not timed)')
      for i, mapping in enumerate(MAPPINGS):
        t = per_n[mapping]
        lines.append(row.format(name, f'parle n={n}', mapping, t['ms_per_step'],
                                f"{t['vs_n1']:.2f}", images(int(n), t), t['first_call_s'],
                                picks if i == 0 else ''))
  if any(r.get('optimizers') for r in results['models'].values()):
    lines += ['', f"Training rounds of each optimizer as experiments.train runs them, one "
              f"device, batch {s['batch']} per replica/worker:",
              f"{'model':<9} {'optimizer':<18} {'n':>3} {'mapping':<11} {'ms/step':>9} "
              f"{'img/s':>9} {'img/s / sgd':>11}"]
    for name, r in results['models'].items():
      timings = r.get('optimizers', {})
      sgd_rate = timings.get('sgd', {}).get('images_per_second')
      for optimizer, t in timings.items():
        relative = f"{t['images_per_second'] / sgd_rate:.2f}" if sgd_rate else '-'
        lines.append(f"{name:<9} {optimizer:<18} {t['replicas']:>3} {t['mapping']:<11} "
                     f"{t['ms_per_step']:>9.2f} {t['images_per_second']:>9.1f} {relative:>11}")
  m = results['machine']
  lines += ['', f"Ratios on {m['device_kind']} (platform {m['platform']}, "
            f"{m['cpu_count']} CPUs, jax {m['jax']}):"]
  for name, r in results['models'].items():
    q = r['ratios']
    ratio = lambda label, value, target: f'  {name:<9} {label:<38} = {value:5.2f}  ' + (
        verdict(value, target))
    lines.append(ratio('parle_n1 / sgd', q['parle_n1_vs_sgd'], TARGET_PARLE_VS_SGD))
    for n, rq in q['replicas'].items():
      lines.append(ratio(f"best n={n} ({rq['best_mapping']}) / ({n} * parle_n1)",
                         rq['best_vs_n_times_n1'], TARGET_REPLICA_SCALING))
      if rq['auto_measured']:
        lines.append(f"  {name:<9} auto picked {rq['auto_mapping']} for n={n}, best measured "
                     f"{rq['best_mapping']}: {'PASS' if rq['auto_picked_best'] else 'MISS'}")
  return '\n'.join(lines)


def main(argv):
  del argv
  results = run(FLAGS.models, L=FLAGS.L, batch=FLAGS.batch,
                replicas=[int(n) for n in FLAGS.replicas], repeats=FLAGS.repeats,
                wrn_image_shape=[int(d) for d in FLAGS.wrn_image_shape],
                dataset_size=FLAGS.dataset_size, optimizers=FLAGS.optimizers,
                optimizer_replicas=FLAGS.optimizer_replicas)
  print_and_save(format_report(results), results, FLAGS.json_out)


def print_and_save(report: str, results: dict[str, Any], json_out: str | None) -> None:
  """Prints a benchmark's report and, if `json_out` names a file, writes its results there."""
  print(report)
  if json_out:
    with open(json_out, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  define_flags()
  app.run(main)
