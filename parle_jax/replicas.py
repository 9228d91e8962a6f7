"""Replicas onto devices: ``pmap`` over devices, ``vmap`` or a loop within one.

``n`` replicas on ``D`` devices are stored with two leading axes,
``[D, R, ...]`` with ``R = n / D`` replicas per device. The device axis is
mapped with ``jax.pmap`` (axis name ``'device'``); the local axis either with
``jax.vmap`` (axis name ``'replica'``) or one replica after another with
``lax.map``. The choice matters: ``vmap`` turns per-replica convolution weights
into grouped convolutions, which run 2-4x slower on GPUs than a loop, while
small dense models gain a little from ``vmap`` (docs/measurements.md). The global
replica index is ``axis_index('device') * R + r``; a collective over all
replicas reduces over ``('device', 'replica')``.

The device axis is mapped in one place only, :meth:`Replicas.pmap`: with
``jax.pmap`` (the default) or, with ``device_map='shard_map'``, with
``jax.jit`` of ``jax.shard_map`` over a ``jax.sharding.Mesh``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from parle_jax import checks

DEVICE_AXIS = 'device'
REPLICA_AXIS = 'replica'
LOCAL_MAPPINGS = ('vmap', 'sequential')  # how one device runs its replicas
MAPPINGS = LOCAL_MAPPINGS + ('auto',)  # 'auto': the faster, measured
DEVICE_MAPS = ('pmap', 'shard_map')  # how the device axis is mapped


def check_mapping(mapping: str) -> str:
  """Returns `mapping` if it is one of :data:`MAPPINGS`, else raises ValueError."""
  return checks.choice('mapping', mapping, MAPPINGS)


def local_mapping(requested: str, *, per_device: int, communicates_every_step: bool = False,
                  what: str = 'these steps', name: str = 'mapping') -> str:
  """The local mapping `per_device` replicas of a device use: the one place it is decided.

  One replica per device leaves nothing to choose (``'vmap'``); steps that
  communicate need the local replica axis named, so ``'vmap'`` (an explicit
  ``'sequential'`` is refused, naming `what` and the argument `name`);
  otherwise `requested` (``'auto'`` stays, to be measured by the round).
  """
  checks.choice(name, requested, MAPPINGS)
  if per_device == 1:
    return 'vmap'
  if communicates_every_step:
    if requested == 'sequential':
      raise ValueError(f"{name}='sequential' cannot run {what}, which communicates every step; "
                       "use 'vmap' or 'auto'.")
    return 'vmap'
  return requested


class Replicas:
  """``num_replicas`` replicas laid out over devices.

  Attributes:
    num_replicas: ``n``, replicas over all processes.
    devices: the global devices the device axis runs over (all of them).
    local_devices: this process's share of `devices`, in the same order.
    per_device: ``R = n / D``, replicas per device.
    mapping: how the ``R`` local replicas are mapped: ``'vmap'``,
      ``'sequential'`` or ``'auto'`` (chosen by measurement, see
      :mod:`parle_jax.rounds`).
    device_map: how the device axis is mapped: ``'pmap'`` (``jax.pmap``, the
      default) or ``'shard_map'`` (``jax.jit`` of ``jax.shard_map`` over a
      one-axis ``jax.sharding.Mesh`` of `devices`, for code built on ``jit``
      with shardings). Both run the same per-device program and give the
      same numbers; the arrays they take and return are the same global
      ``[D, ...]`` arrays sharded over `devices`.

  Examples:
    >>> import jax, parle_jax
    >>> replicas = parle_jax.Replicas(3, devices=jax.devices()[:1])
    >>> replicas.per_device, replicas.axis_name
    (3, ('device', 'replica'))
  """

  def __init__(self, num_replicas: int, devices: Optional[Sequence[Any]] = None,
               mapping: str = 'auto', *, device_map: str = 'pmap'):
    checks.integer('num_replicas', num_replicas)
    self.device_map = checks.choice('device_map', device_map, DEVICE_MAPS)
    self.devices = list(jax.devices() if devices is None else devices)
    if not self.devices:
      raise ValueError('`devices` must name at least one device, got an empty list.')
    if num_replicas % len(self.devices):
      raise ValueError(
          f'`num_replicas`={num_replicas} is not divisible by the number of '
          f'devices ({len(self.devices)}): each device must hold the same number '
          'of replicas. Choose a multiple of the device count or pass `devices`.')
    self.num_replicas = int(num_replicas)
    self.mapping = check_mapping(mapping)
    self.per_device = self.num_replicas // len(self.devices)
    self.local_devices = [d for d in self.devices
                          if d.process_index == jax.process_index()]

  def __repr__(self):
    return (f'Replicas(num_replicas={self.num_replicas}, devices={len(self.devices)}, '
            f'per_device={self.per_device}, mapping={self.mapping!r}, '
            f'device_map={self.device_map!r})')

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def num_local_replicas(self) -> int:
    """Replicas whose state this process holds."""
    return len(self.local_devices) * self.per_device

  @property
  def axis_name(self):
    """The axes a collective over all replicas names; None for one replica."""
    return None if self.num_replicas == 1 else (DEVICE_AXIS, REPLICA_AXIS)

  @property
  def local_replica_ids(self) -> np.ndarray:
    """Global indices of the replicas this process holds, in storage order."""
    ids = [self.devices.index(d) * self.per_device + r
           for d in self.local_devices for r in range(self.per_device)]
    return np.asarray(ids, np.int32)

  # --- moving data -----------------------------------------------------------
  @functools.cached_property
  def mesh(self) -> jax.sharding.Mesh:
    """The one-axis mesh ``('device',)`` of `devices` that replica arrays are sharded over."""
    return jax.sharding.Mesh(np.asarray(self.devices), (DEVICE_AXIS,))

  @functools.cached_property
  def _device_sharding(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(DEVICE_AXIS))

  def _put(self, local: np.ndarray) -> jax.Array:
    """``[D_local, ...]`` host data -> a global ``[D, ...]`` array on the devices."""
    return jax.make_array_from_process_local_data(self._device_sharding, local)

  def shard(self, tree: Any) -> Any:
    """``[n_local, ...]`` arrays -> ``[D, R, ...]`` arrays on the devices."""
    def put(x):
      x = np.asarray(x)
      if x.ndim == 0 or x.shape[0] != self.num_local_replicas:
        raise ValueError(
            f'expected a leading replica axis of {self.num_local_replicas}, got '
            f'an array of shape {x.shape}.')
      return self._put(x.reshape((len(self.local_devices), self.per_device) + x.shape[1:]))
    return jax.tree.map(put, tree)

  def broadcast(self, tree: Any) -> Any:
    """The same arrays on every device: ``[D, ...]``, one copy per device."""
    def put(x):
      x = np.asarray(x)
      return self._put(np.broadcast_to(x, (len(self.local_devices),) + x.shape))
    return jax.tree.map(put, tree)

  def to_global(self, tree: Any) -> Any:
    """Device-axis arrays as global ``[D, ...]`` arrays spanning all processes.

    With several processes, ``pmap`` returns host-local arrays
    ``[D_local, ...]`` (its classic semantics); what needs the global view
    (orbax checkpoints) gets it from here, without copying. Global arrays, and
    everything when there is one process, are returned as they are.
    """
    if jax.process_count() == 1:
      return tree

    def to_global(x):
      if not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return x
      if x.ndim == 0 or x.shape[0] != len(self.local_devices):
        raise ValueError(f'expected a leading device axis of {len(self.local_devices)} '
                         f'(this process\'s devices), got an array of shape {x.shape}.')
      return jax.make_array_from_single_device_arrays(
          (self.num_devices,) + x.shape[1:], self._device_sharding,
          [shard.data for shard in x.addressable_shards])
    return jax.tree.map(to_global, tree)

  def check_stacked(self, tree: Any, name: str = 'state') -> None:
    """Raises ValueError unless every leaf of `tree` has leading axes ``[D, R]``.

    ``D`` counts all devices (global arrays, as :meth:`shard` makes them) or
    this process's (what ``jax.pmap`` returns with several processes). Checked
    where stacked arrays come in, so that a wrong layout is named instead of
    failing as a shape error inside the mapped program.
    """
    allowed = {(self.num_devices, self.per_device), (len(self.local_devices), self.per_device)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if tuple(np.shape(leaf)[:2]) not in allowed:
        raise ValueError(
            f'{name}{jax.tree_util.keystr(path)} has leading axes {tuple(np.shape(leaf)[:2])}; '
            f'the replicas need [D, R] = {list((self.num_devices, self.per_device))} (devices, '
            'replicas per device).')

  def unshard(self, tree: Any) -> Any:
    """``[D, R, ...]`` device arrays -> ``[n_local, ...]`` NumPy arrays."""
    def get(x):
      shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
      host = np.concatenate([np.asarray(s.data) for s in shards], axis=0)
      return host.reshape((-1,) + host.shape[2:])
    return jax.tree.map(get, tree)

  # --- mapping functions -----------------------------------------------------
  def pmap(self, fn: Callable, *, in_axes=0, donate_argnums=()) -> Callable:
    """`fn` mapped over the device axis, as :attr:`device_map` says (the one place).

    With ``'pmap'``, ``jax.pmap`` (axis name ``'device'``). With
    ``'shard_map'``, ``jax.jit`` of ``jax.shard_map`` over :attr:`mesh`: each
    device's block ``[1, ...]`` of an argument mapped on axis 0 is handed to
    `fn` without its leading axis (arguments with ``in_axes`` None whole), and
    `fn`'s outputs are stacked back on a leading device axis, as ``pmap``
    does. `in_axes` is 0, None, or a tuple of those, one per argument.
    """
    if self.device_map == 'pmap':
      return jax.pmap(fn, axis_name=DEVICE_AXIS, in_axes=in_axes,
                      devices=self.devices, donate_argnums=donate_argnums)
    spec = jax.sharding.PartitionSpec

    def mapped(*args):
      axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
      if any(axis not in (0, None) for axis in axes):
        raise ValueError(f"device_map='shard_map' maps axis 0 or nothing, got in_axes={in_axes}.")

      def per_device(*blocks):
        blocks = [jax.tree.map(lambda x: x[0], b) if axis == 0 else b
                  for b, axis in zip(blocks, axes)]
        return jax.tree.map(lambda x: x[None], fn(*blocks))

      return jax.shard_map(per_device, mesh=self.mesh, out_specs=spec(DEVICE_AXIS),
                           in_specs=tuple(spec(DEVICE_AXIS) if axis == 0 else spec()
                                          for axis in axes),
                           check_vma=False)(*args)

    return jax.jit(mapped, donate_argnums=donate_argnums)

  def map_local(self, fn: Callable, mapping: str) -> Callable:
    """Maps ``fn(replica_id, *args)`` over the local replica axis of `args`.

    Must be called inside :meth:`pmap`. ``replica_id`` is the global replica
    index (int32 scalar). With ``'vmap'`` the axis is named ``'replica'``, so
    ``fn`` may use collectives over ``('device', 'replica')``; with
    ``'sequential'`` it runs the replicas one after another (``lax.map``) and
    must not use collectives.
    """
    checks.choice('mapping', mapping, LOCAL_MAPPINGS)
    per_device = self.per_device

    def mapped(*args):
      first = lax.axis_index(DEVICE_AXIS) * per_device
      ids = first + jnp.arange(per_device, dtype=jnp.int32)
      if mapping == 'vmap':
        return jax.vmap(fn, axis_name=REPLICA_AXIS)(ids, *args)
      return lax.map(lambda xs: fn(*xs), (ids,) + args)
    return mapped

  def per_replica(self, fn: Callable, *, donate_argnums=()) -> Callable:
    """``fn(replica_id, *args)`` on every replica (vmap locally), one dispatch."""
    return self.pmap(self.map_local(fn, 'vmap'), donate_argnums=donate_argnums)

  # --- reading replica-stacked results ----------------------------------------
  def gather(self, tree: Any) -> Any:
    """``[D, R, ...]`` device arrays -> NumPy ``[n, ...]`` in global replica order.

    With several processes every process gets all replicas (an all-gather
    between the processes); with one it is :meth:`unshard`.
    """
    local = self.unshard(tree)
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    ids = np.asarray(multihost_utils.process_allgather(self.local_replica_ids)).reshape(-1)

    def gather_leaf(x):
      everything = np.asarray(multihost_utils.process_allgather(x))
      out = np.empty((self.num_replicas,) + x.shape[1:], x.dtype)
      out[ids] = everything.reshape((-1,) + x.shape[1:])
      return out
    return jax.tree.map(gather_leaf, local)

  @staticmethod
  def first_copy(tree: Any) -> Any:
    """The copy on this process's first device of ``[D, ...]`` arrays, as NumPy.

    For results every device holds the same copy of (e.g. after a collective).
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)

  @staticmethod
  def first_replica(tree: Any) -> Any:
    """This process's first stored replica of ``[D, R, ...]`` arrays, on its device."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0, 0], tree)

  # --- the reference model ---------------------------------------------------
  @staticmethod
  def mean(tree: Any) -> Any:
    """The mean over all replicas, inside a function mapped over them.

    Call within :meth:`per_replica` (or :meth:`map_local` with ``'vmap'``
    under :meth:`pmap`): one all-reduce over ``('device', 'replica')``. The
    replicas' reference is this mean of their params.
    """
    return lax.pmean(tree, (DEVICE_AXIS, REPLICA_AXIS))

  @functools.cached_property
  def _mean_over_replicas(self) -> Callable:
    return self.per_replica(lambda _, tree: self.mean(tree))

  def reference(self, params: Any) -> Any:
    """The mean over all replicas of replica-stacked ``[D, R, ...]`` params.

    One all-reduce; returns one copy (on this process's first device).
    """
    return self.first_replica(self._mean_over_replicas(params))
