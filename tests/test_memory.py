"""What each algorithm keeps per worker, in params-sized buffers, pinned.

Sizes come from ``jax.eval_shape`` of ``init``, so a change that adds a buffer
fails here; the memory table of docs/algorithms/index.md states the same
numbers and is checked against them.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dist

AXIS = "workers"
PARAMS = {
  "w": jax.ShapeDtypeStruct((40, 25), jnp.float32),
  "b": jax.ShapeDtypeStruct((25,), jnp.float32),
}
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "algorithms" / "index.md"


def buffers(tx, params=PARAMS):
  """The state's floating arrays (not scalars such as hyperparameters), in params' sizes."""
  state = jax.eval_shape(tx.init, params)
  size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  floats = sum(
    int(np.prod(x.shape))
    for x in jax.tree.leaves(state)
    if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim
  )
  assert floats % size == 0, (floats, size)
  return floats // size


ADAM = optax.adam(1e-3)

# The rows of the docs' memory table: configuration -> (transform, buffers with Adam inside).
ROWS = {
  "tower": (optax_dist.tower(ADAM, axis_name=AXIS), 2),
  "elastic_average, rho = 0": (optax_dist.elastic_average(ADAM, axis_name=AXIS), 3),
  "elastic_average, rho > 0": (optax_dist.elastic_average(ADAM, axis_name=AXIS, rho=0.1), 4),
  "agn": (optax_dist.agn(ADAM, axis_name=AXIS), 6),
  "model_average": (optax_dist.model_average(ADAM, axis_name=AXIS), 3),
  "diloco": (optax_dist.diloco(ADAM, axis_name=AXIS), 4),
  "diloco, int8 with error feedback": (
    optax_dist.diloco(ADAM, axis_name=AXIS, comm_dtype=jnp.int8, error_feedback=True),
    5,
  ),
}


@pytest.mark.parametrize("row", ROWS)
def test_state_size_is_pinned(row):
  tx, expected = ROWS[row]
  assert buffers(tx) == expected


@pytest.mark.parametrize(
  ("name", "algorithm"),
  [
    (
      "elastic_average",
      lambda inner, **kw: optax_dist.elastic_average(inner, axis_name=AXIS, **kw),
    ),
    ("agn", lambda inner, **kw: optax_dist.agn(inner, axis_name=AXIS, **kw)),
    ("model_average", lambda inner, **kw: optax_dist.model_average(inner, axis_name=AXIS, **kw)),
    ("diloco", lambda inner, **kw: optax_dist.diloco(inner, axis_name=AXIS, **kw)),
  ],
)
def test_sizes_are_the_inner_state_plus_the_algorithms_own(name, algorithm):
  # Plain SGD keeps nothing, momentum SGD one buffer, Adam two: the algorithm
  # adds the same on top of each (AGN twice the inner: its center optimizer).
  own = {"elastic_average": 1, "agn": 2, "model_average": 1, "diloco": 2}[name]
  inner_times = 2 if name == "agn" else 1
  for inner, size in ((optax.sgd(0.1), 0), (optax.sgd(0.1, momentum=0.9), 1), (ADAM, 2)):
    assert buffers(algorithm(inner)) == inner_times * size + own, inner
  # Fragments keep one outer state per fragment, each over its own leaves.
  if name == "diloco":
    assert buffers(algorithm(ADAM, fragments=2, sync_period=4)) == 2 + own


def test_rho_given_as_an_array_keeps_the_snapshot():
  # A traced rho (optax.inject_hyperparams) may become non-zero: the snapshot stays.
  injected = optax.inject_hyperparams(
    optax_dist.elastic_average, static_args=("axis_name", "communication_period")
  )
  tx = injected(ADAM, axis_name=AXIS, communication_period=4, rho=0.0)
  assert buffers(tx) == 4
  assert buffers(optax_dist.elastic_average(ADAM, axis_name=AXIS, rho=0)) == 3


def test_the_docs_memory_table_states_the_pinned_sizes():
  text = DOCS.read_text()
  table = text[text.index("## Memory per worker") :].split("\n## ")[0]
  rows = {}
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    match = re.fullmatch(r"`([^`]+)`(.*)", cells[0]) if len(cells) >= 3 else None
    if match and cells[-1].isdigit():
      rows[(match.group(1) + match.group(2)).strip()] = int(cells[-1])
  assert rows == {row: size for row, (_, size) in ROWS.items()}
