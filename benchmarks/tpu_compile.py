"""A 1B-param language model compiled for multi-slice TPU topologies: memory, collectives, time.

The model is the byte-level transformer of ``examples/train_lm.py`` (its
``Block``: pre-norm causal self-attention and a GELU MLP; tied embeddings),
scaled to about 1B params (width 2048, 20 blocks, context 1024), its blocks
scanned (``nn.scan``) and rematerialized in the backward pass. Each worker is
one TPU slice: a worker's params, AdamW state, center and outer state are
sharded FSDP-style over the slice's chips (every leaf along one dim; a block
all-gathers its params when it runs, and the gradient comes back
reduce-scattered), and the optimizer runs across the slices
(``axis_name="slices"``). JAX compiles it for the TPU topology on this
machine (no TPU needed: ``libtpu``, the ``tpu`` extra), and for each program
the script reports, per device:

* memory from ``compiled.memory_analysis()``: arguments and temporaries in
  HBM, arguments in host memory, next to the formula (the params and state
  leaves over the shards);
* every collective of the scheduled HLO (``tests/tpu_hlo.py``), its bytes,
  its link (within a slice, or across slices: the data-center network), and
  whether it is hidden (in flight from before the step's first matrix
  multiply to after its last);
* the compile time (this machine's CPU);
* an estimated step time: compute from ``compiled.cost_analysis()`` at the
  chip's published peak, and the transfers across slices at 10, 25 and
  100 Gbit/s per slice (see ``estimate``).

Programs: data parallelism (``tower``: the gradients all-reduced across the
slices every step), a DiLoCo local step, DiLoCo's sync step in float32,
int8, int4 and top-k 2% int4, each with ``delay=0`` and ``delay=1``, the
int8 and int4 rings' two calls at ``delay=2`` (the reducing call and the
applying call), and the float32 sync with ``host_offload=True``.

``--schedule`` compiles only the tests' small model for each wire format and
delay and writes benchmarks/results/tpu_schedule.md (5 minutes on 2 cores).

Every row compiles at the 1B default on v5e 2x2 x 2 and 4x4 x 4, in 25 s to
about 15 minutes each on 2 CPU cores; all rows of both topologies take about
2 hours, so a run can be split (``--rows``, ``--topologies``) and its rows
joined with ``--append``. Run (writes benchmarks/results/tpu_compile.md and
.json)::

    pip install -e ".[tpu,examples]"
    python benchmarks/tpu_compile.py
    python benchmarks/tpu_compile.py --topologies v5e:2x2x2 --depth 2   # a quick look
"""

import argparse
import importlib.metadata
import json
import math
import os
import pathlib
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"  # The TPU compiler only: nothing runs on a TPU.
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))  # tpu_hlo: the schedule reader the tests use.

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import optax  # noqa: E402
import tpu_hlo  # noqa: E402
import train_lm  # noqa: E402

import optax_dist  # noqa: E402

SLICES, CHIPS = "slices", "chips"
# Published per-chip peaks: dense bf16 matrix multiplies (XLA:TPU runs float32
# matmuls at default precision as bf16 passes) and HBM bandwidth.
CHIP_SPECS = {
  "v5e": {"flops": 197e12, "hbm_bytes_per_s": 819e9, "hbm_gib": 16},
  "v5p": {"flops": 459e12, "hbm_bytes_per_s": 2765e9, "hbm_gib": 95},
  "v4": {"flops": 275e12, "hbm_bytes_per_s": 1228e9, "hbm_gib": 32},
}
LINKS_GBIT = (10, 25, 100)
SYNC_PERIOD = 100  # H: DiLoCo's steps per sync, for the averaged throughput.
# Egress per slice of a transfer between slices, in buffers of its size, for M
# slices: a ring all-reduce sends 2 (M - 1) / M of the buffer, an all-gather
# the slice's piece to M - 1 others, an all-to-all (M - 1) / M of it.
EGRESS = {
  "ALL_REDUCE": lambda m: 2 * (m - 1) / m,
  "ALL_GATHER": lambda m: m - 1,
  "ALL_TO_ALL": lambda m: (m - 1) / m,
}


