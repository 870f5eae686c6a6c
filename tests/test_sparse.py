"""Sparse top-k syncs (SparseLoCo): a float64 NumPy reference, the feedback rule, bytes, errors."""

import math

from harness import AXIS
from harness import map_workers
from harness import run_transform
from harness import stack
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_dist
from optax_dist import _sparse

CHUNK = 256
TOP = {None: None, "int8": 127, "int4": 7, "int2": 1}
BITS = {"int8": 8, "int4": 4, "int2": 2}


def test_chunk_and_keep_are_the_documented_ones():
  assert _sparse.CHUNK == CHUNK  # A position fits in one byte.
  assert [_sparse.keep(r) for r in (0.001, 0.02, 0.03, 0.5, 0.999)] == [1, 6, 8, 128, 256]


def values(n, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "a": (rng.normal(size=(n, 700)) * np.exp(rng.normal(size=(n, 1)))).astype(np.float32),
    "b": rng.normal(size=(n, 5, 3)).astype(np.float32) * 1e-3,
  }


def flat_of(tree, n):
  return np.concatenate(
    [np.asarray(x, np.float64).reshape(n, -1) for x in jax.tree.leaves(tree)], 1
  )


def np_pack_unpack(codes, width):
  """Codes through the wire's bytes and back: pack ``8 // width`` to a byte, sign-extend."""
  per = 8 // width
  flat = codes.reshape(-1)
  flat = np.concatenate([flat, np.zeros(-flat.size % per, np.int64)])
  low = (flat & ((1 << width) - 1)).reshape(-1, per)
  packed = (low << (np.arange(per) * width)).sum(-1).astype(np.uint8)
  fields = (packed[:, None].astype(np.int64) >> (np.arange(per) * width)) & ((1 << width) - 1)
  signed = np.where(fields >= 1 << (width - 1), fields - (1 << width), fields)
  return signed.reshape(-1)[: codes.size].reshape(codes.shape)


