"""Streaming syncs: the params cut into fragments that sync one at a time."""

from harness import AXIS
from harness import MODES
from harness import run_transform
from harness import stack
import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import numpy_reference
import optax
import pytest

import optax_dist
from optax_dist import _fragments

# Four leaves of 20, 12, 6 and 2 numbers (flatten order: a, b, c, d).
SHAPES = {"a": (4, 5), "b": (12,), "c": (2, 3), "d": (2,)}
PERIOD = 4
STEPS = 9


def problem(n, seed=0):
  rng = np.random.default_rng(seed)
  x0 = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [
    {k: rng.normal(size=(n, *s)).astype(np.float32) for k, s in SHAPES.items()}
    for _ in range(STEPS)
  ]
  return x0, grads


def flat(tree, lead=()):
  return np.concatenate([np.asarray(x).reshape(*lead, -1) for x in jax.tree.leaves(tree)], axis=-1)


def coordinate_labels(leaf_labels):
  """One label per number, from one label per leaf (in flatten order)."""
  sizes = [int(np.prod(s)) for s in SHAPES.values()]
  return np.repeat(leaf_labels, sizes)


# labels of the leaves a, b, c, d under each way of giving fragments
FRAGMENTS = {
  "labels": ({"a": 1, "b": 0, "c": 1, "d": 0}, [1, 0, 1, 0]),
  "int": (2, [0, 1, 1, 1]),  # 80 bytes, then 48 + 24 + 8 = 80 bytes.
  "callable": (lambda params: {k: int(k in "ad") for k in params}, [1, 0, 0, 1]),
  "prefix": ({"a": 0, "b": 1, "c": 0, "d": 0}, [0, 1, 0, 0]),
}


@pytest.mark.parametrize("way", sorted(FRAGMENTS))
@pytest.mark.parametrize("algorithm", ["diloco", "model_average"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_numpy_reference(way, algorithm, mode):
  n = 4
  x0, grads = problem(n, seed=len(way))
  fragments, leaf_labels = FRAGMENTS[way]
  inner = optax.adam(0.1, b2=0.99)
  if algorithm == "diloco":
    tx = optax_dist.diloco(inner, axis_name=AXIS, sync_period=PERIOD, fragments=fragments)
  else:
    tx = optax_dist.model_average(inner, axis_name=AXIS, interval_steps=PERIOD, fragments=fragments)
  traj = run_transform(tx, stack(x0, n), grads, mode=mode)
  expected = getattr(numpy_reference, algorithm)(
    flat(x0),
    np.stack([flat(g, (n,)) for g in grads]),
    n=n,
    p=PERIOD,
    inner="adam",
    labels=coordinate_labels(leaf_labels),
  )
  for t, (x, _) in enumerate(expected):
    np.testing.assert_allclose(flat(traj.params[t], (n,)), x, rtol=2e-6, atol=2e-6, err_msg=f"{t}")
  center = flat(optax_dist.center_params(traj.state), (n,))
  np.testing.assert_allclose(center[0], expected[-1][1], rtol=2e-6, atol=2e-6)
  # Fragment f syncs on the calls s with s % 4 == ((f + 1) * 2) % 4: fragment
  # 0 on calls 2 and 6, fragment 1 on calls 4 and 8; one outer step each.
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [4] * n)


@pytest.mark.parametrize("algorithm", ["diloco", "model_average"])
def test_sync_true_syncs_every_fragment(algorithm):
  # A static sync=True on a fragmented transform syncs every fragment (each
  # with its own outer state), a fragment index that fragment alone.
  n = 4
  x0, grads = problem(n, seed=5)
  flags = [False, True, False, 0, True, 1]
  fragments, leaf_labels = FRAGMENTS["int"]
  inner = optax.adam(0.1, b2=0.99)
  if algorithm == "diloco":
    tx = optax_dist.diloco(inner, axis_name=AXIS, sync_period=PERIOD, fragments=fragments)
  else:
    tx = optax_dist.model_average(inner, axis_name=AXIS, interval_steps=PERIOD, fragments=fragments)
  traj = run_transform(tx, stack(x0, n), grads[: len(flags)], mode="shard_map", flags=flags)
  expected = getattr(numpy_reference, algorithm)(
    flat(x0),
    np.stack([flat(g, (n,)) for g in grads[: len(flags)]]),
    n=n,
    p=PERIOD,
    inner="adam",
    labels=coordinate_labels(leaf_labels),
    flags=flags,
  )
  for t, (x, c) in enumerate(expected):
    np.testing.assert_allclose(flat(traj.params[t], (n,)), x, rtol=2e-6, atol=2e-6, err_msg=f"{t}")
    center = flat(optax_dist.center_params(traj.states[t]), (n,))[0]
    np.testing.assert_allclose(center, c, rtol=2e-6, atol=2e-6, err_msg=f"{t}")
  # After call 2 every worker stands on the center, whatever its fragment.
  jax.tree.map(
    lambda a: np.testing.assert_allclose(a, np.broadcast_to(a[0], a.shape), rtol=1e-6, atol=1e-6),
    traj.params[1],
  )
  # Two fragments on each True, one on each index: 2 + 1 + 2 + 1.
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [6] * n)


