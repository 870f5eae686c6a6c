"""What the TPU compiler schedules for a sync: read from programs compiled for 2 slices of v5e 2x2.

The workers are the 2 slices; each worker's batch is split over its slice's 4
chips, which average their gradients every step. DiLoCo with AdamW inside
syncs across the slices on the calls its static flag names. From the
scheduled HLO (tests/tpu_hlo.py):

* a local step sends nothing between slices;
* with ``delay=1`` every transfer between slices (float32, and a top-k int4
  sync) starts before the step's first matrix multiply and completes after
  its last: the forward and backward passes run while it is in flight;
* an int4 ring that waits (``delay=2``) sends its all-to-all on the
  reducing call and its all-gather on the applying call, and each hides the
  same way; with ``delay=1`` (both phases on one call) the all-gather hides
  and the all-to-all, whose sum the all-gather's chunk is rounded from, does
  not;
* with ``delay=0``, and in a planted bug where the delayed sync reads a value
  computed from the gradients, the transfers complete after the last matrix
  multiply has started nothing more: the check fails on them.

Needs libtpu (the ``tpu`` extra); JAX stays on the CPU backend. Compiling
the eight programs takes about 30 s.
"""

import itertools

import jax
import jax.numpy as jnp
import optax
import pytest
import tpu_hlo

import optax_dist

# Every program of this file compiles in one test process (libtpu loads once).
pytestmark = pytest.mark.xdist_group("tpu")

SLICES, CHIPS = 2, 4
WIDTHS = (256, 512, 512, 16)
BATCH = 64  # Per worker, split over its slice's chips.
PARAMS_BYTES = sum(a * b for a, b in itertools.pairwise(WIDTHS)) * 4


def loss(params, batch):
  x, y = batch
  for w in params[:-1]:
    x = jnp.tanh(x @ w)
  return jnp.mean((x @ params[-1] - y) ** 2)


def compiled(tx, sync, *, plant_bug=False):
  """One worker's train step (forward, backward, in-slice mean, update), compiled for TPU."""
  mesh = tpu_hlo.topology_mesh("v5e:2x2", SLICES, axes=("w", "d"))

  def step(params, state, batch):
    params, state, batch = jax.tree.map(lambda a: a[0], (params, state, batch))
    grads = jax.lax.pmean(jax.grad(loss)(params, batch), "d")
    if plant_bug:
      # The bug the check must catch: the sync reads params moved by the
      # gradients, so its all-reduce waits for the backward pass.
      params = jax.tree.map(lambda p, g: p - 1e-6 * g, params, grads)
    updates, state = tx.update(grads, state, params, sync=sync)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(params, updates), state))

  P = jax.sharding.PartitionSpec
  fn = jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P("w"), P("w"), P("w", "d")),
      out_specs=P("w"),
      check_vma=False,
    )
  )
  params = [
    jax.ShapeDtypeStruct((SLICES, a, b), jnp.float32) for a, b in itertools.pairwise(WIDTHS)
  ]
  state = jax.eval_shape(jax.vmap(tx.init), params)
  batch = tuple(jax.ShapeDtypeStruct((SLICES, BATCH, w), jnp.float32) for w in WIDTHS[::3])
  return tpu_hlo.compile_for_tpu(fn, params, state, batch).as_text()


def diloco(delay, **kw):
  return optax_dist.diloco(
    optax.adamw(1e-3), axis_name="w", sync_period=8, delay=delay, comm_dtype=None, **kw
  )


