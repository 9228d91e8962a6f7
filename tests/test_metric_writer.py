"""Metric writer: TensorBoard events from a binary, with TensorFlow never imported."""

import pathlib
import subprocess
import sys

from tensorboard.backend.event_processing import event_accumulator

REPO = pathlib.Path(__file__).resolve().parent.parent

_WRITE_EVENTS = '''
import sys
from experiments import metric_writer
assert metric_writer.tensorboard_without_tensorflow()
writer = metric_writer.MetricWriter(sys.argv[1])
writer.write(3, {"train/loss": 0.25, "replica/test_error": [1.5, 2.5], "note": "text"})
writer.close()
print(sorted(name for name in sys.modules if name.split(".")[0] == "tensorflow"))
'''


def test_binaries_write_events_that_tensorboard_reads_without_importing_tensorflow(tmp_path):
  process = subprocess.run([sys.executable, '-c', _WRITE_EVENTS, str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
  assert process.returncode == 0, process.stderr[-3000:]
  assert process.stdout.strip() == '[]', process.stdout  # no TensorFlow module was loaded
  events = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  events.Reload()
  assert sorted(events.Tags()['scalars']) == [
      'replica/test_error/0', 'replica/test_error/1', 'train/loss']
  assert [(e.step, e.value) for e in events.Scalars('train/loss')] == [(3, 0.25)]
  assert [(e.step, e.value) for e in events.Scalars('replica/test_error/1')] == [(3, 2.5)]