def np_gather_sum(flat, fraction, dtype):
  """Each worker's top k per chunk of 256, quantized per chunk, summed in worker order."""
  n, size = flat.shape
  m, k = -(-size // CHUNK), math.ceil(fraction * CHUNK)
  chunks = np.zeros((n, m * CHUNK))
  chunks[:, :size] = flat
  chunks = chunks.reshape(n, m, CHUNK)
  total = np.zeros((m, CHUNK))
  sent = np.zeros_like(chunks)
  for j in range(n):
    order = np.argsort(-np.abs(chunks[j]), axis=1, kind="stable")[:, :k]
    picked = np.take_along_axis(chunks[j], order, axis=1)
    if dtype is not None:
      top = TOP[dtype]
      scale = np.abs(picked).max(1, keepdims=True) / top
      codes = np.clip(np.round(picked / np.where(scale > 0, scale, 1)), -top, top).astype(np.int64)
      picked = np_pack_unpack(codes, BITS[dtype]) * scale
    np.put_along_axis(sent[j], order, picked, axis=1)
    total = total + sent[j]
  dropped = (chunks - sent).reshape(n, -1)[:, :size]
  return total.reshape(-1)[:size], dropped


@pytest.mark.parametrize("dtype", [None, "int4", "int2"])
@pytest.mark.parametrize("mode", ["vmap", "shard_map", "pmap"])
def test_gather_sum_matches_the_float64_reference_on_every_worker(dtype, mode):
  n = 4
  x = values(n, seed=1)
  wire = None if dtype is None else jnp.dtype(dtype)
  fn = map_workers(lambda t: _sparse.gather_sum(t, (AXIS,), 0.03, wire), n, mode)
  total, dropped = fn(x)
  got = flat_of(total, n)
  np.testing.assert_array_equal(got, np.broadcast_to(got[0], got.shape))
  reference, reference_dropped = np_gather_sum(flat_of(x, n), 0.03, dtype)
  np.testing.assert_allclose(got[0], reference, rtol=1e-6, atol=1e-12)
  # What was not sent, up to the float32 rounding of a subtraction.
  atol = 1e-6 * np.abs(flat_of(x, n)).max()
  np.testing.assert_allclose(flat_of(dropped, n), reference_dropped, rtol=1e-6, atol=atol)
  # 8 per chunk of 256 from each worker: 3 chunks, 4 workers, at most 96 numbers.
  assert 0 < np.count_nonzero(got[0]) <= 4 * 3 * 8


def test_a_non_finite_chunk_makes_the_sum_non_finite():
  x = values(4)
  x["a"][2, 600] = np.nan  # Not among the largest: the chunk's scale carries it.
  for dtype in (None, jnp.int4):
    total, _ = jax.vmap(lambda t, d=dtype: _sparse.gather_sum(t, (AXIS,), 0.02, d), axis_name=AXIS)(
      x
    )
    assert not np.isfinite(np.asarray(total["a"])).all()


def test_the_error_feedback_rule_with_decay_against_numpy():
  # SGD(1) inner steps on a fixed gradient per worker, one sync per call,
  # outer SGD(1): each sync sends top_k(delta + beta * e); e keeps the rest.
  n, steps, beta, fraction = 4, 5, 0.8, 0.05
  rng = np.random.default_rng(5)
  g = rng.normal(size=(steps, n, 300)).astype(np.float32)
  params = stack({"w": np.zeros(300, np.float32)}, n)
  tx = optax_dist.diloco(
    optax.sgd(1.0),
    axis_name=AXIS,
    sync_period=1,
    outer=optax.sgd(1.0),
    topk_fraction=fraction,
    error_decay=beta,
  )
  got = run_transform(tx, params, [{"w": gi} for gi in g], mode="vmap")
  center, e = np.zeros(300), np.zeros((n, 300))
  for s in range(steps):
    delta = g[s].astype(np.float64)  # center - (center - g) with SGD(1).
    a = delta + beta * e
    total, e = np_gather_sum(a, fraction, None)
    center = center - total / n
  np.testing.assert_allclose(
    np.asarray(optax_dist.center_params(got.state)["w"][0]), center, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(np.asarray(got.state.residual["w"]), e, rtol=1e-5, atol=1e-6)


def test_error_feedback_is_on_by_default_with_topk():
  tx = optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, topk_fraction=0.1)
  state = tx.init({"w": jnp.zeros(3)})
  np.testing.assert_array_equal(state.residual["w"], np.zeros(3))
  off = optax_dist.model_average(
    optax.sgd(0.1), axis_name=AXIS, topk_fraction=0.1, error_feedback=False
  )
  assert isinstance(off.init({"w": jnp.zeros(3)}).residual, optax.EmptyState)


@pytest.mark.parametrize("dtype", [None, "int2"])
def test_error_feedback_keeps_the_error_from_accumulating(dtype):
  n, steps = 4, 40
  rng = np.random.default_rng(3)
  params = stack({"w": np.zeros(512, np.float32)}, n)
  g = rng.normal(size=(n, 512)).astype(np.float32) * np.linspace(0.1, 1.0, 512, dtype=np.float32)
  grads = [{"w": g}] * steps
  wire = None if dtype is None else jnp.dtype(dtype)

  def center(**kw):
    tx = optax_dist.diloco(
      optax.sgd(0.01), axis_name=AXIS, sync_period=1, outer=optax.sgd(1.0), **kw
    )
    got = run_transform(tx, params, grads, mode="vmap")
    return np.asarray(optax_dist.center_params(got.state)["w"][0])

  reference = center()
  without = np.max(
    np.abs(center(topk_fraction=0.1, comm_dtype=wire, error_feedback=False) - reference)
  )
  with_feedback = np.max(
    np.abs(center(topk_fraction=0.1, comm_dtype=wire, error_decay=1.0) - reference)
  )
  assert with_feedback < without / 5, (with_feedback, without)


@pytest.mark.parametrize("name", ["model_average"])
def test_topk_syncs_keep_the_center_identical(name):
  n = 4
  rng = np.random.default_rng(1)
  params = stack({"w": rng.normal(size=(40, 30)).astype(np.float32)}, n)
  grads = [{"w": rng.normal(size=(n, 40, 30)).astype(np.float32)} for _ in range(4)]
  make = {
    "diloco": lambda **kw: optax_dist.diloco(
      optax.sgd(0.1), axis_name=AXIS, sync_period=2, outer=optax.sgd(0.7), **kw
    ),
    "model_average": lambda **kw: optax_dist.model_average(
      optax.sgd(0.1), axis_name=AXIS, interval_steps=2, **kw
    ),
  }[name]
  got = run_transform(
    make(topk_fraction=0.05, comm_dtype=jnp.int4), params, grads, mode="shard_map"
  )
  center = np.asarray(optax_dist.center_params(got.state)["w"])
  np.testing.assert_array_equal(center, np.broadcast_to(center[0], center.shape))
  start = np.asarray(params["w"][0])
  moved = center[0] - start
  # Two syncs of at most 13 numbers per chunk of 256 from each of 4 workers.
  assert 0 < np.count_nonzero(moved) <= 2 * 4 * 13 * math.ceil(1200 / 256)


def lowered(tx, n, params):
  mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])

  def step(p, s, g):
    p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
    u, s = tx.update(g, s, p, sync=True)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
  return fn, params, jax.vmap(tx.init)(params), params


