"""Low-precision syncs: how a sync's reduction travels on the wire.

A periodic transform's sync sums (or averages) one value per worker: the
params, their differences to the center, or DiLoCo's pseudo-gradient. Its
``comm_dtype`` chooses the format on the wire:

* ``None``: the value's own dtype (float32 for centers), one all-reduce;
* a float type of 16 bits (``jnp.bfloat16``, ``jnp.float16``): cast, one
  all-reduce, cast back (XLA's CPU backend widens bfloat16 all-reduces to
  float32; accelerators move 2 bytes);
* ``jnp.int8`` or a float8 type: a quantized ring (:func:`ring_sum`).

The quantized ring, per worker, with N workers and the value flattened to P
numbers cut into N chunks:

1. cut every chunk into blocks of ``BLOCK`` numbers, scale each block by its
   absolute maximum (one float32 scale per block) and round to the nearest
   8-bit value;
2. ``all_to_all``: worker k receives chunk k of every worker, dequantizes and
   sums them in float32, in worker order;
3. quantizes its summed chunk the same way, and ``all_gather`` gives every
   worker every summed chunk, which it dequantizes.

Each worker sends about ``2 (N - 1) / N * P`` bytes plus the scales (4 bytes
per ``BLOCK`` numbers), a quarter of a float32 ring all-reduce, and every
worker ends with the same bits. What the roundings drop (from a worker's own
contribution, and from the summed chunk it owns) is returned, for error
feedback.
"""

import math
from typing import Any
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from optax_dist import _collectives

BLOCK = 256  # Numbers per absmax scale.

_EIGHT_BIT_FLOATS = ("float8_e4m3fn", "float8_e5m2")


class Wire(NamedTuple):
  """How a sync's reduction travels: the dtype on the wire, and error feedback.

  Attributes:
    dtype: ``None`` (the value's own dtype), a 16-bit float, ``int8`` or a
      float8 type.
    error_feedback: Whether each worker adds what quantization dropped from
      its last contribution to its next one.
  """

  dtype: Any = None
  error_feedback: bool = False

  @property
  def quantized(self) -> bool:
    return self.dtype is not None and jnp.dtype(self.dtype).itemsize == 1

  def residual_like(self, center: Any) -> Any:
    """The error-feedback buffer of a fresh state (an empty field without feedback)."""
    if not self.error_feedback:
      return optax.EmptyState()
    return jax.tree.map(
      lambda c: c if isinstance(c, jax.ShapeDtypeStruct) else jnp.zeros_like(c), center
    )


def make_wire(comm_dtype: Any, error_feedback: Any) -> Wire:
  """Validates ``comm_dtype`` and ``error_feedback`` (static arguments)."""
  if not isinstance(error_feedback, bool):
    raise TypeError(f"`error_feedback` must be a Python bool, got {error_feedback!r}.")
  if comm_dtype is None:
    if error_feedback:
      raise ValueError(
        "`error_feedback=True` needs a quantized `comm_dtype` (jnp.int8 or a float8 type): "
        "only quantization drops anything to feed back."
      )
    return Wire()
  try:
    dtype = jnp.dtype(comm_dtype)
  except TypeError as e:
    raise ValueError(f"`comm_dtype` must be a dtype, got {comm_dtype!r}.") from e
  if jnp.issubdtype(dtype, jnp.integer):
    if dtype != jnp.int8:
      raise ValueError(
        f"`comm_dtype` {dtype} is not supported: the only integer format is jnp.int8 "
        "(blockwise absmax scales, a quantized ring)."
      )
  elif not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"`comm_dtype` must be a floating dtype (e.g. jnp.bfloat16) or jnp.int8, got {dtype}."
    )
  elif dtype.itemsize == 1 and dtype.name not in _EIGHT_BIT_FLOATS:
    raise ValueError(
      f"`comm_dtype` {dtype} is not supported; the 8-bit floats are {_EIGHT_BIT_FLOATS}."
    )
  wire = Wire(dtype, error_feedback)
  if error_feedback and not wire.quantized:
    raise ValueError(
      f"`error_feedback=True` needs a quantized `comm_dtype` (jnp.int8 or a float8 type), "
      f"got {dtype}: a {dtype.itemsize * 8}-bit float drops too little to feed back."
    )
  return wire


def psum(tree: Any, axes: tuple, wire: Wire, residual: Any = None) -> tuple[Any, Any]:
  """The workers' sum of ``tree`` as ``wire`` carries it, and the new residual.

  ``residual`` (error feedback) is added to this worker's contribution first;
  the returned residual is what the quantization dropped that this worker
  sends again next time (the ``residual`` given, unchanged, when there is no
  feedback).
  """
  if wire.dtype is None:
    return _collectives.psum(tree, axes), residual
  if not wire.quantized:
    narrow = jax.tree.map(lambda x: x.astype(wire.dtype), tree)
    total = _collectives.psum(narrow, axes)
    return jax.tree.map(lambda t, x: t.astype(x.dtype), total, tree), residual
  if wire.error_feedback:
    tree = jax.tree.map(lambda x, e: x + e, tree, residual)
  total, dropped = ring_sum(tree, axes, wire.dtype)
  return total, dropped if wire.error_feedback else residual


