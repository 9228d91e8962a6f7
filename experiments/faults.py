"""What a run does when something goes wrong: signals, divergence, a reused workdir.

* SIGTERM or SIGINT (:class:`StopSignals`): the run finishes its round, saves a
  checkpoint and raises :class:`TrainingInterrupted`; the binary exits with
  :data:`EXIT_INTERRUPTED` and running it again resumes. A second SIGINT
  interrupts at once (KeyboardInterrupt, exit :data:`EXIT_STOPPED_AT_ONCE`).
* A NaN or Inf in a replica's loss or params (:func:`check_round`): the run
  stops with :class:`DivergenceError` (exit :data:`EXIT_DIVERGED`), naming the
  round and the replica and keeping the last good checkpoint (the newest
  before it that reads and verifies, see :mod:`parle_jax.checkpoint`); or, with
  ``config.on_divergence='rollback'``, restarts from that checkpoint with its
  learning rates times ``config.rollback_lr_factor``, at most
  ``config.max_rollbacks`` times.
* A workdir that another run holds (:class:`WorkdirLock`, an ``fcntl.flock``
  per process, released by the kernel however the run ends): refused with
  :class:`WorkdirLockedError`, naming that run's host and PID, before
  anything is read or written.
* A workdir whose checkpoint (or ``config.json``) comes from another config
  (:func:`check_workdir`): refused with :class:`ConfigMismatchError`, unless
  told to overwrite; one that is a file or cannot be written, or holds a
  corrupt ``config.json``: :class:`errors.WorkdirError`. Nothing is written
  into the workdir before the run is planned and holds the lock
  (:func:`open_workdir`).
* Bad input and a full disk (:func:`exit_code`, :mod:`experiments.errors`):
  one line naming the value or path and what to do, exit status 1.

With several processes every decision (stop, diverged) is taken on the same
all-reduced numbers, so all processes stop at the same round.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import distributed, errors, metric_writer
from experiments import workdir as workdir_lib
from parle_jax import checkpoint
from parle_jax import replicas as replicas_lib

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h): run again to resume.
EXIT_STOPPED_AT_ONCE = 130  # 128 + SIGINT, as shells report a process killed by it.

# Config fields that may differ between a run and its resumption: they change
# what is logged, evaluated or kept, how fast it runs, or how long it goes on,
# never the trajectory of the rounds already trained.
RESUMABLE_FIELDS = frozenset({
    'progress_bar', 'data_dir', 'epochs', 'mapping', 'conv', 'eval_every_rounds', 'eval_batch_size',
    'train_eval_examples', 'test_examples', 'bn_recompute_batches', 'log_every_rounds',
    'checkpoint_every_rounds', 'keep_checkpoints', 'compare_to_sgd', 'on_divergence',
    'rollback_lr_factor', 'max_rollbacks'})
# What a run writes into its workdir (deleted by --overwrite).
WORKDIR_OUTPUTS = workdir_lib.OUTPUTS  # what --overwrite deletes


class DivergenceError(FloatingPointError):
  """Training produced a NaN or Inf; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
  """SIGTERM/SIGINT stopped the run after a checkpoint; running again resumes."""


class ConfigMismatchError(errors.ConfigError):
  """The workdir holds a run of another config."""


class WorkdirLockedError(errors.WorkdirError):
  """Another run holds the workdir (its lock file is locked)."""


# ----------------------------------------------------------------------------
# Signals.


