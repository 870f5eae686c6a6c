"""Language-model study, part 2: DiLoCo's gap to data parallelism against model size.

Charles et al., "Scaling Laws for DiLoCo" (arXiv 2503.09799, Table 4) find
that for every number of workers M the gap to data parallelism (DP) falls as
the model grows (35M to 2.4B params). This study measures the same trend
where two CPU cores allow: the byte-level transformer of
``examples/train_lm.py`` at three sizes (:data:`SIZES`, 34k to 166k params),
with the simulation of ``benchmarks/lm.py`` (its corpus, batches, AdamW
schedule, equal steps and global batch, the workers an axis of ``jax.vmap``).

Every size runs the same rows (:data:`ROWS`) with the same tuning budget, on
seed 0, then the chosen trial on the other seeds:

* DP: AdamW's peak learning rate in ``DP_LRS`` (4 trials);
* DiLoCo at H = 32 with M = 2 and M = 8 workers, the recipe's outer step
  (Nesterov momentum 0.5), its learning rate in ``OUTER_LRS`` (3 trials, up to
  1.5), the inner learning rate DP's;
* M = 8 after a synchronous warm-up of 10% of the steps, at the recipe's
  momentum 0.9 after a warm-up, the outer learning rate in ``WARMUP_LRS``;
* M = 2 and M = 8 at twice the global batch for half the steps (the same
  tokens; the paper finds DiLoCo's best batch larger than DP's), at the outer
  learning rate chosen at the study's batch (untuned, 3 seeds).

At the smallest size, DP with Muon inside (Muon's learning rate in
``MUON_LRS``, its Adam at DP's AdamW rate), the baseline of the MuLoCo row of
``benchmarks/lm.py``.

Results are written to ``benchmarks/results/lm_sizes.json`` after every
program; a restarted study resumes from it.

    python benchmarks/lm_sizes.py           # the study (its measured time is in BENCHMARKS.md)
    python benchmarks/lm_sizes.py --quick   # a smoke run: tiny models, few steps
    python benchmarks/lm_sizes.py --replot  # the table and the figure from the saved JSON
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax
import lm  # imports train_lm, which sets the simulated devices
import numpy as np
import train_lm

STEPS = 3200
SEEDS = (0, 1, 2)
EVAL_EVERY = 160
BASE = {"heads": 4, "context": 32, "batch_size": 32}
# (width, depth): 34,432, 68,736 and 166,144 params.
SIZES = {"34k": (32, 2), "69k": (48, 2), "166k": (64, 3)}
DP_LRS = (2e-3, 3e-3, 5e-3, 8e-3)
OUTER_LRS = (0.5, 1.0, 1.5)
WARMUP_LRS = (0.6, 0.8, 1.0)
MUON_LRS = (0.01, 0.02, 0.04)
PAPER = lm.PAPER


class Row(NamedTuple):
  """One row: its ``train_lm.Config`` fields, its grid and its batch factor.

  ``grid`` is ``"dp"``, ``"outer"``, ``"warm-up"``, ``"muon"`` or
  ``"same as <row>"`` (that row's chosen trial, untuned). ``batch_factor``
  multiplies the global batch and divides the steps.
  """

  name: str
  fields: dict
  grid: str
  warmup_fraction: float = 0.0
  batch_factor: int = 1


DILOCO = {"algorithm": "diloco", "period": 32, "outer_momentum": 0.5}
DP = Row("DP", {"algorithm": "sync"}, "dp")
M2 = Row("DiLoCo M=2", {**DILOCO, "workers": 2}, "outer")
M8 = Row("DiLoCo M=8", {**DILOCO, "workers": 8}, "outer")
WARM = Row(
  "DiLoCo M=8 warm-up 10%", {**DILOCO, "outer_momentum": 0.9}, "warm-up", warmup_fraction=0.1
)
M2X2 = Row("DiLoCo M=2 batch x2", M2.fields, f"same as {M2.name}", batch_factor=2)
M8X2 = Row("DiLoCo M=8 batch x2", M8.fields, f"same as {M8.name}", batch_factor=2)
MUON = Row("DP, Muon inside", {"algorithm": "sync", "inner": "muon"}, "muon")
ROWS = (DP, M2, M8, WARM, M2X2, M8X2, MUON)
# The order they run in: what the size table needs first, at every size; the
# doubled batch at the smallest size before the larger ones.
PLAN = (
  *((size, row) for row in (DP, M8, M2) for size in SIZES),
  ("34k", MUON),
  *((size, WARM) for size in SIZES),
  *((size, row) for size in SIZES for row in (M8X2, M2X2)),
)


def model_of(size, sizes):
  width, depth = sizes[size]
  return {**BASE, "width": width, "depth": depth}


def row_config(row, steps, model):
  steps //= row.batch_factor
  model = {**model, "batch_size": model["batch_size"] * row.batch_factor}
  warmup = round(row.warmup_fraction * steps)
  return train_lm.Config(**{**model, **row.fields}, steps=steps, warmup=warmup)


def trials(row, rows):
  """The row's tuning grid, from the rows of the same size already run."""
  dp_lr = rows.get("DP", {}).get("chosen", {}).get("learning_rate")
  if row.grid == "dp":
    return [{"learning_rate": lr} for lr in DP_LRS]
  if dp_lr is None:
    raise RuntimeError(f"{row.name}: DP must run first at this size (its learning rate)")
  if row.grid == "outer":
    return [{"learning_rate": dp_lr, "outer_learning_rate": lr} for lr in OUTER_LRS]
  if row.grid == "warm-up":
    return [{"learning_rate": dp_lr, "outer_learning_rate": lr} for lr in WARMUP_LRS]
  if row.grid == "muon":
    return [{"learning_rate": lr, "adam_learning_rate": dp_lr} for lr in MUON_LRS]
  source = row.grid.removeprefix("same as ")
  if "chosen" not in rows.get(source, {}):
    raise RuntimeError(f"{row.name}: {source} must run first at this size")
  return [rows[source]["chosen"]]


def num_params(config):
  model = train_lm.Transformer(config.width, config.depth, config.heads, config.context)
  dummy = jax.numpy.zeros((1, config.context), jax.numpy.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def run_row(entry, row, rows, config, seeds, eval_every, log, save):
  """Tunes ``row`` on the first seed (unless untuned), then runs the others."""
  if "chosen" not in entry:
    grid = trials(row, rows)
    begin = time.perf_counter()
    runs = lm.simulate(config, grid, [seeds[0]] * len(grid), eval_every)
    best = int(np.argmin([r["final_val_loss"] for r in runs]))
    entry.update(
      tuning={"trials": grid, "runs": runs, "seconds": time.perf_counter() - begin},
      chosen=grid[best],
      seeds={str(seeds[0]): runs[best]},
    )
    save()
    log(f"{row.name}: {len(grid)} trials in {entry['tuning']['seconds']:.0f} s, chose {grid[best]}")
  missing = [s for s in seeds if str(s) not in entry["seeds"]]
  if missing:
    begin = time.perf_counter()
    runs = lm.simulate(config, [entry["chosen"]] * len(missing), missing, eval_every)
    entry["seeds"].update({str(s): r for s, r in zip(missing, runs, strict=True)})
    entry["seeds_seconds"] = time.perf_counter() - begin
  finals = [entry["seeds"][str(s)]["final_val_loss"] for s in seeds]
  entry["final_mean"] = float(np.mean(finals))
  entry["final_std"] = float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0
  save()


def study(results, path, plan, steps, seeds, sizes, eval_every, log):
  start_all = time.perf_counter() - results.get("seconds", 0.0)

  def save():
    results["seconds"] = time.perf_counter() - start_all
    lm.save(results, path)

  loaded = {**(lm.package_commit() or {}), "at": time.strftime("%Y-%m-%d %H:%M:%S UTC")}
  for size, row in plan:
    model = model_of(size, sizes)
    config = row_config(row, steps, model)
    block = results["sizes"].setdefault(size, {"model": model, "rows": {}})
    block.setdefault("num_params", num_params(config))
    entry = block["rows"].setdefault(row.name, {"config": dataclasses.asdict(config)})
    if "final_mean" in entry:
      continue
    entry.setdefault("package_commit", loaded)
    run_row(entry, row, block["rows"], config, seeds, eval_every, log, save)
    log(
      f"{size} {row.name}: {entry['final_mean']:.4f} ± {entry['final_std']:.4f}; "
      f"{results['seconds'] / 60:.1f} min so far"
    )
  return results


# The report.


gap = lm.gap


def cell(rows, name, dp):
  entry = rows.get(name, {})
  return f"{gap(entry, dp):+.2f}%" if "final_mean" in entry and dp else "not run"


def summarize(results):
  cfg = results["config"]
  sizes = results["sizes"]
  lines = [
    f"Final validation loss (nats per byte, mean ± sample standard deviation over "
    f"{len(cfg['seeds'])} seeds) after {cfg['steps']} steps at a global batch of "
    f"{BASE['batch_size']} windows of {BASE['context']} bytes (*batch x2*: 64 windows, "
    f"{cfg['steps'] // 2} steps, the same tokens). *Gap* is to DP at the same size. "
    "DiLoCo at H = 32; outer Nesterov momentum 0.5 (0.9 after the warm-up).",
    "",
    "| size | params | width x depth | DP | DiLoCo M=2 | DiLoCo M=8 | M=8, warm-up 10% "
    "| M=2, batch x2 | M=8, batch x2 |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for size, block in sizes.items():
    rows, model = block["rows"], block["model"]
    dp = rows.get("DP", {}) if "final_mean" in rows.get("DP", {}) else None
    dp_text = f"{dp['final_mean']:.4f} ± {dp['final_std']:.4f}" if dp else "not run"
    names = (M2.name, M8.name, WARM.name, M2X2.name, M8X2.name)
    lines.append(
      f"| {size} | {block['num_params']:,} | {model['width']} x {model['depth']} | {dp_text} | "
      + " | ".join(cell(rows, n, dp) for n in names)
      + " |"
    )
  lines += [
    "",
    "The gap against size, next to the paper's Table 4 (arXiv 2503.09799):",
    "",
    "| M | " + " | ".join(f"{s} (ours)" for s in sizes) + " | paper 35M | paper 2.4B |",
    "| ---: | " + " | ".join("---:" for _ in sizes) + " | ---: | ---: |",
  ]
  for m, i in ((2, 1), (8, 3)):
    ours = []
    for block in sizes.values():
      rows = block["rows"]
      dp = rows.get("DP") if "final_mean" in rows.get("DP", {}) else None
      ours.append(cell(rows, f"DiLoCo M={m}", dp))
    lines.append(
      f"| {m} | " + " | ".join(ours) + f" | {PAPER['35M'][i]:+.1f}% | {PAPER['2.4B'][i]:+.1f}% |"
    )
  lines += [
    "",
    "Each row's trials on seed 0 (final loss), the chosen one in bold, and its run time "
    "(tuning + the other seeds, compilation included):",
    "",
    "| size | row | trials | seconds |",
    "| --- | --- | --- | ---: |",
  ]
  for size, block in sizes.items():
    for name, entry in block["rows"].items():
      if "tuning" not in entry:
        continue
      parts = []
      for t, r in zip(entry["tuning"]["trials"], entry["tuning"]["runs"], strict=True):
        key = "outer_learning_rate" if "outer_learning_rate" in t else "learning_rate"
        text = f"{key.split('_')[0]} {t[key]:g}: {r['final_val_loss']:.4f}"
        parts.append(f"**{text}**" if t == entry["chosen"] else text)
      seconds = entry["tuning"]["seconds"] + entry.get("seeds_seconds", 0.0)
      lines.append(f"| {size} | {name} | {'; '.join(parts)} | {seconds:.0f} |")
  muon = sizes.get("34k", {}).get("rows", {}).get(MUON.name, {})
  dp34 = sizes.get("34k", {}).get("rows", {}).get("DP", {})
  if "final_mean" in muon and "final_mean" in dp34:
    lines += [
      "",
      f"DP with Muon inside (34k): {muon['final_mean']:.4f} ± {muon['final_std']:.4f}, "
      f"{gap(muon, dp34):+.2f}% against DP with AdamW; Muon lr "
      f"{muon['chosen']['learning_rate']:g}.",
    ]
  return "\n".join(lines) + "\n"


def plot(results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, style in ((M2.name, "o-"), (M8.name, "s-"), (WARM.name, "^--")):
    xs, ys, errs = [], [], []
    for block in results["sizes"].values():
      rows = block["rows"]
      entry, dp = rows.get(name, {}), rows.get("DP", {})
      if "final_mean" not in entry or "final_mean" not in dp:
        continue
      xs.append(block["num_params"])
      ys.append(gap(entry, dp))
      errs.append(100 * entry["final_std"] / dp["final_mean"])
    if xs:
      ax.errorbar(xs, ys, yerr=errs, fmt=style, capsize=3, label=f"{name}, H = 32")
  ax.axhline(0, color="black", lw=0.8)
  ax.set(xscale="log", xlabel="params", ylabel="gap to DP (%), mean of seeds")
  ax.set_title("DiLoCo's gap to data parallelism against model size", fontsize=11)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(lm.ROOT / "benchmarks" / "results"))
  parser.add_argument("--quick", action="store_true", help="a smoke run")
  parser.add_argument("--replot", action="store_true", help="redraw from the saved JSON")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  name = "lm_sizes_quick" if args.quick else "lm_sizes"
  path = out / f"{name}.json"
  if args.replot:
    results = json.loads(path.read_text())
    (out / f"{name}.md").write_text(summarize(results))
    plot(results, out / f"{name}.png")
    return results
  steps, seeds, sizes, eval_every = STEPS, SEEDS, SIZES, EVAL_EVERY
  if args.quick:
    steps, seeds, eval_every = 64, (0, 1), 32
    sizes = {"34k": (8, 1), "69k": (16, 1), "166k": (16, 2)}
  out.mkdir(parents=True, exist_ok=True)
  config = {"steps": steps, "seeds": list(seeds), "sizes": sizes, "eval_every": eval_every}
  config = json.loads(json.dumps(config))
  results = json.loads(path.read_text()) if path.exists() else None
  if results is not None and results["config"] != config:
    raise SystemExit(f"{path} holds a study of another configuration: move it away to start anew")
  if results is None:
    results = {
      "config": config,
      "command": f"python benchmarks/lm_sizes.py{' --quick' if args.quick else ''}",
      "package_commit": lm.package_commit(),
      "machine": {"cores": os.cpu_count()},
      "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
      "sizes": {},
    }

  def log(line):
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {line}", flush=True)

  study(results, path, PLAN, steps, seeds, sizes, eval_every, log)
  results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
  lm.save(results, path)
  (out / f"{name}.md").write_text(summarize(results))
  plot(results, out / f"{name}.png")
  print(summarize(results))
  log(f"the whole study took {results['seconds'] / 60:.1f} minutes; results in {out}")
  return results


if __name__ == "__main__":
  main()
