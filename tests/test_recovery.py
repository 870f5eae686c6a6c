"""A bad worker never stalls or poisons training (docs/worker_failures.md), without any guard.

One worker's gradient turns NaN on a local step: its params and its inner
optimizer's moments are NaN from then on. At the next sync the others'
contributions alone move the center (checked against a NumPy reference of the
masked mean), the bad worker gets a fresh inner state and lands on the
center (its params replaced by ``restart_nonfinite``, as whoever applies the
updates must), and the sync after that is a normal one.
"""

from harness import AXIS
from harness import map_workers
from harness import stack
from harness import worker_mesh
import hlo
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_dist

N = 4
PERIOD = 4
CALLS = 2 * PERIOD  # Syncs on calls 4 and 8.
BAD_CALL = 2  # A local step (1-based call 2).
BAD = 2  # The worker that goes bad.
GOOD = [k for k in range(N) if k != BAD]
LR = 0.05
ALPHA = 0.25
PARAMS = stack({"w": np.array([0.5, -1.0, 2.0], np.float32), "b": np.ones(2, np.float32)}, N)


def gradients():
  rng = np.random.default_rng(1)
  grads = [
    jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), PARAMS)
    for _ in range(CALLS)
  ]
  grads[BAD_CALL - 1]["w"][BAD, 1] = np.nan
  return grads


CASES = {
  "diloco": lambda: optax_dist.diloco(optax.adam(LR), axis_name=AXIS, sync_period=PERIOD),
  "diloco_int8": lambda: optax_dist.diloco(
    optax.adam(LR), axis_name=AXIS, sync_period=PERIOD, comm_dtype=jnp.int8
  ),
  "model_average": lambda: optax_dist.model_average(
    optax.adam(LR), axis_name=AXIS, interval_steps=PERIOD
  ),
  "agn_simultaneous": lambda: optax_dist.agn(
    optax.adam(LR), axis_name=AXIS, communication_period=PERIOD
  ),
  "agn_round_robin": lambda: optax_dist.agn(
    optax.sgd(LR, momentum=0.9),
    axis_name=AXIS,
    communication_period=PERIOD,
    ordering="round_robin",
  ),
  "elastic_simultaneous": lambda: optax_dist.elastic_average(
    optax.adam(LR), axis_name=AXIS, communication_period=PERIOD, moving_rate=ALPHA, rho=0.1
  ),
  "elastic_round_robin": lambda: optax_dist.elastic_average(
    optax.adam(LR),
    axis_name=AXIS,
    communication_period=PERIOD,
    moving_rate=ALPHA,
    ordering="round_robin",
  ),
}


def expected_center(name, c0, x, acc):
  """The center after the first sync, from the good workers alone (NumPy).

  ``c0``: the center before; ``x[k]``: worker k's params after the sync call's
  inner step; ``acc[k]``: worker k's summed gradients since the start.
  """
  good_x = np.stack([x[k] for k in GOOD])
  if name.startswith("diloco"):
    delta = c0 - good_x.mean(0)
    return c0 - 0.7 * (1 + 0.9) * delta  # Nesterov SGD's first step.
  if name == "model_average":
    return good_x.mean(0)
  if name == "agn_simultaneous":
    g = sum(acc[k] for k in GOOD) / PERIOD
    return c0 - LR * g / (np.abs(g) + 1e-8)  # Adam's first step.
  if name == "agn_round_robin":
    c, trace = c0, np.zeros_like(c0)
    for k in GOOD:  # The commits in worker order, the bad one left out.
      trace = acc[k] / PERIOD + 0.9 * trace
      c = c - LR * trace
    return c
  if name == "elastic_simultaneous":
    return c0 + ALPHA * sum(x[k] - c0 for k in GOOD)
  c = c0
  for k in GOOD:
    c = c + ALPHA * (x[k] - c)
  return c


def run(tx, mode, grads, flags):
  """Calls of ``tx``; on sync calls every worker applies ``restart_nonfinite``."""
  programs = {}

  def make(flag, restart):
    def step(p, s, g):
      u, s = tx.update(g, s, p, **({} if flag == "none" else {"sync": flag}))
      p = optax.apply_updates(p, u)
      if restart:
        p = optax_dist.restart_nonfinite(p, s)
      return p, s

    return map_workers(step, N, mode)

  state = map_workers(tx.init, N, mode)(PARAMS)
  params, out = PARAMS, []
  for i, g in enumerate(grads):
    flag = flags[i]
    if isinstance(flag, str):  # "none" decides in the program; "warmup" does not sync.
      restart = flag == "none" and (i + 1) % PERIOD == 0
    else:  # True or a fragment index.
      restart = flag is not False
    key = (repr(flag), restart)  # 0 == False: tell them apart.
    if key not in programs:
      programs[key] = make(flag, restart)
    params, state = jax.block_until_ready(programs[key](params, state, g))
    out.append((jax.tree.map(np.asarray, params), state))
  return out


