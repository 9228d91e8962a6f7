r"""How flat is the valley a trained run ended in: ``flatness.json`` for its models.

  python -m experiments.landscape --workdir=workdirs/default
  python -m experiments.landscape --workdir=<parle run> --against=<sgd run>

For the reference model of a finished run (``<workdir>/reference``, its
batch-norm statistics recomputed as for evaluation) and, for runs of several
replicas, each replica of its newest checkpoint (its own running statistics),
on ``--examples`` training images in eval mode (the same images for every run
of the same ``--seed``), with :mod:`parle_jax.flatness`:

* ``top_eigenvalues``: the Hessian's largest eigenvalues (Lanczos);
* ``trace`` and ``trace_standard_error``: Hutchinson's estimate;
* ``density``: the spectral density (stochastic Lanczos quadrature) on a grid;
* ``sharpness_worst`` and ``sharpness_random`` (with ``sharpness_random_std``):
  loss increases within a per-filter ball of relative radius ``--radius``
  (statistics recomputed at each point);
* ``local_entropy_loss`` and ``local_entropy_distance``: a Langevin estimate of
  the Gibbs measure around the model at the scope ``gamma`` (by default the
  run's own at its last round, ``1 / c_gamma``), the quantities Entropy-SGD follows;
* ``random_direction``: the loss along a filter-normalised random direction
  ``params + t * d`` (statistics recomputed at each point);

and, with ``--against``, ``against``: the loss along the segment from this
run's reference (``alpha = 0``) to the other's (``alpha = 1``). The Hessian
and local-entropy figures hold the batch-norm statistics fixed (the curvature
of the model as evaluated at that point); sharpness and the two paths, whose
perturbations are larger, recompute them at every point, as the reference's
are (with fixed statistics, an adversarial 5% change of the filters drives
LeNet's loss from 0.25 to 12, a random one by 0.01). ``--reference_only``
skips the replicas. The file records the settings, the
commit and the CPU, and is written whole or not at all.

Bad input (no reference in the workdir, a model the code cannot rebuild, more
examples than the split holds) gets one line and exit status 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

import jax
import numpy as np
import tqdm
from absl import app, flags, logging

from experiments import errors, faults, provenance
from experiments import experiment as experiment_lib
from experiments import workdir as workdir_lib
from experiments.configs import base
from parle_jax import checkpoint, evaluate, flatness, scoping

FLATNESS = workdir_lib.FLATNESS


@dataclasses.dataclass(frozen=True)
class Settings:
  """What :func:`measure` computes, and how precisely (all figures per model)."""

  examples: int = 2000  # training images the loss runs over
  batch_size: int = 500  # images per batch of the loss (memory)
  seed: int = 0  # chooses the images and every random probe
  num_eigenvalues: int = 5
  lanczos_iterations: int = 32  # Hessian-vector products of the top eigenvalues
  trace_samples: int = 32  # Rademacher probes of the trace
  density_probes: int = 1  # Lanczos runs for the density (PyHessian's default)
  density_points: int = 256
  radius: float = 0.05  # sharpness: relative radius of the per-filter ball
  ascent_steps: int = 10
  random_perturbations: int = 8
  gamma: Optional[float] = None  # local entropy's scope; None: the run's final 1 / c_gamma
  langevin_steps: int = 50
  langevin_step_size: float = 0.1  # Parle's inner learning rate
  temperature: float = 5e-9  # Entropy-SGD's thermal noise 1e-4: T = noise^2 / 2
  line_points: int = 21  # points of the random-direction and --against paths


def final_gamma(config, plan) -> float:
  """``1 / c_gamma`` after the plan's last round, under the config's scoping."""
  coefficient = float(scoping(config.gamma_initial, config.gamma_max,
                              plan.batches_per_epoch)(plan.total_rounds))
  return 1.0 / coefficient if coefficient > 0 else float('inf')


# ----------------------------------------------------------------------------
# One jitted function per figure: the loss is an argument (a Partial whose
# data are leaves), so the reference and every replica share one compilation.


@functools.partial(jax.jit, static_argnames=('settings',))
def _curvature(loss, params, key, settings: Settings):
  keys = jax.random.split(key, 3)
  top = flatness.top_eigenvalues(loss, params, k=settings.num_eigenvalues,
                                 num_iterations=settings.lanczos_iterations, key=keys[0])
  trace = flatness.hessian_trace(loss, params, num_samples=settings.trace_samples, key=keys[1])
  return top, trace


@functools.partial(jax.jit, static_argnames=('settings',))
def _density(loss, params, key, settings: Settings):
  return flatness.spectral_density(loss, params, num_iterations=settings.lanczos_iterations,
                                   num_probes=settings.density_probes, key=key,
                                   grid_size=settings.density_points)


@functools.partial(jax.jit, static_argnames=('settings',))
def _sharpness(loss, params, key, settings: Settings):
  return flatness.sharpness(loss, params, radius=settings.radius, key=key,
                            num_steps=settings.ascent_steps,
                            num_random=settings.random_perturbations)


@functools.partial(jax.jit, static_argnames=('settings', 'gamma'))
def _local_entropy(loss, params, key, settings: Settings, gamma: float):
  result = flatness.local_entropy(loss, params, gamma=gamma, num_steps=settings.langevin_steps,
                                  step_size=settings.langevin_step_size, key=key,
                                  temperature=settings.temperature)
  return result.mean_loss, result.distance


@jax.jit
def _random_direction(loss, params, key, ts):
  direction = flatness.filter_normalized_direction(params, key)
  minus = jax.tree.map(lambda p, d: p - d, params, direction)
  plus = jax.tree.map(lambda p, d: p + d, params, direction)
  return flatness.interpolate(loss, minus, plus, (ts + 1) / 2)


@jax.jit
def _loss_value(loss, params):
  return loss(params)


@jax.jit
def _segment(loss, params_a, params_b, alphas):
  return flatness.interpolate(loss, params_a, params_b, alphas)


def _floats(x) -> Any:
  x = np.asarray(x, np.float64)
  return float(x) if x.ndim == 0 else [float(v) for v in x]


def measure_model(loss, bn_loss, params, key, settings: Settings, gamma: float,
                  bar: Optional[tqdm.tqdm] = None) -> dict[str, Any]:
  """Every figure of one model: `loss` holds its BN statistics fixed, `bn_loss` recomputes them."""
  keys = jax.random.split(key, 5)
  figures = {'loss': float(_loss_value(loss, params))}

  def step(name):
    if bar is not None:
      bar.set_postfix_str(name)
      bar.update(1)

  top, trace = _curvature(loss, params, keys[0], settings)
  figures.update(top_eigenvalues=_floats(top), trace=_floats(trace.trace),
                 trace_standard_error=_floats(trace.standard_error))
  step('curvature')
  density = _density(loss, params, keys[1], settings)
  figures['density'] = {'grid': _floats(density.grid), 'density': _floats(density.density),
                        'sigma': _floats(density.sigma)}
  step('density')
  sharp = _sharpness(bn_loss, params, keys[2], settings)
  figures.update(sharpness_worst=_floats(sharp.worst), sharpness_random=_floats(sharp.random_mean),
                 sharpness_random_std=_floats(sharp.random_std))
  step('sharpness')
  entropy_loss, distance = _local_entropy(loss, params, keys[3], settings, gamma)
  figures.update(local_entropy_loss=_floats(entropy_loss),
                 local_entropy_distance=_floats(distance))
  step('local entropy')
  ts = np.linspace(-1.0, 1.0, settings.line_points, dtype=np.float32)
  figures['random_direction'] = {
      't': _floats(ts), 'loss': _floats(_random_direction(bn_loss, params, keys[4], ts))}
  step('random direction')
  return figures


# ----------------------------------------------------------------------------
# A run's models.


@dataclasses.dataclass
class Run:
  """A finished run rebuilt from its workdir: config, data, reference and replicas."""

  workdir: str
  experiment: experiment_lib.Experiment
  reference: dict[str, Any]  # {'params', 'batch_stats'?}: the saved reference model
  replicas: list[dict[str, Any]]  # per replica {'params', **model_state}; [] for n = 1
  round: Optional[int]  # the round of the replicas' checkpoint

  @classmethod
  def load(cls, workdir: str, data_dir: str = '') -> 'Run':
    """Rebuilds the run; raises errors.UserError for what the user can fix."""
    config_path = workdir_lib.path(workdir, workdir_lib.CONFIG)
    reference_path = workdir_lib.path(workdir, workdir_lib.REFERENCE)
    if not os.path.isfile(config_path):
      raise errors.WorkdirError(f'--workdir={workdir} holds no {workdir_lib.CONFIG}: '
                                'not the workdir of a run.')
    if not os.path.isdir(reference_path):
      raise errors.WorkdirError(f'--workdir={workdir} holds no reference model '
                                f'({reference_path}): the run has not finished.')
    with open(config_path) as f:
      config, _ = base.with_defaults(json.load(f))
    config.compare_to_sgd, config.progress_bar = False, False
    if data_dir:
      config.data_dir = data_dir
    experiment = experiment_lib.Experiment(config, mapping='vmap')
    like = experiment.init_state()
    reference = checkpoint.load_variables(reference_path)
    expected = {'params': experiment.replicas.first_replica(like.params),
                **experiment.replicas.first_replica(dict(like.model_state))}
    _check_same_model(reference, expected, workdir)
    replicas, round_index = [], None
    if experiment.plan.num_replicas > 1:
      replicas, round_index = _replicas(experiment, like, workdir)
    return cls(workdir, experiment, reference, replicas, round_index)


def _shapes(tree) -> Any:
  return jax.tree.map(lambda x: tuple(np.shape(x)), tree)


def _check_same_model(found, expected, workdir: str) -> None:
  if (jax.tree.structure(found) != jax.tree.structure(expected)
      or _shapes(found) != _shapes(expected)):
    raise errors.WorkdirError(
        f'the reference model in {workdir} does not match the model its config builds '
        f'({jax.tree.structure(found).num_leaves} arrays against '
        f'{jax.tree.structure(expected).num_leaves}): written by other code?')


def _replicas(experiment, like, workdir):
  directory = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)
  if not os.path.isdir(directory):
    logging.warning('%s holds no checkpoints: measuring the reference only.', workdir)
    return [], None
  checkpointer = checkpoint.Checkpointer(directory, read_only=True)
  try:
    state, record = checkpointer.restore(like)
  except FileNotFoundError:
    logging.warning('%s holds no checkpoint: measuring the reference only.', workdir)
    return [], None
  finally:
    checkpointer.close()
  if record['round'] != experiment.plan.total_rounds:
    logging.warning('the newest checkpoint of %s is of round %d, the run has %d: measuring '
                    'its replicas there.', workdir, record['round'], experiment.plan.total_rounds)
  params = experiment.replicas.gather(state.params)
  model_state = experiment.replicas.gather(dict(state.model_state))
  replicas = [{'params': jax.tree.map(lambda x, i=i: x[i], params),
               **jax.tree.map(lambda x, i=i: x[i], model_state)}
              for i in range(experiment.plan.num_replicas)]
  return replicas, int(record['round'])


def _examples(experiment: experiment_lib.Experiment, settings: Settings) -> dict[str, np.ndarray]:
  arrays = experiment.train_arrays
  available = len(arrays['label'])
  if not 1 <= settings.examples <= available:
    raise errors.ConfigError(
        f'--examples={settings.examples} is outside 1..{available}, the examples of '
        f"{experiment.config.dataset}'s training split.")
  chosen = np.sort(np.random.default_rng(settings.seed).permutation(available)[:settings.examples])
  return {k: v[chosen] for k, v in arrays.items()}


def _loss(run: Run, variables: dict[str, Any], examples, settings: Settings,
          recompute_bn: bool = False):
  """The model's loss on `examples`: BN statistics from `variables`, or recomputed per call."""
  experiment = run.experiment
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  return evaluate.dataset_loss(experiment.model, model_state, examples, mean=experiment.mean,
                               std=experiment.std, batch_size=settings.batch_size,
                               bn_batches=experiment.bn_batches if recompute_bn else None)