class StopSignals:
  """Turns SIGTERM and SIGINT into a request to stop at the end of the round.

  A context manager; outside the main thread it installs nothing. ``received``
  is the first signal's number (None until one arrives). A second SIGINT
  raises KeyboardInterrupt at once, also when it arrives before Python ran the
  handler of the first (CPython then calls the handler once for both): the
  signals are counted through :func:`signal.set_wakeup_fd`, to which the
  C-level handler writes one byte per delivered signal.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: Optional[int] = None
    self._count = 0
    self._previous = {}
    self._wakeup: Optional[tuple[int, int]] = None  # the pipe (read end, write end)
    self._previous_wakeup = -1
    self._wakeup_works = False

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is threading.main_thread():
      read_end, write_end = os.pipe()
      for fd in (read_end, write_end):
        os.set_blocking(fd, False)
      self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
      self._wakeup = (read_end, write_end)
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
    if self._wakeup is not None:
      signal.set_wakeup_fd(self._previous_wakeup)
      for fd in self._wakeup:
        os.close(fd)
      self._wakeup = None

  def _delivered(self) -> int:
    """How many of our signals arrived since the last call."""
    received = b''
    while self._wakeup is not None:
      try:
        chunk = os.read(self._wakeup[0], 512)
      except BlockingIOError:
        break
      if not chunk:
        break
      received += chunk
    if received:
      self._wakeup_works = True
      return sum(received.count(bytes([s])) for s in self.SIGNALS)
    # Nothing: an earlier call counted this signal's byte -- or no byte ever
    # comes (no wakeup fd outside the main thread, or another took it over).
    return 0 if self._wakeup_works else 1

  def _handle(self, signum, frame) -> None:
    del frame
    self._count += self._delivered()
    if self._count > 1 and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.received is not None:
      return
    self.received = signum
    print(f'received {signal.Signals(signum).name}: stopping at the end of this round, '
          'after a checkpoint (send SIGINT again to stop at once)', file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# The check after each round.


class RoundReport(NamedTuple):
  """What every process learns after a round (the same on all of them).

  Attributes:
    metrics: each round metric (``'loss'``, ``'error'``, ...) averaged over the
      round's steps, one value per replica, ``[n]`` in global replica order.
    bad_loss_step: per replica, the first step of the round whose loss is NaN
      or Inf, or -1.
    bad_params: per replica, whether any of its params is NaN or Inf.
    stop: whether any process received SIGTERM/SIGINT.
  """

  metrics: dict[str, np.ndarray]
  bad_loss_step: np.ndarray
  bad_params: np.ndarray
  stop: bool

  def divergence(self, round_index: int) -> Optional[str]:
    """Says which replica went wrong in round `round_index`, or None."""
    for replica in range(len(self.bad_params)):
      step = int(self.bad_loss_step[replica])
      if step >= 0:
        return (f'the loss of replica {replica} became NaN or Inf in round {round_index} '
                f'(step {step} of the round)')
      if self.bad_params[replica]:
        return f'the params of replica {replica} became NaN or Inf in round {round_index}'
    return None


@functools.lru_cache(maxsize=8)
def _round_check_fn(replicas: replicas_lib.Replicas) -> Callable:
  """Per replica, on its device: the round's mean metrics, first bad step, bad params."""
  per_device = replicas.per_device

  def device_fn(params, metrics):
    finite = jnp.isfinite(metrics['loss'].reshape(per_device, -1))
    bad_step = jnp.where(finite.all(axis=1), -1, jnp.argmin(finite, axis=1)).astype(jnp.int32)
    params_ok = jnp.stack([jnp.isfinite(x.reshape(per_device, -1)).all(axis=1)
                           for x in jax.tree.leaves(params)]).all(axis=0)
    means = {k: v.reshape(per_device, -1).astype(jnp.float32).mean(axis=1)
             for k, v in metrics.items()}
    return means, bad_step, ~params_ok

  return replicas.pmap(device_fn)


def check_round(replicas: replicas_lib.Replicas, params: Any, metrics: dict,
                stop: bool) -> RoundReport:
  """Per-replica round metrics and NaN/Inf checks, agreed by all processes.

  Args:
    replicas: the layout.
    params: the replicas' params after the round, leaves ``[D, R, ...]``.
    metrics: the round's metrics, leaves ``[D, R, L]``; must hold ``'loss'``.
    stop: whether this process was asked to stop.

  Returns:
    The :class:`RoundReport`, identical on every process: the per-replica
    values are gathered in global replica order (:meth:`Replicas.gather`).
  """
  means, bad_step, bad_params = replicas.gather(_round_check_fn(replicas)(params, metrics))
  stops = replicas.gather(replicas.shard(np.full(replicas.num_local_replicas, bool(stop))))
  return RoundReport(metrics=means, bad_loss_step=bad_step, bad_params=bad_params.astype(bool),
                     stop=bool(stops.any()))


