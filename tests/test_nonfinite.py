"""apply_if_all_finite: a NaN on one worker skips the step on every worker."""

from harness import AXIS
from harness import run_transform
from harness import stack
import hlo
import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import numpy_reference
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
  np.testing.assert_array_equal(state.inner_state.sync.calls, [STEPS - 1] * N)
  np.testing.assert_array_equal(state.inner_state.sync.num_syncs, [2] * N)
  center = np.asarray(optax_dist.center_params(state)["w"])
  assert np.isfinite(center).all() and np.isfinite(traj.params[-1]["w"]).all()
  np.testing.assert_array_equal(center, np.broadcast_to(center[0], center.shape))
  # Exactly the training without that step.
  good = gradients()
  del good[BAD_STEP]
  ref = run_transform(elastic(), PARAMS, good, mode=mode)
  np.testing.assert_array_equal(traj.params[-1]["w"], ref.params[-1]["w"])
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, ref.state)


def streaming_int8():
  return optax_dist.diloco(
    optax.adam(0.05),
    axis_name=AXIS,
    sync_period=2,
    fragments={"w": 0, "v": 1},
    comm_dtype="int8",
    error_feedback=True,
  )


@pytest.mark.parametrize("flags", [False, True], ids=["in_graph", "static"])
def test_skipping_composes_with_fragments_int8_and_static_flags(flags):
  # apply_if_all_finite around streaming DiLoCo with int8 syncs: the NaN step
  # is skipped on every worker, and the rest is the training without it (the
  # static flags follow the count of calls, the skipped one included), up to
  # the rounding of a multiply-add that XLA may contract differently in the
  # two programs (the wrapped one selects the update after the sync).
  params = stack({"w": np.array([0.5, -1.0, 2.0], np.float32), "v": np.ones(2, np.float32)}, N)
  rng = np.random.default_rng(5)
  grads = [
    jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params) for _ in range(7)
  ]
  grads[2]["w"][1, 0] = np.nan
  tx = optax_dist.apply_if_all_finite(streaming_int8(), axis_name=AXIS)
  schedule = optax_dist.sync_schedule(jax.vmap(tx.init)(params))
  static = [schedule(i) for i in range(7)] if flags else None
  traj = run_transform(tx, params, grads, mode="shard_map", flags=static)
  np.testing.assert_array_equal(traj.state.total_skipped, [1] * N)
  assert optax_dist.call_count(traj.state) == 7
  good = grads[:2] + grads[3:]
  if flags:  # The loop's flags skip the skipped call's flag too.
    kept = [schedule(i) for i in range(7) if i != 2]
    ref = run_transform(streaming_int8(), params, good, mode="shard_map", flags=kept)
  else:
    ref = run_transform(streaming_int8(), params, good, mode="shard_map")

  def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

  jax.tree.map(close, traj.params[-1], ref.params[-1])
  jax.tree.map(close, traj.state.inner_state, ref.state)


def test_plain_apply_if_finite_desynchronizes_the_workers():
  # What apply_if_all_finite prevents: optax.apply_if_finite decides per
  # worker. Under vmap nothing hangs, but worker 2's counter falls one step
  # behind and the workers no longer sync together. Under shard_map, pmap or
  # several processes the others would wait for it at the next sync.
  tx = optax.apply_if_finite(elastic(), max_consecutive_errors=10)
  state = run_transform(tx, PARAMS, gradients(), mode="vmap").state
  steps = np.asarray(state.inner_state.sync.calls)
  np.testing.assert_array_equal(steps, [STEPS, STEPS, STEPS - 1, STEPS])
  # Worker 2 attempted one sync fewer than the others (synced or skipped).
  attempts = np.asarray(state.inner_state.sync.num_syncs + state.inner_state.sync.num_skipped_syncs)
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
  # The sync's own collectives are unchanged (the params, and the count of
  # finite workers).
  assert in_loops(wrapped) == in_loops(plain) == [("all-reduce", 64 * 32 * 4 + 4)]


