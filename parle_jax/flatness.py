"""How wide is the valley a model sits in: curvature, sharpness and local entropy.

Pure JAX (no Flax, no data): `loss` is any function ``params -> scalar`` of a
pytree of params, for example a model's loss over a fixed set of examples
(:func:`parle_jax.evaluate.dataset_loss` builds one for the project's models).
Every function here is traceable: wrap it in ``jax.jit`` (integer arguments
static) and pass `loss` as a ``jax.tree_util.Partial`` whose data are its
arguments, so that one compilation serves many models of the same shape.

* :func:`hvp` -- Hessian-vector products, forward over reverse, no dense Hessian.
* :func:`top_eigenvalues` -- Lanczos with full reorthogonalisation.
* :func:`hessian_trace` -- Hutchinson's estimate with Rademacher probes.
* :func:`spectral_density` -- stochastic Lanczos quadrature (Ghorbani et al. 2019).
* :func:`sharpness` -- the worst and the mean random loss increase within a
  per-filter ball (Keskar et al. 2017, scaled per filter as Li et al. 2018).
* :func:`local_entropy` -- a Langevin estimate of the Gibbs measure that
  Entropy-SGD and Parle follow (Chaudhari et al. 2017).
* :func:`interpolate` -- the loss along the segment between two models.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from parle_jax import flatness
  >>> loss = lambda p: 0.5 * (3.0 * p['w'][0] ** 2 + 1.0 * p['w'][1] ** 2)
  >>> params = {'w': jnp.ones(2)}
  >>> flatness.hvp(loss, params)({'w': jnp.array([1.0, 0.0])})['w'].tolist()
  [3.0, 0.0]
  >>> top = flatness.top_eigenvalues(loss, params, k=2, num_iterations=2,
  ...                                key=jax.random.PRNGKey(0))
  >>> [round(float(v), 4) for v in top]
  [3.0, 1.0]

References: Lanczos, J. Res. Natl. Bur. Stand. 45 (1950); Hutchinson, Commun.
Stat. 18 (1989); Ghorbani, Krishnan & Xiao, `An investigation into neural net
optimization via Hessian eigenvalue density <https://arxiv.org/abs/1901.10159>`_,
ICML 2019; Keskar et al., `On large-batch training for deep learning
<https://arxiv.org/abs/1609.04836>`_, ICLR 2017; Li et al., `Visualizing the loss
landscape of neural nets <https://arxiv.org/abs/1712.09913>`_, NeurIPS 2018;
Dinh et al., `Sharp minima can generalize for deep nets
<https://arxiv.org/abs/1703.04933>`_, ICML 2017; Chaudhari et al.,
`Entropy-SGD <https://arxiv.org/abs/1611.01838>`_, ICLR 2017.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from parle_jax import checks

Params = Any
Loss = Callable[[Params], jax.Array]


class TraceEstimate(NamedTuple):
  """Hutchinson's estimate of the Hessian's trace.

  Attributes:
    trace: the mean of ``z^T H z`` over the Rademacher probes ``z``.
    standard_error: the probes' sample standard deviation over ``sqrt(num_samples)``.
  """

  trace: jax.Array
  standard_error: jax.Array


class SpectralDensity(NamedTuple):
  """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

  Attributes:
    grid: ``[grid_size]`` eigenvalues at which `density` is given, spanning
      the Ritz values with five kernel widths either side.
    density: ``[grid_size]`` the smoothed density (integrates to 1 over `grid`).
    nodes: ``[num_probes, num_iterations]`` Ritz values of each probe's Lanczos run.
    weights: ``[num_probes, num_iterations]`` their quadrature weights (each row sums to 1).
    sigma: the width of the Gaussian kernel that smooths the nodes.
  """

  grid: jax.Array
  density: jax.Array
  nodes: jax.Array
  weights: jax.Array
  sigma: jax.Array


class Sharpness(NamedTuple):
  """Loss increases within a per-filter ball of relative radius ``radius``.

  Attributes:
    worst: the largest increase found by projected ascent (epsilon-sharpness).
    random_mean: the mean increase over random perturbations on the ball's surface.
    random_std: their standard deviation.
    loss: the loss at the params themselves.
  """

  worst: jax.Array
  random_mean: jax.Array
  random_std: jax.Array
  loss: jax.Array


class LocalEntropy(NamedTuple):
  """A Langevin estimate of the local-entropy Gibbs measure around ``x``.

  The measure is ``exp(-(f(y) + |y - x|^2 / (2 gamma)) / temperature)``; the
  gradient of the local entropy is ``(x - <y>) / gamma``.

  Attributes:
    mean_loss: ``<f(y)>``, the loss averaged over the chain after burn-in.
    distance: ``|x - <y>|``, the Euclidean distance from the params to the
      chain's mean.
    mean_params: ``<y>`` (a pytree like the params).
    loss: ``f(x)``, the loss at the params themselves.
  """

  mean_loss: jax.Array
  distance: jax.Array
  mean_params: Params
  loss: jax.Array


def hvp(loss: Loss, params: Params) -> Callable[[Params], Params]:
  """``v -> H v``, the Hessian of `loss` at `params` times `v`.

  Forward over reverse (``jax.jvp`` of ``jax.grad``): the cost of about two
  gradients per product, and no dense Hessian.

  Args:
    loss: ``params -> scalar``.
    params: the point at which the Hessian is taken (any pytree of arrays).

  Returns:
    A function from a pytree like `params` to a pytree like `params`.
  """
  grad = jax.grad(loss)

  def product(vector: Params) -> Params:
    return jax.jvp(grad, (params,), (vector,))[1]

  return product


def _flat_hvp(loss: Loss, params: Params):
  flat, unravel = ravel_pytree(params)
  product = hvp(loss, params)
  return flat, lambda v: ravel_pytree(product(unravel(v)))[0]


def _check_iterations(num_iterations: int, size: int) -> None:
  checks.integer('num_iterations', num_iterations)
  if num_iterations > size:
    raise ValueError(f'`num_iterations` must be at most the number of parameters ({size}), '
                     f'got {num_iterations}.')


def _lanczos(matvec: Callable[[jax.Array], jax.Array], start: jax.Array, num_iterations: int,
             key: jax.Array) -> jax.Array:
  """The ``[m, m]`` tridiagonal matrix of ``m`` Lanczos steps from `start`.

  Every new vector is orthogonalised against all earlier ones, twice
  (classical Gram-Schmidt, repeated), so the Ritz values do not repeat as in
  the plain three-term recurrence. When a step finds an invariant subspace (the
  new vector vanishes), the next vector is a fresh random one orthogonal to
  the basis and its coupling is zero: the matrix is then block diagonal, and
  each block's eigenvalues are exact.
  """
  size, dtype = start.shape[0], start.dtype
  basis = jnp.zeros((num_iterations + 1, size), dtype).at[0].set(start / jnp.linalg.norm(start))
  restarts = jax.random.normal(key, (num_iterations, size), dtype)

  def orthogonalise(w, basis):
    for _ in range(2):
      w = w - basis.T @ (basis @ w)
    return w

  def step(j, carry):
    basis, diagonal, offdiagonal = carry
    image = matvec(basis[j])
    diagonal = diagonal.at[j].set(jnp.vdot(basis[j], image))
    w = orthogonalise(image, basis)
    beta = jnp.linalg.norm(w)
    broke_down = beta <= 1e-5 * jnp.linalg.norm(image)
    fresh = orthogonalise(restarts[j], basis)
    fresh = fresh / jnp.maximum(jnp.linalg.norm(fresh), jnp.finfo(dtype).tiny)
    following = jnp.where(broke_down, fresh, w / jnp.where(broke_down, 1.0, beta))
    offdiagonal = offdiagonal.at[j].set(jnp.where(broke_down, 0.0, beta))
    return basis.at[j + 1].set(following), diagonal, offdiagonal

  zeros = jnp.zeros((num_iterations,), dtype)
  _, diagonal, offdiagonal = lax.fori_loop(0, num_iterations, step, (basis, zeros, zeros))
  return (jnp.diag(diagonal) + jnp.diag(offdiagonal[:-1], 1) + jnp.diag(offdiagonal[:-1], -1))


def top_eigenvalues(loss: Loss, params: Params, *, k: int = 1, num_iterations: int = 32,
                    key: jax.Array) -> jax.Array:
  """The `k` largest eigenvalues of the Hessian of `loss` at `params`, high to low.

  Lanczos with full reorthogonalisation from a Gaussian start: `num_iterations`
  Hessian-vector products, the basis held as ``[num_iterations, num_params]``.
  The largest Ritz values converge first; more iterations sharpen the lower ones.

  Args:
    loss: ``params -> scalar``.
    params: the point at which the Hessian is taken.
    k: how many eigenvalues, at most `num_iterations`.
    num_iterations: Lanczos steps, at most the number of parameters.
    key: PRNG key for the start vector.

  Returns:
    ``[k]`` float array, sorted from the largest eigenvalue down.
  """
  flat, matvec = _flat_hvp(loss, params)
  _check_iterations(num_iterations, flat.shape[0])
  checks.integer('k', k)
  if k > num_iterations:
    raise ValueError(f'`k` must be at most num_iterations={num_iterations}, got {k}.')
  start_key, restart_key = jax.random.split(key)
  start = jax.random.normal(start_key, flat.shape, flat.dtype)
  ritz = jnp.linalg.eigvalsh(_lanczos(matvec, start, num_iterations, restart_key))
  return ritz[::-1][:k]


def _rademacher(key: jax.Array, like: jax.Array) -> jax.Array:
  return jax.random.rademacher(key, like.shape, like.dtype)


def hessian_trace(loss: Loss, params: Params, *, num_samples: int = 64,
                  key: jax.Array) -> TraceEstimate:
  """Hutchinson's estimate of ``tr H``: the mean of ``z^T H z`` over Rademacher ``z``.

  The probes run one after another (``lax.map``), so memory is that of one
  Hessian-vector product. The variance of one probe is
  ``2 (|H|_F^2 - sum_i H_ii^2)``.

  Args:
    loss: ``params -> scalar``.
    params: the point at which the Hessian is taken.
    num_samples: probes, at least 2 (for the standard error).
    key: PRNG key for the probes.

  Returns:
    :class:`TraceEstimate` (the estimate and its standard error).
  """
  checks.integer('num_samples', num_samples, minimum=2)
  flat, matvec = _flat_hvp(loss, params)

  def quadratic_form(probe_key):
    probe = _rademacher(probe_key, flat)
    return jnp.vdot(probe, matvec(probe))

  samples = lax.map(quadratic_form, jax.random.split(key, num_samples))
  return TraceEstimate(samples.mean(), samples.std(ddof=1) / jnp.sqrt(num_samples))


def spectral_density(loss: Loss, params: Params, *, num_iterations: int = 32,
                     num_probes: int = 4, key: jax.Array, grid_size: int = 512,
                     sigma: Optional[float] = None) -> SpectralDensity:
  """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

  Each probe (a normalised Rademacher vector ``v``) runs `num_iterations`
  Lanczos steps; the tridiagonal matrix's eigenvalues are the quadrature nodes
  and the squared first components of its eigenvectors their weights, so that
  ``sum_i w_i g(theta_i)`` approximates ``v^T g(H) v``. The density is the
  probes' mean of Gaussians of width `sigma` at the nodes. Its first moment
  estimates ``tr H / num_params`` exactly as Hutchinson's estimate does.

  Args:
    loss: ``params -> scalar``.
    params: the point at which the Hessian is taken.
    num_iterations: Lanczos steps per probe, at most the number of parameters.
    num_probes: independent probes.
    key: PRNG key for the probes.
    grid_size: points of the returned grid.
    sigma: kernel width; default 1% of the nodes' range.

  Returns:
    :class:`SpectralDensity`.
  """
  flat, matvec = _flat_hvp(loss, params)
  _check_iterations(num_iterations, flat.shape[0])
  checks.integer('num_probes', num_probes)
  checks.integer('grid_size', grid_size, minimum=2)
  if sigma is not None and not checks.concrete_float(sigma) > 0:
    raise ValueError(f'`sigma` must be a positive float or None, got {sigma!r}.')

  def quadrature(probe_key):
    start_key, restart_key = jax.random.split(probe_key)
    tridiagonal = _lanczos(matvec, _rademacher(start_key, flat), num_iterations, restart_key)
    nodes, vectors = jnp.linalg.eigh(tridiagonal)
    return nodes, vectors[0] ** 2

  nodes, weights = lax.map(quadrature, jax.random.split(key, num_probes))
  low, high = nodes.min(), nodes.max()
  width = (jnp.asarray(0.01 * (high - low), flat.dtype) if sigma is None
           else jnp.asarray(sigma, flat.dtype))
  width = jnp.maximum(width, jnp.finfo(flat.dtype).eps * jnp.maximum(jnp.abs(high), 1.0))
  grid = jnp.linspace(low - 5 * width, high + 5 * width, grid_size)
  kernels = jnp.exp(-0.5 * ((grid[:, None, None] - nodes[None]) / width) ** 2)
  density = (kernels * weights[None]).sum(-1).mean(-1) / (width * jnp.sqrt(2 * jnp.pi))
  return SpectralDensity(grid, density, nodes, weights, width)


def _filter_norms(tree: Params) -> Params:
  """Per-filter norms, broadcastable to each leaf.

  A leaf with two or more axes holds one filter per index of its last axis
  (HWIO convolution kernels, ``[in, out]`` dense kernels); a vector or scalar
  (bias, batch-norm scale and shift) is one filter.
  """
  def norms(leaf):
    if leaf.ndim >= 2:
      return jnp.sqrt(jnp.sum(leaf ** 2, axis=tuple(range(leaf.ndim - 1)), keepdims=True))
    return jnp.sqrt(jnp.sum(leaf ** 2))
  return jax.tree_util.tree_map(norms, tree)


def filter_normalize(direction: Params, params: Params) -> Params:
  """`direction` with each filter rescaled to the norm of the same filter of `params`.

  Li et al. (2018): a direction whose filters have the params' filter norms
  perturbs every layer in proportion to its scale, which a network with batch
  norm otherwise does not see (scaling a filter before batch norm changes
  nothing, Dinh et al. 2017). Filters of zero norm in `direction` stay zero.
  """
  def rescale(d, d_norm, p_norm):
    return d * p_norm / jnp.where(d_norm > 0, d_norm, 1.0)
  return jax.tree_util.tree_map(rescale, direction, _filter_norms(direction),
                                _filter_norms(params))


def filter_normalized_direction(params: Params, key: jax.Array) -> Params:
  """A Gaussian direction with each filter scaled to the params' filter norm (Li et al.)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  gaussian = [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
  return filter_normalize(jax.tree_util.tree_unflatten(treedef, gaussian), params)


