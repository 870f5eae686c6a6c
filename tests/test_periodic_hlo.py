"""elastic_average in compiled HLO: collectives only in the sync branch."""

from harness import AXIS
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_dist
from optax_dist import _hlo as hlo

N = 8
PARAMS = {"b": np.zeros((N, 32), np.float32), "w": np.zeros((N, 64, 32), np.float32)}
PARAMS_BYTES = (32 + 64 * 32) * 4


def compiled_step(tx):
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))

  def step(p, s, g):
    p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
    u, s = tx.update(g, s, p)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  state = jax.vmap(tx.init)(PARAMS)
  fn = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)), donate_argnums=(0, 1)
  )
  return fn.lower(PARAMS, state, PARAMS).compile().as_text()


@pytest.mark.parametrize("ordering", ["simultaneous", "round_robin"])
def test_collectives_run_only_in_the_sync_branch(ordering):
  text = compiled_step(
    optax_dist.elastic_average(
      optax.adam(1e-3), axis_name=AXIS, communication_period=4, ordering=ordering
    )
  )
  found = hlo.collectives(text)
  assert found, "the sync must communicate"
  bodies = hlo.while_bodies(text)
  assert {op.computation for op in found} <= bodies, found
  if ordering == "simultaneous":
    # One params-sized all-reduce of the differences, nothing else.
    assert [op.kind for op in found] == ["all-reduce"] * len(found)
    assert sum(op.nbytes for op in found) == PARAMS_BYTES
  else:
    # Every worker receives all N copies of the params.
    assert {op.kind for op in found} == {"all-gather"}
    assert sum(op.nbytes for op in found) == N * PARAMS_BYTES


def test_plain_inner_step_has_no_collective():
  # The baseline the overhead benchmark compares against.
  assert hlo.collectives(compiled_step(optax.adam(1e-3))) == []


def test_hlo_reader_sizes():
  assert hlo.nbytes("(f32[512]{0}, bf16[2,3]{1,0})") == 512 * 4 + 6 * 2
  assert hlo.nbytes("s32[]") == 4
  assert jnp.dtype(jnp.float32).itemsize == 4
