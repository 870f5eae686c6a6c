"""The contract every transform of the package honours.

Each case is run through the same checks: it composes with optax's wrappers
(chain, masked, inject_hyperparams with a real injected value, MultiSteps),
compiles once, forwards extra arguments, keeps its state's shapes and
dtypes, initializes from ``jax.ShapeDtypeStruct`` params, keeps bfloat16
params in bfloat16, rejects bad arguments with a clear error, asks for
params where it needs them and names an unbound axis; a periodic case syncs
on exactly the calls its schedule gives (``SyncSchedule``'s docstring, written out in
tests/numpy_reference.py), and follows its equations in float64 NumPy. The
cases cover delayed, blended fragment syncs (docs/sync_options.md) and Muon as
the inner optimizer. A new transform joins the suite by adding a
``Case`` to ``CASES``.
"""

from collections.abc import Callable
import functools
import inspect
import itertools
from typing import Any
from typing import NamedTuple

import chex
from harness import ALGORITHMS
from harness import AXIS
from harness import MODES
from harness import map_workers
from harness import run_transform
from harness import stack
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import optax
import pytest

import optax_dist

# The inner optimizers of the cases and of their references, by the name
# numpy_reference.Inner knows them by.
INNERS = {
  "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.5),
  "adam": lambda learning_rate: optax.adam(learning_rate, b2=0.99),
  "muon": lambda learning_rate: optax.contrib.muon(learning_rate),
}


class Case(NamedTuple):
  name: str
  factory: Callable[..., optax.GradientTransformation]  # factory(inner, *, axis_name, **kwargs)
  kwargs: dict[str, Any]  # Static arguments (strings, periods).
  numeric: dict[str, Any]  # Numeric hyperparameters, injectable by optax.inject_hyperparams.
  bad: tuple = ()  # (kwargs, error type, message pattern) rejected at construction.
  # Periodic: the flag of each of the calls 1 to 9 (gold, from SyncSchedule's docstring),
  # and the leaves of each fragment when there are several.
  flags: tuple | None = None
  fragments: tuple[tuple[str, ...], ...] = (("b", "v", "w"),)
  # Periodic: the equations in float64 NumPy (tests/numpy_reference.py),
  # reference(x0, grads, n=, inner=) with the case's own settings, and the
  # worker counts it is checked with (by default one worker and all eight:
  # one of them meets Adam and the other momentum SGD in every mode).
  reference: Callable | None = None
  reference_workers: tuple[int, ...] = (1, 8)
  # The inner optimizer (a key of INNERS). With "momentum" the reference check
  # alternates it with Adam; any other is checked alone.
  inner: str = "momentum"
  # The reference check's rtol and atol (float32 against float64).
  tolerance: float = 2e-6

  @property
  def delay(self) -> int:
    return self.kwargs.get("delay", 0)

  def make(self, inner=None, **overrides):
    """The case's transformation; the default one is one instance, so that the
    checks that run it alike share its compiled programs."""
    if inner is None and not overrides:
      return self.shared(self.inner, 0.1)
    inner = INNERS[self.inner](0.1) if inner is None else inner
    return self.factory(inner, axis_name=AXIS, **{**self.kwargs, **self.numeric, **overrides})

  def shared(self, inner, learning_rate, **numeric):
    """The case with the inner optimizer ``INNERS[inner](learning_rate)`` and
    the numeric hyperparameters changed by ``numeric``: one instance for the
    checks that ask for the same, so that they share compiled programs."""
    key = (self.name, inner, learning_rate, tuple(sorted(numeric.items())))
    if key not in DEFAULT:
      DEFAULT[key] = self.make(INNERS[inner](learning_rate), **numeric)
    return DEFAULT[key]


DEFAULT: dict[tuple, optax.GradientTransformation] = {}


def period_errors(name):
  return (
    ({name: 0}, ValueError, f"{name}.*>= 1"),
    ({name: 2.5}, TypeError, f"{name}.*int"),
    ({name: True}, TypeError, f"{name}.*int"),
    ({"sync_warmup": -1}, ValueError, "sync_warmup.*>= 0"),
    ({"sync_warmup": 1.5}, TypeError, "sync_warmup.*Python int"),
  )


EVERY_2ND = (False, True) * 4 + (False,)

ORDERING_ERROR = ({"ordering": "sequential"}, ValueError, "ordering.*'simultaneous', 'round_robin'")

