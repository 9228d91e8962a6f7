"""Bad input: config fields, settings, flags, workdirs and data files.

Each is refused up front with one line naming the value and what is allowed
(docs/failures.md). The binary runs are tiny (LeNet, 2 steps of batch
8 per round); most of their time goes into compiling them.
"""

import errno
import json
import os
import pathlib
import re
import stat
import subprocess

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import distributed, errors, faults, metric_writer, optimizers, train
from experiments.configs import base, fashion_mnist_lenet
from parle_jax import checkpoint, data
from parle_jax.data import datasets
from test_train import MOCK_EXAMPLES, tiny, train_command

REPO = pathlib.Path(__file__).resolve().parent.parent


# --- every config field is checked up front --------------------------------------
@pytest.mark.parametrize('field, value, message', [
    ('dataset', 'imagenet', r"config.dataset='imagenet' is invalid: choose one of \["),
    ('model', 'resnet50', "config.model='resnet50' is invalid: choose one of"),
    ('optimizer', 'adam', "config.optimizer='adam' is invalid: choose one of"),
    ('mapping', 'pmap', "config.mapping='pmap' is invalid"),
    ('on_divergence', 'ignore', "config.on_divergence='ignore' is invalid: choose one of"),
    ('L', 0, 'config.L=0 is invalid: must be an integer >= 1'),
    ('L', None, 'config.L=None is invalid: must be an integer >= 1'),
    ('num_replicas', 0, 'config.num_replicas=0 is invalid: must be an integer >= 1'),
    ('batch_size', -1, 'config.batch_size=-1 is invalid: must be an integer >= 1'),
    ('batch_size', True, 'config.batch_size=True is invalid'),
    ('seed', -1, 'config.seed=-1 is invalid: must be an integer >= 0'),
    ('max_rollbacks', -1, 'config.max_rollbacks=-1 is invalid'),
    ('eval_every_rounds', -2, r'config.eval_every_rounds=-2 is invalid: must be an integer >= 0 \(0'),
    ('learning_rate', -0.1, 'config.learning_rate=-0.1 is invalid: must be a finite number >= 0'),
    ('learning_rate', float('nan'), 'config.learning_rate=nan is invalid'),
    ('inner_learning_rate', float('inf'), 'config.inner_learning_rate=inf is invalid'),
    ('weight_decay', -1e-4, 'config.weight_decay=-0.0001 is invalid'),
    ('noise', -1.0, 'config.noise=-1.0 is invalid'),
    ('epochs', 0.0, r'config.epochs=0.0 is invalid: must be a finite number > 0'),
    ('data_fraction', 1.5, r'config.data_fraction=1.5 is invalid: must be in \(0, 1\]'),
    ('data_fraction', 0.0, r'config.data_fraction=0.0 is invalid: must be in \(0, 1\]'),
    ('lr_decay', 0.0, r'config.lr_decay=0.0 is invalid: must be in \(0, 1\]'),
    ('lr_decay', 2.0, r'config.lr_decay=2.0 is invalid: must be in \(0, 1\]'),
    ('rollback_lr_factor', 1.0, r'config.rollback_lr_factor=1.0 is invalid: must be in \(0, 1\)'),
    ('alpha', 1.0, r'config.alpha=1.0 is invalid: must be in \[0, 1\)'),
    ('momentum', -0.5, r'config.momentum=-0.5 is invalid: must be in \[0, 1\)'),
    ('gamma_max', 0.001, 'config.gamma_max=0.001 is invalid: must be a finite number >= '
                         'gamma_initial=0.01'),
    ('lr_drop_epochs', (3, 1), 'config.lr_drop_epochs=.* is invalid: must be increasing positive'),
    ('lr_drop_epochs', (0, 1), 'config.lr_drop_epochs'),
    ('data_dir', None, 'config.data_dir=None is invalid: must be a path'),
    ('progress_bar', None, 'config.progress_bar=None is invalid: must be True or False'),
    ('conv', 'cudnn', r"config.conv='cudnn' is invalid: choose one of \['auto', 'xla', 'matmul'\]"),
    ('device_map', 'xmap', r"config.device_map='xmap' is invalid: choose one of \['auto', 'pmap', "),
    ('outer_learning_rate', -0.7, 'config.outer_learning_rate=-0.7 is invalid: must be a finite'),
    ('outer_momentum', 1.0, r'config.outer_momentum=1.0 is invalid: must be in \[0, 1\)'),
])
def test_bad_config_field_is_named_with_its_value(field, value, message):
  """ConfigDict refuses values of another type itself (e.g. L=2.5); None and bools pass it."""
  config = fashion_mnist_lenet.get_config()
  config[field] = value
  with pytest.raises(ValueError, match=message):
    base.validate(config)


