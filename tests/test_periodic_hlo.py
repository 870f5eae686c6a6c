"""The periodic transforms in compiled HLO: what moves on the wire, and when.

From the compiled program of a jitted ``shard_map`` step (params and state
donated, as in a training loop): the collectives sit only in the body of the
sync loop, which runs on sync steps only; a simultaneous sync moves exactly
one params-sized all-reduce (half that with bfloat16 communication);
round_robin all-gathers N copies.
"""

import re

from harness import AXIS
import hlo
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_dist

N = 8
PARAMS = {"b": np.zeros((N, 32), np.float32), "w": np.zeros((N, 64, 32), np.float32)}
PARAMS_BYTES = (32 + 64 * 32) * 4
COUNT_BYTES = 4  # The count of finite workers travels in the sync's own all-reduce.
ADAM = optax.adam(1e-3)
MIN_COPY = 32 * 4  # The smallest params leaf.

TRANSFORMS = {
  "elastic_simultaneous": (
    optax_dist.elastic_average(ADAM, axis_name=AXIS, communication_period=4),
    "all-reduce",
    PARAMS_BYTES + COUNT_BYTES,
  ),
  "elastic_round_robin": (
    optax_dist.elastic_average(
      ADAM, axis_name=AXIS, communication_period=4, ordering="round_robin"
    ),
    "all-gather",
    N * PARAMS_BYTES,
  ),
  "agn_simultaneous": (
    optax_dist.agn(ADAM, axis_name=AXIS, communication_period=4),
    "all-reduce",
    PARAMS_BYTES + COUNT_BYTES,
  ),
  "agn_round_robin": (
    optax_dist.agn(ADAM, axis_name=AXIS, communication_period=4, ordering="round_robin"),
    "all-gather",
    N * PARAMS_BYTES,
  ),
  "model_average": (
    optax_dist.model_average(ADAM, axis_name=AXIS, interval_steps=4),
    "all-reduce",
    PARAMS_BYTES + COUNT_BYTES,
  ),
  "diloco": (
    optax_dist.diloco(ADAM, axis_name=AXIS, sync_period=4),
    "all-reduce",
    PARAMS_BYTES + COUNT_BYTES,
  ),
}
DILOCO_BF16 = optax_dist.diloco(ADAM, axis_name=AXIS, sync_period=4, comm_dtype=jnp.bfloat16)


def compiled_step(tx, **extra):
  return lowered_step(tx, **extra).compile().as_text()


def lowered_step(tx, **extra):
  return lowered_step_fn(tx, **extra).lower(*step_args(tx))


def lowered_step_fn(tx, **extra):
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))

  def step(p, s, g):
    p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
    u, s = tx.update(g, s, p, **extra)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)), donate_argnums=(0, 1)
  )


def step_args(tx):
  return PARAMS, jax.vmap(tx.init)(PARAMS), PARAMS


@pytest.mark.parametrize("name", TRANSFORMS)
def test_collectives_run_only_in_the_sync_branch(name):
  tx, kind, nbytes = TRANSFORMS[name]
  text = compiled_step(tx)
  found = hlo.collectives(text)
  assert found, "the sync must communicate"
  # Every collective sits in the body of the sync loop (zero trips on
  # non-sync steps), none in the entry computation.
  assert {op.computation for op in found} <= hlo.while_bodies(text), found
  assert {op.kind for op in found} == {kind}, found
  assert sum(op.nbytes for op in found) == nbytes
  # No params-sized copy beyond the plain step's on the path every step takes
  # (copies inside the loop body run on sync steps only).
  assert len(hlo.copies_of_at_least(hlo.entry(text), MIN_COPY)) == len(
    hlo.copies_of_at_least(hlo.entry(compiled_step(ADAM)), MIN_COPY)
  )


def test_bfloat16_communication_is_bfloat16_in_the_program():
  # The program JAX hands to XLA all-reduces the pseudo-gradient in bfloat16,
  # half the bytes of the params. XLA's CPU backend widens bfloat16
  # all-reduces to float32 when it compiles, so on CPU the wire carries
  # float32; accelerator backends reduce in bfloat16.
  lowered = lowered_step(DILOCO_BF16)
  reduced = re.findall(
    r"stablehlo.all_reduce.*?\}\) : \(tensor<([^>]*)>\)", lowered.as_text(), re.S
  )
  assert sorted(reduced) == ["1xf32", "32xbf16", "64x32xbf16"], reduced
  found = hlo.collectives(lowered.compile().as_text())
  assert [op.kind for op in found] == ["all-reduce"]
  assert found[0].nbytes == PARAMS_BYTES + COUNT_BYTES


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_static_local_step_compiles_no_sync_code(name):
  # sync=False: the inner step and the counters; no loop, no conditional,
  # no collective, and no params-sized copy beyond the plain step's.
  tx, _, _ = TRANSFORMS[name]
  text = compiled_step(tx, sync=False)
  kinds = {op.kind for op in hlo.ops(text)}
  assert not kinds & {"while", "conditional"}, kinds
  assert hlo.collectives(text) == []
  assert len(hlo.copies_of_at_least(hlo.entry(text), MIN_COPY)) == len(
    hlo.copies_of_at_least(hlo.entry(compiled_step(ADAM)), MIN_COPY)
  )


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_static_sync_step_has_no_loop(name):
  # sync=True: the sync runs unconditionally, straight-line (round_robin's
  # ordered commits are unrolled), with the same collectives and bytes as
  # the in-graph sync branch.
  tx, kind, nbytes = TRANSFORMS[name]
  text = compiled_step(tx, sync=True)
  kinds = {op.kind for op in hlo.ops(text)}
  assert not kinds & {"while", "conditional"}, kinds
  found = hlo.collectives(text)
  assert {op.kind for op in found} == {kind}, found
  assert sum(op.nbytes for op in found) == nbytes
  report = optax_dist.communication_report(lowered_step_fn(tx, sync=True), *step_args(tx))
  assert (report.every_step_bytes, report.sync_bytes) == (nbytes, 0)
  if name == "agn_simultaneous":
    # The accumulator is cleared in its donated buffer after the all-reduce
    # that read it: neither the old accumulator nor its zeros are copied.
    body = hlo.entry(text)
    accumulator = set(
      re.findall(r"%(\S+) = \S+ parameter\(\d+\)[^\n]*op_name=\"s\.accumulator", body)
    )
    copied = re.findall(r"= \S+ copy\(%([^)\s]+)\)", body)
    assert len(accumulator) == len(PARAMS), accumulator
    assert not accumulator & set(copied), copied
    assert not [c for c in copied if "broadcast" in c], copied


def test_plain_inner_step_has_no_collective():
  # The baseline the overhead benchmark compares against.
  assert hlo.collectives(compiled_step(ADAM)) == []


def test_hlo_reader_sizes():
  assert hlo.nbytes("(f32[512]{0}, bf16[2,3]{1,0})") == 512 * 4 + 6 * 2
  assert hlo.nbytes("s32[]") == 4
