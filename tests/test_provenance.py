"""What a run records of its code and machine (experiments.provenance)."""

import json
import subprocess

import pytest

from experiments import provenance


def _git(root, *args):
  subprocess.run(['git', '-C', str(root), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
  root = tmp_path / 'repo'
  for name in ('parle_jax/optim.py', 'experiments/train.py', 'experiments/results/r/summary.json',
               'README.md'):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(f'# {name}\n')
  _git(root, 'init', '-q')
  _git(root, 'add', '-A')
  _git(root, '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'first')
  return root


def test_git_state_names_the_commit_and_code_changes(checkout, tmp_path):
  state = provenance.git_state(str(checkout))
  head = subprocess.run(['git', '-C', str(checkout), 'rev-parse', 'HEAD'], capture_output=True,
                        text=True, check=True).stdout.strip()
  assert state == {'commit': head, 'code_changed': False}
  # Logged results and docs are not code: still unchanged.
  (checkout / 'experiments/results/r/summary.json').write_text('{}\n')
  (checkout / 'README.md').write_text('edited\n')
  assert provenance.git_state(str(checkout))['code_changed'] is False
  (checkout / 'parle_jax/optim.py').write_text('# changed\n')
  changed = provenance.git_state(str(checkout))
  assert changed['code_changed'] is True and len(changed['code_diff']) == 12
  (checkout / 'experiments/new.py').write_text('x = 1\n')  # an untracked module counts too
  with_new = provenance.git_state(str(checkout))
  assert with_new['code_diff'] != changed['code_diff']
  (checkout / 'experiments/new.py').write_text('x = 2\n')
  assert provenance.git_state(str(checkout))['code_diff'] != with_new['code_diff']
  plain = tmp_path / 'plain'
  plain.mkdir()
  assert provenance.git_state(str(plain)) == {'commit': 'not a git checkout'}
  # A directory inside another checkout is not that checkout's root: not guessed either.
  assert provenance.git_state(str(checkout / 'parle_jax')) == {'commit': 'not a git checkout'}


def test_cpu_reads_the_model_and_vector_extensions(tmp_path):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nmodel name\t: AMD EPYC 7B13\n'
                     'flags\t\t: fpu sse sse2 ssse3 sse4_1 avx avx2 fma bmi2\n\n'
                     'processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n')
  info = provenance.cpu(str(cpuinfo))
  assert info['model'] == 'AMD EPYC 7B13'
  assert info['vector_extensions'] == ['avx', 'avx2', 'fma', 'sse', 'sse2', 'sse4_1', 'ssse3']
  assert info['usable_cores'] >= 1
  record = {'cpu': info, 'xla_flags': '--xla_cpu_max_isa=AVX2'}
  assert provenance.cpu_kind(record) == (
      'AMD EPYC 7B13 (avx avx2; %d cores), XLA_FLAGS=--xla_cpu_max_isa=AVX2' % info['usable_cores'])
  assert provenance.short_cpu(record) == f"AMD EPYC 7B13, AVX2, {info['usable_cores']} cores"


def test_segments_are_appended_and_described(tmp_path):
  first = provenance.append(str(tmp_path), start_round=0)
  provenance.append(str(tmp_path), start_round=8)
  segments = provenance.read(str(tmp_path))
  assert [s['start_round'] for s in segments] == [0, 8]
  assert set(first['versions']) == {'jax', 'jaxlib', 'flax', 'optax', 'numpy'}
  assert json.loads(json.dumps(first)) == segments[0]
  assert provenance.read(str(tmp_path / 'none')) == []
  fake = dict(first, commit='a' * 40, code_changed=False,
              cpu={'model': 'M', 'vector_extensions': ['avx2'], 'usable_cores': 2})
  moved = dict(fake, cpu={'model': 'N', 'vector_extensions': ['avx512f'], 'usable_cores': 4})
  line = provenance.describe_runs([[fake], [fake], [fake, moved], []])
  jax_version = first['versions']['jax']
  assert line == (f'aaaaaaa on M, AVX2, 2 cores, jax {jax_version} (2 runs); '
                  f'aaaaaaa on M, AVX2, 2 cores, jax {jax_version} then aaaaaaa on N, AVX-512, '
                  f'4 cores, jax {jax_version} (1 run); commit and CPU not recorded (1 run)')
