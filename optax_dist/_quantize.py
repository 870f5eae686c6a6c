"""Low-precision syncs: how a sync's reduction travels on the wire.

A periodic transform's sync sums (or averages) one value per worker: the
params, their differences to the center, or DiLoCo's pseudo-gradient. Its
``comm_dtype`` chooses the format on the wire:

* ``None``: the value's own dtype (float32 for centers), one all-reduce;
* a float type of 16 bits (``jnp.bfloat16``, ``jnp.float16``): cast, one
  all-reduce, cast back (XLA's CPU backend widens bfloat16 all-reduces to
  float32; accelerators move 2 bytes);
* ``jnp.int8``, a float8 type, ``jnp.int4`` or ``jnp.int2``: a quantized
  ring (:func:`ring_sum`).

The quantized ring, per worker, with N workers and the value flattened to P
numbers cut into N chunks:

1. cut every chunk into blocks of ``block_size(dtype)`` numbers (256 for
   8 bits, 64 for int4, 32 for int2), scale each block by its absolute
   maximum (one float32 scale per block) and round to the nearest value of
   the format: -127..127 for int8, -7..7 for int4, -1..1 for int2
   (symmetric, so that negation is exact and zero stays zero);
2. pack the values into bytes (one, two or four to a byte) and write the
   block scales' bytes after them: one byte buffer per chunk;
3. ``all_to_all``: worker k receives chunk k of every worker, dequantizes and
   sums them in float32, in worker order;
4. quantizes its summed chunk the same way, and ``all_gather`` gives every
   worker every summed chunk, which it dequantizes.

Each phase is one collective of bytes. Each worker sends about
``2 (N - 1) / N * P * bits / 8`` bytes plus the scales (4 bytes per block):
0.254x the bytes of a float32 ring all-reduce for int8, 0.141x for int4 and
0.094x for int2, whatever N is, and every worker ends with the same bits.
Each rounding moves a number by at most half a step, ``absmax / (2 T)`` with
``T`` = 127, 7 or 1 the largest value. What the roundings drop is returned
for error feedback, in one params-sized buffer per worker: what the first
rounding dropped from its contribution, and, where the chunk it owns stands,
what the second rounding dropped from the summed chunk (the owner's buffer,
1/N of the params). Fed back, the owner's buffer goes into the summed chunk
before its rounding, and the rest into the worker's next contribution, as in
the compressed all-reduce of 1-bit Adam (worker and server error feedback).

With feedback, no buffer sets a scale: each block's scale is that of the
fresh values alone (the worker's contribution; the summed chunk as
received), and the values with the buffer added are rounded on it, clipped
to ``[-T, T]``. So a buffer holds about half a step of the fresh values
(more only while they shrink). Were the scale that of the values with the
buffer, as without feedback, a ternary int2 code would send a buffer's
largest numbers at the full block maximum: the step would grow with the
buffer, and the buffer with the step, until it held as much as the
contributions themselves, and where workers pull apart (their contributions
large, their sum small) the ring lost more in each sync, in noise, than it
saved in bias.

With ``topk_fraction`` the contribution is sparse instead (SparseLoCo, see
:mod:`optax_dist._sparse`).
"""

import math
from typing import Any
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from optax_dist import _codec
from optax_dist import _collectives


class Wire(NamedTuple):
  """How a sync's reduction travels: the format on the wire, and error feedback.

  Attributes:
    dtype: ``None`` (the value's own dtype), a 16-bit float, ``int8``, a
      float8 type, ``int4`` or ``int2``.
    error_feedback: Whether each worker adds what the compression dropped
      from its last contribution to its next one.
    topk_fraction: ``None`` (dense), or the fraction of each chunk a worker
      sends (sparse top-k, :mod:`optax_dist._sparse`).
    error_decay: ``beta``: the error-feedback buffer is multiplied by it
      before it is added to the next contribution.
  """

  dtype: Any = None
  error_feedback: bool = False
  topk_fraction: float | None = None
  error_decay: float = 1.0

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


