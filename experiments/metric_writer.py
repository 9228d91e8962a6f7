"""Metrics of a run: one JSON line per record in ``metrics.jsonl`` and TensorBoard events.

TensorBoard events are written with TensorBoard's own event-file writer (no
TensorFlow needed). Per-replica lists become one scalar per replica
(``replica/test_error/0``, ...). Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
  """Appends records ``{'round': r, ...}`` to ``workdir/metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir: str, *, resume_round: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._drop_records_after(resume_round)
    self._events = EventFileWriter(os.path.join(workdir, 'tensorboard'))

  def _drop_records_after(self, resume_round: int) -> None:
    """On resume, forget what a killed run logged after its last checkpoint."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)['round'] <= resume_round]
    with open(self.path, 'w') as f:
      f.writelines(kept)

  def rewind(self, round_index: int) -> None:
    """Forgets the records after `round_index` (training went back to that round)."""
    if self.enabled:
      self._drop_records_after(round_index)

  def write(self, round_index: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'round': int(round_index), 'time': time.time(), **scalars}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
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
