"""How numbers travel as bytes: blockwise absmax rounding, bit packing, byte buffers.

The formats below 16 bits of a sync's reduction (:mod:`optax_dist._quantize`,
:mod:`optax_dist._sparse`) share these pieces: a tree flattened to one float32
vector, blocks rounded to ``int8``, ``int4``, ``int2`` or a float8 type with one
float32 absmax scale per block, codes packed two or four to a byte, and values
and scales written into one byte buffer, so that one collective carries both.
"""

import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

BLOCK = 256  # Numbers per absmax scale, for the 8-bit formats.

EIGHT_BIT_FLOATS = ("float8_e4m3fn", "float8_e5m2")
# Integer formats: (bits, numbers per absmax scale, largest value).
INTEGERS = {"int8": (8, BLOCK, 127), "int4": (4, 64, 7), "int2": (2, 32, 1)}


def bits(dtype: Any) -> int:
  """Bits one number takes on the wire in ``dtype``."""
  name = jnp.dtype(dtype).name
  return INTEGERS[name][0] if name in INTEGERS else 8 * jnp.dtype(dtype).itemsize


def block_size(dtype: Any) -> int:
  """Numbers that share one float32 absmax scale in ``dtype``."""
  name = jnp.dtype(dtype).name
  return INTEGERS[name][1] if name in INTEGERS else BLOCK


def _top(dtype: Any) -> float:
  """The largest magnitude a block's absmax is scaled to."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return float(INTEGERS[dtype.name][2])  # Symmetric, so that negation is exact.
  return float(jnp.finfo(dtype).max)


def quantize(
  blocks: jax.Array, dtype: Any, like: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Blocks ``(..., B)`` of float32 to ``dtype`` values and one float32 scale per block.

  Rounds to nearest. Integer formats give int8 codes in ``[-T, T]``
  (``T`` = 127, 7 or 1), the float8 formats float8 values. An all-zero block
  gets scale 0 and zero values; a block holding an Inf or a NaN gets a NaN
  scale, so that the sum is not finite.

  ``like`` (optional, shaped like ``blocks``): the values whose absolute
  maximum sets each block's scale, when ``blocks`` holds them plus an
  error-feedback buffer. The values are then clipped to ``[-T, T]`` (the
  format's largest magnitude for float8), and a block whose ``like`` is all
  zero sends zeros.
  """
  own = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
  absmax = own if like is None else jnp.max(jnp.abs(like), axis=-1, keepdims=True)
  top = _top(dtype)
  scale = absmax / top
  scaled = blocks / jnp.where(scale > 0, scale, 1.0)
  if like is not None:
    scaled = jnp.where(scale > 0, jnp.clip(scaled, -top, top), 0.0)
  if jnp.issubdtype(jnp.dtype(dtype), jnp.integer):
    values = jnp.clip(jnp.round(scaled), -top, top).astype(jnp.int8)
  else:
    values = scaled.astype(dtype)
  finite = jnp.isfinite(absmax) if like is None else jnp.isfinite(absmax + own)
  scale = jnp.where(finite, scale, jnp.nan)
  return values, scale


def dequantize(values: jax.Array, scale: jax.Array) -> jax.Array:
  return values.astype(jnp.float32) * scale


