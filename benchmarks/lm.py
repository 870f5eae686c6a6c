"""Language-model study after the DiLoCo scaling laws: the gap to data parallelism for each M.

Charles et al., "Scaling Laws for DiLoCo" (arXiv 2503.09799) compare DiLoCo
with data parallelism (DP) at equal steps and an equal global batch, over many
outer steps, with the outer step tuned per configuration. This study does the
same with the byte-level transformer of ``examples/train_lm.py`` (its model,
corpus, batches, AdamW schedule and optimizers, imported from it):

* every run takes ``STEPS`` steps (at least 100 outer steps at H = 32), with
  the same global batch; AdamW's learning rate warms up over 5% of the steps
  and decays along a cosine over the whole run, never reset by a sync;
* rows (:data:`ROWS`): DP; DiLoCo with M = 1, 2, 4, 8 workers at H = 32;
  M = 8 at H = 8 and 128; model averaging at M = 8, H = 32; M = 8, H = 32
  after a synchronous warm-up (``sync_warmup``) of 3%, 5% and 10% of the
  steps; streaming DiLoCo (F = 4 fragments) with an int8 pseudo-gradient;
* tuning, the same budget for every DiLoCo row, on seed 0: the outer
  learning rate in ``OUTER_LRS`` at Nesterov momentum 0.9, and the inner
  (AdamW) learning rate as a fraction ``INNER_FRACTIONS`` of DP's tuned one;
  DP tunes its learning rate over ``DP_LRS``, model averaging the fractions.
  The trial with the lowest final validation loss is then run with the seeds
  ``SEEDS[1:]`` (3 seeds in all).

Rows added once the package had the features (each JSON entry records the
commit it ran at): a delayed sync (``delay=1``, ``blend=0.5``, no fragments),
an int4 pseudo-gradient with error feedback, and MuLoCo (``optax.contrib.muon``
inside, int4 with error feedback outside; Muon's learning rate in
``MUON_LRS``). :data:`MOMENTUM_HALF` reruns DiLoCo at M = 1, 2, 4, 8 (H = 32)
at outer momentum 0.5 (outer learning rate 0.5 or 1.0) with 3 seeds.

How it runs fast on 2 CPU cores: a row's trials are one compiled program. The
M workers are an axis of ``jax.vmap(axis_name=...)`` (the transforms run
unchanged; a collective becomes a local reduction), the trials another
``jax.vmap``, and the steps between two evaluations a ``lax.scan``. A worker
computes its gradient on its share of the global batch, ``batch_size / M``
windows, as the ``8 / M`` devices of a group of ``train_lm.py --workers M``
do together. The bytes one worker sends are read from the compiled 8-device
step of ``train_lm.py`` (``optax_dist.communication_report``), the same
accounting as the example's. ``tests/test_lm_example.py`` checks that this
program and the example's 8-device training give the same losses.

Results are written to ``benchmarks/results/lm.json`` after every program, and
a restarted study resumes from it.

    python benchmarks/lm.py          # the study (its measured time is in BENCHMARKS.md)
    python benchmarks/lm.py --quick  # a smoke run: a tiny model, few steps, few trials
    python benchmarks/lm.py --replot # the table and the plot from the saved JSON
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import jax  # noqa: E402
from jax import lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import train_lm  # noqa: E402  (sets the simulated devices before JAX starts)

import optax_dist  # noqa: E402

STEPS = 3200
SEEDS = (0, 1, 2)
EVAL_EVERY = 160
# The model: small, so that the study fits in its time on two cores.
MODEL = {"width": 32, "depth": 2, "heads": 4, "context": 32, "batch_size": 32}
DP_LRS = (2e-3, 3e-3, 5e-3, 8e-3)
OUTER_LRS = (0.4, 0.6, 0.8, 1.0)
# Top-k's plain outer SGD step chose 1.0, 2.0 and 4.0, the edges of OUTER_LRS, of
# (0.8, 1.0, 1.5, 2.0) and of (1.0, 1.5, 2.0, 3.0, 4.0): its grid goes on.
TOPK_OUTER_LRS = (2.0, 3.0, 4.0, 6.0, 8.0)
OUTER_MOMENTUM = 0.9
INNER_FRACTIONS = (1.0, 0.5)
# The paper's gap to DP (their Table 4), in percent, for M = 1, 2, 4, 8.
PAPER = {"35M": (-0.1, 0.7, 2.0, 3.9), "2.4B": (-0.4, -0.1, 0.3, 1.1)}


class Row(NamedTuple):
  """One row of the study: its ``train_lm.Config`` fields and how it is tuned.

  ``grid`` is ``"dp"`` (``DP_LRS``), ``"outer"`` (``OUTER_LRS`` x
  ``INNER_FRACTIONS`` of DP's learning rate), ``"outer at M=8"`` (``OUTER_LRS``
  at the inner fraction chosen for DiLoCo M=8 H=32: half the trials, for the
  rows that vary it), ``"topk outer"`` (the same with ``TOPK_OUTER_LRS``) or
  ``"inner"`` (the fractions only).
  ``"same as <row>"`` runs that row's chosen trial, untuned.
  ``warmup_fraction`` sets ``sync_warmup`` to that fraction of the steps;
  ``seeds`` replaces the study's seeds.
  """

  name: str
  fields: dict
  grid: str = "outer"
  warmup_fraction: float = 0.0
  seeds: tuple | None = None  # None: the study's.


DILOCO = {"algorithm": "diloco", "outer_momentum": OUTER_MOMENTUM}
AT_M8 = "outer at M=8"
TOPK_AT_M8 = "topk outer"
# In the order they run: the rows the targets need first.
ROWS = (
  Row("DP", {"algorithm": "sync"}, grid="dp"),
  Row("DiLoCo M=8 H=32", {**DILOCO, "workers": 8, "period": 32}),
  Row("DiLoCo M=1 H=32", {**DILOCO, "workers": 1, "period": 32}),
  Row("DiLoCo M=2 H=32", {**DILOCO, "workers": 2, "period": 32}),
  Row("DiLoCo M=4 H=32", {**DILOCO, "workers": 4, "period": 32}),
  Row("DiLoCo M=8 H=32 warm-up 10%", {**DILOCO, "period": 32}, AT_M8, warmup_fraction=0.10),
  Row("DiLoCo M=8 H=32 warm-up 3%", {**DILOCO, "period": 32}, AT_M8, warmup_fraction=0.03),
  Row(
    "Streaming F=4 int8 M=8 H=32",
    {**DILOCO, "period": 32, "fragments": 4, "comm_dtype": "int8", "error_feedback": True},
    AT_M8,
  ),
  Row("DiLoCo M=8 H=32 warm-up 5%", {**DILOCO, "period": 32}, AT_M8, warmup_fraction=0.05),
  Row("DiLoCo M=8 H=8", {**DILOCO, "period": 8}, AT_M8),
  Row("DiLoCo M=8 H=128", {**DILOCO, "period": 128}, AT_M8),
  Row("Model averaging M=8 H=32", {"algorithm": "model_average", "period": 32}, grid="inner"),
  # Added once the package had them (run at a later commit than the rows above;
  # each entry of the JSON records its own): a delayed sync (F = 1, tau = 1 <
  # H), an int4 pseudo-gradient with error feedback, and MuLoCo (Muon inside,
  # int4 with error feedback outside).
  Row(
    "Delayed sync delay=1 blend=0.5 M=8 H=32",
    {**DILOCO, "period": 32, "delay": 1, "blend": 0.5},
    AT_M8,
  ),
  Row(
    "DiLoCo int4 + error feedback M=8 H=32",
    {**DILOCO, "period": 32, "comm_dtype": "int4", "error_feedback": True},
    AT_M8,
  ),
  Row(
    "MuLoCo (Muon inner) int4 + error feedback M=8 H=32",
    {**DILOCO, "period": 32, "comm_dtype": "int4", "error_feedback": True, "inner": "muon"},
    grid="muon",
  ),
  # Added with the ring's owner buffer (the owner's rounding error fed into
  # the summed chunk) and top-k's plain outer step: int2 with error feedback,
  # and top-k 2% with int4 values under SparseLoCo's outer SGD (no momentum).
  Row(
    "DiLoCo int2 + error feedback M=8 H=32",
    {**DILOCO, "period": 32, "comm_dtype": "int2", "error_feedback": True},
    AT_M8,
  ),
  # int2 without feedback, for int2 + feedback to be measured against.
  Row("DiLoCo int2 M=8 H=32", {**DILOCO, "period": 32, "comm_dtype": "int2"}, AT_M8),
  Row(
    "DiLoCo top-k 2% int4, outer SGD M=8 H=32",
    {**DILOCO, "outer_momentum": 0.0, "period": 32, "comm_dtype": "int4", "topk_fraction": 0.02},
    TOPK_AT_M8,
  ),
)

# Muon's learning rate (its Adam on the non-matrix params runs at DP's AdamW
# rate): MUON_LRS at the outer learning rate MUON_AT_OUTER, then OUTER_LRS at
# the middle Muon rate.
MUON_LRS = (0.01, 0.02, 0.04)
MUON_AT_OUTER = 0.8

# The outer momentum 0.5 instead of 0.9 (the diagnostics below found it closes
# most of the gap on seed 0): M = 1, 2, 4, 8 at H = 32, outer learning rate in
# {0.5, 1.0}, DP's inner learning rate, 3 seeds. Shown in a table of their own.
MOMENTUM_HALF = tuple(
  Row(
    f"DiLoCo M={m} H=32, outer momentum 0.5",
    {**DILOCO, "workers": m, "period": 32, "outer_momentum": 0.5},
    "momentum 0.5",
  )
  for m in (1, 8, 2, 4)
) + tuple(
  Row(
    f"DiLoCo M=8 H=32 warm-up {round(100 * w)}%, outer momentum 0.5",
    {**DILOCO, "period": 32, "outer_momentum": 0.5},
    "momentum 0.5",
    warmup_fraction=w,
  )
  for w in (0.10, 0.03)
)


# Diagnostics (``--diagnostics``, after ROWS), on seed 0. Is the gap at M = 8
# the small per-worker batch? The same two runs at 4 times the global batch
# (16 windows per worker instead of 4), with the learning rates chosen at the
# study's batch. Are the gaps of M = 1 and 2 the outer grid's lower edge?
# Outer learning rates below it, at DP's inner learning rate. Or the outer
# momentum? Outer learning rates 0.5 and 1.0 at momentum 0.5 instead of 0.9.
LOW_OUTER_LRS = (0.1, 0.2)
DIAGNOSTICS = (
  *(
    Row(
      f"DiLoCo M={m} H=32, outer lr 0.1 or 0.2",
      {**DILOCO, "workers": m, "period": 32},
      "low outer",
      seeds=(0,),
    )
    for m in (1, 2)
  ),
  Row("DP, batch x4", {"algorithm": "sync", "batch_size": 128}, "same as DP", seeds=(0,)),
  Row(
    "DiLoCo M=8 H=32, batch x4",
    {**DILOCO, "period": 32, "batch_size": 128},
    "same as DiLoCo M=8 H=32",
    seeds=(0,),
  ),
)


def row_config(row, steps, model):
  warmup = round(row.warmup_fraction * steps)
  return train_lm.Config(**{**model, **row.fields}, steps=steps, warmup=warmup)


def trials(row, dp_lr, m8_fraction=None, chosen=None):
  """The row's tuning grid: a list of ``{"learning_rate", "outer_learning_rate"}``."""
  if row.grid in (AT_M8, TOPK_AT_M8):
    if m8_fraction is None:
      raise RuntimeError("DiLoCo M=8 H=32 must be tuned before the rows that use its choice")
    outer = OUTER_LRS if row.grid == AT_M8 else TOPK_OUTER_LRS
    return [{"learning_rate": m8_fraction * dp_lr, "outer_learning_rate": lr} for lr in outer]
  if row.grid == "dp":
    return [{"learning_rate": lr} for lr in DP_LRS]
  if row.grid == "muon":
    muon = [(mu, MUON_AT_OUTER) for mu in MUON_LRS]
    muon += [(MUON_LRS[1], lr) for lr in OUTER_LRS if lr != MUON_AT_OUTER]
    return [
      {"learning_rate": mu, "adam_learning_rate": dp_lr, "outer_learning_rate": lr}
      for mu, lr in muon
    ]
  if row.grid == "momentum 0.5":
    return [{"learning_rate": dp_lr, "outer_learning_rate": lr} for lr in (0.5, 1.0)]
  if row.grid == "low outer":
    return [{"learning_rate": dp_lr, "outer_learning_rate": lr} for lr in LOW_OUTER_LRS]
  if row.grid.startswith("same as "):
    return [chosen[row.grid.removeprefix("same as ")]]
  if row.grid == "inner":
    return [{"learning_rate": f * dp_lr} for f in INNER_FRACTIONS]
  return [
    {"learning_rate": f * dp_lr, "outer_learning_rate": lr}
    for f in INNER_FRACTIONS
    for lr in OUTER_LRS
  ]


