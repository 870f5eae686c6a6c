"""diloco: model averaging as a special case, a NumPy reference, low-precision comms."""

from harness import AXIS
from harness import run_transform
from harness import stack
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dist


def problem(n, steps, seed):
  rng = np.random.default_rng(seed)
  x0 = rng.normal(size=5).astype(np.float32)
  return x0, rng.normal(size=(steps, n, 5)).astype(np.float32)


@pytest.mark.parametrize("mode", ["vmap", "shard_map"])
def test_sgd_one_outer_equals_model_averaging(mode):
  n, p, steps = 4, 3, 7
  x0, grads = problem(n, steps, 17)
  inner = optax.adam(0.05)
  a = run_transform(
    optax_dist.diloco(inner, axis_name=AXIS, outer=optax.sgd(1.0), sync_period=p),
    stack(x0, n),
    list(grads),
    mode=mode,
  )
  b = run_transform(
    optax_dist.model_average(inner, axis_name=AXIS, interval_steps=p),
    stack(x0, n),
    list(grads),
    mode=mode,
  )
  for pa, pb in zip(a.params, b.params, strict=True):
    np.testing.assert_allclose(pa, pb, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(a.state.center, b.state.center, rtol=1e-6, atol=1e-6)


def test_bfloat16_communication_keeps_a_float32_center():
  n, p, steps = 4, 2, 4
  x0, grads = problem(n, steps, 23)
  exact = run_transform(
    optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=p),
    stack(x0, n),
    list(grads),
    mode="vmap",
  )
  low = run_transform(
    optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=p, comm_dtype=jnp.bfloat16),
    stack(x0, n),
    list(grads),
    mode="vmap",
  )
  assert low.state.center.dtype == low.state.outer_state[0].trace.dtype == jnp.float32
  assert low.params[-1].dtype == np.float32
  diff = np.abs(low.state.center - exact.state.center)
  # The pseudo-gradients (about 0.1 to 1) lose bfloat16's 8 bits, not more ...
  assert diff.max() < 2e-2, diff.max()
  # ... and they do lose them: the communication really is in bfloat16.
  assert diff.max() > 1e-5, diff.max()


def test_bfloat16_params_keep_a_float32_center():
  tx = optax_dist.diloco(optax.sgd(0.0), axis_name=AXIS, sync_period=1, outer=optax.sgd(0.5))
  # Pseudo-gradients c - x = -2^-7 and 0: the center moves by 0.5 * 2^-8.
  x = jnp.asarray([[1.0 + 2.0**-7], [1.0]], jnp.bfloat16)

  def step(xk):
    state = tx.init(jnp.ones_like(xk))
    u, state = tx.update(jnp.zeros_like(xk), state, xk)
    assert u.dtype == jnp.bfloat16
    return state.center

  center = jax.vmap(step, axis_name=AXIS)(x)
  assert center.dtype == jnp.float32
  np.testing.assert_array_equal(center, [[1.0 + 2.0**-9]] * 2)