def _add(params: Params, delta: Params, scale=1.0) -> Params:
  return jax.tree_util.tree_map(lambda p, d: p + scale * d, params, delta)


def _project(delta: Params, bounds: Params) -> Params:
  """`delta` with each filter shrunk into the ball of radius ``bounds``."""
  def shrink(d, d_norm, bound):
    return d * jnp.minimum(1.0, bound / jnp.where(d_norm > 0, d_norm, 1.0))
  return jax.tree_util.tree_map(shrink, delta, _filter_norms(delta), bounds)


def sharpness(loss: Loss, params: Params, *, radius: float, key: jax.Array,
              num_steps: int = 10, num_random: int = 8, step_size: float = 0.5) -> Sharpness:
  """Loss increases within a per-filter ball: the worst found, and the random mean.

  The ball: every filter ``f`` of the perturbation has norm at most
  ``radius * |w_f|`` (filters as in :func:`filter_normalize`). Keskar et al.'s
  epsilon-sharpness bounds each weight by its own magnitude instead; the
  per-filter form is Li et al.'s normalisation, used because batch norm makes
  raw sharpness and curvature depend on the weight norm, which training can
  change without changing the function (Dinh et al. 2017). The worst
  increase comes from projected ascent: a random start on the ball's surface,
  then `num_steps` steps of ``step_size * radius`` per filter along the
  filter-normalised gradient, each projected back into the ball; the largest
  increase seen is kept. The random figures come from `num_random` random
  filter-normalised perturbations on the surface. Increases are raw loss
  differences (Keskar et al. also divide by ``1 + loss``).

  Args:
    loss: ``params -> scalar``.
    params: the model.
    radius: relative radius of the ball, > 0.
    key: PRNG key for the ascent's start and the random perturbations.
    num_steps: ascent steps (0: the random start alone).
    num_random: random perturbations, at least 2.
    step_size: ascent step as a fraction of the radius, > 0.

  Returns:
    :class:`Sharpness`.
  """
  if not checks.concrete_float(radius) or not float(radius) > 0:
    raise ValueError(f'`radius` must be a positive float, got {radius!r}.')
  checks.integer('num_steps', num_steps, minimum=0)
  checks.integer('num_random', num_random, minimum=2)
  if not checks.concrete_float(step_size) or not float(step_size) > 0:
    raise ValueError(f'`step_size` must be a positive float, got {step_size!r}.')
  base = loss(params)
  bounds = jax.tree_util.tree_map(lambda n: radius * n, _filter_norms(params))
  start_key, random_key = jax.random.split(key)
  value_and_grad = jax.value_and_grad(lambda delta: loss(_add(params, delta)))

  def ascend(carry, _):
    delta, worst = carry
    value, grad = value_and_grad(delta)
    step = jax.tree_util.tree_map(lambda g: step_size * radius * g,
                                  filter_normalize(grad, params))
    return (_project(_add(delta, step), bounds), jnp.maximum(worst, value)), None

  start = jax.tree_util.tree_map(lambda d: radius * d,
                                 filter_normalized_direction(params, start_key))
  (delta, worst), _ = lax.scan(ascend, (start, jnp.full((), -jnp.inf, base.dtype)), None,
                              length=num_steps)
  worst = jnp.maximum(worst, loss(_add(params, delta))) - base

  def random_increase(direction_key):
    direction = filter_normalized_direction(params, direction_key)
    return loss(_add(params, direction, radius)) - base

  increases = lax.map(random_increase, jax.random.split(random_key, num_random))
  return Sharpness(worst, increases.mean(), increases.std(ddof=1), base)