# The simulation: one program for several runs of one configuration.


def make_tx(config, hyper):
  """The run's optimizer (the example's), with the learning rates in ``hyper`` (maybe traced)."""
  return train_lm.make_optimizer(dataclasses.replace(config, **hyper), group_axis=None)


def workers_axis(config):
  """The vmapped axis of the workers and its size (sync: one model, the whole batch)."""
  if config.algorithm == "sync":
    return train_lm.AXIS, 1
  return train_lm.worker_axes(config)[2], config.workers


@functools.cache
def corpus():
  train_paths, val_paths = train_lm.corpus_files()
  return train_lm.load_bytes(train_paths), train_lm.load_bytes(val_paths)


def batches(config, seed, workers):
  """Every step's global batch, as ``train_lm.train`` draws them: ``(steps, M, B / M, L + 1)``."""
  sample = train_lm.sampler(corpus()[0], config, np.random.default_rng(seed))
  out = np.stack([sample() for _ in range(config.steps)])
  return out.reshape(config.steps, workers, config.batch_size // workers, config.context + 1)


def simulate(config, hypers, seeds, eval_every):
  """Trains one run per ``(hyper, seed)`` of ``config``, as one program; returns their curves.

  Returns:
    A list of dicts, one per run: ``"eval_steps"``, ``"val_loss"`` (of the
    exported model: the center for a periodic transform), ``"final_val_loss"``
    and ``"train_loss"`` (the workers' mean, at each evaluation's step).
  """
  axis, workers = workers_axis(config)
  model = train_lm.Transformer(config.width, config.depth, config.heads, config.context)
  loss = functools.partial(train_lm.loss_fn, model=model)
  val_batch = train_lm.validation_windows(corpus()[1], config.eval_windows, config.context + 1)
  periodic = config.algorithm != "sync"
  keys = [k for k in hypers[0]]
  values = {k: jnp.asarray([h[k] for h in hypers], jnp.float32) for k in keys}

  init = jax.jit(model.init)
  dummy = jnp.zeros((1, config.context), jnp.int32)
  params, states = [], []
  for hyper, seed in zip(hypers, seeds, strict=True):
    p = init(jax.random.key(seed), dummy)["params"]
    params.append(p)
    states.append(make_tx(config, hyper).init(p))

  def per_worker(trees):  # Stacked over the runs, then a copy for every worker.
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *trees)
    return jax.tree.map(lambda x: jnp.repeat(x[:, None], workers, axis=1), stacked)

  params, states = per_worker(params), per_worker(states)
  data = np.stack([batches(config, seed, workers) for seed in seeds], axis=1)

  def run_chunk(hyper, params, state, chunk):
    def worker(params, state, batch):
      value, grads = jax.value_and_grad(loss)(params, batch)
      updates, state = make_tx(config, hyper).update(grads, state, params)
      return optax.apply_updates(params, updates), state, value

    def body(carry, batch):
      params, state, values = jax.vmap(worker, axis_name=axis)(*carry, batch)
      return (params, state), values.mean()

    (params, state), losses = lax.scan(body, (params, state), chunk)
    return params, state, losses

  def evaluate_one(params, state):
    exported = params
    if periodic:
      exported = optax.tree.cast_like(optax_dist.center_params(state, params), params)
    return loss(exported, val_batch)

  run_chunk = jax.jit(jax.vmap(run_chunk))
  # The exported model is the same on every worker: evaluate the first's.
  evaluate = jax.jit(jax.vmap(lambda p, s: evaluate_one(*jax.tree.map(lambda x: x[0], (p, s)))))

  curves = {"eval_steps": [0], "val_loss": [np.asarray(evaluate(params, states))], "train": [[]]}
  for start in range(0, config.steps, eval_every):
    stop = min(start + eval_every, config.steps)
    chunk = jnp.asarray(np.moveaxis(data[start:stop], 0, 1))  # (runs, steps, M, B / M, L + 1)
    params, states, losses = jax.block_until_ready(run_chunk(values, params, states, chunk))
    curves["eval_steps"].append(stop)
    curves["val_loss"].append(np.asarray(evaluate(params, states)))
    curves["train"].append(np.asarray(losses)[:, -1])
  val = np.stack(curves["val_loss"], axis=1)
  return [
    {
      "eval_steps": curves["eval_steps"],
      "val_loss": val[i].tolist(),
      "final_val_loss": float(val[i, -1]),
      "train_loss": [float(t[i]) for t in curves["train"][1:]],
    }
    for i in range(len(hypers))
  ]