def test_bad_model_kwargs_are_named():
  config = fashion_mnist_lenet.get_config()
  config.model_kwargs.depth = 10  # LeNet has no depth
  with pytest.raises(ValueError, match=r"config.model_kwargs=\{'depth': 10, 'dropout': 0.25\} "
                                       r"is invalid for config.model='lenet': .*'depth'"):
    base.validate(config)
  config = fashion_mnist_lenet.get_config()
  config.model_kwargs.dropout = 1.5
  with pytest.raises(ValueError, match='config.model_kwargs=.*dropout'):
    base.validate(config)


@pytest.mark.parametrize('overrides, devices, message', [
    (dict(num_replicas=6), 4, 'config.num_replicas=6 is invalid: it must be a multiple of the 4 '
                              'devices'),
    (dict(num_replicas=12), 8, 'config.num_replicas=12 is invalid: it must be a multiple of the 8'),
    (dict(optimizer='data_parallel_sgd', num_replicas=3, batch_size=128), 8,
     'config.batch_size=128 must be divisible by the 3'),
    (dict(optimizer='sgd', num_replicas=2), 8, "config.optimizer='sgd' trains one model"),
    (dict(optimizer='elastic_sgd', num_replicas=6, mapping='sequential'), 1,
     "mapping='sequential' cannot run elastic_sgd"),
    (dict(batch_size=100000), 8, 'config.batch_size=100000 exceeds the 60000 training examples'),
    (dict(data_fraction=0.001, batch_size=128), 8, 'exceeds the 60 training examples'),
])
def test_settings_that_do_not_fit_the_data_or_devices_raise(overrides, devices, message):
  config = fashion_mnist_lenet.get_config()
  config.update(overrides)
  base.validate(config)
  with pytest.raises(ValueError, match=message):
    plan = optimizers.make_plan(config, 60000, devices)
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(jax, 'devices', lambda: [jax.local_devices()[0]] * devices)
      optimizers.select_devices(plan)


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_processes=0), '--num_processes=0 is invalid: must be >= 1'),
    (dict(num_processes=2, process_id=2, coordinator_address='127.0.0.1:1234'),
     r'--process_id=2 is invalid: must be in 0 .. 1'),
    (dict(num_processes=2, process_id=0, coordinator_address='localhost'),
     "--coordinator_address='localhost' is invalid: must be HOST:PORT"),
    (dict(num_processes=2), 'missing --coordinator_address, --process_id'),
    (dict(process_id=1), '--process_id=1 is invalid for a single process'),
])
def test_bad_process_flags_raise_before_jax_starts(kwargs, message, monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_NTASKS',
               'SLURM_STEP_NODELIST', 'OMPI_MCA_orte_hnp_uri'):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)


def test_single_process_needs_no_set_up(monkeypatch):
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  monkeypatch.setenv('JAX_NUM_PROCESSES', '1')
  assert distributed.initialize() is False


# --- what the binary says: one line and exit status 1, a traceback only for bugs ----
@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
  """A data dir whose Fashion-MNIST cache holds 64 random examples per split (read without TFDS)."""
  data_dir = tmp_path_factory.mktemp('tiny_data')
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    path = data.cache_path('fashion_mnist', split, data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, image=rng.integers(0, 256, (MOCK_EXAMPLES, 28, 28, 1), dtype=np.uint8),
             label=rng.integers(0, 10, MOCK_EXAMPLES).astype(np.int32))
  return data_dir