# ----------------------------------------------------------------------------
# The workdir.


def config_differences(stored: dict, current: dict) -> list[str]:
  """The fields (outside :data:`RESUMABLE_FIELDS`) whose values differ."""
  missing = '<not set>'
  differences = []
  for field in sorted((set(stored) | set(current)) - RESUMABLE_FIELDS):
    there, here = stored.get(field, missing), current.get(field, missing)
    if there != here:
      differences.append(f'{field}={there!r} there, {here!r} now')
  return differences


def _clear_outputs(workdir: str) -> None:
  for name in WORKDIR_OUTPUTS:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    else:
      continue
    logging.warning('--overwrite: deleted %s', path)


def _holder(path: str) -> str:
  """Who holds the lock file `path`, as its holder wrote it: ``'host H, PID P (since T)'``."""
  try:
    with open(path) as f:
      holder = json.load(f)
    return f"host {holder['host']}, PID {holder['pid']} (since {holder['since']})"
  except (OSError, ValueError, KeyError, TypeError):
    return 'a run that has not written its host and PID into it yet'


def _locked(workdir: str, path: str) -> WorkdirLockedError:
  return WorkdirLockedError(
      f'--workdir={workdir} is in use by another run: {_holder(path)} holds {path}. Wait for '
      'that run to end (or stop it), or choose another --workdir.')


def check_not_locked(workdir: str) -> None:
  """Refuses `workdir` if another run holds one of its lock files; writes nothing.

  Each lock file is opened read-only and tried with a shared lock (which only
  a holder's exclusive lock refuses), then closed. Lock files held by this
  process are skipped.
  """
  for path in workdir_lib.lock_files(workdir):
    if path in WorkdirLock.held:
      continue
    try:
      fd = os.open(path, os.O_RDONLY)
    except OSError:
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      raise _locked(workdir, path) from None
    except OSError:  # a file system without locks: WorkdirLock warns
      pass
    finally:
      os.close(fd)


class WorkdirLock:
  """The run's exclusive hold on its workdir: each process flocks ``lock.<process index>``.

  A context manager, entered before the run writes anything into the
  workdir and left when it is done. ``fcntl.flock`` locks belong to the open
  file, so the kernel releases them when the process ends in any way
  (SIGKILL included): a lock file left behind blocks nothing. The file then
  holds the holder's host and PID, which a refused run names. With several
  processes every process locks its own file and they agree: if any finds
  its file held, all raise :class:`WorkdirLockedError` and none keeps a lock.
  A file system without locks (``ENOLCK``, ``EOPNOTSUPP``) gets a warning and
  no lock.

  `retry_seconds`: how long a held lock is tried again before the run is
  refused (another run's :func:`check_not_locked` holds it for microseconds).
  """

  held: set[str] = set()  # the lock files this process holds

  def __init__(self, workdir: str, *, retry_seconds: float = 2.0):
    self.workdir = workdir
    self.path = workdir_lib.lock_file(workdir, jax.process_index())
    self.retry_seconds = retry_seconds
    self._fd: Optional[int] = None

  def __enter__(self) -> 'WorkdirLock':
    try:
      problem = self._acquire()
    except OSError as err:  # the workdir or the lock file cannot be written: the user's to fix
      problem = err
    failed = distributed.from_all_processes(np.int32(problem is not None))
    if failed.any():
      self._release()
      if problem is not None:
        raise problem
      others = ', '.join(str(p) for p in np.flatnonzero(failed))
      raise WorkdirLockedError(
          f'--workdir={self.workdir}: process {others} of this run could not take its lock '
          '(its message says why: another run holds it, or it cannot be written).')
    return self

  def _acquire(self) -> Optional[WorkdirLockedError]:
    """Locks this process's file; returns the error to raise if another run holds it."""
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated before it is ours
    deadline = time.monotonic() + self.retry_seconds
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          os.close(fd)
          return _locked(self.workdir, self.path)
        time.sleep(0.05)
      except OSError as err:
        os.close(fd)
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          raise
        logging.warning('cannot lock %s (%s): nothing keeps a second run out of --workdir=%s',
                        self.path, err.strerror, self.workdir)
        return None
    self._fd = fd
    WorkdirLock.held.add(self.path)
    holder = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                         'process': jax.process_index(),
                         'since': datetime.datetime.now().isoformat(timespec='seconds')})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder + '\n').encode(), 0)
    os.fsync(fd)
    return None

  def _release(self) -> None:
    if self._fd is not None:
      WorkdirLock.held.discard(self.path)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)  # the file stays: deleting it would let two runs lock two files
      self._fd = None

  def __exit__(self, *exc_info) -> None:
    self._release()


