"""Test set-up: 8 fake CPU devices for the multi-device tests.

The flag must be set before JAX starts its backend, so it lives here, imported
by pytest before any test module.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The training binary's persistent compilation cache stays off in the tests (no
# writes into the home directory); tests that want it pass a directory.
os.environ.setdefault('PARLE_COMPILATION_CACHE', '')


import gc  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

FASHION_MNIST_DIR = pathlib.Path(
    os.environ.get('PARLE_FASHION_MNIST_DIR', '/usr/share/datasets/fashion-mnist'))


def _memory_maps() -> tuple[int, int]:
  """(this process's memory mappings, the kernel's limit); (0, 1) off Linux."""
  try:
    with open('/proc/self/maps') as maps, open('/proc/sys/vm/max_map_count') as limit:
      return sum(1 for _ in maps), int(limit.read())
  except OSError:
    return 0, 1


@pytest.fixture(scope='module', autouse=True)
def release_compiled_programs():
  """Drops JAX's compiled programs after a test module once mappings run high.

  Every XLA:CPU executable keeps its own memory mappings. The whole suite in one
  process compiles thousands of programs and, without this, passes Linux's
  vm.max_map_count (65530) near its end; XLA then segfaults in the next compile.
  Clearing after every module would recompile shared programs (minutes of CI), so
  this clears only past half the limit.
  """
  yield
  count, limit = _memory_maps()
  if count > limit // 2:
    import jax  # after the XLA flags above
    jax.clear_caches()
    gc.collect()


# Under pytest-xdist (``make test`` runs two workers), the tests of these modules
# are marked to stay on one worker (xdist_group), because they share a module-scoped
# fixture (a trained model, a loaded dataset, a benchmark run) that would otherwise
# be built once per worker; every other test is sent to whichever worker is free.
# Checked on 2026-12-04: under pytest 9.2 the marks of pytest-xdist 3.8.0 never reach
# the node ids (not even a module's pytestmark, in a two-file example; its worker hook
# that adds them is the one in its plugin without @pytest.hookimpl), so the tests are
# spread one by one and a module fixture is built again where its tests land
# (test_landscape's twice in a fresh clone). --dist=loadfile keeps each module whole.
ONE_WORKER_MODULES = frozenset({
    'test_bad_input', 'test_benchmark', 'test_checkpoint_integrity', 'test_datasets',
    'test_evaluate', 'test_execution_paths', 'test_landscape', 'test_local_updates', 'test_nnx',
    'test_rounds', 'test_sampling', 'test_train'})


def pytest_collection_modifyitems(items):
  for item in items:
    module = item.module.__name__
    if module in ONE_WORKER_MODULES:
      item.add_marker(pytest.mark.xdist_group(module))


@pytest.fixture(scope='session')
def fashion_mnist_data_dir(tmp_path_factory):
  """A data dir with Fashion-MNIST prepared once per test session (about 40 s)."""
  from parle_jax import data  # after the XLA flags above
  if not all((FASHION_MNIST_DIR / f).is_file() for f in data.FASHION_MNIST_FILES.values()):
    pytest.fail(f'no Fashion-MNIST files in {FASHION_MNIST_DIR}: run '
                "'apt-get install -y dataset-fashion-mnist' (make test does it as root).")
  data_dir = tmp_path_factory.mktemp('tfds')
  for split in ('train', 'test'):
    data.load('fashion_mnist', split, data_dir)
  return data_dir


@pytest.fixture(scope='module')
def fashion(fashion_mnist_data_dir):
  """Fashion-MNIST prepared by the local builder (above), loaded from its cache."""
  from parle_jax import data
  data_dir = fashion_mnist_data_dir
  train = data.load('fashion_mnist', 'train', data_dir)
  test = data.load('fashion_mnist', 'test', data_dir)
  return data_dir, train, test
