"""apply_if_all_finite: a NaN on one worker skips the step on every worker."""

from harness import AXIS
from harness import run_transform
from harness import stack
import hlo
import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_dist

N = 4
STEPS = 6
BAD_STEP = 1  # Call 2: a sync step of period 2.
BAD_WORKER = 2


def elastic():
  return optax_dist.elastic_average(
    optax.sgd(0.1), axis_name=AXIS, communication_period=2, moving_rate=0.25
  )


def gradients(with_nan=True):
  rng = np.random.default_rng(0)
  grads = [{"w": rng.normal(size=(N, 3)).astype(np.float32)} for _ in range(STEPS)]
  if with_nan:
    grads[BAD_STEP]["w"][BAD_WORKER, 1] = np.nan
  return grads


PARAMS = stack({"w": np.array([0.5, -1.0, 2.0], np.float32)}, N)


@pytest.mark.parametrize("mode", ["vmap", "shard_map"])
def test_nan_on_one_worker_skips_the_step_on_every_worker(mode):
  tx = optax_dist.apply_if_all_finite(elastic(), axis_name=AXIS)
  traj = run_transform(tx, PARAMS, gradients(), mode=mode)
  state = traj.state
  # The skipped step: zero updates on every worker, not only on the NaN's.
  np.testing.assert_array_equal(traj.updates[BAD_STEP]["w"], np.zeros((N, 3)))
  np.testing.assert_array_equal(state.total_notfinite, [1] * N)
  np.testing.assert_array_equal(state.notfinite_count, [0] * N)
  np.testing.assert_array_equal(state.last_finite, [True] * N)
  np.testing.assert_array_equal(state.inner_state.step, [STEPS - 1] * N)
  np.testing.assert_array_equal(state.inner_state.num_syncs, [2] * N)
  center = np.asarray(optax_dist.center_params(state)["w"])
  assert np.isfinite(center).all() and np.isfinite(traj.params[-1]["w"]).all()
  np.testing.assert_array_equal(center, np.broadcast_to(center[0], center.shape))
  # Exactly the training without that step.
  good = gradients()
  del good[BAD_STEP]
  ref = run_transform(elastic(), PARAMS, good, mode=mode)
  np.testing.assert_array_equal(traj.params[-1]["w"], ref.params[-1]["w"])
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, ref.state)


def test_plain_apply_if_finite_desynchronizes_the_workers():
  # What apply_if_all_finite prevents: optax.apply_if_finite decides per
  # worker. Under vmap nothing hangs, but worker 2's counter falls one step
  # behind and the workers no longer sync together. Under shard_map, pmap or
  # several processes the others would wait for it at the next sync.
  tx = optax.apply_if_finite(elastic(), max_consecutive_errors=10)
  state = run_transform(tx, PARAMS, gradients(), mode="vmap").state
  steps = np.asarray(state.inner_state.step)
  np.testing.assert_array_equal(steps, [STEPS, STEPS, STEPS - 1, STEPS])
  # Worker 2 attempted one sync fewer than the others (synced or skipped).
  attempts = np.asarray(state.inner_state.num_syncs + state.inner_state.num_skipped_syncs)
  np.testing.assert_array_equal(attempts, [3, 3, 2, 3])


def test_max_consecutive_errors_applies_after_k_skips():
  tx = optax_dist.apply_if_all_finite(elastic(), axis_name=AXIS, max_consecutive_errors=1)
  grads = gradients(with_nan=False)[:3]
  grads[0]["w"][1, 0] = np.inf
  grads[1]["w"][3, 2] = np.nan
  traj = run_transform(tx, PARAMS, grads, mode="vmap")
  # Step 1 skipped (count 1), step 2 applied although not finite (count 2 > 1).
  np.testing.assert_array_equal(traj.updates[0]["w"], np.zeros((N, 3)))
  assert np.isnan(traj.params[1]["w"][3, 2])
  np.testing.assert_array_equal(traj.state.total_notfinite, [2] * N)
  np.testing.assert_array_equal(traj.state.notfinite_count, [0] * N)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_max_consecutive_errors(value):
  with pytest.raises(ValueError, match="max_consecutive_errors"):
    optax_dist.apply_if_all_finite(elastic(), axis_name=AXIS, max_consecutive_errors=value)


def _compiled(tx):
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:N])
  params = {"w": np.zeros((N, 64, 32), np.float32)}

  def step(p, s, g):
    p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
    u, s = tx.update(g, s, p)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  state = jax.vmap(tx.init)(params)
  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
  return fn.lower(params, state, params).compile().as_text()


def test_adds_exactly_one_scalar_all_reduce_per_step():
  plain = _compiled(elastic())
  wrapped = _compiled(optax_dist.apply_if_all_finite(elastic(), axis_name=AXIS))

  def outside_loops(text):
    bodies = hlo.while_bodies(text)
    return [op for op in hlo.collectives(text) if op.computation not in bodies]

  def in_loops(text):
    bodies = hlo.while_bodies(text)
    return sorted((op.kind, op.nbytes) for op in hlo.collectives(text) if op.computation in bodies)

  assert outside_loops(plain) == []
  extra = outside_loops(wrapped)
  assert [(op.kind, op.nbytes) for op in extra] == [("all-reduce", 4)], extra
  # The sync's own collectives are unchanged.
  assert in_loops(wrapped) == in_loops(plain) == [("all-reduce", 64 * 32 * 4)]
