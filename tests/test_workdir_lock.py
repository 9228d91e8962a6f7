"""One run per workdir: a second run on a held workdir is refused; a stale lock is not.

The runs are tiny LeNet runs on TFDS mock data (as in test_train.py). The
binary runs in a subprocess under ``tfds.testing.mock_data`` (:data:`MOCK_BINARY`),
so that two of them can hold one workdir at the same time.
"""

import hashlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from experiments import faults
from experiments import workdir as workdir_lib
from experiments.configs import fashion_mnist_lenet
from test_train import MOCK_EXAMPLES, tiny

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMING = ('time', 'train_seconds', 'images_per_second')  # clocks, not numbers of the run

# experiments.train's main, run on mock data: ``python -c MOCK_BINARY --config=... ...``.
MOCK_BINARY = f'''
import sys
import tensorflow_datasets as tfds
from absl import app
from experiments import errors, train
with tfds.testing.mock_data(num_examples={MOCK_EXAMPLES}, policy=tfds.testing.MockPolicy.USE_CODE):
  app.run(train.main, flags_parser=errors.parse_flags)
'''


def mock_command(config, workdir, *flags) -> list[str]:
  """The binary on mock data with `config` (the LeNet config and its changed fields)."""
  defaults = fashion_mnist_lenet.get_config()
  overrides = [f'--config.{k}={v!r}' if isinstance(v, float) else f'--config.{k}={v}'
               for k, v in config.items()
               if isinstance(v, (bool, int, float, str)) and v != defaults.get(k)]
  return [sys.executable, '-c', MOCK_BINARY,
          f'--config={REPO}/experiments/configs/fashion_mnist_lenet.py', f'--workdir={workdir}',
          *flags, *overrides]


def numbers(workdir) -> list[dict]:
  """The records of metrics.jsonl without their clocks."""
  with open(pathlib.Path(workdir) / workdir_lib.METRICS) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def snapshot(directory) -> dict[str, str]:
  """Every file under `directory` with a hash of its bytes."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return files


def _config(data_dir, rounds=4, **overrides):
  """LeNet, `rounds` rounds of 2 steps of batch 8, logged every round, a checkpoint every 2."""
  return tiny(fashion_mnist_lenet.get_config(), data_dir, rounds=rounds,
              **dict(dict(log_every_rounds=1, checkpoint_every_rounds=2), **overrides))


def test_second_run_on_a_held_workdir_is_refused_in_one_line(tmp_path):
  """The second run exits 1 naming the first's host and PID; the first is untouched."""
  config = _config(tmp_path / 'data')
  workdir = tmp_path / 'work'
  with open(tmp_path / 'first.log', 'w') as log:  # the child keeps its own descriptor
    first = subprocess.Popen(mock_command(config, workdir), cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 300
    while not ((workdir / 'metrics.jsonl').exists() and numbers(workdir)):
      assert first.poll() is None and time.time() < deadline, (
          (tmp_path / 'first.log').read_text()[-3000:])
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # holds its lock, writes nothing while the second runs
    before = snapshot(workdir)
    second = subprocess.run(mock_command(config, workdir), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert snapshot(workdir) == before  # the second wrote nothing, deleted nothing
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / 'first.log').read_text()[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
  output = second.stdout + second.stderr
  assert second.returncode == 1, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  errors = [line for line in output.splitlines() if line.startswith('error')]
  lock = workdir / 'lock.0'
  assert len(errors) == 1 and re.fullmatch(
      rf'error: --workdir={workdir} is in use by another run: host \S+, PID {first.pid} '
      rf'\(since [\d\-T:]+\) holds {lock}\. Wait for that run to end \(or stop it\), or choose '
      r'another --workdir\.', errors[0]), output[-3000:]
  rows = [r['round'] for r in numbers(workdir) if 'train/loss' in r]
  assert rows == [1, 2, 3, 4]  # no row twice

  # The run alone is a process of its own like the first, not one in pytest's: after the
  # whole suite, an in-process run here crashed XLA (a segfault in CI and in a fresh clone).
  alone = subprocess.run(mock_command(config, tmp_path / 'alone'), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert alone.returncode == 0, (alone.stdout + alone.stderr)[-3000:]
  assert numbers(workdir) == numbers(tmp_path / 'alone')  # every number, digit for digit


_HOLD = '''
import fcntl, json, os, signal, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"host": "elsewhere", "pid": os.getpid(), "since": "then"}).encode())
print("held", flush=True)
if sys.argv[2] == "die":
  os.kill(os.getpid(), signal.SIGKILL)  # as a killed run leaves its lock file
time.sleep(600)
'''


def _hold(path, how):
  process = subprocess.Popen([sys.executable, '-c', _HOLD, str(path), how],
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline() == 'held\n'
  return process


def test_held_lock_refuses_and_stale_lock_does_not(tmp_path):
  workdir = tmp_path / 'work'
  workdir.mkdir()
  holder = _hold(workdir / 'lock.0', 'hold')
  try:
    before = snapshot(workdir)
    expected = (rf'^--workdir={workdir} is in use by another run: host elsewhere, PID '
                rf'{holder.pid} \(since then\) holds {workdir}/lock.0\. ')
    with pytest.raises(faults.WorkdirLockedError, match=expected):
      faults.check_not_locked(str(workdir))
    with pytest.raises(faults.WorkdirLockedError, match=expected):
      with faults.WorkdirLock(str(workdir), retry_seconds=0.2):
        pass
    assert snapshot(workdir) == before  # refused without a write: the holder's record stays
  finally:
    holder.kill()
    holder.wait()

  stale = _hold(workdir / 'lock.0', 'die')  # killed holding it: the kernel released the lock
  assert stale.wait(timeout=60) == -signal.SIGKILL
  faults.check_not_locked(str(workdir))
  with faults.WorkdirLock(str(workdir)) as lock:
    held = json.loads((workdir / 'lock.0').read_text())
    assert (held['pid'], held['process']) == (os.getpid(), 0) and lock.path in lock.held
    faults.check_not_locked(str(workdir))  # this process's own lock is not another run's
    with pytest.raises(faults.WorkdirLockedError, match=f'PID {os.getpid()} '):
      with faults.WorkdirLock(str(workdir), retry_seconds=0.2):  # a second lock of one process
        pass
  assert (workdir / 'lock.0').exists() and not faults.WorkdirLock.held
  faults.check_not_locked(str(workdir))  # released at the end
