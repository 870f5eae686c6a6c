"""communication_report: collectives and bytes read from compiled steps, by hand."""

from harness import AXIS
from harness import map_workers
import hlo
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dist

N = 4
# 4 workers; params of 3 + 5 * 6 = 33 float32 numbers: 132 bytes.
PARAMS = {"b": np.zeros((N, 3), np.float32), "w": np.zeros((N, 5, 6), np.float32)}
PARAMS_BYTES = 33 * 4
COUNT_BYTES = 4  # A sync's count of finite workers, in the same all-reduce.


def report(tx, mode="shard_map"):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = jax.vmap(tx.init)(PARAMS)
  return optax_dist.communication_report(map_workers(step, N, mode), PARAMS, state, PARAMS)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_tower_all_reduces_the_gradients_every_step(mode):
  r = report(optax_dist.tower(optax.sgd(0.1), axis_name=AXIS, loss_reduction="sum"), mode)
  assert r.every_step_bytes == PARAMS_BYTES
  assert r.sync_bytes == 0
  assert {c.kind for c in r.collectives} == {"all-reduce"}
  assert all(c.every_step for c in r.collectives)
  assert r.bytes_per_step(10) == PARAMS_BYTES


def test_simultaneous_sync_moves_the_params_once_per_period():
  r = report(optax_dist.elastic_average(optax.sgd(0.1), axis_name=AXIS, communication_period=8))
  assert r.every_step_bytes == 0
  assert r.sync_bytes == PARAMS_BYTES + COUNT_BYTES
  assert not any(c.every_step for c in r.collectives)
  assert r.bytes_per_step(8) == (PARAMS_BYTES + COUNT_BYTES) / 8


def test_round_robin_gathers_n_copies():
  r = report(optax_dist.agn(optax.sgd(0.1), axis_name=AXIS, ordering="round_robin"))
  assert r.every_step_bytes == 0
  assert r.sync_bytes == N * PARAMS_BYTES
  assert {c.kind for c in r.collectives} == {"all-gather"}


def test_a_wrapper_adds_its_own_every_step_collectives():
  # tower over every step, and model averaging's all-reduce on syncs.
  tx = optax_dist.model_average(
    optax_dist.tower(optax.sgd(0.1), axis_name=AXIS), axis_name=AXIS, interval_steps=4
  )
  r = report(tx)
  assert (r.every_step_bytes, r.sync_bytes) == (PARAMS_BYTES, PARAMS_BYTES + COUNT_BYTES)
  assert r.bytes_per_step(4) == PARAMS_BYTES + (PARAMS_BYTES + COUNT_BYTES) / 4


def test_plain_functions_are_jitted_and_scalars_counted():
  def f(x):
    return lax.psum(jnp.sum(x), AXIS), lax.pmax(x, AXIS)

  x = np.ones((N, 10), np.float32)
  r = optax_dist.communication_report(map_workers(f, N, "shard_map"), x)
  assert r.every_step_bytes == 4 + 40
  assert r.sync_bytes == 0
  # Under vmap the workers are one program: nothing goes over a network.
  assert optax_dist.communication_report(jax.vmap(f, axis_name=AXIS), x).collectives == ()


def test_bad_period():
  r = report(optax_dist.tower(optax.sgd(0.1), axis_name=AXIS))
  with pytest.raises(ValueError, match=r"period.*>= 1"):
    r.bytes_per_step(0)


def test_replica_groups_are_read_in_both_forms_xla_prints():
  # Listed (older XLA) and by mesh axes (newer XLA): the same groups.
  listed = "%ar = f32[4]{0} all-reduce(%p), replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%r"
  by_mesh = "%ar = f32[4]{0} all-reduce(%p), replica_groups=mesh['r'=2,'g'=4] {'r'}, to_apply=%r"
  assert (
    hlo.replica_groups(listed) == hlo.replica_groups(by_mesh) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  )
  inside = "%ar = f32[4]{0} all-reduce(%p), replica_groups=mesh['r'=2,'g'=4] {'g'}, to_apply=%r"
  assert hlo.replica_groups(inside) == [[0, 1, 2, 3], [4, 5, 6, 7]]
  both = (
    "%ag = f32[8]{0} all-gather(%p), replica_groups=mesh['r'=2,'g'=4] {'r','g'}, dimensions={0}"
  )
  assert hlo.replica_groups(both) == [list(range(8))]
  # The size of a group is what communication_report calls the workers.
  assert [op.group for op in hlo.ops(f"ENTRY %main {{\n  {by_mesh}\n}}")] == [2]
  assert [op.group for op in hlo.ops(f"ENTRY %main {{\n  {both}\n}}")] == [8]
