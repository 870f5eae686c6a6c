"""The declaration of a periodic state's fields: checked, and what the engine derives from it."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dist
from optax_dist import _declare


class _State(NamedTuple):
  inner_state: Any
  center: Any
  kept: Any
  snapshot: Any
  buffer: Any
  empty: Any
  sync: Any


def _declaration():
  return _declare.Declaration(
    _State,
    "test",
    center=_declare.CENTER,
    kept=_declare.Field(shared=True),
    snapshot=_declare.Field(restart="center"),
    buffer=_declare.Field(restart="zeros", synced=False),
    empty=_declare.RESIDUAL,
  )


def test_an_undeclared_field_is_an_error():
  with pytest.raises(TypeError, match=r"undeclared: \['snapshot', 'buffer', 'empty'\]"):
    _declare.Declaration(_State, "test", center=_declare.CENTER, kept=_declare.Field())


def test_a_declared_field_the_class_lacks_is_an_error():
  fields = dict(kept=_declare.Field(), snapshot=_declare.Field(), buffer=_declare.Field())
  with pytest.raises(TypeError, match=r"not fields of the class: \['typo'\]"):
    _declare.Declaration(
      _State,
      "test",
      center=_declare.CENTER,
      empty=_declare.Field(),
      typo=_declare.Field(),
      **fields,
    )


def test_the_center_must_be_declared():
  class NoCenter(NamedTuple):
    inner_state: Any
    sync: Any

  with pytest.raises(TypeError, match="the center included"):
    _declare.Declaration(NoCenter, "test")


def test_a_restart_rule_is_checked():
  with pytest.raises(ValueError, match="restart must be 'keep', 'center' or 'zeros'"):
    _declare.Field(restart="mean")


def test_roles_give_the_sync_its_fields_and_the_restart_rules():
  declared = _declaration()
  assert declared.synced == ("center", "kept", "snapshot", "empty")
  assert declared.offloaded == ("center", "empty")
  assert declared.per_fragment == ()
  state = _State(
    inner_state=None,
    center=jnp.array([1.0, 2.0]),
    kept=jnp.array([3.0]),
    snapshot=jnp.array([4.0, 5.0]),
    buffer=jnp.array([6.0]),
    empty=optax.EmptyState(),
    sync=None,
  )
  fields = declared.view(state)
  assert fields._fields == declared.synced
  restarted = declared.restarted(fields, jnp.array([7.0, 8.0]))
  np.testing.assert_array_equal(restarted.center, [7.0, 8.0])
  np.testing.assert_array_equal(restarted.kept, [3.0])
  np.testing.assert_array_equal(restarted.snapshot, [7.0, 8.0])
  assert restarted.empty == optax.EmptyState()  # No leaves: as it is.
  np.testing.assert_array_equal(declared.restart("buffer", state.buffer, None), [0.0])


@pytest.mark.parametrize(
  ("make", "offloaded", "restarts"),
  [
    (
      lambda: optax_dist.diloco(optax.sgd(0.1), axis_name="w", sync_period=2),
      ("outer_state", "center", "residual"),
      {"outer_state": "keep", "center": "center", "residual": "zeros", "last_norm": "zeros"},
    ),
    (
      lambda: optax_dist.model_average(optax.sgd(0.1), axis_name="w", interval_steps=2),
      ("center", "residual"),
      {"center": "center", "residual": "zeros", "last_norm": "zeros"},
    ),
    (
      lambda: optax_dist.elastic_average(
        optax.sgd(0.1), axis_name="w", communication_period=2, rho=0.1
      ),
      ("center", "residual"),
      {"center": "center", "snapshot": "center", "residual": "zeros"},
    ),
    (
      lambda: optax_dist.agn(optax.sgd(0.1), axis_name="w", communication_period=2),
      ("center_state", "center"),
      {"center_state": "keep", "center": "center", "accumulator": "zeros"},
    ),
  ],
  ids=["diloco", "model_average", "elastic_average", "agn"],
)
def test_every_algorithm_declares_every_field(make, offloaded, restarts):
  state = make().init(jnp.zeros(3))
  declared = _declare.declaration(state)
  assert set(declared.fields) | set(_declare.ENGINE_FIELDS) >= set(state._fields)
  assert declared.offloaded == offloaded
  assert {n: f.restart for n, f in declared.fields.items()} == restarts
  # What the fields of a warm-up restart are, from the roles: the center at
  # the point, the zeros-fields at zero, the others kept.
  point = jnp.full(3, 2.0)
  restarted = declared.restarted(declared.view(state), point)
  for name, rule in restarts.items():
    value = getattr(restarted, name)
    leaves = jax.tree.leaves(value)
    if rule == "center":
      np.testing.assert_array_equal(value, point)
    elif rule == "zeros":
      assert all(not np.any(np.asarray(x)) for x in leaves)
    else:
      same = jax.tree.map(np.array_equal, value, getattr(state, name))
      assert all(jax.tree.leaves(same))


def test_error_messages_name_the_declared_algorithms():
  _declaration()  # A declaration outside the package is not one of them.
  assert _declare.algorithms() == "agn, diloco, elastic_average or model_average"
