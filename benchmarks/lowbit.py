"""Fewer than 8 bits: wire bytes and digits convergence of int4, int2 and top-k DiLoCo syncs.

Two measurements, side by side in one run:

1. Bytes. The sync step of ``diloco`` at N = 8 workers under ``jax.shard_map``
   (8 simulated CPU devices), compiled, and its collectives read with
   ``optax_dist.communication_report``: what one worker sends on the wire at a
   sync (ring convention) for each format, against the float32 all-reduce.
   Two models: the digits MLP of the convergence benchmark, and a
   ``64 x 1024`` matrix with three 256-vectors (66,304 numbers).
2. Convergence. The digits benchmark of ``benchmarks/convergence.py`` (its
   data, model, tuning grid and seeds, imported from it): DiLoCo in float32
   and with each format at the same period, final test accuracy over the
   seeds, and the difference to float32 DiLoCo in points.

    python benchmarks/lowbit.py                 # about 6 minutes on 2 cores
    python benchmarks/lowbit.py --periods 16 --seeds 0   # a smoke run
    python benchmarks/lowbit.py --muon          # MuLoCo rows: Muon inside, float32, int4, int2
    python benchmarks/lowbit.py --residuals     # error feedback where workers pull apart (20 s)

``--residuals``: 8 workers, each pulling toward its own target (a common part
plus three times as much of its own; 4 leaves, 2,608 numbers), DiLoCo at
H = 4 with SGD inside (0.1) and the default outer step, 48 calls. For float32
and each compressed format: the center's loss above the optimum's at the end,
and at the last syncs the largest error-feedback residual of a worker outside
the chunk it owns, the largest owner's buffer (the residual where its chunk
stands), and a worker's largest contribution (its pseudo-gradient).
"""

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import convergence
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import optax_dist

N = convergence.N
FORMATS = {
  "diloco_int8": {"comm_dtype": jnp.int8},
  "diloco_int4": {"comm_dtype": jnp.int4},
  "diloco_int4_ef": {"comm_dtype": jnp.int4, "error_feedback": True},
  "diloco_int2": {"comm_dtype": jnp.int2},
  "diloco_int2_ef": {"comm_dtype": jnp.int2, "error_feedback": True},
  "diloco_topk2_int4": {"topk_fraction": 0.02, "comm_dtype": jnp.int4},
  "diloco_topk2_int2": {"topk_fraction": 0.02, "comm_dtype": jnp.int2},
  # SparseLoCo's recipe: the decayed error-feedback buffer in place of the
  # outer momentum, a plain outer SGD step (same outer learning rates).
  "diloco_topk2_int4_sgd": {"topk_fraction": 0.02, "comm_dtype": jnp.int4},
}
# The issue's targets: wire bytes vs the float32 all-reduce, and accuracy vs
# float32 DiLoCo (points).
TARGETS = {
  "diloco_int4": (0.17, -0.5),
  "diloco_int2_ef": (0.11, -1.0),
  "diloco_topk2_int4": (0.06, -1.0),
}
CONVERGENCE = (
  "diloco",
  "diloco_int4",
  "diloco_int4_ef",
  "diloco_int2",
  "diloco_int2_ef",
  "diloco_topk2_int4",
  "diloco_topk2_int4_sgd",
)
ROOT = pathlib.Path(__file__).resolve().parent.parent


# MuLoCo: Muon inside (Newton-Schulz on the matrices, Adam on the biases), float32, int4
# or int2 with error feedback outside; Muon's own learning rates.
MUON = {
  "diloco_muon": {},
  "diloco_muon_int4": FORMATS["diloco_int4"],
  "diloco_muon_int2_ef": FORMATS["diloco_int2_ef"],
}
MUON_LRS = (0.03, 0.1, 0.3)


def trials(algorithm, period):
  """The convergence benchmark's grid, with Muon's learning rates for the Muon rows."""
  if algorithm in MUON:
    return [
      {"learning_rate": lr, "outer_learning_rate": o}
      for lr in MUON_LRS
      for o in convergence.OUTER_LRS
    ]
  return BENCHMARK_TRIALS(algorithm, period)


