"""Checkpoints of the replicas' whole training state, and of the reference model.

Built on orbax: a checkpoint is written to a temporary directory and renamed
when complete, so a process killed while saving leaves the previous checkpoint
intact (the next :class:`Checkpointer` on that directory ignores and deletes the
unfinished temporary directory). With several processes (``jax.distributed``),
every process must call :meth:`Checkpointer.save` and
:meth:`Checkpointer.restore`: each writes and reads its own shards, process 0
the metadata. The replica state (a pytree of arrays, see
:class:`parle_jax.rounds.ReplicaState`) is saved with its device layout and
restored onto the same layout; the reference model is saved separately as
plain Flax variables, loadable without any of parle_jax.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


_UNFINISHED_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's name for a checkpoint being written


class Checkpointer:
  """Saves and restores the training state every few rounds.

  Each checkpoint holds the replica state and a small JSON record (the round
  index and whatever the caller adds, e.g. the config), under
  ``directory/<round>``. The newest `max_to_keep` are kept (None: all); a
  directory that holds more when it is opened (a process killed between
  writing a checkpoint and deleting the oldest, or a lower `max_to_keep`) is
  pruned to them.
  """

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3):
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
      raise ValueError(f'`max_to_keep` must be an integer >= 1 or None, got {max_to_keep!r}.')
    self.directory = os.path.abspath(directory)
    self._remove_unfinished()
    # orbax's own clean-up of unfinished checkpoints runs in a background thread,
    # which races with anything that patches the file system (TFDS's mock_data in
    # tests); the synchronous clean-up above does the same job.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))
    if max_to_keep is not None:
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

  def delete_after(self, round_index: int) -> None:
    """Deletes the checkpoints after `round_index` (training went back to it)."""
    for newer in self.rounds():
      if newer > round_index:
        self._manager.delete(newer)

  def save(self, round_index: int, state: Any, record: dict) -> None:
    """Writes the state after `round_index` rounds (blocking until complete)."""
    self._manager.save(round_index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        record=ocp.args.JsonSave(dict(record, round=round_index))), force=True)
    self._manager.wait_until_finished()

  def read_record(self, round_index: Optional[int] = None) -> dict:
    """The JSON record of a checkpoint (the newest by default)."""
    round_index = self.latest_round() if round_index is None else round_index
    return self._manager.restore(round_index, args=ocp.args.Composite(
        record=ocp.args.JsonRestore())).record

  def restore(self, like: Any, round_index: Optional[int] = None) -> tuple[Any, dict]:
    """Restores (state, record); `like` gives the structure, shapes and devices."""
    round_index = self.latest_round() if round_index is None else round_index
    if round_index is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(round_index, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    return restored.state, restored.record

  def close(self) -> None:
    self._manager.close()


def save_variables(directory: str, variables: Any) -> None:
  """Saves Flax variables (e.g. the reference ``{'params', 'batch_stats'}``)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), variables, force=True)
  checkpointer.wait_until_finished()


def load_variables(directory: str) -> Any:
  """Loads variables written by :func:`save_variables` as host arrays."""
  return ocp.StandardCheckpointer().restore(os.path.abspath(directory))