# With fragments=2 the leaves (12, 16 and 24 bytes) fall in two groups, b and
# v, then w: the coordinates of each, in the flat (b, v, w) order.
TWO_FRAGMENTS = (("b", "v"), ("w",))
FLAT_LABELS = np.repeat([0, 0, 1], [3, 4, 6])
SHAPES = ((3,), (4,), (2, 3))  # The leaves' shapes in the flat order.

# Muon's Newton-Schulz iteration runs in float32: its map X -> aX + bAX + cA^2X
# has slope a = 3.4445 at small singular values, so a rounding error of the
# normalized matrix (float32's 6e-8) can grow by up to a^5 ~ 480 over the 5
# steps, about 3e-5 of an O(1) entry, 3e-6 of a step at learning rate 0.1.
# Eight inner steps and the outer steps (at most 0.7 (1 + 0.9) ~ 1.3 times a
# step) stay below 5e-5. One worker's Muon alone matches the reference to
# 1.3e-6 absolute, 2e-5 relative per step (tests/test_muon.py).
MUON_TOLERANCE = 5e-5

CASES = [
  Case(
    "tower_mean",
    optax_dist.tower,
    {"loss_reduction": "mean"},
    {},
    bad=(
      (
        {"loss_reduction": "max"},
        ValueError,
        r"`loss_reduction` must be one of \('sum', 'mean'\), got 'max'",
      ),
    ),
  ),
  Case("tower_sum", optax_dist.tower, {"loss_reduction": "sum"}, {}),
  Case(
    "elastic_simultaneous",
    optax_dist.elastic_average,
    {"communication_period": 2, "ordering": "simultaneous"},
    {"moving_rate": 0.3, "rho": 0.05},
    reference=functools.partial(numpy_reference.elastic, p=2, alpha=0.3, rho=0.05),
    bad=(
      *period_errors("communication_period"),
      ({"moving_rate": 0.0}, ValueError, r"moving_rate.*\(0, 1\]"),
      ({"moving_rate": 1.5}, ValueError, r"moving_rate.*\(0, 1\]"),
      ({"rho": -0.1}, ValueError, "rho.*>= 0"),
      ORDERING_ERROR,
    ),
    flags=EVERY_2ND,
  ),
  Case(
    "elastic_default_rho",  # rho = 0: the state keeps no snapshot.
    optax_dist.elastic_average,
    {"communication_period": 3, "sync_warmup": 1},
    {"moving_rate": 0.3},
    flags=("warmup", False, False, True, False, False, True, False, False),
  ),
  Case(
    "elastic_round_robin",  # The default moving rate, 0.9 / period / N.
    optax_dist.elastic_average,
    {"communication_period": 2, "ordering": "round_robin"},
    {"rho": 0.05},
    reference=functools.partial(numpy_reference.elastic, p=2, rho=0.05, ordering="round_robin"),
    flags=EVERY_2ND,
  ),
  Case(
    "agn_simultaneous",
    optax_dist.agn,
    {"communication_period": 2},
    {},
    reference=functools.partial(numpy_reference.agn, p=2, ordering="simultaneous"),
    bad=(
      *period_errors("communication_period"),
      ORDERING_ERROR,
      ({"center_reduction": "max"}, ValueError, "center_reduction.*'sum', 'mean'"),
    ),
    flags=EVERY_2ND,
  ),
  Case(
    "agn_round_robin_mean",
    optax_dist.agn,
    {"communication_period": 2, "ordering": "round_robin", "center_reduction": "mean"},
    {},
    reference=functools.partial(
      numpy_reference.agn, p=2, ordering="round_robin", center_reduction="mean"
    ),
    flags=EVERY_2ND,
  ),
  Case(
    "model_average",
    optax_dist.model_average,
    {"interval_steps": 2},
    {},
    reference=functools.partial(numpy_reference.model_average, p=2),
    bad=(
      *period_errors("interval_steps"),
      ({"interval_steps": None}, TypeError, "interval_steps.*int"),
    ),
    flags=EVERY_2ND,
  ),
  Case(
    "model_average_streaming_int8",
    optax_dist.model_average,
    {"interval_steps": 4, "fragments": 2, "comm_dtype": jnp.int8, "error_feedback": True},
    {},
    flags=(False, 0, False, 1, False, 0, False, 1, False),
    fragments=(("b", "v"), ("w",)),
  ),
  Case(
    "diloco",  # The default outer optimizer: Nesterov SGD(0.7, 0.9).
    optax_dist.diloco,
    {"sync_period": 2},
    {},
    reference=functools.partial(numpy_reference.diloco, p=2),
    bad=(
      *period_errors("sync_period"),
      ({"outer": 0.7}, TypeError, "outer.*GradientTransformation"),
      ({"sync_period": 3, "fragments": 2}, ValueError, r"sync_period` \(3\) must be a multiple"),
    ),
    flags=EVERY_2ND,
  ),
  Case(
    "diloco_warmup_fragments",  # Leaves of 12, 16 and 24 bytes: b and v, then w.
    optax_dist.diloco,
    {"sync_period": 4, "fragments": 2, "sync_warmup": 2},
    {},
    flags=("warmup", "warmup", False, 0, False, 1, False, 0, False),
    fragments=TWO_FRAGMENTS,
    reference=functools.partial(numpy_reference.diloco, p=4, warmup=2, labels=FLAT_LABELS),
    reference_workers=(2, 4),
  ),
  Case(
    # Muon inside (MuLoCo: Newton-Schulz on w, Adam on b and v),
    # with a delayed, blended fragment sync: fragment 0's sync is scheduled on
    # call 3, reduced on call 2 (flag 0) and lands on call 3 (flag ("apply",
    # 0)), blended halfway; fragment 1's on calls 5 and 6, fragment 0's again
    # on calls 8 and 9.
    "diloco_muon_delay2_blend",
    optax_dist.diloco,
    {"sync_period": 6, "fragments": 2, "delay": 2, "blend": 0.5},
    {},
    bad=(
      ({"delay": 3}, ValueError, r"must be < `sync_period` / fragments \(6 / 2 = 3\)"),
      ({"blend": 1.5}, ValueError, r"`blend` must be in \[0, 1\]"),
    ),
    flags=(False, 0, ("apply", 0), False, 1, ("apply", 1), False, 0, ("apply", 0)),
    fragments=TWO_FRAGMENTS,
    reference=functools.partial(
      numpy_reference.diloco, p=6, labels=FLAT_LABELS, delay=2, blend=0.5, shapes=SHAPES
    ),
    reference_workers=(4,),
    inner="muon",
    tolerance=MUON_TOLERANCE,
  ),
  Case(
    # Delay 1: the scheduled call reduces from the params it receives and
    # lands, blend 0: on the center; after a one-call warm-up.
    "model_average_delay1",
    optax_dist.model_average,
    {"interval_steps": 4, "fragments": 2, "delay": 1, "blend": 0.0, "sync_warmup": 1},
    {},
    bad=(({"delay": 1.0}, TypeError, "`delay` must be a Python int"),),
    flags=("warmup", False, 0, False, 1, False, 0, False, 1),
    fragments=TWO_FRAGMENTS,
    reference=functools.partial(
      numpy_reference.model_average, p=4, warmup=1, labels=FLAT_LABELS, delay=1
    ),
    reference_workers=(2,),  # With Adam inside.
  ),
  Case("diloco_bf16_comm", optax_dist.diloco, {"sync_period": 2, "comm_dtype": jnp.bfloat16}, {}),
  Case(
    "apply_if_all_finite",
    optax_dist.apply_if_all_finite,
    {"max_consecutive_errors": 2},
    {},
    bad=(
      ({"max_consecutive_errors": -1}, ValueError, "max_consecutive_errors"),
      ({"max_consecutive_errors": 1.5}, ValueError, "max_consecutive_errors"),
    ),
  ),
]
PERIODIC = [case for case in CASES if case.flags]


