"""Checkpoints of the replicas' whole training state, and of the reference model.

Built on orbax: a checkpoint is written to a temporary directory and renamed
when complete, so a process killed while saving leaves the previous checkpoint
intact (the next :class:`Checkpointer` on that directory ignores and deletes the
unfinished temporary directory). With several processes (``jax.distributed``),
every process must call :meth:`Checkpointer.save` and
:meth:`Checkpointer.restore_intact`: each writes and reads its own shards,
process 0 the metadata. The replica state (a pytree of arrays, see
:class:`parle_jax.rounds.ReplicaState`) is saved with its device layout and
restored onto the same layout; the reference model is saved separately as
plain Flax variables, loadable without any of parle_jax.

Every checkpoint carries checksums (CRC-32) of the arrays it saved, one per
array and shard, and of its own JSON record, kept in that record. A restore
verifies the shards that this process holds before handing them out:
orbax reads a file with flipped bytes without complaint, so a corrupt
checkpoint would otherwise be trained from. :meth:`Checkpointer.restore_intact`
restores the newest checkpoint that every process reads and verifies, and moves
the others aside, into ``<directory>/corrupt/`` (never deleted; orbax sees no
step there, and the pruning to `max_to_keep` never reaches it).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from typing import Any, NamedTuple, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

_UNFINISHED_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's name for a checkpoint being written
CORRUPT = 'corrupt'  # the subdirectory of the checkpoints that failed to read or verify
CHECKSUMS = 'checksums'  # the record's field holding them
_STATE, _RECORD = 'state', 'record'  # the items of a checkpoint (orbax's subdirectories)


class CorruptCheckpointError(Exception):
  """A checkpoint that cannot be read, or whose contents differ from its checksums.

  Attributes:
    round_index: the checkpoint's round.
    reason: what failed, e.g. ``'cannot be read (...)'`` or ``'fails its
      checksums: ...'``.
  """

  def __init__(self, directory: str, round_index: int, reason: str):
    super().__init__(f'the checkpoint after round {round_index} in {directory} {reason}')
    self.round_index, self.reason = round_index, reason


class CheckpointMismatchError(ValueError):
  """An intact checkpoint of another state: other arrays, shapes or dtypes than `like`'s."""


class Restored(NamedTuple):
  """A checkpoint read back: its round, state and record, and whether it was verified.

  `verified` is False only for a checkpoint saved without checksums (by
  parle_jax before they were added): it was read, but could not be checked.
  """

  round_index: int
  state: Any
  record: dict
  verified: bool


# ----------------------------------------------------------------------------
# Checksums.


def _index_key(index: tuple, shape: tuple) -> str:
  """A shard's place in its array: ``'[0:1,:,:]'`` (``':'`` for a whole axis)."""
  parts = []
  for axis, size in zip(index, shape):
    start, stop, _ = axis.indices(size)
    parts.append(':' if (start, stop) == (0, size) else f'{start}:{stop}')
  return '[' + ','.join(parts) + ']'


def _crc32(data: Any) -> int:
  """CRC-32 of an array's bytes (on CPU, no copy; on an accelerator, one to the host)."""
  array = np.ascontiguousarray(np.asarray(data))
  return zlib.crc32(array.reshape(-1).view(np.uint8))


def _arrays(tree: Any) -> list[tuple[str, Any]]:
  """The array leaves of `tree` with their paths (``jax.tree_util.keystr``)."""
  return [(jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if isinstance(leaf, (jax.Array, np.ndarray, np.generic))]


def _local_shards(leaf: Any) -> dict[str, Any]:
  """The shards of `leaf` on this process, by place (one of each: replicas share it)."""
  shape = np.shape(leaf)
  if not isinstance(leaf, jax.Array):
    return {_index_key((slice(None),) * len(shape), shape): leaf}
  shards = {}
  for shard in leaf.addressable_shards:
    shards.setdefault(_index_key(shard.index, shape), shard.data)
  return shards


def _all_places(leaf: Any) -> list[str]:
  """The places of all shards of `leaf`, on every process, in one order everywhere."""
  shape = np.shape(leaf)
  if not isinstance(leaf, jax.Array):
    return [_index_key((slice(None),) * len(shape), shape)]
  return sorted({_index_key(index, shape)
                 for index in leaf.sharding.devices_indices_map(shape).values()})


def _from_all_processes(tree: Any) -> Any:
  """`tree` (of NumPy arrays) of every process, stacked: leaves ``[processes, ...]``."""
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: np.asarray(x)[None], tree)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree))


