"""The static ``sync`` flag, the schedule that gives it, and post-local SGD (sync_warmup).

Flags that follow the schedule must give the in-graph (``sync=None``) results:
bit for bit where the two programs round alike (shard_map and pmap with
momentum SGD inside, every algorithm), and to float rounding otherwise (under
vmap a collective is a local reduction that XLA fuses differently per
program; with Adam inside, XLA may contract the optimizer's multiply-adds
differently in the two programs).
"""

from harness import AXIS
from harness import run_transform
from harness import stack
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import optax
import pytest

import optax_dist

N = 4
STEPS = 9
SGD = optax.sgd(0.1, momentum=0.9)
TWO_LEAVES = {"a": np.zeros(3, np.float32), "b": np.zeros((2, 2), np.float32)}


def make(name, inner=SGD):
  """Every periodic algorithm and option the engine treats differently."""
  return {
    "elastic": lambda: optax_dist.elastic_average(
      inner, axis_name=AXIS, communication_period=3, moving_rate=0.3, rho=0.05
    ),
    "elastic_round_robin": lambda: optax_dist.elastic_average(
      inner, axis_name=AXIS, communication_period=3, ordering="round_robin", sync_warmup=2
    ),
    "agn": lambda: optax_dist.agn(inner, axis_name=AXIS, communication_period=3, sync_warmup=1),
    "agn_round_robin": lambda: optax_dist.agn(
      inner, axis_name=AXIS, communication_period=3, ordering="round_robin"
    ),
    "model_average": lambda: optax_dist.model_average(
      inner, axis_name=AXIS, interval_steps=3, sync_warmup=2
    ),
    "diloco": lambda: optax_dist.diloco(inner, axis_name=AXIS, sync_period=2, sync_warmup=1),
    "diloco_fragments": lambda: optax_dist.diloco(
      inner, axis_name=AXIS, sync_period=4, fragments=2
    ),
    "diloco_int8": lambda: optax_dist.diloco(
      inner, axis_name=AXIS, sync_period=4, fragments=2, comm_dtype=jnp.int8, error_feedback=True
    ),
  }[name]()


NAMES = (
  "elastic",
  "elastic_round_robin",
  "agn",
  "agn_round_robin",
  "model_average",
  "diloco",
  "diloco_fragments",
  "diloco_int8",
)


def problem(seed=0, steps=STEPS):
  rng = np.random.default_rng(seed)
  params = stack(jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), TWO_LEAVES), N)
  grads = [
    jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    for _ in range(steps)
  ]
  return params, grads


def flags_of(tx, params, steps=STEPS):
  schedule = optax_dist.sync_schedule(tx.init(jax.tree.map(lambda x: x[0], params)))
  return [schedule(count) for count in range(steps)]


def assert_same(a, b, exact):
  for x, y in zip(
    jax.tree.leaves((a.params, a.state)), jax.tree.leaves((b.params, b.state)), strict=True
  ):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=2e-6, atol=2e-6)


# Syncs in the 9 calls of each case (global_step, one per fragment synced):
# period 3 syncs on calls 3, 6, 9, after 2 warm-up calls on 5 and 8, after
# 1 on 4 and 7; DiLoCo (period 2, warm-up 1) on 3, 5, 7, 9; with 2 fragments
# (period 4), one fragment on every 2nd call.
GLOBAL_STEPS = {
  "elastic": 3,
  "elastic_round_robin": 2,
  "agn": 2,
  "agn_round_robin": 3,
  "model_average": 2,
  "diloco": 4,
  "diloco_fragments": 4,
  "diloco_int8": 4,
}


def assert_counters(traj, *, calls, syncs, skipped=0):
  assert optax_dist.call_count(traj.state) == calls
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [syncs] * N)
  np.testing.assert_array_equal(optax_dist.skipped_syncs(traj.state), [skipped] * N)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_flags_of_the_schedule_give_the_in_graph_results_bit_for_bit(name, mode):
  params, grads = problem()
  tx = make(name)
  flags = flags_of(tx, params)
  assert {False} < set(flags)  # Local steps and syncs (and warm-up calls) alike.
  in_graph = run_transform(tx, params, grads, mode=mode)
  static = run_transform(tx, params, grads, mode=mode, flags=flags)
  assert_same(in_graph, static, exact=True)
  # Gold counters, so that a miscount shared by both paths shows too.
  for traj in (in_graph, static):
    assert_counters(traj, calls=STEPS, syncs=GLOBAL_STEPS[name])


