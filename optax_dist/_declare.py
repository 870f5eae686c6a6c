"""What a periodic transform's state holds: one declaration per algorithm.

Every periodic transform (elastic averaging, AGN, model averaging, DiLoCo)
keeps a state ``NamedTuple`` with the engine's fields (``inner_state``,
``center``, ``pending``, ``sync``) and its own. Beside that class, the
algorithm declares each of its own fields once, with a :class:`Field`: whether
its sync reads and writes it, whether it holds one entry per fragment,
whether ``host_offload`` keeps it in host memory, where it stands when every
worker restarts from one point, and whether it is the same on every worker.
From that declaration the engine builds the sync's view of the state, places
the fields, and :func:`optax_dist.resize_workers` restarts them: no other
module names an algorithm's fields.

Here too are the types of the contract between an algorithm and the engine:
what a sync sees of the worker (:class:`Local`), what it returns
(:class:`Synced`), and a delayed sync between its two halves
(:class:`Pending`).
"""

import collections
import dataclasses
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp

Restart = Literal["keep", "center", "zeros"]


@dataclasses.dataclass(frozen=True)
class Field:
  """The roles of one field of a periodic transform's state.

  Attributes:
    synced: The sync reads and writes it (the others pass through the engine
      untouched: the algorithm changes them itself, around the engine's call).
    per_fragment: With ``F > 1`` fragments it is a tuple of ``F`` entries,
      one per fragment, and a fragment's sync sees its own; otherwise it is
      shaped like the params and a fragment's sync sees that fragment's
      leaves.
    offloaded: With ``host_offload=True`` it lives in the host's pinned
      memory between syncs (a field read on every call stays on the device).
    restart: Where it stands when every worker restarts from one point (the
      warm-up, where the workers follow the params; a resize, where they
      restart from the center): ``"keep"`` (as it was), ``"center"`` (that
      point) or ``"zeros"``. A field with no leaves stays as it is.
    shared: It is the same on every worker, so a resize gives every new
      worker worker 0's value; a field of each worker's own that restarts
      with ``"keep"`` is averaged over the old workers.
  """

  synced: bool = True
  per_fragment: bool = False
  offloaded: bool = False
  restart: Restart = "keep"
  shared: bool = False

  def __post_init__(self) -> None:
    if self.restart not in ("keep", "center", "zeros"):
      raise ValueError(f"restart must be 'keep', 'center' or 'zeros', got {self.restart!r}.")


# The center: the global model, the same on every worker, read only at a sync.
CENTER = Field(offloaded=True, restart="center", shared=True)
# An error-feedback residual: each worker's own, restarts at zero.
RESIDUAL = Field(offloaded=True, restart="zeros")
# The norm of a worker's own contribution at its last sync (one per fragment),
# for the spike check: each worker's own, restarts at zero (nothing checked).
LAST_NORM = Field(per_fragment=True, restart="zeros")

# The fields every periodic state holds, which the engine itself handles: the
# inner optimizer's state, the delayed sync in flight and the counters.
ENGINE_FIELDS = ("inner_state", "pending", "sync")

_DECLARED: dict[type, "Declaration"] = {}


class Declaration:
  """A periodic state class and the roles of its fields.

  ``Declaration(State, "diloco", center=CENTER, residual=RESIDUAL, ...)``
  gives the algorithm's name (for error messages) and names every
  field of ``State`` except the engine's (:data:`ENGINE_FIELDS`, of which a
  state holds those it needs); an undeclared field, or a declared one that
  the class lacks, is an error.
  """

  def __init__(self, state: type, algorithm: str, **fields: Field):
    names = tuple(getattr(state, "_fields", ()))
    own = tuple(n for n in names if n not in ENGINE_FIELDS)
    missing = [n for n in own if n not in fields]
    extra = [n for n in fields if n not in own]
    if missing or extra or "center" not in fields:
      raise TypeError(
        f"The declaration of {state.__name__} must give a Field for each of its fields "
        f"except {ENGINE_FIELDS}, the center included; undeclared: {missing}, not fields "
        f"of the class: {extra}."
      )
    self.state = state
    self.algorithm = algorithm
    self.names = names
    self.fields = {n: fields[n] for n in own}
    self.synced = tuple(n for n, f in self.fields.items() if f.synced)
    self.per_fragment = tuple(n for n, f in self.fields.items() if f.per_fragment)
    self.offloaded = tuple(n for n, f in self.fields.items() if f.offloaded)
    # The sync reads and returns its fields as attributes of this tuple.
    self.fields_type = _tuple_type(f"{state.__name__}Fields", self.synced)
    _DECLARED[state] = self

  def view(self, state: Any) -> Any:
    """The synced fields of ``state``, as the sync sees them."""
    return self.fields_type(**{n: getattr(state, n) for n in self.synced})

  def restarted(self, fields: Any, point: Any) -> Any:
    """The synced ``fields`` once every worker stands on ``point``."""
    return fields._replace(
      **{n: self.restart(n, getattr(fields, n), point) for n in fields._fields}
    )

  def restart(self, name: str, value: Any, point: Any) -> Any:
    """Field ``name``'s value ``value`` once every worker stands on ``point``."""
    rule = self.fields[name].restart
    if rule == "keep" or not jax.tree.leaves(value):
      return value
    if rule == "center":
      return jax.tree.map(lambda p, v: jnp.asarray(p, v.dtype), point, value)
    return jax.tree.map(jnp.zeros_like, value)


