"""Misuse is caught where it happens, each error with its exact message."""

from harness import AXIS
from harness import map_workers
from harness import stack
from harness import worker_mesh
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_dist

N = 4
PARAMS = stack({"w": np.array([0.5, -1.0, 2.0], np.float32)}, N)
GRADS = stack({"w": np.array([1.0, -2.0, 0.5], np.float32)}, N)


def lsq(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] - y) ** 2)


def batch():
  rng = np.random.default_rng(0)
  return rng.normal(size=(2 * N, 3)).astype(np.float32), rng.normal(size=2 * N).astype(np.float32)


def test_data_parallel_step_checks_the_optimizers_axis_when_built():
  mesh = worker_mesh(N, "batch")
  tx = optax.chain(optax.clip(1.0), optax_dist.diloco(optax.adam(0.1), axis_name="data"))
  with pytest.raises(ValueError) as e:
    optax_dist.data_parallel_step(lsq, tx, mesh=mesh, axis_name="batch", params_layout="per_worker")
  assert str(e.value) == (
    "data_parallel_step: the optimizer binds the axis name 'data', but the workers are on "
    "('batch',) (mesh axes ('batch',)), so it would fail only at its first sync. Build the "
    "optimizer with `axis_name='batch'`, or give data_parallel_step the optimizer's axis as "
    "`axis_name`."
  )
  # The right axis, and a hierarchical composition over both axes, are accepted.
  optax_dist.data_parallel_step(
    lsq,
    optax_dist.diloco(optax.adam(0.1), axis_name="batch"),
    mesh=mesh,
    axis_name="batch",
    params_layout="per_worker",
  )
  mesh2 = jax.make_mesh((2, 2), ("hosts", "local"), axis_types=(AxisType.Auto,) * 2)
  inner = optax_dist.tower(optax.sgd(0.1), axis_name="local")
  optax_dist.data_parallel_step(
    lsq,
    optax_dist.model_average(inner, axis_name="hosts"),
    mesh=mesh2,
    axis_name=("hosts", "local"),
    params_layout="per_worker",
  )


def test_check_agreement_checks_the_optimizers_axis():
  mesh = worker_mesh(N, "batch")
  tx = optax_dist.elastic_average(optax.sgd(0.1), axis_name="data")
  params = jax.device_put(jnp.zeros((N, 3)), NamedSharding(mesh, P("batch")))
  with pytest.raises(ValueError) as e:
    optax_dist.check_agreement(tx, params, mesh=mesh, axis_name="batch")
  assert str(e.value) == (
    "check_agreement: the optimizer binds the axis name 'data', but the workers are on "
    "('batch',) (mesh axes ('batch',)), so it would fail only at its first sync. Build the "
    "optimizer with `axis_name='batch'`, or give check_agreement the optimizer's axis as "
    "`axis_name`."
  )


def schedule_error(name, made, mine):
  return (
    f"{name}: this state was made with the schedule {made}, but this optimizer syncs on "
    f"{mine}. Driving it would sync on the wrong calls. Make the state with this optimizer's "
    "`init` (or restore it into a state made by that `init`), or build the optimizer with "
    "the settings the state was made with."
  )


@pytest.mark.parametrize("flag", [None, False], ids=["in_graph", "static"])
def test_a_state_with_another_schedule_is_refused_on_the_first_call(flag):
  four = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=4)
  eight = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=8, sync_warmup=2)
  state = jax.vmap(four.init)(PARAMS)
  extra = {} if flag is None else {"sync": flag}
  step = map_workers(lambda p, s, g: eight.update(g, s, p, **extra), N, "vmap")
  with pytest.raises(ValueError) as e:
    step(PARAMS, state, GRADS)
  made, mine = optax_dist.SyncSchedule(4), optax_dist.SyncSchedule(8, warmup=2)
  assert str(e.value) == schedule_error("diloco", made, mine)