@pytest.mark.parametrize("algorithm", ["model_average", "diloco_int8"])
@pytest.mark.parametrize("static", [False, True], ids=["in_graph", "static"])
def test_a_sync_with_no_finite_worker_is_counted_as_skipped(algorithm, static):
  # Every worker's gradient is NaN on call 2, a sync: no worker is finite
  # (plain SGD inside, so that no inner state keeps the NaN), the center keeps its value and the
  # sync counts in skipped_syncs, not in global_step; training goes on and
  # the later syncs count.
  params, grads = problem(5, steps=6)
  grads[1] = jax.tree.map(lambda g: np.full_like(g, np.nan), grads[1])
  tx = {
    "model_average": lambda: optax_dist.model_average(
      optax.sgd(0.1), axis_name=AXIS, interval_steps=2
    ),
    "diloco_int8": lambda: optax_dist.diloco(
      optax.sgd(0.1), axis_name=AXIS, sync_period=2, comm_dtype=jnp.int8, error_feedback=True
    ),
  }[algorithm]()
  flags = flags_of(tx, params, steps=6)
  assert [f is not False for f in flags] == [False, True] * 3
  traj = run_transform(tx, params, grads, mode="shard_map", flags=flags if static else None)
  assert_counters(traj, calls=6, syncs=2, skipped=1)
  before, after = (optax_dist.center_params(traj.states[t]) for t in (0, 1))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  for leaf in jax.tree.leaves((traj.params[-1], optax_dist.center_params(traj.state))):
    assert np.isfinite(leaf).all()


@pytest.mark.parametrize("name", NAMES)
def test_flags_of_the_schedule_under_vmap_and_with_adam(name):
  params, grads = problem(1)
  for tx, mode in ((make(name), "vmap"), (make(name, optax.adam(0.1, b2=0.99)), "shard_map")):
    flags = flags_of(tx, params)
    assert_same(
      run_transform(tx, params, grads, mode=mode),
      run_transform(tx, params, grads, mode=mode, flags=flags),
      exact=False,
    )


def test_the_counters_count_what_the_flags_did():
  # Flags off the schedule do what they say: a model average on calls 1 and
  # 3, none on call 2, whatever the period.
  params, grads = problem(steps=3)
  flat = np.concatenate([params["a"], params["b"].reshape(N, -1)], axis=1)[0]
  flat_grads = np.stack([np.concatenate([g["a"], g["b"].reshape(N, -1)], axis=1) for g in grads])
  tx = optax_dist.model_average(optax.sgd(0.1), axis_name=AXIS, interval_steps=100)
  traj = run_transform(tx, params, grads, mode="shard_map", flags=[True, False, True])
  expected = numpy_reference.model_average(
    flat, flat_grads, n=N, p=100, inner="sgd", flags=[True, False, True]
  )
  for t, (x, _) in enumerate(expected):
    got = np.concatenate([traj.params[t]["a"], traj.params[t]["b"].reshape(N, -1)], axis=1)
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-6, err_msg=f"call {t + 1}")
  np.testing.assert_array_equal(traj.state.sync.calls, [3] * N)
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [2] * N)


@pytest.mark.parametrize("algorithm", ["model_average", "diloco"])
@pytest.mark.parametrize("flags", [False, True], ids=["in_graph", "static"])
def test_post_local_sgd_matches_numpy_reference(algorithm, flags):
  # sync_warmup=3: three calls of synchronous data parallelism (the inner
  # Adam sees the workers' mean gradient, so every worker stays identical),
  # then local steps with syncs on calls 3 + 2, 3 + 4, ...
  rng = np.random.default_rng(7)
  steps, p, k = 8, 2, 3
  x0 = rng.normal(size=5).astype(np.float32)
  grads = rng.normal(size=(steps, N, 5)).astype(np.float32)
  inner = optax.adam(0.1, b2=0.99)
  factory = getattr(optax_dist, algorithm)
  period = {"model_average": "interval_steps", "diloco": "sync_period"}[algorithm]
  tx = factory(inner, axis_name=AXIS, sync_warmup=k, **{period: p})
  schedule = optax_dist.sync_schedule(tx.init(x0))
  assert [schedule(i) for i in range(steps)] == ["warmup"] * 3 + [False, True] * 2 + [False]
  traj = run_transform(
    tx,
    stack(x0, N),
    list(grads),
    mode="shard_map",
    flags=[schedule(i) for i in range(steps)] if flags else None,
  )
  expected = getattr(numpy_reference, algorithm)(x0, grads, n=N, p=p, inner="adam", warmup=k)
  for t, (x, _) in enumerate(expected):
    np.testing.assert_allclose(traj.params[t], x, rtol=2e-6, atol=2e-6, err_msg=f"call {t + 1}")
    if t < k:  # The center follows the params during the warm-up.
      np.testing.assert_array_equal(traj.params[t][0], traj.params[t][1])
  np.testing.assert_allclose(traj.state.center[0], expected[-1][1], rtol=2e-6, atol=2e-6)
  # Warm-up calls count as calls, not as syncs.
  np.testing.assert_array_equal(traj.state.sync.calls, [steps] * N)
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [2] * N)


