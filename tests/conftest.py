"""Test set-up: 8 fake CPU devices for the multi-device tests.

The flag must be set before JAX starts its backend, so it lives here, imported
by pytest before any test module.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The training binary's persistent compilation cache stays out of the home
# directory: one directory that the test workers share instead (`persistent_compilation_cache`).
os.environ.setdefault('PARLE_COMPILATION_CACHE', '')
# ... and caches every program, not only those that compile in over 1 s (JAX's default):
# the suite compiles the same small programs (init, evaluation, checks) in many tests.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# A size limit (far above what the suite writes) turns on JAX's file lock around every read
# and write of the cache; without it JAX writes entries in place, unsafe for two workers.
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(16 << 30))


import fcntl  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

FASHION_MNIST_DIR = pathlib.Path(
    os.environ.get('PARLE_FASHION_MNIST_DIR', '/usr/share/datasets/fashion-mnist'))


@pytest.fixture(scope='module', autouse=True)
def release_compiled_programs():
  """Drops JAX's compiled programs after a test module once memory mappings run high.

  The whole suite in one process compiles thousands of programs and, without
  this, passes Linux's vm.max_map_count (65530) near its end; XLA then
  segfaults in the next compile. Clearing after every module would recompile
  shared programs (minutes of CI), so this clears only past half the limit.
  """
  yield
  from experiments import machine  # after the XLA flags above
  machine.release_compiled_programs_if_many()


@pytest.fixture(scope='session', autouse=True)
def persistent_compilation_cache(tmp_path_factory):
  """A persistent compilation cache, shared by the test workers, for them and the binaries.

  Tests build the same programs again and again: every run of a config builds
  its round as a new function, so JAX's in-memory cache misses and XLA
  compiles it again (2-8 s for LeNet on 2 cores), and a test that launches
  `experiments.train` several times on one config (killed and resumed, a held
  workdir, a straight run to compare with) would compile the same programs in
  every process. JAX's persistent cache finds a program by its HLO, flags and
  devices, and a cached program is the same program, so the numbers do not
  change (the binary uses one by default too). Multi-process runs never use it
  (distributed.enable_compilation_cache); a test that sets
  PARLE_COMPILATION_CACHE itself wins.

  Under pytest-xdist the workers share one directory (beside the prepared
  data): JAX's cache key holds the cache's own path (through XLA's
  ``xla_gpu_per_fusion_autotune_cache_dir`` option, even on CPU), so a
  directory per worker never served a program that the other worker had
  compiled. JAX_COMPILATION_CACHE_MAX_SIZE (above) makes JAX lock its files.
  """
  if os.environ.get('PARLE_COMPILATION_CACHE'):
    yield
    return
  import jax  # after the XLA flags above
  from experiments import distributed
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # pytest-of-<user>/pytest-<n>, above every worker's own
  directory = str(root / 'compilation_cache')
  os.environ['PARLE_COMPILATION_CACHE'] = directory
  previous = jax.config.jax_compilation_cache_dir
  distributed.enable_compilation_cache(directory)  # as the binaries turn it on
  yield
  jax.config.update('jax_compilation_cache_dir', previous)
  os.environ['PARLE_COMPILATION_CACHE'] = ''


# Under pytest-xdist, ``make test`` sends whole test modules to its two workers
# (--dist=loadfile), so that a module-scoped fixture (a trained model, a loaded
# dataset, a benchmark run) is built once. --dist=loadgroup with xdist_group marks
# would not: under pytest 9.2 an item's node id is a structured NodeId, and
# pytest-xdist 3.8.0's worker hook, which appends '@<group>' to `item._nodeid`,
# no longer changes it (checked 2026-12-06), so the groups never reach the scheduler.


# The slowest modules first (seconds of both workers in a full run, 2026-12-07), so
# that --dist=loadfile does not hand one to a worker while the other has nothing
# left: the suite's end then waited minutes on one worker. `make test` passes
# --no-loadscope-reorder, or pytest-xdist would instead order modules by their
# number of tests (its default), which put these last.
SLOWEST_MODULES = (
    'test_train', 'test_faults', 'test_replay', 'test_checkpoint_integrity', 'test_islands',
    'test_execution_paths', 'test_benchmark', 'test_landscape', 'test_nnx', 'test_notebooks',
    'test_communication', 'test_repeatability', 'test_roofline', 'test_conv', 'test_workdir_lock',
    'test_flatness', 'test_shard_map', 'test_sampling', 'test_doctests')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable


@pytest.fixture(scope='session')
def fashion_mnist_data_dir(tmp_path_factory):
  """A data dir with Fashion-MNIST, prepared once per test run (about 40-55 s on 2 cores).

  Under pytest-xdist the workers share it: it lives in their common base
  directory, and the first worker to get there prepares it under a file lock
  while the other waits, then reads it (data.load's caches are written through
  a temporary file and a rename, so a later cache write never tears a file).
  """
  from parle_jax import data  # after the XLA flags above
  if not all((FASHION_MNIST_DIR / f).is_file() for f in data.FASHION_MNIST_FILES.values()):
    pytest.fail(f'no Fashion-MNIST files in {FASHION_MNIST_DIR}: run '
                "'apt-get install -y dataset-fashion-mnist' (make test does it as root).")
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # pytest-of-<user>/pytest-<n>, above every worker's own
  data_dir = root / 'fashion_mnist_tfds'
  with open(root / 'fashion_mnist_tfds.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    data_dir.mkdir(exist_ok=True)
    for split in ('train', 'test'):
      data.load('fashion_mnist', split, data_dir)  # prepares it, or reads what is prepared
  return data_dir


@pytest.fixture(scope='module')
def fashion(fashion_mnist_data_dir):
  """Fashion-MNIST prepared by the local builder (above), loaded from its cache."""
  from parle_jax import data
  data_dir = fashion_mnist_data_dir
  train = data.load('fashion_mnist', 'train', data_dir)
  test = data.load('fashion_mnist', 'test', data_dir)
  return data_dir, train, test
