"""The contract every transform of the package honours.

Each case is run through the same checks: it composes with optax's wrappers
(chain, masked, inject_hyperparams, MultiSteps), compiles once, forwards extra
arguments, keeps its state's shapes and dtypes, initializes from
``jax.ShapeDtypeStruct`` params and keeps bfloat16 params in bfloat16. A new
transform joins the suite by adding a ``Case`` to ``CASES``.
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import chex
from harness import AXIS
from harness import map_workers
from harness import run_transform
from harness import stack
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dist


class Case(NamedTuple):
  name: str
  factory: Callable[..., optax.GradientTransformation]  # factory(inner, *, axis_name, **kwargs)
  kwargs: dict[str, Any]  # Static arguments (strings, periods).
  numeric: dict[str, Any]  # Numeric hyperparameters, injectable by optax.inject_hyperparams.

  def make(self, inner=None, **overrides):
    inner = optax.sgd(0.1, momentum=0.5) if inner is None else inner
    return self.factory(inner, axis_name=AXIS, **{**self.kwargs, **self.numeric, **overrides})


CASES = [
  Case("tower_mean", optax_dist.tower, {"loss_reduction": "mean"}, {}),
  Case("tower_sum", optax_dist.tower, {"loss_reduction": "sum"}, {}),
  Case(
    "elastic_simultaneous",
    optax_dist.elastic_average,
    {"communication_period": 2, "ordering": "simultaneous"},
    {"moving_rate": 0.3, "rho": 0.05},
  ),
  Case(
    "elastic_round_robin",
    optax_dist.elastic_average,
    {"communication_period": 2, "ordering": "round_robin"},
    {"moving_rate": 0.3, "rho": 0.05},
  ),
  Case("agn_simultaneous", optax_dist.agn, {"communication_period": 2}, {}),
  Case(
    "agn_round_robin_mean",
    optax_dist.agn,
    {"communication_period": 2, "ordering": "round_robin", "center_reduction": "mean"},
    {},
  ),
  Case("model_average", optax_dist.model_average, {"interval_steps": 2}, {}),
  Case("diloco", optax_dist.diloco, {"sync_period": 2}, {}),
  Case("diloco_bf16_comm", optax_dist.diloco, {"sync_period": 2, "comm_dtype": jnp.bfloat16}, {}),
  Case("apply_if_all_finite", optax_dist.apply_if_all_finite, {"max_consecutive_errors": 2}, {}),
]

N = 2  # Workers, simulated with vmap unless a check says otherwise.
STEPS = 4


def params_and_grads(dtype=jnp.float32, steps=STEPS, seed=0):
  rng = np.random.default_rng(seed)
  params = {"b": rng.normal(size=(3,)), "w": rng.normal(size=(2, 3))}
  params = stack(jax.tree.map(lambda x: jnp.asarray(x, dtype), params), N)
  grads = [
    jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), dtype), params)
    for _ in range(steps)
  ]
  return params, grads


def assert_trajectories_close(a, b, **tol):
  for pa, pb in zip(a.params, b.params, strict=True):
    chex.assert_trees_all_close(pa, pb, **(tol or {"rtol": 1e-6, "atol": 1e-6}))


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
  return request.param


def test_in_chain(case):
  # Scaling before the transform is the same as feeding it scaled gradients.
  params, grads = params_and_grads()
  chained = run_transform(optax.chain(optax.scale(2.0), case.make()), params, grads, mode="vmap")
  direct = run_transform(
    case.make(), params, [jax.tree.map(lambda g: 2 * g, g) for g in grads], mode="vmap"
  )
  assert_trajectories_close(chained, direct)


def test_in_masked(case):
  # Masked-out leaves pass through untouched; masked-in ones see the transform.
  params, grads = params_and_grads()
  masked = run_transform(
    optax.masked(case.make(), {"b": False, "w": True}), params, grads, mode="vmap"
  )
  only_w = run_transform(
    case.make(), {"w": params["w"]}, [{"w": g["w"]} for g in grads], mode="vmap"
  )
  for step, g in enumerate(grads):
    np.testing.assert_array_equal(masked.updates[step]["b"], g["b"])
    np.testing.assert_allclose(
      masked.params[step]["w"], only_w.params[step]["w"], rtol=1e-6, atol=1e-6
    )


def test_in_inject_hyperparams(case):
  params, grads = params_and_grads()
  static = tuple(k for k, v in case.kwargs.items() if not isinstance(v, str))
  injected = optax.inject_hyperparams(case.factory, static_args=static)(
    optax.sgd(0.1, momentum=0.5), axis_name=AXIS, **case.kwargs, **case.numeric
  )
  state = injected.init(jax.tree.map(lambda x: x[0], params))
  assert set(state.hyperparams) == set(case.numeric)
  assert_trajectories_close(
    run_transform(injected, params, grads, mode="vmap"),
    run_transform(case.make(), params, grads, mode="vmap"),
  )


def test_inner_learning_rate_injected_and_changed(case):
  # The inner optimizer's injected learning rate is read every step.
  params, grads = params_and_grads()
  tx = case.make(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
  init = tx.init

  def init_with_lr_0_3(p):
    return optax.tree.set(init(p), learning_rate=jnp.float32(0.3))

  changed = run_transform(tx._replace(init=init_with_lr_0_3), params, grads, mode="vmap")
  assert_trajectories_close(
    changed, run_transform(case.make(optax.sgd(0.3)), params, grads, mode="vmap")
  )


@pytest.mark.parametrize("mode", ["vmap", "shard_map"])
def test_in_multi_steps(case, mode):
  # MultiSteps(k=2) applies the transform once per two calls, to their mean.
  params, grads = params_and_grads()
  multi = run_transform(optax.MultiSteps(case.make(), every_k_schedule=2), params, grads, mode=mode)
  means = [
    jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in range(0, STEPS, 2)
  ]
  direct = run_transform(case.make(), params, means, mode=mode)
  for i, expected in enumerate(direct.params):
    chex.assert_trees_all_close(multi.params[2 * i + 1], expected, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(
      multi.params[2 * i], multi.params[max(2 * i - 1, 0)] if i else params
    )


def test_compiles_once(case):
  tx = case.make()
  traces = []

  def step(p, s, g):
    traces.append(None)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = map_workers(step, N, "vmap")
  params, grads = params_and_grads()
  state = map_workers(tx.init, N, "vmap")(params)
  for g in grads:
    params, state = jax.block_until_ready(step(params, state, g))
  assert len(traces) == 1


def test_extra_args_are_accepted_and_ignored_by_plain_inners(case):
  tx = case.make()
  params, grads = params_and_grads(steps=1)

  def with_extra(p, g):
    return tx.update(g, tx.init(p), p, loss=jnp.float32(1.0), step_size=0.5)[0]

  def without(p, g):
    return tx.update(g, tx.init(p), p)[0]

  chex.assert_trees_all_equal(
    map_workers(with_extra, N, "vmap")(params, grads[0]),
    map_workers(without, N, "vmap")(params, grads[0]),
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_shapes_and_dtypes_are_stable_and_dtype_is_kept(case, dtype):
  params, grads = params_and_grads(dtype)
  tx = case.make()
  traj = run_transform(tx, params, grads, mode="vmap")
  state0 = map_workers(tx.init, N, "vmap")(params)
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, traj.state)
  for updates, new_params in zip(traj.updates, traj.params, strict=True):
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_trees_all_equal_dtypes(new_params, params)


def test_init_on_shape_dtype_structs(case):
  params, _ = params_and_grads()
  one = jax.tree.map(lambda x: x[0], params)
  sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), one)
  tx = case.make()
  real = tx.init(one)
  chex.assert_trees_all_equal_shapes_and_dtypes(tx.init(sds), real)
  abstract = jax.eval_shape(tx.init, sds)
  chex.assert_trees_all_equal_structs(abstract, real)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
    lambda a: (a.shape, a.dtype), real
  )