def _tiny_overrides(data_dir, **overrides):
  """`tiny`'s config (2 rounds of 2 steps of batch 8) as --config.field=value overrides."""
  config = tiny(fashion_mnist_lenet.get_config(), data_dir)
  fields = ('data_dir', 'L', 'batch_size', 'bn_recompute_batches', 'eval_batch_size',
            'train_eval_examples', 'progress_bar', 'mapping', 'compare_to_sgd', 'epochs')
  return dict({field: config[field] for field in fields}, **overrides)


def _run_binary(args, timeout=300):
  """(exit status, stdout and stderr) of experiments.train run with `args`."""
  process = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  return process.returncode, process.stdout + process.stderr


def _empty_config_json(workdir):
  workdir.mkdir()
  (workdir / 'config.json').write_text('')  # as a kill during its write could leave it


def _regular_file(workdir):
  workdir.write_text('not a directory')


MISSING_CONFIG = f'{REPO}/experiments/configs/no_such_config.py'


# (what the workdir is, config overrides, flags, the message, whether a traceback follows)
@pytest.mark.parametrize('prepare, overrides, flags, message, traceback', [
    (None, dict(learning_rte=0.1), (),
     r"^FATAL Flags parsing error: --config.learning_rte=0.1 is invalid: the config has no "
     r"field 'learning_rte'. Did you mean \"learning_rate\" instead of \"learning_rte\"\?$",
     False),
    (None, {}, (f'--config={MISSING_CONFIG}',),
     rf"^FATAL Flags parsing error: --config={MISSING_CONFIG}: cannot load the config file "
     rf"\(\[Errno 2\] No such file or directory: '{MISSING_CONFIG}'\).$", False),
    (None, dict(learning_rate=-0.1), (),
     r'^error: config.learning_rate=-0.1 is invalid: must be a finite number >= 0.$', False),
    (None, dict(learning_rate=-0.1), ('--verbosity=1',),  # a user may ask for the traceback
     r'^error: config.learning_rate=-0.1 is invalid', True),
    # Planned before anything is written: the corrected command then starts afresh.
    (None, dict(batch_size=100), (),
     r'^error: config.batch_size=100 exceeds the 64 training examples of a replica.$', False),
    (None, dict(num_replicas=12), (),
     r'^error: config.num_replicas=12 is invalid: it must be a multiple of the 8 devices', False),
    (_regular_file, {}, (),
     r'^error: --workdir=(\S+) is a file, not a directory: choose another --workdir.$', False),
    (_empty_config_json, {}, (),
     r'^error: (\S+)/config.json is not a valid config \(JSONDecodeError: Expecting value: .*\)\. '
     r'.*delete it, or pass --overwrite, to start afresh.$', False),
], ids=['misspelt field', 'missing config file', 'bad value', 'bad value, --verbosity=1',
        'batch larger than the data', 'replicas the devices cannot hold', 'workdir is a file',
        'empty config.json'])
def test_bad_input_prints_one_line_and_exits_1(prepare, overrides, flags, message, traceback,
                                               tiny_data_dir, tmp_path):
  workdir = tmp_path / 'work'
  if prepare:
    prepare(workdir)
  args = train_command(workdir, _tiny_overrides(tiny_data_dir, **overrides))
  for flag in flags:  # a second --config replaces the first
    args = [a for a in args if not (flag.startswith('--config=') and a.startswith('--config='))]
    args.insert(3, flag)
  code, output = _run_binary(args)
  assert code == 1, output[-3000:]
  assert re.search(message, output, re.MULTILINE), output[-3000:]
  assert ('Traceback' in output) == traceback, output[-3000:]
  if prepare is None:  # a failed start writes nothing: the corrected command starts afresh
    assert not workdir.exists(), sorted(os.listdir(workdir))


