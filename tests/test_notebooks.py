"""The notebooks in notebooks/: each runs top to bottom, and none is stored with outputs.

Every notebook is executed headless (nbclient, a fresh ipykernel) with
``PARLE_NOTEBOOK_SMALL=1``, so that it uses its tiny settings, and fails the
test on any cell error, its final check included. The kernel sees one CPU
device, as a Colab CPU runtime does, not the 8 fake devices of conftest.
Notebooks that read ``PARLE_DATA_DIR`` get the Fashion-MNIST prepared by the
``fashion_mnist_data_dir`` fixture.
"""

import pathlib
import time

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob('*.ipynb'))
# Seconds one notebook may take in the small setting, kernel start included.
DEFAULT_TIMEOUT = 300
TIMEOUTS = {'quickstart_nnx.ipynb': 120}  # about 25 s on 2 busy cores


def _ids(paths):
  return [path.name for path in paths]


def _run(notebook, timeout):
  """Executes `notebook` in place, raising on the first cell error or at `timeout` s."""
  client = nbclient.NotebookClient(
      notebook, kernel_name='python3',
      resources={'metadata': {'path': str(NOTEBOOK_DIR)}})
  deadline = time.monotonic() + timeout
  with client.setup_kernel():
    for index, cell in enumerate(notebook.cells):
      # nbclient's timeout is per cell: what is left of the notebook's budget.
      client.timeout = max(1, int(deadline - time.monotonic()))
      client.execute_cell(cell, index)


def test_notebooks_found():
  assert {'quickstart.ipynb', 'quickstart_nnx.ipynb', 'flat_minima.ipynb'} <= set(_ids(NOTEBOOKS))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, request, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  monkeypatch.setenv('PARLE_NOTEBOOK_SMALL', '1')
  # One CPU device, as on a Colab CPU runtime; the kernel inherits this environment.
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  if 'PARLE_DATA_DIR' in path.read_text(encoding='utf-8'):
    monkeypatch.setenv('PARLE_DATA_DIR', str(request.getfixturevalue('fashion_mnist_data_dir')))
  timeout = TIMEOUTS.get(path.name, DEFAULT_TIMEOUT)
  start = time.monotonic()
  try:
    _run(notebook, timeout)
  except nbclient.exceptions.CellTimeoutError:
    pytest.fail(f'{path.name} did not finish within {timeout} s (PARLE_NOTEBOOK_SMALL=1)')
  print(f'{path.name}: {time.monotonic() - start:.1f} s')


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  nbformat.validate(notebook)
  dirty = [index for index, cell in enumerate(notebook.cells) if cell.cell_type == 'code'
           and (cell.get('outputs') or cell.get('execution_count') is not None)]
  assert not dirty, (
      f'{path.name}: code cells {dirty} have outputs or execution counts; clear them '
      f'before committing (e.g. jupyter nbconvert --clear-output --inplace {path.name})')
