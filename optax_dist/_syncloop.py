"""The mechanics of a sync inside a compiled step.

* :func:`run_on_sync`: a sync decided in the program runs in a loop of zero
  or one trip, so that a call that does not sync executes no collective (a
  ``lax.cond`` would do the same but copies its operands on every call; a
  while loop's carry is updated in place).
* :func:`rounding_fence`: the same arithmetic rounds the same way whether a
  sync is decided in the program or by a static flag.
* :func:`vary_tree_like`: under ``shard_map``, a value made equal by a
  collective is typed invariant; where it meets per-worker values it is cast
  to varying, so that a state keeps its type across calls.
"""

from collections.abc import Callable
from typing import Any
from typing import TypeVar

import jax
from jax import lax
import jax.numpy as jnp

from optax_dist import _collectives

T = TypeVar("T")

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def rounding_fence(tree: Any, counter: jax.Array) -> Any:
  """``tree`` unchanged, rounded where it stands, so that consumers cannot fuse into it.

  XLA contracts a multiply that feeds an add (an inner update ``-lr * r``
  that meets ``params + updates``) into one fused multiply-add, which rounds
  once. In the in-graph path the inner update crosses the sync loop's
  boundary first and is rounded on its own; without a fence the static path
  would round differently and the two would part by an ulp. The fence XORs
  the bits with a zero that XLA cannot prove to be zero (``counter < 0``):
  one integer operation per element inside the fused kernel, no memory.
  """
  zero = counter < 0

  def fence(x: Any) -> Any:
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    bits = _UNSIGNED[x.dtype.itemsize]
    flip = zero.astype(bits)
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, bits) ^ flip, x.dtype)

  return jax.tree.map(fence, tree)


def run_on_sync(
  is_sync: jax.Array, sync: Callable[[T, Any], T], carry: T, axis_name: Any, inputs: Any = ()
) -> T:
  """``sync(carry, inputs)`` on sync steps, ``carry`` otherwise; one branch runs.

  The carry is made varying first (under shard_map) since the sync mixes it
  with per-worker values; so is what the sync returns, since a value made
  equal by a collective (e.g. a ``pmean`` of the params) is invariant.
  ``inputs`` are read-only values the sync reads (the params): they go
  through the loop unchanged rather than being captured by it.

  Under shard_map and pmap (mesh axes, not vmap), every leaf crosses the loop
  with a leading axis of one (``x[None]`` in, ``x[0]`` out). A step that runs
  on its ``[1, ...]`` block squeezes that axis off (``p[0]``); XLA then sees
  the loop's results and the step's params as reshapes of the same
  ``[1, ...]`` buffers and computes ``params + updates`` on the donated
  buffer in place. Without the axis the loop's results are the squeezed
  shape, the add reads the params through a reshape, and XLA copies the new
  params into the donated buffer (a params-sized copy on every step).
  """
  carry = _collectives.to_varying(carry, axis_name)
  inputs = _collectives.to_varying(inputs, axis_name)

  def body(c: T, i: Any) -> T:
    return _collectives.to_varying(sync(c, i), axis_name)

  # On a mesh of several axes the sync may also make values vary over an axis
  # other than `axis_name` (a hierarchical composition: an update that a tower
  # made invariant over "local" meets params that vary over it). The loop's
  # carry must have one type: the union of what goes in and what comes out.
  out = jax.eval_shape(body, carry, inputs)
  carry = jax.tree.map(vary_like, carry, out)
  # Under vmap the leading axis would not help (the step has no [1, ...]
  # block) and XLA lays an [N, 1, ...] carry out apart from [N, ...] and
  # copies it, so it is added on mesh axes only.
  lead = _on_mesh(axis_name)

  def expand(tree: Any) -> Any:
    return jax.tree.map(lambda x: lax.expand_dims(x, (0,)), tree) if lead else tree

  def squeeze(tree: Any) -> Any:
    return jax.tree.map(lambda x: lax.squeeze(x, (0,)), tree) if lead else tree

  def loop_body(_: Any, loop_carry: tuple[Any, Any]) -> tuple[Any, Any]:
    c, i = loop_carry
    return expand(jax.tree.map(vary_like, body(squeeze(c), squeeze(i)), carry)), i

  trips = jnp.where(is_sync, 1, 0).astype(jnp.int32)
  out, _ = lax.fori_loop(0, trips, loop_body, (expand(carry), expand(inputs)))
  return squeeze(out)


def _on_mesh(axis_name: Any) -> bool:
  """Whether every axis is a manual mesh axis (shard_map, pmap), not a vmap axis."""
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  return all(a in manual for a in _collectives.axis_tuple(axis_name))


def vary_like(x: Any, like: Any) -> Any:
  """``x``, cast to varying over the axes ``like`` varies over and ``x`` does not."""
  missing = tuple(sorted(_collectives.varying_axes(like) - _collectives.varying_axes(x), key=str))
  return lax.pcast(x, missing, to="varying") if missing else x


def vary_tree_like(tree: Any, like: Any) -> Any:
  """``tree`` with the varying type of ``like`` (a state keeps its type across calls)."""
  return jax.tree.map(vary_like, tree, like)
