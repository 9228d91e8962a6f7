"""Argument checks shared by parle_jax: eager ValueErrors that name the argument.

The one set of checks of the library (optimizers, replicas, rounds, data,
models, evaluation): each value is checked where the user gives it.

Each check takes the argument's name as the user wrote it and raises
``ValueError('`name` must be ..., got <value>.')``. Values that cannot be
checked eagerly (schedules, traced arrays under ``jit``) pass.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

AxisName = Union[None, str, Sequence[str]]


def concrete_float(value: Any) -> Optional[float]:
  """`value` as a Python float when it is a concrete number, else None.

  Schedules (callables) and traced arrays (as under `optax.inject_hyperparams`
  inside `jit`) cannot be checked eagerly and give None.
  """
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (str, bytes)):
    raise ValueError(f'expected a number or a schedule, got {value!r}')
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f'expected a number or a schedule, got {value!r}') from None


def nonnegative(name: str, value: Any) -> None:
  number = concrete_float(value)
  if number is not None and not number >= 0:
    raise ValueError(
        f'`{name}` must be >= 0 (a float or a schedule), got {value!r}.')


def fraction(name: str, value: Any) -> None:
  number = concrete_float(value)
  if number is not None and not 0 <= number < 1:
    raise ValueError(f'`{name}` must be in [0, 1), got {value!r}.')


def integer(name: str, value: Any, minimum: int = 1) -> None:
  """An integer (Python or a NumPy/JAX scalar, not a bool) >= `minimum`."""
  if isinstance(value, jax.core.Tracer):
    return
  integral = isinstance(value, numbers.Integral) or (
      hasattr(value, 'dtype') and jnp.issubdtype(value.dtype, jnp.integer)
      and jnp.ndim(value) == 0)
  if isinstance(value, bool) or not integral or int(value) < minimum:
    raise ValueError(f'`{name}` must be an integer >= {minimum}, got {value!r}.')


def choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
  """Returns `value` if it is one of `choices`."""
  if value not in choices:
    raise ValueError(f'`{name}` must be one of {tuple(choices)}, got {value!r}.')
  return value


def images(name: str, value: Any) -> None:
  """uint8 images ``[N, H, W, C]``."""
  if value.dtype != np.uint8 or value.ndim != 4:
    raise ValueError(f'`{name}` must be uint8 [N, H, W, C], got '
                     f'{value.dtype} of shape {tuple(value.shape)}.')


def labels(name: str, value: Any, num_images: int) -> None:
  """One label per image: shape ``[num_images]``."""
  if tuple(np.shape(value)) != (num_images,):
    raise ValueError(f'`{name}` must have shape ({num_images},), one label per '
                     f'image, got {tuple(np.shape(value))}.')


def channel_stats(mean: Any, std: Any, channels: int) -> None:
  """Per-channel statistics of images with `channels` channels."""
  if np.shape(mean) != (channels,) or np.shape(std) != (channels,):
    raise ValueError(f'`mean` and `std` must have shape ({channels},), one value per channel '
                     f'(mean and std of the training images), got {np.shape(mean)} and '
                     f'{np.shape(std)}.')


def axis_name(value: AxisName) -> None:
  if value is None or isinstance(value, str):
    return
  if (isinstance(value, (tuple, list)) and value
      and all(isinstance(a, str) for a in value)):
    return
  raise ValueError(
      '`axis_name` must be None (a single replica), a string or a tuple of '
      f'strings naming the replica axes, got {value!r}.')


def as_schedule(value: Any) -> Callable[[jax.Array], jax.Array]:
  return value if callable(value) else (lambda _: value)


def normalize_axis(axis_name: AxisName) -> AxisName:
  return tuple(axis_name) if isinstance(axis_name, list) else axis_name