_QUANTIZED = "jnp.int8, jnp.int4, jnp.int2 or a float8 type"


def make_wire(
  comm_dtype: Any,
  error_feedback: Any,
  *,
  topk_fraction: Any = None,
  error_decay: Any = None,
) -> Wire:
  """Validates the static communication arguments.

  ``comm_dtype`` may be a :class:`Wire` made before (it is returned as is).
  ``error_feedback=None`` means on with ``topk_fraction``, off without.
  ``error_decay=None`` means 0.95 with ``topk_fraction`` (SparseLoCo's), 1
  without.
  """
  if isinstance(comm_dtype, Wire):
    return comm_dtype
  sparse = topk_fraction is not None
  if sparse:
    if isinstance(topk_fraction, bool) or not isinstance(topk_fraction, (int, float)):
      raise TypeError(
        f"`topk_fraction` must be a Python float in (0, 1) (e.g. 0.02), got {topk_fraction!r}; "
        "it is static: under optax.inject_hyperparams, list it in `static_args`."
      )
    if not 0.0 < topk_fraction < 1.0:
      raise ValueError(
        f"`topk_fraction` must be in (0, 1) (e.g. 0.02 sends 2% of each chunk), got "
        f"{topk_fraction!r}; pass None for a dense sync."
      )
    topk_fraction = float(topk_fraction)
  if error_feedback is None:
    error_feedback = sparse
  if not isinstance(error_feedback, bool):
    raise TypeError(f"`error_feedback` must be a Python bool, got {error_feedback!r}.")
  if error_decay is None:
    error_decay = 0.95 if sparse else 1.0
  elif isinstance(error_decay, bool) or not isinstance(error_decay, (int, float)):
    raise TypeError(
      f"`error_decay` must be a Python float in (0, 1], got {error_decay!r}; it is static: "
      "under optax.inject_hyperparams, list it in `static_args`."
    )
  elif not 0.0 < error_decay <= 1.0:
    raise ValueError(f"`error_decay` must be in (0, 1], got {error_decay!r}.")
  elif not error_feedback:
    raise ValueError(
      "`error_decay` decays the error-feedback buffer: it needs `error_feedback=True` "
      "(the default with `topk_fraction`)."
    )
  error_decay = float(error_decay)
  if comm_dtype is None:
    if error_feedback and not sparse:
      raise ValueError(
        f"`error_feedback=True` needs a quantized `comm_dtype` ({_QUANTIZED}) or "
        "`topk_fraction`: only compression drops anything to feed back."
      )
    return Wire(None, error_feedback, topk_fraction, error_decay)
  try:
    dtype = jnp.dtype(comm_dtype)
  except TypeError as e:
    raise ValueError(f"`comm_dtype` must be a dtype, got {comm_dtype!r}.") from e
  if jnp.issubdtype(dtype, jnp.integer):
    if dtype.name not in _codec.INTEGERS:
      raise ValueError(
        f"`comm_dtype` {dtype} is not supported: the only integer format is jnp.int8, or "
        "jnp.int4 / jnp.int2 below 8 bits (signed, blockwise absmax scales, a quantized ring)."
      )
  elif not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"`comm_dtype` must be a floating dtype (e.g. jnp.bfloat16), jnp.int8, jnp.int4 or "
      f"jnp.int2, got {dtype}."
    )
  elif dtype.itemsize == 1 and dtype.name not in _codec.EIGHT_BIT_FLOATS:
    raise ValueError(
      f"`comm_dtype` {dtype} is not supported; the 8-bit floats are {_codec.EIGHT_BIT_FLOATS}."
    )
  if dtype.itemsize == 8 and not jax.config.read("jax_enable_x64"):
    raise ValueError(
      f"`comm_dtype` {dtype} needs JAX's 64-bit mode, which is off: the sync would send "
      "float32 without a word. Enable it before building the optimizer "
      "(`jax.config.update('jax_enable_x64', True)`), or pass jnp.float32."
    )
  wire = Wire(dtype, error_feedback, topk_fraction, error_decay)
  if sparse and dtype.name not in _codec.INTEGERS:
    raise ValueError(
      f"With `topk_fraction`, `comm_dtype` must be None (float32 values), jnp.int8, jnp.int4 "
      f"or jnp.int2, got {dtype}."
    )
  if error_feedback and not (wire.quantized or sparse):
    raise ValueError(
      f"`error_feedback=True` needs a quantized `comm_dtype` ({_QUANTIZED}), got {dtype}: a "
      f"{dtype.itemsize * 8}-bit float drops too little to feed back."
    )
  return wire


