"""The mechanism shared by the periodic algorithms (elastic averaging, ...).

Each periodic transform takes a local inner step on every call, counts its
calls, and on every ``period``-th call runs a sync that talks to the other
workers and moves the worker (and a center) by a *correction* added to the
inner update. The pieces here keep that pattern in one place:

* :func:`advance`: the step counter and the sync decision (calls p, 2p, ...).
* :func:`run_on_sync`: runs the sync only on sync steps, as a loop of zero or
  one trip, so non-sync steps execute no collective. A ``lax.cond`` would do
  the same but copies its operands each step, which costs a params-sized copy
  per carried tree; a while loop's carry is updated in place.
* :func:`center_like`: a float32 (at least) copy of the params for centers
  and snapshots, so that small elastic moves are not lost to bfloat16.
"""

from collections.abc import Callable
import numbers
from typing import Any
from typing import TypeVar

import jax
from jax import lax
import jax.numpy as jnp
import optax

from optax_dist import _collectives

T = TypeVar("T")


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


def advance(step: jax.Array, period: int) -> tuple[jax.Array, jax.Array]:
  """The next step counter and whether this call syncs (calls p, 2p, ...)."""
  step = optax.safe_increment(step)
  return step, step % period == 0


def run_on_sync(is_sync: jax.Array, sync: Callable[[T], T], carry: T, axis_name: Any) -> T:
  """``sync(carry)`` on sync steps, ``carry`` otherwise; one branch runs.

  The carry is made varying first (under shard_map) since the sync mixes it
  with per-worker values.
  """
  carry = _collectives.to_varying(carry, axis_name)
  trips = jnp.where(is_sync, 1, 0).astype(jnp.int32)
  return lax.fori_loop(0, trips, lambda _, c: sync(c), carry)
