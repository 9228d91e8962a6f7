"""Checkpoints verified before they are trusted: checksums, and corrupt ones moved aside.

Orbax reads a data file that holds valid data of another checkpoint (a stale
or misplaced file) without complaint; the checksums in each checkpoint's
record catch it. Flipped bytes are caught by one of the two: zstd, which
compresses the data files, fails on most flips, and a flip that still decodes
differs from the checksums. A checkpoint that fails to read or verify
is moved to ``checkpoints/corrupt/`` with one warning, and the run resumes
from the newest one that verifies, to the numbers of an uninterrupted run.

The runs are tiny LeNet runs on TFDS mock data: 4 rounds, a checkpoint every
2. One uninterrupted run (:func:`straight`) is copied and corrupted for each
case; a persistent compilation cache lets the resumed runs skip compiling.
"""

import glob
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import faults, provenance, train
from parle_jax import checkpoint
from test_faults import DIVERGING_LR, _free_port, _tail, _wait
from test_workdir_lock import REPO, _config, mock_command, numbers
from test_train import MOCK_EXAMPLES


def run(config, workdir, **kwargs):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    return train.train_and_evaluate(config, str(workdir), **kwargs)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """An uninterrupted run: (its config, its workdir)."""
  root = tmp_path_factory.mktemp('straight')
  config = _config(root / 'data')
  run(config, root / 'work')
  return config, root / 'work'


