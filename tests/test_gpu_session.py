"""experiments/gpu_session.sh: valid bash, and every suite run it asks for exists."""

import pathlib
import re
import subprocess

from experiments import suite

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / 'experiments' / 'gpu_session.sh'


def test_script_parses():
  subprocess.run(['bash', '-n', str(SCRIPT)], check=True)


def test_every_requested_run_exists_in_its_suite():
  text = SCRIPT.read_text()
  requests = re.findall(r'--suite=(\w+) --only=([\w,]+)', text)
  assert len(requests) == 2  # the real session and the smoke test
  for name, only in requests:
    runs = [run for run, _ in suite.SUITES[name]([0])]
    for prefix in only.split(','):
      assert any(run.startswith(prefix) for run in runs), (name, prefix, runs)


def test_gpu_suite_trains_lenet_at_the_papers_budget():
  runs = dict(suite.SUITES['fashion_mnist_lenet_paper']([0]))
  assert runs['parle_n3_seed0'].epochs == 5 and runs['parle_n3_seed0'].num_replicas == 3
  assert runs['sgd_n1_seed0'].epochs == 125
