"""The ``>>>`` examples in the library's docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import parle_jax

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(parle_jax.__path__, prefix='parle_jax.'))


def test_every_module_is_listed():
  assert {'parle_jax.optim', 'parle_jax.conv', 'parle_jax.replicas', 'parle_jax.models'} <= set(
      MODULES)


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f'{result.failed} of {result.attempted} examples failed in {name}'