class _Layer(nn.Module):
  """One block of train_lm, its params all-gathered over the slice's chips when it runs."""

  width: int
  heads: int
  gather: bool

  @nn.compact
  def __call__(self, x, _):
    block = nn.remat(train_lm.Block)
    if self.gather:
      block = nn.map_variables(
        block,
        "params",
        trans_in_fn=lambda v: jax.tree.map(gather, v),
        mutable=False,
      )
    return block(self.width, self.heads, name="block")(x), None


class ScannedTransformer(nn.Module):
  """train_lm.Transformer with its blocks scanned; with ``gather``, FSDP shards in."""

  width: int
  depth: int
  heads: int
  context: int
  gather: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(train_lm.VOCAB, self.width, embedding_init=nn.initializers.normal(0.02))
    positions = self.param("positions", nn.initializers.normal(0.02), (self.context, self.width))
    x = embed(tokens) + positions[None, : tokens.shape[1]]
    blocks = nn.scan(
      _Layer,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=self.depth,
    )(self.width, self.heads, self.gather, name="blocks")
    x, _ = blocks(x, None)
    return embed.attend(nn.LayerNorm()(x))


def gather(a):
  """A leaf's whole value from the shards of the slice's chips (sharded along dim 0)."""
  return jax.lax.all_gather(a, CHIPS, axis=0, tiled=True)


def shard_dim(path):
  """The dim a leaf is sharded along: 1 for the blocks' stacked leaves, else 0."""
  return 1 if any(getattr(k, "key", None) == "blocks" for k in path) else 0


