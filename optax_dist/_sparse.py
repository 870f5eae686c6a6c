r"""Sparse top-k syncs (SparseLoCo): each worker sends the largest numbers of each chunk.

With ``topk_fraction=rho``, a worker's contribution (its pseudo-gradient plus
its error-feedback buffer) is flattened and cut into chunks of ``CHUNK`` =
256 numbers, so that a position in a chunk fits in one byte. In each chunk
the worker keeps the ``k = ceil(rho * CHUNK)`` largest magnitudes and sends
their positions (one uint8 each) and their values: float32 without a
``comm_dtype``, else rounded to int8, int4 or int2 with one float32 absmax
scale per chunk (over the ``k`` values) and packed as in the quantized ring.
Positions, values and scales travel in one byte buffer, with one
``all_gather``: sparse contributions do not ring-reduce. Every worker then
adds the ``N`` contributions into a dense float32 sum in worker order, so
every worker holds the same bits.

Per worker on the wire, with ``m = ceil(P / CHUNK)`` chunks:
``(N - 1) * m * (k + k * bits / 8 + 4)`` bytes (without the 4 bytes of
scale for float32 values): at ``rho = 0.02`` (``k = 6``) and int4, 13 bytes
per 256 numbers, 0.051x a float32 ring all-reduce at N = 8. Unlike the
ring, the all-gather grows with ``N``.

What a worker did not send (the numbers outside its top k, and the rounding
of the ones inside) is returned for its error-feedback buffer ``e``. The
rule, at each sync with pseudo-gradient ``delta``, is SparseLoCo's:

.. math::

  a = \delta + \beta e, \qquad \text{send } s = Q(\mathrm{top}_k(a)),
  \qquad e \leftarrow a - s,

with ``beta`` the ``error_decay`` (0.95 by default).
"""

import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from optax_dist import _codec
from optax_dist import _collectives

CHUNK = 256  # Numbers per chunk: a position fits in one byte (uint8).


def keep(fraction: float) -> int:
  """Numbers a worker sends per chunk of ``CHUNK``: ``ceil(fraction * CHUNK)``."""
  return max(1, min(CHUNK, math.ceil(fraction * CHUNK)))


def select(
  chunks: jax.Array, k: int, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
  """A worker's top ``k`` of each chunk ``(m, CHUNK)``: what it sends, and the dense sent values.

  Returns the positions ``(m, k)`` (int32), the values (int8 codes, or
  float32 without ``dtype``), the scales ``(m, 1)`` (``None`` without
  ``dtype``), and the dequantized values in place ``(m, CHUNK)``. A chunk
  holding an Inf or a NaN sends a NaN (its scale, or its values), so that
  the sum is not finite.
  """
  _, positions = lax.top_k(jnp.abs(chunks), k)
  picked = jnp.take_along_axis(chunks, positions, axis=1)
  finite = jnp.all(jnp.isfinite(chunks), axis=1, keepdims=True)
  if dtype is None:
    values = jnp.where(finite, picked, jnp.nan)
    scale, sent = None, values
  else:
    values, scale = _codec.quantize(picked, dtype)
    scale = jnp.where(finite, scale, jnp.nan)
    sent = _codec.dequantize(values, scale)
  return positions, values, scale, _scatter(positions, sent)


def _scatter(positions: jax.Array, values: jax.Array) -> jax.Array:
  rows = jnp.arange(positions.shape[0])[:, None]
  dense = jnp.zeros((positions.shape[0], CHUNK), jnp.float32)
  return dense.at[rows, positions].set(values, unique_indices=True)


def to_wire(positions: jax.Array, values: jax.Array, scale: Any, dtype: Any) -> jax.Array:
  """One worker's positions, values and scales as one uint8 vector."""
  parts = [positions.astype(jnp.uint8).reshape(-1)]
  if dtype is None:
    parts.append(lax.bitcast_convert_type(values, jnp.uint8).reshape(-1))
  else:
    width = _codec.bits(dtype)
    codes = values.reshape(-1)
    per = 8 // width
    codes = jnp.pad(codes, (0, -codes.size % per))
    if width < 8:
      parts.append(_codec.pack(codes[None], width)[0])
    else:
      parts.append(lax.bitcast_convert_type(codes, jnp.uint8))
    parts.append(lax.bitcast_convert_type(scale.reshape(-1), jnp.uint8).reshape(-1))
  return jnp.concatenate(parts)


def from_wire(buffer: jax.Array, m: int, k: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """The positions ``(L, m, k)`` and dequantized values ``(L, m, k)`` of buffers ``(L, bytes)``."""
  lead = buffer.shape[0]
  count = m * k
  positions = buffer[:, :count].astype(jnp.int32).reshape(lead, m, k)
  rest = buffer[:, count:]
  if dtype is None:
    raw = rest[:, : 4 * count].reshape(lead, count, 4)
    return positions, lax.bitcast_convert_type(raw, jnp.float32).reshape(lead, m, k)
  width = _codec.bits(dtype)
  size = -(-count // (8 // width))
  data, scale_bytes = rest[:, :size], rest[:, size : size + 4 * m]
  if width < 8:
    codes = _codec.unpack(data, width)[:, :count]
  else:
    codes = lax.bitcast_convert_type(data, jnp.int8)
  scale = lax.bitcast_convert_type(scale_bytes.reshape(lead, m, 4), jnp.float32)
  return positions, codes.reshape(lead, m, k).astype(jnp.float32) * scale[..., None]


def wire_bytes(size: int, fraction: float, dtype: Any) -> int:
  """Bytes of one worker's contribution for ``size`` numbers (its share of the all-gather)."""
  m, k = math.ceil(size / CHUNK), keep(fraction)
  if dtype is None:
    return m * k * 5
  width = _codec.bits(dtype)
  per = 8 // width
  return m * k + -(-m * k // per) * width * per // 8 + 4 * m


def gather_sum(
  tree: Any, axes: tuple, fraction: float, dtype: Any, *, side: Any = None
) -> tuple[Any, ...]:
  """The workers' sum of their top-k contributions, and what this worker did not send.

  ``side``: a small float32 array whose bytes ride after this worker's
  contribution in the all-gather, summed exactly in worker order; the
  result is then ``(total, dropped, side_total)``.
  """
  leaves, treedef = jax.tree.flatten(tree)
  n = _collectives.num_workers(axes)
  size = sum(math.prod(jnp.shape(x)) for x in leaves)
  m, k = math.ceil(size / CHUNK), keep(fraction)
  chunks = _codec.flatten(leaves, m * CHUNK).reshape(m, CHUNK)
  positions, values, scale, sent = select(chunks, k, dtype)
  dropped = (chunks - sent).reshape(-1)[:size]
  buffer = to_wire(positions, values, scale, dtype)
  if side is not None:
    buffer = _codec.append_side(buffer[None], side)[0]
  gathered = _collectives.all_gather(buffer, axes)
  if side is not None:
    gathered, side_total = _codec.split_side(gathered, side)
  all_positions, all_values = from_wire(gathered, m, k, dtype)
  # Every worker adds the contributions in worker order: the same bits everywhere.
  rows = jnp.arange(m)[:, None]
  total = jnp.zeros((m, CHUNK), jnp.float32)
  for j in range(n):
    total = total.at[rows, all_positions[j]].add(all_values[j], unique_indices=True)
  total = total.reshape(-1)[:size]
  out = _codec.unflatten(total, leaves, treedef), _codec.unflatten(dropped, leaves, treedef)
  return out if side is None else (*out, side_total)
