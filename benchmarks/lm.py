"""Language-model study: validation loss per byte sent, sync against the periodic algorithms.

The byte-level transformer of ``examples/train_lm.py`` (its model, corpus and
training loop, imported from it), trained on the Python standard library's
source by 8 simulated workers, AdamW inside every algorithm:

* ``sync``: ``tower``, the gradients all-reduced every step;
* ``diloco``, ``model_average`` and ``easgd`` at periods H = 8, 32 and 128;
* DiLoCo at H = 32 streamed (``fragments=4``), with its pseudo-gradient in
  int8 (error feedback on), both at once, and with a synchronous warm-up over
  the first fifth of the steps (post-local SGD).

Tuning, the same budget for every configuration: 3 trials on seed 0, the one
with the lowest final validation loss chosen, then run with 2 more seeds
(3 in all). ``sync`` and ``model_average`` try 3 peak learning rates; DiLoCo
tries 3 outer Nesterov settings (learning rate, momentum); ``easgd`` tries 3
moving rates. Everything else is the example's defaults (the same model, data,
batch and learning-rate schedule for every run).

Bytes are what one worker sends on the wire (ring convention), read from the
compiled step by ``optax_dist.communication_report``.

    python benchmarks/lm.py          # about 50 minutes on 2 cores
    python benchmarks/lm.py --quick  # a smoke run: 2 configurations, 1 trial, 40 steps
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import numpy as np  # noqa: E402
import train_lm  # noqa: E402  (sets the simulated devices before JAX starts)

STEPS = 400
SEEDS = (0, 1, 2)
PERIODS = (8, 32, 128)
SYNC_LRS = (2e-3, 3e-3, 5e-3)
OUTER = ((0.7, 0.9), (0.7, 0.5), (1.0, 0.5))  # DiLoCo's (learning rate, momentum).
N = train_lm.NUM_DEVICES


def configurations(steps):
  """name -> (base Config fields, the 3 trials' fields)."""
  moving_rates = lambda p: (0.9 / p / N, 0.3 / N, 0.9 / N)  # noqa: E731
  diloco_trials = [{"outer_learning_rate": lr, "outer_momentum": m} for lr, m in OUTER]
  out = {"sync": ({"algorithm": "sync"}, [{"learning_rate": lr} for lr in SYNC_LRS])}
  for p in PERIODS:
    out[f"diloco H={p}"] = ({"algorithm": "diloco", "period": p}, diloco_trials)
    out[f"model_average H={p}"] = (
      {"algorithm": "model_average", "period": p},
      [{"learning_rate": lr} for lr in SYNC_LRS],
    )
    out[f"easgd H={p}"] = (
      {"algorithm": "easgd", "period": p},
      [{"moving_rate": a} for a in moving_rates(p)],
    )
  diloco32 = {"algorithm": "diloco", "period": 32}
  out["diloco H=32 F=4"] = ({**diloco32, "fragments": 4}, diloco_trials)
  out["diloco H=32 int8"] = (
    {**diloco32, "comm_dtype": "int8", "error_feedback": True},
    diloco_trials,
  )
  out["diloco H=32 F=4 int8"] = (
    {**diloco32, "fragments": 4, "comm_dtype": "int8", "error_feedback": True},
    diloco_trials,
  )
  out["diloco H=32 warm-up"] = ({**diloco32, "warmup": steps // 5}, diloco_trials)
  return out


def run(base, trial, seed, steps):
  config = train_lm.Config(**base, **trial, seed=seed, steps=steps)
  result = train_lm.train(config)
  return {
    "final_val_loss": result["final_val_loss"],
    "val_loss": result["val_loss"],
    "eval_steps": result["eval_steps"],
    "bytes": result["bytes"],
    "total_bytes": result["total_bytes"],
    "seconds": result["seconds"]["total"],
  }


def summarize(results):
  runs = results["runs"]
  sync = runs["sync"]
  sync_loss = sync["final_mean"]
  lines = [
    f"Final validation loss (nats per byte, mean ± sample standard deviation over "
    f"{len(results['config']['seeds'])} seeds) after {results['config']['steps']} steps, "
    f"{N} workers. *Δ vs sync* is the relative difference to sync's loss; *MB sent per "
    "worker* is what one worker sends on the wire over the run (ring convention, from "
    "the compiled step); *fewer bytes* is sync's bytes divided by the row's; *chosen* is "
    "the trial with the lowest validation loss on seed 0.",
    "",
    "| configuration | validation loss | Δ vs sync | MB sent per worker | fewer bytes | chosen |",
    "| --- | ---: | ---: | ---: | ---: | --- |",
  ]
  for name, r in runs.items():
    delta = 100 * (r["final_mean"] - sync_loss) / sync_loss
    ratio = sync["total_bytes"] / r["total_bytes"]
    chosen = ", ".join(f"{k}={v:.3g}" for k, v in r["chosen"].items())
    lines.append(
      f"| {name} | {r['final_mean']:.4f} ± {r['final_std']:.4f} | {delta:+.2f}% "
      f"| {r['total_bytes'] / 1e6:.2f} | {ratio:.0f}x | {chosen} |"
    )
  # Per byte: how many bytes sync needed to reach each configuration's final
  # loss (interpolated on sync's validation curve, mean of seeds).
  sync_curve = np.mean([s["val_loss"] for s in sync["seeds"]], axis=0)
  sync_bytes = np.asarray(sync["seeds"][0]["bytes"])
  lines += [
    "",
    "At equal bytes instead of equal steps: *sync's MB to the same loss* is what sync "
    "had sent when its validation loss (mean of seeds) first reached the row's final "
    "loss, and *bytes saved* its ratio to the row's MB.",
    "",
    "| configuration | final loss | sync's MB to the same loss | row's MB | bytes saved |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  for name, r in runs.items():
    if name == "sync":
      continue
    reached = np.nonzero(sync_curve <= r["final_mean"])[0]
    if not len(reached):
      continue
    i = reached[0]
    # Linear in bytes between the two evaluations around the crossing.
    if i > 0:
      a, b = sync_curve[i - 1], sync_curve[i]
      frac = (a - r["final_mean"]) / (a - b) if a != b else 1.0
      needed = sync_bytes[i - 1] + frac * (sync_bytes[i] - sync_bytes[i - 1])
    else:
      needed = sync_bytes[0]
    lines.append(
      f"| {name} | {r['final_mean']:.4f} | {needed / 1e6:.1f} | {r['total_bytes'] / 1e6:.2f} "
      f"| {needed / r['total_bytes']:.1f}x |"
    )
  targets = [
    ("diloco H=32", 2.0, 32),
    ("diloco H=32 F=4 int8", 3.0, 100),
  ]
  lines += [
    "",
    "| target | Δ vs sync | fewer bytes | target met |",
    "| --- | ---: | ---: | --- |",
  ]
  for name, within, fewer in targets:
    if name not in runs:
      continue
    r = runs[name]
    delta = 100 * (r["final_mean"] - sync_loss) / sync_loss
    ratio = sync["total_bytes"] / r["total_bytes"]
    met = "yes" if delta <= within and ratio >= fewer else "no"
    lines.append(
      f"| {name}: within {within:g}% of sync, {fewer}x fewer bytes | {delta:+.2f}% "
      f"| {ratio:.0f}x | {met} |"
    )
  return "\n".join(lines) + "\n"


def plot(results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_steps, ax_bytes) = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
  colors = {"sync": "black", "diloco": "tab:red", "model_average": "tab:green", "easgd": "tab:blue"}
  variants = {
    "F=4": "tab:purple",
    "int8": "tab:orange",
    "F=4 int8": "tab:brown",
    "warm-up": "tab:pink",
  }
  styles = {"8": ":", "32": "-", "128": "--"}
  for name, r in results["runs"].items():
    algorithm = name.split()[0]
    period = name.split("H=")[1].split()[0] if "H=" in name else None
    variant = name.split(f"H={period} ", 1)[1] if period and f"H={period} " in name else None
    style = {"color": colors[algorithm], "ls": styles.get(period, "-")}
    if variant:  # DiLoCo's variants: their own colors, with markers.
      style = {"color": variants[variant], "ls": "-", "marker": "o", "ms": 3}
    curve = np.mean([s["val_loss"] for s in r["seeds"]], axis=0)
    steps = r["seeds"][0]["eval_steps"]
    sent = np.asarray(r["seeds"][0]["bytes"]) / 1e6
    ax_steps.plot(steps, curve, label=name, lw=1.2, **style)
    ax_bytes.plot(np.maximum(sent, 1e-3), curve, label=name, lw=1.2, **style)
  ax_steps.set(xlabel="step", ylabel="validation loss (nats per byte), mean of seeds")
  ax_bytes.set(xlabel="MB sent per worker (log)", xscale="log")
  for ax in (ax_steps, ax_bytes):
    ax.grid(alpha=0.3)
  ax_steps.set_ylim(top=min(3.5, ax_steps.get_ylim()[1]))
  ax_bytes.legend(fontsize=9, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--quick", action="store_true", help="a smoke run")
  parser.add_argument("--replot", action="store_true", help="redraw from the saved JSON")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  suffix = "_quick" if args.quick else ""
  path = out / f"lm{suffix}.json"
  if args.replot:
    results = json.loads(path.read_text())
    (out / f"lm{suffix}.md").write_text(summarize(results))
    plot(results, out / f"lm{suffix}.png")
    return results
  steps, seeds = args.steps, SEEDS
  configs = configurations(steps)
  if args.quick:
    steps, seeds = 40, (0, 1)
    configs = {k: (v[0], v[1][:1]) for k, v in list(configs.items()) if k in ("sync", "diloco H=8")}
  defaults = dataclasses.asdict(train_lm.Config())
  results = {
    "config": {"steps": steps, "seeds": list(seeds), "example_defaults": defaults},
    "machine": {"cores": os.cpu_count()},
    "runs": {},
  }
  out.mkdir(parents=True, exist_ok=True)
  start_all = time.perf_counter()
  for name, (base, trials) in configs.items():
    start = time.perf_counter()
    tried = [run(base, trial, seeds[0], steps) for trial in trials]
    best = int(np.argmin([t["final_val_loss"] for t in tried]))
    per_seed = [tried[best]] + [run(base, trials[best], seed, steps) for seed in seeds[1:]]
    finals = [s["final_val_loss"] for s in per_seed]
    results["runs"][name] = {
      "base": base,
      "trials": trials,
      "trial_losses": [t["final_val_loss"] for t in tried],
      "chosen": trials[best],
      "seeds": per_seed,
      "final_mean": float(np.mean(finals)),
      "final_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
      "total_bytes": per_seed[0]["total_bytes"],
      "seconds": time.perf_counter() - start,
    }
    results["seconds"] = time.perf_counter() - start_all
    path.write_text(json.dumps(results, indent=1) + "\n")  # After every configuration.
    print(
      f"{name:>22}: {np.mean(finals):.4f} ± {results['runs'][name]['final_std']:.4f} "
      f"({per_seed[0]['total_bytes'] / 1e6:.2f} MB) in {time.perf_counter() - start:.0f} s, "
      f"{results['seconds'] / 60:.1f} min so far",
      flush=True,
    )
  table = summarize(results)
  (out / f"lm{suffix}.md").write_text(table)
  plot(results, out / f"lm{suffix}.png")
  print(table)
  print(f"the whole study took {results['seconds'] / 60:.1f} minutes; results in {out}")
  return results


if __name__ == "__main__":
  main()
