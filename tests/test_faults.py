"""Faults: NaN/Inf, killed saves, signals and processes.

The runs are tiny (LeNet, 2 steps of batch 8 per round, a few rounds); most of
the time goes into compiling them. The multi-process tests start 2 processes of
2 fake CPU devices each on 127.0.0.1 (gloo collectives), every process under a
timeout.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import faults, train
from experiments.configs import fashion_mnist_lenet
from parle_jax import checkpoint
from test_train import MOCK_EXAMPLES, tiny, train_command

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_two_sigints_that_arrive_together_stop_at_once():
  """CPython runs the Python handler once for signals that arrive together.

  A helper thread sends both SIGINTs to itself (`pthread_kill`: each is
  delivered, and its C-level handler run, before the call returns) while the
  main thread waits in `join`, in C. With a switch interval longer than the
  test, the helper keeps the GIL between the two sends, so the main thread
  cannot run the Python handler in between, however loaded the machine is.
  """
  stopped = False
  switch_interval = sys.getswitchinterval()
  sys.setswitchinterval(100.0)

  def send_two_sigints():
    for _ in range(2):
      signal.pthread_kill(threading.get_ident(), signal.SIGINT)

  try:
    with faults.StopSignals() as signals:
      sender = threading.Thread(target=send_two_sigints)
      try:
        sender.start()
        sender.join()
        for _ in range(100):  # the handler runs at the next bytecode boundaries
          time.sleep(0.01)
      except KeyboardInterrupt:
        stopped = True
        sender.join()
  finally:
    sys.setswitchinterval(switch_interval)
  assert stopped
  assert signals.received is None, 'the handler saw the two SIGINTs apart'


# --- a workdir of another config ---------------------------------------------------

# --- NaN/Inf ---------------------------------------------------------------------
def test_round_check_names_the_replica_and_round():
  import parle_jax
  replicas = parle_jax.Replicas(4, devices=jax.devices()[:2])
  params = np.zeros((4, 3), np.float32)
  params[3, 1] = np.nan
  loss = np.ones((4, 5), np.float32)
  metrics = {'loss': loss, 'error': np.full((4, 5), 0.5, np.float32)}
  report = faults.check_round(replicas, replicas.shard({'w': params}), replicas.shard(metrics),
                              stop=False)
  assert report.divergence(7) == 'the params of replica 3 became NaN or Inf in round 7'
  np.testing.assert_allclose(report.metrics['error'], [0.5] * 4)
  assert not report.stop
  loss[1, 2] = np.inf
  loss[1, 4] = np.nan
  report = faults.check_round(replicas, replicas.shard({'w': params}),
                              replicas.shard(dict(metrics, loss=loss)), stop=True)
  assert report.divergence(7) == ('the loss of replica 1 became NaN or Inf in round 7 '
                                  '(step 2 of the round)')
  assert report.stop and list(report.bad_loss_step) == [-1, 2, -1, -1]


# A learning rate (Parle's outer and inner) that makes the tiny mock-data LeNet
# overflow in round 4 (step 0: the params after round 3 are finite but blown up).
DIVERGING_LR = 20.0


def test_nan_stops_the_run_then_rollback_lowers_the_learning_rates(tmp_path):
  """Stop keeps the last good checkpoint; resumed with rollback, the run finishes."""
  config = tiny(fashion_mnist_lenet.get_config(), tmp_path / 'data', rounds=5,
                learning_rate=DIVERGING_LR, inner_learning_rate=DIVERGING_LR,
                checkpoint_every_rounds=1, log_every_rounds=1, keep_checkpoints=5)
  workdir = tmp_path / 'work'
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(train.DivergenceError) as error:
      train.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert message.startswith('Training diverged: the loss of replica '), message
    assert 'became NaN or Inf in round 4 (step 0 of the round)' in message, message
    # The checkpoint after round 3 gives that loss at once: the good one is round 2's.
    assert (f'the last good checkpoint (after round 2) in {workdir / "checkpoints"} is kept'
            in message), message
    assert checkpoint.Checkpointer(str(workdir / 'checkpoints')).rounds() == [1, 2, 3]
    assert message.endswith('Resume with --config.on_divergence=rollback, or lower '
                            'config.learning_rate / config.inner_learning_rate and start afresh '
                            '(--overwrite or another --workdir).'), message

    # No rollback left: resuming with on_divergence=rollback again would fail again.
    config.on_divergence, config.rollback_lr_factor, config.max_rollbacks = 'rollback', 0.01, 0
    with pytest.raises(train.DivergenceError) as error:
      train.train_and_evaluate(config, str(workdir))
    message = str(error.value)
    assert 'in round 4 (step 0 of the round) after 0 rollbacks (config.max_rollbacks=0)' in message
    assert message.endswith('Resume with a larger --config.max_rollbacks, or lower '
                            'config.learning_rate / config.inner_learning_rate and start afresh '
                            '(--overwrite or another --workdir).'), message

    config.max_rollbacks = 3
    results = train.train_and_evaluate(config, str(workdir))  # resumes, rolls back, finishes
  assert results['rounds'] == 5 and np.isfinite(results['reference/test_loss'])
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['round'], r['rollback'], r['learning_rate_scale'])
          for r in records if 'rollback' in r] == [(2, 1, 0.01)]
  assert [r['round'] for r in records if 'train/loss' in r] == [1, 2, 3, 4, 5]
  record = checkpoint.Checkpointer(str(workdir / 'checkpoints')).read_record()
  assert (record['round'], record['rollbacks'], record['learning_rate_scale']) == (5, 1, 0.01)


# --- a process killed while it saves -----------------------------------------------
_KILLED_WHILE_SAVING = '''
import os, signal, sys
import numpy as np
from orbax.checkpoint._src.path import atomicity
from parle_jax import checkpoint
saver = checkpoint.Checkpointer(sys.argv[1])
saver.save(1, {"w": np.full(3, 1.0, np.float32)}, {"note": "good"})
def die(self):  # the files of round 2 are written, the rename has not happened
  os.kill(os.getpid(), signal.SIGKILL)
atomicity.AtomicRenameTemporaryPath.finalize = die
saver.save(2, {"w": np.full(3, 2.0, np.float32)}, {"note": "half written"})
'''


def test_kill_during_a_save_keeps_the_last_complete_checkpoint(tmp_path):
  directory = tmp_path / 'checkpoints'
  process = subprocess.run([sys.executable, '-c', _KILLED_WHILE_SAVING, str(directory)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
  assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
  leftovers = [p.name for p in directory.iterdir() if p.name.startswith('2.')]
  assert leftovers and 'tmp' in leftovers[0], sorted(os.listdir(directory))
  restored = checkpoint.Checkpointer(str(directory))
  assert restored.latest_round() == 1
  state, record = restored.restore({'w': np.zeros(3, np.float32)})
  np.testing.assert_array_equal(np.asarray(state['w']), [1.0, 1.0, 1.0])
  assert record == {'note': 'good', 'round': 1}
  restored.save(2, {'w': np.full(3, 2.0, np.float32)}, {'note': 'again'})
  assert restored.latest_round() == 2
  assert sorted(os.listdir(directory)) == ['1', '2']  # the unfinished one is gone


# --- several processes -------------------------------------------------------------
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_processes(workdir, overrides, logs, num_processes=2, devices_per_process=2):
  """`num_processes` processes x `devices_per_process` fake CPU devices running experiments.train.

  No persistent compilation cache: its keys differ between processes, so with
  one, process 0 would load a program that process 1 still compiles, and gloo
  gives up on a first collective whose peers arrive more than 30 s apart.
  """
  port = _free_port()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices_per_process), JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # conftest's 8 fake devices are for this process only
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  processes = []
  for index in range(num_processes):
    args = train_command(workdir, overrides, f'--coordinator_address=127.0.0.1:{port}',
                         f'--num_processes={num_processes}', f'--process_id={index}',
                         '--heartbeat_timeout_seconds=10', '--initialization_timeout=120')
    with open(logs / f'launch{len(list(logs.iterdir())) // num_processes}_{index}.log',
              'w') as log:
      processes.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=log,
                                        stderr=subprocess.STDOUT))
  return processes


def _wait(processes, logs, timeout):
  """Exit codes of `processes`; kills them all if one outlives `timeout`."""
  deadline = time.time() + timeout
  try:
    return [p.wait(timeout=max(1, deadline - time.time())) for p in processes]
  except subprocess.TimeoutExpired:
    pytest.fail(f'processes still running after {timeout} s:\n' + _tail(logs))
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()


def _tail(logs, chars=3000):
  return '\n'.join(f'--- {p.name}\n{p.read_text()[-chars:]}' for p in sorted(logs.glob('*.log')))


def _wait_until(condition, processes, logs, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    if time.time() > deadline or any(p.poll() is not None for p in processes):
      _wait(processes, logs, 1)
      pytest.fail('the processes did not get there:\n' + _tail(logs))
    time.sleep(0.05)


def _records(workdir):
  path = workdir / 'metrics.jsonl'
  lines = path.read_text().splitlines() if path.exists() else []
  return [json.loads(line) for line in lines if line.strip()]


def test_two_processes_stop_together_survive_a_dead_peer_and_match_one_process(
    fashion_mnist_data_dir, tmp_path):
  """2 processes x 2 devices = 1 process x 4 devices, across SIGTERM, a dead peer, resumes.

  1. SIGTERM reaches process 1 only, before its first round ends: both
     processes save the checkpoint after round 1 and exit 75.
  2. Started again, they resume; process 1 is SIGKILLed while they evaluate
     round 2: process 0 fails within the heartbeat timeout (10 s), not hangs.
  3. Started again, they resume from round 1 and finish; the reference model
     equals that of one process with 4 devices.
  """
  workdir, logs = tmp_path / 'two', tmp_path / 'logs'
  logs.mkdir()
  overrides = dict(data_dir=str(fashion_mnist_data_dir), L=2, batch_size=8, num_replicas=4,
                   epochs=3 / 7500, mapping='vmap', progress_bar=False, log_every_rounds=1,
                   bn_recompute_batches=2, train_eval_examples=32,  # evaluated at the end
                   test_examples=500, eval_batch_size=250)
  processes = _start_processes(workdir, overrides, logs)
  _wait_until(lambda: (workdir / 'config.json').exists(), processes, logs)  # handlers are in
  processes[1].send_signal(signal.SIGTERM)
  assert _wait(processes, logs, 400) == [faults.EXIT_INTERRUPTED] * 2, _tail(logs)
  output = _tail(logs, 100000)
  assert 'Stopped by SIGTERM after round 1 of 3' in output
  assert 'Stopped by a signal to another process after round 1 of 3' in output
  assert checkpoint.Checkpointer(str(workdir / 'checkpoints')).rounds() == [1]

  # An evaluation after every round (a field that may change on resume) makes rounds slow.
  processes = _start_processes(workdir, dict(overrides, eval_every_rounds=1), logs)
  _wait_until(lambda: any(r['round'] == 2 for r in _records(workdir)), processes, logs)
  processes[1].kill()  # round 2 is trained; its evaluation runs collectives
  killed = time.time()
  codes = _wait(processes, logs, 120)
  survivor = (logs / 'launch1_0.log').read_text()
  assert time.time() - killed < 60 and codes[0] != 0, survivor[-3000:]
  assert ('most likely another process died' in survivor  # ours: exit 69
          or 'another task died' in survivor), survivor[-3000:]  # JAX's abort: SIGABRT
  assert checkpoint.Checkpointer(str(workdir / 'checkpoints')).rounds() == [1]

  processes = _start_processes(workdir, overrides, logs)
  assert _wait(processes, logs, 400) == [0, 0], _tail(logs)
  assert 'Resumed from the checkpoint after round 1' in (logs / 'launch2_0.log').read_text()
  records = _records(workdir)
  assert [r['round'] for r in records if 'train/loss' in r] == [1, 2, 3]
  assert len(records[-1]['replica/test_error']) == 4

  one = tmp_path / 'one'  # this process: 1 process, the first 4 of its 8 devices
  config = fashion_mnist_lenet.get_config()
  config.update(overrides)
  train.train_and_evaluate(config, str(one))
  two_variables = checkpoint.load_variables(str(workdir / 'reference'))
  one_variables = checkpoint.load_variables(str(one / 'reference'))
  for a, b in zip(jax.tree.leaves(two_variables), jax.tree.leaves(one_variables)):
    # Not bit-identical: gloo sums in another order, XLA splits work across threads otherwise.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose([r['train/loss'] for r in records if 'train/loss' in r],
                             [r['train/loss'] for r in _records(one) if 'train/loss' in r],
                             rtol=1e-5)