def measure(workdir: str, settings: Settings = Settings(), *, against: Optional[str] = None,
            data_dir: str = '', progress_bar: bool = True,
            reference_only: bool = False) -> dict[str, Any]:
  """The figures of `workdir`'s reference and replicas (and the path to `against`'s reference)."""
  started = time.time()
  run = Run.load(workdir, data_dir)
  examples = _examples(run.experiment, settings)
  gamma = settings.gamma if settings.gamma is not None else final_gamma(run.experiment.config,
                                                                     run.experiment.plan)
  if not gamma > 0 or not np.isfinite(gamma):
    raise errors.ConfigError(f'gamma={gamma!r}: the local entropy needs a finite scope > 0 '
                             '(the run has no proximal term: pass --gamma).')
  models = [('reference', run.reference)] + ([] if reference_only else [
      (f'replica_{i}', replica) for i, replica in enumerate(run.replicas)])
  key = jax.random.PRNGKey(settings.seed)
  result = {'workdir': os.path.abspath(workdir), 'settings': dataclasses.asdict(settings),
            'gamma': gamma, 'replicas_round': run.round, 'models': {}}
  with tqdm.tqdm(total=5 * len(models) + (against is not None), unit='figure',
                 disable=not progress_bar) as bar:
    for name, variables in models:
      bar.set_description(name)
      loss = _loss(run, variables, examples, settings)
      bn_loss = _loss(run, variables, examples, settings, recompute_bn=True)
      result['models'][name] = measure_model(loss, bn_loss, variables['params'], key, settings,
                                             gamma, bar)
    if against is not None:
      bar.set_description('against')
      result['against'] = _against(run, against, examples, settings, data_dir)
      bar.update(1)
  result['seconds'] = time.time() - started
  result['provenance'] = provenance.current(0)
  return result