def pmean(tree: Any, axes: tuple, wire: Wire, residual: Any = None) -> tuple[Any, Any]:
  """The workers' mean of ``tree`` as ``wire`` carries it, and the new residual."""
  total, residual = psum(tree, axes, wire, residual)
  n = _collectives.num_workers(axes)
  return jax.tree.map(lambda t: t / jnp.asarray(n, t.dtype), total), residual


def _top(dtype: Any) -> float:
  """The largest magnitude a block's absmax is scaled to."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return 127.0  # Symmetric: -127..127, so that negation is exact.
  return float(jnp.finfo(dtype).max)


def quantize(blocks: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """Blocks ``(..., BLOCK)`` of float32 to ``dtype`` values and one float32 scale per block.

  Rounds to nearest. An all-zero block gets scale 0 and zero values; a block
  holding an Inf or a NaN gets a NaN scale, so that the sum is not finite.
  """
  absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
  scale = absmax / _top(dtype)
  scaled = blocks / jnp.where(scale > 0, scale, 1.0)
  if jnp.issubdtype(jnp.dtype(dtype), jnp.integer):
    values = jnp.clip(jnp.round(scaled), -127, 127).astype(dtype)
  else:
    values = scaled.astype(dtype)
  scale = jnp.where(jnp.isfinite(absmax), scale, jnp.nan)
  return values, scale


def dequantize(values: jax.Array, scale: jax.Array) -> jax.Array:
  return values.astype(jnp.float32) * scale


def ring_sum(tree: Any, axes: tuple, dtype: Any) -> tuple[Any, Any]:
  """The quantized ring sum of a tree of float arrays (see the module docstring).

  Returns the sum (float32, the same bits on every worker) and what the
  roundings dropped that is this worker's to send again: from its own
  contribution, and from the summed chunk it owns. Fed back into the next
  sum, both add up to nothing over many syncs.
  """
  leaves, treedef = jax.tree.flatten(tree)
  n = _collectives.num_workers(axes)
  size = sum(math.prod(jnp.shape(x)) for x in leaves)
  chunk = math.ceil(size / n / BLOCK) * BLOCK
  padded = _flatten(leaves, n * chunk).reshape(n, chunk // BLOCK, BLOCK)
  values, scale = quantize(padded, dtype)
  dropped = (padded - dequantize(values, scale)).reshape(-1)
  # Worker k receives chunk k of every worker and sums them, in worker order.
  values, scale = _collectives.all_to_all((values, scale), axes)
  part = dequantize(values[0], scale[0])
  for j in range(1, n):
    part = part + dequantize(values[j], scale[j])
  values, scale = quantize(part, dtype)
  # What the second rounding dropped from the summed chunk is this worker's
  # to feed back: it owns that chunk.
  start = _collectives.worker_index(axes) * chunk
  dropped_sum = (part - dequantize(values, scale)).reshape(-1)
  mine = lax.dynamic_slice(dropped, (start,), (chunk,))
  dropped = lax.dynamic_update_slice(dropped, mine + dropped_sum, (start,))[:size]
  values, scale = _collectives.all_gather((values, scale), axes)
  total = dequantize(values, scale).reshape(-1)[:size]
  return _unflatten(total, leaves, treedef), _unflatten(dropped, leaves, treedef)


def _flatten(leaves: list, length: int) -> jax.Array:
  """The leaves as one float32 vector of ``length`` numbers, zero-padded at the end.

  Written into a zero buffer leaf by leaf rather than concatenated and
  padded: XLA's CPU backend fuses a concatenation into the blocks' absmax
  reduction that follows it, which made the whole quantized sync several
  times slower than the float32 all-reduce it replaces.
  """
  flat, start = jnp.zeros(length, jnp.float32), 0
  for x in leaves:
    flat = lax.dynamic_update_slice(flat, jnp.ravel(x).astype(jnp.float32), (start,))
    start += math.prod(jnp.shape(x))
  return flat


def _unflatten(flat: jax.Array, leaves: list, treedef: Any) -> Any:
  out, start = [], 0
  for x in leaves:
    count = math.prod(jnp.shape(x))
    out.append(lax.reshape(flat[start : start + count], jnp.shape(x)).astype(x.dtype))
    start += count
  return jax.tree.unflatten(treedef, out)