SYNC_GUARD_CASES = {
  "elastic_simultaneous": lambda: optax_dist.elastic_average(
    optax.sgd(0.1), axis_name=AXIS, communication_period=2, moving_rate=0.25, rho=0.1
  ),
  "elastic_round_robin": lambda: optax_dist.elastic_average(
    optax.sgd(0.1), axis_name=AXIS, communication_period=2, ordering="round_robin"
  ),
  "agn_simultaneous": lambda: optax_dist.agn(
    optax.sgd(0.1), axis_name=AXIS, communication_period=2
  ),
  "agn_round_robin": lambda: optax_dist.agn(
    optax.sgd(0.1), axis_name=AXIS, communication_period=2, ordering="round_robin"
  ),
  "model_average": lambda: optax_dist.model_average(
    optax.sgd(0.1), axis_name=AXIS, interval_steps=2
  ),
  "model_average_int8": lambda: optax_dist.model_average(
    optax.sgd(0.1), axis_name=AXIS, interval_steps=2, comm_dtype="int8", error_feedback=True
  ),
  "diloco": lambda: optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=2),
}


# The float64 references of the masked mean (tests/numpy_reference.py), with
# the tolerance of each wire (int8's rounding).
MASKED_MEAN_REFERENCES = {
  "model_average": (numpy_reference.model_average, 1e-6),
  "model_average_int8": (numpy_reference.model_average, 0.02),
  "diloco": (numpy_reference.diloco, 1e-6),
}


@pytest.mark.parametrize("name", sorted(SYNC_GUARD_CASES))
@pytest.mark.parametrize("mode", ["vmap", "shard_map"])
def test_a_non_finite_contribution_never_reaches_the_center(name, mode):
  # Worker 2's params become infinite at call 4 (a sync). Its contribution
  # is left out: the center moves from the three others (finite, and not
  # where it was), the sync counts as done, not skipped, and worker 2's
  # dropped count is 1. The good workers never see a non-finite value.
  tx = SYNC_GUARD_CASES[name]()
  grads = gradients(with_nan=False)
  grads[3]["w"][BAD_WORKER, 0] = np.inf
  traj = run_transform(tx, PARAMS, grads, mode=mode)
  states = traj.states
  center = [np.asarray(optax_dist.center_params(s)["w"]) for s in states]
  assert all(np.isfinite(c).all() for c in center)
  assert not np.array_equal(center[3], center[1])
  np.testing.assert_array_equal(center[3], np.broadcast_to(center[3][0], center[3].shape))
  np.testing.assert_array_equal(optax_dist.skipped_syncs(states[3]), [0] * N)
  np.testing.assert_array_equal(optax_dist.global_step(states[3]), [2] * N)
  dropped = [int(k == BAD_WORKER) for k in range(N)]
  np.testing.assert_array_equal(optax_dist.dropped_syncs(states[5]), dropped)
  good = [k for k in range(N) if k != BAD_WORKER]
  assert all(np.isfinite(p["w"][good]).all() for p in traj.params)
  np.testing.assert_array_equal(optax_dist.global_step(states[5]), [3] * N)
  if name in MASKED_MEAN_REFERENCES:  # The center's value: the finite workers' (float64).
    reference, tolerance = MASKED_MEAN_REFERENCES[name]
    x0 = np.asarray(PARAMS["w"][0], np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # The bad worker's own numbers.
      want = [c for _, c in reference(x0, [g["w"] for g in grads], n=N, p=2, inner="sgd")]
    np.testing.assert_allclose(np.stack([c[0] for c in center]), want, atol=tolerance)


@pytest.mark.parametrize("name", ["elastic_round_robin", "agn_simultaneous", "model_average_int8"])
def test_a_sync_with_no_finite_worker_keeps_the_center(name):
  # Every worker's params become infinite at call 4: nothing finite to
  # average, so the center keeps call 2's value and the sync is skipped.
  tx = SYNC_GUARD_CASES[name]()
  grads = gradients(with_nan=False)
  grads[3]["w"][:, 0] = np.inf
  traj = run_transform(tx, PARAMS, grads, mode="vmap")
  center = [np.asarray(optax_dist.center_params(s)["w"]) for s in traj.states]
  np.testing.assert_array_equal(center[3], center[1])
  np.testing.assert_array_equal(optax_dist.skipped_syncs(traj.states[3]), [1] * N)
  np.testing.assert_array_equal(optax_dist.global_step(traj.states[3]), [1] * N)
  np.testing.assert_array_equal(optax_dist.dropped_syncs(traj.states[3]), [1] * N)


def test_commits_that_overflow_keep_the_center():
  # AGN round robin replays the workers' commits on the center one after the
  # other. Each contribution (two gradients of 1e38, summed) is finite, but
  # the second commit of SGD(1) takes the center past float32's largest value
  # (3.4e38). The sync moves nothing: the center keeps its value, the sync
  # counts as skipped and no worker as dropped, and the workers stay finite.
  tx = optax_dist.agn(
    optax.sgd(1.0), axis_name=AXIS, communication_period=2, ordering="round_robin"
  )
  grads = [{"w": np.full((N, 3), 1e38, np.float32)} for _ in range(2)]
  traj = run_transform(tx, PARAMS, grads, mode="vmap")
  np.testing.assert_array_equal(optax_dist.center_params(traj.state)["w"], PARAMS["w"])
  assert np.isfinite(traj.params[1]["w"]).all()
  np.testing.assert_array_equal(optax_dist.skipped_syncs(traj.state), [1] * N)
  np.testing.assert_array_equal(optax_dist.dropped_syncs(traj.state), [0] * N)
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [0] * N)