def _against(run: Run, other: str, examples, settings: Settings, data_dir: str):
  other_run = Run.load(other, data_dir)
  _check_same_model(other_run.reference, run.reference, other)
  bn_loss = _loss(run, run.reference, examples, settings, recompute_bn=True)
  alphas = np.linspace(-0.5, 1.5, settings.line_points, dtype=np.float32)
  losses = _segment(bn_loss, run.reference['params'], other_run.reference['params'], alphas)
  return {'workdir': os.path.abspath(other), 'alpha': _floats(alphas), 'loss': _floats(losses)}


def write(workdir: str, result: dict[str, Any], name: str = FLATNESS) -> str:
  """Writes ``<workdir>/<name>`` whole (a temporary file, then renamed); returns its path."""
  check_output(name)
  path = os.path.join(workdir, name)
  temporary = f'{path}.tmp.{os.getpid()}'
  with open(temporary, 'w') as f:
    json.dump(result, f, indent=1, sort_keys=True)
  os.replace(temporary, path)
  return path


def check_output(name: str) -> None:
  if os.sep in name or not name.endswith('.json'):
    raise errors.ConfigError(f'--output={name!r} must be a file name ending in .json (it is '
                             'written into the workdir).')


def summary_line(result: dict[str, Any]) -> str:
  reference = result['models']['reference']
  return (f"reference: top eigenvalue {reference['top_eigenvalues'][0]:.3g}, trace "
          f"{reference['trace']:.3g} ± {reference['trace_standard_error']:.2g}, sharpness "
          f"{reference['sharpness_worst']:.3g} (random {reference['sharpness_random']:.2g}) in "
          f"{result['seconds']:.0f} s")