def param_shapes(width, depth, heads, context):
  model = ScannedTransformer(width, depth, heads, context)
  tokens = jax.ShapeDtypeStruct((1, context), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def local_shapes(shapes, chips):
  """One device's shard of every leaf (the sharded dim divided by the chips)."""

  def local(path, s):
    d = shard_dim(path)
    assert s.shape[d] % chips == 0, (path, s.shape, chips)
    shape = list(s.shape)
    shape[d] //= chips
    return jax.ShapeDtypeStruct(tuple(shape), s.dtype)

  return jax.tree.map_with_path(local, shapes)


def optimizer(name, inner):
  """(transform, static flag) of a row."""
  if name == "DP":
    return optax_dist.tower(inner, axis_name=SLICES), None
  kw = {}
  fmt, _, delay = name.partition(", delay ")
  delay, _, call = delay.partition(", ")
  if fmt.startswith("top-k"):
    kw = {"topk_fraction": 0.02, "comm_dtype": jnp.int4}
  elif fmt in ("int8", "int4"):
    kw = {"comm_dtype": {"int8": jnp.int8, "int4": jnp.int4}[fmt]}
  elif fmt == "host offload":
    kw = {"host_offload": True}
  tx = optax_dist.diloco(
    inner, axis_name=SLICES, sync_period=SYNC_PERIOD, delay=int(delay or 0) or None, **kw
  )
  # A static flag: the sync call (with delay 2, the call that reduces), or
  # the call that applies a sync reduced two calls earlier.
  return tx, ("apply", 0) if call == "applying" else fmt != "local"


ROWS = (
  "DP",
  "local",
  "float32, delay 0",
  "float32, delay 1",
  "int8, delay 0",
  "int8, delay 1",
  "int4, delay 0",
  "int4, delay 1",
  "int8, delay 2, reducing",
  "int8, delay 2, applying",
  "int4, delay 2, reducing",
  "int4, delay 2, applying",
  "top-k 2% int4, delay 0",
  "top-k 2% int4, delay 1",
  "host offload, delay 0",
)


def build(name, mesh, cfg):
  """The row's train step, jitted over the mesh, and its abstract arguments."""
  n_slices, chips = mesh.shape[SLICES], mesh.shape[CHIPS]
  inner = optax.adamw(1e-4, weight_decay=0.01)
  tx, flag = optimizer(name, inner)
  full = param_shapes(cfg["width"], cfg["depth"], cfg["heads"], cfg["context"])
  local = local_shapes(full, chips)
  model = ScannedTransformer(cfg["width"], cfg["depth"], cfg["heads"], cfg["context"], gather=True)

  def loss(params, tokens):
    # The leaves outside the scan are gathered here; the blocks' in the scan.
    params = {k: v if k == "blocks" else jax.tree.map(gather, v) for k, v in params.items()}
    logits = model.apply({"params": params}, tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return nll / chips  # Summed over the chips by the reduce-scatter: the slice's mean.

  state = jax.eval_shape(tx.init, local)
  kinds = memory_kinds(state, name.startswith("host offload"))
  host = jax.tree.map(lambda k: k == "pinned_host", kinds)

  def step(params, state, tokens):
    params = jax.tree.map(lambda a: a[0], params)
    state = jax.tree.map(lambda a, h: a if h else a[0], state, host)
    grads = jax.grad(loss)(params, tokens)
    kw = {} if flag is None else {"sync": flag}
    updates, state = tx.update(grads, state, params, **kw)
    state = jax.tree.map(lambda a, h: a if h else a[None], state, host)
    return jax.tree.map(lambda a: a[None], optax.apply_updates(params, updates)), state

  def spec(path, s, kind=None):
    """Per-worker layout: a leading slices axis; the sharded dim over the chips.

    A leaf in host memory has no leading axis: its sharded dim goes over the
    slices and the chips. (Taking the leading axis off a [1, 20, 512] leaf in
    host memory fails libtpu 0.0.42.1's layout check, a RET_CHECK in
    target.cc, at 20 blocks; at 2 it compiles.)
    """
    if kind == "pinned_host":
      dims = [None] * s.ndim
      dims[shard_dim(path)] = (SLICES, CHIPS)
      return P(*dims)
    if s.ndim == 0:
      return P(SLICES)
    dims = [None] * (s.ndim + 1)
    dims[0] = SLICES
    dims[1 + shard_dim(path)] = CHIPS
    return P(*dims)

  param_spec = jax.tree.map_with_path(spec, local)
  state_spec = jax.tree.map_with_path(spec, state, kinds)
  token_spec = P((SLICES, CHIPS))
  fn = jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(param_spec, state_spec, token_spec),
      out_specs=(param_spec, state_spec),
      check_vma=False,
    ),
    donate_argnums=(0, 1),
  )

  def stacked(path, s, kind=None):
    """The global array: a leading slices axis, the chips' shards side by side."""
    if kind == "pinned_host":
      shape = list(s.shape)
      shape[shard_dim(path)] *= n_slices * chips
    else:
      shape = [n_slices, *s.shape]
      if s.ndim:
        shape[1 + shard_dim(path)] *= chips
    memory = "pinned_host" if kind == "pinned_host" else None
    sharding = NamedSharding(mesh, spec(path, s, kind), memory_kind=memory)
    return jax.ShapeDtypeStruct(tuple(shape), s.dtype, sharding=sharding)

  args_params = jax.tree.map_with_path(stacked, local)
  args_state = jax.tree.map_with_path(stacked, state, kinds)
  batch = cfg["batch_per_chip"] * n_slices * chips
  tokens = jax.ShapeDtypeStruct(
    (batch, cfg["context"] + 1), jnp.int32, sharding=NamedSharding(mesh, token_spec)
  )
  return fn, (args_params, args_state, tokens), (local, state, kinds)


# The fields of DiLoCo's state that ``host_offload=True`` keeps in host memory
# (docs/large_models.md, "State in host memory").
OFFLOADED = ("center", "outer_state", "residual")


def memory_kinds(state, host_offload):
  """``pinned_host`` or ``device`` for every leaf of an abstract state."""
  kinds = jax.tree.map(lambda _: "device", state)
  if host_offload:
    kinds = kinds._replace(
      **{f: jax.tree.map(lambda _: "pinned_host", getattr(state, f)) for f in OFFLOADED}
    )
  return kinds


def leaf_bytes(tree):
  return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(tree))


