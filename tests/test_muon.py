"""Muon inside DiLoCo (MuLoCo): a reference of independent Muon runs, static flags, fragments."""

from harness import AXIS
from harness import run_transform
from harness import stack
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dist

N, STEPS = 4, 8
MUON = optax.contrib.muon(0.05)  # Newton-Schulz on the matrix, Adam on the vector.


def problem(seed=0):
  rng = np.random.default_rng(seed)
  params = stack({"b": rng.normal(size=6), "w": rng.normal(size=(8, 6))}, N)
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  grads = [
    jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    for _ in range(STEPS)
  ]
  return params, grads


def reference(params, grads, syncs, outer=None):
  """Each worker runs Muon alone; at a sync of ``leaves``, the outer step moves their center.

  ``syncs`` maps a call (counted from 1) to the leaves synced after it.
  """
  state = jax.vmap(MUON.init)(params)
  outer_state = None if outer is None else outer.init(jax.tree.map(lambda x: x[0], params))
  center = jax.tree.map(lambda x: np.asarray(x[0], np.float64), params)
  x = params
  for s, g in enumerate(grads, start=1):
    updates, state = jax.vmap(MUON.update)(g, state, x)
    x = optax.apply_updates(x, updates)
    leaves = syncs.get(s, ())
    if not leaves:
      continue
    delta = {k: center[k] - np.asarray(x[k], np.float64).mean(0) for k in leaves}
    if outer is None:  # SGD(1): the center moves to the mean.
      moved = {k: center[k] - delta[k] for k in leaves}
    else:
      full = {k: delta.get(k, np.zeros_like(center[k])) for k in center}
      step, outer_state = outer.update(jax.tree.map(jnp.asarray, full), outer_state)
      moved = {k: center[k] + np.asarray(step[k], np.float64) for k in leaves}
    center.update(moved)
    x = {k: (np.broadcast_to(center[k], x[k].shape) if k in leaves else x[k]) for k in x}
    x = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), x)
  return x, center


@pytest.mark.parametrize("outer", ["sgd1", "nesterov"])
def test_diloco_with_muon_matches_independent_muon_runs(outer):
  params, grads = problem()
  outer_tx = {"sgd1": optax.sgd(1.0), "nesterov": optax.sgd(0.7, momentum=0.9, nesterov=True)}
  tx = optax_dist.diloco(MUON, axis_name=AXIS, sync_period=4, outer=outer_tx[outer])
  got = run_transform(tx, params, grads, mode="shard_map")
  x, center = reference(
    params, grads, {4: ("b", "w"), 8: ("b", "w")}, None if outer == "sgd1" else outer_tx[outer]
  )
  got_center = optax_dist.center_params(got.state)
  for k in ("b", "w"):
    c = np.asarray(got_center[k])
    np.testing.assert_array_equal(c, np.broadcast_to(c[0], c.shape))
    np.testing.assert_allclose(c[0], center[k], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got.params[-1][k], x[k], rtol=2e-5, atol=2e-6)


def test_diloco_with_muon_and_fragments_matches_independent_muon_runs():
  # Fragment 0 ("b") syncs on calls 2 and 6, fragment 1 ("w") on calls 4 and 8.
  params, grads = problem(1)
  tx = optax_dist.diloco(
    MUON, axis_name=AXIS, sync_period=4, outer=optax.sgd(1.0), fragments={"b": 0, "w": 1}
  )
  got = run_transform(tx, params, grads, mode="shard_map")
  x, center = reference(params, grads, {2: ("b",), 4: ("w",), 6: ("b",), 8: ("w",)})
  got_center = optax_dist.center_params(got.state)
  for k in ("b", "w"):
    np.testing.assert_allclose(np.asarray(got_center[k])[0], center[k], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got.params[-1][k], x[k], rtol=2e-5, atol=2e-6)
  assert int(optax_dist.global_step(got.state)[0]) == 4  # Fragment syncs.


@pytest.mark.parametrize(
  "kwargs",
  [
    {"sync_period": 2, "sync_warmup": 1},
    {"sync_period": 4, "fragments": 2},
  ],
  ids=["warmup", "fragments"],
)
def test_static_flags_give_the_in_graph_results_with_muon_inside(kwargs):
  params, grads = problem(2)
  tx = optax_dist.diloco(MUON, axis_name=AXIS, **kwargs)
  schedule = optax_dist.sync_schedule(tx.init(jax.tree.map(lambda x: x[0], params)))
  flags = [schedule(count) for count in range(STEPS)]
  assert {False} < set(flags)
  in_graph = run_transform(tx, params, grads, mode="shard_map")
  static = run_transform(tx, params, grads, mode="shard_map", flags=flags)
  for a, b in zip(
    jax.tree.leaves((in_graph.params, in_graph.state)),
    jax.tree.leaves((static.params, static.state)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
  center = np.asarray(optax_dist.center_params(static.state)["w"])
  np.testing.assert_array_equal(center, np.broadcast_to(center[0], center.shape))