def pack(codes: jax.Array, width: int) -> jax.Array:
  """Signed codes (int8, last axis a multiple of ``8 // width``) packed into uint8 bytes.

  Planar: with ``m`` bytes out of the last axis, byte ``j`` holds codes
  ``j, j + m, j + 2 m, ...``, code ``j + i m`` in bits ``[i * width, (i + 1) * width)``
  (two's complement). Each plane is a contiguous slice of the codes, so no
  array with a minor dim of 2 or 4 is made: TPUs lay a minor dim out in
  lanes of 128, which made such an array 32 to 64 times its size.
  """
  per = 8 // width
  low = jnp.bitwise_and(lax.bitcast_convert_type(codes, jnp.uint8), (1 << width) - 1)
  planes = low.reshape(*codes.shape[:-1], per, codes.shape[-1] // per)
  packed = planes[..., 0, :]
  for i in range(1, per):
    packed = jnp.bitwise_or(packed, jnp.left_shift(planes[..., i, :], jnp.uint8(i * width)))
  return packed


def unpack(packed: jax.Array, width: int) -> jax.Array:
  """The int8 codes of :func:`pack`, sign-extended."""
  per = 8 // width
  high = [
    lax.bitcast_convert_type(jnp.left_shift(packed, jnp.uint8(8 - width * (i + 1))), jnp.int8)
    for i in range(per)
  ]
  # Arithmetic shifts: sign-extend.
  planes = jnp.stack([jnp.right_shift(h, jnp.int8(8 - width)) for h in high], axis=-2)
  return planes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def to_wire(values: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
  """Values ``(L, blocks, B)`` and scales ``(L, blocks, 1)`` as one byte buffer ``(L, bytes)``.

  The values come first, packed, then the scales' float32 bytes: one
  collective carries both. The buffer is uint8 for the packed formats, int8
  for the 8-bit ones.
  """
  lead = values.shape[0]
  width = bits(dtype)
  if width < 8:
    data = pack(values.reshape(lead, -1), width)
  else:
    data = lax.bitcast_convert_type(values, jnp.uint8).reshape(lead, -1)
  scale_bytes = lax.bitcast_convert_type(scale, jnp.uint8).reshape(lead, -1)
  buffer = jnp.concatenate([data, scale_bytes], axis=1)
  return buffer if width < 8 else lax.bitcast_convert_type(buffer, jnp.int8)


def from_wire(buffer: jax.Array, dtype: Any, numbers: int) -> tuple[jax.Array, jax.Array]:
  """The values ``(L, blocks, B)`` and scales ``(L, blocks, 1)`` of :func:`to_wire`."""
  lead, block, width = buffer.shape[0], block_size(dtype), bits(dtype)
  blocks = numbers // block
  buffer = lax.bitcast_convert_type(buffer, jnp.uint8)
  size = numbers * width // 8
  data, scale_bytes = buffer[:, :size], buffer[:, size:]
  if width < 8:
    values = unpack(data, width)
  else:
    values = lax.bitcast_convert_type(data, jnp.dtype(dtype))
  scale = lax.bitcast_convert_type(scale_bytes.reshape(lead, blocks, 4), jnp.float32)
  return values.reshape(lead, blocks, block), scale[..., None]


def flatten(leaves: list, length: int) -> jax.Array:
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


def unflatten(flat: jax.Array, leaves: list, treedef: Any) -> Any:
  out, start = [], 0
  for x in leaves:
    count = math.prod(jnp.shape(x))
    out.append(lax.reshape(flat[start : start + count], jnp.shape(x)).astype(x.dtype))
    start += count
  return jax.tree.unflatten(treedef, out)


def append_side(buffer: jax.Array, side: Any) -> jax.Array:
  """``side``'s float32 bytes after every row of a wire buffer ``(L, bytes)``."""
  raw = lax.bitcast_convert_type(jnp.asarray(side, jnp.float32).reshape(-1), jnp.uint8)
  raw = jnp.broadcast_to(raw.reshape(1, -1), (buffer.shape[0], raw.size))
  return jnp.concatenate([buffer, lax.bitcast_convert_type(raw, buffer.dtype)], axis=1)


def split_side(buffer: jax.Array, side: Any) -> tuple[jax.Array, jax.Array]:
  """The wire rows of :func:`append_side`, and the rows' ``side`` values summed in row order.

  The rows are the workers' (after an ``all_to_all`` or an ``all_gather``):
  every worker adds them in the same order, so the sum has the same bits
  everywhere.
  """
  shape = jnp.shape(side)
  width = 4 * math.prod(shape)
  rows, raw = buffer[:, :-width], buffer[:, -width:]
  raw = lax.bitcast_convert_type(raw, jnp.uint8).reshape(buffer.shape[0], -1, 4)
  sides = lax.bitcast_convert_type(raw, jnp.float32).reshape(buffer.shape[0], *shape)
  total = sides[0]
  for j in range(1, buffer.shape[0]):
    total = total + sides[j]
  return rows, total