def transfer_type(t, text):
  """The collective a send or receive between slices belongs to (``ALL_GATHER``, ...), or None."""
  line = next(line for name, _, line in tpu_hlo.entry_schedule(text) if name == t.name)
  return next((k for k in EGRESS if f'_xla_megascale_transfer_type="{k}"' in line), None)


def egress_bytes(t, text, n_slices, chips):
  """Bytes the slice sends across slices for transfer ``t`` (a send), by its transfer type."""
  kind = transfer_type(t, text)
  factor = EGRESS[kind](n_slices) if kind else 1.0
  return t.nbytes * chips * factor, kind or "?"


def measure(name, mesh, cfg):
  n_slices, chips = mesh.shape[SLICES], mesh.shape[CHIPS]
  fn, args, (local, state, kinds) = build(name, mesh, cfg)
  start = time.perf_counter()
  compiled = tpu_hlo.compile_for_tpu(fn, *args)
  compile_s = time.perf_counter() - start
  text = compiled.as_text()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  host_state = leaf_bytes(
    [
      s
      for s, k in zip(jax.tree.leaves(state), jax.tree.leaves(kinds), strict=True)
      if k == "pinned_host"
    ]
  )
  transfers = []
  for t in tpu_hlo.transfers(text, chips):
    row = {
      "kind": t.kind,
      "bytes": t.nbytes,
      "link": t.link,
      "hidden": t.hidden,
      "matmuls_before_start": t.matmuls_before_start,
      "matmuls_after_done": t.matmuls_after_done,
    }
    if t.across_slices and t.kind == "send":
      row["egress_bytes_per_slice"], row["transfer_type"] = egress_bytes(t, text, n_slices, chips)
    transfers.append(row)
  return {
    "name": name,
    "compile_s": round(compile_s, 1),
    "memory": {
      "argument_bytes": mem.argument_size_in_bytes,
      "output_bytes": mem.output_size_in_bytes,
      "alias_bytes": mem.alias_size_in_bytes,
      "temp_bytes": mem.temp_size_in_bytes,
      "host_argument_bytes": mem.host_argument_size_in_bytes,
      "host_temp_bytes": mem.host_temp_size_in_bytes,
    },
    "formula": {
      "params_bytes": leaf_bytes(local),
      "state_bytes": leaf_bytes(state),
      "host_state_bytes": host_state,
    },
    "flops": float(cost.get("flops", 0.0)),
    "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    "matmuls": len(tpu_hlo.matmul_positions(text)),
    "transfers": transfers,
  }


def estimate(row, chip, tokens_per_step, depth):
  """Step time (s) and tokens per second at each link speed: an estimate.

  From ``cost_analysis`` (per device), which counts the body of a loop once:

  * the matrix multiplies: the flops times the blocks (the scanned body holds
    nearly all of them) over the chip's peak;
  * the elementwise work (the optimizer, the sync's quantizing and summing):
    the bytes accessed over the chip's HBM bandwidth. XLA's count of an
    in-place update is the whole buffer, so this is an upper bound.

  A transfer across slices takes its egress per slice (``EGRESS``) over the
  link; the slice's chips share the link. A hidden transfer runs during the
  matrix multiplies, an exposed one after them:
  max(matmuls, hidden) + elementwise + exposed. Collectives within a slice
  (the FSDP all-gathers and reduce-scatters) are left out: the same in every
  row.
  """
  spec = CHIP_SPECS[chip]
  matmuls = row["flops"] * depth / spec["flops"]
  elementwise = row["bytes_accessed"] / spec["hbm_bytes_per_s"]
  out = {"matmul_s": matmuls, "elementwise_s": elementwise}
  sends = [t for t in row["transfers"] if "egress_bytes_per_slice" in t]
  for gbit in LINKS_GBIT:
    rate = gbit * 1e9 / 8
    hidden = sum(t["egress_bytes_per_slice"] for t in sends if t["hidden"])
    exposed = sum(t["egress_bytes_per_slice"] for t in sends if not t["hidden"])
    step = max(matmuls, hidden / rate) + elementwise + exposed / rate
    out[f"step_s@{gbit}"] = step
    out[f"tokens_per_s@{gbit}"] = tokens_per_step / step
  return out