def test_the_cases_cover_the_harness_list_of_algorithms():
  # The tests' one list of algorithms (tests/harness.py) names every
  # algorithm the library declares, and the contract covers each of them.
  from optax_dist import _declare

  declared = _declare.algorithms().replace(" or ", ", ").split(", ")
  assert sorted(ALGORITHMS) == sorted(["tower", *declared])
  wrappers = {optax_dist.apply_if_all_finite}  # Cases of a wrapper, not of an algorithm.
  assert {case.factory for case in CASES} - wrappers == {make for make, _ in ALGORITHMS.values()}


NEEDS_PARAMS = {
  "elastic_average": "elastic_average",
  "agn": "agn",
  "model_average": "model_average",
  "diloco": "diloco",
}

N = 2  # Workers, simulated with vmap unless a check says otherwise.
STEPS = 4


def params_and_grads(dtype=jnp.float32, steps=STEPS, seed=0, n=N):
  rng = np.random.default_rng(seed)
  params = {"b": rng.normal(size=(3,)), "v": rng.normal(size=(4,)), "w": rng.normal(size=(2, 3))}
  params = stack(jax.tree.map(lambda x: jnp.asarray(x, dtype), params), n)
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
    optax.masked(case.make(), {"b": False, "v": True, "w": True}), params, grads, mode="vmap"
  )

  def inside(tree):
    return {k: tree[k] for k in ("v", "w")}

  only = run_transform(case.make(), inside(params), [inside(g) for g in grads], mode="vmap")
  for step, g in enumerate(grads):
    np.testing.assert_array_equal(masked.updates[step]["b"], g["b"])
    chex.assert_trees_all_close(
      inside(masked.params[step]), only.params[step], rtol=1e-6, atol=1e-6
    )