def wire(config):
  """Bytes one worker sends, from the example's compiled 8-device step."""
  built = train_lm.build(config)
  keys = ("every_step_bytes", "group_bytes", "sync_bytes", "warmup_bytes")
  return {
    **{k: float(built[k]) for k in keys},
    "cumulative": built["cumulative"].tolist(),
    "num_params": int(built["num_params"]),
  }


# The study.


def save(results, path):
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(results, indent=1) + "\n")
  os.replace(tmp, path)


def package_commit():
  """The checkout's commit, and whether ``optax_dist`` differs from it (``None`` without git)."""
  try:
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "optax_dist"], check=False)
    return {"commit": head.stdout.strip(), "optax_dist_modified": dirty.returncode != 0}
  except OSError:
    return None


def study(results, path, rows, steps, seeds, model, eval_every, log):
  """Tunes and runs every row, saving ``results`` to ``path`` after every program."""
  start_all = time.perf_counter() - results.get("seconds", 0.0)
  # The package as this process loaded it (the checkout may move on meanwhile).
  loaded = {**(package_commit() or {}), "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
  study_seeds = seeds
  for row in rows:
    seeds = row.seeds or study_seeds
    config = row_config(row, steps, model)
    entry = results["rows"].setdefault(row.name, {"config": dataclasses.asdict(config)})
    dp = results["rows"].get("DP", {})
    dp_lr = dp.get("chosen", {}).get("learning_rate")
    if row.grid != "dp" and dp_lr is None:
      raise RuntimeError("DP must be tuned before the other rows (its learning rate)")
    if "bytes" not in entry:
      entry["bytes"] = wire(config)
    if "tuning" not in entry:
      begin = time.perf_counter()
      m8 = results["rows"].get("DiLoCo M=8 H=32", {}).get("chosen")
      chosen = {k: v["chosen"] for k, v in results["rows"].items() if "chosen" in v}
      grid = trials(row, dp_lr, m8 and m8["learning_rate"] / dp_lr, chosen)
      runs = simulate(config, grid, [seeds[0]] * len(grid), eval_every)
      best = int(np.argmin([r["final_val_loss"] for r in runs]))
      entry["tuning"] = {"trials": grid, "runs": runs, "seconds": time.perf_counter() - begin}
      entry["package_commit"] = loaded
      entry["chosen"] = grid[best]
      entry["seeds"] = {str(seeds[0]): runs[best]}
      results["seconds"] = time.perf_counter() - start_all
      save(results, path)
      log(
        f"{row.name}: tuned {len(grid)} trials in {entry['tuning']['seconds']:.0f} s, "
        f"chosen {entry['chosen']} ({runs[best]['final_val_loss']:.4f}); "
        f"{results['seconds'] / 60:.1f} min so far"
      )
    missing = [s for s in seeds if str(s) not in entry["seeds"]]
    if missing:
      begin = time.perf_counter()
      runs = simulate(config, [entry["chosen"]] * len(missing), missing, eval_every)
      entry["seeds"].update({str(s): r for s, r in zip(missing, runs, strict=True)})
      entry["seeds_seconds"] = time.perf_counter() - begin
      entry["seeds_package_commit"] = loaded
    finals = [entry["seeds"][str(s)]["final_val_loss"] for s in seeds]
    entry["final_mean"] = float(np.mean(finals))
    entry["final_std"] = float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0
    results["seconds"] = time.perf_counter() - start_all
    save(results, path)
    log(
      f"{row.name}: {entry['final_mean']:.4f} ± {entry['final_std']:.4f} over {len(seeds)} "
      f"seeds; {results['seconds'] / 60:.1f} min so far"
    )
  return results


# The report.


def gap(entry, dp):
  return 100 * (entry["final_mean"] - dp["final_mean"]) / dp["final_mean"]


def total_bytes(entry):
  return entry["bytes"]["cumulative"][-1]


def fewer_bytes(entry, dp):
  sent = total_bytes(entry)
  return total_bytes(dp) / sent if sent > 0 else float("inf")


def bytes_to_reach(entry, loss):
  """The bytes a row had sent when its mean validation curve first reached ``loss`` (or None)."""
  curve = np.mean([s["val_loss"] for s in entry["seeds"].values()], axis=0)
  steps = next(iter(entry["seeds"].values()))["eval_steps"]
  sent = np.asarray(entry["bytes"]["cumulative"])[steps]
  reached = np.nonzero(curve <= loss)[0]
  if not len(reached):
    return None
  i = reached[0]
  if i == 0:
    return float(sent[0])
  a, b = curve[i - 1], curve[i]
  return float(sent[i - 1] + (a - loss) / (a - b) * (sent[i] - sent[i - 1]))


def chosen_text(chosen, dp_lr):
  parts = []
  if "outer_learning_rate" in chosen:
    parts.append(f"outer lr {chosen['outer_learning_rate']:g}")
  if "adam_learning_rate" in chosen:
    parts.append(f"Muon lr {chosen['learning_rate']:g}")
  elif "learning_rate" in chosen:
    parts.append(f"inner lr {chosen['learning_rate'] / dp_lr:g} x DP's")
  return ", ".join(parts)


TARGETS = (
  # (row, the most gap to DP in %, the least times fewer bytes than DP, or None)
  ("DiLoCo M=1 H=32", 0.5, None),
  ("DiLoCo M=2 H=32", 2.0, None),
  ("DiLoCo M=4 H=32", 4.0, None),
  ("DiLoCo M=8 H=32", 8.0, None),
  ("DiLoCo M=8 H=32 warm-up 10%", 0.5, 7),
  ("DiLoCo M=8 H=32 warm-up 3%", 3.0, 15),
)


TARGET_BY_M = {1: 0.5, 2: 2.0, 4: 4.0, 8: 8.0}


def momentum_half_table(rows, dp):
  """The M sweep at the outer momentum 0.5 next to 0.9's and the paper's, with the targets."""
  if not any("final_mean" in rows.get(r.name, {}) for r in MOMENTUM_HALF):
    return []
  lines = [
    "",
    "**Outer momentum 0.5** (Nesterov), DiLoCo at H = 32: the outer learning rate chosen "
    "from {0.5, 1.0} on seed 0 at DP's inner learning rate, then 3 seeds; next to the "
    "study's rows at momentum 0.9 (outer learning rate from {0.4, 0.6, 0.8, 1.0}, inner "
    "fraction from {1, 0.5}) and the paper's Table 4 (arXiv 2503.09799).",
    "",
    "| M | momentum 0.5: loss | gap to DP | outer lr | seed 0 at lr 0.5 / 1.0 "
    "| momentum 0.9: gap | paper 35M | paper 2.4B | target | met at 0.5 |",
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
  ]
  for i, m in enumerate((1, 2, 4, 8)):
    half = rows.get(f"DiLoCo M={m} H=32, outer momentum 0.5", {})
    nine = rows.get(f"DiLoCo M={m} H=32", {})
    nine_text = f"{gap(nine, dp):+.2f}%" if "final_mean" in nine else "not run"
    if "final_mean" in half and len(half["seeds"]) >= 3:
      g = gap(half, dp)
      loss = f"{half['final_mean']:.4f} ± {half['final_std']:.4f}"
      gap_text, met = f"{g:+.2f}%", "yes" if g <= TARGET_BY_M[m] else "no"
      lr = f"{half['chosen']['outer_learning_rate']:g}"
    else:
      loss, gap_text, met, lr = "not run (3 seeds)", "", "", ""
    trials = "/".join(f"{r['final_val_loss']:.4f}" for r in half.get("tuning", {}).get("runs", []))
    lines.append(
      f"| {m} | {loss} | {gap_text} | {lr} | {trials} | {nine_text} | {PAPER['35M'][i]:+.1f}% "
      f"| {PAPER['2.4B'][i]:+.1f}% | +{TARGET_BY_M[m]:g}% | {met} |"
    )
  for w in (10, 3):
    half = rows.get(f"DiLoCo M=8 H=32 warm-up {w}%, outer momentum 0.5", {})
    nine = rows.get(f"DiLoCo M=8 H=32 warm-up {w}%", {})
    if "final_mean" not in half or len(half["seeds"]) < 3 or "final_mean" not in nine:
      continue
    most, fewer = {10: (0.5, 7), 3: (3.0, 15)}[w]
    g, ratio = gap(half, dp), fewer_bytes(half, dp)
    trials = "/".join(f"{r['final_val_loss']:.4f}" for r in half["tuning"]["runs"])
    lines.append(
      f"| 8, warm-up {w}% | {half['final_mean']:.4f} ± {half['final_std']:.4f} | {g:+.2f}% "
      f"| {half['chosen']['outer_learning_rate']:g} | {trials} | {gap(nine, dp):+.2f}% | | "
      f"| +{most:g}%, {fewer}x fewer bytes ({ratio:.1f}x) "
      f"| {'yes' if g <= most and ratio >= fewer else 'no'} |"
    )
  return lines


def commits_note(results):
  """Which rows ran at a later commit of the package than the study's first rows."""
  first = (results.get("package_commit") or {}).get("commit")
  later = {}
  for name, entry in results["rows"].items():
    for key in ("package_commit", "seeds_package_commit"):
      commit = (entry.get(key) or {}).get("commit")
      if commit and commit != first:
        later.setdefault(commit[:7], []).append(name + (" (seeds 1, 2)" if "seeds" in key else ""))
  if not later:
    return []
  lines = ["", f"The study's rows ran at commit {str(first)[:7]}; these at a later one:", ""]
  for commit, names in later.items():
    lines.append(f"- {commit}: " + "; ".join(dict.fromkeys(names)) + ".")
  return lines


def summarize(results):
  rows = results["rows"]
  dp = rows["DP"]
  cfg = results["config"]
  dp_lr = dp["chosen"]["learning_rate"]
  lines = [
    f"Final validation loss (nats per byte; mean ± sample standard deviation over "
    f"{len(cfg['seeds'])} seeds) after {cfg['steps']} steps at an equal global batch of "
    f"{cfg['model']['batch_size']} windows of {cfg['model']['context']} bytes; a model of "
    f"{dp['bytes']['num_params']:,} params. DP's AdamW peak learning rate: {dp_lr:g}. "
    "*Gap to DP* is the relative difference of the mean losses; *MB sent* is what one "
    "worker sends to the other workers over the run (ring convention, from the compiled "
    "8-device step); *fewer bytes* is DP's MB divided by the row's; *chosen* is the "
    "trial with the lowest loss on seed 0.",
    "",
    "| row | validation loss | gap to DP | MB sent | fewer bytes | chosen |",
    "| --- | ---: | ---: | ---: | ---: | --- |",
  ]
  diagnostic = {row.name for row in DIAGNOSTICS + MOMENTUM_HALF}
  for name, entry in rows.items():
    if "final_mean" not in entry or name in diagnostic:
      continue
    ratio = fewer_bytes(entry, dp)
    ratio_text = "no peers" if ratio == float("inf") else f"{ratio:.0f}x"
    lines.append(
      f"| {name} | {entry['final_mean']:.4f} ± {entry['final_std']:.4f} "
      f"| {gap(entry, dp):+.2f}% | {total_bytes(entry) / 1e6:.2f} | {ratio_text} "
      f"| {chosen_text(entry['chosen'], dp_lr) if name != 'DP' else f'lr {dp_lr:g}'} |"
    )
  lines += [
    "",
    "The gap to DP for each M (H = 32, equal steps and global batch), next to the "
    "paper's Table 4 (Charles et al., arXiv 2503.09799):",
    "",
    "| M | this study | paper, 35M params | paper, 2.4B params |",
    "| ---: | ---: | ---: | ---: |",
  ]
  for i, m in enumerate((1, 2, 4, 8)):
    entry = rows.get(f"DiLoCo M={m} H=32", {})
    ours = f"{gap(entry, dp):+.2f}%" if "final_mean" in entry else "not run"
    lines.append(f"| {m} | {ours} | {PAPER['35M'][i]:+.1f}% | {PAPER['2.4B'][i]:+.1f}% |")
  lines += [
    "",
    "| target | gap to DP | fewer bytes | met |",
    "| --- | ---: | ---: | --- |",
  ]
  for name, most, fewer in TARGETS:
    entry = rows.get(name, {})
    if "final_mean" not in entry:
      lines.append(f"| {name}: gap at most +{most:g}% | not run | | no |")
      continue
    g, ratio = gap(entry, dp), fewer_bytes(entry, dp)
    met = g <= most and (fewer is None or ratio >= fewer)
    what = f"{name}: gap at most +{most:g}%" + (f", {fewer}x fewer bytes" if fewer else "")
    lines.append(f"| {what} | {g:+.2f}% | {ratio:.1f}x | {'yes' if met else 'no'} |")
  streaming, plain = rows.get("Streaming F=4 int8 M=8 H=32", {}), rows.get("DiLoCo M=8 H=32", {})
  if "final_mean" in streaming and "final_mean" in plain:
    points = gap(streaming, dp) - gap(plain, dp)
    ratio = fewer_bytes(streaming, dp)
    met = points <= 0.5 and ratio >= 100
    lines.append(
      f"| Streaming F=4 int8: within 0.5 points of M=8 H=32, 100x fewer bytes "
      f"| {points:+.2f} points | {ratio:.0f}x | {'yes' if met else 'no'} |"
    )
  lines += [
    "",
    "At equal loss instead of equal steps: *DP's MB to the same loss* is what DP had sent "
    "when its validation loss (mean of seeds, linear between evaluations) first reached the "
    "row's final loss; *bytes saved* is its ratio to the row's MB.",
    "",
    "| row | final loss | DP's MB to the same loss | row's MB | bytes saved |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  for name, entry in rows.items():
    if "final_mean" not in entry or name in diagnostic or name == "DP" or not total_bytes(entry):
      continue
    needed = bytes_to_reach(dp, entry["final_mean"])
    if needed is None:
      continue
    lines.append(
      f"| {name} | {entry['final_mean']:.4f} | {needed / 1e6:.0f} "
      f"| {total_bytes(entry) / 1e6:.1f} | {needed / total_bytes(entry):.1f}x |"
    )
  dp4, m8x4 = (rows.get(name, {}) for name in ("DP, batch x4", "DiLoCo M=8 H=32, batch x4"))
  lines += momentum_half_table(rows, dp)
  for m in (1, 2):
    low = rows.get(f"DiLoCo M={m} H=32, outer lr 0.1 or 0.2", {})
    grid_row = rows.get(f"DiLoCo M={m} H=32", {})
    if "final_mean" not in low or "tuning" not in grid_row:
      continue
    lines += [
      "",
      f"Diagnostic, seed 0: DiLoCo M={m} H=32 at DP's inner learning rate, for each outer "
      "learning rate (Nesterov momentum 0.9), including two below the grid.",
      "",
      "| outer learning rate | validation loss | gap to DP (seed 0) |",
      "| ---: | ---: | ---: |",
    ]
    dp0 = dp["seeds"]["0"]["final_val_loss"]
    points = [
      (t["outer_learning_rate"], r["final_val_loss"])
      for entry in (low, grid_row)
      for t, r in zip(entry["tuning"]["trials"], entry["tuning"]["runs"], strict=True)
      if t["learning_rate"] == dp_lr
    ]
    for lr, loss in sorted(points):
      lines.append(f"| {lr:g} | {loss:.4f} | {100 * (loss / dp0 - 1):+.2f}% |")
  if "final_mean" in dp4 and "final_mean" in m8x4 and "final_mean" in plain:
    lines += [
      "",
      "Diagnostic, seed 0, the learning rates chosen above: the same DP and DiLoCo M=8 "
      "H=32 runs at 4 times the global batch (16 windows per worker instead of 4).",
      "",
      "| global batch | DP | DiLoCo M=8 H=32 | gap to DP |",
      "| ---: | ---: | ---: | ---: |",
    ]
    for label, a, b in (("32 windows", dp, plain), ("128 windows", dp4, m8x4)):
      first = lambda e: e["seeds"]["0"]["final_val_loss"]  # noqa: E731
      lines.append(
        f"| {label} | {first(a):.4f} | {first(b):.4f} | {100 * (first(b) / first(a) - 1):+.2f}% |"
      )
  lines += commits_note(results)
  return "\n".join(lines) + "\n"


def plot(results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = results["rows"]
  fig, (ax_steps, ax_bytes) = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
  cmap = plt.get_cmap("tab20")
  diagnostic = {row.name for row in DIAGNOSTICS + MOMENTUM_HALF}
  for i, (name, entry) in enumerate(rows.items()):
    if "final_mean" not in entry or name in diagnostic:
      continue
    seeds = list(entry["seeds"].values())
    curve = np.mean([s["val_loss"] for s in seeds], axis=0)
    steps = np.asarray(seeds[0]["eval_steps"])
    sent = np.asarray(entry["bytes"]["cumulative"])[steps] / 1e6
    warm = "warm-up" in name or name == "DiLoCo M=8 H=32" or name == "DP"
    style = {"color": "black" if name == "DP" else cmap(i % 20), "lw": 2 if warm else 1}
    style["ls"] = "-" if warm else "--"
    ax_steps.plot(steps, curve, label=name, **style)
    if total_bytes(entry):  # One worker sends nothing: no curve against bytes.
      ax_bytes.plot(sent, curve, marker="o", ms=2, **style)
  ax_steps.set(xlabel="step", ylabel="validation loss (nats per byte), mean of seeds")
  ax_bytes.set(xlabel="MB sent per worker (log)", xscale="log")
  ax_bytes.set_title("solid: DP, and M = 8, H = 32 with a warm-up of 0, 3, 5, 10%", fontsize=10)
  for ax in (ax_steps, ax_bytes):
    ax.grid(alpha=0.3)
  low = min(e["final_mean"] for e in rows.values() if "final_mean" in e)
  ax_steps.set_ylim(low - 0.05, low + 1.0)
  ax_steps.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--quick", action="store_true", help="a smoke run")
  parser.add_argument("--replot", action="store_true", help="redraw from the saved JSON")
  parser.add_argument(
    "--diagnostics", action="store_true", help="also run the diagnostic rows (after the study)"
  )
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  suffix = "_quick" if args.quick else ""
  path = out / f"lm{suffix}.json"
  if args.replot:
    results = json.loads(path.read_text())
    (out / f"lm{suffix}.md").write_text(summarize(results))
    plot(results, out / f"lm{suffix}.png")
    return results
  steps, seeds, model, eval_every, rows = STEPS, SEEDS, MODEL, EVAL_EVERY, ROWS + MOMENTUM_HALF
  if args.diagnostics:
    rows += DIAGNOSTICS
  if args.quick:
    steps, seeds, eval_every = 64, (0, 1), 32
    model = {"width": 16, "depth": 1, "heads": 2, "context": 16, "batch_size": 16}
    quick = ("DP", "DiLoCo M=8 H=32", "DiLoCo M=2 H=32", "DiLoCo M=8 H=32 warm-up 10%")
    rows = tuple(r for r in ROWS if r.name in quick)
  out.mkdir(parents=True, exist_ok=True)
  config = {"steps": steps, "seeds": list(seeds), "model": model, "eval_every": eval_every}
  results = json.loads(path.read_text()) if path.exists() else None
  if results is not None and results["config"] != config:
    raise SystemExit(f"{path} holds a study of another configuration: move it away to start anew")
  if results is None:
    results = {
      "config": config,
      "command": "python benchmarks/lm.py" + (" --quick" if args.quick else ""),
      "package_commit": package_commit(),
      "machine": {"cores": os.cpu_count()},
      "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
      "rows": {},
    }

  def log(line):
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {line}", flush=True)

  study(results, path, rows, steps, seeds, model, eval_every, log)
  results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
  save(results, path)
  table = summarize(results)
  (out / f"lm{suffix}.md").write_text(table)
  plot(results, out / f"lm{suffix}.png")
  print(table)
  log(f"the whole study took {results['seconds'] / 60:.1f} minutes; results in {out}")
  return results


if __name__ == "__main__":
  main()