def make_optimizer(algorithm, period, hp):
  """The convergence benchmark's optimizers, and DiLoCo with a plain outer SGD for ``*_sgd``."""
  if algorithm in MUON:
    return optax_dist.diloco(
      optax.contrib.muon(hp["learning_rate"]),
      axis_name=convergence.AXIS,
      outer=optax.sgd(hp["outer_learning_rate"], momentum=0.9, nesterov=True),
      sync_period=period,
      **MUON[algorithm],
    )
  if algorithm.endswith("_sgd"):
    return optax_dist.diloco(
      optax.adam(hp["learning_rate"]),
      axis_name=convergence.AXIS,
      outer=optax.sgd(hp["outer_learning_rate"]),
      sync_period=period,
      **FORMATS[algorithm],
    )
  return BENCHMARK_OPTIMIZER(algorithm, period, hp)


BENCHMARK_OPTIMIZER = convergence.make_optimizer
BENCHMARK_TRIALS = convergence.trials


def matrix_report(kwargs):
  """Sync wire bytes of diloco on a 64 x 1024 matrix and three 256-vectors, at N = 8."""
  mesh = jax.make_mesh((N,), ("w",), axis_types=(AxisType.Auto,), devices=jax.devices()[:N])
  tx = optax_dist.diloco(optax.sgd(0.1), axis_name="w", sync_period=2, **kwargs)
  params = {
    "w": jnp.zeros((N, 64, 1024)),
    "b": jnp.zeros((N, 256)),
    "c": jnp.zeros((N, 256)),
    "d": jnp.zeros((N, 256)),
  }

  def step(p, s, g):
    p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
    u, s = tx.update(g, s, p, sync=True)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("w"), out_specs=P("w")))
  return optax_dist.communication_report(fn, params, jax.vmap(tx.init)(params), params)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=512)
  parser.add_argument("--eval-every", type=int, default=64)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--periods", type=int, nargs="+", default=[16])
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument(
    "--muon", action="store_true", help="only the MuLoCo rows, into lowbit_muon.{json,md}"
  )
  parser.add_argument(
    "--only", nargs="+", help="with --muon: these rows only (default: every MuLoCo row)"
  )
  parser.add_argument(
    "--residuals", action="store_true", help="only the error-feedback residual study"
  )
  args = parser.parse_args(argv)
  convergence.VARIANTS.update(FORMATS)
  convergence.make_optimizer = make_optimizer
  convergence.trials = trials
  if args.muon:
    return muon_rows(args)
  if args.residuals:
    return residual_rows(args)
  start_all = time.perf_counter()

  data = convergence.load_data()
  sizes = [data["train"][0].shape[1], convergence.HIDDEN, convergence.HIDDEN, 10]
  params = convergence.demo.init_mlp(jax.random.key(0), sizes)
  results = {"config": vars(args) | {"workers": N, "mlp": sizes}, "bytes": {}, "runs": {}}
  print(f"{N} workers; digits MLP {sizes}", flush=True)
  for name in ("diloco", *FORMATS):
    digits = convergence.shard_map_report(name, 16, params)
    matrix = matrix_report(FORMATS.get(name, {}))
    results["bytes"][name] = {
      "digits_sync_wire_bytes": digits.sync_wire_bytes,
      "matrix_sync_wire_bytes": matrix.every_step_wire_bytes,
      "collectives": [f"{c.kind} {c.shape}" for c in matrix.collectives],
    }
  base = results["bytes"]["diloco"]
  for name, r in results["bytes"].items():
    r["digits_ratio"] = r["digits_sync_wire_bytes"] / base["digits_sync_wire_bytes"]
    r["matrix_ratio"] = r["matrix_sync_wire_bytes"] / base["matrix_sync_wire_bytes"]
    print(
      f"  {name:>18}: digits {r['digits_sync_wire_bytes']:9.0f} B ({r['digits_ratio']:.4f}x), "
      f"matrix {r['matrix_sync_wire_bytes']:9.0f} B ({r['matrix_ratio']:.4f}x); "
      f"{', '.join(r['collectives'])}",
      flush=True,
    )

  for name in CONVERGENCE:
    results["runs"][name] = {}
    for period in args.periods:
      start = time.perf_counter()
      val, test = convergence.run(name, period, args.seeds, args.steps, args.eval_every, data)
      best = int(np.argmax(val[-1].mean(axis=-1)))
      hps = convergence.trials(name, period)
      r = results["runs"][name][str(period)] = {
        "chosen_hyperparameters": hps[best],
        "test_mean": float(test[-1, best].mean()),
        "test_std": float(test[-1, best].std(ddof=1 if len(args.seeds) > 1 else 0)),
        "test_per_seed": test[-1, best].tolist(),
        "seconds": time.perf_counter() - start,
      }
      print(
        f"  {name:>18} p={period}: test {100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f} "
        f"({hps[best]}) in {r['seconds']:.0f} s",
        flush=True,
      )
  results["seconds"] = time.perf_counter() - start_all
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "lowbit.json").write_text(json.dumps(results, indent=1) + "\n")
  (out / "lowbit.md").write_text(summarize(results, args))
  print(summarize(results, args))
  print(f"{results['seconds']:.0f} s; results in {out}")