def test_full_disk_is_one_line_naming_the_workdir(tiny_data_dir, tmp_path):
  """A real ENOSPC: metrics.jsonl is /dev/full. (Orbax's, wrapped, in the test below.)"""
  if not os.path.exists('/dev/full'):
    pytest.skip('no /dev/full')
  workdir = tmp_path / 'work'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').symlink_to('/dev/full')
  code, output = _run_binary(train_command(workdir, _tiny_overrides(tiny_data_dir,
                                                                    log_every_rounds=1)))
  assert code == 1, output[-3000:]
  assert output.strip().splitlines()[-1] == (
      f'error: No space left on device for --workdir={workdir} (writing metrics.jsonl). Free '
      'space on that disk (or use another), then run the same command again: it resumes from '
      'the last checkpoint.'), output[-3000:]
  assert 'Traceback' not in output, output[-3000:]


def _raised(error, cause=None):
  """`error` as raised from `cause`, traceback and all."""
  try:
    raise error from cause
  except BaseException as err:  # pylint: disable=broad-except
    return err


def test_full_disk_is_found_inside_wrapped_errors():
  orbax = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT database at local file '
      '"/runs/a/checkpoints/1.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": '
      'Failed writing: "/runs/a/checkpoints/1.orbax-checkpoint-tmp/d/9dca": Failed to write '
      "5316608 bytes to file 18: No space left on device [os_error_code='28']")
  wrapped = _raised(RuntimeError('the save failed'), _raised(orbax))
  assert errors.disk_full(wrapped)
  assert errors.user_message(wrapped, '/runs/a').startswith(
      'No space left on device for --workdir=/runs/a (writing checkpoints). Free space')
  grouped = ExceptionGroup('writes', [ValueError('x'), OSError(errno.EDQUOT, 'Disk quota exceeded')])
  assert errors.disk_full(grouped)
  elsewhere = OSError(errno.ENOSPC, 'No space left on device', '/data/fashion_mnist/train.npz')
  assert errors.user_message(elsewhere, '/runs/a').startswith(
      'No space left on device for /data/fashion_mnist/train.npz.')
  assert not errors.disk_full(ValueError('RESOURCE_EXHAUSTED: out of memory'))
  assert errors.user_message(ValueError('RESOURCE_EXHAUSTED: out of memory'), '/runs/a') is None


def test_exit_code_is_1_with_one_line_for_bad_input_and_bugs_keep_their_traceback(capsys):
  def fails(error):
    def fn():
      raise error
    return fn

  assert faults.exit_code(fails(errors.ConfigError('config.L=0 is invalid'))) == 1
  assert capsys.readouterr().err == 'error: config.L=0 is invalid\n'
  read_only = OSError(errno.EROFS, 'Read-only file system', '/ro/work/config.json')
  assert faults.exit_code(fails(read_only), workdir='/ro/work') == 1
  assert capsys.readouterr().err == (
      'error: cannot write /ro/work/config.json: Read-only file system. Make it writable, or '
      'point --workdir (or --config.data_dir) elsewhere.\n')
  assert faults.exit_code(fails(data.CorruptCacheError('/d/x.npz: bad; delete it'))) == 1
  assert faults.exit_code(fails(KeyboardInterrupt())) == faults.EXIT_STOPPED_AT_ONCE
  assert 'Stopped at once by a second SIGINT' in capsys.readouterr().err
  with pytest.raises(RuntimeError, match='a bug'):
    faults.exit_code(fails(RuntimeError('a bug')))
  with pytest.raises(ValueError, match='a bug'):  # a ValueError outside validation and planning
    faults.exit_code(fails(ValueError('a bug')))


