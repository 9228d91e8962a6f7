"""Batch-norm statistics of given weights (e.g. the averaged reference), like ``update_bn``.

Why batch norm is recomputed for Parle's reference: the running mean and variance
of a BN layer describe the activations *of the weights that produced them*.
The scale and shift of BN are ordinary weights and are averaged with all the
others, but the running statistics are per replica and never reduced: the
mean of the replicas' statistics is not the statistics of the mean of their
weights (the activations of the averaged network differ from those of every
replica). As the authors do (like ``torch.optim.swa_utils.update_bn``), the
reference's statistics are therefore re-estimated by forward passes in train
mode with dropout off over training batches (:func:`recompute_batch_stats`),
each batch weighted equally.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def recompute_batch_stats(model: nn.Module, params: Any, batch_stats: Any,
                          images_batches: Any) -> Any:
  """Re-estimates the BatchNorm statistics of `params`, like ``update_bn``.

  Runs `model` in train mode (every BN layer normalises with the statistics
  of its batch) with dropout off, one forward pass per batch, and sets each
  layer's running mean and variance to the equal-weight average over the
  batches of that layer's batch mean and variance. This is
  ``torch.optim.swa_utils.update_bn`` (cumulative average, ``momentum=None``),
  except that the variance is Flax's batch variance (divided by the number
  of values, not that minus one), the same one that Flax's running average
  accumulates during training.

  Implementation: every batch runs from all-zero statistics, so a layer with
  momentum ``m`` returns ``(1 - m) * batch_stat``; ``m`` is read from each
  ``nn.BatchNorm`` as it is called, and ``nn.Dropout`` calls return their
  input unchanged (so no dropout rng is used, whatever the model's rates).

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=...)``
      whose non-trainable variables are ``{'batch_stats': ...}``.
    params: the weights of one model (e.g. the reference), no replica axes.
    batch_stats: the model's ``batch_stats`` tree; only its structure, shapes
      and dtypes are used (its values are replaced).
    images_batches: normalised float images ``[num_batches, B, H, W, C]``.

  Returns:
    A tree like `batch_stats` holding the recomputed statistics (`batch_stats`
    itself when it is empty, i.e. the model has no BN layer).

  Raises:
    ValueError: for empty or non-float batches, BN statistics that no
      ``nn.BatchNorm`` call updates, or a BN layer called more than once.
  """
  images_batches = check_bn_batches(images_batches)
  if not jax.tree.leaves(batch_stats):
    return batch_stats
  return _recompute_batch_stats(model, params, batch_stats, images_batches)


def check_bn_batches(images_batches: Any) -> jax.Array:
  """`images_batches` as an array, after checking it is usable for BN stats."""
  if images_batches is None:
    raise ValueError('bn_batches / images_batches is None; batch-norm statistics '
                     'need training batches [num_batches, B, H, W, C].')
  images_batches = jnp.asarray(images_batches) if not isinstance(
      images_batches, jax.Array) else images_batches
  shape = tuple(images_batches.shape)
  if len(shape) < 3:
    raise ValueError(f'images_batches must be [num_batches, B, ...] (normally '
                     f'[num_batches, B, H, W, C]), got shape {shape}.')
  if shape[0] < 1 or shape[1] < 1:
    raise ValueError(f'images_batches must hold at least one batch of at least '
                     f'one image, got shape {shape}.')
  if not jnp.issubdtype(images_batches.dtype, jnp.floating):
    raise ValueError(f'images_batches must be normalised float images (see '
                     f'parle_jax.data.normalize), got dtype {images_batches.dtype}.')
  return images_batches


@functools.partial(jax.jit, static_argnums=0)
def _recompute_batch_stats(model, params, batch_stats, images_batches):
  """The jitted body of :func:`recompute_batch_stats`."""
  zeros = jax.tree.map(jnp.zeros_like, batch_stats)

  def add_batch(total, images):
    stats = _batch_statistics(model, params, zeros, images)
    return jax.tree.map(jnp.add, total, stats), None

  total, _ = lax.scan(add_batch, zeros, images_batches)
  return jax.tree.map(lambda t: t / images_batches.shape[0], total)


def _batch_statistics(model: nn.Module, params: Any, zero_stats: Any,
                      images: jax.Array) -> Any:
  """Each BN layer's batch mean and variance in one train-mode pass, dropout off."""
  momenta: dict[tuple[str, ...], float] = {}
  with nn.intercept_methods(functools.partial(_stats_interceptor, momenta)):
    _, updated = model.apply({'params': params, 'batch_stats': zero_stats}, images,
                             train=True, mutable=['batch_stats'])
  updated = updated['batch_stats']
  if jax.tree.structure(updated) != jax.tree.structure(zero_stats):
    raise ValueError(
        'the model updated batch_stats of another structure than the one given: '
        f'{jax.tree.structure(updated)} vs {jax.tree.structure(zero_stats)}.')

  def unscale(path, value):
    layer = tuple(str(getattr(key, 'key', key)) for key in path[:-1])
    if layer not in momenta:
      raise ValueError(f'batch_stats entry {jax.tree_util.keystr(path)} is not '
                       'updated by an nn.BatchNorm call in train mode.')
    if momenta[layer] >= 1.0:
      raise ValueError(f'the BatchNorm at {layer} has momentum {momenta[layer]}; '
                       'with momentum 1 it never updates its statistics.')
    return value / (1.0 - momenta[layer])

  return jax.tree_util.tree_map_with_path(unscale, updated)


def _stats_interceptor(momenta, next_fun, args, kwargs, context):
  """Skips ``nn.Dropout`` calls; records each ``nn.BatchNorm``'s momentum by path."""
  module = context.module
  if context.method_name != '__call__':
    return next_fun(*args, **kwargs)
  if isinstance(module, nn.Dropout):
    return args[0] if args else kwargs['inputs']
  if isinstance(module, nn.BatchNorm):
    path = tuple(module.path)
    if path in momenta:
      raise ValueError(f'the BatchNorm at {path} is called more than once per '
                       'forward pass; its batch statistics cannot be recovered.')
    momenta[path] = float(module.momentum)
  return next_fun(*args, **kwargs)