@pytest.mark.parametrize("name", ["elastic_simultaneous", "agn_simultaneous", "diloco"])
def test_the_guard_adds_no_collective(name):
  # Each worker checks its own contribution locally, and the count of
  # finite workers travels in the sync's own all-reduce: nothing more.
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:N])
  tx = SYNC_GUARD_CASES[name]()
  params = {"w": np.zeros((N, 64, 32), np.float32)}

  def step(p, s, g):
    p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
    u, s = tx.update(g, s, p, sync=True)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
  found = hlo.collectives(fn.lower(params, jax.vmap(tx.init)(params), params).compile().as_text())
  # One all-reduce: the params-sized contribution and the count of finite
  # workers (4 bytes) together.
  assert [op.kind for op in found] == ["all-reduce"] and found[0].nbytes == 64 * 32 * 4 + 4


@pytest.mark.parametrize("delay", [0])
def test_a_worker_whose_inner_state_overflowed_is_left_out_and_restarts(delay):
  # One gradient of 1e30 on worker 2 (call 2, a local call) makes its Adam
  # second moment infinite: its updates are zero from then on while its
  # params stay finite. The next sync (call 4) leaves it out of the mean,
  # counts it and restarts it on the center with a fresh Adam; it then
  # trains like the others.
  tx = optax_dist.diloco(
    optax.adam(0.1), axis_name=AXIS, sync_period=4, outer=optax.sgd(1.0), delay=delay
  )
  grads = [dict(g) for g in gradients(with_nan=False)] + gradients(with_nan=False)[:2]
  grads[1] = {"w": grads[1]["w"].copy()}
  grads[1]["w"][BAD_WORKER] *= np.float32(1e30)
  traj = run_transform(tx, PARAMS, grads, mode="vmap")
  before = np.asarray(traj.params[2]["w"])  # After call 3: the bad worker has not moved.
  np.testing.assert_array_equal(before[BAD_WORKER], np.asarray(traj.params[1]["w"])[BAD_WORKER])
  state = traj.states[3]  # After the sync on call 4.
  np.testing.assert_array_equal(optax_dist.dropped_syncs(state), [0, 0, 1, 0])
  np.testing.assert_array_equal(optax_dist.skipped_syncs(state), 0)
  # The center is the mean of the three others (an outer SGD step of 1), from
  # the params they sent: after call 4 (delay 0) or after call 3 (delay 1).
  sent = np.asarray(traj.params[3 - delay]["w"])
  others = [k for k in range(N) if k != BAD_WORKER]
  center = np.asarray(optax_dist.center_params(state)["w"])
  np.testing.assert_allclose(center[0], sent[others].mean(0), rtol=1e-6)
  # Every worker stands on the center, the bad one with a finite Adam state again.
  np.testing.assert_allclose(np.asarray(traj.params[3]["w"]), center, rtol=1e-6)
  nu = np.asarray(state.inner_state[0].nu["w"])
  assert np.isfinite(nu).all() and (nu[BAD_WORKER] == 0).all()
  # From there on it moves as far per call as the others do.
  moved = np.abs(np.asarray(traj.params[5]["w"]) - np.asarray(traj.params[3]["w"])).sum(1)
  assert moved[BAD_WORKER] > 0.5 * np.median(moved), moved