def flat(tree):
  return np.concatenate([np.asarray(tree["b"]), np.asarray(tree["w"])], axis=-1)


@pytest.mark.parametrize("mode", ["vmap", "shard_map", "pmap"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_one_nan_worker_recovers_by_the_next_sync(name, mode):
  tx = CASES[name]()
  grads = gradients()
  flags = ["none"] * CALLS  # The program decides from the counter.
  traj = run(tx, mode, grads, flags)
  # Local steps check nothing: the bad worker is NaN until the sync.
  assert np.isnan(flat(traj[PERIOD - 2][0])[BAD]).any()
  assert np.isfinite(flat(traj[PERIOD - 2][0])[GOOD]).all()

  # The first sync: the center moves from the good workers.
  params, state = traj[PERIOD - 1]
  local = run(tx, "vmap", grads[:PERIOD], [False] * PERIOD)[-1][0]
  acc = {k: sum(flat(g)[k] for g in grads[:PERIOD]) for k in GOOD}
  c0 = flat(PARAMS)[0]
  want = expected_center(name, c0, flat(local), acc)
  center = flat(optax_dist.center_params(state))
  if name == "diloco_int8":  # Two roundings of 8 bits of the pseudo-gradient.
    scale = np.abs(c0 - flat(local)[GOOD]).max()
    np.testing.assert_allclose(center, np.broadcast_to(want, center.shape), atol=scale / 50)
  else:
    np.testing.assert_allclose(center, np.broadcast_to(want, center.shape), rtol=2e-6, atol=2e-6)
  np.testing.assert_array_equal(optax_dist.global_step(state), [1] * N)
  np.testing.assert_array_equal(optax_dist.skipped_syncs(state), [0] * N)
  np.testing.assert_array_equal(optax_dist.dropped_syncs(state), [int(k == BAD) for k in range(N)])
  # The bad worker stands on the center with a fresh inner state.
  np.testing.assert_array_equal(flat(params)[BAD], center[BAD])
  fresh = tx.init(jax.tree.map(lambda x: x[0], PARAMS)).inner_state
  jax.tree.map(
    lambda got, new: np.testing.assert_array_equal(np.asarray(got)[BAD], new),
    state.inner_state,
    fresh,
  )
  if name in ("diloco", "model_average", "agn_simultaneous"):  # Everyone lands on it.
    np.testing.assert_allclose(flat(params), center, rtol=1e-6, atol=1e-6)

  # Training goes on: finite everywhere, and the next sync moves the center.
  for p, _ in traj[PERIOD:]:
    assert np.isfinite(flat(p)).all()
  last = traj[-1][1]
  np.testing.assert_array_equal(optax_dist.global_step(last), [2] * N)
  np.testing.assert_array_equal(optax_dist.skipped_syncs(last), [0] * N)
  assert not np.array_equal(flat(optax_dist.center_params(last)), center)


@pytest.mark.parametrize("name", ["diloco", "elastic_round_robin"])
def test_static_flags_recover_alike(name):
  # The static dispatch (one program per kind of call) gives the in-graph
  # results bit for bit, the recovery included.
  tx = CASES[name]()
  grads = gradients()
  schedule = optax_dist.sync_schedule(tx.init(jax.tree.map(lambda x: x[0], PARAMS)))
  static = run(tx, "shard_map", grads, [schedule(i) for i in range(CALLS)])
  in_graph = run(tx, "shard_map", grads, ["none"] * CALLS)
  for (p1, s1), (p2, s2) in zip(static, in_graph, strict=True):
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    jax.tree.map(np.testing.assert_array_equal, s1, s2)


def test_no_finite_worker_skips_the_sync_and_everyone_restarts_at_the_center():
  tx = CASES["diloco"]()
  grads = gradients()
  for k in range(N):
    grads[BAD_CALL - 1]["b"][k, 0] = np.inf
  traj = run(tx, "vmap", grads, ["none"] * CALLS)
  params, state = traj[PERIOD - 1]
  np.testing.assert_array_equal(flat(optax_dist.center_params(state)), flat(PARAMS))
  np.testing.assert_array_equal(optax_dist.skipped_syncs(state), [1] * N)
  np.testing.assert_array_equal(optax_dist.global_step(state), [0] * N)
  np.testing.assert_array_equal(optax_dist.dropped_syncs(state), [1] * N)
  np.testing.assert_array_equal(flat(params), flat(PARAMS))
  np.testing.assert_array_equal(state.inner_state[0].count, [0] * N)  # Fresh Adam.
  # The next sync is a normal one.
  np.testing.assert_array_equal(optax_dist.global_step(traj[-1][1]), [1] * N)
  assert np.isfinite(flat(traj[-1][0])).all()


@pytest.mark.parametrize("mode", ["vmap", "shard_map"])
def test_a_warmup_call_averages_the_finite_gradients_only(mode):
  tx = optax_dist.diloco(optax.sgd(LR), axis_name=AXIS, sync_period=PERIOD, sync_warmup=2)
  grads = gradients()[:2]
  grads[0]["w"][BAD, 1] = np.nan
  grads[1]["w"][BAD, 1] = 0.5
  traj = run(tx, mode, grads, ["none", "warmup"])
  p1, s1 = traj[0]
  mean = np.mean([flat(grads[0])[k] for k in GOOD], axis=0)
  want = flat(PARAMS)[0] - LR * mean
  np.testing.assert_allclose(flat(p1), np.broadcast_to(want, (N, want.size)), rtol=1e-6)
  np.testing.assert_array_equal(optax_dist.dropped_syncs(s1), [int(k == BAD) for k in range(N)])
  np.testing.assert_allclose(flat(optax_dist.center_params(s1)), flat(p1), rtol=1e-6)
  p2, s2 = traj[1]
  mean2 = np.mean(flat(grads[1]), axis=0)  # Call 2: every worker finite.
  np.testing.assert_allclose(flat(p2)[0], want - LR * mean2, rtol=1e-6)
  np.testing.assert_array_equal(optax_dist.dropped_syncs(s2), [int(k == BAD) for k in range(N)])


def test_fragments_restart_the_bad_worker_at_its_first_fragment_sync():
  tx = optax_dist.diloco(
    optax.adam(LR), axis_name=AXIS, sync_period=PERIOD, fragments={"w": 0, "b": 1}
  )
  grads = gradients()
  schedule = optax_dist.sync_schedule(tx.init(jax.tree.map(lambda x: x[0], PARAMS)))
  flags = [schedule(i) for i in range(CALLS)]  # Fragment 0 on calls 2, 6; 1 on 4, 8.
  assert flags[:4] == [False, 0, False, 1]
  traj = run(tx, "vmap", grads, flags)
  params, state = traj[1]  # Call 2: NaN on this call, fragment 0 syncs.
  np.testing.assert_array_equal(optax_dist.dropped_syncs(state), [int(k == BAD) for k in range(N)])
  # Fragment 0 ("w", where the NaN was) lands on its center; "b" is
  # finite and stays this worker's own until its fragment syncs.
  center = optax_dist.center_params(state)
  np.testing.assert_array_equal(params["w"][BAD], center["w"][BAD])
  np.testing.assert_array_equal(state.inner_state[0].count, [2, 2, 0, 2])  # Fresh Adam.
  for p, _ in traj[1:]:
    assert np.isfinite(flat(p)).all()
  np.testing.assert_array_equal(optax_dist.global_step(traj[-1][1]), [4] * N)


def _sync_collectives(tx):
  mesh = worker_mesh(N)
  params = {"w": np.zeros((N, 64, 32), np.float32)}

  def step(p, s, g):
    p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
    u, s = tx.update(g, s, p, sync=True)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
  text = fn.lower(params, jax.vmap(tx.init)(params), params).compile().as_text()
  return hlo.collectives(text)


def test_the_count_travels_in_the_int8_ring():
  # The quantized ring's collectives, with nothing added for the count: it
  # rides after the scales of the all-to-all.
  tx = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=2, comm_dtype=jnp.int8)
  kinds = sorted(op.kind for op in _sync_collectives(tx))
  assert "all-reduce" not in kinds, kinds
  assert kinds.count("all-to-all") == kinds.count("all-gather") >= 1, kinds


def test_restart_nonfinite():
  tx = optax_dist.model_average(optax.sgd(0.1), axis_name=AXIS, interval_steps=2)
  params = {"w": jnp.array([1.0, 2.0], jnp.bfloat16), "b": jnp.array([3.0])}
  state = tx.init(params)
  state = state._replace(center={"w": jnp.array([0.25, 0.5]), "b": jnp.array([-1.0])})
  at = lambda calls: state._replace(sync=state.sync._replace(calls=jnp.int32(calls)))  # noqa: E731
  same = optax_dist.restart_nonfinite(params, at(2))
  jax.tree.map(np.testing.assert_array_equal, same, params)
  bad = {"w": params["w"], "b": jnp.array([jnp.inf])}
  # After call 1, a local call: left as it is, for the sync to count it.
  kept = optax_dist.restart_nonfinite(bad, at(1))
  jax.tree.map(np.testing.assert_array_equal, kept, bad)
  # After call 2, the sync: on the center.
  out = optax_dist.restart_nonfinite(bad, at(2))
  assert out["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [0.25, 0.5])
  np.testing.assert_array_equal(out["b"], [-1.0])
  with pytest.raises(ValueError, match="no periodic optax_dist transform"):
    optax_dist.restart_nonfinite(params, optax.sgd(0.1).init(params))


def nan_loss(params, batch):
  x, y, factor = batch
  return jnp.mean((x @ params["w"] + params["b"][0] - y) ** 2) * factor[0]


@pytest.mark.parametrize("dispatch", ["static", "in_graph"])
def test_data_parallel_step_restarts_a_poisoned_worker_on_sync_calls(dispatch):
  # Worker 2's loss is NaN on call 2: its params are NaN on calls 2 and 3
  # (local steps check nothing), and the sync on call 4 puts it back on the
  # center, finite, with the others.
  mesh = worker_mesh(N)
  tx = optax_dist.diloco(optax.adam(LR), axis_name=AXIS, sync_period=PERIOD)
  step = optax_dist.data_parallel_step(
    nan_loss, tx, mesh=mesh, axis_name=AXIS, params_layout="per_worker", sync_dispatch=dispatch
  )
  params = jax.tree.map(lambda x: x[0], PARAMS)
  p, s = optax_dist.per_worker((params, tx.init(params)), mesh=mesh, axis_name=AXIS)
  rng = np.random.default_rng(3)
  history = []
  for call in range(1, CALLS + 1):
    x = rng.normal(size=(2 * N, 3)).astype(np.float32)
    y = rng.normal(size=2 * N).astype(np.float32)
    factor = np.ones(2 * N, np.float32)
    if call == BAD_CALL:
      factor[2 * BAD : 2 * BAD + 2] = np.nan
    p, s, _ = jax.block_until_ready(step(p, s, (x, y, factor)))
    history.append(flat(jax.tree.map(np.asarray, p)))
  assert np.isnan(history[BAD_CALL - 1][BAD]).any() and np.isnan(history[2][BAD]).any()
  assert np.isfinite(np.delete(history[2], BAD, axis=0)).all()
  center = flat(optax_dist.center_params(jax.device_get(s)))
  for h in history[PERIOD - 1 :]:
    assert np.isfinite(h).all()
  np.testing.assert_array_equal(optax_dist.dropped_syncs(s), [int(k == BAD) for k in range(N)])
  np.testing.assert_array_equal(optax_dist.global_step(s), [2] * N)
  np.testing.assert_array_equal(optax_dist.skipped_syncs(s), [0] * N)
  np.testing.assert_allclose(history[-1], center, rtol=1e-6, atol=1e-6)


def test_restart_on_every_call_still_counts_the_bad_worker():
  # A loop that calls restart_nonfinite after every call: worker 2's NaN
  # gradient on call 2 (local) leaves it NaN until the sync on call 4, which
  # leaves it out, counts it and lands it on the center.
  tx = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=4, outer=optax.sgd(1.0))

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax_dist.restart_nonfinite(optax.apply_updates(params, updates), state), state

  run = map_workers(step, N, "vmap")
  params = stack({"w": np.array([1.0, -1.0], np.float32)}, N)
  state = jax.vmap(tx.init)(params)
  rng = np.random.default_rng(3)
  for call in range(1, 5):
    grads = {"w": rng.normal(size=(N, 2)).astype(np.float32)}
    if call == 2:
      grads["w"][2, 0] = np.nan
    params, state = jax.block_until_ready(run(params, state, grads))
    finite = np.isfinite(np.asarray(params["w"])).all(axis=1)
    assert finite.tolist() == ([True, True, False, True] if call in (2, 3) else [True] * N)
  np.testing.assert_array_equal(optax_dist.dropped_syncs(state), [0, 0, 1, 0])
  center = np.asarray(optax_dist.center_params(state)["w"])
  np.testing.assert_array_equal(np.asarray(params["w"])[2], center[2])