def needs_libtpu():
  """Fails (never skips) where the ``tpu`` extra is missing."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    pytest.fail(tpu_hlo.TPU_EXTRA_MISSING)


@pytest.fixture(scope="module")
def programs():
  """The scheduled HLO of each program, compiled once for the module."""
  needs_libtpu()
  return {
    "local": compiled(diloco(1), False),
    "float32, delay 1": compiled(diloco(1), True),
    "top-k int4, delay 1": compiled(
      optax_dist.diloco(
        optax.adamw(1e-3),
        axis_name="w",
        sync_period=8,
        delay=1,
        topk_fraction=0.02,
        comm_dtype=jnp.int4,
      ),
      True,
    ),
    "float32, delay 0": compiled(diloco(0), True),
    "planted bug": compiled(diloco(1), True, plant_bug=True),
  }


def across(text):
  return [t for t in tpu_hlo.transfers(text, CHIPS) if t.across_slices]


def test_a_local_step_sends_nothing_between_slices(programs):
  text = programs["local"]
  assert across(text) == []
  # What it runs is the in-slice mean of the gradients: one blocking all-reduce.
  within = tpu_hlo.transfers(text, CHIPS)
  assert [t.kind for t in within] == ["all-reduce"], within
  assert within[0].nbytes == PARAMS_BYTES
  assert tpu_hlo.matmul_positions(text), "the step's matrix multiplies are found"


@pytest.mark.parametrize("name", ["float32, delay 1", "top-k int4, delay 1"])
def test_a_delayed_sync_hides_behind_the_forward_and_backward_pass(programs, name):
  text = programs[name]
  sent = across(text)
  assert sent, "the sync sends between the slices"
  # Every transfer is in flight from before the first matrix multiply to
  # after the last, and the 6 matrix multiplies of the forward and backward
  # pass (x @ w, and two per layer back but the first's input gradient) sit
  # between.
  for t in sent:
    assert t.hidden, t
    assert t.matmuls >= 5 and t.done > t.start
  assert tpu_hlo.transfers_hidden(text, CHIPS)
  if name.startswith("float32"):
    # The pseudo-gradient of every param, and the count of finite workers,
    # sent and received.
    sends = sum(t.nbytes for t in sent if t.kind == "send")
    assert PARAMS_BYTES <= sends <= PARAMS_BYTES + 4096
  else:
    # A top-k 2% int4 sync sends far fewer bytes than the params.
    assert sum(t.nbytes for t in sent if t.kind == "send") < PARAMS_BYTES / 10


@pytest.mark.parametrize("name", ["float32, delay 0", "planted bug"])
def test_a_sync_that_waits_for_the_gradients_is_not_hidden(programs, name):
  text = programs[name]
  sent = across(text)
  assert sent
  assert not tpu_hlo.transfers_hidden(text, CHIPS)
  # It starts after the last matrix multiply: nothing overlaps it.
  assert all(t.matmuls_after_done == 0 and t.matmuls_before_start == t.matmuls for t in sent), sent


def ring(delay):
  return optax_dist.diloco(
    optax.adamw(1e-3), axis_name="w", sync_period=8, delay=delay, comm_dtype=jnp.int4
  )


@pytest.fixture(scope="module")
def rings():
  """An int4 ring's programs: delay 2 (its reducing and applying calls) and delay 1."""
  needs_libtpu()
  return {
    "delay 2, reducing": compiled(ring(2), True),
    "delay 2, applying": compiled(ring(2), ("apply", 0)),
    "delay 1": compiled(ring(1), True),
  }


def test_a_ring_that_waits_hides_both_phases(rings):
  # delay 2: the all-to-all phase on the reducing call, the all-gather on
  # the applying one; each call's transfers span its whole forward and
  # backward pass.
  for name in ("delay 2, reducing", "delay 2, applying"):
    sent = across(rings[name])
    assert sent and all(t.hidden for t in sent), (name, sent)
    assert tpu_hlo.transfers_hidden(rings[name], CHIPS)
  reducing, applying = across(rings["delay 2, reducing"]), across(rings["delay 2, applying"])
  # int4 (an eighth of float32, plus the blocks' scales): the reducing call
  # sends a buffer of one chunk per worker, the applying call the rounded
  # chunk this worker owns, half of it.
  sends = [sum(t.nbytes for t in ts if t.kind == "send") for ts in (reducing, applying)]
  assert 0 < sends[1] < sends[0] < PARAMS_BYTES / 7, sends
  assert abs(sends[0] - SLICES * sends[1]) <= 64, sends


def test_a_ring_on_one_call_hides_only_its_second_phase(rings):
  # delay 1: both phases on one call. The all-gather sends the chunk rounded
  # from the all-to-all's sum, so only one of them can span the pass: the
  # all-gather hides, the all-to-all completes before the first matrix
  # multiply.
  sent = across(rings["delay 1"])
  gather = [t for t in sent if t.hidden]
  first = [t for t in sent if not t.hidden]
  assert gather and first, sent
  assert all(t.matmuls_after_done == t.matmuls for t in first), first
  assert max(t.done for t in first) < min(t.start for t in gather)
