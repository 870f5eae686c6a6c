"""What each transform costs per step, next to the plain step it replaces.

Side by side in one run, median of interleaved repetitions, 8 simulated
devices under ``jax.shard_map``, an MLP of about 1M parameters, per-worker
params and state donated as in a real training loop. Each timed step is the
optimizer update alone (gradients given), the strictest setting for overhead:

* ``tower(adam)`` / a hand-written ``pmean(grads)`` + adam step (target <= 1.02),
* each periodic transform's non-sync step / a plain adam step (target <= 1.03),
* each periodic transform's sync step / the ``pmean`` + adam step.

The compiled HLO of each step is read for evidence: the bytes its collectives
move on every step and per sync (``optax_dist.communication_report``), and the
params-sized ``copy`` instructions in the entry computation beyond those of
its baseline. Below the table, each sync program's copies are named: a donated
buffer that XLA copies before it is overwritten (its path in ``(params, state,
grads)``), or a result computed elsewhere and copied into its donated output.

    python benchmarks/overhead.py --repeats 7
"""

import argparse
import itertools
import json
import os
import re
import statistics
import time

NUM_DEVICES = 8
if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu"):
  os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={NUM_DEVICES}"]
  ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import optax  # noqa: E402

import optax_dist  # noqa: E402
from optax_dist import _hlo as hlo  # noqa: E402

AXIS = "workers"
SIZES = (784, 1024, 256, 10)  # 1,068,810 parameters.
NEVER = 10**9  # A period that never syncs within the benchmark.


def make_params(n):
  key = jax.random.key(0)
  params = {}
  for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
    key, sub = jax.random.split(key)
    params[f"w{i}"] = jnp.broadcast_to(jax.random.normal(sub, (a, b)) / a**0.5, (n, a, b))
    params[f"b{i}"] = jnp.zeros((n, b))
  return params


def build(tx, mesh, reduce_grads=False, extra=None):
  def step(p, s, g):
    p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
    if reduce_grads:
      g = jax.lax.pmean(g, AXIS)
    u, s = tx.update(g, s, p, **(extra or {}))
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)), donate_argnums=(0, 1)
  )


def variants(adam):
  """name -> (transform, reduce gradients by hand, baseline name, extra update args)."""
  periodic = {
    "easgd": lambda p: optax_dist.elastic_average(adam, axis_name=AXIS, communication_period=p),
    "agn": lambda p: optax_dist.agn(adam, axis_name=AXIS, communication_period=p),
    "model_average": lambda p: optax_dist.model_average(adam, axis_name=AXIS, interval_steps=p),
    "diloco": lambda p: optax_dist.diloco(adam, axis_name=AXIS, sync_period=p),
  }
  out = {
    "adam": (adam, False, None, None),
    "pmean + adam": (adam, True, None, None),
    "tower(adam)": (optax_dist.tower(adam, axis_name=AXIS), False, "pmean + adam", None),
  }
  for name, make in periodic.items():
    # In-graph (sync=None): the program decides; the step period puts every
    # call on one side. Static: the flag chooses the program.
    out[f"{name} non-sync"] = (make(NEVER), False, "adam", None)
    out[f"{name} sync"] = (make(1), False, "pmean + adam", None)
    out[f"{name} static local"] = (make(NEVER), False, "adam", {"sync": False})
    out[f"{name} static sync"] = (make(NEVER), False, "pmean + adam", {"sync": True})
  return out


