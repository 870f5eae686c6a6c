"""Scale-out shapes: FSDP inside a replica, the GSPMD (vmap + spmd_axis_name) path,
state offloaded to host memory, and resizing the number of replicas.
"""

import functools
import re
import types

import harness
from harness import AXIS
from harness import run_transform
from harness import stack
import hlo
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_dist

REPLICAS, FSDP = 2, 4
DIM_IN, DIM_OUT, BATCH = 32, 8, 16  # BATCH per replica, split over its FSDP devices.
STEPS = 6

ALGORITHMS = {
  "elastic_average": lambda **kw: optax_dist.elastic_average(
    optax.adam(0.05), communication_period=2, moving_rate=0.3, **kw
  ),
  "elastic_average_round_robin": lambda **kw: optax_dist.elastic_average(
    optax.sgd(0.1), communication_period=2, ordering="round_robin", **kw
  ),
  "agn": lambda **kw: optax_dist.agn(optax.adam(0.05), communication_period=2, **kw),
  "agn_round_robin": lambda **kw: optax_dist.agn(
    optax.sgd(0.1), communication_period=2, ordering="round_robin", **kw
  ),
  "model_average": lambda **kw: optax_dist.model_average(optax.adam(0.05), interval_steps=2, **kw),
  "diloco": lambda **kw: optax_dist.diloco(
    optax.adam(0.05), sync_period=4, fragments=2, sync_warmup=1, **kw
  ),
}


def data(seed=0):
  rng = np.random.default_rng(seed)
  w0 = {
    "w": rng.normal(size=(DIM_IN, DIM_OUT)).astype(np.float32) * 0.3,
    "b": np.zeros(DIM_OUT * 4, np.float32),  # 32 numbers: 8 per FSDP device.
  }
  x = rng.normal(size=(STEPS, REPLICAS, BATCH, DIM_IN)).astype(np.float32)
  y = rng.normal(size=(STEPS, REPLICAS, BATCH, DIM_OUT)).astype(np.float32)
  return w0, x, y


def loss(params, x, y):
  b = params["b"].reshape(4, DIM_OUT).sum(0)
  return jnp.mean((x @ params["w"] + b[None] - y) ** 2)


def whole_params_run(name):
  """Every replica holds all its params: shard_map over 2 devices, one per replica."""
  w0, x, y = data()
  tx = ALGORITHMS[name](axis_name=AXIS)
  return run_transform(
    tx,
    stack(w0, REPLICAS),
    [(x[t], y[t]) for t in range(STEPS)],
    mode="shard_map",
    grad_fn=lambda p, batch: loss(p, *batch),
  )


def fsdp_mesh():
  assert jax.device_count() == REPLICAS * FSDP
  return jax.make_mesh((REPLICAS, FSDP), ("replica", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def fsdp_step(tx, **extra):
  """``(init, step)``: params and state sharded over "fsdp" inside each replica.

  Each device holds a quarter of every params leaf (dim 0) and its quarter of
  the replica's batch (see ``harness.fsdp_step``); the optimizer runs on the
  local shards with axis_name="replica".
  """
  w0, _, _ = data()
  init, step, _, _ = harness.fsdp_step(tx, fsdp_mesh(), stack(w0, REPLICAS), loss, **extra)
  return init, step


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_fsdp_replicas_equal_whole_params_replicas(name):
  w0, x, y = data()
  tx = ALGORITHMS[name](axis_name="replica")
  init, step = fsdp_step(tx)
  params = stack(w0, REPLICAS)
  state = init(params)
  for t in range(STEPS):
    params, state = jax.block_until_ready(step(params, state, x[t], y[t]))
  expected = whole_params_run(name)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), params, expected.params[-1]
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
    optax_dist.center_params(state),
    optax_dist.center_params(expected.state),
  )
  # The center is sharded like the params: each device holds its quarter.
  assert optax_dist.center_params(state)["w"].sharding.spec == P("replica", "fsdp")


