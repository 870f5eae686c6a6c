"""Quantized syncs: the int8 ring, its error bound, error feedback, and what crosses the wire."""

from harness import AXIS
from harness import COMPRESSED
from harness import compressed
from harness import compressed_problem
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
from optax_dist import _codec
from optax_dist import _quantize

BLOCK = _codec.BLOCK


def values(n, seed=0):
  rng = np.random.default_rng(seed)
  # Leaves of several sizes and scales, one not a multiple of the block.
  return {
    "a": (rng.normal(size=(n, 700)) * np.exp(rng.normal(size=(n, 1)))).astype(np.float32),
    "b": rng.normal(size=(n, 5, 3)).astype(np.float32) * 1e-3,
  }


def flat_blocks(tree, n):
  """Each worker's contribution as the ring cuts it: (n, blocks, BLOCK), zero-padded."""
  flat = np.concatenate([np.asarray(x).reshape(n, -1) for x in jax.tree.leaves(tree)], axis=1)
  chunk = -(-flat.shape[1] // n // BLOCK) * BLOCK
  padded = np.zeros((n, n * chunk), np.float32)
  padded[:, : flat.shape[1]] = flat
  return flat, padded.reshape(n, -1, BLOCK)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("mode", ["vmap", "shard_map", "pmap"])
def test_ring_sum_is_the_same_on_every_worker_and_within_the_bound(n, mode):
  x = values(n)
  total, dropped = map_workers(lambda t: _quantize.ring_sum(t, (AXIS,), jnp.int8), n, mode)(x)
  flat_total = np.concatenate([np.asarray(v).reshape(n, -1) for v in jax.tree.leaves(total)], 1)
  # Every worker holds the same bits.
  np.testing.assert_array_equal(flat_total, np.broadcast_to(flat_total[0], flat_total.shape))
  # Error bound, element by element: (sum_k a_k + A) / 254, a_k the absmax
  # of worker k's block and A that of the summed block.
  flat, blocks = flat_blocks(x, n)
  exact = flat.sum(0)
  a = np.abs(blocks).max(-1, keepdims=True).sum(0)  # (blocks, 1)
  big_a = np.abs(blocks.sum(0)).max(-1, keepdims=True) * (1 + 1 / 127)
  bound = np.broadcast_to((a + big_a) / 254, blocks.shape[1:]).reshape(-1)[: exact.size]
  error = np.abs(flat_total[0] - exact)
  assert np.all(error <= bound * (1 + 1e-5) + 1e-30), np.max(error / bound)
  assert error.max() > 0  # It did quantize.
  # What the roundings dropped, summed over the workers, is what the sum
  # lacks: fed back, nothing is lost.
  flat_dropped = np.concatenate([np.asarray(v).reshape(n, -1) for v in jax.tree.leaves(dropped)], 1)
  np.testing.assert_allclose(flat_total[0] + flat_dropped.sum(0), exact, rtol=1e-5, atol=1e-6)


def test_a_non_finite_contribution_makes_the_sum_non_finite():
  x = values(4)
  x["b"][2, 1, 1] = np.inf
  total, _ = jax.vmap(lambda t: _quantize.ring_sum(t, (AXIS,), jnp.int8), axis_name=AXIS)(x)
  assert not np.isfinite(np.asarray(total["b"])).all()


@pytest.mark.parametrize("name", sorted(COMPRESSED))
@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_quantized_syncs_keep_the_center_identical_and_close_to_float32(name, dtype):
  params, grads = compressed_problem()
  exact = run_transform(compressed(name), params, grads, mode="shard_map")
  quantized = run_transform(
    compressed(name, comm_dtype=jnp.dtype(dtype)), params, grads, mode="shard_map"
  )
  center = np.asarray(optax_dist.center_params(quantized.state)["w"])
  np.testing.assert_array_equal(center, np.broadcast_to(center[0], center.shape))
  # int8 keeps 7 bits of each block's scale, e4m3 three of the mantissa.
  tolerance = {"int8": 2e-3, "float8_e4m3fn": 4e-2}[dtype]
  reference = np.asarray(optax_dist.center_params(exact.state)["w"])
  assert np.max(np.abs(center - reference)) < tolerance * np.max(np.abs(reference))
  assert not np.array_equal(center, reference)


def test_error_feedback_keeps_the_error_from_accumulating():
  # Every worker moves by the same constant each period, so the rounding of
  # the pseudo-gradient is the same every sync: without feedback it adds up
  # sync after sync; with it, what was dropped is sent again and the center
  # stays within a rounding or two of float32.
  n, steps = 4, 40
  rng = np.random.default_rng(3)
  params = stack({"w": np.zeros(300, np.float32)}, n)
  g = rng.normal(size=(n, 300)).astype(np.float32) * np.linspace(0.1, 1.0, 300, dtype=np.float32)
  grads = [{"w": g}] * steps

  def center_error(**kw):
    tx = optax_dist.diloco(
      optax.sgd(0.01), axis_name=AXIS, sync_period=1, outer=optax.sgd(1.0), **kw
    )
    got = run_transform(tx, params, grads, mode="vmap")
    reference = run_transform(
      optax_dist.diloco(optax.sgd(0.01), axis_name=AXIS, sync_period=1, outer=optax.sgd(1.0)),
      params,
      grads,
      mode="vmap",
    )
    c = np.asarray(optax_dist.center_params(got.state)["w"][0])
    r = np.asarray(optax_dist.center_params(reference.state)["w"][0])
    return np.max(np.abs(c - r))

  without = center_error(comm_dtype=jnp.int8)
  with_feedback = center_error(comm_dtype=jnp.int8, error_feedback=True)
  assert with_feedback < without / 5, (with_feedback, without)


def test_error_feedback_residual_is_written_back_with_fragments():
  # Model averaging in int8 with feedback, two fragments ("a" syncs on odd
  # calls, "b" on even ones). At a fragment's sync, what the roundings
  # dropped is kept per worker: over the workers, the residuals and the
  # center's move add up to what the workers sent (their differences to the
  # center plus their last residuals); the other fragment's residual stays.
  n = 4
  rng = np.random.default_rng(8)
  x0 = {"a": rng.normal(size=300).astype(np.float32), "b": rng.normal(size=200).astype(np.float32)}
  grads = [{k: rng.normal(size=(n, *v.shape)).astype(np.float32) for k, v in x0.items()}] * 3
  tx = optax_dist.model_average(
    optax.sgd(1.0),
    axis_name=AXIS,
    interval_steps=2,
    fragments={"a": 0, "b": 1},
    comm_dtype=jnp.int8,
    error_feedback=True,
  )
  traj = run_transform(tx, stack(x0, n), grads, mode="shard_map")
  params = [stack(x0, n), *traj.params]
  states = [jax.vmap(tx.init)(stack(x0, n)), *traj.states]
  for t, synced, other in ((1, "a", "b"), (2, "b", "a"), (3, "a", "b")):
    before, after = states[t - 1], states[t]
    center = np.asarray(before.center[synced][0], np.float64)
    sent = params[t - 1][synced] - grads[t - 1][synced] - center + before.residual[synced]
    moved = np.asarray(after.center[synced][0], np.float64) - center
    kept = np.asarray(after.residual[synced], np.float64)
    np.testing.assert_allclose(kept.sum(0) + n * moved, sent.sum(0), rtol=0, atol=2e-5)
    assert np.abs(kept).max() > 1e-4  # The rounding dropped something.
    np.testing.assert_array_equal(after.residual[other], before.residual[other])


def lowered(tx, n, params):
  mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])

  def step(p, s, g):
    p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
    u, s = tx.update(g, s, p, sync=True)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
  return fn, (params, jax.vmap(tx.init)(params), params)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_int8_sync_sends_under_a_third_of_the_float32_bytes(n):
  # 4 leaves, 64 * 1024 + 3 * 256 numbers: enough that the padding to whole
  # blocks per worker is small.
  params = stack(
    {
      "w": np.zeros((64, 1024), np.float32),
      "b": np.zeros(256, np.float32),
      "c": np.zeros(256, np.float32),
      "d": np.zeros(256, np.float32),
    },
    n,
  )
  f32 = optax_dist.communication_report(*_unpack(lowered(compressed("diloco"), n, params)))
  q = optax_dist.communication_report(
    *_unpack(lowered(compressed("diloco", comm_dtype=jnp.int8), n, params))
  )
  assert {c.kind for c in f32.collectives} == {"all-reduce"}
  assert {(c.kind, c.shape.split("[")[0].strip("(")) for c in q.collectives} >= {
    ("all-to-all", "s8"),
    ("all-gather", "s8"),
  }
  assert "all-reduce" not in {c.kind for c in q.collectives}
  assert all(c.workers == n for c in q.collectives)
  ratio = q.every_step_wire_bytes / f32.every_step_wire_bytes
  assert ratio <= 0.30, ratio
  # The float32 ring: 2 (N - 1) / N of the params' bytes, and of the count of
  # finite workers (4 bytes) that the same all-reduce carries.
  num = 64 * 1024 + 3 * 256
  assert f32.every_step_wire_bytes == pytest.approx(2 * (n - 1) / n * (4 * num + 4))