def entry_copies(fn, args, min_bytes):
  """What the params-sized copies in the entry computation copy, one string each.

  An entry parameter (a donated buffer kept alive past its overwrite) is
  named by its path in ``args``; anything else is ``"result -> <path>"``, a
  value computed outside its donated output buffer and copied into it.
  """
  text = fn.lower(*args).compile().as_text()
  entry = text[text.index("\nENTRY") :]
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(args)]
  params = dict(re.findall(r"%(\S+) = \S+ parameter\((\d+)\)", entry))
  root = re.search(r"ROOT %\S+ = .* tuple\((.*)\)", entry)
  outputs = re.findall(r"%([^,\s)]+)", root.group(1)) if root else []
  copies = []
  for op in hlo.ops(entry):
    if op.kind != "copy" or op.nbytes < min_bytes:
      continue
    source = re.search(rf"%{re.escape(op.name)} = \S+ copy\(%([^)\s]+)\)", entry).group(1)
    if source in params:
      copies.append(paths[int(params[source])])
    elif op.name in outputs:
      copies.append(f"result -> {paths[outputs.index(op.name)]}")
    else:
      copies.append(f"{source} (intermediate)")
  return copies


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per round and variant")
  parser.add_argument("--json", help="write the figures to this file")
  args = parser.parse_args(argv)
  n = jax.device_count()
  mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,))
  grads = jax.tree.map(lambda a: a * 1e-3 + 1e-4, make_params(n))
  num_params = sum(a[0].size for a in jax.tree.leaves(grads))
  smallest_matrix = min(a[0].size for a in jax.tree.leaves(grads) if a.ndim > 2) * 4
  print(f"{n} devices ({jax.devices()[0].device_kind}), {num_params:,} parameters per worker")
  table = variants(optax.adam(1e-3))
  runs, times, evidence = {}, {name: [] for name in table}, {}
  for name, (tx, reduce_grads, _, extra) in table.items():
    fn = build(tx, mesh, reduce_grads, extra)
    params = make_params(n)
    state = jax.vmap(tx.init)(params)
    report = optax_dist.communication_report(fn, params, state, grads)
    evidence[name] = {
      "every_step_bytes": report.every_step_bytes,
      "sync_bytes": report.sync_bytes,
      "copied": entry_copies(fn, (params, state, grads), smallest_matrix),
    }
    evidence[name]["entry_copies"] = len(evidence[name]["copied"])
    for _ in range(3):  # Warm up.
      params, state = jax.block_until_ready(fn(params, state, grads))
    runs[name] = [fn, params, state]
  for _ in range(args.repeats):
    for name, run in runs.items():
      fn, params, state = run
      start = time.perf_counter()
      for _ in range(args.steps):
        # Wait for each step: see the README on CPU collectives.
        params, state = jax.block_until_ready(fn(params, state, grads))
      times[name].append((time.perf_counter() - start) / args.steps)
      run[1], run[2] = params, state
  med = {name: statistics.median(ts) for name, ts in times.items()}
  print(f"\nmedian of {args.repeats} interleaved rounds of {args.steps} steps; HLO evidence")
  print(
    f"{'step':26s} {'ms':>8s} {'ratio':>7s}  {'vs':14s} {'target':>6s}  "
    f"{'bytes/step':>10s} {'bytes/sync':>10s} {'extra copies':>12s}"
  )
  results = {}
  for name, (_, _, base, _) in table.items():
    ratio = med[name] / med[base] if base else 1.0
    target = (
      1.02
      if name.startswith("tower")
      else 1.01
      if "static local" in name
      else 1.03
      if "non-sync" in name
      else None
    )
    ev = evidence[name]
    extra = ev["entry_copies"] - (evidence[base]["entry_copies"] if base else 0)
    print(
      f"{name:26s} {med[name] * 1e3:8.3f} {ratio:7.3f}  {base or '':14s} "
      f"{target or '':>6}  {ev['every_step_bytes']:10,d} {ev['sync_bytes']:10,d} {extra:12d}"
    )
    results[name] = {"ms": med[name] * 1e3, "ratio": ratio, "baseline": base, "target": target}
    results[name].update(ev, extra_entry_copies=extra)
  print(
    f"\nparams: {num_params * 4:,} bytes per worker; 'extra copies' counts params-sized "
    "(>= smallest weight matrix) copy instructions in the entry computation beyond the baseline's"
  )
  print("\nwhat the params-sized copies copy (path in (params, state, grads)):")
  for name, ev in evidence.items():
    if "static sync" in name or name == "pmean + adam":
      print(f"  {name}: {', '.join(ev['copied']) or 'none'}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "n": n, "results": results}, f, indent=1)
  return results


if __name__ == "__main__":
  main()