@pytest.mark.parametrize("name", ["model_average", "agn_round_robin"])
def test_an_fsdp_sync_moves_the_local_shard_only(name):
  w0, x, y = data()
  tx = ALGORITHMS[name](axis_name="replica")
  init, step = fsdp_step(tx, sync=True)
  params = stack(w0, REPLICAS)
  report = optax_dist.communication_report(step, params, init(params), x[0], y[0])
  shard = (DIM_IN * DIM_OUT + DIM_OUT * 4) // FSDP * 4
  across = [c for c in report.collectives if c.workers == REPLICAS]
  assert {c.kind for c in across} == {"all-gather" if "round_robin" in name else "all-reduce"}
  # Across the replicas, each device sends its own shard (N copies gathered
  # for round_robin), not the whole params; an all-reduce also carries the
  # count of finite replicas (4 bytes).
  expected = shard * REPLICAS if "round_robin" in name else shard + 4
  assert sum(c.nbytes for c in across) == expected


def gspmd_step(tx, mesh, **extra):
  """The drjax / MaxText path: jit(vmap(..., spmd_axis_name)) over NamedSharding inputs."""

  def step(p, s, batch):
    g = jax.grad(lambda q: loss(q, *batch))(p)
    u, s = tx.update(g, s, p, **extra)
    return optax.apply_updates(p, u), s

  return jax.jit(jax.vmap(step, axis_name=AXIS, spmd_axis_name=AXIS))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_gspmd_path_equals_vmap_and_shard_map(name):
  w0, x, y = data(1)
  tx = ALGORITHMS[name](axis_name=AXIS)
  mesh = jax.make_mesh((REPLICAS,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:2])
  placed = functools.partial(jax.device_put, device=NamedSharding(mesh, P(AXIS)))
  params = jax.tree.map(placed, stack(w0, REPLICAS))
  state = jax.tree.map(placed, jax.vmap(tx.init)(stack(w0, REPLICAS)))
  step = gspmd_step(tx, mesh)
  with jax.set_mesh(mesh):
    for t in range(STEPS):
      params, state = jax.block_until_ready(step(params, state, (placed(x[t]), placed(y[t]))))
    report = optax_dist.communication_report(step, params, state, (placed(x[0]), placed(y[0])))
  assert params["w"].sharding.spec[0] == AXIS
  batches = [(x[t], y[t]) for t in range(STEPS)]
  for mode in ("vmap", "shard_map"):
    expected = run_transform(
      tx, stack(w0, REPLICAS), batches, mode=mode, grad_fn=lambda p, b: loss(p, *b)
    )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6),
      params,
      expected.params[-1],
    )
  # The sync's collectives, read from the partitioned program, in its loops.
  assert report.every_step_bytes == 0
  assert report.sync_bytes > 0 and all(c.workers == REPLICAS for c in report.collectives)


@pytest.mark.parametrize("name", ["diloco", "agn_round_robin"])
def test_gspmd_path_with_explicit_axes_takes_the_static_flags(name):
  # With Explicit mesh axes, JAX cannot yet batch the in-graph decision's
  # loop under spmd_axis_name; the static flags (no loop) run there, and
  # give the vmap results.
  w0, x, y = data(1)
  tx = ALGORITHMS[name](axis_name=AXIS)
  mesh = jax.make_mesh(
    (REPLICAS,), (AXIS,), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2]
  )
  placed = functools.partial(jax.device_put, device=NamedSharding(mesh, P(AXIS)))
  params = jax.tree.map(placed, stack(w0, REPLICAS))
  state = jax.tree.map(placed, jax.vmap(tx.init)(stack(w0, REPLICAS)))
  schedule = optax_dist.sync_schedule(state)
  steps = {}
  with jax.set_mesh(mesh):
    for t in range(STEPS):
      flag = schedule(t)
      step = steps.setdefault(repr(flag), gspmd_step(tx, mesh, sync=flag))
      params, state = jax.block_until_ready(step(params, state, (placed(x[t]), placed(y[t]))))
  expected = run_transform(
    tx,
    stack(w0, REPLICAS),
    [(x[t], y[t]) for t in range(STEPS)],
    mode="vmap",
    grad_fn=lambda p, b: loss(p, *b),
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6), params, expected.params[-1]
  )
  assert params["w"].sharding.spec[0] == AXIS


OFFLOADED = {
  "diloco": ("center", "outer_state", "residual"),
  "model_average": ("center", "residual"),
  "elastic_average": ("center", "residual"),
  "agn": ("center", "center_state"),
}