def _unpack(pair):
  fn, args = pair
  return (fn, *args)


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"comm_dtype": jnp.int16}, ValueError, "only integer format is jnp.int8"),
    ({"comm_dtype": jnp.uint8}, ValueError, "only integer format is jnp.int8"),
    ({"comm_dtype": "not-a-dtype"}, ValueError, "`comm_dtype` must be a dtype"),
    ({"comm_dtype": jnp.complex64}, ValueError, "floating dtype"),
    ({"error_feedback": True}, ValueError, "error_feedback=True` needs a quantized"),
    ({"comm_dtype": jnp.bfloat16, "error_feedback": True}, ValueError, "needs a quantized"),
    ({"comm_dtype": jnp.int8, "error_feedback": 1}, TypeError, "must be a Python bool"),
  ],
)
@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_bad_communication_arguments(name, kwargs, error, match):
  with pytest.raises(error, match=match):
    compressed(name, **kwargs)


def test_round_robin_takes_no_comm_dtype():
  with pytest.raises(ValueError, match="ordering='simultaneous'"):
    optax_dist.elastic_average(
      optax.sgd(0.1), axis_name=AXIS, ordering="round_robin", comm_dtype=jnp.int8
    )


def test_quantize_gold_blocks():
  # Scale = absmax / 127 per block; values round half to even; an all-zero
  # block has scale 0, a block with an Inf a NaN scale.
  blocks = np.zeros((4, BLOCK), np.float32)
  blocks[0, :5] = [127.0, -3.5, 2.5, 0.4, -0.6]  # Scale 1.
  blocks[1, :4] = [-254.0, 1.0, 3.0, -5.0]  # Scale 2: -127, 0.5, 1.5, -2.5.
  blocks[3, :2] = [1.0, np.inf]
  values, scale = _codec.quantize(jnp.asarray(blocks), jnp.int8)
  assert values.dtype == jnp.int8 and values.shape == (4, BLOCK)
  np.testing.assert_array_equal(scale[:3, 0], [1.0, 2.0, 0.0])
  assert scale.shape == (4, 1) and np.isnan(scale[3, 0])
  np.testing.assert_array_equal(values[0, :5], [127, -4, 2, 0, -1])
  np.testing.assert_array_equal(values[1, :4], [-127, 0, 2, -2])
  np.testing.assert_array_equal(values[0, 5:], 0)
  np.testing.assert_array_equal(values[2], 0)
  np.testing.assert_array_equal(
    _codec.dequantize(values[:2], scale[:2])[:, :5],
    [[127.0, -4.0, 2.0, 0.0, -1.0], [-254.0, 0.0, 4.0, -4.0, 0.0]],
  )


@pytest.mark.parametrize("n", [4, 8])
def test_each_block_of_a_chunk_has_its_own_scale(n):
  # Every worker's chunk is two blocks of int8's documented 256 numbers, of
  # magnitude 1e3 and 1e-3: one scale per block keeps the small block to
  # about 1e-3 / 127 (one scale per chunk, or blocks of 512, would round it
  # to zero).
  block = 256
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, n, 2, block)).astype(np.float32)
  x[:, :, 0] *= 1e3
  x[:, :, 1] *= 1e-3
  total, _ = map_workers(lambda t: _quantize.ring_sum(t, (AXIS,), jnp.int8), n, "vmap")(
    x.reshape(n, -1)
  )
  exact = x.astype(np.float64).sum(0)
  error = np.abs(np.asarray(total[0]).reshape(n, 2, block) - exact)
  # Per block: the workers' roundings (absmax / 254 each) and the sum's.
  absmax = np.abs(x).max(-1, keepdims=True)
  bound = (absmax.sum(0) + np.abs(exact).max(-1, keepdims=True) * (1 + 1 / 127)) / 254
  assert np.all(error <= bound * (1 + 1e-5)), np.max(error / bound)
  assert error[:, 1].max() < 1e-4