def _check_place(workdir: str) -> None:
  """Refuses a workdir that is (or lies under) a file, or that this user cannot write."""
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    under = '' if existing == os.path.abspath(workdir) else f' ({existing} is a file)'
    raise errors.WorkdirError(f'--workdir={workdir} is a file, not a directory{under}: choose '
                              'another --workdir.')
  if not os.access(existing, os.W_OK | os.X_OK):
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    raise errors.WorkdirError(
        f'--workdir={workdir} cannot be written: {existing} is '
        + ('on a read-only file system' if read_only else 'not writable by this user')
        + '. Choose a writable --workdir (or make it writable).')


def _read_config_json(path: str) -> dict:
  try:
    with open(path) as f:
      stored = json.load(f)
  except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
    stored, problem = None, f'{type(err).__name__}: {err}'
  else:
    problem = f'it holds a {type(stored).__name__}, not a config'
  if not isinstance(stored, dict):
    raise errors.WorkdirError(
        f'{path} is not a valid config ({problem}). A run writes it before its first '
        'checkpoint and there is no checkpoint yet: delete it, or pass --overwrite, to start '
        'afresh.')
  return stored


def check_workdir(workdir: str, config_json: str, *, overwrite: bool = False) -> dict:
  """Checks that `workdir` may receive this run, writing nothing; returns what it resumes.

  A workdir that holds a checkpoint (or, before the first checkpoint, a
  ``config.json``) of a config that differs in a field outside
  :data:`RESUMABLE_FIELDS` is refused, unless `overwrite`. The checkpoints
  are only read (a run that holds the workdir may be writing them).

  Returns:
    The record of the newest checkpoint whose record reads and verifies
    (``{}`` when there is none, or with `overwrite`).

  Raises:
    ConfigMismatchError: naming the fields that differ.
    errors.WorkdirError: `workdir` is a file or cannot be written, or its
      ``config.json`` is corrupt.
  """
  _check_place(workdir)
  if overwrite:
    return {}
  record, stored, source = {}, None, None
  directory = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)
  if os.path.isdir(directory):
    reader = checkpoint.Checkpointer(directory, read_only=True)
    try:
      for round_index in reversed(reader.rounds()):  # the newest whose record verifies
        try:
          record = reader.read_record(round_index)
        except checkpoint.CorruptCheckpointError:
          continue  # moved aside, with a warning, when the run restores
        stored = record.get('config')
        source = f'the checkpoint after round {round_index}'
        break
    finally:
      reader.close()
  config_path = workdir_lib.path(workdir, workdir_lib.CONFIG)
  if source is None and os.path.exists(config_path):
    stored, source = _read_config_json(config_path), workdir_lib.CONFIG
  differences = config_differences(stored, json.loads(config_json)) if stored is not None else []
  if differences:
    raise ConfigMismatchError(
        f'--workdir={workdir} holds a run of another config ({source}): '
        + '; '.join(differences) + '. Use another --workdir, run with the same config to '
        'resume it, or pass --overwrite to delete its outputs and start afresh.')
  return record


