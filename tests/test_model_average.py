"""model_average: gold values of ModelAverageOptimizer, a NumPy reference, bad input."""

from harness import AXIS
from harness import MODES
from harness import run_transform
from harness import stack
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dist


@pytest.mark.parametrize("mode", MODES)
def test_gold_two_workers_interval_two(mode):
  # Worker 0 (g = -1): (0,1) -> (1,2); worker 1 (g = -2): (0,1) -> (2,3).
  # Step 2: (2,3) and (4,5) before averaging, (3,4) for both after. Step 3:
  # worker 0 at (4,5), the center still (3,4).
  tx = optax_dist.model_average(optax.sgd(1.0), axis_name=AXIS, interval_steps=2)
  g = np.array([[-1.0, -1.0], [-2.0, -2.0]], np.float32)
  traj = run_transform(tx, stack(np.array([0.0, 1.0], np.float32), 2), [g] * 3, mode=mode)
  np.testing.assert_array_equal(traj.params[0][0], [1.0, 2.0])
  np.testing.assert_array_equal(traj.params[1], [[3.0, 4.0], [3.0, 4.0]])
  np.testing.assert_array_equal(traj.params[2][0], [4.0, 5.0])
  np.testing.assert_array_equal(optax_dist.center_params(traj.state), [[3.0, 4.0]] * 2)
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [1, 1])


def test_gold_center_before_the_first_average():
  tx = optax_dist.model_average(optax.sgd(1.0), axis_name=AXIS, interval_steps=2)
  g = np.array([[-1.0, -1.0], [-2.0, -2.0]], np.float32)
  traj = run_transform(tx, stack(np.array([0.0, 1.0], np.float32), 2), [g], mode="vmap")
  np.testing.assert_array_equal(optax_dist.center_params(traj.state)[0], [0.0, 1.0])


def test_inner_states_stay_per_worker():
  # Momentum buffers are not averaged: each worker keeps its own.
  tx = optax_dist.model_average(optax.sgd(0.1, momentum=0.9), axis_name=AXIS, interval_steps=1)
  g = np.array([[1.0], [3.0]], np.float32)
  traj = run_transform(tx, stack(np.zeros(1, np.float32), 2), [g], mode="vmap")
  np.testing.assert_allclose(optax_dist.get_slot(traj.state, "trace"), [[1.0], [3.0]])
  np.testing.assert_allclose(traj.params[0], [[-0.2], [-0.2]], rtol=1e-6)


def test_bfloat16_params_are_averaged_in_float32():
  tx = optax_dist.model_average(optax.sgd(0.0), axis_name=AXIS, interval_steps=1)
  # The mean of 1 and 1 + 2^-7 is 1 + 2^-8, between two bfloat16 values.
  x = jnp.asarray([[1.0], [1.0 + 2.0**-7]], jnp.bfloat16)

  def step(xk):
    u, state = tx.update(jnp.zeros_like(xk), tx.init(xk), xk)
    assert u.dtype == jnp.bfloat16
    return state.center

  center = jax.vmap(step, axis_name=AXIS)(x)
  assert center.dtype == jnp.float32
  np.testing.assert_array_equal(center, [[1.0 + 2.0**-8]] * 2)