# The non-finite rules, value by value.


def _grads(steps, seed=5):
  rng = np.random.default_rng(seed)
  return [{"w": rng.normal(size=(N, 3)).astype(np.float32)} for _ in range(steps)]


def _int8_average(**kw):
  return optax_dist.diloco(
    optax.sgd(0.1),
    axis_name=AXIS,
    sync_period=2,
    outer=optax.sgd(1.0),
    comm_dtype=jax.numpy.int8,
    error_feedback=True,
    **kw,
  )


def test_a_dropped_workers_residual_restarts_at_zero():
  grads = _grads(4)
  grads[2]["w"][BAD_WORKER, 0] = np.nan  # Call 3, a local call: dropped at call 4's sync.
  traj = run_transform(_int8_average(), PARAMS, grads, mode="vmap")
  residual = np.asarray(traj.states[3].residual["w"])
  others = [k for k in range(N) if k != BAD_WORKER]
  np.testing.assert_array_equal(residual[BAD_WORKER], 0)
  assert (residual[others] != 0).any(axis=1).all(), residual
  np.testing.assert_array_equal(optax_dist.dropped_syncs(traj.states[3]), [0, 0, 1, 0])


def test_a_sync_that_does_not_move_keeps_the_old_residual():
  grads = _grads(4)
  grads[2]["w"][:, 0] = np.nan  # Every worker: call 4's sync has no finite contribution.
  traj = run_transform(_int8_average(), PARAMS, grads, mode="vmap")
  before, after = traj.states[1], traj.states[3]
  assert (np.asarray(before.residual["w"]) != 0).any()
  np.testing.assert_array_equal(after.residual["w"], before.residual["w"])
  np.testing.assert_array_equal(after.center["w"], before.center["w"])
  np.testing.assert_array_equal(optax_dist.skipped_syncs(after), 1)


def test_a_left_out_worker_lands_on_the_center_not_on_the_blend():
  # Worker 2's gradient of 1e4 times the others' on call 5 carries its params
  # about 1,000 from the center; the delayed sync reduced on call 6 (from
  # those params) leaves it out as a spike, and the apply on call 6 lands it
  # on the center itself (to the rounding of a landing from 1,000 away) while
  # the others land halfway between their params and the center.
  tx = optax_dist.diloco(
    optax.sgd(0.1), axis_name=AXIS, sync_period=2, outer=optax.sgd(1.0), delay=1, blend=0.5
  )
  grads = _grads(6)
  grads[4]["w"][BAD_WORKER] *= np.float32(1e4)
  traj = run_transform(tx, PARAMS, grads, mode="vmap")
  params = np.asarray(traj.params[5]["w"])
  center = np.asarray(optax_dist.center_params(traj.states[5])["w"])
  np.testing.assert_array_equal(optax_dist.dropped_syncs(traj.states[5]), [0, 0, 1, 0])
  np.testing.assert_allclose(params[BAD_WORKER], center[BAD_WORKER], atol=1e-3)
  others = [k for k in range(N) if k != BAD_WORKER]
  assert (np.abs(params[others] - center[others]).max(axis=1) > 1e-2).all()


def test_a_sum_that_overflows_keeps_the_center():
  # Every worker is finite, but their pseudo-gradients (2e38 each) sum to
  # more than float32 holds: the sync is skipped and the center stays.
  tx = optax_dist.diloco(optax.sgd(1.0), axis_name=AXIS, sync_period=1, outer=optax.sgd(1.0))
  params = stack({"w": np.full(3, 1e38, np.float32)}, N)
  grads = [{"w": np.full((N, 3), 2e38, np.float32)}]
  traj = run_transform(tx, params, grads, mode="vmap")
  np.testing.assert_array_equal(optax_dist.center_params(traj.state)["w"], np.float32(1e38))
  np.testing.assert_array_equal(optax_dist.skipped_syncs(traj.state), 1)
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), 0)