def state_checksums(state: Any) -> dict[str, dict]:
  """CRC-32 of every shard of every array of `state`, as the checkpoint records them.

  Returns ``{path: {'shape', 'dtype', 'shards': {place: crc}}}``, the same on
  every process: each process computes the checksums of the shards it holds,
  and with several processes they are gathered (one collective, so every
  process must call this).
  """
  arrays = _arrays(state)
  places = [(path, place) for path, leaf in arrays for place in _all_places(leaf)]
  values = np.zeros(len(places), np.uint32)
  held = np.zeros(len(places), np.int32)
  position = {key: i for i, key in enumerate(places)}
  for path, leaf in arrays:
    for place, data in _local_shards(leaf).items():
      values[position[path, place]] = _crc32(data)
      held[position[path, place]] = 1
  values, held = _from_all_processes((values, held))
  table = {path: {'shape': list(np.shape(leaf)), 'dtype': str(np.dtype(leaf.dtype)),
                  'shards': {}} for path, leaf in arrays}
  for i, (path, place) in enumerate(places):
    holders = np.flatnonzero(held[:, i])
    if not len(holders):
      raise ValueError(f'no process holds the shard {place} of {path}')
    table[path]['shards'][place] = int(values[holders[0], i])
  return table


def _record_checksum(record: dict) -> int:
  """CRC-32 of the record's JSON, its own checksum left out (JSON keeps floats exactly)."""
  checksums = {k: v for k, v in record.get(CHECKSUMS, {}).items() if k != _RECORD}
  text = json.dumps(dict(record, **{CHECKSUMS: checksums}), sort_keys=True)
  return zlib.crc32(text.encode())


def _describe(err: BaseException) -> str:
  """The innermost error's type and first line, short enough for one line.

  Orbax wraps tensorstore's error (``OUT_OF_RANGE: Error reading ...``) in one
  that prints the whole tensorstore spec.
  """
  seen = {id(err)}
  while (err.__cause__ or err.__context__) is not None and id(
      err.__cause__ or err.__context__) not in seen:
    err = err.__cause__ or err.__context__
    seen.add(id(err))
  lines = str(err).strip().splitlines()
  text = lines[0] if lines else ''
  text = text if len(text) <= 240 else text[:237] + '...'
  return f'{type(err).__name__}: {text}' if text else type(err).__name__


# ----------------------------------------------------------------------------
# The checkpoints of a run.