def test_unwritable_workdir_or_data_dir_is_named(tmp_path, monkeypatch):
  """As root nothing is unwritable: the file system's answers are made up."""
  workdir = tmp_path / 'read_only'
  workdir.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, 'access',
                      lambda path, mode: path != str(workdir) and real_access(path, mode))
  with pytest.raises(errors.WorkdirError,
                     match=f'^--workdir={workdir}/run cannot be written: {workdir} is (on a '
                           'read-only file system|not writable by this user). Choose a writable '
                           r'--workdir \(or make it writable\).$'):
    faults.check_workdir(str(workdir / 'run'), '{}')

  data_dir = tmp_path / 'read_only_data'  # TFDS's first write into it fails
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, 'Read-only file system', str(data_dir / 'downloads'))
  monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path / 'no_files'))
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', read_only)
  with pytest.raises(data.DataUnavailableError,
                     match=f'^cannot prepare fashion_mnist in the data directory {data_dir}: '
                           f'Read-only file system \\({data_dir}/downloads\\). Point the data '
                           r'directory \(config.data_dir or \$PARLE_DATA_DIR\) at a writable'):
    data.load('fashion_mnist', 'train', data_dir)


def test_torn_last_metrics_record_is_dropped_and_a_bad_one_elsewhere_named(tmp_path):
  """A kill or a full disk during a write tears the last line; the resumed run drops it."""
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"round": 1, "a": 1}\n{"round": 2, "a": 2}\n{"round": 3, "a"')
  metric_writer.MetricWriter(str(tmp_path), resume_round=2).close()
  assert [json.loads(line)['round'] for line in path.read_text().splitlines()] == [1, 2]
  path.write_text('{"round": 1}\n{"rou\n{"round": 2}\n')
  with pytest.raises(errors.WorkdirError, match=f'^{path}, line 2, is not a record .*only the '
                                                'last line can be torn. Delete or fix that line'):
    metric_writer.MetricWriter(str(tmp_path), resume_round=2)
  metric_writer.MetricWriter(str(tmp_path), resume_round=0).close()  # from round 0: a new log
  assert path.read_text() == ''


def test_data_cache_is_written_with_the_mode_the_umask_gives(tmp_path):
  """Others sharing a data directory can read the .npz cache (not 0600)."""
  previous = os.umask(0o022)
  try:
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
      os.umask(umask)
      path = tmp_path / f'{umask:o}' / 'train.npz'
      datasets._save_atomically(path, {'label': np.zeros(3, np.int32)})  # pylint: disable=protected-access
      assert stat.S_IMODE(path.stat().st_mode) == mode, oct(path.stat().st_mode)
  finally:
    os.umask(previous)


def test_checkpoints_beyond_max_to_keep_are_pruned_when_opened(tmp_path):
  """A kill between writing a checkpoint and deleting the oldest leaves one too many."""
  saver = checkpoint.Checkpointer(str(tmp_path), max_to_keep=5)
  for round_index in range(1, 5):
    saver.save(round_index, {'w': np.full(3, round_index, np.float32)}, {})
  saver.close()
  assert checkpoint.Checkpointer(str(tmp_path), max_to_keep=None).rounds() == [1, 2, 3, 4]
  assert checkpoint.Checkpointer(str(tmp_path), max_to_keep=3).rounds() == [2, 3, 4]
  assert sorted(os.listdir(tmp_path)) == ['2', '3', '4']


def _config_json(config):
  return config.to_json_best_effort(sort_keys=True)


def test_workdir_of_another_config_is_refused_unless_overwritten(tmp_path):
  workdir = str(tmp_path / 'work')
  first = tiny(fashion_mnist_lenet.get_config(), tmp_path / 'data')
  saved = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  saved.save(4, {'w': np.zeros(3, np.float32)}, {'config': json.loads(_config_json(first))})
  saved.close()
  (tmp_path / 'work' / 'metrics.jsonl').write_text('{"round": 4}\n')

  # Fields that may change on resume (progress bar, length of the run, logging) are fine.
  resumed = tiny(fashion_mnist_lenet.get_config(), tmp_path / 'elsewhere', rounds=9,
                 progress_bar=True, log_every_rounds=3)
  faults.open_workdir(workdir, _config_json(resumed), keep_checkpoints=3).close()

  other = tiny(fashion_mnist_lenet.get_config(), tmp_path / 'data', learning_rate=0.5, L=3)
  with pytest.raises(train.ConfigMismatchError) as error:
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES,
                                policy=tfds.testing.MockPolicy.USE_CODE):
      train.train_and_evaluate(other, workdir)  # refused before any data or training
  message = str(error.value)
  assert f'--workdir={workdir} holds a run of another config (the checkpoint after round 4)' \
      in message
  assert 'L=2 there, 3 now' in message and 'learning_rate=0.1 there, 0.5 now' in message
  assert '--overwrite' in message and 'progress_bar' not in message

  checkpointer = faults.open_workdir(workdir, _config_json(other), keep_checkpoints=3,
                                     overwrite=True)
  assert checkpointer.latest_round() is None
  checkpointer.close()
  assert not (tmp_path / 'work' / 'metrics.jsonl').exists()
  assert json.loads((tmp_path / 'work' / 'config.json').read_text())['L'] == 3

  # Before its first checkpoint a run is known by its config.json.
  with pytest.raises(train.ConfigMismatchError, match=r'\(config.json\): L=3 there, 2 now'):
    faults.open_workdir(workdir, _config_json(first), keep_checkpoints=3)


