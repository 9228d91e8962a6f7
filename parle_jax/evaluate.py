"""Evaluation of the replicas, their ensemble and the reference (averaged) model.

Parle keeps ``n`` replicas ``x^1..x^n`` and, as its result, the *reference*
``x = mean_a x^a`` (docs/algorithm.md, "Batch norm and evaluation"). Every epoch the
training loop calls :func:`evaluate`, which reports on the test set

* ``reference/*``: the reference params, whose batch-norm statistics are
  recomputed (see below);
* ``replica/*``: each replica with its own params and its own running
  batch-norm statistics, one value per replica in global replica order;
* ``ensemble/*``: the mean of the replicas' softmax outputs (each replica in
  eval mode with its own statistics), for comparison with the reference;
* ``distance/*``: how far the replicas are from the reference, as the mean
  L2 distance and the mean cosine similarity of the flattened params.

Errors are in percent (0-100), losses are mean softmax cross-entropies (for
the ensemble: ``-log`` of the mean predicted probability of the true label).

The reference's batch-norm statistics are recomputed on training batches
(:func:`parle_jax.batch_norm.recompute_batch_stats`, re-exported here), as the
authors do.

:func:`train_error_and_loss` measures the replicas' eval-mode error on the
training set: the paper notes that Parle ends with a high training error.

Per-replica forward passes run in one ``pmap``-ed dispatch per batch for all
replicas (``vmap`` or a loop over the local replicas); the metrics are summed
over masked batches (:func:`parle_jax.data.eval_batches`, so each example
counts exactly once) and finished in float64 NumPy on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from parle_jax import checks
from parle_jax.batch_norm import check_bn_batches, recompute_batch_stats
from parle_jax import data as data_lib
from parle_jax import replicas as replicas_lib
from parle_jax import rounds

EVAL_MAPPINGS = replicas_lib.LOCAL_MAPPINGS
# Per-batch sums an evaluation pass returns (per replica, or for the ensemble).
_SUMS = ('loss', 'errors')


# ----------------------------------------------------------------------------
# Per-batch sums.


def _masked_sums(log_probs: jax.Array, label: jax.Array, mask: jax.Array
                 ) -> dict[str, jax.Array]:
  """Sums of cross-entropy and errors over the real examples of a batch.

  `log_probs` is ``[..., B, C]``; the sums have shape ``[...]``.
  """
  true = jnp.sum(jnp.where(jnp.arange(log_probs.shape[-1]) == label[:, None], log_probs, 0.0),
                 axis=-1)
  wrong = jnp.argmax(log_probs, axis=-1) != label
  return {'loss': jnp.sum(jnp.where(mask, -true, 0.0), axis=-1),
          'errors': jnp.sum(wrong & mask, axis=-1, dtype=jnp.int32)}


def _log_probs(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
  """Eval-mode log-softmax outputs of one model, in float32."""
  logits = model.apply(variables, images, train=False)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _single_model_sums(model, variables, batch, mean, std):
  """Loss and error sums of one model (the reference) on one masked batch."""
  images = data_lib.normalize(batch['image'], mean, std)
  return _masked_sums(_log_probs(model, variables, images), batch['label'], batch['mask'])


@functools.lru_cache(maxsize=32)
def _replica_sums_fn(model: nn.Module, replicas: replicas_lib.Replicas, mapping: str):
  """The pmapped per-batch pass of all replicas: per-replica and ensemble sums.

  Called as ``fn(params, model_state, batch, mean, std)`` with ``[D, R, ...]``
  state and one batch for all replicas; returns ``({'loss', 'errors'}`` of
  shape ``[D, R]``, the same for the ensemble of shape ``[D]``).
  """
  log_n = float(np.log(replicas.num_replicas))

  def device_fn(params, model_state, batch, mean, std):
    images = data_lib.normalize(batch['image'], mean, std)

    def one_replica(_, replica_params, replica_state):
      return _log_probs(model, {'params': replica_params, **replica_state}, images)

    log_probs = replicas.map_local(one_replica, mapping)(params, model_state)  # [R, B, C]
    per_replica = _masked_sums(log_probs, batch['label'], batch['mask'])
    # log of the mean softmax over all replicas, shifted by the max for stability.
    top = lax.pmax(jnp.max(log_probs, axis=0), replicas_lib.DEVICE_AXIS)
    total = lax.psum(jnp.sum(jnp.exp(log_probs - top), axis=0), replicas_lib.DEVICE_AXIS)
    ensemble = _masked_sums(jnp.log(total) + top - log_n, batch['label'], batch['mask'])
    return per_replica, ensemble

  return replicas.pmap(device_fn, in_axes=(0, 0, None, None, None))


@functools.lru_cache(maxsize=32)
def _reference_fn(replicas: replicas_lib.Replicas):
  """The mean of all replicas' params and each replica's distance to it.

  One all-reduce (the same mean as :meth:`Replicas.reference`). Returns
  ``(reference, {'l2', 'cosine'})`` with leading axes ``[D, R]``: the
  reference repeated per replica; the L2 distance and the cosine similarity
  of each replica's flattened params to it.
  """
  def reference_and_distances(_, params):
    reference = replicas.mean(params)
    pairs = [(x.astype(jnp.float32), r.astype(jnp.float32))
             for x, r in zip(jax.tree.leaves(params), jax.tree.leaves(reference))]
    total = lambda fn: sum(jnp.sum(fn(x, r)) for x, r in pairs)
    squared = total(lambda x, r: jnp.square(x - r))
    dot = total(lambda x, r: x * r)
    norms = jnp.sqrt(total(lambda x, _: x * x) * total(lambda _, r: r * r))
    return reference, {'l2': jnp.sqrt(squared), 'cosine': dot / norms}
  return replicas.per_replica(reference_and_distances)


# ----------------------------------------------------------------------------
# Host side.


def _check_arrays(arrays: Mapping[str, Any], name: str) -> None:
  if not isinstance(arrays, Mapping) or 'image' not in arrays or 'label' not in arrays:
    raise ValueError(f"{name} must be a dict with 'image' and 'label' arrays.")
  if np.shape(arrays['image'])[:1] == (0,):
    raise ValueError(f"{name} holds no examples (its 'image' has shape "
                     f"{np.shape(arrays['image'])}).")


def _metrics(sums: Mapping[str, np.ndarray], count: int, prefix: str,
             split: str) -> dict[str, Any]:
  """Error (percent) and mean loss from float64 sums; lists for per-replica sums."""
  error = 100.0 * np.asarray(sums['errors'], np.float64) / count
  loss = np.asarray(sums['loss'], np.float64) / count
  convert = (lambda x: float(x)) if error.ndim == 0 else (lambda x: [float(v) for v in x])
  return {f'{prefix}/{split}_error': convert(error), f'{prefix}/{split}_loss': convert(loss)}


def _add(total: Optional[dict], sums: Mapping[str, np.ndarray]) -> dict:
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  return sums if total is None else {k: total[k] + sums[k] for k in _SUMS}


def _replica_pass(model, replicas, state, arrays, mean, std, batch_size, mapping
                  ) -> tuple[dict, dict, int]:
  """Sums over `arrays` of every replica's (``[n]``) and the ensemble's metrics."""
  fn = _replica_sums_fn(model, replicas, checks.choice('mapping', mapping, EVAL_MAPPINGS))
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  outputs = []
  for batch in data_lib.eval_batches(arrays, batch_size):
    outputs.append(fn(state.params, state.model_state, batch, mean, std))
    if replicas.waits_for_each_call:
      jax.block_until_ready(outputs[-1])
  per_replica, ensemble = None, None
  for replica_sums, ensemble_sums in outputs:
    per_replica = _add(per_replica, replicas.gather(replica_sums))
    ensemble = _add(ensemble, replicas.first_copy(ensemble_sums))
  return per_replica, ensemble, int(np.shape(arrays['label'])[0])


def _reference_pass(model, variables, arrays, mean, std, batch_size) -> dict:
  """Sums over `arrays` of the reference model's metrics."""
  device = next(iter(jax.tree.leaves(variables)[0].devices()))
  mean, std = (jax.device_put(np.asarray(x, np.float32), device) for x in (mean, std))
  outputs = [_single_model_sums(model, variables, jax.device_put(batch, device), mean, std)
             for batch in data_lib.eval_batches(arrays, batch_size)]
  total = None
  for sums in outputs:
    total = _add(total, jax.device_get(sums))
  return total


