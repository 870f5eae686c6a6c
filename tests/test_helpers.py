"""The Optimizer-API helpers: slots, global step, params agreement, minimize."""

import chex
from harness import AXIS
from harness import MODES
from harness import map_workers
from harness import worker_mesh
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_dist

PARAMS = {"b": jnp.zeros(2), "w": jnp.zeros((2, 3))}
GRADS = {"b": jnp.array([1.0, -2.0]), "w": jnp.full((2, 3), 0.5)}


def one_step(tx, params=PARAMS, grads=GRADS):
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  return state


def test_get_slot_reads_adam_moments_through_chain_and_tower():
  tx = optax.chain(
    optax.clip(10.0),
    optax_dist.tower(optax.adam(0.1, b1=0.9, b2=0.99), axis_name=None),
  )
  state = one_step(tx)
  assert optax_dist.get_slot_names(state) == ["mu", "nu"]
  # After one step: mu = (1 - b1) g, nu = (1 - b2) g^2.
  mu, nu = optax_dist.get_slot(state, "mu"), optax_dist.get_slot(state, "nu")
  for k in PARAMS:
    np.testing.assert_allclose(mu[k], 0.1 * GRADS[k], rtol=1e-6)
    np.testing.assert_allclose(nu[k], 0.01 * GRADS[k] ** 2, rtol=1e-6)


def test_slots_under_masked_multi_transform_and_inject_hyperparams():
  tx = optax.multi_transform(
    {
      "adam": optax.inject_hyperparams(optax.adam)(learning_rate=0.1),
      "momentum": optax.sgd(0.1, momentum=0.9),
    },
    {"b": "momentum", "w": "adam"},
  )
  state = one_step(tx)
  # multi_transform's labels are visited in sorted order; hyperparameters
  # and counters are not slots.
  assert optax_dist.get_slot_names(state) == ["mu", "nu", "trace"]
  mu = optax_dist.get_slot(state, "mu")
  assert isinstance(mu["b"], optax.MaskedNode)
  np.testing.assert_allclose(mu["w"], 0.1 * GRADS["w"], rtol=1e-6)
  np.testing.assert_allclose(optax_dist.get_slot(state, "trace")["b"], GRADS["b"])


def test_first_match_wins_and_missing_slot_lists_the_names():
  # Two momentum states: the outermost first in the chain is returned.
  tx = optax.chain(optax.trace(0.5), optax.trace(0.9))
  state = one_step(tx, grads={"b": jnp.ones(2), "w": jnp.ones((2, 3))})
  np.testing.assert_array_equal(optax_dist.get_slot(state, "trace")["b"], [1.0, 1.0])
  assert optax_dist.get_slot_names(state) == ["trace"]
  with pytest.raises(KeyError, match=r"No slot named 'm'.*\['trace'\]"):
    optax_dist.get_slot(state, "m")


def test_global_step_counts_tower_updates_wherever_it_sits():
  inner = optax_dist.tower(optax.sgd(0.1), axis_name=None)
  for tx, expected in [
    (inner, 4),
    (optax.chain(optax.clip(1.0), inner), 4),
    (optax.masked(inner, {"b": True, "w": False}), 4),
    (
      optax.inject_hyperparams(optax_dist.tower, static_args=("axis_name",))(
        optax.sgd(0.1), axis_name=None
      ),
      4,
    ),
    # MultiSteps applies the inner transform once per 2 calls.
    (optax.MultiSteps(inner, every_k_schedule=2), 2),
  ]:
    state = tx.init(PARAMS)
    for _ in range(4):
      _, state = tx.update(GRADS, state, PARAMS)
    step = optax_dist.global_step(state)
    assert step.dtype == jnp.int32
    assert int(step) == expected


def test_global_step_without_an_optax_dist_state_is_an_error():
  with pytest.raises(ValueError, match="holds no optax_dist transform"):
    optax_dist.global_step(optax.adam(0.1).init(PARAMS))


@pytest.mark.parametrize("mode", MODES)
def test_broadcast_then_average_params(mode):
  n = 4
  rng = np.random.default_rng(0)
  params = {
    "w": rng.normal(size=(n, 3)).astype(np.float32),
    "h": rng.normal(size=(n,)).astype(jnp.bfloat16),
  }

  def f(p):
    return optax_dist.broadcast_params(p, axis_name=AXIS), optax_dist.average_params(
      p, axis_name=AXIS
    )

  same, mean = jax.block_until_ready(map_workers(f, n, mode)(params))
  np.testing.assert_array_equal(same["w"], np.broadcast_to(params["w"][0], (n, 3)))
  np.testing.assert_array_equal(same["h"], np.broadcast_to(params["h"][0], (n,)))
  np.testing.assert_allclose(mean["w"], np.broadcast_to(params["w"].mean(0), (n, 3)), rtol=1e-6)
  # bfloat16 leaves are averaged in float32 and come back in bfloat16.
  assert mean["h"].dtype == jnp.bfloat16
  expected = np.float32(params["h"].astype(np.float32).mean()).astype(jnp.bfloat16)
  np.testing.assert_array_equal(mean["h"], np.broadcast_to(expected, (n,)))


def test_replicated_params_are_returned_as_they_are():
  def f(rep, local):
    return optax_dist.broadcast_params(rep, axis_name=AXIS), optax_dist.average_params(
      local, axis_name=AXIS
    )

  rep, mean = jax.shard_map(f, mesh=worker_mesh(2), in_specs=(P(), P(AXIS)), out_specs=(P(), P()))(
    jnp.float32(3.0), jnp.array([1.0, 2.0])
  )
  assert float(rep) == 3.0
  np.testing.assert_array_equal(mean, [1.5])


def test_average_params_rejects_integer_leaves():
  with pytest.raises(TypeError, match=r"\['steps'\] has dtype int32.*broadcast_params"):
    jax.vmap(lambda p: optax_dist.average_params(p, axis_name=AXIS), axis_name=AXIS)(
      {"steps": jnp.zeros(2, jnp.int32)}
    )


def test_params_helpers_need_a_bound_axis():
  with pytest.raises(NameError, match="'batch' is not bound"):
    optax_dist.broadcast_params(jnp.zeros(2), axis_name="batch")
  with pytest.raises(NameError, match="'batch' is not bound"):
    optax_dist.average_params(jnp.zeros(2), axis_name="batch")


def test_minimize_equals_grad_then_update():
  def loss_fn(params, x):
    pred = x @ params["w"] + params["b"][None, :]
    return jnp.mean(pred**2), {"pred": pred}

  params = {"w": jnp.ones((3, 2)), "b": jnp.array([0.5, -0.5])}
  x = jnp.arange(6.0).reshape(2, 3)
  tx = optax.adam(0.01)
  state = tx.init(params)
  new_params, new_state, (loss, aux) = optax_dist.minimize(
    loss_fn, tx, params, state, x, has_aux=True
  )
  (want_loss, want_aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
  updates, want_state = tx.update(grads, state, params)
  want_params = optax.apply_updates(params, updates)
  x_np = np.arange(6.0).reshape(2, 3)
  assert (
    float(loss)
    == float(want_loss)
    == pytest.approx(np.mean((x_np.sum(1, keepdims=True) + np.array([[0.5, -0.5]])) ** 2))
  )
  chex.assert_trees_all_equal((new_params, new_state, aux), (want_params, want_state, want_aux))