@pytest.mark.parametrize("dispatch", ["static", "in_graph"])
def test_data_parallel_step_refuses_a_state_of_another_schedule(dispatch):
  mesh = worker_mesh(N)
  two = optax_dist.model_average(optax.sgd(0.1), axis_name=AXIS, interval_steps=2)
  three = optax_dist.model_average(optax.sgd(0.1), axis_name=AXIS, interval_steps=3)
  step = optax_dist.data_parallel_step(
    lsq, three, mesh=mesh, axis_name=AXIS, params_layout="per_worker", sync_dispatch=dispatch
  )
  params = {"w": jnp.zeros(3)}
  p, s = optax_dist.per_worker((params, two.init(params)), mesh=mesh, axis_name=AXIS)
  with pytest.raises(ValueError) as e:
    step(p, s, batch())
  made, mine = optax_dist.SyncSchedule(2), optax_dist.SyncSchedule(3)
  assert str(e.value) == schedule_error("model_average", made, mine)


def test_warmup_flag_without_a_warmup():
  tx = optax_dist.agn(optax.sgd(0.1), axis_name=AXIS, communication_period=2)
  step = map_workers(lambda p, s, g: tx.update(g, s, p, sync="warmup"), N, "vmap")
  with pytest.raises(ValueError) as e:
    step(PARAMS, jax.vmap(tx.init)(PARAMS), GRADS)
  assert str(e.value) == (
    "agn: `sync='warmup'` asks for a synchronous warm-up call, but this transform has no "
    "warm-up (`sync_warmup=0`). Build it with `sync_warmup=K` for K warm-up calls, or pass "
    "the flags of `optax_dist.sync_schedule(state)`."
  )


def test_numpy_bools_and_ints_are_flags():
  tx = optax_dist.diloco(optax.adam(0.1), axis_name=AXIS, sync_period=4, fragments={"w": 0, "v": 1})
  params = stack({"w": np.ones(3, np.float32), "v": np.ones(2, np.float32)}, N)
  grads = jax.tree.map(lambda x: x * 0.5, params)

  def run(flags):
    state = jax.vmap(tx.init)(params)
    p = params
    for flag in flags:
      step = map_workers(lambda p, s, g, f=flag: tx.update(g, s, p, sync=f), N, "vmap")
      u, state = step(p, state, grads)
      p = optax.apply_updates(p, u)
    return p, state

  python = run([False, 0, True, 1])
  numpy = run([np.False_, np.int64(0), np.bool_(True), np.int32(1)])
  jax.tree.map(np.testing.assert_array_equal, numpy, python)
  np.testing.assert_array_equal(python[1].sync.num_syncs, [4] * N)
  with pytest.raises(TypeError, match="a traced or array flag"):
    map_workers(lambda p, s, g: tx.update(g, s, p, sync=jnp.bool_(True)), N, "vmap")(
      params, jax.vmap(tx.init)(params), grads
    )


def test_checking_sync_flags_catches_a_loop_that_forgets_to_count():
  tx = optax_dist.model_average(optax.sgd(0.1), axis_name=AXIS, interval_steps=2)
  schedule = optax_dist.sync_schedule(tx.init(jax.tree.map(lambda x: x[0], PARAMS)))

  def loop(counting):
    programs = {}
    state, params, count = jax.vmap(tx.init)(PARAMS), PARAMS, 0
    for _ in range(3):
      flag = schedule(count)
      if flag not in programs:
        programs[flag] = map_workers(lambda p, s, g, f=flag: tx.update(g, s, p, sync=f), N, "vmap")
      updates, state = jax.block_until_ready(programs[flag](params, state, GRADS))
      params = optax.apply_updates(params, updates)
      if counting:
        count += 1
    return state

  with optax_dist.checking_sync_flags():
    assert int(loop(counting=True).sync.num_syncs[0]) == 1
  # A plain ValueError, once, when the context exits (not a runtime error per device).
  with pytest.raises(ValueError) as e:
    with optax_dist.checking_sync_flags():
      loop(counting=False)
  assert type(e.value) is ValueError
  message = (
    "The static flag `sync=False` disagrees with the transform's own call counter: after 1 "
    "calls its schedule SyncSchedule(period=2, warmup=0, fragments=1) gives `sync=True`. A "
    "hand-written loop must count every call it makes (`count += 1` after each step), "
    "starting from `optax_dist.call_count(state)` for a restored state; or pass `sync=None` "
    "and let the program decide."
  )
  assert str(e.value) == message
  # Outside the context nothing is checked: the same loop never syncs.
  assert int(loop(counting=False).sync.num_syncs[0]) == 0