@pytest.mark.parametrize("name", ["elastic", "agn"])
def test_warmup_is_synchronous_data_parallelism(name):
  # During the warm-up every algorithm is a tower step with "mean", whatever
  # it does after; the center (and EASGD's snapshot) follow the params.
  params, grads = problem(2, steps=3)
  inner = optax.adam(0.05)
  factory = {"elastic": optax_dist.elastic_average, "agn": optax_dist.agn}[name]
  tx = factory(inner, axis_name=AXIS, communication_period=2, sync_warmup=3)
  warm = run_transform(tx, params, grads, mode="shard_map", flags=["warmup"] * 3)
  tower = run_transform(optax_dist.tower(inner, axis_name=AXIS), params, grads, mode="shard_map")
  for a, b in zip(warm.params, tower.params, strict=True):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  center = optax_dist.center_params(warm.state)
  jax.tree.map(np.testing.assert_array_equal, center, warm.params[-1])
  np.testing.assert_array_equal(optax_dist.global_step(warm.state), [0] * N)


def test_schedule_values():
  schedule = optax_dist.SyncSchedule(period=6, warmup=1, fragments=3)
  assert [schedule(i) for i in range(8)] == ["warmup", False, 0, False, 1, False, 2, False]
  # Each fragment syncs every period: fragment 0 on calls 3, 9, 15, ...
  fragment_0 = [i + 1 for i in range(20) if type(schedule(i)) is int and schedule(i) == 0]
  assert fragment_0 == [3, 9, 15]
  assert optax_dist.SyncSchedule(period=1)(0) is True
  with pytest.raises(ValueError, match="`count` must be >= 0, got -1"):
    schedule(-1)


