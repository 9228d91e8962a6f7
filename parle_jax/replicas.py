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

**Islands.** With ``devices_per_replica=k > 1`` a replica spans ``k``
devices, an *island*: consecutive devices of one host (the ones with the
fastest links; with a process per device, of consecutive processes). The devices form a 2-D mesh ``('device', 'data')`` of
``I = D / k`` islands by ``k``; the leading axis of every replica array then
counts islands, ``[I, R, ...]``, and each device of an island holds its
island's copy. Inside the round each device takes ``batch / k`` of its
replica's mini-batch and all-reduces the gradient over ``'data'`` (its
island) every step; the coupling's all-reduce over ``('device', 'replica')``
runs once per round, between the devices of equal position in the islands.
Islands run under ``shard_map``; ``k = 1`` is the one-axis layout above.
"""

from __future__ import annotations

import functools
import socket
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from parle_jax import checks

DEVICE_AXIS = 'device'
REPLICA_AXIS = 'replica'
DATA_AXIS = 'data'  # the devices of one island (devices_per_replica > 1)
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


def islands_of(devices: Sequence[Any], devices_per_replica: int,
               host_of: Optional[Mapping[int, str]] = None) -> list[list[Any]]:
  """`devices` cut into islands of `devices_per_replica` consecutive devices of one host.

  Devices keep their order within a host; each host's devices are cut into
  consecutive groups, so an island never spans hosts: with a process per
  host its devices, with a process per device (SLURM's one task per GPU)
  consecutive processes of one host. `host_of` maps a process index to its
  host (default: every process its own host). Raises ValueError, naming the
  numbers, when a host's devices do not divide.
  """
  k = devices_per_replica
  host_of = host_of or {}
  by_host: dict[str, list[Any]] = {}
  for device in devices:
    host = host_of.get(device.process_index, f'process {device.process_index}')
    by_host.setdefault(host, []).append(device)
  for host, held in by_host.items():
    if len(held) % k:
      where = (f'{host} holds {len(held)} of the {len(devices)} devices'
               if len(by_host) > 1 else f'there are {len(held)} devices')
      raise ValueError(
          f'`devices_per_replica`={k} does not divide the devices: {where}, and an island '
          'of devices_per_replica devices must lie inside one host. Choose a divisor of '
          f'{len(held)}, or pass `devices`.')
  return [held[i:i + k] for held in by_host.values() for i in range(0, len(held), k)]


def process_hosts() -> dict[int, str]:
  """Each process's host name (one all-gather between the processes; {} with one process)."""
  if jax.process_count() == 1:
    return {}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  name = socket.gethostname().encode()[:255]
  mine = np.zeros(256, np.uint8)
  mine[0], mine[1:len(name) + 1] = len(name), np.frombuffer(name, np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 256)
  return {p: 'host ' + bytes(row[1:1 + row[0]]).decode(errors='replace')
          for p, row in enumerate(everyone)}


class Replicas:
  """``num_replicas`` replicas laid out over devices.

  Attributes:
    num_replicas: ``n``, replicas over all processes.
    devices: the global devices the replicas run on (all of them).
    local_devices: this process's share of `devices`, in the same order.
    devices_per_replica: ``k``, the devices one replica spans (an island).
    islands: `devices` as ``I = D / k`` islands of ``k`` devices, each inside
      one host (:func:`islands_of`); with ``k = 1`` one island per device.
    per_device: ``R = n / I``, replicas per island (per device when ``k = 1``).
    mapping: how the ``R`` local replicas are mapped: ``'vmap'``,
      ``'sequential'`` or ``'auto'`` (chosen by measurement, see
      :mod:`parle_jax.rounds`).
    device_map: how the device axis is mapped: ``'pmap'`` (``jax.pmap``, the
      default for ``k = 1``) or ``'shard_map'`` (``jax.jit`` of
      ``jax.shard_map`` over :attr:`mesh`, for code built on ``jit`` with
      shardings; islands need it). Both run the same per-device program and
      give the same numbers; the arrays they take and return are the same
      global ``[I, ...]`` arrays sharded over the islands.

  Examples:
    >>> import jax, parle_jax
    >>> replicas = parle_jax.Replicas(3, devices=jax.devices()[:1])
    >>> replicas.per_device, replicas.axis_name
    (3, ('device', 'replica'))
  """

  def __init__(self, num_replicas: int, devices: Optional[Sequence[Any]] = None,
               mapping: str = 'auto', *, devices_per_replica: int = 1,
               device_map: Optional[str] = None):
    checks.integer('num_replicas', num_replicas)
    checks.integer('devices_per_replica', devices_per_replica)
    self.devices_per_replica = k = int(devices_per_replica)
    if device_map is None:
      device_map = 'pmap' if k == 1 else 'shard_map'
    self.device_map = checks.choice('device_map', device_map, DEVICE_MAPS)
    if k > 1 and self.device_map == 'pmap':
      raise ValueError(
          f"device_map='pmap' cannot run `devices_per_replica`={k}: islands need a 2-D mesh; "
          "use device_map='shard_map' (or leave it None).")
    self.devices = list(jax.devices() if devices is None else devices)
    if not self.devices:
      raise ValueError('`devices` must name at least one device, got an empty list.')
    self.islands = islands_of(self.devices, k,
                              process_hosts() if k > 1 and jax.process_count() > 1 else None)
    num_islands = len(self.islands)
    if num_replicas % num_islands:
      if k == 1:
        raise ValueError(
            f'`num_replicas`={num_replicas} is not divisible by the number of '
            f'devices ({len(self.devices)}): each device must hold the same number '
            'of replicas. Choose a multiple of the device count or pass `devices`.')
      raise ValueError(
          f'`num_replicas`={num_replicas} is not divisible by the number of islands '
          f'({num_islands} = {len(self.devices)} devices / devices_per_replica {k}): each '
          f'island must hold the same number of replicas. Choose a multiple of {num_islands}, '
          f'or pass num_replicas x {k} devices.')
    self.num_replicas = int(num_replicas)
    self.mapping = check_mapping(mapping)
    self.per_device = self.num_replicas // num_islands
    self.local_devices = [d for d in self.devices
                          if d.process_index == jax.process_index()]
    self._local_islands = [i for i, island in enumerate(self.islands)  # held, in whole or part
                           if any(d.process_index == jax.process_index() for d in island)]

  def __repr__(self):
    islands = (f', devices_per_replica={self.devices_per_replica} (mesh '
               f"{len(self.islands)} 'device' x {self.devices_per_replica} 'data')"
               if self.devices_per_replica > 1 else '')
    return (f'Replicas(num_replicas={self.num_replicas}, devices={len(self.devices)}'
            f'{islands}, per_device={self.per_device}, mapping={self.mapping!r}, '
            f'device_map={self.device_map!r})')

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def num_islands(self) -> int:
    """``I``: the leading axis of replica arrays (the device count when ``k = 1``)."""
    return len(self.islands)

  @property
  def num_local_islands(self) -> int:
    """Islands on this process: the leading axis of what it holds."""
    return len(self._local_islands)

  @property
  def num_local_replicas(self) -> int:
    """Replicas whose state this process holds."""
    return self.num_local_islands * self.per_device

  @property
  def axis_name(self):
    """The axes a collective over all replicas names; None for one replica."""
    return None if self.num_replicas == 1 else (DEVICE_AXIS, REPLICA_AXIS)

  @property
  def data_axis_name(self) -> Optional[str]:
    """The axis of an island's devices (``'data'``); None when a replica has one device.

    A model's batch norm reduces its batch statistics over it in train mode
    (e.g. ``models.LeNet(batch_norm_axis_name=replicas.data_axis_name)``), so
    that ``k`` devices compute what one device computes.
    """
    return DATA_AXIS if self.devices_per_replica > 1 else None

  @property
  def local_replica_ids(self) -> np.ndarray:
    """Global indices of the replicas this process holds, in storage order."""
    ids = [island * self.per_device + r
           for island in self._local_islands for r in range(self.per_device)]
    return np.asarray(ids, np.int32)

  @property
  def waits_for_each_call(self) -> bool:
    """Whether callers should wait for each mapped call before dispatching the next.

    True for ``shard_map`` on CPU devices: XLA:CPU runs the devices of one
    process on one thread pool, and with many programs with collectives in
    flight (measured: 40 evaluation batches over 8 devices on 2 cores) a
    device can start the next program while the others still wait for it in
    an all-reduce, until XLA aborts the process after 40 s.
    """
    return self.device_map == 'shard_map' and self.devices[0].platform == 'cpu'

  # --- inside the round: an island's share ------------------------------------
  def batch_share(self, batch: Any) -> Any:
    """This device's ``batch / k`` examples of its replica's mini-batch (inside :meth:`pmap`).

    Device ``j`` of an island takes examples ``[j B / k, (j + 1) B / k)`` of
    the leading axis; with ``k = 1`` the batch itself.
    """
    k = self.devices_per_replica
    if k == 1:
      return batch

    def share(x):
      if x.shape[0] % k:
        raise ValueError(f'a mini-batch of {x.shape[0]} examples does not split over the '
                         f'devices_per_replica={k} devices of an island; use a batch size '
                         f'divisible by {k}.')
      size = x.shape[0] // k
      return lax.dynamic_slice_in_dim(x, lax.axis_index(DATA_AXIS) * size, size, axis=0)
    return jax.tree.map(share, batch)

  def island_mean(self, tree: Any) -> Any:
    """The mean over an island's devices (inside :meth:`pmap`); `tree` when ``k = 1``."""
    return tree if self.devices_per_replica == 1 else lax.pmean(tree, DATA_AXIS)

  # --- moving data -----------------------------------------------------------
  @functools.cached_property
  def mesh(self) -> jax.sharding.Mesh:
    """The mesh replica arrays are sharded over.

    One axis ``('device',)`` of `devices`; with islands, ``('device', 'data')``
    of shape ``[I, k]`` (replica arrays are replicated over ``'data'``).
    """
    if self.devices_per_replica == 1:
      return jax.sharding.Mesh(np.asarray(self.devices), (DEVICE_AXIS,))
    return jax.sharding.Mesh(np.asarray(self.islands), (DEVICE_AXIS, DATA_AXIS))

  @functools.cached_property
  def _device_sharding(self) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(DEVICE_AXIS))

  def _put(self, local: np.ndarray) -> jax.Array:
    """``[I_local, ...]`` host data -> a global ``[I, ...]`` array on the devices."""
    return jax.make_array_from_process_local_data(
        self._device_sharding, local, (self.num_islands,) + local.shape[1:])

  def shard(self, tree: Any) -> Any:
    """``[n_local, ...]`` arrays -> ``[I, R, ...]`` arrays on the devices."""
    def put(x):
      x = np.asarray(x)
      if x.ndim == 0 or x.shape[0] != self.num_local_replicas:
        raise ValueError(
            f'expected a leading replica axis of {self.num_local_replicas}, got '
            f'an array of shape {x.shape}.')
      return self._put(x.reshape((self.num_local_islands, self.per_device) + x.shape[1:]))
    return jax.tree.map(put, tree)

  def broadcast(self, tree: Any) -> Any:
    """The same arrays on every device: ``[I, ...]``, one copy per device."""
    def put(x):
      x = np.asarray(x)
      return self._put(np.broadcast_to(x, (self.num_local_islands,) + x.shape))
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
      if x.ndim == 0 or x.shape[0] != self.num_local_islands:
        raise ValueError(f'expected a leading device axis of {self.num_local_islands} '
                         f'(this process\'s devices), got an array of shape {x.shape}.')
      return jax.make_array_from_single_device_arrays(
          (self.num_islands,) + x.shape[1:], self._device_sharding,
          [shard.data for shard in x.addressable_shards])
    return jax.tree.map(to_global, tree)

  def check_stacked(self, tree: Any, name: str = 'state') -> None:
    """Raises ValueError unless every leaf of `tree` has leading axes ``[I, R]``.

    ``I`` counts all islands (devices when ``k = 1``; global arrays, as
    :meth:`shard` makes them) or this process's (what ``jax.pmap`` returns
    with several processes). Checked where stacked arrays come in, so that a
    wrong layout is named instead of failing as a shape error inside the
    mapped program.
    """
    allowed = {(self.num_islands, self.per_device), (self.num_local_islands, self.per_device)}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if tuple(np.shape(leaf)[:2]) not in allowed:
        raise ValueError(
            f'{name}{jax.tree_util.keystr(path)} has leading axes {tuple(np.shape(leaf)[:2])}; '
            f'the replicas need [D, R] = {list((self.num_islands, self.per_device))} (devices, '
            'replicas per device).')

  def unshard(self, tree: Any) -> Any:
    """``[I, R, ...]`` device arrays -> ``[n_local, ...]`` NumPy arrays.

    An island's devices hold copies of one block: each block is read once.
    """
    def get(x):
      blocks = {}
      for shard in x.addressable_shards:
        blocks.setdefault(shard.index[0].start or 0, shard.data)
      host = np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)], axis=0)
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
    does. `in_axes` is 0, None, or a tuple of those, one per argument. With
    islands, every device of an island gets the island's block, ``'data'``
    is bound inside `fn`, and `fn` must return the same on all of them.
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
