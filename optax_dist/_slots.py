"""The counterpart of ``tf.train.Optimizer``'s slots and global step, for optax states.

Optax states are trees of ``NamedTuple`` s; :func:`get_slot_names` and
:func:`get_slot` find the per-parameter slots (Adam's ``mu``, momentum's
``trace``, ...) anywhere in them, and :func:`global_step` the number of
updates an optax_dist transform applied. The search order is
:func:`optax_dist._state.walk`'s.
"""

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_dist import _state
from optax_dist import _tower

# Fields that hold hyperparameters rather than per-parameter slots.
_NOT_SLOTS: dict[type, frozenset[str]] = {
  optax.InjectHyperparamsState: frozenset({"hyperparams", "hyperparams_states"}),
  optax.InjectStatefulHyperparamsState: frozenset({"hyperparams", "hyperparams_states"}),
}


def _is_slot(state: Any, field: str, value: Any) -> bool:
  if field in _NOT_SLOTS.get(type(state), ()):
    return False
  if any(_state.is_state(x) for x in jax.tree.leaves(value, is_leaf=_state.is_state)):
    return False  # A nested state, not a slot.
  leaves = jax.tree.leaves(value)
  if not leaves:
    return False
  # Counters (0-d integers) are bookkeeping, not slots.
  return not all(
    jnp.ndim(x) == 0 and jnp.issubdtype(jnp.result_type(x), jnp.integer) for x in leaves
  )


def _slots(opt_state: Any) -> Iterator[tuple[str, Any]]:
  for state in _state.iter_states(opt_state):
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
  """The global step of the transform inside ``opt_state`` (int32).

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
  for state in _state.iter_states(opt_state):
    if _state.is_periodic(state):
      return state.sync.num_syncs
    if isinstance(state, _tower.TowerState):
      return state.num_updates
  raise ValueError(
    "This optimizer state holds no optax_dist transform, so it has no global "
    "step. Wrap the optimizer in one (e.g. `optax_dist.tower(inner, "
    "axis_name=...)`), or read the step of a plain optax state yourself."
  )
