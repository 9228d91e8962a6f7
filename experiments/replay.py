"""Replays the start of a logged run and compares it with its log: the golden-file check.

  python -m experiments.replay --run=experiments/results/default_job/parle_n3_seed0

Trains the run's own ``config.json`` (with the replica mapping and
convolutions its summary records) up to its first logged evaluation, in a
scratch workdir, and compares every logged train loss and error and the first
evaluation's test errors with the log:

* on the CPU kind the run came from (:func:`experiments.provenance.cpu_kind`
  and the package versions of its first segment), digit for digit: a change of
  the code that moves a number by one float rounding fails;
* on another kind, or for a run that did not record its CPU, within
  :data:`TOLERANCES` (what float rounding on another CPU gives this early,
  measured), per-replica values by their mean over the replicas, and it says
  so.

Run it with the environment the run had (``XLA_FLAGS`` decides the device
count): the test in ``tests/test_replay.py`` does. Exit status 0 when the
numbers agree as required, 1 otherwise.

``--rounds=N`` replays only the first N rounds (their logged training values;
an evaluation too if one was logged by then): a cheaper check of a run whose
first evaluation comes late.

``--mapping``, ``--conv`` and ``--device_map`` replay with another setting
than the run's (and another ``XLA_FLAGS`` with another device count): on the
run's own CPU kind this measures what the setting alone changes, printed as
the largest difference per logged quantity.

  XLA_FLAGS=--xla_force_host_platform_device_count=3 \\
    python -m experiments.replay --run=<run> --mapping=vmap
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Optional

from absl import app, flags

from experiments import errors, provenance
from experiments.configs import base
from experiments import workdir as workdir_lib

LOSS_KEYS = ('train/loss',)
ERROR_KEYS = ('train/error', 'reference/test_error', 'ensemble/test_error', 'replica/test_error',
              'reference/train_error')
# On another CPU kind: the largest differences from float rounding at the first logged values
# (measured: logs of a 2-core AMD EPYC replayed on a 2-core Intel Xeon, see docs/results.md).
TOLERANCES = {'loss': 0.05, 'error': 3.0}  # absolute: loss in nats, errors in points


@dataclasses.dataclass
class Comparison:
  """How a replay compared with its log.

  Attributes:
    same_kind: the replay ran on the CPU kind (and packages) of the run's start.
    logged_kind: that kind, or ``'not recorded'``.
    here_kind: the kind of this machine.
    rows: ``(round, key, logged, replayed)`` for every compared value.
    mismatches: the rows that break the rule (bitwise, or the tolerance).
    added_fields: config fields the logged config lacks (added to the code
      later), replayed at their defaults.
    changed: settings replayed other than the run's (``mapping``, ``conv``,
      ``device_map``), as given.
  """

  same_kind: bool
  logged_kind: str
  here_kind: str
  rows: list[tuple[int, str, Any, Any]]
  mismatches: list[tuple[int, str, Any, Any]]
  added_fields: list[str] = dataclasses.field(default_factory=list)
  changed: dict[str, Any] = dataclasses.field(default_factory=dict)

  def largest_differences(self) -> dict[str, float]:
    """Per logged quantity, the largest absolute difference between log and replay."""
    out: dict[str, float] = {}
    for _, key, logged, replayed in self.mismatches:
      if replayed is None:
        continue
      pairs = zip(logged, replayed) if isinstance(logged, list) else [(logged, replayed)]
      out[key] = max([out.get(key, 0.0)] + [abs(a - b) for a, b in pairs])
    return out

  def summary(self) -> str:
    rule = ('bitwise (same CPU kind and packages)' if self.same_kind else
            f"within loss {TOLERANCES['loss']}, errors {TOLERANCES['error']} points, replicas "
            'by their mean (another CPU kind: float rounding differs)')
    verdict = 'agree' if not self.mismatches else f'{len(self.mismatches)} differ'
    if not self.same_kind:
      equal = sum(logged == replayed for _, _, logged, replayed in self.rows)
      verdict += f' ({equal} of {len(self.rows)} bitwise equal)'
    lines = [f'logged on {self.logged_kind}; replayed on {self.here_kind}',
             f'{len(self.rows)} values compared {rule}: {verdict}']
    if self.changed:
      lines.insert(1, 'replayed with ' + ', '.join(f'{k}={v!r}' for k, v in self.changed.items()))
    for key, difference in self.largest_differences().items():
      lines.append(f'  largest difference of {key}: {difference:.6g}')
    if self.added_fields:
      lines.insert(1, 'fields the logged config lacks, replayed at their defaults: ' +
                   ', '.join(self.added_fields))
    for round_index, key, logged, replayed in self.mismatches[:10]:
      lines.append(f'  round {round_index} {key}: logged {logged!r}, replayed {replayed!r}')
    return '\n'.join(lines)


def _records(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def first_evaluation_round(records: list[dict[str, Any]]) -> int:
  """The round of a log's first evaluation."""
  rounds = [r['round'] for r in records if 'reference/test_error' in r]
  if not rounds:
    raise ValueError('the log has no evaluation to replay up to.')
  return min(rounds)


def _values(records, last_round: int) -> dict[tuple[int, str], Any]:
  out = {}
  for record in records:
    if record['round'] > last_round or 'rollback' in record:
      continue
    for key in LOSS_KEYS + ERROR_KEYS:
      if key in record:
        out[(record['round'], key)] = record[key]
  return out