# ----------------------------------------------------------------------------
# The command line.


def define_flags() -> None:
  defaults = Settings()
  flags.DEFINE_string('workdir', None, 'The finished run to measure.', required=True)
  flags.DEFINE_string('against', None, "Another run: adds the loss along the segment between "
                      "the two reference models.")
  flags.DEFINE_bool('reference_only', False, 'Measure the reference model alone.')
  flags.DEFINE_string('output', FLATNESS, 'The file written into --workdir (e.g. '
                      'flatness_10000.json for a run at other settings; the report reads '
                      'flatness.json and compares flatness_<examples>.json with it).')
  flags.DEFINE_string('data_dir', '', 'TFDS data dir (default: the config\'s, or PARLE_DATA_DIR).')
  for field in dataclasses.fields(Settings):
    value = getattr(defaults, field.name)
    if field.name == 'gamma':
      flags.DEFINE_float('gamma', None, "Local entropy's scope (default: the run's final "
                         '1 / c_gamma).')
    elif isinstance(value, int):
      flags.DEFINE_integer(field.name, value, f'Settings.{field.name}.')
    else:
      flags.DEFINE_float(field.name, value, f'Settings.{field.name}.')


def settings_from_flags() -> Settings:
  values = {field.name: flags.FLAGS[field.name].value for field in dataclasses.fields(Settings)}
  try:
    return _checked(Settings(**values))
  except ValueError as err:
    raise errors.ConfigError(str(err)) from err


def _checked(settings: Settings) -> Settings:
  for field in dataclasses.fields(Settings):
    value = getattr(settings, field.name)
    if field.name == 'gamma':
      if value is not None and not value > 0:
        raise ValueError(f'--gamma={value} must be > 0.')
    elif field.name == 'temperature':
      if not value >= 0:
        raise ValueError(f'--temperature={value} must be >= 0.')
    elif field.name != 'seed' and not value > 0:
      raise ValueError(f'--{field.name}={value} must be > 0.')
  if settings.num_eigenvalues > settings.lanczos_iterations:
    raise ValueError(f'--num_eigenvalues={settings.num_eigenvalues} must be at most '
                     f'--lanczos_iterations={settings.lanczos_iterations}.')
  return settings


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  experiment_lib.quiet_orbax_logs()
  workdir = flags.FLAGS.workdir

  def run():
    settings = settings_from_flags()
    check_output(flags.FLAGS.output)  # before minutes of measuring
    result = measure(workdir, settings, against=flags.FLAGS.against,
                     data_dir=flags.FLAGS.data_dir, reference_only=flags.FLAGS.reference_only)
    path = write(workdir, result, flags.FLAGS.output)
    print(f'{path}: {summary_line(result)}')

  return faults.exit_code(run, workdir=workdir)


if __name__ == '__main__':
  define_flags()
  app.run(main)
