"""Delayed fragment syncs (``delay``, ``blend``) against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import optax
import orbax.checkpoint as ocp
import pytest

import optax_dist
from tests.harness import AXIS
from tests.harness import run_transform

N = 4
H = 8  # Two fragments: one every 4 calls, so delays 1, 2 and 3 fit.
T = 22
LR, OUTER_LR, MOMENTUM = 0.1, 0.7, 0.9
LABELS = {"a": 0, "b": 1}
FLAT_LABELS = np.array([0, 0, 1])  # "a" (2 numbers) then "b" (1 number).
WARMUP = 2


def make(alg, tau, blend, **kw):
  common = dict(axis_name=AXIS, fragments=LABELS, sync_warmup=WARMUP, delay=tau, blend=blend)
  if alg == "diloco":
    outer = optax.sgd(OUTER_LR, momentum=MOMENTUM)
    return optax_dist.diloco(optax.sgd(LR), outer=outer, sync_period=H, **common, **kw)
  return optax_dist.model_average(optax.sgd(LR), interval_steps=H, **common, **kw)


def reference(alg, grads, *, tau, blend, n=N, h=H, warmup=WARMUP):
  """The float64 reference (tests/numpy_reference.py): every worker's params after every call.

  Fragment f's sync is scheduled on the calls t with (t - warmup) mod H equal
  to its offset; it is reduced on call t - tau + 1 from the params that call
  receives (before its inner step), over the workers whose fragment is
  finite, and applied on call t after the inner step: the outer step
  (momentum SGD for DiLoCo, the mean for model averaging), then
  x <- blend * x + (1 - blend) * center (a left-out worker, or a non-finite
  number, lands on the center).
  """
  common = dict(n=n, p=h, inner="sgd", warmup=warmup, labels=FLAT_LABELS, delay=tau, blend=blend)
  if alg == "diloco":
    outer = dict(outer_lr=OUTER_LR, momentum=MOMENTUM, nesterov=False)
    out = numpy_reference.diloco(np.zeros(3), grads, **common, **outer)
  else:
    out = numpy_reference.model_average(np.zeros(3), grads, **common)
  return [x for x, _ in out]


def gradients(seed=0, n=N, steps=T):
  return np.random.default_rng(seed).normal(size=(steps, n, 3)).astype(np.float32)


def as_batches(grads):
  return [{"a": jnp.asarray(g[:, :2]), "b": jnp.asarray(g[:, 2:])} for g in grads]


def flat(params):
  return np.concatenate([params["a"], params["b"]], axis=-1)


def zeros(n=N):
  return {"a": jnp.zeros((n, 2)), "b": jnp.zeros((n, 1))}


def check(traj, expected):
  for step, (got, want) in enumerate(zip(traj.params, expected, strict=True)):
    np.testing.assert_allclose(flat(got), want, rtol=2e-5, atol=2e-6, err_msg=f"step {step + 1}")


CASES = [
  (alg, tau, blend) for tau in (1, 2, 3) for blend in (0.0, 0.25, 0.5) for alg in ("diloco",)
]
CASES += [("model_average", 1, 0.5), ("model_average", 3, 0.25)]
# A blend without a delay, and blend 1 (the workers keep their params, only the center moves).
CASES += [("diloco", 0, 0.5), ("diloco", 0, 1.0), ("diloco", 2, 1.0)]


@pytest.mark.parametrize(("alg", "tau", "blend"), CASES)
def test_matches_the_reference_under_vmap(alg, tau, blend):
  grads = gradients()
  traj = run_transform(make(alg, tau, blend), zeros(), as_batches(grads), mode="vmap")
  check(traj, reference(alg, grads, tau=tau, blend=blend))
  # Five fragment syncs after the warm-up, each landing on its scheduled call
  # (6, 10, 14, 18, 22) whatever the delay.
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), 5)


@pytest.mark.parametrize(
  ("mode", "alg", "tau", "blend"),
  [("shard_map", "diloco", 2, 0.25), ("pmap", "model_average", 1, 0.5), ("pmap", "diloco", 3, 0)],
)
def test_matches_the_reference_on_devices(mode, alg, tau, blend):
  assert jax.device_count() >= N
  grads = gradients(1)
  traj = run_transform(make(alg, tau, blend), zeros(), as_batches(grads), mode=mode)
  check(traj, reference(alg, grads, tau=tau, blend=blend))


@pytest.mark.parametrize("tau", [1, 2])
def test_static_flags_are_the_in_graph_path_bit_for_bit(tau):
  # With an int8 ring and error feedback: the residual is written on the call that reduces.
  assert jax.device_count() >= N
  tx = make("diloco", tau, 0.25, comm_dtype=jnp.int8, error_feedback=True)
  batches = as_batches(gradients(2, steps=14))
  in_graph = run_transform(tx, zeros(), batches, mode="shard_map")
  schedule = optax_dist.sync_schedule(in_graph.state)
  assert schedule == optax_dist.SyncSchedule(H, WARMUP, 2, tau)
  flags = [schedule(count) for count in range(14)]
  static = run_transform(tx, zeros(), batches, mode="shard_map", flags=flags)
  for a, b in zip(in_graph.params, static.params, strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  jax.tree.map(np.testing.assert_array_equal, in_graph.state, static.state)
  # Close to the float reference: the ring's rounding only.
  expected = reference("diloco", gradients(2, steps=14), tau=tau, blend=0.25)
  np.testing.assert_allclose(flat(static.params[-1]), expected[-1], atol=0.02)


def test_schedule_flags_name_the_reduce_and_the_apply_calls():
  # A fragment lands on its scheduled call, whatever the delay, and is
  # reduced delay - 1 calls before it.
  one = optax_dist.SyncSchedule(period=4, delay=1)
  assert [one(c) for c in range(9)] == [False] * 3 + [True] + [False] * 3 + [True, False]
  two = optax_dist.SyncSchedule(period=8, fragments=2, warmup=1, delay=3)
  flags = [two(c) for c in range(13)]
  # Fragment 0 scheduled on calls 5 and 13, fragment 1 on call 9.
  first = ["warmup", False, 0, False, ("apply", 0)]
  assert flags == [*first, False, 1, False, ("apply", 1), False, 0, False, ("apply", 0)]
  with pytest.raises(ValueError, match="delay < period / fragments"):
    optax_dist.SyncSchedule(period=8, fragments=2, delay=4)


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"delay": -1}, ValueError, "`delay` must be >= 0"),
    ({"delay": 1.0}, TypeError, "`delay` must be a Python int"),
    ({"delay": True}, TypeError, "`delay` must be a Python int"),
    ({"delay": 4}, ValueError, r"must be < `sync_period` / fragments \(8 / 2 = 4\)"),
    ({"delay": 1, "blend": 1.01}, ValueError, r"`blend` must be in \[0, 1\]"),
    ({"delay": 1, "blend": -0.1}, ValueError, r"`blend` must be in \[0, 1\]"),
    ({"delay": 1, "blend": "0.5"}, TypeError, "`blend` must be a Python float"),
  ],
)
def test_bad_values_get_clear_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=8, fragments=2, **kwargs)


def test_bad_flags_and_callable_fragments_get_clear_errors():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
  grads = jax.tree.map(jnp.ones_like, params)
  # Callable fragments: the count is known at init.
  late = optax_dist.model_average(
    optax.sgd(0.1), axis_name=AXIS, interval_steps=4, fragments=lambda p: LABELS, delay=2
  )
  with pytest.raises(ValueError, match=r"must be < `interval_steps` / fragments \(4 / 2 = 2\)"):
    late.init(params)
  tx = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=8, fragments=2, delay=1)
  state = tx.init(params)
  with pytest.raises(ValueError, match="the call that reduces also applies"):
    jax.vmap(lambda s: tx.update(grads, s, params, sync=("apply", 0)), axis_name=AXIS)(
      jax.tree.map(lambda x: x[None], state)
    )
  tx2 = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=8, fragments=2, delay=2)
  state2 = jax.tree.map(lambda x: x[None], tx2.init(params))
  with pytest.raises(ValueError, match="would reduce all 2 fragments at once"):
    jax.vmap(lambda s: tx2.update(grads, s, params, sync=True), axis_name=AXIS)(state2)
  with pytest.raises(ValueError, match="this state was made with the schedule"):
    jax.vmap(lambda s: tx.update(grads, s, params), axis_name=AXIS)(state2)


def test_a_non_finite_worker_is_left_out_of_the_delayed_mean():
  # Worker 2's gradient is NaN on call 4: its params are NaN from then on, it
  # is left out of every later sync (reduced on calls 5, 9, ...), the others
  # average among themselves.
  grads = gradients(3)
  grads[3, 2] = np.nan
  tx = make("diloco", 2, 0.5)
  traj = run_transform(tx, zeros(), as_batches(grads), mode="vmap")
  check(traj, reference("diloco", grads, tau=2, blend=0.5))
  applied = int(optax_dist.global_step(traj.state)[0])
  assert applied == 5  # Scheduled on calls 6, 10, 14, 18 and 22.
  np.testing.assert_array_equal(optax_dist.dropped_syncs(traj.state), [0, 0, applied, 0])
  np.testing.assert_array_equal(optax_dist.skipped_syncs(traj.state), 0)
  assert np.isfinite(np.asarray(optax_dist.center_params(traj.state)["a"])).all()


def test_resume_with_a_pending_fragment_is_bit_identical(tmp_path):
  # Saved after call 9: fragment 1's sync (scheduled on call 10) was reduced
  # on call 9 and waits in the state for its outer step on call 10.
  tx = make("diloco", 2, 0.25)
  batches = as_batches(gradients(4, steps=12))
  full = run_transform(tx, zeros(), batches, mode="vmap")
  part = run_transform(tx, zeros(), batches[:9], mode="vmap")
  assert optax_dist.sync_schedule(part.state)(9) == ("apply", 1)
  assert bool(np.all(part.state.pending.moved))
  saved = (part.params[-1], part.state)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "state", saved)
    ckptr.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
  with ocp.StandardCheckpointer() as ckptr:
    params, state = ckptr.restore(tmp_path / "state", target)
  jax.tree.map(np.testing.assert_array_equal, state, part.state)
  flags = [optax_dist.sync_schedule(state)(c) for c in range(9, 12)]
  # Resumed by the static flags of the restored count: bit for bit the same.
  from tests.harness import map_workers
  from tests.harness import train_step

  for flag, batch in zip(flags, batches[9:], strict=True):
    step = map_workers(train_step(tx, sync=flag), N, "vmap")
    params, state = jax.block_until_ready(step(params, state, batch))
  jax.tree.map(np.testing.assert_array_equal, params, full.params[-1])
  jax.tree.map(np.testing.assert_array_equal, state, full.state)


def test_resize_drops_a_pending_fragment():
  tx = make("model_average", 2, 0.0)
  batches = as_batches(gradients(5, steps=8))
  # Fragment 0's sync, scheduled on call 6, was reduced on call 5.
  part = run_transform(tx, zeros(), batches[:5], mode="vmap")
  assert bool(np.all(part.state.pending.moved))
  params, state = optax_dist.resize_workers(part.params[-1], part.state, 2)
  assert not np.any(state.pending.moved)
  np.testing.assert_array_equal(state.pending.value["a"], 0)
  step = jax.jit(jax.vmap(lambda p, s, g: _step(tx, p, s, g), axis_name=AXIS))
  g = jax.tree.map(lambda x: x[:2], batches[5])
  params, after = jax.block_until_ready(step(params, state, g))
  # The apply call of the dropped fragment leaves the center, counted as skipped.
  np.testing.assert_array_equal(after.center["a"], state.center["a"])
  np.testing.assert_array_equal(optax_dist.skipped_syncs(after), 1)
  np.testing.assert_array_equal(optax_dist.global_step(after), optax_dist.global_step(state))


def _step(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_host_offload_gives_the_same_numbers():
  if "pinned_host" not in {m.kind for m in jax.devices()[0].addressable_memories()}:
    with pytest.raises(ValueError, match="pinned_host"):
      make("diloco", 2, 0.25, host_offload=True)
    return
  batches = as_batches(gradients(6, steps=10))
  plain = run_transform(make("diloco", 2, 0.25), zeros(), batches, mode="shard_map")
  offloaded = run_transform(
    make("diloco", 2, 0.25, host_offload=True), zeros(), batches, mode="shard_map"
  )
  for a, b in zip(plain.params, offloaded.params, strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_checking_sync_flags_knows_the_delayed_flags():
  tx = make("model_average", 2, 0.0)
  batches = as_batches(gradients(7, steps=6))
  schedule = optax_dist.SyncSchedule(H, WARMUP, 2, 2)
  good = [schedule(c) for c in range(6)]
  assert good[-1] == ("apply", 0)
  with optax_dist.checking_sync_flags():
    run_transform(tx, zeros(), batches, mode="vmap", flags=good)
  bad = [*good[:-1], 0]
  with pytest.raises(ValueError, match=r"gives `sync=\('apply', 0\)`"):
    with optax_dist.checking_sync_flags():
      run_transform(tx, zeros(), batches, mode="vmap", flags=bad)


def test_data_parallel_step_static_and_in_graph_agree_with_a_delay():
  # The host picks the reduce and apply programs from the schedule; the
  # in-graph program decides from the counter; both restart a non-finite
  # worker on the same calls (the calls that reduce or apply).
  from jax.sharding import AxisType

  assert jax.device_count() >= N
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:N])
  tx = make("diloco", 2, 0.25)

  def loss_fn(params, batch):
    return jnp.sum((params["a"] * batch[0]) ** 2) + jnp.sum(params["b"] ** 2)

  rng = np.random.default_rng(8)
  data = [rng.normal(size=(N, 2)).astype(np.float32) for _ in range(12)]
  # Worker 1's "a" (fragment 0) goes bad on call 4 (a local call): left out of
  # the reduction on call 5, restarted at the center after it, counted as
  # dropped on call 6.
  data[3] = data[3].copy()
  data[3][1] = np.nan
  out = {}
  for dispatch in ("static", "in_graph"):
    step = optax_dist.data_parallel_step(
      loss_fn, tx, mesh=mesh, axis_name=AXIS, params_layout="per_worker", sync_dispatch=dispatch
    )
    params = {"a": jnp.ones((N, 2)), "b": jnp.ones((N, 1))}
    state = jax.vmap(tx.init)(params)
    for batch in data:
      params, state, _ = jax.block_until_ready(step(params, state, batch))
    out[dispatch] = (params, state)
  jax.tree.map(np.testing.assert_array_equal, out["static"], out["in_graph"])
  params, state = out["static"]
  assert np.isfinite(np.asarray(params["a"])).all()
  np.testing.assert_array_equal(optax_dist.dropped_syncs(state), [0, 1, 0, 0])


@pytest.mark.parametrize(
  ("alg", "tau", "kwargs"),
  [
    ("diloco", 2, {"comm_dtype": jnp.int8}),
    ("diloco", 3, {"comm_dtype": jnp.int4, "error_feedback": True}),
    ("model_average", 2, {"comm_dtype": jnp.int2, "error_feedback": True}),
  ],
)
def test_a_ring_that_waits_runs_one_phase_per_call_with_the_same_numbers(
  alg, tau, kwargs, monkeypatch
):
  # With delay >= 2 the ring's all-to-all runs on the reducing call and its
  # all-gather on the applying one; the numbers are those of the whole ring
  # run on the reducing call (the owner's chunk waits in `pending`).
  from optax_dist import _reduce

  assert jax.device_count() >= N
  rng = np.random.default_rng(4)
  params = {"a": jnp.zeros((N, 40)), "b": jnp.zeros((N, 24))}
  batches = [
    {
      "a": jnp.asarray(rng.normal(size=(N, 40)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(N, 24)), jnp.float32),
    }
    for _ in range(14)
  ]
  split = run_transform(make(alg, tau, 0.25, **kwargs), params, batches, mode="shard_map")
  monkeypatch.setattr(_reduce, "splits_in_two", lambda wire: False)
  whole = run_transform(make(alg, tau, 0.25, **kwargs), params, batches, mode="shard_map")
  for a, b in zip(split.params, whole.params, strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  center = optax_dist.center_params
  jax.tree.map(np.testing.assert_array_equal, center(split.state), center(whole.state))
  jax.tree.map(np.testing.assert_array_equal, split.state.residual, whole.state.residual)
  assert not np.array_equal(split.params[-1]["a"], params["a"])


def test_a_ring_that_waits_sends_its_phases_on_different_calls():
  assert jax.device_count() >= N
  from jax.sharding import PartitionSpec as P

  from tests.harness import worker_mesh

  tx = make("diloco", 2, 0.0, comm_dtype=jnp.int4, error_feedback=True)
  mesh = worker_mesh(N)
  params = {"a": jnp.zeros((N, 40)), "b": jnp.zeros((N, 24))}
  state = jax.jit(jax.shard_map(jax.vmap(tx.init), mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))(
    params
  )

  def collectives(flag):
    def step(p, s, g):
      u, s = tx.update(
        jax.tree.map(lambda x: x[0], g),
        jax.tree.map(lambda x: x[0], s),
        jax.tree.map(lambda x: x[0], p),
        sync=flag,
      )
      return jax.tree.map(lambda x: x[None], (u, s))

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    text = fn.lower(params, state, params).compile().as_text()
    return {kind: text.count(f" {kind}(") for kind in ("all-to-all", "all-gather", "all-reduce")}

  schedule = optax_dist.sync_schedule(state)
  flags = [schedule(count) for count in range(WARMUP, WARMUP + H)]
  assert flags[2:4] == [0, ("apply", 0)]
  assert collectives(False) == {"all-to-all": 0, "all-gather": 0, "all-reduce": 0}
  reducing, applying = collectives(0), collectives(("apply", 0))
  assert reducing["all-to-all"] == 1 and reducing["all-gather"] == 0, reducing
  assert applying["all-gather"] == 1 and applying["all-to-all"] == 0, applying