def _tuple_type(name: str, fields: tuple[str, ...]) -> Any:
  return collections.namedtuple(name, fields)


def declaration(state: Any) -> Declaration:
  """The declaration of a periodic state's class."""
  return _DECLARED[type(state)]


def algorithms() -> str:
  """The periodic algorithms' names, for error messages (``"a, b or c"``)."""
  names = [d.algorithm for d in _DECLARED.values() if d.state.__module__.startswith(__package__)]
  return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def center_dtype(dtype: Any) -> Any:
  """Centers of low-precision params are kept in float32."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return dtype


def zeros_like(tree: Any) -> Any:
  """Zeros shaped like ``tree``; abstract leaves stay abstract."""

  def zeros(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jnp.zeros_like(x)

  return jax.tree.map(zeros, tree)


class Local(NamedTuple):
  """What a sync sees of the worker: its params before this call, the inner
  optimizer's update, and ``x = params + updates`` in center precision."""

  params: Any
  updates: Any
  x: Any

  @classmethod
  def of(cls, params: Any, updates: Any) -> "Local":
    """The worker after its inner step, ``x = params + updates`` in center precision."""
    x = jax.tree.map(
      lambda p, u: p.astype(center_dtype(p.dtype)) + u.astype(center_dtype(p.dtype)),
      params,
      updates,
    )
    return cls(params, updates, x)

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


class Synced(NamedTuple):
  """What an algorithm's sync returns.

  Attributes:
    updates: The worker's updates for this call.
    fields: The new values of the synced fields (the declaration's tuple).
    moved: Whether the center moved: some worker's contribution was finite,
      and so was the result (otherwise the center stays and the sync counts
      as skipped).
    left_out: Whether this worker's own contribution was left out of the sync
      (not finite, or a spike); the engine then counts it as dropped and
      gives it a fresh inner state, and the algorithm lands it on the center.
  """

  updates: Any
  fields: Any
  moved: jax.Array
  left_out: jax.Array


class Pending(NamedTuple):
  """A delayed sync between its reduction and its outer step.

  Attributes:
    value: What the reduction gave, in center precision (DiLoCo: the mean
      pseudo-gradient; model averaging: the new center), shaped like the
      center (only the leaves of the fragment in flight are meaningful).
      Through a quantized ring with ``delay >= 2``, the ring's first phase
      only: the summed chunk this worker owns, in its place (zeros
      elsewhere), whose rounding and ``all_gather`` run on the call that
      applies it.
    moved: Whether the center moves when it is applied (some worker was
      finite, and so is ``value``).
    left_out: Whether this worker's contribution was left out of the
      reduction (not finite, or a spike).
    num_finite: How many workers' contributions were finite (float32; what a
      ring's summed chunk is divided by once gathered).
  """

  value: Any
  moved: jax.Array
  left_out: jax.Array
  num_finite: jax.Array

  @classmethod
  def fresh(cls, like: Any) -> "Pending":
    """Nothing in flight: zeros shaped like ``like`` in center precision."""

    def zeros(p: Any) -> Any:
      dtype = center_dtype(p.dtype)
      if isinstance(p, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(p.shape, dtype, sharding=p.sharding)
      return jnp.zeros_like(p, dtype=dtype)

    value = jax.tree.map(zeros, like)
    false = jnp.zeros([], bool)
    return cls(value, false, false, jnp.zeros([], jnp.float32))


def check_transformation(value: Any, argument: str, example: str) -> None:
  """``value`` must be an optax transformation (an ``init`` and an ``update``), checked at build."""
  if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
    raise TypeError(
      f"`{argument}` must be an optax GradientTransformation (e.g. {example}), got {value!r}."
    )