def test_a_resized_state_on_the_old_mesh_names_the_mesh_size():
  mesh = worker_mesh(N)
  tx = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=2)
  step = optax_dist.data_parallel_step(
    lsq, tx, mesh=mesh, axis_name=AXIS, params_layout="per_worker"
  )
  params = {"w": jnp.zeros(3)}
  p, s = optax_dist.per_worker((params, tx.init(params)), mesh=mesh, axis_name=AXIS)
  p2, s2 = optax_dist.resize_workers(p, s, 2)
  with pytest.raises(ValueError) as e:
    step(p2, s2, batch())
  assert str(e.value) == (
    "Every leaf of the params has a leading worker axis of 2, but this step's mesh has 4 "
    "workers on its workers' axis. A tree resized with `resize_workers(params, opt_state, 2)` "
    "runs on a mesh of 2 devices along that axis: build the step on such a mesh, or resize "
    "to 4 workers."
  )


def test_trees_on_another_mesh_name_the_fix():
  devices = jax.devices()
  assert len(devices) >= 2 * N
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,), devices=devices[:N])
  other = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,), devices=devices[N : 2 * N])
  tx = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=2)
  step = optax_dist.data_parallel_step(
    lsq, tx, mesh=mesh, axis_name=AXIS, params_layout="per_worker"
  )
  params = {"w": jnp.zeros(3)}
  p, s = optax_dist.per_worker((params, tx.init(params)), mesh=other, axis_name=AXIS)
  with pytest.raises(ValueError) as e:
    step(p, s, batch())
  assert str(e.value) == (
    f"data_parallel_step: the params, optimizer state or batch live on devices other than "
    f"this step's mesh ({N} devices, axes ('{AXIS}',)), e.g. a tree resized with "
    "`resize_workers` or restored on another mesh. Lay them out on this mesh first: "
    "`jax.device_put(tree, NamedSharding(mesh, P(axis_name)))` for per-worker trees (or "
    "`optax_dist.per_worker` for a single copy)."
  )


def test_grads_and_params_of_different_structures():
  tx = optax_dist.elastic_average(optax.sgd(0.1), axis_name=AXIS)
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  state = tx.init(params)
  grads = {"w": jnp.ones(3)}
  step = jax.vmap(lambda s: tx.update(grads, s, params), axis_name=AXIS, axis_size=1)
  with pytest.raises(ValueError) as e:
    step(jax.tree.map(lambda x: x[None], state))
  assert str(e.value) == (
    f"elastic_average: the gradients (`updates`) and `params` must have the same tree "
    f"structure, but the gradients are {jax.tree.structure(grads)} and the params "
    f"{jax.tree.structure(params)}. Pass the gradients of the params you pass as `params` "
    "(e.g. `jax.grad(loss)(params)`), and under `optax.masked` or `optax.multi_transform` "
    "give both the same mask."
  )