class Checkpointer:
  """Saves, verifies and restores the training state every few rounds.

  Each checkpoint holds the replica state and a small JSON record (the round
  index and whatever the caller adds, e.g. the config, and the checksums of
  both), under ``directory/<round>``. The newest `max_to_keep` are kept
  (None: all); a directory that holds more when it is opened (a process
  killed between writing a checkpoint and deleting the oldest, or a lower
  `max_to_keep`) is pruned to them. Checkpoints moved aside for failing to
  read or verify lie in :attr:`corrupt_directory`, which nothing here deletes.

  With `read_only`, the directory is only read: nothing is pruned, deleted or
  created (for a look at a directory that another process may be writing).
  """

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3,
               read_only: bool = False):
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f'`max_to_keep` must be an integer >= 1 or None, got {max_to_keep!r}.')
    self.directory = os.path.abspath(directory)
    self.corrupt_directory = os.path.join(self.directory, CORRUPT)
    self.moved_aside: list[tuple[int, str, str]] = []  # (round, where to, why)
    if not read_only:
      self._remove_unfinished()
    # orbax's own clean-up of unfinished checkpoints runs in a background thread,
    # which races with anything that patches the file system (TFDS's mock_data in
    # tests); the synchronous clean-up above does the same job.
    # (Not orbax's read_only option: it warns twice on every opening.)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep, create=not read_only,
            enable_async_checkpointing=False))
    self._read_only = read_only
    # Reading goes through the handlers themselves: the manager's restore ends
    # in a barrier of all processes, which one that failed to read never reaches.
    self._state_handler = ocp.StandardCheckpointHandler()
    self._record_handler = ocp.JsonCheckpointHandler()
    if max_to_keep is not None and not read_only:
      for old in self.rounds()[:-max_to_keep]:
        self._manager.delete(old)

  def _remove_unfinished(self) -> None:
    """Deletes checkpoints a killed process left half written (orbax's temporary dirs)."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if _UNFINISHED_SUFFIX in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def latest_round(self) -> Optional[int]:
    """The round of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def rounds(self) -> list[int]:
    """The rounds of all complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def _writing(self, what: str) -> None:
    if self._read_only:
      raise ValueError(f'{what}: the Checkpointer of {self.directory} is read-only.')

  def delete_after(self, round_index: int) -> None:
    """Deletes the checkpoints after `round_index` (training went back to it)."""
    self._writing('delete_after')
    for newer in self.rounds():
      if newer > round_index:
        self._manager.delete(newer)

  def save(self, round_index: int, state: Any, record: dict) -> None:
    """Writes the state after `round_index` rounds and its checksums (blocking until complete)."""
    self._writing('save')
    record = dict(record, round=round_index)
    record[CHECKSUMS] = {'algorithm': 'crc32', _STATE: state_checksums(state)}
    record[CHECKSUMS][_RECORD] = _record_checksum(record)
    self._manager.save(round_index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)
    self._manager.wait_until_finished()

  def _path(self, round_index: int, item: str) -> epath.Path:
    return epath.Path(self.directory) / str(round_index) / item

  def _corrupt(self, round_index: int, reason: str) -> CorruptCheckpointError:
    if jax.process_count() > 1:
      reason += f' on process {jax.process_index()} of {jax.process_count()}'
    return CorruptCheckpointError(self.directory, round_index, reason)

  def _read_record(self, round_index: int) -> dict:
    """The record with its checksums; raises CorruptCheckpointError if it does not verify."""
    try:
      record = self._record_handler.restore(self._path(round_index, _RECORD),
                                            args=ocp.args.JsonRestore())
    except Exception as err:  # pylint: disable=broad-except  (orbax and tensorstore raise anything)
      raise self._corrupt(round_index, f'cannot be read ({_describe(err)})') from err
    if not isinstance(record, dict):
      raise self._corrupt(round_index, f'has a record that is a {type(record).__name__}')
    checksums = record.get(CHECKSUMS)
    if CHECKSUMS in record and not (isinstance(checksums, dict)
                                    and checksums.get(_RECORD) == _record_checksum(record)):
      raise self._corrupt(round_index, 'fails its checksums: its record differs from its '
                                       'checksum')
    return record

  def read_record(self, round_index: Optional[int] = None) -> dict:
    """The JSON record of a checkpoint (the newest by default), verified if it has checksums.

    Raises:
      CorruptCheckpointError: the record cannot be read or differs from its checksum.
    """
    round_index = self.latest_round() if round_index is None else round_index
    record = self._read_record(round_index)
    record.pop(CHECKSUMS, None)
    return record

  def _read(self, like: Any, round_index: int) -> Restored:
    """Reads one checkpoint and verifies this process's shards (see :meth:`restore`)."""
    record = self._read_record(round_index)
    checksums = record.pop(CHECKSUMS, None)
    arrays = _arrays(like)
    if checksums is not None:
      saved = checksums[_STATE]
      extra = sorted(set(saved) - {path for path, _ in arrays})
      if extra:
        raise CheckpointMismatchError(
            f'the checkpoint after round {round_index} in {self.directory} holds another '
            f'state: state{extra[0]} is in it, not here (saved with other config or code).')
      for path, leaf in arrays:
        there = saved.get(path)
        here = {'shape': list(np.shape(leaf)), 'dtype': str(np.dtype(leaf.dtype))}
        if there is None or {k: there[k] for k in here} != here:
          raise CheckpointMismatchError(
              f'the checkpoint after round {round_index} in {self.directory} holds another '
              f'state: state{path} is '
              + ('not in it' if there is None else
                 f'{there["dtype"]}{tuple(there["shape"])} there, '
                 f'{here["dtype"]}{tuple(here["shape"])} here')
              + ' (saved with other devices, config or code).')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      state = self._state_handler.restore(self._path(round_index, _STATE),
                                          args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # pylint: disable=broad-except  (tensorstore raises bare Exceptions)
      raise self._corrupt(round_index, f'cannot be read ({_describe(err)})') from err
    if checksums is None:
      logging.warning('the checkpoint after round %d in %s was saved without checksums (by an '
                      'older parle_jax): it was read, but could not be verified.', round_index,
                      self.directory)
      return Restored(round_index, state, record, verified=False)
    differ, checked = [], 0
    for path, leaf in _arrays(state):
      for place, data in _local_shards(leaf).items():
        checked += 1
        if saved[path]['shards'].get(place) != _crc32(data):
          differ.append(f'state{path}{place}')
    if differ:
      raise self._corrupt(round_index, f'fails its checksums: {len(differ)} of the {checked} '
                                       f'shards read differ (the first: {differ[0]})')
    return Restored(round_index, state, record, verified=True)

  def restore(self, like: Any, round_index: Optional[int] = None) -> tuple[Any, dict]:
    """Restores (state, record) of one checkpoint (the newest by default), verified.

    `like` gives the structure, shapes and devices. The shards this process
    holds are checked against the checksums saved with them; with several
    processes, use :meth:`restore_intact`, where all of them agree.

    Raises:
      FileNotFoundError: there is no checkpoint.
      CorruptCheckpointError: it cannot be read, or differs from its checksums.
      CheckpointMismatchError: it is intact but holds other arrays than `like`.
    """
    round_index = self.latest_round() if round_index is None else round_index
    if round_index is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    restored = self._read(like, round_index)
    return restored.state, restored.record

  def restore_intact(self, like: Any, rounds: Optional[Sequence[int]] = None
                     ) -> Optional[Restored]:
    """The newest checkpoint (of `rounds`, default all) that every process reads and verifies.

    Newer ones that fail to read or verify on any process are moved aside
    (:meth:`move_aside`), each with one warning naming it and the reason. All
    processes must call this; they agree on each checkpoint (one collective)
    and so return the same round. None when no checkpoint is intact (those
    moved aside are in :attr:`moved_aside`).

    Raises:
      CheckpointMismatchError: the newest checkpoint that reads holds other
        arrays than `like` (nothing is moved for that).
    """
    for round_index in sorted(self.rounds() if rounds is None else rounds, reverse=True):
      try:
        restored, problem = self._read(like, round_index), None
      except CorruptCheckpointError as err:
        restored, problem = None, err.reason
      target = self._aside_path(round_index)  # named before any process moves anything
      failed = _from_all_processes(np.int32(problem is not None))
      if not failed.any():
        return restored
      self.move_aside(round_index, problem or (
          'failed to read or verify on process '
          + ', '.join(str(p) for p in np.flatnonzero(failed)) + ' (see its log)'), target)
    return None

  def _aside_path(self, round_index: int) -> str:
    """Where :meth:`move_aside` puts a checkpoint: ``corrupt/<round>`` (``.1``, ... if taken)."""
    target, n = os.path.join(self.corrupt_directory, str(round_index)), 0
    while os.path.exists(target):
      n += 1
      target = os.path.join(self.corrupt_directory, f'{round_index}.{n}')
    return target

  def move_aside(self, round_index: int, reason: str, target: Optional[str] = None) -> str:
    """Moves a checkpoint into :attr:`corrupt_directory` (one rename); returns where to.

    Every process must call it (process 0 renames, the others wait for it).
    A process killed during the move leaves the checkpoint in one place or
    the other, whole: the rename is atomic.
    """
    self._writing('move_aside')
    target = target or self._aside_path(round_index)
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_directory, exist_ok=True)
      os.rename(os.path.join(self.directory, str(round_index)), target)
    logging.warning('The checkpoint after round %d in %s %s: moved to %s', round_index,
                    self.directory, reason, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'parle_checkpoint_moved_{round_index}')
    self._manager.reload()
    self.moved_aside.append((round_index, target, reason))
    return target

  def close(self) -> None:
    self._manager.close()
    self._state_handler.close()
    self._record_handler.close()


def save_variables(directory: str, variables: Any) -> None:
  """Saves Flax variables (e.g. the reference ``{'params', 'batch_stats'}``)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), variables, force=True)
  checkpointer.wait_until_finished()


def load_variables(directory: str) -> Any:
  """Loads variables written by :func:`save_variables` as host arrays."""
  return ocp.StandardCheckpointer().restore(os.path.abspath(directory))
