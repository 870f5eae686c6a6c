"""A delayed sync's collectives do not depend on the batch: read from a whole train step's jaxpr."""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_dist

N = 4
AXIS = "w"
PARAMS = {"w1": np.zeros((8, 16), np.float32), "w2": np.zeros((16, 4), np.float32)}
PARAMS_BYTES = (8 * 16 + 16 * 4) * 4


def loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"])
  return jnp.mean((h @ params["w2"] - y) ** 2)


def whole_step(tx, sync):
  """Forward, backward and update of one worker, under jit(shard_map) over N workers."""

  def step(params, state, batch):
    params, state, batch = jax.tree.map(lambda a: a[0], (params, state, batch))
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params, sync=sync)
    params = optax.apply_updates(params, updates)
    return jax.tree.map(lambda a: a[None], (params, state))

  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:N])
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))


def report(tx, sync):
  assert jax.device_count() >= N
  params = jax.tree.map(lambda a: np.stack([a] * N), PARAMS)
  state = jax.eval_shape(jax.vmap(tx.init), params)
  batch = (np.zeros((N, 5, 8), np.float32), np.zeros((N, 5, 4), np.float32))
  return optax_dist.overlap_report(whole_step(tx, sync), params, state, batch)


def diloco(delay, **kw):
  return optax_dist.diloco(
    optax.adam(1e-3), axis_name=AXIS, sync_period=8, delay=delay, comm_dtype=None, **kw
  )


@pytest.mark.parametrize("sync", [True, None])
def test_a_delayed_sync_does_not_wait_for_the_gradients(sync):
  # The call that reduces (static flag True; or decided in the program).
  delayed = report(diloco(1), sync)
  assert delayed.collectives, "the sync's all-reduce is in the step"
  assert all(c.independent for c in delayed.collectives), delayed
  assert delayed.dependent_bytes == 0
  # The pseudo-gradient of every param, plus the 4-byte count of finite workers.
  assert delayed.independent_bytes == PARAMS_BYTES + 4
  # The same step with delay = 0: the sync reduces the params after the inner
  # step, computed from the gradients, so the check sees the dependence.
  now = report(diloco(0), sync)
  assert now.collectives and not any(c.independent for c in now.collectives), now
  assert now.dependent_bytes == PARAMS_BYTES + 4


def test_fragments_and_an_int8_ring_stay_independent():
  # An int8 ring (all_to_all then all_gather) with error feedback, and delay
  # 2: fragment 1's reducing call runs the first phase, the call that applies
  # it the second, from the state; neither reads the batch.
  tx = optax_dist.model_average(
    optax.sgd(0.1),
    axis_name=AXIS,
    interval_steps=8,
    fragments={"w1": 0, "w2": 1},
    delay=2,
    comm_dtype=jnp.int8,
    error_feedback=True,
  )
  got = report(tx, 1)
  assert "all_to_all" in {c.primitive for c in got.collectives}, got
  assert "all_gather" not in {c.primitive for c in got.collectives}, got
  assert all(c.independent for c in got.collectives), got
  applied = report(tx, ("apply", 1))
  assert {c.primitive for c in applied.collectives} == {"all_gather"}, applied
  assert all(c.independent for c in applied.collectives), applied
  # Without a delay the same sync waits for the gradients.
  now = optax_dist.model_average(
    optax.sgd(0.1), axis_name=AXIS, interval_steps=8, fragments={"w1": 0, "w2": 1}
  )
  assert not any(c.independent for c in report(now, 1).collectives)


def test_a_tower_step_depends_on_the_batch():
  # Data parallelism all-reduces the gradients: nothing to overlap.
  tx = optax_dist.tower(optax.sgd(0.1), axis_name=AXIS)
  assert jax.device_count() >= N
  params = jax.tree.map(lambda a: np.stack([a] * N), PARAMS)
  state = jax.eval_shape(jax.vmap(tx.init), params)
  batch = (np.zeros((N, 5, 8), np.float32), np.zeros((N, 5, 4), np.float32))

  def step(params, state, batch):
    params, state, batch = jax.tree.map(lambda a: a[0], (params, state, batch))
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(params, updates), state))

  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:N])
  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
  got = optax_dist.overlap_report(fn, params, state, batch)
  assert got.collectives and got.independent_bytes == 0
  assert got.dependent_bytes >= PARAMS_BYTES
