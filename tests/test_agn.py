"""agn: gold values of AGNOptimizer, a NumPy reference, bad input."""

from harness import AXIS
from harness import MODES
from harness import run_transform
from harness import stack
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import optax
import pytest

import optax_dist

# Adam with b1 = b2 = 0 moves each coordinate by 0.1 * sign(g) (to 1e-8): the
# reference's test optimizer, for which the shared Adam of the reference and
# the separate local and center states here agree exactly.
SIGN_ADAM = optax.adam(0.1, b1=0.0, b2=0.0)


@pytest.mark.parametrize("mode", MODES)
def test_gold_one_worker_period_four(mode):
  # Local: 0 -> 0.1 -> 0.2 -> 0.3 -> (sync) center 0 + 0.1 = 0.1, worker -> 0.1;
  # the same again: 0.2 after call 8. (v1 = v0 + 0.5 throughout.)
  tx = optax_dist.agn(SIGN_ADAM, axis_name=AXIS, communication_period=4)
  grads = [stack(-np.ones(2, np.float32), 1)] * 8
  traj = run_transform(tx, stack(np.array([0.0, 0.5], np.float32), 1), grads, mode=mode)
  np.testing.assert_allclose(traj.params[0][0], [0.1, 0.6], atol=1e-6)
  np.testing.assert_allclose(traj.params[2][0], [0.3, 0.8], atol=1e-6)
  np.testing.assert_allclose(traj.params[3][0], [0.1, 0.6], atol=1e-6)
  np.testing.assert_allclose(traj.params[7][0], [0.2, 0.7], atol=1e-6)
  np.testing.assert_allclose(optax_dist.center_params(traj.state)[0], [0.2, 0.7], atol=1e-6)
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [2])
  # The accumulator restarts after each sync.
  np.testing.assert_array_equal(traj.state.accumulator, np.zeros((1, 2)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("center_reduction", ["sum", "mean"])
def test_gold_sgd_sees_the_size_of_the_accumulated_gradient(mode, center_reduction):
  # SGD(0.1), period 4, 2 workers with gradients -1, -2, -3, -4 (worker 0)
  # and twice those (worker 1). Worker 0's accumulator after call 4 is -10,
  # normalized by p: -2.5; worker 1's -5. "sum" feeds the center optimizer
  # -7.5: the center moves by 0.75; "mean" feeds -3.75: 0.375. Both workers
  # then stand on the center. (Adam with b1 = b2 = 0 would move it by 0.1
  # whatever the size.)
  tx = optax_dist.agn(
    optax.sgd(0.1), axis_name=AXIS, communication_period=4, center_reduction=center_reduction
  )
  grads = [np.array([[-t], [-2.0 * t]], np.float32) for t in (1.0, 2.0, 3.0, 4.0)]
  traj = run_transform(tx, stack(np.zeros(1, np.float32), 2), grads, mode=mode)
  # Local steps: worker 0 at 0.1, 0.3, 0.6 after calls 1 to 3, worker 1 twice that.
  np.testing.assert_allclose(traj.params[2], [[0.6], [1.2]], rtol=1e-6)
  moved = {"sum": 0.75, "mean": 0.375}[center_reduction]
  np.testing.assert_allclose(traj.params[3], [[moved], [moved]], rtol=1e-6)
  np.testing.assert_allclose(optax_dist.center_params(traj.state), [[moved], [moved]], rtol=1e-6)


def test_gold_one_worker_center_before_the_first_sync():
  tx = optax_dist.agn(SIGN_ADAM, axis_name=AXIS, communication_period=4)
  traj = run_transform(
    tx, stack(np.array([0.0, 0.5], np.float32), 1), [stack(-np.ones(2, np.float32), 1)], mode="vmap"
  )
  np.testing.assert_allclose(traj.params[0][0], [0.1, 0.6], atol=1e-6)
  np.testing.assert_allclose(optax_dist.center_params(traj.state)[0], [0.0, 0.5])
  np.testing.assert_allclose(traj.state.accumulator[0], [-1.0, -1.0])


@pytest.mark.parametrize("mode", MODES)
def test_gold_two_workers_round_robin(mode):
  # Step 1: both at 0.1 locally; worker 0 commits (center 0.1) and leaves with
  # it; worker 1 commits against 0.1 (center 0.2) and leaves with 0.2. Two
  # more steps of both workers take the center to 0.4 and then 0.6.
  tx = optax_dist.agn(SIGN_ADAM, axis_name=AXIS, communication_period=1, ordering="round_robin")
  grads = [stack(-np.ones(1, np.float32), 2)] * 3
  traj = run_transform(tx, stack(np.zeros(1, np.float32), 2), grads, mode=mode)
  np.testing.assert_allclose(traj.params[0], [[0.1], [0.2]], atol=1e-6)
  np.testing.assert_allclose(traj.params[2], [[0.5], [0.6]], atol=1e-6)
  np.testing.assert_allclose(optax_dist.center_params(traj.state), [[0.6], [0.6]], atol=1e-6)
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [3, 3])


@pytest.mark.parametrize("ordering", ["simultaneous", "round_robin"])
def test_center_reduction_mean_scales_the_commits_by_one_over_n(ordering):
  rng = np.random.default_rng(7)
  n, p, steps = 4, 2, 4
  x0 = rng.normal(size=5).astype(np.float32)
  grads = rng.normal(size=(steps, n, 5)).astype(np.float32)
  tx = optax_dist.agn(
    optax.sgd(0.1),
    axis_name=AXIS,
    communication_period=p,
    ordering=ordering,
    center_reduction="mean",
  )
  traj = run_transform(tx, stack(x0, n), list(grads), mode="vmap")
  expected = numpy_reference.agn(
    x0, grads, n=n, p=p, ordering=ordering, inner="sgd", center_reduction="mean"
  )
  np.testing.assert_allclose(traj.params[-1], expected[-1][0], atol=2e-6)
  # With SGD, "sum" moves the center N times as far as "mean".
  summed = numpy_reference.agn(x0, grads[:p], n=n, p=p, ordering=ordering, inner="sgd")
  np.testing.assert_allclose(
    summed[-1][1] - x0, n * (expected[p - 1][1] - x0), rtol=1e-9, atol=1e-12
  )


def test_local_and_center_optimizer_states_are_separate():
  # The local Adam counts every call, the center's Adam counts syncs.
  tx = optax_dist.agn(optax.adam(0.1), axis_name=AXIS, communication_period=3)
  traj = run_transform(
    tx, stack(np.zeros(2, np.float32), 2), [stack(np.ones(2, np.float32), 2)] * 6, mode="vmap"
  )
  np.testing.assert_array_equal(traj.state.inner_state[0].count, [6, 6])
  np.testing.assert_array_equal(traj.state.center_state[0].count, [2, 2])
  # get_slot reads the worker's local state first.
  np.testing.assert_array_equal(optax_dist.get_slot(traj.state, "mu"), traj.state.inner_state[0].mu)


def test_bfloat16_params_keep_a_float32_center_and_accumulator():
  tx = optax_dist.agn(optax.sgd(1.0), axis_name=AXIS, communication_period=2)
  x0 = jnp.ones((1, 3), jnp.bfloat16)

  def train(x):
    state = tx.init(x)
    for _ in range(2):
      u, state = tx.update(jnp.full_like(x, 2.0**-10), state, x)
      assert u.dtype == jnp.bfloat16
      x = optax.apply_updates(x, u)
    return state

  state = jax.vmap(train, axis_name=AXIS)(x0)
  assert state.center.dtype == state.accumulator.dtype == jnp.float32
  # The center moves by 2^-10, below bfloat16's resolution at 1 (2^-7).
  np.testing.assert_allclose(state.center[0], [1.0 - 2.0**-10] * 3, rtol=0, atol=0)
