"""Several processes (hosts) in one run: ``jax.distributed`` set-up and helpers.

A run is multi-process when any of these says so, in this order:

* the flags ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``;
* the environment variables ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here);
* a SLURM step with several tasks (``srun``) or an Open MPI launch
  (``mpirun``), which JAX detects itself.

Otherwise the run is single-process, as before. Every process then sees all
global devices (``jax.devices()``) and feeds only its own
(``jax.local_devices()``). ``--heartbeat_timeout_seconds`` bounds how long the
others keep running after a process dies: JAX's coordination service notices
the missing heartbeats and terminates them (a collective with a dead peer
usually fails sooner, with a gloo/NCCL error that :mod:`experiments.train`
reports and turns into exit code :data:`EXIT_PEER_LOST`).
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Callable, Optional, TypeVar

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None,
    'HOST:PORT of process 0, where the coordination service listens; default '
    '$JAX_COORDINATOR_ADDRESS. Setting it (or --num_processes > 1) makes the run multi-process.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes of the run; default $JAX_NUM_PROCESSES.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0 .. num_processes - 1; default $JAX_PROCESS_ID.')
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    'initialization_timeout', 300,
    'Seconds to wait for all processes to connect before giving up (JAX then aborts).')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', 100,
    'Seconds without heartbeats after which a process counts as dead and the others are '
    'terminated.')

# Exit status of a process whose collective failed because another process died.
EXIT_PEER_LOST = 69  # EX_UNAVAILABLE (sysexits.h)

_T = TypeVar('_T')


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'${name}={value!r} is invalid: must be an integer.') from None


def _launcher_starts_several() -> bool:
  """Whether SLURM (srun) or Open MPI started this process as one of several."""
  if 'SLURM_STEP_NODELIST' in os.environ and 'SLURM_PROCID' in os.environ:
    return (_env_int('SLURM_NTASKS') or 1) > 1
  if 'OMPI_MCA_orte_hnp_uri' in os.environ:
    return (_env_int('OMPI_COMM_WORLD_SIZE') or 1) > 1
  return False


def _flag_value(holder: flags.FlagHolder, value):
  """`value` if given, else the flag's (its default before flags are parsed)."""
  if value is not None:
    return value
  try:
    return holder.value
  except flags.UnparsedFlagAccessError:
    return holder.default


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               initialization_timeout: Optional[int] = None,
               heartbeat_timeout_seconds: Optional[int] = None) -> bool:
  """Starts ``jax.distributed`` if the flags, environment or launcher ask for it.

  Must run before anything touches a JAX device. Arguments left None come
  from the flags, then the environment (see the module docstring).

  Returns:
    Whether this run has several processes.

  Raises:
    ValueError: for a process id outside ``0 .. num_processes - 1``, fewer than
      one process, a malformed address, or an address without the number of
      processes and this process's id (outside SLURM/Open MPI).
  """
  flag = _flag_value
  address = (flag(_COORDINATOR_ADDRESS, coordinator_address)
             or os.environ.get('JAX_COORDINATOR_ADDRESS') or None)
  num = flag(_NUM_PROCESSES, num_processes)
  num = num if num is not None else _env_int('JAX_NUM_PROCESSES')
  index = flag(_PROCESS_ID, process_id)
  index = index if index is not None else _env_int('JAX_PROCESS_ID')
  launcher = _launcher_starts_several()
  if num is not None and num < 1:
    raise ValueError(f'--num_processes={num} is invalid: must be >= 1.')
  if not launcher and address is None and (num is None or num == 1):
    if index not in (None, 0):
      raise ValueError(f'--process_id={index} is invalid for a single process: must be 0.')
    return False
  if address is not None and not re.fullmatch(r'\[?[\w.:-]+\]?:\d+', address):
    raise ValueError(f'--coordinator_address={address!r} is invalid: must be HOST:PORT, '
                     'e.g. 10.0.0.1:1234 (process 0 listens on that port).')
  if not launcher and (address is None or num is None or index is None):
    missing = [name for name, value in (('--coordinator_address', address),
                                        ('--num_processes', num), ('--process_id', index))
               if value is None]
    raise ValueError(
        f'a multi-process run needs --coordinator_address, --num_processes and '
        f'--process_id (or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID); '
        f'missing {", ".join(missing)}.')
  if index is not None and num is not None and not 0 <= index < num:
    raise ValueError(f'--process_id={index} is invalid: must be in 0 .. {num - 1} '
                     f'(--num_processes={num}).')
  timeout = flag(_INITIALIZATION_TIMEOUT, initialization_timeout)
  heartbeat = flag(_HEARTBEAT_TIMEOUT, heartbeat_timeout_seconds)
  for name, value in (('--initialization_timeout', timeout),
                      ('--heartbeat_timeout_seconds', heartbeat)):
    if value is not None and value < 1:
      raise ValueError(f'{name}={value} is invalid: must be >= 1 second.')
  kwargs = {}
  if timeout is not None:
    kwargs['initialization_timeout'] = timeout
  if heartbeat is not None:
    kwargs['heartbeat_timeout_seconds'] = heartbeat
  jax.distributed.initialize(address, num, index, **kwargs)
  logging.info('process %d of %d (coordinator %s): %d local devices of %d',
               jax.process_index(), jax.process_count(), address or 'from the launcher',
               jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


_barriers = itertools.count()


def barrier(name: str, timeout_seconds: int = 600) -> None:
  """Waits until every process gets here (nothing to do with one process).

  A barrier of the coordination service, not a collective on the devices: on
  CPU, gloo gives up on a collective whose peers arrive more than 30 s apart
  (``Gloo context initialization failed ... GetKeyValue() timed out``), which
  happens when one process compiles or loads data for longer than another.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  jax_distributed.global_state.client.wait_at_barrier(
      f'parle_{name}_{next(_barriers)}', timeout_in_ms=timeout_seconds * 1000)


def from_all_processes(values) -> np.ndarray:
  """`values` (a small array, the same shape everywhere) of every process: ``[processes, ...]``.

  Every process must call it (a barrier, then one all-gather on the devices).
  """
  values = np.asarray(values)
  if jax.process_count() == 1:
    return values[None]
  barrier('gather')
  return np.asarray(multihost_utils.process_allgather(values))


def primary_first(fn: Callable[[], _T], name: str, timeout_seconds: int = 3600) -> _T:
  """Runs `fn` on process 0, then on the others (e.g. to fill a shared cache once)."""
  if jax.process_count() == 1:
    return fn()
  if is_primary():
    result = fn()
    barrier(name, timeout_seconds)
    return result
  barrier(name, timeout_seconds)
  return fn()


def enable_compilation_cache(directory: Optional[str]) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in `directory`; returns it (None: off).

  None means ``$PARLE_COMPILATION_CACHE``, else ``~/.cache/parle_jax/jax``; ``''``
  turns the cache off. It stays off in multi-process CPU runs: their cache
  keys differ between processes, so one process would load a program that the
  others still compile, and gloo gives up on a first collective whose peers
  arrive more than 30 s apart. Call after :func:`initialize`, before compiling.
  """
  if directory is None:
    directory = os.environ.get('PARLE_COMPILATION_CACHE',
                               os.path.expanduser('~/.cache/parle_jax/jax'))
  if not directory:
    return None
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    logging.info('compilation cache off: %d CPU processes (their cache keys differ)',
                 jax.process_count())
    return None
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  logging.info('compilation cache: %s', directory)
  return directory
