"""Which code and which CPU made a run: recorded at the start of every segment.

XLA:CPU's float rounding depends on the CPU (its vector extensions) and on
the number of cores the process may use, and training amplifies it; the
code's own changes do the same. So every start or resume of a run appends one
record to ``<workdir>/provenance.jsonl`` (:func:`append`), and a suite copies
the list into the run's ``summary.json``. :func:`cpu_kind` names the CPU kind
that a logged run must be compared on to match it digit for digit.

  >>> record = current(start_round=0)
  >>> sorted(record['versions'])
  ['flax', 'jax', 'jaxlib', 'numpy', 'optax']
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import time
from typing import Any, Optional, Sequence

from experiments import workdir as workdir_lib

NOT_A_CHECKOUT = 'not a git checkout'
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy')
CODE_PATHS = ('parle_jax', 'experiments', ':(exclude)experiments/results')
_VECTOR_PREFIXES = ('sse', 'ssse', 'avx', 'fma', 'amx', 'f16c')
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str, root: str) -> Optional[str]:
  try:
    out = subprocess.run(('git', '-C', root) + args, capture_output=True, check=True,
                         timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.decode('utf-8', 'replace')


def git_state(root: str = _REPOSITORY) -> dict[str, Any]:
  """The commit of `root` and whether its code had uncommitted changes.

  Returns ``{'commit': NOT_A_CHECKOUT}`` outside a git work tree; otherwise
  ``commit`` (40 hex digits), ``code_changed`` (tracked or untracked changes
  under ``parle_jax/`` or ``experiments/``, logged results excluded) and, when
  changed, ``code_diff`` (the first 12 hex digits of a SHA-256 of that diff and
  of the untracked files' names and bytes).
  """
  inside = _git('rev-parse', '--is-inside-work-tree', root=root)
  top = _git('rev-parse', '--show-toplevel', root=root)
  if inside is None or inside.strip() != 'true' or top is None or (
      os.path.realpath(top.strip()) != os.path.realpath(root)):
    return {'commit': NOT_A_CHECKOUT}
  commit = (_git('rev-parse', 'HEAD', root=root) or '').strip() or 'no commit yet'
  diff = _git('diff', 'HEAD', '--', *CODE_PATHS, root=root) or ''
  untracked = (_git('ls-files', '--others', '--exclude-standard', '--', *CODE_PATHS,
                    root=root) or '').split()
  digest = hashlib.sha256(diff.encode())
  for name in sorted(untracked):
    digest.update(name.encode())
    try:
      with open(os.path.join(root, name), 'rb') as f:
        digest.update(f.read())
    except OSError:
      pass
  state = {'commit': commit, 'code_changed': bool(diff or untracked)}
  if state['code_changed']:
    state['code_diff'] = digest.hexdigest()[:12]
  return state


def cpu(cpuinfo: str = '/proc/cpuinfo') -> dict[str, Any]:
  """The CPU model, its vector extensions and the cores this process may use."""
  model, flags = platform.processor() or platform.machine(), []
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(':')
        key = key.strip()
        if key in ('model name', 'Processor', 'cpu model') and model in (
            platform.processor(), platform.machine(), ''):
          model = value.strip()
        elif key in ('flags', 'Features') and not flags:
          flags = value.split()
  except OSError:
    pass
  vector = sorted(f for f in flags if f.startswith(_VECTOR_PREFIXES))
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    usable = os.cpu_count()
  return {'model': model, 'vector_extensions': vector, 'usable_cores': usable,
          'cpu_count': os.cpu_count()}


def versions() -> dict[str, str]:
  """The installed versions of :data:`PACKAGES`."""
  out = {}
  for package in PACKAGES:
    try:
      out[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      out[package] = 'not installed'
  return out


# The code this process runs is the tree when it started (its modules are loaded then), not
# what the tree holds when a later run of a suite starts: read once, at import.
_GIT_STATE_AT_START = git_state()


def current(start_round: int) -> dict[str, Any]:
  """This process's provenance, for a segment that starts after `start_round` rounds."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return dict(_GIT_STATE_AT_START, start_round=start_round, time=time.time(), versions=versions(),
              xla_flags=os.environ.get('XLA_FLAGS', ''), cpu=cpu(),
              platform=device.platform, device_kind=device.device_kind,
              device_count=jax.device_count(), process_count=jax.process_count(),
              hostname=socket.gethostname())


def append(workdir: str, start_round: int) -> dict[str, Any]:
  """Appends this segment's provenance to ``<workdir>/provenance.jsonl``; returns it."""
  record = current(start_round)
  with open(workdir_lib.path(workdir, workdir_lib.PROVENANCE), 'a') as f:
    f.write(json.dumps(record, sort_keys=True) + '\n')
  return record


def read(workdir: str) -> list[dict[str, Any]]:
  """The segments recorded in `workdir` (none for a run from before provenance)."""
  path = workdir_lib.path(workdir, workdir_lib.PROVENANCE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def cpu_kind(record: dict[str, Any]) -> str:
  """What must be equal for bitwise-equal numbers on a CPU: model, extensions, cores, flags.

  (Plus the code, which the commit covers, and the package versions.)
  """
  info = record['cpu']
  avx = [f for f in info['vector_extensions'] if f.startswith(('avx', 'amx'))]
  kind = f"{info['model']} ({' '.join(avx) or 'no AVX'}; {info['usable_cores']} cores)"
  if record.get('xla_flags'):
    kind += f", XLA_FLAGS={record['xla_flags']}"
  return kind


def short_cpu(record: dict[str, Any]) -> str:
  """The CPU kind in a few words: model, widest AVX, usable cores."""
  info = record['cpu']
  widest = ('AVX-512' if any(f.startswith('avx512') for f in info['vector_extensions']) else
            'AVX2' if 'avx2' in info['vector_extensions'] else 'no AVX2')
  return f"{info['model']}, {widest}, {info['usable_cores']} cores"


def short_commit(record: dict[str, Any]) -> str:
  """A segment's code in a few characters: the short commit, ``+changes <diff hash>`` if edited."""
  commit = record['commit'] if record['commit'] == NOT_A_CHECKOUT else record['commit'][:7]
  if record.get('code_changed'):
    commit += f"+changes {record['code_diff']}"
  return commit


def describe_runs(segments_per_run: Sequence[Sequence[dict[str, Any]]]) -> str:
  """One line: the commits and CPUs that a table's runs came from, with counts."""
  counts: dict[str, int] = {}
  for segments in segments_per_run:
    if not segments:
      key = 'commit and CPU not recorded'
    else:
      parts = []
      for s in segments:
        parts.append(f'{short_commit(s)} on {short_cpu(s)}, jax {s["versions"]["jax"]}')
      key = ' then '.join(dict.fromkeys(parts))
    counts[key] = counts.get(key, 0) + 1
  return '; '.join(f'{key} ({n} run{"s" * (n > 1)})' for key, n in sorted(counts.items()))