def test_in_inject_hyperparams(case):
  # The inner learning rate goes through the factory as an injected value,
  # with the case's own numeric hyperparameters; changing the injected values
  # in the state changes the training exactly as building the transform with
  # them would.
  params, grads = params_and_grads()
  static = ("axis_name", *(k for k, v in case.kwargs.items() if not isinstance(v, str)))

  def factory(learning_rate, **kwargs):
    return case.factory(INNERS[case.inner](learning_rate), **kwargs)

  # The case's own signature, with the learning rate in place of `inner`.
  signature = inspect.signature(case.factory)
  factory.__signature__ = signature.replace(  # type: ignore[attr-defined]
    parameters=[
      inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD),
      *(p for name, p in signature.parameters.items() if name != "inner"),
    ]
  )

  injected = optax.inject_hyperparams(factory, static_args=static)(
    0.1, axis_name=AXIS, **case.kwargs, **case.numeric
  )
  init = injected.init
  state = init(jax.tree.map(lambda x: x[0], params))
  assert {"learning_rate", *case.numeric} <= set(state.hyperparams)
  changed = {k: v * 0.5 for k, v in case.numeric.items()}

  def init_changed(p):
    values = {"learning_rate": 0.3, **changed}
    return optax.tree.set(init(p), **{k: jnp.float32(v) for k, v in values.items()})

  assert_trajectories_close(
    run_transform(injected._replace(init=init_changed), params, grads, mode="vmap"),
    run_transform(case.shared(case.inner, 0.3, **changed), params, grads, mode="vmap"),
  )


def test_inner_learning_rate_injected_and_changed(case):
  # The inner optimizer's injected learning rate is read every step.
  params, grads = params_and_grads()
  tx = case.make(optax.inject_hyperparams(INNERS[case.inner])(learning_rate=0.1))
  init = tx.init

  def init_with_lr_0_3(p):
    return optax.tree.set(init(p), learning_rate=jnp.float32(0.3))

  changed = run_transform(tx._replace(init=init_with_lr_0_3), params, grads, mode="vmap")
  assert_trajectories_close(
    changed, run_transform(case.shared(case.inner, 0.3), params, grads, mode="vmap")
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


def test_bad_arguments_are_clear_errors(case):
  for kwargs, error, match in case.bad:
    with pytest.raises(error, match=match):
      case.make(**kwargs)


def test_params_are_required_where_needed(case):
  tx = case.make()
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
  state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.ones((2, *x.shape)), params)
  name = case.factory.__name__
  if name in NEEDS_PARAMS:
    with pytest.raises(ValueError, match=f"{NEEDS_PARAMS[name]} needs the current params"):
      jax.vmap(lambda g: tx.update(g, state), axis_name=AXIS)(grads)
  else:  # tower and apply_if_all_finite pass params on to the inner optimizer.
    jax.vmap(lambda g: tx.update(g, state), axis_name=AXIS)(grads)


def test_an_unbound_axis_is_named(case):
  tx = case.factory(optax.sgd(0.1), axis_name="hosts", **case.kwargs, **case.numeric)
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
  state = tx.init(params)  # init is local: no axis needed.
  with pytest.raises(NameError, match=r"'hosts' is not bound.*axis_name='hosts'"):
    jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)


def landed(case, flag):
  """The fragments whose outer step lands on a call with this flag.

  Undelayed or with delay 1, the fragment a flag names (every one for True);
  with a delay of 2 or more the call that reduces lands nothing and
  ``("apply", f)`` lands fragment f.
  """
  if flag is False or flag == "warmup":
    return ()
  if isinstance(flag, tuple):
    return (flag[1],)
  if case.delay >= 2:
    return ()
  return tuple(range(len(case.fragments))) if flag is True else (flag,)


def syncs(case, steps):
  """Syncs in the first ``steps`` calls (global_step): one per fragment landed."""
  return sum(len(landed(case, f)) for f in case.flags[:steps])