def reference_variables(model: nn.Module, replicas: replicas_lib.Replicas,
                        state: rounds.ReplicaState, bn_batches: Any
                        ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The reference's variables, and each replica's distance to its params.

  Returns ``({'params': ..., **model_state}, {'l2': [n], 'cosine': [n]})``.
  The variables lie on this process's first device: the mean of the
  replicas' params and, if the model has any, ``batch_stats`` recomputed on
  `bn_batches` by :func:`recompute_batch_stats` (the first replica's tree
  gives the structure).
  """
  stacked, distances = _reference_fn(replicas)(state.params)
  distances = replicas.gather(distances)
  params = replicas.first_replica(stacked)
  # One placement (a plain single-device array) whatever the layout, so the
  # jitted reference functions compile once per model and shape.
  device = next(iter(jax.tree.leaves(params)[0].devices()))
  params = jax.device_put(params, device)
  variables = {'params': params}
  model_state = dict(state.model_state)
  if not jax.tree.leaves(model_state):
    return variables, distances
  if set(model_state) != {'batch_stats'}:
    raise ValueError(f"the replicas' model_state must hold only 'batch_stats', got "
                     f'{sorted(model_state)}.')
  structure = jax.device_put(replicas.first_replica(model_state['batch_stats']), device)
  bn_batches = jax.device_put(check_bn_batches(bn_batches), device)
  variables['batch_stats'] = recompute_batch_stats(model, params, structure, bn_batches)
  return variables, distances


def evaluate(model: nn.Module, replicas: replicas_lib.Replicas,
             state: rounds.ReplicaState, test_arrays: Mapping[str, np.ndarray], *,
             mean: Any, std: Any, bn_batches: Any, batch_size: int = 1000,
             mapping: str = 'vmap', train_arrays: Optional[Mapping[str, np.ndarray]] = None
             ) -> dict[str, float | list[float]]:
  """Test metrics of the reference, every replica and their ensemble; distances.

  Args:
    model: the Flax module the replicas train.
    replicas: their layout.
    state: the replicas' state (leaves ``[D, R, ...]``; ``model_state`` is
      ``{'batch_stats': ...}`` or empty).
    test_arrays: ``{'image': uint8 [N, H, W, C], 'label': int [N]}``.
    mean: per-channel mean ``[C]`` used by :func:`parle_jax.data.normalize`.
    std: per-channel standard deviation ``[C]``.
    bn_batches: normalised training images ``[num_batches, B, H, W, C]`` from
      which the reference's BN statistics are recomputed (may be None only for
      a model without batch norm).
    batch_size: test examples per forward pass (the last batch is padded and
      masked, so each example counts once).
    mapping: ``'vmap'`` or ``'sequential'``, how the replicas of one device
      are mapped.
    train_arrays: optionally (a subset of) the training set, on which the
      reference's error and loss are also measured.

  Returns:
    ``'reference/test_error'``, ``'reference/test_loss'``,
    ``'ensemble/test_error'``, ``'ensemble/test_loss'`` (floats),
    ``'replica/test_error'``, ``'replica/test_loss'`` (lists of n floats, in
    global replica order), ``'distance/l2_mean'`` and
    ``'distance/cosine_mean'`` (floats); with `train_arrays` also
    ``'reference/train_error'`` and ``'reference/train_loss'``. Errors are in
    percent.

  Raises:
    ValueError: for an empty test set, test images of another shape than
      `bn_batches`, mean/std of the wrong shape, a state of another layout,
      missing or empty `bn_batches`, or an unknown mapping.
  """
  checks.choice('mapping', mapping, EVAL_MAPPINGS)
  replicas.check_stacked(state.params, 'state.params')
  _check_arrays(test_arrays, 'test_arrays')
  image_shape = tuple(np.shape(test_arrays['image'])[1:])
  checks.channel_stats(mean, std, image_shape[-1])
  if jax.tree.leaves(state.model_state) or bn_batches is not None:
    bn_batches = check_bn_batches(bn_batches)
    if tuple(bn_batches.shape[2:]) != image_shape:
      raise ValueError(f'test images have shape {image_shape} but bn_batches images '
                       f'have shape {tuple(bn_batches.shape[2:])}.')

  per_replica, ensemble, count = _replica_pass(
      model, replicas, state, test_arrays, mean, std, batch_size, mapping)
  variables, distances = reference_variables(model, replicas, state, bn_batches)
  reference = _reference_pass(model, variables, test_arrays, mean, std, batch_size)
  on_train = {}
  if train_arrays is not None:
    _check_arrays(train_arrays, 'train_arrays')
    on_train = _metrics(_reference_pass(model, variables, train_arrays, mean, std, batch_size),
                        len(train_arrays['label']), 'reference', 'train')

  return {
      **_metrics(reference, count, 'reference', 'test'),
      **on_train,
      **_metrics(per_replica, count, 'replica', 'test'),
      **_metrics(ensemble, count, 'ensemble', 'test'),
      'distance/l2_mean': float(np.mean(np.asarray(distances['l2'], np.float64))),
      'distance/cosine_mean': float(np.mean(np.asarray(distances['cosine'], np.float64))),
  }


def train_error_and_loss(model: nn.Module, replicas: replicas_lib.Replicas,
                         state: rounds.ReplicaState, arrays: Mapping[str, np.ndarray], *,
                         mean: Any, std: Any, batch_size: int = 1000,
                         max_examples: Optional[int] = None,
                         mapping: str = 'vmap') -> dict[str, list[float]]:
  """Eval-mode error and loss of every replica on (the first examples of) a split.

  Args:
    model, replicas, state, mean, std, batch_size, mapping: as in :func:`evaluate`.
    arrays: ``{'image': uint8 [N, H, W, C], 'label': int [N]}``, normally
      the training set.
    max_examples: evaluate on the first `max_examples` examples only (all of
      them when None).

  Returns:
    ``{'replica/train_error': [...], 'replica/train_loss': [...]}``, one
    value per replica in global replica order; errors in percent.

  Raises:
    ValueError: for an empty split, ``max_examples < 1``, mean/std of the
      wrong shape, a state of another layout or an unknown mapping.
  """
  checks.choice('mapping', mapping, EVAL_MAPPINGS)
  replicas.check_stacked(state.params, 'state.params')
  _check_arrays(arrays, 'arrays')
  if max_examples is not None:
    if isinstance(max_examples, bool) or int(max_examples) != max_examples or max_examples < 1:
      raise ValueError(f'max_examples must be an integer >= 1 or None, got {max_examples!r}.')
    arrays = {'image': arrays['image'][:max_examples], 'label': arrays['label'][:max_examples]}
  checks.channel_stats(mean, std, np.shape(arrays['image'])[-1])
  per_replica, _, count = _replica_pass(model, replicas, state, arrays, mean, std,
                                        batch_size, mapping)
  return _metrics(per_replica, count, 'replica', 'train')


# ----------------------------------------------------------------------------
# The loss over a dataset as a function of the params (for parle_jax.flatness).


@functools.lru_cache(maxsize=32)
def _dataset_loss_fn(model: nn.Module, recompute_bn: bool):
  """``(model_state, bn_batches, batches, count, mean, std, params) -> mean loss``."""

  def mean_loss(model_state, bn_batches, batches, count, mean, std, params):
    if recompute_bn:
      model_state = dict(model_state, batch_stats=recompute_batch_stats(
          model, params, model_state['batch_stats'], bn_batches))
    variables = {'params': params, **model_state}

    def add_batch(total, batch):
      images = data_lib.normalize(batch['image'], mean, std)
      return total + _masked_sums(_log_probs(model, variables, images), batch['label'],
                                  batch['mask'])['loss'], None

    total, _ = lax.scan(add_batch, jnp.zeros((), jnp.float32), batches)
    return total / count

  return mean_loss


def dataset_loss(model: nn.Module, model_state: Any, arrays: Mapping[str, np.ndarray], *,
                 mean: Any, std: Any, batch_size: int = 500,
                 bn_batches: Any = None) -> jax.tree_util.Partial:
  """The eval-mode mean cross-entropy over `arrays`, as a function of the params.

  For :mod:`parle_jax.flatness`: ``loss(params)`` runs the model in eval mode
  with `model_state` held fixed (for a network with batch norm, the
  statistics it is evaluated with: the reference's recomputed ones from
  :func:`reference_variables`, or a replica's running ones), over all of
  `arrays` in batches of `batch_size` summed inside one ``lax.scan``, so
  memory is that of one batch and one call is one dispatch. The examples are
  put on the device once. With `bn_batches`, the batch-norm statistics are
  instead recomputed from the params on every call
  (:func:`recompute_batch_stats`, as the reference's are): the loss of the
  model as it would be evaluated, for perturbations too large for fixed
  statistics (a path between two models, say). The result is a ``jax.tree_util.Partial`` whose
  data (the examples, `model_state`) are pytree leaves: passed as an argument
  to a jitted function, one compilation serves every model of the same shapes.

  Examples:
    >>> import jax, numpy as np
    >>> from parle_jax import evaluate, models
    >>> model = models.create_model('lenet', 10)
    >>> variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
    >>> arrays = {'image': np.zeros((6, 28, 28, 1), np.uint8), 'label': np.arange(6)}
    >>> loss = evaluate.dataset_loss(model, {'batch_stats': variables['batch_stats']}, arrays,
    ...                              mean=[0.5], std=[0.5], batch_size=4)
    >>> loss.args[2]['image'].shape  # two batches of 4, the last padded
    (2, 4, 28, 28, 1)
    >>> bool(jax.jit(lambda f, p: f(p))(loss, variables['params']) > 0)
    True

  Args:
    model: the Flax module (``apply(variables, images, train=False)``).
    model_state: the non-param collections, e.g. ``{'batch_stats': ...}`` ({} if none).
    arrays: ``{'image': uint8 [N, H, W, C], 'label': int [N]}``.
    mean, std: per-channel normalisation, as for training.
    batch_size: examples per batch (the last is padded and masked).
    bn_batches: None (statistics from `model_state`), or normalised training
      images ``[num_batches, B, H, W, C]`` to recompute them from.

  Returns:
    ``loss(params) -> float32 scalar``, the mean over the N examples.
  """
  _check_arrays(arrays, 'arrays')
  checks.channel_stats(mean, std, np.shape(arrays['image'])[-1])
  batches = list(data_lib.eval_batches(arrays, batch_size))
  stacked = jax.device_put({k: np.stack([b[k] for b in batches]) for k in batches[0]})
  count = np.float32(np.shape(arrays['label'])[0])
  recompute_bn = bn_batches is not None and bool(jax.tree.leaves(model_state))
  if recompute_bn:
    if set(model_state) != {'batch_stats'}:
      raise ValueError("with bn_batches, model_state must hold only 'batch_stats', got "
                       f'{sorted(model_state)}.')
    bn_batches = jax.device_put(check_bn_batches(bn_batches))
  return jax.tree_util.Partial(_dataset_loss_fn(model, recompute_bn),
                               jax.device_put(dict(model_state)),
                               bn_batches if recompute_bn else None, stacked, count,
                               np.asarray(mean, np.float32), np.asarray(std, np.float32))