def wire_sum(
  tree: Any, axes: tuple, wire: Wire, residual: Any = None, *, side: Any = None
) -> tuple[Any, ...]:
  """The workers' sum of ``tree`` as ``wire`` carries it, and the new residual.

  ``side`` (optional): a small float32 array summed exactly over the workers
  in the same collective as ``tree`` (the count of workers whose
  contribution is finite travels this way). When it is given, the result is
  ``(total, residual, side_total)``.

  ``residual`` (error feedback), times ``wire.error_decay``, is added to
  this worker's contribution first (in the quantized ring, where the chunk
  this worker owns stands, to the summed chunk instead: :func:`ring_sum`); the returned residual is what the
  compression dropped that this worker sends again next time (the
  ``residual`` given, unchanged, when there is no feedback).
  """
  if wire.topk_fraction is None and wire.dtype is None:
    total, side_total = _collectives.psum((tree, side), axes)
    return (total, residual) if side is None else (total, residual, side_total)
  if wire.topk_fraction is None and not wire.quantized:
    narrow = jax.tree.map(lambda x: x.astype(wire.dtype), tree)
    total, side_total = _collectives.psum((narrow, side), axes)
    total = jax.tree.map(lambda t, x: t.astype(x.dtype), total, tree)
    return (total, residual) if side is None else (total, residual, side_total)
  side_total = None
  decay = wire.error_decay
  if wire.topk_fraction is None:
    fed = residual if wire.error_feedback else None
    total, dropped, *sides = ring_sum(tree, axes, wire.dtype, residual=fed, decay=decay, side=side)
    side_total = sides[0] if sides else None
  else:
    from optax_dist import _sparse

    if wire.error_feedback:
      tree = jax.tree.map(lambda x, e: x + (e if decay == 1.0 else decay * e), tree, residual)

    total, dropped, *sides = _sparse.gather_sum(
      tree, axes, wire.topk_fraction, wire.dtype, side=side
    )
    side_total = sides[0] if sides else None
  residual = dropped if wire.error_feedback else residual
  return (total, residual) if side is None else (total, residual, side_total)


def ring_sum(
  tree: Any, axes: tuple, dtype: Any, *, residual: Any = None, decay: float = 1.0, side: Any = None
) -> tuple[Any, ...]:
  """The quantized ring sum of a tree of float arrays (see the module docstring).

  Returns the sum (float32, the same bits on every worker) and what the
  roundings dropped that is this worker's to send again: from the chunks of
  its own contribution, and, where the chunk it owns stands, from the summed
  chunk too.

  ``residual`` (error feedback; ``decay`` times it is fed back) is what the
  last sum dropped, as returned: where the owned chunk stands it is the
  owner's buffer and goes into the summed chunk, before its rounding, with
  what the first rounding dropped from this worker's own part of that
  chunk; elsewhere it goes into this worker's contribution. Each rounding
  keeps the scales of the values without the buffer (see the module
  docstring).

  ``side``: a small float32 array whose bytes ride after every chunk's
  scales in the ``all_to_all``, so that every worker receives every
  worker's copy and sums them exactly, in worker order; the result is then
  ``(total, dropped, side_total)``.

  The ring is :func:`ring_reduce` then :func:`ring_gather`, which a delayed
  sync runs on two different calls; run on one call, the summed chunk and
  the dropped numbers stay flat between the two phases.
  """
  leaves, treedef = jax.tree.flatten(tree)
  fed = None if residual is None else jax.tree.leaves(residual)
  part, dropped, *sides = _reduce_flat(leaves, axes, dtype, fed, decay, side)
  start = _collectives.worker_index(axes) * part.shape[0]
  owned = lax.dynamic_slice(dropped, (start,), part.shape)
  if fed is None:
    total, dropped_sum = _gather_flat(part, leaves, axes, dtype)
    owned = owned + dropped_sum
  else:  # The owner's part of ``dropped`` goes into its summed chunk.
    total, owned = _gather_flat(part, leaves, axes, dtype, kept=owned)
  dropped = lax.dynamic_update_slice(dropped, owned, (start,))
  size = sum(math.prod(jnp.shape(x)) for x in leaves)
  return (
    _codec.unflatten(total, leaves, treedef),
    _codec.unflatten(dropped[:size], leaves, treedef),
    *sides,
  )


