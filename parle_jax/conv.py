"""Convolutions as matrix products, for backends whose own convolutions are slow.

XLA:CPU runs a convolution's weight and input gradients far below its matmul
speed, and runs convolutions inside a ``lax.scan`` (a while loop) several times
slower than outside one. Written as one matrix product over image patches
("im2col"), a convolution and both its gradients (which autodiff derives from
the slices and the product) are matmuls plus copies, and the fused round keeps
its speed under ``lax.scan``. On GPUs and TPUs the backend's convolutions are
faster; ``'auto'`` picks by backend.

The two ops with hand-written derivatives, the patch gather and the product,
are ``jax.custom_jvp`` functions (not ``custom_vjp``), so every JAX transform
works through them: ``jax.grad``, and also ``jax.jvp``, ``jax.linearize``,
``jax.hessian`` and Hessian-vector products (``jax.jvp`` of ``jax.grad``).
Their tangents are linear maps chosen so that JAX's transpose of them, the
reverse-mode gradient, is the fast one: the windows' pad-and-add instead of
the gather's scatter, and the weight gradient as ``(dy^T @ patches)^T``
(measured: docs/measurements.md).

:func:`matmul_conv_general_dilated` has the signature of
``lax.conv_general_dilated`` and plugs into Flax's ``nn.Conv`` through its
``conv_general_dilated`` field; it handles what the models here use: NHWC
inputs, HWIO kernels, any strides and padding, no dilation, no feature groups.
Anything else is refused with a ValueError, never computed another way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from parle_jax import checks

CONV_IMPLEMENTATIONS = ('auto', 'xla', 'matmul')
# The backends on which 'auto' picks 'matmul' (measured: docs/measurements.md).
MATMUL_BACKENDS = ('cpu',)
_NHWC = ('NHWC', 'HWIO', 'NHWC')

Padding = Union[str, Sequence[tuple[int, int]]]


def resolve_conv(conv: str, backend: Optional[str] = None) -> str:
  """``'xla'`` or ``'matmul'``: `conv`, with ``'auto'`` decided by the backend.

  Args:
    conv: one of :data:`CONV_IMPLEMENTATIONS`.
    backend: platform name (``'cpu'``, ``'gpu'``, ``'tpu'``); default
      ``jax.default_backend()``.
  """
  if checks.choice('conv', conv, CONV_IMPLEMENTATIONS) != 'auto':
    return conv
  backend = jax.default_backend() if backend is None else backend
  return 'matmul' if backend in MATMUL_BACKENDS else 'xla'


def conv_general_dilated_fn(conv: str) -> Callable[..., jax.Array]:
  """The ``lax.conv_general_dilated``-like function for ``nn.Conv``, after :func:`resolve_conv`."""
  return matmul_conv_general_dilated if resolve_conv(conv) == 'matmul' else lax.conv_general_dilated


def _is_nhwc(lhs_shape, rhs_shape, dimension_numbers) -> bool:
  if dimension_numbers is None:  # lax's default is NCHW / OIHW
    return False
  given = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  return given == lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)


def _pairs(padding: Padding, in_shape, window, strides) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_shape, window, strides, padding))
  pairs = tuple(tuple(int(p) for p in pair) for pair in padding)
  if len(pairs) != len(window) or any(len(p) != 2 for p in pairs):
    raise ValueError(f'padding must be a string or {len(window)} (low, high) pairs, '
                     f'got {padding!r}.')
  return pairs


def _windows(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int],
             out_hw: tuple[int, int]) -> jax.Array:
  """Patches ``[B, Ho, Wo, kh * kw * C]`` as strided slices concatenated on channels."""
  (kh, kw), (sh, sw), (out_h, out_w) = kernel, strides, out_hw
  windows = [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
             for i in range(kh) for j in range(kw)]
  return windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)


def _patch_indices(shape, kernel, strides, out_hw) -> np.ndarray:
  """Flat indices into one ``[H, W, C]`` image of its patches, in :func:`_windows`' order."""
  _, height, width, channels = shape
  (kh, kw), (sh, sw), (out_h, out_w) = kernel, strides, out_hw
  rows = sh * np.arange(out_h)[:, None, None, None, None] + np.arange(kh)[None, None, :, None, None]
  cols = sw * np.arange(out_w)[None, :, None, None, None] + np.arange(kw)[None, None, None, :, None]
  flat = (rows * width + cols) * channels + np.arange(channels)
  return flat.reshape(-1).astype(np.int32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _patches(x, kernel, strides, out_hw):
  """:func:`_windows`, gathered in one op (XLA:CPU's many-operand concatenate is slow).

  A ``jax.custom_jvp``: the value is the gather, the tangent is
  :func:`_windows` of the input's tangent (the same linear map as the
  gather, written as strided slices and a concatenate). Reverse mode
  transposes that tangent, so the gradient is the slices' transpose (pad each
  window's cotangent back and add), never the gather's (a scatter, slow on
  XLA:CPU). Forward mode (``jax.jvp``, ``jax.linearize``, ``jax.hessian``)
  works, its tangent paying the concatenate.
  """
  indices = _patch_indices(x.shape, kernel, strides, out_hw)
  batch = x.shape[0]
  return jnp.take(x.reshape(batch, -1), indices, axis=1).reshape(
      (batch,) + tuple(out_hw) + (-1,))


@_patches.defjvp
def _patches_jvp(kernel, strides, out_hw, primals, tangents):
  (x,), (dx,) = primals, tangents
  return _patches(x, kernel, strides, out_hw), _windows(dx, kernel, strides, out_hw)


def _dot(a, b, precision, preferred_element_type):
  return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _product(patches, kernel, precision, preferred_element_type):
  """``patches [N, K] @ kernel [K, D]``; its tangent transposes to the fast weight gradient.

  A ``jax.custom_jvp`` (so forward mode works) whose tangent is
  ``dpatches @ kernel + (dkernel^T . patches^T)^T``, each term computed only
  when its tangent is not a symbolic zero. The second term is written so that
  JAX's transpose of it, the weight gradient, is ``(dy^T @ patches)^T``:
  autodiff of a plain ``patches @ dkernel`` would give ``patches^T @ dy``,
  which contracts the long axis N of both operands and which XLA:CPU runs in
  a slower kernel. The first term is written against ``kernel^T`` so that its
  transpose, the input gradient, is ``dy @ kernel^T``: the reverse mode runs
  the same products as the former ``custom_vjp`` rule. Both gradients are
  cast back to their operand's dtype (by JAX's transpose of ``dot_general``,
  as under ``preferred_element_type``).
  """
  return _dot(patches, kernel, precision, preferred_element_type)


@functools.partial(_product.defjvp, symbolic_zeros=True)
def _product_jvp(precision, preferred_element_type, primals, tangents):
  patches, kernel = primals
  d_patches, d_kernel = tangents
  out = _product(patches, kernel, precision, preferred_element_type)
  terms = []
  # Each term is a dot_general whose transpose for its tangent is one of the former
  # custom_vjp's products, so the compiled gradient is op for op the same.
  if not isinstance(d_patches, SymbolicZero):
    # d_patches [N, K] . kernel^T [D, K], contracting K; transposed: dy @ kernel^T [N, K].
    terms.append(lax.dot_general(d_patches, kernel.T, (((1,), (1,)), ((), ())),
                                 precision=precision,
                                 preferred_element_type=preferred_element_type))
  if not isinstance(d_kernel, SymbolicZero):
    # (d_kernel [K, D] . patches [N, K], contracting K)^T; transposed: (dy^T @ patches)^T
    # [K, D], the orientation XLA:CPU runs fast.
    terms.append(lax.dot_general(d_kernel, patches, (((0,), (1,)), ((), ())),
                                 precision=precision,
                                 preferred_element_type=preferred_element_type).T)
  if not terms:  # JAX calls the rule only with a tangent, kept for safety
    return out, jnp.zeros_like(out)
  d_out = terms[0] if len(terms) == 1 else terms[0] + terms[1]
  return out, d_out.astype(out.dtype)


def matmul_conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Padding,
    lhs_dilation: Optional[Sequence[int]] = None,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers: Any = None, feature_group_count: int = 1,
    batch_group_count: int = 1, precision: Any = None,
    preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` for NHWC/HWIO as one matmul over image patches.

  The padded input's ``kh * kw`` strided windows are concatenated on the
  channel axis (patches ``[B, Ho, Wo, kh * kw * C]``) and multiplied by the
  kernel reshaped to ``[kh * kw * C, D]``; a 1x1 kernel is a strided slice and
  a product. The patches are gathered in one op, not concatenated (XLA:CPU's
  concatenate of many operands is slow).

  Differentiable in both modes, to any order: the gather and the product are
  ``jax.custom_jvp`` functions whose tangents (the windows of the input's
  tangent; ``dpatches @ kernel`` plus the kernel tangent's term, each only
  for a tangent that is not a symbolic zero) JAX transposes into the reverse
  mode's gradients: the weight gradient ``(dy^T @ patches)^T`` and the input
  gradient ``dy @ kernel^T`` added back window by window (the transpose of
  the slices), so both are matmuls and no scatter runs. Equal to
  ``lax.conv_general_dilated``, with its derivatives, up to float rounding
  (the sums run in another order).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax import lax
    >>> from parle_jax.conv import matmul_conv_general_dilated
    >>> x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    >>> y = matmul_conv_general_dilated(x, k, (1, 1), 'SAME',
    ...                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    >>> y.shape, float(y[0, 0, 0, 0]), float(y[0, 4, 4, 0])  # corner: 2x2 window x 3 ch
    ((2, 8, 8, 4), 12.0, 27.0)

  Args:
    lhs: input ``[B, H, W, C]``.
    rhs: kernel ``[kh, kw, C, D]``.
    window_strides: ``(sh, sw)``.
    padding: ``'VALID'``, ``'SAME'`` or ``((top, bottom), (left, right))``.
    lhs_dilation: None or all ones (no transposed convolutions).
    rhs_dilation: None or all ones (no atrous convolutions).
    dimension_numbers: must describe NHWC / HWIO / NHWC.
    feature_group_count: must be 1.
    batch_group_count: must be 1.
    precision: passed to the matrix product.
    preferred_element_type: passed to the matrix product.

  Returns:
    ``[B, Ho, Wo, D]``.

  Raises:
    ValueError: for layouts, dilations or groups other than the above.
  """
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  if lhs.ndim != 4 or rhs.ndim != 4:
    raise ValueError(f'matmul convolutions are 2-D: lhs [B, H, W, C] and rhs [kh, kw, C, D], '
                     f'got shapes {lhs.shape} and {rhs.shape}.')
  if not _is_nhwc(lhs.shape, rhs.shape, dimension_numbers):
    raise ValueError(f"matmul convolutions need dimension_numbers={_NHWC}, got "
                     f'{dimension_numbers!r}; use conv=\'xla\' for other layouts.')
  for name, dilation in (('lhs_dilation', lhs_dilation), ('rhs_dilation', rhs_dilation)):
    if dilation is not None and any(int(d) != 1 for d in dilation):
      raise ValueError(f"matmul convolutions have no dilation, got {name}={dilation!r}; "
                       "use conv='xla'.")
  if feature_group_count != 1 or batch_group_count != 1:
    raise ValueError('matmul convolutions have no groups, got feature_group_count='
                     f"{feature_group_count}, batch_group_count={batch_group_count}; "
                     "use conv='xla'.")
  batch, height, width, channels = lhs.shape
  kh, kw, kernel_channels, features = rhs.shape
  if kernel_channels != channels:
    raise ValueError(f'the kernel expects {kernel_channels} input channels, the input has '
                     f'{channels} (shapes {lhs.shape} and {rhs.shape}).')
  sh, sw = (int(s) for s in window_strides)
  (top, bottom), (left, right) = _pairs(padding, (height, width), (kh, kw), (sh, sw))
  x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h = (height + top + bottom - kh) // sh + 1
  out_w = (width + left + right - kw) // sw + 1
  if out_h < 1 or out_w < 1:
    raise ValueError(f'a {kh}x{kw} kernel does not fit the padded {x.shape[1]}x{x.shape[2]} '
                     'input.')
  window = ((kh, kw), (sh, sw), (out_h, out_w))
  patches = _windows(x, *window) if kh * kw == 1 else _patches(x, *window)
  out = _product(patches.reshape(-1, kh * kw * channels), rhs.reshape(kh * kw * channels, features),
                 precision, preferred_element_type)
  return out.reshape(batch, out_h, out_w, features)