def test_one_fragment_is_the_whole_model_bit_for_bit():
  n = 4
  x0, grads = problem(n, seed=9)
  inner = optax.adam(0.1)
  runs = [
    run_transform(
      optax_dist.diloco(inner, axis_name=AXIS, sync_period=3, **kwargs),
      stack(x0, n),
      grads,
      mode="shard_map",
    )
    for kwargs in ({}, {"fragments": 1}, {"fragments": {k: 0 for k in SHAPES}})
  ]
  for other in runs[1:]:
    jax.tree.map(np.testing.assert_array_equal, other.params, runs[0].params)
    jax.tree.map(np.testing.assert_array_equal, other.state, runs[0].state)


def test_each_fragment_keeps_its_own_outer_state():
  tx = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=4, fragments=2)
  state = tx.init({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
  assert isinstance(state.outer_state, tuple) and len(state.outer_state) == 2
  # Each outer state holds momentum for its own fragment's leaves only.
  traces = [s[0].trace for s in state.outer_state]
  assert [k for k, v in traces[0].items() if not isinstance(v, optax.MaskedNode)] == ["a"]
  assert [k for k, v in traces[1].items() if not isinstance(v, optax.MaskedNode)] == ["b", "c", "d"]


def test_contiguous_groups_of_nearly_equal_bytes():
  def cut(sizes, num):
    params = {f"w{i}": np.zeros(size, np.float32) for i, size in enumerate(sizes)}
    labels, count = _fragments.labels(num, params)
    assert count == num
    return [labels[f"w{i}"] for i in range(len(sizes))]

  # Each boundary falls at the leaf boundary nearest to k / F of the bytes.
  assert cut([10] * 6, 3) == [0, 0, 1, 1, 2, 2]
  assert cut([10, 30, 20, 20, 10, 10], 2) == [0, 0, 1, 1, 1, 1]  # 160 | 240 bytes.
  # A leaf is never split, and every fragment gets one.
  assert cut([100, 10, 10, 10], 2) == [0, 1, 1, 1]
  assert cut([100, 1, 1], 3) == [0, 1, 2]


def test_a_sync_moves_one_fragment():
  # The peak bytes of a sync fall by the number of fragments; a whole period
  # still moves the model once.
  n = 4
  params = stack({f"w{i}": np.zeros((64, 64), np.float32) for i in range(4)}, n)
  mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
  reports = {}
  for f in (1, 4):
    tx = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=8, fragments=f)

    def step(p, s, g, tx=tx):
      p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
      u, s = tx.update(g, s, p)
      return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    reports[f] = optax_dist.communication_report(fn, params, jax.vmap(tx.init)(params), params)
  whole = 4 * 64 * 64 * 4
  count = 4  # Each sync's all-reduce also carries the count of finite workers.
  assert reports[1].sync_bytes == whole + count
  assert reports[4].sync_bytes == whole + 4 * count
  assert reports[1].peak_sync_bytes == whole + count
  assert reports[4].peak_sync_bytes == whole // 4 + count
  assert len({c.loop for c in reports[4].collectives}) == 4


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"sync_period": 6, "fragments": 4}, ValueError, r"sync_period` \(6\) must be a multiple"),
    ({"fragments": 0}, ValueError, "`fragments` must be >= 1"),
    ({"fragments": {"a": -1, "b": 0}}, ValueError, r"label at \['a'\] is -1"),
    ({"fragments": {"a": 0.5, "b": 0}}, ValueError, r"label at \['a'\] is 0.5"),
    ({"fragments": {"a": 0, "b": 2}}, ValueError, r"no leaf is labelled \[1\]"),
  ],
)
def test_bad_fragments_at_construction(kwargs, error, match):
  with pytest.raises(error, match=match):
    optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, **{"sync_period": 4, **kwargs})


@pytest.mark.parametrize(
  ("fragments", "match"),
  [
    (8, "`fragments=8` needs at least 8 leaves"),  # With interval_steps=8 below.
    ({"a": 0, "x": 1}, "must be a prefix of the params"),
    (lambda params: {"a": 0, "b": 1, "c": 1, "d": 3}, r"no leaf is labelled \[2\]"),
    (lambda params: 3, r"no leaf is labelled \[0, 1, 2\]"),
    (
      lambda params: {"a": 0, "b": 1, "c": 2, "d": 2},
      r"period \(4\) must be a multiple of the number of fragments \(3\)",
    ),
  ],
)
def test_bad_fragments_at_init(fragments, match):
  tx = optax_dist.model_average(
    optax.sgd(0.1), axis_name=AXIS, interval_steps=4 if fragments != 8 else 8, fragments=fragments
  )
  with pytest.raises(ValueError, match=match):
    tx.init({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