def _chunk(leaves: list, n: int, dtype: Any) -> tuple[int, int]:
  """The numbers in ``leaves`` and the length of each worker's chunk (whole blocks)."""
  block = _codec.block_size(dtype)
  size = sum(math.prod(jnp.shape(x)) for x in leaves)
  return size, math.ceil(size / n / block) * block


def _reduce_flat(
  leaves: list, axes: tuple, dtype: Any, residual: list | None, decay: float, side: Any
) -> tuple[Any, ...]:
  """The first phase on flat vectors: the owned summed chunk, and the padded dropped numbers.

  With ``residual``, the owner's buffer (times ``decay``) is not in the
  summed chunk yet: it is added, where the owned chunk stands, to the
  dropped numbers, for the second phase to round with the summed chunk.
  """
  n = _collectives.num_workers(axes)
  _, chunk = _chunk(leaves, n, dtype)
  block = _codec.block_size(dtype)
  me = _collectives.worker_index(axes)
  shape = (n, chunk // block, block)
  fresh = _codec.flatten(leaves, n * chunk).reshape(n, chunk)
  padded, held = fresh, None
  if residual is not None:
    fed = _codec.flatten(residual, n * chunk).reshape(n, chunk)
    if decay != 1.0:
      fed = decay * fed
    mine = jnp.arange(n)[:, None] == me
    held = jnp.where(mine, fed, jnp.zeros_like(fed))  # The owner's buffer.
    padded = fresh + jnp.where(mine, jnp.zeros_like(fed), fed)
  padded = padded.reshape(shape)
  # With feedback, the scales are the contribution's own: the buffer never sets them.
  like = None if residual is None else fresh.reshape(shape)
  values, scale = _codec.quantize(padded, dtype, like)
  dropped = (padded - _codec.dequantize(values, scale)).reshape(-1)
  if held is not None:  # Kept for the owner's rounding of its summed chunk.
    dropped = dropped + held.reshape(-1)
  # Worker k receives chunk k of every worker and sums them, in worker order.
  buffer = _codec.to_wire(values, scale, dtype)
  if side is not None:
    buffer = _codec.append_side(buffer, side)
  received = _collectives.all_to_all(buffer, axes)
  if side is not None:
    received, side_total = _codec.split_side(received, side)
  values, scale = _codec.from_wire(received, dtype, chunk)
  part = _codec.dequantize(values[0], scale[0])
  for j in range(1, n):
    part = part + _codec.dequantize(values[j], scale[j])
  part = part.reshape(-1)
  return (part, dropped) if side is None else (part, dropped, side_total)


def _gather_flat(
  part: jax.Array, leaves: list, axes: tuple, dtype: Any, kept: jax.Array | None = None
) -> tuple[Any, Any]:
  """The second phase on flat vectors: the padded sum, and the owned chunk's dropped numbers.

  ``kept`` (error feedback): the owner's buffer for its chunk; it goes into
  the summed chunk, whose rounding keeps the summed chunk's own scales.
  """
  size, chunk = _chunk(leaves, _collectives.num_workers(axes), dtype)
  block = _codec.block_size(dtype)
  mine = part.reshape(chunk // block, block)
  summed = mine if kept is None else mine + kept.reshape(mine.shape)
  values, scale = _codec.quantize(summed, dtype, None if kept is None else mine)
  dropped = (summed - _codec.dequantize(values, scale)).reshape(-1)
  gathered = _collectives.all_gather(_codec.to_wire(values[None], scale[None], dtype)[0], axes)
  values, scale = _codec.from_wire(gathered, dtype, chunk)
  return _codec.dequantize(values, scale).reshape(-1)[:size], dropped


def ring_reduce(
  tree: Any, axes: tuple, dtype: Any, *, residual: Any = None, decay: float = 1.0, side: Any = None
) -> tuple[Any, ...]:
  """The ring's first phase: each worker's summed chunk, shaped like ``tree``.

  Returns the summed chunk this worker owns, in place in a tree shaped like
  ``tree`` (zeros elsewhere), and what the first rounding dropped (see
  :func:`ring_sum` for ``residual``, ``decay`` and ``side``). With
  ``residual``, the owner's buffer (times ``decay``) is not in the summed
  chunk yet: it is added, where the owned chunk stands, to what this
  returns as dropped, for :func:`ring_gather` to round with the summed chunk.
  """
  leaves, treedef = jax.tree.flatten(tree)
  fed = None if residual is None else jax.tree.leaves(residual)
  part, dropped, *sides = _reduce_flat(leaves, axes, dtype, fed, decay, side)
  n, chunk = _collectives.num_workers(axes), part.shape[0]
  size = sum(math.prod(jnp.shape(x)) for x in leaves)
  me = _collectives.worker_index(axes)
  placed = lax.dynamic_update_slice(jnp.zeros(n * chunk, part.dtype), part, (me * chunk,))
  out = (
    _codec.unflatten(placed[:size], leaves, treedef),
    _codec.unflatten(dropped[:size], leaves, treedef),
  )
  return (*out, *sides)


def ring_gather(part: Any, axes: tuple, dtype: Any, *, residual: Any = None) -> tuple[Any, Any]:
  """The ring's second phase: the sum, from the summed chunks of :func:`ring_reduce`.

  Each worker rounds the chunk it owns and ``all_gather`` gives every worker
  every rounded chunk. Returns the sum (the same bits on every worker) and
  what the rounding dropped: the owner's buffer, shaped like ``part``, zero
  outside the chunk this worker owns.

  ``residual`` (error feedback): the buffer :func:`ring_reduce` returned.
  Where the owned chunk stands it is the owner's (what the rounding of its
  own contribution dropped, and the owner's buffer fed back): it goes into
  the summed chunk, whose rounding keeps the summed chunk's own scales; the
  residual is returned with the owned chunk's part replaced by what this
  rounding dropped.
  """
  leaves, treedef = jax.tree.flatten(part)
  n = _collectives.num_workers(axes)
  size, chunk = _chunk(leaves, n, dtype)
  start = _collectives.worker_index(axes) * chunk
  mine = lax.dynamic_slice(_codec.flatten(leaves, n * chunk), (start,), (chunk,))
  if residual is None:
    total, dropped = _gather_flat(mine, leaves, axes, dtype)
    dropped = lax.dynamic_update_slice(jnp.zeros(n * chunk, dropped.dtype), dropped, (start,))
  else:
    kept = _codec.flatten(jax.tree.leaves(residual), n * chunk)
    owned = lax.dynamic_slice(kept, (start,), (chunk,))
    total, dropped = _gather_flat(mine, leaves, axes, dtype, kept=owned)
    dropped = lax.dynamic_update_slice(kept, dropped, (start,))
  return (
    _codec.unflatten(total, leaves, treedef),
    _codec.unflatten(dropped[:size], leaves, treedef),
  )