def test_schedule_values_with_a_delay():
  # One fragment, its sync scheduled on call 6: with delay 1 that call reduces
  # and lands (True); with delay 2 the call before it reduces (True) and call 6
  # lands the one fragment, ("apply", 0).
  delay_1 = optax_dist.SyncSchedule(period=6, delay=1)
  assert [delay_1(i) for i in range(8)] == [False] * 5 + [True, False, False]
  schedule = optax_dist.SyncSchedule(period=6, delay=2)
  flags = [schedule(i) for i in range(14)]
  once = [False] * 4 + [True, ("apply", 0)]
  assert flags == once + once + [False, False]
  assert [type(f[1]) for f in flags if isinstance(f, tuple)] == [int, int]  # Not True.
  assert repr(schedule) == "SyncSchedule(period=6, warmup=0, fragments=1, delay=2)"
  # A schedule without a delay reads as before delays existed.
  assert repr(optax_dist.SyncSchedule(period=6)) == "SyncSchedule(period=6, warmup=0, fragments=1)"


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (
      {"delay": -1},
      r"^`delay` must be >= 0 \(0: the whole sync on its scheduled call\), got -1\.$",
    ),
    (
      {"delay": 1, "blend": 1.5},
      r"^`blend` must be in \[0, 1\], got 1\.5: after a sync the workers land on "
      r"`blend \* x \+ \(1 - blend\) \* center` \(0: on the center; 1: they keep their "
      r"params\)\.$",
    ),
    ({"sync_warmup": -1}, r"^`sync_warmup` must be >= 0, got -1\.$"),
    (
      {"sync_warmup": 1.5},
      r"^`sync_warmup` must be a Python int \(it is static\), got 1\.5\. Under "
      r"`optax\.inject_hyperparams`, list it in `static_args`\.$",
    ),
  ],
)
def test_schedule_errors_say_what_to_do(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    optax_dist.diloco(SGD, axis_name=AXIS, sync_period=4, **kwargs)


def test_explicit_zeros_are_the_defaults():
  # sync_warmup=0 and delay=0 are the defaults, not errors.
  explicit = optax_dist.diloco(SGD, axis_name=AXIS, sync_period=4, sync_warmup=0, delay=0)
  schedule = optax_dist.sync_schedule(explicit.init(TWO_LEAVES))
  assert schedule == optax_dist.SyncSchedule(period=4, warmup=0, fragments=1, delay=0)


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"period": 0}, ValueError, "period >= 1"),
    ({"period": 4, "fragments": 3}, ValueError, "multiple of the number of fragments"),
    ({"period": 2.0}, TypeError, "`period` must be a Python int"),
    ({"period": 4, "warmup": -1}, ValueError, "warmup >= 0"),
  ],
)
def test_bad_schedules(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_dist.SyncSchedule(**kwargs)


def test_a_traced_flag_is_a_type_error_that_names_sync():
  tx = make("model_average")

  def step(p, s, g, flag):
    return tx.update(g, s, p, sync=flag)

  params, grads = problem(steps=1)
  one = jax.tree.map(lambda x: x[0], params)
  with pytest.raises(TypeError, match="`sync` must be a static Python value"):
    jax.vmap(step, in_axes=(0, 0, 0, None), axis_name=AXIS)(
      params, jax.vmap(tx.init)(params), grads[0], jnp.bool_(True)
    )
  with pytest.raises(ValueError, match="names a fragment, but this transform has 1"):
    tx.update(one, tx.init(one), one, sync=1)
  with pytest.raises(TypeError, match="`sync` must be None, True, False"):
    tx.update(one, tx.init(one), one, sync="yes")


WRAPPERS = {
  "chain": lambda tx: optax.chain(optax.clip_by_global_norm(10.0), tx),
  "masked": lambda tx: optax.masked(tx, {"a": True, "b": False}),
  "inject_hyperparams": lambda _: optax.inject_hyperparams(
    optax_dist.diloco, static_args=("sync_period", "axis_name")
  )(SGD, axis_name=AXIS, sync_period=3),
  "apply_if_all_finite": lambda tx: optax_dist.apply_if_all_finite(tx, axis_name=AXIS),
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_flags_travel_through_wrappers(wrapper):
  params, grads = problem(3)
  tx = WRAPPERS[wrapper](optax_dist.diloco(SGD, axis_name=AXIS, sync_period=3))
  flags = flags_of(tx, params)
  assert flags.count(True) == 3
  assert_same(
    run_transform(tx, params, grads, mode="shard_map"),
    run_transform(tx, params, grads, mode="shard_map", flags=flags),
    exact=True,
  )


def test_schedule_and_count_through_a_skip_wrapper():
  # apply_if_all_finite skips a call on every worker: the loop counted it,
  # and call_count counts it too, so a resumed loop keeps the same flags.
  params, grads = problem(4, steps=5)
  grads[1]["a"][2, 0] = np.nan
  tx = optax_dist.apply_if_all_finite(
    optax_dist.model_average(SGD, axis_name=AXIS, interval_steps=2), axis_name=AXIS
  )
  traj = run_transform(tx, params, grads, mode="vmap")
  assert optax_dist.call_count(traj.state) == 5
  assert int(traj.state.inner_state.sync.calls[0]) == 4  # The transform ran 4 times.


@pytest.mark.parametrize(
  ("build", "match"),
  [
    (lambda tx: optax.MultiSteps(tx, every_k_schedule=2), "optax.MultiSteps calls it once"),
    (lambda tx: optax.apply_if_finite(tx, 3), "skips calls on each worker alone"),
    (
      lambda tx: optax.multi_transform(
        {"x": tx, "y": optax_dist.model_average(SGD, axis_name=AXIS, interval_steps=5)},
        {"a": "x", "b": "y"},
      ),
      "different schedules",
    ),
    (lambda tx: optax_dist.tower(SGD, axis_name=AXIS), "no periodic optax_dist transform"),
  ],
  ids=["multi_steps", "apply_if_finite", "two_schedules", "none"],
)
def test_when_the_schedule_cannot_be_known(build, match):
  tx = build(optax_dist.model_average(SGD, axis_name=AXIS, interval_steps=4))
  state = tx.init(jax.tree.map(lambda x: x[0], problem(steps=0)[0]))
  with pytest.raises(ValueError, match=match):
    optax_dist.sync_schedule(state)
  with pytest.raises(ValueError, match=match):
    optax_dist.call_count(state)
