"""int4, int2 and top-k syncs with fragments, static flags, apply_if_all_finite, host offload, orbax."""

from harness import AXIS
from harness import run_transform
from harness import stack
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_orbax

import optax_dist

N, STEPS = 4, 8
FORMATS = {
  "int4": {"comm_dtype": jnp.int4, "error_feedback": True},
  "int2": {"comm_dtype": jnp.int2, "error_feedback": True},
  "topk_int4": {"topk_fraction": 0.1, "comm_dtype": jnp.int4},
}


def problem(seed=0, steps=STEPS):
  rng = np.random.default_rng(seed)
  params = stack({"a": rng.normal(size=300), "b": rng.normal(size=(20, 30))}, N)
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  grads = [
    jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    for _ in range(steps)
  ]
  return params, grads


def assert_identical(a, b):
  for x, y in zip(
    jax.tree.leaves((a.params, a.state)), jax.tree.leaves((b.params, b.state)), strict=True
  ):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fmt", ["int2", "topk_int4"])
def test_fragments_and_static_flags(fmt):
  params, grads = problem()
  tx = optax_dist.diloco(
    optax.sgd(0.1, momentum=0.9), axis_name=AXIS, sync_period=4, fragments=2, **FORMATS[fmt]
  )
  schedule = optax_dist.sync_schedule(tx.init(jax.tree.map(lambda x: x[0], params)))
  flags = [schedule(count) for count in range(STEPS)]
  assert [repr(f) for f in flags] == ["False", "0", "False", "1"] * 2
  in_graph = run_transform(tx, params, grads, mode="shard_map")
  static = run_transform(tx, params, grads, mode="shard_map", flags=flags)
  assert_identical(in_graph, static)
  center = optax_dist.center_params(static.state)
  for leaf in jax.tree.leaves(center):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  # Each fragment has its own residual (what its syncs dropped), not zero.
  for leaf in jax.tree.leaves(static.state.residual):
    assert np.abs(np.asarray(leaf)).max() > 0
  assert int(optax_dist.global_step(static.state)[0]) == 4


@pytest.mark.parametrize("fmt", ["int2"])
def test_apply_if_all_finite_skips_the_step_on_every_worker(fmt):
  # A NaN on one worker at step 2: every worker skips it, counters included,
  # so the run is the run without that step, bit for bit.
  params, grads = problem(1, steps=6)
  bad = [dict(g) for g in grads]
  bad[2] = {**bad[2], "b": bad[2]["b"].copy()}
  bad[2]["b"][1, 3, 4] = np.nan

  def make():
    return optax_dist.apply_if_all_finite(
      optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=2, **FORMATS[fmt]),
      axis_name=AXIS,
    )

  skipped = run_transform(make(), params, bad, mode="shard_map")
  without = run_transform(make(), params, grads[:2] + grads[3:], mode="shard_map")
  for x, y in zip(
    jax.tree.leaves(skipped.params[-1]), jax.tree.leaves(without.params[-1]), strict=True
  ):
    np.testing.assert_array_equal(x, y)
    assert np.isfinite(x).all()


@pytest.mark.parametrize("fmt", ["int4"])
def test_host_offload_gives_the_same_bits(fmt):
  params, grads = problem(2, steps=4)

  def run(offload):
    tx = optax_dist.diloco(
      optax.adam(0.05), axis_name=AXIS, sync_period=2, host_offload=offload, **FORMATS[fmt]
    )
    return run_transform(tx, params, grads, mode="shard_map")

  assert_identical(run(True), run(False))


LOW_BIT = {
  "model_average_topk_int4": lambda: optax_dist.model_average(
    optax.adam(0.05),
    axis_name=AXIS,
    interval_steps=test_orbax.PERIOD,
    topk_fraction=0.1,
    comm_dtype=jnp.int4,
  ),
}


@pytest.mark.parametrize("name", sorted(LOW_BIT))
def test_orbax_resume_mid_period_is_bit_identical(name, tmp_path, monkeypatch):
  monkeypatch.setitem(test_orbax.ALGORITHMS, name, LOW_BIT[name])
  test_orbax.test_resume_mid_period_is_bit_identical(name, tmp_path)