def _within(key: str, logged, replayed) -> bool:
  """Within :data:`TOLERANCES`; per-replica lists by their mean over the replicas.

  A single replica early in a run is chaotic: on a 2-core AMD EPYC with AVX2 one
  replica of a 12-round Parle run logged on an Intel Xeon replayed 5 points off
  after 3 rounds (66.65 against 71.65%), while the replicas' mean moved 0.58.
  """
  tolerance = TOLERANCES['loss'] if key in LOSS_KEYS else TOLERANCES['error']
  if isinstance(logged, list) or isinstance(replayed, list):
    if not (isinstance(logged, list) and isinstance(replayed, list)
            and len(logged) == len(replayed) and logged):
      return False
    logged, replayed = sum(logged) / len(logged), sum(replayed) / len(replayed)
  return abs(logged - replayed) <= tolerance


def compare(logged_records, replayed_records, last_round: int, same_kind: bool):
  """The compared rows and the mismatches (see :class:`Comparison`)."""
  logged, replayed = _values(logged_records, last_round), _values(replayed_records, last_round)
  rows, mismatches = [], []
  for (round_index, key), value in sorted(logged.items()):
    other = replayed.get((round_index, key))
    row = (round_index, key, value, other)
    rows.append(row)
    ok = other is not None and (value == other if same_kind else _within(key, value, other))
    if not ok:
      mismatches.append(row)
  return rows, mismatches


SETTINGS = ('mapping', 'conv', 'device_map')  # what a replay may change (see the module docstring)


def replay(run_dir: str, data_dir: str = '', scratch: Optional[str] = None,
           changed: Optional[dict[str, str]] = None,
           rounds: Optional[int] = None) -> Comparison:
  """Replays `run_dir` (config.json, metrics.jsonl, summary.json) to its first evaluation.

  `changed` replays with other :data:`SETTINGS` than the run's; `rounds`
  replays only the first `rounds` rounds, comparing what was logged by then.

  Raises:
    ValueError: for a setting a replay cannot change; errors.ConfigError (a
      ValueError) for `rounds` before the log's first record or past the run's.
  """
  changed = dict(changed or {})
  unknown = sorted(set(changed) - set(SETTINGS))
  if unknown:
    raise ValueError(f'a replay can change {list(SETTINGS)}, not {unknown}.')
  from experiments import train  # pylint: disable=g-import-not-at-top  (starts JAX)

  with open(os.path.join(run_dir, workdir_lib.CONFIG)) as f:
    config, added = with_defaults(json.load(f))
  with open(os.path.join(run_dir, 'summary.json')) as f:
    summary = json.load(f)
  logged = _records(os.path.join(run_dir, workdir_lib.METRICS))
  last_round = first_evaluation_round(logged)
  if rounds is not None:
    first_logged = min(r['round'] for r in logged)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < first_logged:
      raise errors.ConfigError(f'--rounds={rounds!r} replays nothing that was logged: the log of '
                               f'{run_dir} starts at round {first_logged}; give --rounds >= '
                               f'{first_logged}.')
    last_round = rounds
  config.compare_to_sgd, config.progress_bar = False, False
  if data_dir:
    config.data_dir = data_dir
  started = {'mapping': summary['mapping'], 'conv': summary['conv']}
  for field, value in changed.items():
    if field in started:
      started[field] = value
    config[field] = value
  config.lock()
  with tempfile.TemporaryDirectory(dir=scratch) as workdir:
    train.train_and_evaluate(config, workdir, stop_after_round=last_round, started=started)
    replayed = _records(workdir_lib.path(workdir, workdir_lib.METRICS))
    here = provenance.read(workdir)[0]
  segments = summary.get('provenance') or []
  here_kind = provenance.cpu_kind(here)
  if segments:
    logged_kind = provenance.cpu_kind(segments[0])
    same_kind = logged_kind == here_kind and segments[0]['versions'] == here['versions']
  else:
    logged_kind, same_kind = 'not recorded', False
  rows, mismatches = compare(logged, replayed, last_round, same_kind)
  return Comparison(same_kind, logged_kind, here_kind, rows, mismatches, added, changed)


with_defaults = base.with_defaults  # kept here for the callers of replay.with_defaults


_RUN = flags.DEFINE_string('run', None, 'A logged run: a directory under experiments/results.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'config.data_dir for the replay.')
_MAPPING = flags.DEFINE_enum('mapping', None, ['vmap', 'sequential'],
                             "Replay with this replica mapping instead of the run's.")
_CONV = flags.DEFINE_enum('conv', None, ['xla', 'matmul'],
                          "Replay with these convolutions instead of the run's.")
_DEVICE_MAP = flags.DEFINE_enum('device_map', None, ['pmap', 'shard_map'],
                                "Replay with this device axis instead of the run's.")
_ROUNDS = flags.DEFINE_integer('rounds', None, 'Replay only the first ROUNDS rounds (default: up '
                               'to the first logged evaluation).', lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _RUN.value:
    raise app.UsageError('--run is required.')
  from experiments import metric_writer, train  # pylint: disable=g-import-not-at-top
  train.quiet_orbax_logs()
  metric_writer.tensorboard_without_tensorflow()
  changed = {field: flag.value for field, flag in
             (('mapping', _MAPPING), ('conv', _CONV), ('device_map', _DEVICE_MAP))
             if flag.value is not None}
  from experiments import faults  # pylint: disable=g-import-not-at-top
  replayed = []
  status = faults.exit_code(lambda: replayed.append(
      replay(_RUN.value, _DATA_DIR.value, changed=changed, rounds=_ROUNDS.value)))
  if status:
    return status  # bad input: one line
  print(replayed[0].summary())
  return 1 if replayed[0].mismatches else 0


if __name__ == '__main__':
  app.run(main)
