"""The mechanism shared by the periodic algorithms.

Elastic averaging, AGN, model averaging and DiLoCo all take a local inner step
on every call, count their calls, and on every ``period``-th call run a sync
that talks to the other workers and moves the worker (and a center) by a
*correction* added to the inner update. :func:`periodic_update` is that
pattern, written once; each algorithm supplies only its sync:

* :func:`advance`: the step counter and the sync decision (calls p, 2p, ...).
* :func:`run_on_sync`: runs the sync only on sync steps, as a loop of zero or
  one trip, so non-sync steps execute no collective. A ``lax.cond`` would do
  the same but copies its operands each step, which costs a params-sized copy
  per carried tree; a while loop's carry is updated in place.
* :func:`center_like`: a float32 (at least) copy of the params for centers
  and snapshots, so that small elastic moves are not lost to bfloat16.
* :func:`register`: makes a state's center and sync count readable by
  :func:`optax_dist.center_params` and :func:`optax_dist.global_step`.
"""

from collections.abc import Callable
import numbers
from typing import Any
from typing import NamedTuple
from typing import TypeVar

import jax
from jax import lax
import jax.numpy as jnp
import optax

from optax_dist import _collectives
from optax_dist import _state

T = TypeVar("T")
C = TypeVar("C")


def check_period(value: Any, name: str) -> int:
  """A period is a static Python int >= 1."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be a Python int (it is static), got {value!r}.")
  if value < 1:
    raise ValueError(f"`{name}` must be >= 1, got {value}.")
  return int(value)


def check_rate(value: Any, name: str) -> None:
  """A rate in (0, 1]; traced values (inject_hyperparams) are not checked."""
  if isinstance(value, numbers.Real) and not 0 < float(value) <= 1:
    raise ValueError(f"`{name}` must be in (0, 1], got {value}.")


def require_params(params: Any, name: str) -> None:
  if params is None:
    raise ValueError(f"{name} needs the current params: call `update(updates, state, params)`.")


def center_dtype(dtype: Any) -> Any:
  """Centers of low-precision params are kept in float32."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return dtype


def center_like(params: Any) -> Any:
  """A copy of params in center precision.

  An abstract leaf (``jax.ShapeDtypeStruct``) gives an abstract center leaf,
  so that ``init`` describes the state of abstract params.
  """

  def copy(p: Any) -> Any:
    dtype = center_dtype(p.dtype)
    if isinstance(p, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(p.shape, dtype, sharding=p.sharding)
    return jnp.asarray(p, dtype)

  return jax.tree.map(copy, params)


def zeros_like(tree: Any) -> Any:
  """Zeros shaped like ``tree``; abstract leaves stay abstract."""

  def zeros(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jnp.zeros_like(x)

  return jax.tree.map(zeros, tree)


def advance(step: jax.Array, period: int) -> tuple[jax.Array, jax.Array]:
  """The next step counter and whether this call syncs (calls p, 2p, ...)."""
  step = optax.safe_increment(step)
  return step, step % period == 0


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
  carry = jax.tree.map(_vary_like, carry, out)
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
    return expand(jax.tree.map(_vary_like, body(squeeze(c), squeeze(i)), carry)), i

  trips = jnp.where(is_sync, 1, 0).astype(jnp.int32)
  out, _ = lax.fori_loop(0, trips, loop_body, (expand(carry), expand(inputs)))
  return squeeze(out)


def _on_mesh(axis_name: Any) -> bool:
  """Whether every axis is a manual mesh axis (shard_map, pmap), not a vmap axis."""
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  return all(a in manual for a in _collectives.axis_tuple(axis_name))


def _vma(x: Any) -> frozenset:
  mat = getattr(x, "manual_axis_type", None)  # A jax.ShapeDtypeStruct from eval_shape.
  return frozenset(mat.varying) if mat is not None else _collectives._varying(x)


def _vary_like(x: Any, like: Any) -> Any:
  """``x``, cast to varying over the axes ``like`` varies over and ``x`` does not."""
  missing = tuple(sorted(_vma(like) - _vma(x), key=str))
  return lax.pcast(x, missing, to="varying") if missing else x


ORDERINGS = ("simultaneous", "round_robin")


def check_ordering(ordering: Any) -> str:
  if ordering not in ORDERINGS:
    raise ValueError(f"`ordering` must be one of {ORDERINGS}, got {ordering!r}.")
  return ordering


class Local(NamedTuple):
  """What a sync sees of the worker: its params before this call, the inner
  optimizer's update, and ``x = params + updates`` in center precision."""

  params: Any
  updates: Any
  x: Any

  def corrected(self, correction: Any) -> Any:
    """Updates that land the worker at ``x + correction``."""
    return jax.tree.map(
      lambda u, d: (u.astype(d.dtype) + d).astype(u.dtype), self.updates, correction
    )

  def moved_to(self, target: Any) -> Any:
    """Updates that land the worker on ``target`` (e.g. the new center).

    ``target - params`` is rounded once, so ``apply_updates`` lands the
    worker on the target up to one float rounding (exactly when the params
    are within a factor of two of it).
    """
    return jax.tree.map(
      lambda t, p, u: (t - p.astype(t.dtype)).astype(u.dtype), target, self.params, self.updates
    )


class Stepped(NamedTuple):
  """What :func:`periodic_update` returns: the pieces of the new state."""

  updates: Any
  inner_state: Any
  step: jax.Array
  num_syncs: jax.Array
  carry: Any


def periodic_update(
  inner: optax.GradientTransformationExtraArgs,
  state: Any,
  grads: Any,
  params: Any,
  extra_args: dict[str, Any],
  *,
  period: int,
  axes: tuple,
  sync: Callable[[Local, C], tuple[Any, C]],
  carry: C,
) -> Stepped:
  """One call of a periodic transform.

  ``state`` has ``inner_state``, ``step`` and ``num_syncs`` fields. Every call
  the inner optimizer takes its local step, ``u = inner(g)``. On calls p, 2p,
  ... ``sync(local, carry) -> (updates, carry)`` runs on the worker after this
  step's gradient step (``local.x``) and returns the updates that land it
  where the algorithm says: ``local.corrected(correction)`` (``u`` plus a
  correction) or ``local.moved_to(center)``. On other calls nothing else runs:
  ``u`` and ``carry`` (centers, snapshots, ...) are returned as they are.
  """
  updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
  step, is_sync = advance(state.step, period)

  def on_sync(loop_carry, params):
    updates, carry = loop_carry
    x = jax.tree.map(
      lambda p, u: p.astype(center_dtype(p.dtype)) + u.astype(center_dtype(p.dtype)),
      params,
      updates,
    )
    return sync(Local(params, updates, x), carry)

  updates, carry = run_on_sync(is_sync, on_sync, (updates, carry), axes, params)
  num_syncs = state.num_syncs + is_sync.astype(jnp.int32)
  return Stepped(updates, inner_state, step, num_syncs, carry)


def register(state_type: type) -> None:
  """``center_params`` reads ``.center``, ``global_step`` reads ``.num_syncs``."""
  _state.register_global_step(state_type, lambda state: state.num_syncs)
  _state.register_center(state_type, lambda state: state.center)