def local_entropy(loss: Loss, params: Params, *, gamma: float, num_steps: int,
                  step_size: float, key: jax.Array, temperature: float = 1.0,
                  burn_in: Optional[int] = None) -> LocalEntropy:
  """A Langevin estimate of the local-entropy Gibbs measure around `params`.

  Entropy-SGD and Parle follow ``grad f_gamma(x) = (x - <y>) / gamma``, where
  ``<y>`` is the mean of ``y`` under ``exp(-(f(y) + |y - x|^2 / (2 gamma)) / T)``.
  This runs unadjusted Langevin dynamics on that measure, from ``y = x``:
  ``y <- y - step_size * (grad f(y) + (y - x) / gamma) + sqrt(2 step_size T) xi``
  with Gaussian ``xi``, and averages ``f(y)`` and ``y`` over the steps after
  `burn_in`. A wide valley shows as a small mean loss and a small distance at
  a given `gamma`: the proximal term holds ``y`` near ``x`` while the loss
  stays low. (For a quadratic ``f`` the measure is Gaussian with precision
  ``(A + I / gamma) / T``; Langevin's step adds a bias of order `step_size`.)
  Entropy-SGD's thermal noise ``epsilon`` corresponds to ``T = epsilon^2 / 2``.

  Args:
    loss: ``params -> scalar``, the ``f`` above.
    params: the anchor ``x``.
    gamma: the scope, > 0 (Parle's ``1 / c_gamma``).
    num_steps: Langevin steps, more than `burn_in`.
    step_size: Langevin step, > 0.
    key: PRNG key for the noise.
    temperature: ``T``, >= 0 (0: gradient descent on the proximal loss).
    burn_in: steps left out of the averages; default ``num_steps // 2``.

  Returns:
    :class:`LocalEntropy`.
  """
  for name, value in (('gamma', gamma), ('step_size', step_size)):
    if not checks.concrete_float(value) or not float(value) > 0:
      raise ValueError(f'`{name}` must be a positive float, got {value!r}.')
  checks.nonnegative('temperature', temperature)
  checks.integer('num_steps', num_steps)
  burn_in = num_steps // 2 if burn_in is None else burn_in
  checks.integer('burn_in', burn_in, minimum=0)
  if burn_in >= num_steps:
    raise ValueError(f'`burn_in` must be less than num_steps={num_steps}, got {burn_in}.')
  flat, unravel = ravel_pytree(params)
  value_and_grad = jax.value_and_grad(lambda y: loss(unravel(y)))
  noise_scale = jnp.sqrt(2.0 * step_size * temperature).astype(flat.dtype)

  def langevin(carry, step_key):
    y, index, loss_sum, y_sum = carry
    value, grad = value_and_grad(y)
    kept = (index >= burn_in).astype(flat.dtype)
    loss_sum, y_sum = loss_sum + kept * value, y_sum + kept * y
    drift = grad + (y - flat) / gamma
    y = y - step_size * drift + noise_scale * jax.random.normal(step_key, flat.shape, flat.dtype)
    return (y, index + 1, loss_sum, y_sum), None

  start = (flat, jnp.zeros((), jnp.int32), jnp.zeros((), flat.dtype), jnp.zeros_like(flat))
  (_, _, loss_sum, y_sum), _ = lax.scan(langevin, start, jax.random.split(key, num_steps))
  kept = num_steps - burn_in
  mean = y_sum / kept
  return LocalEntropy(loss_sum / kept, jnp.linalg.norm(flat - mean), unravel(mean), loss(params))


def interpolate(loss: Loss, params_a: Params, params_b: Params, alphas) -> jax.Array:
  """The loss at ``(1 - alpha) * params_a + alpha * params_b`` for each of `alphas`.

  Args:
    loss: ``params -> scalar``.
    params_a: the model at ``alpha = 0``.
    params_b: the model at ``alpha = 1`` (same structure and shapes).
    alphas: 1-D array of mixing weights (any reals: outside [0, 1] extrapolates).

  Returns:
    ``[len(alphas)]`` losses, one after another (memory of one loss).
  """
  if jax.tree_util.tree_structure(params_a) != jax.tree_util.tree_structure(params_b) or any(
      a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(params_a),
                                         jax.tree_util.tree_leaves(params_b))):
    raise ValueError('`params_a` and `params_b` must have the same structure and shapes.')
  alphas = jnp.asarray(alphas)
  if alphas.ndim != 1:
    raise ValueError(f'`alphas` must be 1-D, got shape {alphas.shape}.')

  def at(alpha):
    return loss(jax.tree_util.tree_map(lambda a, b: (1 - alpha) * a + alpha * b,
                                       params_a, params_b))

  return lax.map(at, alphas)