def open_workdir(workdir: str, config_json: str, *, keep_checkpoints: int,
                 overwrite: bool = False) -> checkpoint.Checkpointer:
  """Checks `workdir` (:func:`check_workdir`), writes its config.json, opens its checkpoints.

  The caller holds the workdir (:class:`WorkdirLock`): this is where the run
  starts writing. With `overwrite`, the previous run's outputs
  (:data:`WORKDIR_OUTPUTS`) are deleted first and the run starts afresh.
  ``config.json`` is written to a temporary file and renamed, so that a kill
  never leaves it torn.
  """
  check_workdir(workdir, config_json, overwrite=overwrite)
  distributed.barrier('workdir_checked')  # every process has read the old config.json
  if distributed.is_primary():
    if overwrite:
      _clear_outputs(workdir)
    os.makedirs(workdir, exist_ok=True)
    metric_writer.write_atomically(workdir_lib.path(workdir, workdir_lib.CONFIG), config_json)
  distributed.barrier('open_workdir')
  return checkpoint.Checkpointer(workdir_lib.path(workdir, workdir_lib.CHECKPOINTS),
                                 max_to_keep=keep_checkpoints)


# ----------------------------------------------------------------------------
# Exit codes.


def exit_code(fn: Callable[[], Any], *, workdir: Optional[str] = None) -> int:
  """Runs `fn` (the whole run); returns the binary's exit status.

  0 when it finishes, :data:`EXIT_INTERRUPTED` after SIGTERM/SIGINT,
  :data:`EXIT_DIVERGED` when training diverged, :data:`EXIT_STOPPED_AT_ONCE`
  after a second SIGINT. Bad input (:func:`errors.user_message`: a config,
  flag, data or workdir error, a full disk, an unwritable directory) prints
  one line and returns 1; its traceback only with ``--verbosity=1``. After a
  full disk, or with several processes, the process exits at once (status 1):
  orbax's threads fill the interpreter's shutdown with errors about the
  failed write, and peers blocked in a collective should fail fast.

  Other errors are bugs and propagate (exit status 1, with a traceback) --
  except with several processes, where this process exits at once
  (:data:`distributed.EXIT_PEER_LOST` when a collective failed, most likely
  because another process died; 1 otherwise) so that its peers, blocked in a
  collective with it, fail fast instead of waiting for the shutdown timeout.
  """
  try:
    fn()
    return 0
  except TrainingInterrupted as err:
    logging.warning('%s', err)
    return EXIT_INTERRUPTED
  except DivergenceError as err:
    logging.error('%s', err)
    return EXIT_DIVERGED
  except KeyboardInterrupt:
    print('Stopped at once by a second SIGINT; run the same command again to resume from the '
          'last checkpoint.', file=sys.stderr, flush=True)
    return EXIT_STOPPED_AT_ONCE
  except Exception as err:  # pylint: disable=broad-except
    message = errors.user_message(err, workdir)
    if message is not None:
      several = jax.distributed.is_initialized()
      if logging.get_verbosity() >= 1:
        traceback.print_exception(err)
      print(f'error: {message}' if not several else
            f'error (process {jax.process_index()} of {jax.process_count()}): {message}',
            file=sys.stderr, flush=True)
      if several or errors.disk_full(err):
        errors.exit_now(1)
      return 1
    if jax.process_count() == 1:
      raise
    lost = isinstance(err, jax.errors.JaxRuntimeError)
    logging.exception(
        'process %d of %d: %s', jax.process_index(), jax.process_count(),
        'a collective with the other processes failed; most likely another process died '
        '(see its log). Restart all processes to resume from the last checkpoint.'
        if lost else 'this process failed; stopping it now so that the others stop too.')
    errors.exit_now(distributed.EXIT_PEER_LOST if lost else 1)