def test_top_k_feeds_back_its_error_decayed_by_0_95_by_default():
  rng = np.random.default_rng(6)
  params = stack({"w": np.zeros(64, np.float32)}, N)
  grads = [{"w": rng.normal(size=(N, 64)).astype(np.float32)} for _ in range(6)]

  def run(**kw):
    tx = optax_dist.diloco(
      optax.sgd(0.1), axis_name=AXIS, sync_period=2, outer=optax.sgd(1.0), topk_fraction=0.1, **kw
    )
    return run_transform(tx, params, grads, mode="vmap")

  default, decayed, undecayed = run(), run(error_decay=0.95), run(error_decay=1.0)
  assert (np.asarray(default.state.residual["w"]) != 0).any()
  jax.tree.map(np.testing.assert_array_equal, default.state, decayed.state)
  assert not np.array_equal(default.state.residual["w"], undecayed.state.residual["w"])


def test_agn_mean_divides_by_the_finite_workers():
  lr = 0.5
  tx = optax_dist.agn(
    optax.sgd(lr), axis_name=AXIS, communication_period=2, center_reduction="mean"
  )
  grads = _grads(2)
  grads[0]["w"][BAD_WORKER, 1] = np.nan
  traj = run_transform(tx, PARAMS, grads, mode="vmap")
  others = [k for k in range(N) if k != BAD_WORKER]
  accumulated = (grads[0]["w"] + grads[1]["w"])[others] / 2  # Each finite worker's commit.
  expected = np.asarray(PARAMS["w"][0]) - lr * accumulated.mean(0)
  center = np.asarray(optax_dist.center_params(traj.state)["w"])
  np.testing.assert_allclose(center[0], expected, rtol=1e-6)
  np.testing.assert_array_equal(optax_dist.dropped_syncs(traj.state), [0, 0, 1, 0])


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
@pytest.mark.parametrize("algorithm", ["diloco", "model_average"])
def test_a_finite_spike_is_left_out_and_the_worker_trains_again(algorithm, inner):
  # One gradient of 1e30 on worker 2 (call 6, a local call after the syncs of
  # calls 2 and 4): with SGD inside its params go to about 1e29, finite; with
  # AdamW its second moment overflows. The sync of call 6 leaves it out: the
  # center moves from the three others as in a run without it, the worker is
  # counted and lands on the center, and it trains again.
  tx_inner = optax.sgd(0.1) if inner == "sgd" else optax.adamw(0.1)
  if algorithm == "diloco":
    tx = optax_dist.diloco(tx_inner, axis_name=AXIS, sync_period=2, outer=optax.sgd(1.0))
  else:
    tx = optax_dist.model_average(tx_inner, axis_name=AXIS, interval_steps=2)
  grads = _grads(10)
  spiked = [{"w": g["w"].copy()} for g in grads]
  spiked[5]["w"][BAD_WORKER] *= np.float32(1e30)
  traj = run_transform(tx, PARAMS, spiked, mode="vmap")
  center = [np.asarray(optax_dist.center_params(s)["w"])[0] for s in traj.states]
  np.testing.assert_array_equal(optax_dist.dropped_syncs(traj.states[5]), [0, 0, 1, 0])
  np.testing.assert_array_equal(optax_dist.skipped_syncs(traj.state), 0)
  # The center of call 6 is the mean of the three others' params (an outer
  # SGD step of 1 is model averaging).
  others = [k for k in range(N) if k != BAD_WORKER]
  x6 = np.asarray(traj.params[4]["w"])[others] + np.asarray(traj.updates[5]["w"])[others]
  np.testing.assert_allclose(center[5], x6.mean(0), rtol=1e-5, atol=1e-6)
  # All params finite and within the others' range from there on.
  for p in traj.params[5:]:
    w = np.asarray(p["w"])
    assert np.isfinite(w).all() and np.abs(w).max() < 100, w
  # The bad worker moves again after its restart, like the others.
  moved = np.abs(np.asarray(traj.params[9]["w"]) - np.asarray(traj.params[5]["w"])).sum(1)
  assert moved[BAD_WORKER] > 0.3 * np.median(moved), moved


def test_no_spike_in_a_clean_run_changes_nothing():
  # A clean run keeps every worker (no false spike) and each worker's last norm.
  tx = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=2, outer=optax.sgd(1.0))
  traj = run_transform(tx, PARAMS, _grads(10), mode="vmap")
  np.testing.assert_array_equal(optax_dist.dropped_syncs(traj.state), 0)
  assert (np.asarray(traj.state.last_norm) > 0).all()