def test_a_periodic_optimizer_with_the_replicated_layout_is_refused_when_the_step_is_built():
  mesh = worker_mesh(N, "batch")
  tx = optax.chain(optax.clip(1.0), optax_dist.diloco(optax.adam(0.1), axis_name="batch"))
  with pytest.raises(ValueError) as e:
    optax_dist.data_parallel_step(lsq, tx, mesh=mesh, axis_name="batch")
  assert str(e.value) == (
    "data_parallel_step: The optimizer holds a periodic transform (elastic_average, agn, "
    "model_average, diloco, ...), whose workers keep their own params between syncs: build "
    "the step with params_layout='per_worker' and lay params and state out with "
    "`optax_dist.per_worker`."
  )
  # A synchronous optimizer takes the replicated layout.
  optax_dist.data_parallel_step(
    lsq, optax_dist.tower(optax.adam(0.1), axis_name="batch"), mesh=mesh, axis_name="batch"
  )


@pytest.mark.parametrize(
  "build",
  [
    lambda: optax_dist.diloco(None, axis_name=AXIS),
    lambda: optax_dist.model_average(None, axis_name=AXIS),
    lambda: optax_dist.elastic_average(None, axis_name=AXIS),
    lambda: optax_dist.agn(None, axis_name=AXIS),
    lambda: optax_dist.tower(None, axis_name=AXIS),
  ],
)
def test_a_missing_inner_optimizer_is_refused_when_built(build):
  with pytest.raises(TypeError) as e:
    build()
  assert str(e.value) == (
    "`inner` must be an optax GradientTransformation (e.g. optax.adamw(1e-3)), got None."
  )


def test_a_64_bit_wire_without_64_bit_mode_is_refused_when_built():
  assert not jax.config.read("jax_enable_x64")
  with pytest.raises(ValueError) as e:
    optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, comm_dtype=jnp.float64)
  assert str(e.value) == (
    "`comm_dtype` float64 needs JAX's 64-bit mode, which is off: the sync would send "
    "float32 without a word. Enable it before building the optimizer "
    "(`jax.config.update('jax_enable_x64', True)`), or pass jnp.float32."
  )


def test_a_state_of_another_inner_optimizer_names_both():
  made = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=4)
  tx = optax_dist.diloco(optax.adam(0.1), axis_name=AXIS, sync_period=4)
  state = map_workers(made.init, N, "vmap")(PARAMS)
  step = map_workers(lambda g, s, p: tx.update(g, s, p), N, "vmap")
  with pytest.raises(ValueError) as e:
    step(GRADS, state, PARAMS)
  assert str(e.value) == (
    "diloco: this state's inner optimizer state is (EmptyState, EmptyState), but this "
    "optimizer's inner optimizer makes (ScaleByAdamState, EmptyState): the state was made by "
    "another optimizer. Make the state with this optimizer's `init` (or restore a checkpoint "
    "into a state made by that `init`), or build the optimizer with the inner optimizer the "
    "state was made with."
  )


def test_sync_flags_owns_the_count_and_resumes_from_a_state():
  tx = optax_dist.model_average(optax.sgd(0.1), axis_name=AXIS, interval_steps=3, sync_warmup=1)
  state, params = jax.vmap(tx.init)(PARAMS), PARAMS
  programs = {}
  with optax_dist.checking_sync_flags():  # Every flag is the counter's.
    for flag, _ in zip(optax_dist.sync_flags(state), range(5), strict=False):
      if flag not in programs:
        programs[flag] = map_workers(lambda p, s, g, f=flag: tx.update(g, s, p, sync=f), N, "vmap")
      updates, state = jax.block_until_ready(programs[flag](params, state, GRADS))
      params = optax.apply_updates(params, updates)
  assert int(state.sync.num_syncs[0]) == 1  # Calls 1 (warm-up) to 5: the sync on call 4.
  # A new iterator from the state goes on from call 6.
  resumed = optax_dist.sync_flags(state)
  assert [next(resumed) for _ in range(4)] == [False, True, False, False]
  with pytest.raises(ValueError, match="holds no periodic optax_dist transform"):
    optax_dist.sync_flags(optax.sgd(0.1).init(PARAMS))