@pytest.mark.parametrize(("dtype", "target"), [("int4", 0.06), (None, 0.13)])
def test_topk_sends_one_all_gather_of_bytes(dtype, target):
  n = 8
  num = 64 * 1024 + 3 * 256
  params = stack(
    {
      "w": np.zeros((64, 1024), np.float32),
      "b": np.zeros(256, np.float32),
      "c": np.zeros(256, np.float32),
      "d": np.zeros(256, np.float32),
    },
    n,
  )

  def make(**kw):
    return optax_dist.diloco(optax.sgd(0.1), axis_name=AXIS, sync_period=2, **kw)

  f32 = optax_dist.communication_report(*lowered(make(), n, params))
  wire = None if dtype is None else jnp.dtype(dtype)
  q = optax_dist.communication_report(
    *lowered(make(topk_fraction=0.02, comm_dtype=wire), n, params)
  )
  # The whole sync is one collective: the count of finite workers
  # (docs/worker_failures.md) rides in the same all-gather as the
  # contribution, no scalar psum.
  kinds = [(c.kind, c.shape.split("[")[0].strip("(")) for c in q.collectives]
  assert kinds == [("all-gather", "u8")], kinds
  share = _sparse.wire_bytes(num, 0.02, wire)
  # One worker's bytes and the count's 4 float32 bytes, from each of the 7 others.
  assert q.collectives[0].shape.startswith(f"u8[{n},{share + 4}]"), q.collectives[0].shape
  assert q.every_step_wire_bytes == (n - 1) * (share + 4)
  # 6 positions, 6 values and a scale per chunk of 256 numbers.
  per_chunk = {"int4": 6 + 3 + 4, None: 6 * 5}[dtype]
  assert share == num // 256 * per_chunk
  ratio = q.every_step_wire_bytes / f32.every_step_wire_bytes
  assert ratio <= target, ratio


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"topk_fraction": 0.0}, ValueError, r"must be in \(0, 1\)"),
    ({"topk_fraction": 1.0}, ValueError, r"must be in \(0, 1\)"),
    ({"topk_fraction": "0.1"}, TypeError, "must be a Python float"),
    ({"topk_fraction": True}, TypeError, "must be a Python float"),
    ({"topk_fraction": 0.1, "error_decay": 0.0}, ValueError, r"must be in \(0, 1\]"),
    ({"topk_fraction": 0.1, "error_decay": 1.5}, ValueError, r"must be in \(0, 1\]"),
    ({"topk_fraction": 0.1, "error_decay": "x"}, TypeError, "must be a Python float"),
    (
      {"topk_fraction": 0.1, "error_feedback": False, "error_decay": 0.9},
      ValueError,
      "needs `error_feedback=True`",
    ),
    ({"error_decay": 0.9}, ValueError, "needs `error_feedback=True`"),
    ({"topk_fraction": 0.1, "comm_dtype": jnp.bfloat16}, ValueError, "With `topk_fraction`"),
  ],
)
@pytest.mark.parametrize("name", ["diloco", "model_average"])
def test_bad_topk_arguments(name, kwargs, error, match):
  make = getattr(optax_dist, name)
  with pytest.raises(error, match=match):
    make(optax.sgd(0.1), axis_name=AXIS, **kwargs)


def test_inject_hyperparams_says_that_topk_fraction_is_static():
  tx = optax.inject_hyperparams(optax_dist.model_average)(
    optax.sgd(0.1), axis_name=AXIS, topk_fraction=0.1
  )
  with pytest.raises(TypeError, match="list it in `static_args`"):
    tx.init({"w": jnp.zeros(3)})