@pytest.mark.parametrize("name", sorted(OFFLOADED))
@pytest.mark.parametrize("dispatch", ["static", "in_graph"])
def test_host_offload_keeps_the_numbers_and_the_state_in_host_memory(name, dispatch):
  mesh = jax.make_mesh((4,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
  w0, x, y = data(2)
  extra = {"comm_dtype": jnp.int8, "error_feedback": True} if name == "diloco" else {}
  results = {}
  for offload in (False, True):
    tx = ALGORITHMS[name](axis_name=AXIS, host_offload=offload, **extra)
    step = optax_dist.data_parallel_step(
      lambda p, b: loss(p, *b),
      tx,
      mesh=mesh,
      axis_name=AXIS,
      params_layout="per_worker",
      sync_dispatch=dispatch,
    )
    state = tx.init(w0)
    if offload:
      for field in OFFLOADED[name]:
        for leaf in jax.tree.leaves(getattr(state, field)):
          assert leaf.sharding.memory_kind == "pinned_host", field
    p, s = optax_dist.per_worker((w0, state), mesh=mesh, axis_name=AXIS)
    for t in range(STEPS):
      batch = (x[t % 2].reshape(-1, DIM_IN), y[t % 2].reshape(-1, DIM_OUT))
      p, s, _ = jax.block_until_ready(step(p, s, batch))
    results[offload] = (p, s)
    kinds = {
      field: {leaf.sharding.memory_kind for leaf in jax.tree.leaves(getattr(s, field))}
      for field in s._fields
      if jax.tree.leaves(getattr(s, field))
    }
    for field, found in kinds.items():
      expected = "pinned_host" if offload and field in OFFLOADED[name] else "device"
      assert found == {expected}, (field, found)
  jax.tree.map(np.testing.assert_array_equal, results[True], results[False])


def test_host_offload_in_the_compiled_sync():
  # The offloaded buffers sit in host memory (memory space S(5)) at the
  # program's boundary: a sync reads them to the device and writes them back;
  # a local step passes them through.
  mesh = jax.make_mesh((4,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
  w0, _, _ = data()
  tx = optax_dist.diloco(optax.adam(0.05), axis_name=AXIS, sync_period=4, host_offload=True)
  params, state = optax_dist.per_worker((w0, tx.init(w0)), mesh=mesh, axis_name=AXIS)

  def compiled(flag):
    fn = harness.per_worker(harness.train_step(tx, sync=flag), mesh)
    return fn.lower(params, state, params).compile().as_text()

  center_and_trace = 2 * (DIM_IN * DIM_OUT + DIM_OUT * 4) * 4
  host = re.compile(r"([a-z0-9]+\[[\d,]*\])\{[\d,]*:S\(5\)\}")
  for flag in (False, True):
    header = compiled(flag).split("\n", 1)[0]
    layout = header.split("entry_computation_layout={", 1)[1]
    inputs, outputs = layout.split(")->(", 1)
    host_in = sum(hlo.nbytes(shape) for shape in host.findall(inputs))
    outputs = outputs[: outputs.index("})}") + 1]  # The outputs' tuple ends the layout.
    host_out = sum(hlo.nbytes(shape) for shape in host.findall(outputs))
    assert host_in == host_out == center_and_trace, (flag, host_in, host_out)


def test_host_offload_errors(monkeypatch):
  with pytest.raises(TypeError, match="`host_offload` must be a Python bool"):
    optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, host_offload="yes")

  # A backend whose devices have no pinned host memory.
  class Memory:
    kind = "device"

  class Device:
    platform = "accelerator"

    def addressable_memories(self):
      return [Memory()]

  monkeypatch.setattr(jax, "devices", lambda *args: [Device()])
  with pytest.raises(ValueError, match="'pinned_host' memory, which this backend"):
    optax_dist.model_average(optax.sgd(0.1), axis_name=AXIS, host_offload=True)


@pytest.mark.parametrize(("old", "new"), [(8, 4), (4, 8)])
def test_resize_workers_through_a_checkpoint(old, new, tmp_path):
  # Train `old` workers into the middle of a period, save, restore, resize
  # to `new` workers and go on: every worker starts from the center, the
  # center and the counters are kept, and the next sync comes on schedule.
  rng = np.random.default_rng(old)
  w0 = {"w": rng.normal(size=(6, 3)).astype(np.float32)}
  period = 4
  tx = optax_dist.diloco(optax.adam(0.05), axis_name=AXIS, sync_period=period)
  grads = [{"w": rng.normal(size=(old, 6, 3)).astype(np.float32)} for _ in range(6)]
  before = run_transform(tx, stack(w0, old), grads, mode="vmap")
  saved = (before.params[-1], before.state)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "run", saved)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      tmp_path / "run", jax.tree.map(ocp.utils.to_shape_dtype_struct, saved)
    )
  params, state = optax_dist.resize_workers(*restored, new)
  center = np.asarray(optax_dist.center_params(before.state)["w"][0])
  np.testing.assert_array_equal(params["w"], np.broadcast_to(center, (new, 6, 3)))
  np.testing.assert_array_equal(optax_dist.center_params(state)["w"], params["w"])
  np.testing.assert_array_equal(optax_dist.global_step(state), [1] * new)
  assert optax_dist.call_count(state) == 6
  mu = optax_dist.get_slot(before.state, "mu")["w"]
  np.testing.assert_allclose(optax_dist.get_slot(state, "mu")["w"][0], mu.mean(0), rtol=1e-6)
  # Two more calls reach call 8, the next sync, and the workers meet there.
  more = [{"w": rng.normal(size=(new, 6, 3)).astype(np.float32)} for _ in range(2)]
  after = run_transform_from(tx, params, state, more)
  np.testing.assert_array_equal(optax_dist.global_step(after.states[0]), [1] * new)
  np.testing.assert_array_equal(optax_dist.global_step(after.states[1]), [2] * new)
  w = after.params[1]["w"]
  np.testing.assert_allclose(w, np.broadcast_to(w[0], w.shape), rtol=1e-6, atol=1e-6)


def run_transform_from(tx, params, state, grads):
  """Steps of ``tx`` under vmap from given per-worker params and state."""

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(jax.vmap(step, axis_name=AXIS))
  params_after, states = [], []
  for g in grads:
    params, state = jax.block_until_ready(step(params, state, g))
    params_after.append(jax.tree.map(np.asarray, params))
    states.append(state)
  return types.SimpleNamespace(params=params_after, states=states)


def test_resize_restarts_accumulators_and_snapshots():
  # Three calls of period 2: a sync on call 2 left EASGD's snapshot at the
  # center before it (not the center now), and call 3 filled AGN's
  # accumulator again; a resize restarts both from the center.
  w0 = {"w": np.ones(3, np.float32)}
  tx = optax.chain(
    optax.scale_by_adam(),
    optax_dist.elastic_average(optax.sgd(0.1), axis_name=AXIS, rho=0.1, communication_period=2),
  )
  agn = optax_dist.agn(optax.sgd(0.1), axis_name=AXIS, communication_period=2)
  grads = [{"w": np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], np.float32)}] * 3
  for t in (tx, agn):
    traj = run_transform(t, stack(w0, 2), grads, mode="vmap")
    before = traj.state if hasattr(traj.state, "_fields") else traj.state[1]
    np.testing.assert_array_equal(optax_dist.global_step(traj.state), [1, 1])
    _, state = optax_dist.resize_workers(traj.params[-1], traj.state, 3)
    inner = state if hasattr(state, "_fields") else state[1]  # The chain's second.
    center = np.broadcast_to(before.center["w"][0], (3, 3))
    np.testing.assert_array_equal(inner.center["w"], center)
    if hasattr(inner, "accumulator"):
      assert np.abs(before.accumulator["w"]).min() > 0
      np.testing.assert_array_equal(inner.accumulator["w"], np.zeros((3, 3)))
    else:
      assert not np.array_equal(before.snapshot["w"][0], before.center["w"][0])
      np.testing.assert_array_equal(inner.snapshot["w"], center)
      # The chain's Adam moments are averaged, its count taken from worker 0.
      np.testing.assert_array_equal(state[0].count, [3, 3, 3])


@pytest.mark.parametrize(
  ("num_workers", "build", "match"),
  [
    (0, None, "`num_workers` must be an int >= 1"),
    (2.0, None, "`num_workers` must be an int >= 1"),
    (2, lambda: optax_dist.tower(optax.sgd(0.1), axis_name=AXIS), "holds exactly one periodic"),
  ],
)
def test_resize_errors(num_workers, build, match):
  tx = build() if build else optax_dist.model_average(optax.sgd(0.1), axis_name=AXIS)
  params = stack({"w": np.zeros(2, np.float32)}, 2)
  state = jax.vmap(tx.init)(params)
  with pytest.raises(ValueError, match=match):
    optax_dist.resize_workers(params, state, num_workers)