APART = {"workers": N, "period": 4, "calls": 48, "shapes": [(64, 32), (32,), (32, 16), (16,)]}
APART_FORMATS = {
  "float32": {},
  "int4": {"comm_dtype": jnp.int4},
  "int4 + error feedback": {"comm_dtype": jnp.int4, "error_feedback": True},
  "int2": {"comm_dtype": jnp.int2},
  "int2 + error feedback": {"comm_dtype": jnp.int2, "error_feedback": True},
  "top-k 2% int4 (default outer: SGD 1.0)": {"topk_fraction": 0.02, "comm_dtype": jnp.int4},
  "top-k 2% int4, Nesterov (0.7, 0.9)": {
    "topk_fraction": 0.02,
    "comm_dtype": jnp.int4,
    "outer": optax.sgd(0.7, momentum=0.9, nesterov=True),
  },
}


def residual_rows(args):
  """Error feedback where the workers pull apart: final loss and residual sizes."""
  rng = np.random.default_rng(0)
  n, period, calls = APART["workers"], APART["period"], APART["calls"]
  targets = [
    (rng.normal(size=s) + 3 * rng.normal(size=(n, *s))).astype(np.float32) for s in APART["shapes"]
  ]
  size = sum(t[0].size for t in targets)

  def excess(center):
    full = sum(0.5 * np.sum((np.float64(c) - t) ** 2) for c, t in zip(center, targets, strict=True))
    best = sum(0.5 * np.sum((t.mean(0, dtype=np.float64) - t) ** 2) for t in targets)
    return (full - best) / n

  start = excess([np.zeros(t.shape[1:]) for t in targets])
  rows = {}
  began = time.perf_counter()
  for name, kwargs in APART_FORMATS.items():
    tx = optax_dist.diloco(optax.sgd(0.1), axis_name="w", sync_period=period, **kwargs)

    def train(mine, tx=tx):
      def call(carry, _):
        params, state = carry
        pseudo = jax.tree.map(jnp.subtract, state.center, params)
        updates, state = tx.update(jax.tree.map(lambda p, t: p - t, params, mine), state, params)
        flat = lambda tree: jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(tree)])  # noqa: E731
        residual = flat(state.residual) if jax.tree.leaves(state.residual) else jnp.zeros(size)
        return (optax.apply_updates(params, updates), state), (residual, flat(pseudo))

      params = jax.tree.map(jnp.zeros_like, mine)
      (_, state), out = jax.lax.scan(call, (params, tx.init(params)), None, calls)
      return optax_dist.center_params(state), out

    center, (residual, pseudo) = jax.jit(jax.vmap(train, axis_name="w"))(targets)
    residual, pseudo = np.asarray(residual), np.asarray(pseudo)
    block = {jnp.int4: 64, jnp.int2: 32}.get(kwargs.get("comm_dtype"), 256)
    chunk = -(-size // n // block) * block
    last = [s - 1 for s in range(period, calls + 1, period)][-3:]  # The last 3 sync calls.
    owned = np.zeros((n, size), bool)
    for k in range(n):
      owned[k, k * chunk : (k + 1) * chunk] = "topk_fraction" not in kwargs
    rows[name] = {
      "final_excess_loss": excess([np.asarray(c)[0] for c in center]),
      "worker_residual": float(np.abs(np.where(owned[:, None], 0, residual[:, last])).max()),
      "owner_buffer": float(np.abs(np.where(owned[:, None], residual[:, last], 0)).max()),
      "contribution": float(np.abs(pseudo[:, last]).max()),
    }
  result = {
    "config": {**APART, "start_excess_loss": start},
    "rows": rows,
    "seconds": time.perf_counter() - began,
  }
  lines = [
    f"Excess loss of the center after {calls} calls (start {start:,.0f}); at the last 3 syncs the "
    "largest worker residual outside its owned chunk, owner's buffer and contribution.",
    "",
    "| format | final excess loss | worker residual | owner's buffer | contribution |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  for name, r in rows.items():
    lines.append(
      f"| {name} | {r['final_excess_loss']:,.1f} | {r['worker_residual']:.2f} | "
      f"{r['owner_buffer']:.2f} | {r['contribution']:.2f} |"
    )
  out = pathlib.Path(args.out)
  (out / "lowbit_residuals.json").write_text(json.dumps(result, indent=1))
  (out / "lowbit_residuals.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"{result['seconds']:.0f} s")
  return result


def muon_rows(args):
  """DiLoCo with Muon inside, float32, int4 and int2 + error feedback outside (MuLoCo).

  The results files are written after every row, so that a run stopped early
  keeps the rows it finished.
  """
  start_all = time.perf_counter()
  data = convergence.load_data()
  results = {"config": vars(args) | {"workers": N, "muon_lrs": MUON_LRS}, "runs": {}}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for name in args.only or MUON:
    for period in args.periods:
      start = time.perf_counter()
      val, test = convergence.run(name, period, args.seeds, args.steps, args.eval_every, data)
      best = int(np.argmax(val[-1].mean(axis=-1)))
      hps = trials(name, period)
      r = results["runs"].setdefault(name, {})[str(period)] = {
        "chosen_hyperparameters": hps[best],
        "test_mean": float(test[-1, best].mean()),
        "test_std": float(test[-1, best].std(ddof=1 if len(args.seeds) > 1 else 0)),
        "test_per_seed": test[-1, best].tolist(),
        "seconds": time.perf_counter() - start,
      }
      print(
        f"  {name:>20} p={period}: test {100 * r['test_mean']:.2f} ± "
        f"{100 * r['test_std']:.2f} ({hps[best]}) in {r['seconds']:.0f} s",
        flush=True,
      )
      results["seconds"] = time.perf_counter() - start_all
      (out / "lowbit_muon.json").write_text(json.dumps(results, indent=1) + "\n")
      (out / "lowbit_muon.md").write_text(muon_table(results))
  print(muon_table(results))
  print(f"{results['seconds']:.0f} s; results in {out}")


def muon_table(results):
  lines = [
    f"Digits, {len(results['config']['seeds'])} seeds, {results['config']['steps']} steps, "
    f"{results['seconds']:.0f} s.",
    "",
    "| inner / outer format | period | test accuracy (%) | chosen hyperparameters | seconds |",
    "| --- | ---: | ---: | --- | ---: |",
  ]
  for name, runs in results["runs"].items():
    for period, r in runs.items():
      lines.append(
        f"| {name} | {period} | {100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f} "
        f"| {r['chosen_hyperparameters']} | {r['seconds']:.0f} |"
      )
  return "\n".join(lines) + "\n"


def summarize(results, args):
  lines = [
    f"DiLoCo's sync at N = {N}: bytes one worker sends on the wire (ring convention, from the "
    "compiled HLO) against the float32 all-reduce; digits test accuracy after "
    f"{args.steps} steps over {len(args.seeds)} seeds, against float32 DiLoCo at the same "
    "period (DiLoCo's tuning grid, Adam inside, Nesterov outside).",
    "",
    "| format | wire bytes vs float32 (matrix) | (digits MLP) | target | period | test accuracy (%) "
    "| Δ vs float32 DiLoCo (points) | target |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  base_runs = results["runs"].get("diloco", {})
  for name, b in results["bytes"].items():
    bytes_target, accuracy_target = TARGETS.get(name, (None, None))
    runs = results["runs"].get(name) or {"": None}
    for period, r in runs.items():
      cells = ["", "", ""]
      if r is not None:
        delta = 100 * (r["test_mean"] - base_runs[period]["test_mean"])
        cells = [
          period,
          f"{100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f}",
          f"{delta:+.2f}" if name != "diloco" else "",
        ]
      lines.append(
        f"| {name} | {b['matrix_ratio']:.4f} | {b['digits_ratio']:.4f} "
        f"| {'' if bytes_target is None else f'<= {bytes_target}'} | {' | '.join(cells)} "
        f"| {'' if accuracy_target is None else f'>= {accuracy_target:+}'} |"
      )
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