def largest_file(directory) -> str:
  files = [p for p in glob.glob(f'{directory}/**', recursive=True) if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def flip(path, size=4096):
  """XORs `size` bytes in the middle of the file (all of it if smaller)."""
  length = os.path.getsize(path)
  start = max(0, length // 2 - size // 2)
  with open(path, 'r+b') as f:
    f.seek(start)
    data = f.read(size)
    f.seek(start)
    f.write(bytes(b ^ 0xFF for b in data))


def stale(state):
  """Replaces round 4's state with round 2's, whole and valid: a file from another save."""
  shutil.rmtree(state)
  shutil.copytree(pathlib.Path(state).parent.parent / '2' / 'state', state)
  return largest_file(state)


def _on_largest_file(corrupt):
  def corrupt_state(state):
    path = largest_file(state)
    corrupt(path)
    return path
  return corrupt_state


CHECKSUMS_DIFFER = r'fails its checksums: \d+ of the \d+ shards read differ'
# Which layer catches flipped bytes depends on where in the zstd stream they land.
DETECTED = rf'({CHECKSUMS_DIFFER}|cannot be read \(ValueError: )'
CORRUPTIONS = {
    'stale data': (stale, CHECKSUMS_DIFFER),
    'flipped bytes': (_on_largest_file(flip), DETECTED),
    'truncated file': (_on_largest_file(lambda path: os.truncate(path, os.path.getsize(path) // 2)),
                       r'cannot be read \(ValueError: OUT_OF_RANGE: Error reading'),
    'missing file': (_on_largest_file(os.remove), r'cannot be read \(ValueError: '),
}


def _copy(straight, tmp_path):
  config, source = straight
  workdir = tmp_path / 'work'
  shutil.copytree(source, workdir)
  return config, workdir, workdir / 'checkpoints'


def _same_run(workdir, straight_workdir):
  """Every logged number and the reference model equal those of the uninterrupted run."""
  assert numbers(workdir) == numbers(straight_workdir)
  a = checkpoint.load_variables(str(workdir / 'reference'))
  b = checkpoint.load_variables(str(straight_workdir / 'reference'))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
          and r.getMessage().startswith('The checkpoint after round')]


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_resumes(
    corruption, straight, tmp_path, caplog):
  config, workdir, checkpoints = _copy(straight, tmp_path)
  assert checkpoint.Checkpointer(str(checkpoints)).rounds() == [2, 4]
  corrupt, reason = CORRUPTIONS[corruption]
  damaged = corrupt(checkpoints / '4' / 'state')
  kept = pathlib.Path(damaged).read_bytes() if os.path.exists(damaged) else None
  with caplog.at_level(logging.WARNING):
    run(config, workdir)
  warnings = _warnings(caplog)
  assert len(warnings) == 1, warnings
  assert re.match(rf'The checkpoint after round 4 in {checkpoints} {reason}.*: moved to '
                  rf'{checkpoints}/corrupt/4$', warnings[0]), warnings[0]
  moved = checkpoints / 'corrupt' / '4' / os.path.relpath(damaged, checkpoints / '4')
  assert (moved.read_bytes() == kept) if kept is not None else not moved.exists()
  assert sorted(os.listdir(checkpoints / 'corrupt' / '4')) == sorted(
      os.listdir(straight[1] / 'checkpoints' / '4'))  # moved whole, not deleted
  assert checkpoint.Checkpointer(str(checkpoints)).rounds() == [2, 4]  # 4 trained and saved again
  assert [s['start_round'] for s in provenance.read(str(workdir))] == [0, 2]
  _same_run(workdir, straight[1])


def test_every_checkpoint_corrupt_is_one_line_and_exit_1(straight, tmp_path, capsys):
  config, workdir, checkpoints = _copy(straight, tmp_path)
  flip(largest_file(checkpoints / '4' / 'state'))
  os.truncate(largest_file(checkpoints / '2' / 'state'), 1000)
  metrics = (workdir / 'metrics.jsonl').read_text()
  assert faults.exit_code(lambda: run(config, workdir), workdir=str(workdir)) == 1
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  assert err.strip().splitlines()[-1] == (
      f'error: no checkpoint in {checkpoints} reads and verifies: rounds 4, 2 moved to '
      f'{checkpoints}/corrupt (the warnings above say why). Running the same command again '
      'starts afresh from round 0; to retry one, move it back.'), err
  assert sorted(os.listdir(checkpoints / 'corrupt')) == ['2', '4']
  assert checkpoint.Checkpointer(str(checkpoints)).rounds() == []
  assert (workdir / 'metrics.jsonl').read_text() == metrics  # the log of the run is kept


_KILLED_WHILE_MOVING = '''
import os, signal, sys
sys.path.insert(0, "tests")
from test_checkpoint_integrity import run
from test_workdir_lock import _config
rename = os.rename
def killed(source, target):  # the move aside is one rename: killed just before or just after
  if "/corrupt/" in str(target):
    if sys.argv[2] == "after":
      rename(source, target)
    os.kill(os.getpid(), signal.SIGKILL)
  rename(source, target)
os.rename = killed
run(_config(sys.argv[3]), sys.argv[1])
'''


@pytest.mark.parametrize('when', ['before', 'after'])
def test_kill_during_the_move_aside_loses_nothing(when, straight, tmp_path, caplog):
  config, workdir, checkpoints = _copy(straight, tmp_path)
  flip(largest_file(checkpoints / '4' / 'state'))
  process = subprocess.run(
      [sys.executable, '-c', _KILLED_WHILE_MOVING, str(workdir), when, config.data_dir],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
  where = checkpoints / ('corrupt/4' if when == 'after' else '4')
  assert sorted(os.listdir(where)) == sorted(os.listdir(straight[1] / 'checkpoints' / '4'))
  with caplog.at_level(logging.WARNING):  # the next start: its lock is stale, the move whole
    run(config, workdir)
  assert len(_warnings(caplog)) == (1 if when == 'before' else 0), _warnings(caplog)
  assert os.listdir(checkpoints / 'corrupt') == ['4']
  _same_run(workdir, straight[1])


def test_divergence_names_only_a_verified_checkpoint_good(tmp_path, caplog):
  """A corrupt last good checkpoint is moved aside; the message names the one before it."""
  # The loss becomes NaN at step 0 of round 4 (see test_faults): round 3's checkpoint is out.
  config = _config(tmp_path / 'data', rounds=5, checkpoint_every_rounds=1,
                   learning_rate=DIVERGING_LR, inner_learning_rate=DIVERGING_LR,
                   keep_checkpoints=5)
  workdir, checkpoints = tmp_path / 'work', tmp_path / 'work' / 'checkpoints'
  run(config, workdir, stop_after_round=3)
  flip(largest_file(checkpoints / '2' / 'state'))  # the last good one: round 3's gives the NaN
  with caplog.at_level(logging.WARNING):
    with pytest.raises(train.DivergenceError) as error:
      run(config, workdir)
  message = str(error.value)
  assert 'became NaN or Inf in round 4 (step 0 of the round)' in message, message
  assert f'the last good checkpoint (after round 1) in {checkpoints} is kept' in message, message
  warnings = _warnings(caplog)
  assert len(warnings) == 1 and re.match(
      rf'The checkpoint after round 2 in {checkpoints} (fails its checksums|cannot be read)',
      warnings[0]), warnings
  assert checkpoint.Checkpointer(str(checkpoints), max_to_keep=None).rounds() == [1, 3]


# --- the library: checksums, records, checkpoints saved without them -----------------
def test_checksums_cover_every_shard_and_the_record(tmp_path):
  import parle_jax  # pylint: disable=g-import-not-at-top
  replicas = parle_jax.Replicas(4, devices=jax.devices()[:4])
  state = replicas.shard({'w': np.arange(4 * 6, dtype=np.float32).reshape(4, 6),
                          'step': np.arange(4, dtype=np.int32)})
  table = checkpoint.state_checksums(state)
  assert sorted(table["['w']"]['shards']) == [f'[{i}:{i + 1},:,:]' for i in range(4)]
  assert table["['w']"]['shape'] == [4, 1, 6] and table["['step']"]['dtype'] == 'int32'
  saver = checkpoint.Checkpointer(str(tmp_path / 'c'))
  saver.save(1, state, {'note': 0.1})
  restored, record = saver.restore(state)
  assert record == {'note': 0.1, 'round': 1}
  np.testing.assert_array_equal(replicas.unshard(restored)['w'], replicas.unshard(state)['w'])

  path = tmp_path / 'c' / '1' / 'record' / 'metadata'
  saved = json.loads(path.read_text())
  assert saved['checksums']['state'] == table
  path.write_text(json.dumps(dict(saved, note=0.2)))  # a record that parses, but changed
  with pytest.raises(checkpoint.CorruptCheckpointError,
                     match='round 1 .* fails its checksums: its record differs'):
    saver.read_record(1)
  path.write_text(json.dumps(saved))
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"state\['step'\] is int32\(4, 1\) there, int32\(2, 1\) here"):
    saver.restore(parle_jax.Replicas(2, devices=jax.devices()[:2]).shard(
        {'w': np.zeros((2, 6), np.float32), 'step': np.zeros(2, np.int32)}))

  del saved['checksums']  # as parle_jax saved them before checksums
  path.write_text(json.dumps(saved))
  restored = saver.restore_intact(state)
  assert (restored.round_index, restored.verified, restored.record) == (
      1, False, {'note': 0.1, 'round': 1})
  saver.close()


# --- two processes --------------------------------------------------------------------
def _start(workdir, config, logs, launch):
  port = _free_port()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # conftest's 8 fake devices are for this process only
  processes = []
  for index in range(2):
    args = mock_command(config, workdir, f'--coordinator_address=127.0.0.1:{port}',
                        '--num_processes=2', f'--process_id={index}',
                        '--heartbeat_timeout_seconds=10', '--initialization_timeout=120')
    with open(logs / f'launch{launch}_{index}.log', 'w') as log:
      processes.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=log,
                                        stderr=subprocess.STDOUT))
  return processes


def test_two_processes_agree_on_the_newest_checkpoint_that_verifies(tmp_path):
  """Process 1's shard of the newest checkpoint is corrupt: both resume from the one before."""
  workdir, logs = tmp_path / 'two', tmp_path / 'logs'
  logs.mkdir()
  config = _config(tmp_path / 'data', num_replicas=4, train_eval_examples=32)
  assert _wait(_start(workdir, config, logs, 0), logs, 400) == [0, 0], _tail(logs)
  straight = numbers(workdir)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert {'lock.0', 'lock.1'} <= set(os.listdir(workdir))  # each process locks its own file
  flip(largest_file(workdir / 'checkpoints' / '4' / 'state' / 'ocdbt.process_1'))

  assert _wait(_start(workdir, config, logs, 1), logs, 400) == [0, 0], _tail(logs)
  checkpoints = workdir / 'checkpoints'
  first, second = ((logs / f'launch1_{i}.log').read_text() for i in range(2))
  assert re.search(rf'The checkpoint after round 4 in {checkpoints} {DETECTED}.* on '
                   rf'process 1 of 2: moved to {checkpoints}/corrupt/4\n', second), second[-3000:]
  assert re.search(rf'The checkpoint after round 4 in {checkpoints} failed to read or verify '
                   rf'on process 1 \(see its log\): moved to {checkpoints}/corrupt/4\n',
                   first), first[-3000:]
  assert 'Resumed from the checkpoint after round 2' in first, first[-3000:]
  assert os.listdir(checkpoints / 'corrupt') == ['4']
  assert numbers(workdir) == straight  # both resumed from round 2, to the same numbers



def test_a_read_only_checkpointer_changes_nothing(tmp_path):
  """What check_workdir opens: no pruning, no clean-up of another process's save in progress."""
  saver = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None)
  for round_index in (1, 2, 3):
    saver.save(round_index, {'w': np.full(3, round_index, np.float32)}, {})
  saver.close()
  (tmp_path / '4.orbax-checkpoint-tmp-123').mkdir()  # another process's save in progress
  reader = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1, read_only=True)
  assert reader.rounds() == [1, 2, 3] and reader.read_record() == {'round': 3}
  with pytest.raises(ValueError, match='save: the Checkpointer of .* is read-only'):
    reader.save(4, {'w': np.zeros(3, np.float32)}, {})
  reader.close()
  assert sorted(os.listdir(tmp_path)) == ['1', '2', '3', '4.orbax-checkpoint-tmp-123']


