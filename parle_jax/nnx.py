"""Flax NNX modules in the fused rounds: split, loss, replicas, merge and checkpoints.

The only module of parle_jax that imports ``flax.nnx``. The rounds
(:mod:`parle_jax.rounds`) and :class:`parle_jax.Replicas` work on pytrees and
a loss in the contract
``loss_fn(params, model_state, batch, rng) -> (loss, (model_state, metrics))``;
this adapter takes an ``nnx.Module`` apart into what they take and puts it
back together:

* :func:`init_replica_variables` builds ``n`` replicas from a module factory
  under ``nnx.vmap``, each from its own seed (as
  :func:`parle_jax.training.init_replica_variables` does for Linen), and
  ``nnx.split`` s them into a :class:`Split`: the graph definition, the
  ``nnx.Param`` state (``params``: what the optimizer updates and Parle
  averages), the other variables grouped by their Linen collection name
  (``model_state``, e.g. ``{'batch_stats': ...}``: per replica, never
  averaged) and the RNG state (a template, see below).
* :func:`make_loss` / :func:`classification_loss` build the loss: every step
  merges one replica's ``params`` and ``model_state`` into the module, runs
  it and splits the updated ``model_state`` back out.
* :func:`merge`, :func:`replica` and :func:`reference` give an NNX module
  again: any replica, or the reference (the mean of the replicas' params).
* :class:`LeNet` is the Linen :class:`parle_jax.models.LeNet` as an
  ``nnx.Module``; :func:`conv_fn` plugs :mod:`parle_jax.conv` into ``nnx.Conv``.
* :func:`to_variables` / :func:`load_variables` convert to and from Linen-style
  ``{'params': ..., 'batch_stats': ...}`` variables, the format of
  :func:`parle_jax.checkpoint.save_variables` and of the saved reference.

Both trees are plain nested dicts (``nnx.State.to_pure_dict``), so the
replica state saves with :class:`parle_jax.checkpoint.Checkpointer` and
:class:`LeNet`'s trees are those of the Linen :class:`parle_jax.models.LeNet`.

Randomness. Dropout draws from the round's ``rng`` argument, which the round
derives from each replica's key and the step (so runs repeat bitwise, replicas
differ, and a resumed run equals an uninterrupted one), never from state
hidden in the module:

* the loss hands ``rng`` to the module at call time (``rngs=rng``, which
  ``nnx.Dropout`` accepts as a key), as :class:`LeNet` takes it; and
* RNG streams a module keeps (``nnx.Dropout(..., rngs=rngs)``) are reseeded
  from ``rng`` before every step (``nnx.reseed``; stream ``i`` of the sorted
  stream names gets ``fold_in(rng, i + 1)``). Their ``nnx.RngState`` (keys
  and counters) is split off into :attr:`Split.rng_state`, one copy that is
  only a template for merging: it is not in ``params`` or ``model_state``, so
  it is never trained, averaged, carried from step to step or checkpointed.

One replica per device, step by step. ``parle_jax.parle`` also works as the
optimizer of ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` in a step mapped
with ``jax.pmap(..., axis_name='replica')`` over the split state, one replica
per device: there its coupling's ``lax.cond`` stays a branch, and the
all-reduce runs once every ``L`` steps (``tests/test_nnx.py`` runs it)::

  tx = parle_jax.parle(0.1, L=25, axis_name='replica')

  def step(state, batch, rng):                  # one replica's (model, optimizer)
    model, optimizer = nnx.merge(graphdef, state)
    def loss(model):
      logits = model(batch['image'], train=True, rngs=rng)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  step = jax.pmap(step, axis_name='replica')    # state: leading axis = devices

Here ``graphdef`` is ``nnx.split((model, optimizer))[0]`` of one replica, and
the replicas' state comes from a ``jax.pmap`` of a function that merges each
replica's ``params`` and ``model_state`` (:func:`merge`), wraps the model in
``nnx.Optimizer`` and returns ``nnx.state((model, optimizer))``.

Several replicas on one device need a ``vmap`` over them, and under ``vmap``
the per-replica round counter turns that ``lax.cond`` into a select that runs
the all-reduce every step; use the fused round there
(:func:`parle_jax.parts_round` with this adapter), which couples once per
round whatever the layout.

Examples:
  >>> import jax, jax.numpy as jnp, parle_jax
  >>> from parle_jax import nnx as parle_nnx
  >>> replicas = parle_jax.Replicas(3, devices=jax.devices()[:1], mapping='vmap')
  >>> split = parle_nnx.init_replica_variables(
  ...     lambda rngs: parle_nnx.LeNet(rngs=rngs), 3, seed=0)
  >>> parts = parle_jax.parle_parts(0.1, L=2, gamma=0.03, rho=1.0,
  ...                               axis_name=replicas.axis_name)
  >>> state = parle_jax.init_replicas(replicas, parts.inner, split.params, split.model_state)
  >>> round_fn = parle_jax.parts_round(
  ...     parle_nnx.classification_loss(split, train=True), parts, replicas)
  >>> batches = {'image': jnp.zeros((3, 2, 4, 28, 28, 1)),
  ...            'label': jnp.zeros((3, 2, 4), jnp.int32)}
  >>> state, metrics = round_fn(state, batches)
  >>> sorted(metrics), metrics['loss'].shape
  (['error', 'loss'], (1, 3, 2))
  >>> model = parle_nnx.reference(split, replicas, state)  # an nnx.Module again
  >>> model(jnp.zeros((1, 28, 28, 1)), train=False).shape
  (1, 10)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.core import scope as linen_scope

from parle_jax import checks
from parle_jax import conv as conv_lib
from parle_jax import models
from parle_jax import replicas as replicas_lib
from parle_jax import rounds

# Linen LeNet's batch norm (PyTorch's defaults), shared with the NNX LeNet.
_BN_MOMENTUM = models._BN_MOMENTUM  # pylint: disable=protected-access
_BN_EPSILON = models._BN_EPSILON  # pylint: disable=protected-access

# apply_fn(module, batch, rng) -> (loss, metrics), for one replica's merged module.
ApplyFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict]]


class Split(NamedTuple):
  """An NNX module (or ``n`` stacked replicas of one) taken apart for the rounds.

  Attributes:
    graphdef: the ``nnx.GraphDef``: the module's structure and static fields.
    params: the ``nnx.Param`` values as a nested dict (``nnx.State.to_pure_dict``):
      what the optimizer updates and Parle averages. From
      :func:`init_replica_variables`, every leaf has a leading replica axis.
    model_state: the other variables, RNG state aside, as
      ``{collection: nested dict}`` with Linen's collection names (e.g.
      ``{'batch_stats': ...}`` for ``nnx.BatchStat``); ``{}`` if none. Per
      replica, never averaged.
    rng_state: the module's ``nnx.RngState`` (RNG keys and counters) of one
      replica, as an ``nnx.State``: only a template for merging, reseeded
      from the round's ``rng`` every step, never trained, averaged or saved.
    num_replicas: the length of the leading replica axis of `params` and
      `model_state`; None for one module without that axis (:func:`split`).
  """

  graphdef: Any
  params: Any
  model_state: Any
  rng_state: Any
  num_replicas: Optional[int] = None


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """The shape of every leaf of `tree`, by its key path (``jax.tree_util.keystr``)."""
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _collection_name(variable_type: type) -> str:
  """The Linen collection name of an NNX variable type (``nnx.BatchStat``: ``'batch_stats'``)."""
  try:
    return nnx.variablelib.variable_name_from_type(variable_type)
  except ValueError:
    return variable_type.__name__


def _partition(module: nnx.Module) -> Split:
  """``nnx.split`` of `module` into params, model state by collection and RNG state."""
  graphdef, params, rng_state, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
  grouped: dict[str, list] = {}
  for path, variable in nnx.to_flat_state(rest):
    grouped.setdefault(_collection_name(type(variable)), []).append((path, variable))
  model_state = {name: nnx.to_pure_dict(nnx.from_flat_state(items))
                 for name, items in sorted(grouped.items())}
  return Split(graphdef, nnx.to_pure_dict(params), model_state, rng_state)


def _check_module(module: Any, what: str) -> None:
  """Raises ValueError unless `module` is an ``nnx.Module`` holding ``nnx.Param`` variables."""
  if not isinstance(module, nnx.Module):
    raise ValueError(f'{what} must be a flax.nnx.Module, got {type(module).__name__}.')
  if not jax.tree.leaves(nnx.state(module, nnx.Param)):
    raise ValueError(
        f'{what} ({type(module).__name__}) has no nnx.Param variables; Parle trains and '
        'averages nnx.Param state, so declare the trainable weights as nnx.Param.')


def _check_split(split_: Any) -> None:
  if not isinstance(split_, Split):
    raise ValueError('`split_` must be a parle_jax.nnx.Split (from split or '
                     f'init_replica_variables), got {type(split_).__name__}.')


def split(module: nnx.Module) -> Split:
  """Takes one NNX module apart (no replica axis): see :class:`Split`.

  Raises:
    ValueError: `module` is not an ``nnx.Module`` or has no ``nnx.Param``.
  """
  _check_module(module, '`module`')
  return _partition(module)


def init_replica_variables(factory: Callable[[nnx.Rngs], nnx.Module], num_replicas: int, *,
                           seed: int = 0, same_init: bool = False) -> Split:
  """``num_replicas`` replicas of ``factory(rngs)``, stacked on axis 0 of every leaf.

  The factory runs under ``nnx.vmap`` over ``jax.random.split(key(seed), n)``,
  each replica with ``nnx.Rngs`` of its own key, so replicas start from
  different initialisations (the paper's choice); with ``same_init`` all from
  the first key (data-parallel SGD). ``split.params`` and ``split.model_state``
  go to :func:`parle_jax.init_replicas` as they are.

  Raises:
    ValueError: `num_replicas` is not an integer >= 1, or the factory does not
      build an ``nnx.Module`` with ``nnx.Param`` variables.
  """
  checks.integer('num_replicas', num_replicas)
  if not callable(factory):
    raise ValueError(f'`factory` must be a callable rngs -> nnx.Module, got {factory!r}.')
  _check_module(nnx.eval_shape(lambda: factory(nnx.Rngs(0))), 'the module `factory` builds')
  keys = jax.random.split(jax.random.key(seed), num_replicas)
  if same_init:
    keys = jnp.broadcast_to(keys[:1], keys.shape)
  stacked = nnx.vmap(lambda key: factory(nnx.Rngs(key)), in_axes=0, out_axes=0)(keys)
  parts = _partition(stacked)
  return parts._replace(rng_state=jax.tree.map(lambda x: x[0], parts.rng_state),
                        num_replicas=int(num_replicas))


def _rng_streams(rng_state: Any) -> list[str]:
  """The names of the RNG streams in `rng_state`, sorted."""
  return sorted({variable.tag for _, variable in nnx.to_flat_state(rng_state)
                 if isinstance(variable, nnx.RngKey)})


def merge(split_: Split, params: Any = None, model_state: Any = None) -> nnx.Module:
  """The NNX module of one replica's `params` and `model_state` (``nnx.merge``).

  They default to ``split_``'s own, for a :class:`Split` of one module (from
  :func:`split`); with stacked replicas take one with :func:`replica`.

  Raises:
    ValueError: the trees' keys or shapes are not one replica's of ``split_``.
  """
  _check_split(split_)
  if params is None or model_state is None:
    if split_.num_replicas is not None:
      raise ValueError(f'this Split holds {split_.num_replicas} stacked replicas; pass one '
                       "replica's params and model_state, or use parle_jax.nnx.replica.")
    params = split_.params if params is None else params
    model_state = split_.model_state if model_state is None else model_state
  lead = 0 if split_.num_replicas is None else 1
  for name, given, own in (('params', params, split_.params),
                           ('model_state', model_state, split_.model_state)):
    want = {path: shape[lead:] for path, shape in _shapes(own).items()}
    have = _shapes(given)
    for path in sorted(set(want) | set(have)):
      if want.get(path) != have.get(path):
        raise ValueError(f"`{name}{path}` is {have.get(path, 'missing')} here, "
                         f"{want.get(path, 'missing')} in one replica of the split module "
                         '(a stacked tree, or another model\'s?).')
  return nnx.merge(split_.graphdef, params, split_.rng_state, *model_state.values())


def make_loss(split_: Split, apply_fn: ApplyFn, *, train: bool = True) -> rounds.LossFn:
  """A loss in the rounds' contract from ``apply_fn(module, batch, rng) -> (loss, metrics)``.

  Each call merges one replica's ``params`` and ``model_state`` into the
  module (of ``split_.graphdef``), sets it to train mode (``module.train()``)
  if `train`, reseeds its RNG streams from `rng` (see the module docstring),
  runs `apply_fn` and splits the updated ``model_state`` back out (BatchNorm
  statistics, per replica). `apply_fn` should pass `rng` to a module that
  takes its dropout key at call time.
  """
  _check_split(split_)
  if not callable(apply_fn):
    raise ValueError(f'`apply_fn` must be a callable (module, batch, rng) -> (loss, metrics), '
                     f'got {apply_fn!r}.')
  streams = _rng_streams(split_.rng_state)

  def loss_fn(params, model_state, batch, rng):
    module = merge(split_, params, model_state)
    if train:
      module.train()
    if streams:
      key = rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)
      nnx.reseed(module, **{name: jax.random.fold_in(key, i + 1)
                            for i, name in enumerate(streams)})
    loss, metrics = apply_fn(module, batch, rng)
    return loss, (_partition(module).model_state, metrics)

  return loss_fn


def classification_loss(split_: Split, *, pass_rng: bool = True, **call_kwargs: Any
                        ) -> rounds.LossFn:
  """Mean softmax cross-entropy of the module in train mode, with its error rate.

  The batch is ``{'image': float [B, H, W, C], 'label': int [B]}``, as for
  :func:`parle_jax.training.classification_loss`; the module is called as
  ``module(images, rngs=rng, **call_kwargs)`` (without ``rngs`` when
  ``pass_rng`` is False, for modules that keep their own RNG streams), e.g.
  ``classification_loss(split, train=True)`` for :class:`LeNet`.
  """

  def apply_fn(module, batch, rng):
    rngs = {'rngs': rng} if pass_rng else {}
    logits = module(batch['image'], **rngs, **call_kwargs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    error = jnp.mean(jnp.argmax(logits, -1) != batch['label'])
    return loss, {'error': error}

  return make_loss(split_, apply_fn)


def replica(split_: Split, replicas: replicas_lib.Replicas, state: rounds.ReplicaState,
            index: int) -> nnx.Module:
  """Replica `index` (global order) of the replica state, as an NNX module (host arrays)."""
  checks.integer('index', index, minimum=0)
  if index >= replicas.num_replicas:
    raise ValueError(f'`index` must be below num_replicas={replicas.num_replicas}, got {index}.')
  params, model_state = jax.tree.map(lambda x: jnp.asarray(x[index]),
                                     replicas.gather((state.params, state.model_state)))
  return merge(split_, params, model_state)


def reference(split_: Split, replicas: replicas_lib.Replicas, state: rounds.ReplicaState,
              *, model_state_of: int = 0) -> nnx.Module:
  """The reference as an NNX module: the replicas' mean params (one all-reduce).

  Its ``model_state`` (BatchNorm statistics) is replica `model_state_of`'s:
  statistics are not averaged; recompute them on training batches for the
  best evaluation, as the Linen path does.
  """
  checks.integer('model_state_of', model_state_of, minimum=0)
  if model_state_of >= replicas.num_replicas:
    raise ValueError(f'`model_state_of` must be below num_replicas={replicas.num_replicas}, '
                     f'got {model_state_of}.')
  params = replicas.reference(state.params)
  model_state = jax.tree.map(lambda x: jnp.asarray(x[model_state_of]),
                             replicas.gather(state.model_state))
  return merge(split_, params, model_state)


def to_variables(module: nnx.Module) -> dict[str, Any]:
  """Linen-style variables ``{'params': ..., **collections}`` of `module` (RNG state aside).

  For :class:`LeNet` they are those of the Linen ``models.LeNet``:
  ``{'params', 'batch_stats'}``; save them with
  :func:`parle_jax.checkpoint.save_variables`.
  """
  _check_module(module, '`module`')
  parts = _partition(module)
  return {'params': parts.params, **parts.model_state}


def load_variables(module: nnx.Module, variables: Any) -> nnx.Module:
  """Writes Linen-style variables (e.g. the saved reference) into `module`; returns it.

  `variables` is ``{'params': ..., 'batch_stats': ...}`` as
  :func:`parle_jax.checkpoint.load_variables` returns it; their keys and
  shapes must be the module's (:func:`to_variables`), and ``nnx.update``
  writes them in place.

  Examples:
    >>> import tempfile, jax.numpy as jnp
    >>> from flax import nnx
    >>> from parle_jax import checkpoint, nnx as parle_nnx
    >>> trained = parle_nnx.LeNet(rngs=nnx.Rngs(1))
    >>> path = tempfile.mkdtemp() + '/reference'
    >>> checkpoint.save_variables(path, parle_nnx.to_variables(trained))
    >>> model = parle_nnx.load_variables(parle_nnx.LeNet(rngs=nnx.Rngs(2)),
    ...                                  checkpoint.load_variables(path))
    >>> bool(jnp.all(model.Dense_1.kernel[...] == trained.Dense_1.kernel[...]))
    True

  Raises:
    ValueError: a collection, key or shape differs from the module's.
  """
  expected = to_variables(module)
  if not isinstance(variables, dict) or set(variables) != set(expected):
    got = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
    raise ValueError(f'`variables` must hold the collections {sorted(expected)} of this '
                     f'{type(module).__name__}, got {got}.')
  for name in expected:
    want, have = _shapes(expected[name]), _shapes(variables[name])
    for path in sorted(set(want) | set(have)):
      if want.get(path) != have.get(path):
        raise ValueError(
            f"`variables['{name}']{path}` is {have.get(path, 'missing')} in the variables, "
            f"{want.get(path, 'missing')} in this {type(module).__name__} (another model?).")
  nnx.update(module, *(jax.tree.map(jnp.asarray, variables[name]) for name in expected))
  return module


# ----------------------------------------------------------------------------
# LeNet as an nnx.Module.


def _linen_dropout_key(rng: jax.Array, name: str) -> jax.Array:
  """The key Linen's ``nn.Dropout`` named `name` under the root draws from ``{'dropout': rng}``.

  Linen's ``self.make_rng('dropout')`` folds the module path and its call
  count (1 for the first call) into the root key.
  """
  return linen_scope.LazyRng.create(rng, name, 1).as_jax_rng()


def conv_fn(conv: str = 'auto') -> Callable[..., jax.Array]:
  """The convolution `conv` of :mod:`parle_jax.conv`, for ``nnx.Conv(conv_general_dilated=...)``.

  ``'auto'`` is the matmul over patches on CPU (fast inside the rounds'
  ``lax.scan``) and XLA's convolution elsewhere; the results agree to rounding.

  ``nnx.Conv`` also passes ``out_sharding``, which only ``lax`` takes; the
  matmul convolution gets it only when it is None (unsharded activations).
  """
  conv_lib_fn = conv_lib.conv_general_dilated_fn(checks.choice(
      'conv', conv, conv_lib.CONV_IMPLEMENTATIONS))
  if conv_lib_fn is jax.lax.conv_general_dilated:
    return conv_lib_fn

  def matmul_conv(*args, out_sharding=None, **kwargs):
    if out_sharding is not None:
      raise ValueError("conv='matmul' runs on unsharded activations; use conv='xla' with "
                       f'out_sharding={out_sharding!r}.')
    return conv_lib_fn(*args, **kwargs)

  return matmul_conv


class LeNet(nnx.Module):
  """The Linen :class:`parle_jax.models.LeNet` as an ``nnx.Module``, layer for layer.

  conv5x5(20)-BN-ReLU-maxpool3-dropout, conv5x5(50)-BN-ReLU-maxpool2-dropout,
  FC 500-BN-ReLU-dropout, FC ``num_classes``; VALID convolutions. The
  attributes carry Linen's auto-names (``Conv_0``, ``BatchNorm_0``, ...,
  ``Dense_1``), so :func:`to_variables` gives the Linen LeNet's variables and
  the two load each other's checkpoints. Called as
  ``model(x, train=..., rngs=key)``; with ``train`` the three dropouts draw
  the masks Linen's draw with ``rngs={'dropout': key}``.

  Args:
    num_classes: outputs.
    dropout: the dropout rate, in [0, 1).
    conv: ``'auto'``, ``'xla'`` or ``'matmul'`` (:mod:`parle_jax.conv`).
    image_shape: ``(H, W, C)`` of the inputs, which sizes the first dense layer.
    batch_norm_axis_name: the mapped axis over which train-mode batch statistics
      are averaged: ``replicas.data_axis_name`` for replicas that span several
      devices (islands), None for the device's own batch.
    rngs: initialisation keys (the ``'params'`` or default stream).
  """

  def __init__(self, num_classes: int = 10, dropout: float = 0.25, conv: str = 'auto', *,
               image_shape: Sequence[int] = (28, 28, 1),
               batch_norm_axis_name: Optional[str] = None, rngs: nnx.Rngs):
    checks.integer('num_classes', num_classes)
    checks.fraction('dropout', dropout)
    checks.choice('conv', conv, conv_lib.CONV_IMPLEMENTATIONS)
    height, width, channels = image_shape
    convolution = conv_fn(conv)

    def batch_norm(features):  # PyTorch's momentum and epsilon, as the Linen LeNet's
      return nnx.BatchNorm(features, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                           axis_name=batch_norm_axis_name, rngs=rngs)

    self.Conv_0 = nnx.Conv(channels, 20, (5, 5), padding='VALID',  # pylint: disable=invalid-name
                           conv_general_dilated=convolution, rngs=rngs)
    self.BatchNorm_0 = batch_norm(20)  # pylint: disable=invalid-name
    self.Conv_1 = nnx.Conv(20, 50, (5, 5), padding='VALID',  # pylint: disable=invalid-name
                           conv_general_dilated=convolution, rngs=rngs)
    self.BatchNorm_1 = batch_norm(50)  # pylint: disable=invalid-name
    height, width = ((height - 4) // 3 - 4) // 2, ((width - 4) // 3 - 4) // 2
    self.Dense_0 = nnx.Linear(height * width * 50, 500, rngs=rngs)  # pylint: disable=invalid-name
    self.BatchNorm_2 = batch_norm(500)  # pylint: disable=invalid-name
    self.Dense_1 = nnx.Linear(500, num_classes, rngs=rngs)  # pylint: disable=invalid-name
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, *, train: bool, rngs: Optional[jax.Array] = None
               ) -> jax.Array:
    """Logits ``[B, num_classes]``; `rngs` (a key) drives dropout when `train`."""
    if train and self.dropout.rate > 0 and rngs is None:
      raise ValueError('LeNet(train=True) with dropout needs a key: call it with rngs=key.')

    def drop(x, index):
      if not train or self.dropout.rate == 0:
        return x
      return self.dropout(x, deterministic=False,
                          rngs=_linen_dropout_key(rngs, f'Dropout_{index}'))

    for index, (conv, norm, pool) in enumerate(((self.Conv_0, self.BatchNorm_0, 3),
                                                (self.Conv_1, self.BatchNorm_1, 2))):
      x = nnx.relu(norm(conv(x), use_running_average=not train))
      x = drop(models._max_pool(x, pool), index)  # pylint: disable=protected-access
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.BatchNorm_2(self.Dense_0(x), use_running_average=not train))
    return self.Dense_1(drop(x, 2))
