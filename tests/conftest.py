"""Test set-up: 8 fake CPU devices for the multi-device tests.

The flag must be set before JAX starts its backend, so it lives here, imported
by pytest before any test module.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