@pytest.mark.parametrize("case", PERIODIC, ids=lambda c: c.name)
@pytest.mark.parametrize("static", [False, True], ids=["in_graph", "static"])
def test_syncs_on_the_calls_of_the_schedule(case, static):
  # The schedule gives the case's gold flags, and the calls do what they say,
  # read from what a sync does: the center moves on the leaves of the
  # fragments that land (all of them for True, none on a delayed sync's
  # reducing call, fragment f on ("apply", f)), and follows the params during
  # a warm-up; it stays put on the other calls and leaves. The static flags
  # give the in-graph results, bit for bit; with Muon inside, to Muon's
  # tolerance: the two programs fuse its float32 Newton-Schulz products
  # differently (they differ by 1.3e-6 after 8 calls).
  steps = len(case.flags)
  params, grads = params_and_grads(steps=steps, seed=3)
  tx = case.make()
  schedule = optax_dist.sync_schedule(tx.init(jax.tree.map(lambda x: x[0], params)))
  assert [schedule(t) for t in range(steps)] == list(case.flags)
  run = run_transform(tx, params, grads, mode="vmap")
  if static:
    in_graph, run = run, run_transform(tx, params, grads, mode="vmap", flags=list(case.flags))
    tol = {"rtol": MUON_TOLERANCE, "atol": MUON_TOLERANCE} if case.inner == "muon" else None
    for t, (a, b) in enumerate(zip(in_graph.params, run.params, strict=True)):
      if tol:
        chex.assert_trees_all_close(a, b, **tol, custom_message=f"call {t + 1}")
      else:
        chex.assert_trees_all_equal(a, b, custom_message=f"call {t + 1}")
  init_state = map_workers(tx.init, N, "vmap")(params)
  centers = [optax_dist.center_params(s) for s in [init_state, *run.states]]
  moved = [
    {k for k in c1 if not np.array_equal(c0[k], c1[k])} for c0, c1 in itertools.pairwise(centers)
  ]
  expected = [
    set(params) if f == "warmup" else {k for i in landed(case, f) for k in case.fragments[i]}
    for f in case.flags
  ]
  assert moved == expected, (moved, expected)
  np.testing.assert_array_equal(optax_dist.global_step(run.state), [syncs(case, steps)] * N)
  assert optax_dist.call_count(run.state) == steps


def flat(tree):
  """(N, D): each worker's leaves, flattened and concatenated (b, v, w)."""
  return np.concatenate([np.reshape(x, (np.shape(x)[0], -1)) for x in jax.tree.leaves(tree)], 1)


REFERENCE = [
  (case, mode, n)
  for case in CASES
  if case.reference
  for mode in MODES
  for n in case.reference_workers
]


@pytest.mark.parametrize(
  ("case", "mode", "n"), REFERENCE, ids=[f"{c.name}-{m}-{n}" for c, m, n in REFERENCE]
)
def test_matches_numpy_reference(case, mode, n):
  # Every step's params of every worker and the final center, against the
  # equations in float64; the inner optimizer is Adam for half of the worker
  # counts and the case's momentum SGD for the others, so that every mode
  # meets both (a case with another inner optimizer runs that one).
  inner = case.inner
  if inner == "momentum":
    inner = "adam" if (n in (2, 8)) == (CASES.index(case) % 2 == 0) else "momentum"
  steps = 8
  params, grads = params_and_grads(steps=steps, seed=100 + n, n=n)
  traj = run_transform(case.shared(inner, 0.1), params, grads, mode=mode)
  expected = case.reference(flat(params)[0], np.stack([flat(g) for g in grads]), n=n, inner=inner)
  tol = {"rtol": case.tolerance, "atol": case.tolerance}
  for t, (x, _) in enumerate(expected):
    np.testing.assert_allclose(flat(traj.params[t]), x, **tol, err_msg=f"call {t + 1}")
  np.testing.assert_allclose(
    flat(optax_dist.center_params(traj.state)), np.repeat(expected[-1][1][None], n, 0), **tol
  )
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [syncs(case, steps)] * n)


@pytest.mark.parametrize("case", PERIODIC, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_params_are_a_clear_error(case, dtype):
  # A periodic transform averages and moves params: it names the leaf that
  # cannot be, at init.
  params = {"w": jnp.zeros(3), "count": jnp.zeros(2, dtype), "v": jnp.zeros(2)}
  with pytest.raises(TypeError, match=rf"leaf at \['count'\] has dtype {jnp.dtype(dtype)}"):
    case.make().init(params)
