"""Reading optimizer states: slots (``get_slot``) and the global step.

Optax states are trees of ``NamedTuple`` s (``optax.chain`` gives a tuple of
them, ``optax.masked`` and ``optax.multi_transform`` wrap them, optax_dist's
own states hold the inner state in a field). The helpers here walk any such
tree in a fixed order: depth first, fields in declaration order, containers in
``jax.tree`` order (dicts by sorted key), each state before the states nested
in it.
"""

from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

# State type -> how to read its global step (see `global_step`).
_GLOBAL_STEP_GETTERS: dict[type, Callable[[Any], jax.Array]] = {}

# State type -> how to read its center variables (see `center_params`).
_CENTER_GETTERS: dict[type, Callable[[Any], Any]] = {}

# Fields that hold hyperparameters rather than per-parameter slots.
_NOT_SLOTS: dict[type, frozenset[str]] = {
  optax.InjectHyperparamsState: frozenset({"hyperparams", "hyperparams_states"}),
  optax.InjectStatefulHyperparamsState: frozenset({"hyperparams", "hyperparams_states"}),
}


def register_global_step(state_type: type, getter: Callable[[Any], jax.Array]) -> None:
  """Declares how :func:`global_step` reads a state of ``state_type``."""
  _GLOBAL_STEP_GETTERS[state_type] = getter


def register_center(state_type: type, getter: Callable[[Any], Any]) -> None:
  """Declares how :func:`center_params` reads a state of ``state_type``."""
  _CENTER_GETTERS[state_type] = getter


def _is_state(x: Any) -> bool:
  """A non-empty NamedTuple (``optax.MaskedNode`` is an empty one)."""
  return isinstance(x, tuple) and bool(getattr(x, "_fields", ()))


def _iter_states(tree: Any) -> Iterator[Any]:
  """The NamedTuple states in ``tree``, depth first, parents first."""
  for node in jax.tree.leaves(tree, is_leaf=_is_state):
    if _is_state(node):
      yield node
      for value in node:
        yield from _iter_states(value)


def _is_slot(state: Any, field: str, value: Any) -> bool:
  if field in _NOT_SLOTS.get(type(state), ()):
    return False
  if any(_is_state(x) for x in jax.tree.leaves(value, is_leaf=_is_state)):
    return False  # A nested state, not a slot.
  leaves = jax.tree.leaves(value)
  if not leaves:
    return False
  # Counters (0-d integers) are bookkeeping, not slots.
  return not all(
    jnp.ndim(x) == 0 and jnp.issubdtype(jnp.result_type(x), jnp.integer) for x in leaves
  )


def _slots(opt_state: Any) -> Iterator[tuple[str, Any]]:
  for state in _iter_states(opt_state):
    for field, value in zip(state._fields, state, strict=True):
      if _is_slot(state, field, value):
        yield field, value


def get_slot_names(opt_state: optax.OptState) -> list[str]:
  """The names of the optimizer slots held anywhere in ``opt_state``.

  The counterpart of ``tf.train.Optimizer.get_slot_names``. A slot is a field
  of a state ``NamedTuple`` that holds a tree of arrays, one per parameter
  (Adam's ``mu`` and ``nu``, momentum's ``trace``, ...): not a nested state, a
  scalar integer counter, or ``optax.inject_hyperparams``' hyperparameters.
  Names are listed once each, in the order :func:`get_slot` searches.

  Args:
    opt_state: Any optax state, chained, masked or nested in optax_dist states.

  Returns:
    A list of slot names.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dist
    >>> tx = optax.chain(optax.clip(1.0), optax.adam(0.1))
    >>> optax_dist.get_slot_names(tx.init({"w": jnp.zeros(3)}))
    ['mu', 'nu']
  """
  names: list[str] = []
  for field, _ in _slots(opt_state):
    if field not in names:
      names.append(field)
  return names


