"""What an experiment ran on, recorded next to its numbers.

Suite summaries and benchmark JSON both carry :func:`describe`, so every
figure in ``experiments/results`` can name its machine.
"""

from __future__ import annotations

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
