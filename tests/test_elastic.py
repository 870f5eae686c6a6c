"""elastic_average: gold values of ElasticAverageOptimizer, a NumPy reference, invariants."""

import functools

from harness import AXIS
from harness import MODES
from harness import map_workers
from harness import run_transform
from harness import stack
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dist

V0_V1 = np.array([0.0, 1.0], np.float32)


@pytest.mark.parametrize("mode", MODES)
def test_gold_one_worker_period_two(mode):
  # SGD lr 1, gradient -1, alpha 1. x: (0,1) -> (1,2) -> (2,3), sync: d = (2,2),
  # x -> (0,1), c -> (2,3) -> call 3: x = (1,2), c stays (2,3).
  tx = optax_dist.elastic_average(
    optax.sgd(1.0), axis_name=AXIS, communication_period=2, moving_rate=1.0
  )
  grads = [stack(-np.ones(2, np.float32), 1)] * 3
  traj = run_transform(tx, stack(V0_V1, 1), grads, mode=mode)
  np.testing.assert_allclose(traj.params[0][0], [1.0, 2.0])
  np.testing.assert_allclose(traj.params[1][0], [0.0, 1.0])
  np.testing.assert_allclose(traj.params[2][0], [1.0, 2.0])
  np.testing.assert_allclose(optax_dist.center_params(traj.state)[0], [2.0, 3.0])
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [1])


@pytest.mark.parametrize("mode", MODES)
def test_gold_two_workers_round_robin(mode):
  # Both at (1,2) after the SGD step. Worker 0: d0 = (1,1), x0 = (0.5,1.5),
  # c = (0.5,1.5). Worker 1: d1 = (0.5,0.5), x1 = (0.75,1.75), c = (0.75,1.75).
  # rho given as an array (as inject_hyperparams would) keeps the snapshot.
  tx = optax_dist.elastic_average(
    optax.sgd(1.0),
    axis_name=AXIS,
    communication_period=1,
    moving_rate=0.5,
    rho=jnp.float32(0.0),
    ordering="round_robin",
  )
  traj = run_transform(tx, stack(V0_V1, 2), [stack(-np.ones(2, np.float32), 2)], mode=mode)
  np.testing.assert_allclose(traj.params[0], [[0.5, 1.5], [0.75, 1.75]])
  np.testing.assert_allclose(optax_dist.center_params(traj.state), [[0.75, 1.75]] * 2)
  # Each worker keeps the center it read at its turn.
  np.testing.assert_allclose(traj.state.snapshot, [[0.0, 1.0], [0.5, 1.5]])


@pytest.fixture(scope="module")
def sync_once():
  """One jitted sync of 4 workers (p = 1, zero inner step), alpha traced."""
  n = 4

  def run(x, center, alpha, ordering):
    tx = optax_dist.elastic_average(
      optax.sgd(0.0), axis_name=AXIS, communication_period=1, moving_rate=alpha, ordering=ordering
    )

    def worker(xk):
      state = tx.init(xk)._replace(center=center, snapshot=center)
      u, state = tx.update(jnp.zeros_like(xk), state, xk)
      return xk + u, state.center

    return jax.vmap(worker, axis_name=AXIS)(x)

  return {
    o: jax.jit(functools.partial(run, ordering=o)) for o in ("simultaneous", "round_robin")
  }, n


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(
  xs=st.lists(st.floats(-10, 10, width=32), min_size=12, max_size=12),
  center=st.floats(-10, 10, width=32),
  alpha=st.floats(2.0**-6, 1.0, width=32),
  ordering=st.sampled_from(["simultaneous", "round_robin"]),
)
def test_elastic_step_conserves_workers_plus_center(sync_once, xs, center, alpha, ordering):
  fns, n = sync_once
  x = jnp.asarray(np.reshape(xs, (n, 3)), jnp.float32)
  new_x, new_c = fns[ordering](x, jnp.full(3, center, jnp.float32), jnp.float32(alpha))
  before = np.asarray(x, np.float64).sum(0) + center
  after = np.asarray(new_x, np.float64).sum(0) + np.asarray(new_c[0], np.float64)
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-4)
  # The workers all hold the same center.
  np.testing.assert_array_equal(new_c, np.broadcast_to(new_c[0], new_c.shape))


def test_bfloat16_params_keep_small_elastic_moves_in_a_float32_center():
  # Workers at 1 + 2^-6 and 1 - 2^-6 around a center at 1: with alpha = 2^-6,
  # each sync moves the center by alpha * sum(d) = 0 and the workers inward by
  # 2^-12, far below bfloat16's resolution at 1 (2^-7). With one worker at
  # 1 + 2^-6, the center gains alpha * d = 2^-12 per sync: kept in float32.
  tx = optax_dist.elastic_average(
    optax.sgd(0.0), axis_name=AXIS, communication_period=1, moving_rate=2.0**-6
  )
  x0 = jnp.asarray([1.0 + 2.0**-6], jnp.bfloat16)

  def train(x):
    state = tx.init(jnp.ones_like(x))
    for _ in range(8):
      u, state = tx.update(jnp.zeros_like(x), state, x)
      assert u.dtype == jnp.bfloat16
    return state

  state = jax.vmap(train, axis_name=AXIS)(x0[None])
  assert state.center.dtype == jnp.float32
  assert state.snapshot == optax.EmptyState()  # rho = 0 reads no snapshot.
  # Center after 8 syncs: 1 + (1 - (1 - 2^-6)^8) * (x - 1), x - 1 = 2^-6.
  expected = 1.0 + (1 - (1 - 2.0**-6) ** 8) * 2.0**-6
  np.testing.assert_allclose(state.center[0], [expected], rtol=1e-6)
  assert float(state.center[0, 0]) != float(jnp.asarray(state.center[0, 0], jnp.bfloat16))


def test_center_params_in_chain_masked_and_errors():
  params = {"a": jnp.zeros(2), "b": jnp.full(2, 7.0)}
  easgd = optax_dist.elastic_average(
    optax.sgd(1.0), axis_name=AXIS, communication_period=1, moving_rate=0.5
  )
  tx = optax.chain(optax.clip(10.0), optax.masked(easgd, {"a": True, "b": False}))

  def step(p):
    state = tx.init(p)
    _, state = tx.update({"a": -jnp.ones(2), "b": -jnp.ones(2)}, state, p)
    return optax_dist.center_params(state, p)

  center = map_workers(step, 1, "vmap")(stack(params, 1))
  # "a": x = 1 after SGD, center 0 + 0.5 * 1; "b" has no center: from params.
  np.testing.assert_allclose(center["a"], [[0.5, 0.5]])
  np.testing.assert_allclose(center["b"], [[7.0, 7.0]])
  with pytest.raises(ValueError, match="holds no periodic"):
    optax_dist.center_params(optax.sgd(0.1).init(params))
  nested = optax_dist.elastic_average(easgd, axis_name=AXIS)
  with pytest.raises(ValueError, match="holds 2 periodic"):
    optax_dist.center_params(nested.init(params))