def get_slot(opt_state: optax.OptState, name: str) -> Any:
  """The optimizer slot called ``name``, shaped like the params.

  The counterpart of ``tf.train.Optimizer.get_slot``, for all variables at
  once. The state is searched depth first, each state before the states nested
  in it, so the first match is the outermost one; for optax_dist's own states
  the worker's local inner state comes before any other (e.g. a center's own
  optimizer state). Under ``optax.masked`` the slot holds ``optax.MaskedNode``
  where the mask excluded a parameter.

  Args:
    opt_state: Any optax state, chained, masked or nested in optax_dist states.
    name: A slot name, one of :func:`get_slot_names`.

  Returns:
    The slot's tree of arrays.

  Raises:
    KeyError: if no slot has that name; the message lists the names there are.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.tower(optax.sgd(0.1, momentum=0.9), axis_name=None)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.ones(2)}, state, params)
    >>> optax_dist.get_slot(state, "trace")
    {'w': Array([1., 1.], dtype=float32)}
  """
  for field, value in _slots(opt_state):
    if field == name:
      return value
  raise KeyError(
    f"No slot named {name!r} in this optimizer state; its slots are {get_slot_names(opt_state)}."
  )


def global_step(opt_state: optax.OptState) -> jax.Array:
  """The global step of the optax_dist transform inside ``opt_state`` (int32).

  The counterpart of TensorFlow's ``global_step``: for :func:`tower`, the
  number of updates applied. It is the same on every worker. When a state
  holds several optax_dist transforms (e.g. two towers under
  ``optax.multi_transform``), the first in search order (see
  :func:`get_slot`) is read.

  Args:
    opt_state: A state that contains an optax_dist transform's state.

  Returns:
    A 0-d int32 array.

  Raises:
    ValueError: if ``opt_state`` holds no optax_dist state.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dist
    >>> tx = optax.chain(optax.clip(1.0), optax_dist.tower(optax.sgd(0.1), axis_name=None))
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   _, state = tx.update(jnp.ones(2), state, params)
    >>> optax_dist.global_step(state)
    Array(3, dtype=int32)
  """
  for state in _iter_states(opt_state):
    getter = _GLOBAL_STEP_GETTERS.get(type(state))
    if getter is not None:
      return getter(state)
  raise ValueError(
    "This optimizer state holds no optax_dist transform, so it has no global "
    "step. Wrap the optimizer in one (e.g. `optax_dist.tower(inner, "
    "axis_name=...)`), or read the step of a plain optax state yourself."
  )


def center_params(opt_state: optax.OptState, params: optax.Params | None = None) -> optax.Params:
  """The center variables of the periodic transform inside ``opt_state``.

  The counterpart of the reference's ``swapping_saver``: the center, shaped
  like the params and under their names, ready for evaluation or for an orbax
  checkpoint. Every worker holds an identical copy; this returns the caller's.
  The center keeps its own dtype (float32 for bfloat16 params): cast it with
  ``optax.tree.cast_like(center, params)`` where the params' dtype is needed.

  Under ``optax.masked`` (or ``optax.multi_transform``) the center has
  ``optax.MaskedNode`` where the transform does not apply; pass ``params`` to
  fill those leaves from them.

  Args:
    opt_state: A state holding exactly one periodic optax_dist transform
      (anywhere inside a chain or wrapper).
    params: Optional params, to fill the leaves that have no center.

  Returns:
    The center params.

  Raises:
    ValueError: if the state holds no periodic transform, or several (e.g.
      nested ones; read the one you want from its own state).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax.chain(optax.clip(1.0), optax_dist.elastic_average(
    ...     optax.sgd(0.5), axis_name="w", communication_period=1, moving_rate=0.5))
    >>> def step(params):
    ...   state = tx.init(params)
    ...   updates, state = tx.update(-jnp.ones(2), state, params)
    ...   return optax_dist.center_params(state)
    >>> jax.vmap(step, axis_name="w")(jnp.zeros((1, 2)))
    Array([[0.25, 0.25]], dtype=float32)
  """
  centers = [
    getter(state)
    for state in _iter_states(opt_state)
    if (getter := _CENTER_GETTERS.get(type(state))) is not None
  ]
  if not centers:
    raise ValueError(
      "This optimizer state holds no periodic optax_dist transform (such as "
      "`elastic_average`), so it has no center variables."
    )
  if len(centers) > 1:
    raise ValueError(
      f"This optimizer state holds {len(centers)} periodic optax_dist "
      "transforms, each with its own center; call `center_params` on the "
      "state of the one you want."
    )
  center = centers[0]
  if params is None:
    return center

  def fill(c: Any, p: Any) -> Any:
    return p if isinstance(c, optax.MaskedNode) else c

  return jax.tree.map(fill, center, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
