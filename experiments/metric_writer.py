"""Metrics of a run: one JSON line per record in ``metrics.jsonl`` and TensorBoard events.

TensorBoard events are written with TensorBoard's own event-file writer (no
TensorFlow needed). Per-replica lists become one scalar per replica
(``replica/test_error/0``, ...). Only process 0 writes.

A record is appended with one write; a kill or a full disk during it can
leave the last line torn, which the next run drops (it comes after the last
checkpoint). Rewrites go through a temporary file and a rename.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from typing import Any, Mapping

import jax
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from experiments import errors
from experiments import workdir as workdir_lib


def write_atomically(path: str, text: str) -> None:
  """Writes `text` to a temporary file and renames it to `path`: never a torn file."""
  temporary = f'{path}.tmp'
  try:
    with open(temporary, 'w') as f:  # as open() does, the umask decides the mode
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


# TensorBoard's own switch to its TensorFlow stub: the module of its `no_tensorflow` build target.
_TENSORBOARD_NO_TENSORFLOW = 'tensorboard.compat.notf'


def tensorboard_without_tensorflow() -> bool:
  """Makes TensorBoard's event writer use its TensorFlow stub, for the whole process.

  With TensorFlow installed (TFDS brings it), ``tensorboard.compat.tf`` imports
  all of it on the first event file, about 9 s of a 2-core CPU in every process
  that trains, though the writer needs only local file I/O, which TensorBoard's
  stub provides. TensorBoard takes the stub when the module
  ``tensorboard.compat.notf`` exists; this registers an empty one. The binaries
  call it in ``main``; a library does not, since it would change TensorBoard for
  the rest of its user's process. Does nothing where TensorFlow is already
  imported (it is then free). Returns whether the stub is chosen.
  """
  if 'tensorflow' in sys.modules:
    return _TENSORBOARD_NO_TENSORFLOW in sys.modules
  sys.modules.setdefault(_TENSORBOARD_NO_TENSORFLOW, types.ModuleType(_TENSORBOARD_NO_TENSORFLOW))
  return True


class MetricWriter:
  """Appends records ``{'round': r, ...}`` to ``workdir/metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir: str, *, resume_round: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = workdir_lib.path(workdir, workdir_lib.METRICS)
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_round == 0:  # a run from the start starts a new log
      open(self.path, 'w').close()  # (truncates a symlink's target, as for /dev/full in tests)
    else:
      self._drop_records_after(resume_round)
    self._events = EventFileWriter(workdir_lib.path(workdir, workdir_lib.TENSORBOARD))

  def _drop_records_after(self, resume_round: int) -> None:
    """On resume, forget what a killed run logged after its last checkpoint.

    A torn last line (a kill or a full disk during its write) is dropped; a
    line that is not a record elsewhere is refused, naming it.
    """
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
      try:
        record = json.loads(line)
        round_index = int(record['round'])
      except (ValueError, KeyError, TypeError) as err:
        if number == len(lines):
          logging.warning('%s: dropped its torn last line %r (written after the last '
                          'checkpoint)', self.path, line[:80])
          continue
        raise errors.WorkdirError(
            f'{self.path}, line {number}, is not a record ({type(err).__name__}: {err}): '
            'only the last line can be torn. Delete or fix that line (the log only; the '
            'checkpoints hold the run).') from err
      if round_index <= resume_round:
        kept.append(line if line.endswith('\n') else line + '\n')
    write_atomically(self.path, ''.join(kept))

  def rewind(self, round_index: int) -> None:
    """Forgets the records after `round_index` (training went back to that round)."""
    if self.enabled:
      self._drop_records_after(round_index)

  def write(self, round_index: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'round': int(round_index), 'time': time.time(), **scalars}
    try:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    except OSError as err:  # a full disk: the error of the write names no file
      if err.filename:
        raise
      raise OSError(err.errno, err.strerror, self.path) from err
    values = []
    for name, value in scalars.items():
      if isinstance(value, (list, tuple)):
        values += [summary_pb2.Summary.Value(tag=f'{name}/{i}', simple_value=float(v))
                   for i, v in enumerate(value)]
      elif isinstance(value, (int, float)):
        values.append(summary_pb2.Summary.Value(tag=name, simple_value=float(value)))
    self._events.add_event(event_pb2.Event(
        wall_time=record['time'], step=int(round_index),
        summary=summary_pb2.Summary(value=values)))
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._events.close()