def mb(n):
  return f"{n / 2**20:,.1f}"


def gb(n):
  return f"{n / 2**30:.2f}"


def period_tokens_per_s(topo, row, gbit):
  """Tokens per second of a row: per step for DP and the local step; over a period for a sync.

  A sync's period is ``SYNC_PERIOD`` calls: the sync call and local steps, or
  at delay 2 the reducing call, the applying call and local steps. None for
  an applying call (counted with its reducing call) or without the rows
  that the period needs.
  """
  rows = {r["name"]: r["estimate"][f"step_s@{gbit}"] for r in topo["rows"]}
  name = row["name"]
  if name in ("DP", "local"):
    return topo["tokens_per_step"] / rows[name]
  calls = [name]
  if name.endswith(", reducing"):
    calls.append(name.replace(", reducing", ", applying"))
  if name.endswith(", applying") or "local" not in rows or not all(c in rows for c in calls):
    return None
  period = sum(rows[c] for c in calls) + (SYNC_PERIOD - len(calls)) * rows["local"]
  return SYNC_PERIOD * topo["tokens_per_step"] / period


def markdown(results, cfg, runs):
  compile_s = sum(r["compile_s"] for t in results for r in t["rows"])
  if len(runs) == 1:
    how = f"Command: `{runs[0]['command']}` ({runs[0]['wall_s'] / 60:.1f} min)"
  else:
    how = (
      f"{len(runs)} runs of `python benchmarks/tpu_compile.py`, split with `--rows` and "
      "`--topologies` and joined with `--append` (their commands in the JSON)"
    )
  lines = [
    "# A 1B-param LM compiled for multi-slice TPU topologies",
    "",
    f"{how}, on this machine's 2 CPU cores; the compile times add up to "
    f"{compile_s / 60:.0f} minutes. "
    f"Model: examples/train_lm.py's blocks, width {cfg['width']}, {cfg['depth']} blocks scanned, "
    f"{cfg['heads']} heads, context {cfg['context']}, {cfg['batch_per_chip']} sequences per chip; "
    f"{results[0]['params'] / 1e9:.3f}B params. jax {jax.__version__}, libtpu "
    f"{results[0]['libtpu']}.",
    "",
  ]
  for topo in results:
    n_slices, chips, chip = topo["slices"], topo["chips"], topo["chip"]
    lines += [
      f"## {topo['topology']} x {n_slices} slices ({n_slices * chips} chips)",
      "",
      "Memory per device (GiB): HBM arguments and temporaries and host arguments from "
      "`memory_analysis()`; the formula is params + state (inner AdamW, center, outer state, "
      "residual) over the shards, and the part of it in host memory.",
      "",
      "| program | compile (s) | HBM args | HBM temps | host args | formula | formula on host |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in topo["rows"]:
      m, f = r["memory"], r["formula"]
      lines.append(
        f"| {r['name']} | {r['compile_s']} | {gb(m['argument_bytes'])} | {gb(m['temp_bytes'])} | "
        f"{gb(m['host_argument_bytes'])} | {gb(f['params_bytes'] + f['state_bytes'])} | "
        f"{gb(f['host_state_bytes'])} |"
      )
    lines += [
      "",
      "Collectives per device (MiB), by link and whether hidden (in flight from before the "
      "first matrix multiply to after the last); across slices, the sends (each has its "
      "receive of the same size or, for an all-gather, M times it).",
      "",
      "| program | within a slice | across slices, hidden | across slices, exposed |",
      "| --- | --- | --- | --- |",
    ]
    for r in topo["rows"]:
      within = [t for t in r["transfers"] if t["link"] == "within a slice"]
      sends = [t for t in r["transfers"] if t["link"] == "across slices" and t["kind"] == "send"]

      def listing(ts):
        if not ts:
          return "none"
        by_type = {}
        for t in ts:
          kind = t.get("transfer_type", t["kind"]).lower().replace("_", "-")
          by_type.setdefault(kind, []).append(t["bytes"])
        return ", ".join(f"{len(b)} {k}, {mb(sum(b))}" for k, b in sorted(by_type.items()))

      lines.append(
        f"| {r['name']} | {len(within)} ({mb(sum(t['bytes'] for t in within))} MiB, "
        f"{sum(t['hidden'] for t in within)} hidden) | {listing([t for t in sends if t['hidden']])} | "
        f"{listing([t for t in sends if not t['hidden']])} |"
      )
    lines += [
      "",
      f"Estimated step time (ms) and tokens per second, {chip} at "
      f"{CHIP_SPECS[chip]['flops'] / 1e12:.0f} TFLOP/s and "
      f"{CHIP_SPECS[chip]['hbm_bytes_per_s'] / 1e9:.0f} GB/s per chip, the links between slices "
      "at 10, 25 and 100 Gbit/s per slice: max(matrix multiplies, hidden transfers) + "
      "elementwise work + exposed transfers. DiLoCo's tokens per second are over a period of "
      f"H = {SYNC_PERIOD} calls: its local steps and its sync (at delay 2, the reducing and the "
      "applying call). An estimate, not a measurement (assumptions in `estimate` of the script).",
      "",
      "| program | matmuls (ms) | elementwise (ms) | step @ 10 | step @ 25 | step @ 100 "
      "| tokens/s @ 10 | tokens/s @ 25 | tokens/s @ 100 |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in topo["rows"]:
      e = r["estimate"]
      cells = [f"{e[f'step_s@{g}'] * 1e3:,.0f}" for g in LINKS_GBIT]
      tps = [period_tokens_per_s(topo, r, g) for g in LINKS_GBIT]
      lines.append(
        f"| {r['name']} | {e['matmul_s'] * 1e3:,.0f} | {e['elementwise_s'] * 1e3:,.0f} | "
        + " | ".join(cells)
        + " | "
        + " | ".join("-" if v is None else f"{v:,.0f}" for v in tps)
        + " |"
      )
    lines.append("")
  return "\n".join(lines)


# The schedule table (--schedule): the tests' model (tests/test_tpu_compile.py,
# a 256-512-512-16 MLP, DiLoCo with AdamW inside on 2 slices of v5e 2x2), each
# wire format at each delay; with delay 2, the reducing and the applying call.
FORMATS = {
  "float32": {"comm_dtype": None},
  "int8": {"comm_dtype": jnp.int8},
  "int4": {"comm_dtype": jnp.int4},
  "int2": {"comm_dtype": jnp.int2},
  "top-k 2% int4": {"topk_fraction": 0.02, "comm_dtype": jnp.int4},
}
CALLS = (("0", 0, True), ("1", 1, True), ("2, reducing", 2, True), ("2, applying", 2, ("apply", 0)))


def schedule_table():
  """Markdown: what the TPU compiler schedules for each format and delay (the tests' model)."""
  import test_tpu_compile as small

  lines = [
    "| format | delay (call) | sends across slices (KiB) | hidden | exposed | compile (s) |",
    "| --- | --- | ---: | --- | --- | ---: |",
  ]
  for fmt, kw in FORMATS.items():
    for label, delay, flag in CALLS:
      tx = optax_dist.diloco(
        optax.adamw(1e-3), axis_name="w", sync_period=8, delay=delay or None, **kw
      )
      start = time.perf_counter()
      text = small.compiled(tx, flag)
      took = time.perf_counter() - start
      sent = [t for t in tpu_hlo.transfers(text, small.CHIPS) if t.across_slices]
      sends = [t for t in sent if t.kind == "send"]

      def kinds(ts, text=text):
        found = [(transfer_type(t, text) or t.kind).lower().replace("_", "-") for t in ts]
        return ", ".join(sorted(set(found))) or "none"

      lines.append(
        f"| {fmt} | {label} | {sum(t.nbytes for t in sends) / 1024:,.1f} | "
        f"{kinds([t for t in sends if t.hidden])} | {kinds([t for t in sends if not t.hidden])} "
        f"| {took:.1f} |"
      )
      print(lines[-1], flush=True)
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument(
    "--topologies",
    nargs="+",
    default=["v5e:2x2x2", "v5e:4x4x4"],
    help="TOPOLOGYxSLICES per entry: v5e:2x2x2 is v5e 2x2, 2 slices",
  )
  parser.add_argument("--width", type=int, default=2048)
  parser.add_argument("--depth", type=int, default=20)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--context", type=int, default=1024)
  parser.add_argument("--batch-per-chip", type=int, default=4)
  parser.add_argument("--rows", nargs="+", default=list(ROWS))
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tpu_compile"))
  parser.add_argument(
    "--append",
    action="store_true",
    help="add the rows to those of --out's JSON (same model), replacing rows of the same name",
  )
  parser.add_argument(
    "--schedule",
    action="store_true",
    help="only the schedule table: each format and delay on the tests' small model",
  )
  args = parser.parse_args(argv)
  if args.schedule:
    start = time.perf_counter()
    table = schedule_table()
    out = pathlib.Path(args.out).with_name("tpu_schedule.md")
    out.write_text(
      "# What the TPU compiler schedules for each sync\n\n"
      f"Command: `python benchmarks/tpu_compile.py --schedule` "
      f"({time.perf_counter() - start:.0f} s on 2 CPU cores); jax {jax.__version__}, "
      f"libtpu {importlib.metadata.version('libtpu')}.\n\n{table}\n"
    )
    print(table)
    return
  cfg = {k: getattr(args, k) for k in ("width", "depth", "heads", "context", "batch_per_chip")}

  libtpu = importlib.metadata.version("libtpu")
  params = leaf_bytes(param_shapes(cfg["width"], cfg["depth"], cfg["heads"], cfg["context"])) // 4
  command = "python benchmarks/tpu_compile.py" + (" " + " ".join(argv) if argv else "")
  if argv is None and len(sys.argv) > 1:
    command = "python benchmarks/tpu_compile.py " + " ".join(sys.argv[1:])
  out = pathlib.Path(args.out)
  runs, results = [], []
  if args.append and out.with_suffix(".json").exists():
    before = json.loads(out.with_suffix(".json").read_text())
    if before["config"] != cfg:
      raise SystemExit(f"--append: {out}.json has config {before['config']}, not {cfg}")
    runs, results = before["runs"], before["results"]
  runs.append({"command": command, "wall_s": 0.0})
  start = time.perf_counter()
  for entry in args.topologies:
    topology, _, n = entry.rpartition("x")
    chip = topology.split(":")[0]
    mesh = tpu_hlo.topology_mesh(topology, int(n), axes=(SLICES, CHIPS))
    n_slices, chips = mesh.shape[SLICES], mesh.shape[CHIPS]
    topo = next((t for t in results if (t["topology"], t["slices"]) == (topology, n_slices)), None)
    if topo is None:
      topo = {
        "topology": topology,
        "slices": n_slices,
        "chips": chips,
        "chip": chip,
        "tokens_per_step": cfg["batch_per_chip"] * cfg["context"] * n_slices * chips,
        "params": params,
        "libtpu": libtpu,
        "rows": [],
      }
      results.append(topo)
    for name in args.rows:
      row = measure(name, mesh, cfg)
      row["estimate"] = estimate(row, chip, topo["tokens_per_step"], cfg["depth"])
      print(f"{topology} x {n}: {name}: compiled in {row['compile_s']} s", flush=True)
      topo["rows"] = [r for r in topo["rows"] if r["name"] != name] + [row]
      topo["rows"].sort(key=lambda r: ROWS.index(r["name"]))
      # Written after every row: a long run that stops keeps what it measured.
      runs[-1]["wall_s"] = time.perf_counter() - start
      out.with_suffix(".json").write_text(
        json.dumps({"runs": runs, "config": cfg, "results": results}, indent=1)
      )
      out.with_suffix(".md").write_text(markdown(results, cfg, runs))
  print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
  main()
