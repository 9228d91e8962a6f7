"""Flax classifiers in the fused-round contract: loss function and replica init.

Bridges Flax modules (``model.apply(variables, images, train=...)`` with
``{'params', 'batch_stats'}`` variables, as in :mod:`parle_jax.models`) to
:mod:`parle_jax.rounds`, whose loss contract is
``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from parle_jax import models, rounds


def classification_loss(model: nn.Module, *,
                        batch_norm_axis_name: Optional[str] = None) -> rounds.LossFn:
  """Mean softmax cross-entropy of `model` in train mode, with its error rate.

  The batch is ``{'image': float [B, H, W, C], 'label': int [B]}``;
  ``model_state`` holds the replica's ``batch_stats`` (updated, never shared
  across replicas); ``rng`` drives dropout. `batch_norm_axis_name` (a model
  of :mod:`parle_jax.models`; ``replicas.data_axis_name`` for replicas that
  span several devices) makes the train-mode batch statistics those of the
  whole mini-batch of an island.
  """
  if batch_norm_axis_name is not None:
    if not hasattr(model, 'batch_norm_axis_name'):
      raise ValueError(
          f'batch_norm_axis_name={batch_norm_axis_name!r} needs a model with a '
          f'`batch_norm_axis_name` field (those of parle_jax.models); {type(model).__name__} '
          'has none: give its BatchNorm layers axis_name instead.')
    model = model.clone(batch_norm_axis_name=batch_norm_axis_name)

  def loss_fn(params, model_state, batch, rng):
    logits, new_model_state = model.apply(
        {'params': params, **model_state}, batch['image'], train=True,
        rngs={'dropout': rng}, mutable=list(model_state))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    error = jnp.mean(jnp.argmax(logits, -1) != batch['label'])
    return loss, (dict(new_model_state), {'error': error})

  return loss_fn


def init_replica_variables(model: nn.Module, key: jax.Array, num_replicas: int,
                           image_shape: Sequence[int], *,
                           same_init: bool = False) -> tuple[Any, Any]:
  """Params and model state of `num_replicas` replicas, stacked on axis 0.

  Replicas start from different random initialisations (the paper's choice),
  or all from the same one with ``same_init`` (data-parallel SGD).
  """
  keys = jax.random.split(key, num_replicas)
  if same_init:
    keys = jnp.broadcast_to(keys[:1], keys.shape)
  variables = jax.vmap(lambda k: models.init_variables(model, k, tuple(image_shape)))(keys)
  params = variables.pop('params')
  return params, variables