def test_moved_aside_checkpoints_are_never_pruned_nor_seen_as_steps(tmp_path):
  def save(*rounds):
    for round_index in rounds:
      saver.save(round_index, {'w': np.full(3, round_index, np.float32)}, {})

  saver = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
  save(1, 2)
  assert saver.move_aside(2, 'is a test') == str(tmp_path / 'corrupt' / '2')
  assert saver.rounds() == [1] and saver.moved_aside == [(2, str(tmp_path / 'corrupt' / '2'),
                                                          'is a test')]
  save(2, 3, 4)  # max_to_keep prunes the steps, never into corrupt/
  assert saver.rounds() == [3, 4]
  saver.move_aside(4, 'is a test')
  save(4)
  assert saver.move_aside(4, 'is a test') == str(tmp_path / 'corrupt' / '4.1')  # none replaced
  saver.close()
  assert checkpoint.Checkpointer(str(tmp_path), max_to_keep=1).rounds() == [3]
  assert sorted(os.listdir(tmp_path / 'corrupt')) == ['2', '4', '4.1']
  moved = checkpoint.Checkpointer(str(tmp_path / 'corrupt'), read_only=True)
  for round_index in (2, 4):  # moved whole: they read (and verify) where they lie
    state, _ = moved.restore({'w': np.zeros(3, np.float32)}, round_index)
    np.testing.assert_array_equal(state['w'], [round_index] * 3)
  moved.close()
