"""What an experiment ran on, recorded next to its numbers.

Suite summaries and benchmark JSON both carry :func:`describe`, so every
figure in ``experiments/results`` can name its machine.
"""

from __future__ import annotations

import gc
import os
import platform
import socket

import jax


def describe() -> dict:
  """The accelerator, host and JAX version of this process.

  Returns:
    ``platform`` (``'cpu'``, ``'gpu'``, ``'tpu'``), ``device_kind`` (e.g.
    ``'NVIDIA H100 80GB HBM3'``), ``device_count`` (global devices),
    ``cpu_count``, ``processor``, ``hostname`` and ``jax`` (its version).
  """
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'cpu_count': os.cpu_count(),
          'processor': platform.processor() or platform.machine(),
          'hostname': socket.gethostname(), 'jax': jax.__version__}


def memory_maps() -> tuple[int, int]:
  """(this process's memory mappings, the kernel's limit ``vm.max_map_count``); (0, 1) off Linux."""
  try:
    with open('/proc/self/maps') as maps, open('/proc/sys/vm/max_map_count') as limit:
      return sum(1 for _ in maps), int(limit.read())
  except OSError:
    return 0, 1


def release_compiled_programs_if_many(fraction: float = 0.5) -> bool:
  """Drops JAX's compiled programs once memory mappings pass `fraction` of the limit.

  Every XLA:CPU executable keeps its own memory mappings; a process that
  compiles thousands of programs (a long suite, the whole test suite) reaches
  Linux's ``vm.max_map_count``, and XLA then segfaults in the next compile.
  Clearing unconditionally would instead recompile programs that later work
  shares (every run of a suite measured for flatness uses the same ones).
  Returns whether it cleared.
  """
  count, limit = memory_maps()
  if count <= fraction * limit:
    return False
  jax.clear_caches()
  gc.collect()
  return True