# --- truncated or wrong data files -------------------------------------------------
def test_truncated_or_wrong_fashion_mnist_file_is_named(tmp_path, monkeypatch):
  source = pathlib.Path(os.environ.get(data.FASHION_MNIST_DIR_ENV,
                                       data.DEFAULT_FASHION_MNIST_DIR))
  if not all((source / f).is_file() for f in data.FASHION_MNIST_FILES.values()):
    pytest.skip(f'no Fashion-MNIST files in {source}')
  files = tmp_path / 'files'
  files.mkdir()
  for name in data.FASHION_MNIST_FILES.values():
    (files / name).write_bytes((source / name).read_bytes())
  monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(files))
  truncated = files / data.FASHION_MNIST_FILES['train_labels']
  truncated.write_bytes(truncated.read_bytes()[:5000])
  with pytest.raises(data.CorruptFileError,
                     match=f'{truncated} is truncated or not the Fashion-MNIST file .*'
                           'apt-get install --reinstall dataset-fashion-mnist'):
    data.load('fashion_mnist', 'train', tmp_path / 'tfds')
  # Test images where the training images should be: right format, wrong header.
  (files / data.FASHION_MNIST_FILES['train_labels']).write_bytes(
      (source / data.FASHION_MNIST_FILES['train_labels']).read_bytes())
  wrong = files / data.FASHION_MNIST_FILES['train_data']
  wrong.write_bytes((source / data.FASHION_MNIST_FILES['test_data']).read_bytes())
  with pytest.raises(data.CorruptFileError,
                     match=rf'{wrong} .*IDX header is \[2051, 10000, 28, 28\], expected '
                           r'\[2051, 60000, 28, 28\]'):
    data.load('fashion_mnist', 'train', tmp_path / 'tfds')


def test_truncated_cache_file_is_named(tmp_path):
  path = data.cache_path('fashion_mnist', 'train', tmp_path)
  path.parent.mkdir(parents=True)
  images = np.zeros((4, 28, 28, 1), np.uint8)
  np.savez(path, image=images, label=np.zeros(4, np.int32))
  path.write_bytes(path.read_bytes()[:200])
  config = fashion_mnist_lenet.get_config()
  config.data_dir = str(tmp_path)
  with pytest.raises(data.CorruptCacheError, match=f'cannot read {path} .*delete {path} to '
                                                   'rebuild it'):
    train.Experiment(config)
  np.savez(path, image=np.zeros((4, 32, 32, 3), np.uint8), label=np.zeros(4, np.int32))
  with pytest.raises(data.CorruptCacheError, match=rf'{path}: image shape \(4, 32, 32, 3\)'):
    train.Experiment(config)
