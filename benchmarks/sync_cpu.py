"""The CPU time and page faults of a DiLoCo sync step, in each wire format.

One process, 2 simulated CPU devices under ``jax.shard_map``, the network
benchmark's MLP sizes (4,207,626 params per worker), plain SGD inside and a
period of 1, so that every call is a sync step; params and state are
donated. Each format runs in a fresh process, which times ``--calls`` calls
after two warm-up calls and reports per call the user and system CPU time
of both devices together (``getrusage``: less sensitive to other work on the
machine than wall time), the wall time and the minor page faults.

Each format runs twice: with glibc's default allocator settings, and with
the settings that keep freed memory in the process
(``optax_dist.launch.KEEP_MEMORY``), which must be in the environment before the
process starts.

    python benchmarks/sync_cpu.py            # about 2 minutes on 2 cores
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import network

from optax_dist import launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORMATS = {
  "float32": {},
  "int8 + feedback": {"comm_dtype": "int8", "error_feedback": True},
  "int4 + feedback": {"comm_dtype": "int4", "error_feedback": True},
  "int2 + feedback": {"comm_dtype": "int2", "error_feedback": True},
  "top-k 2% + int4": {"comm_dtype": "int4", "topk_fraction": 0.02},
}


def child(name, calls):
  """In a fresh process: the per-call costs of ``calls`` sync calls in format ``name``."""
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import optax

  import optax_dist

  kwargs = dict(FORMATS[name])
  if "comm_dtype" in kwargs:
    kwargs["comm_dtype"] = jnp.dtype(kwargs["comm_dtype"])
  tx = optax_dist.diloco(optax.sgd(0.1), sync_period=1, axis_name="w", **kwargs)
  mesh = jax.make_mesh((2,), ("w",), axis_types=(jax.sharding.AxisType.Auto,))
  key, params = jax.random.key(0), {}
  for i, (a, b) in enumerate(zip(network.SIZES, network.SIZES[1:], strict=False)):
    key, sub = jax.random.split(key)
    params[f"w{i}"] = jax.random.normal(sub, (2, a, b)) / a**0.5
    params[f"b{i}"] = jnp.zeros((2, b))
  grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
  params, grads = jax.device_put((params, grads), NamedSharding(mesh, P("w")))
  one = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
  stacked = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731

  def step(params, state, grads):
    updates, state = tx.update(one(grads), one(state), one(params))
    return stacked((optax.apply_updates(one(params), updates), state))

  mapped = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("w"), out_specs=P("w")))  # noqa: E731
  state = mapped(lambda p: stacked(tx.init(one(p))))(params)
  fn = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=P("w"), out_specs=P("w")), donate_argnums=(0, 1)
  )
  for _ in range(2):
    params, state = jax.block_until_ready(fn(params, state, grads))
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(calls):
    params, state = jax.block_until_ready(fn(params, state, grads))
  wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
  return {
    "params": sum(x.size for x in jax.tree.leaves(params)) // 2,
    "user_ms": 1e3 * (after.ru_utime - before.ru_utime) / calls,
    "system_ms": 1e3 * (after.ru_stime - before.ru_stime) / calls,
    "wall_ms": 1e3 * wall / calls,
    "minor_faults": (after.ru_minflt - before.ru_minflt) / calls,
  }


def table(rows):
  lines = [
    "| sync step | allocator | user + system CPU (ms) | system (ms) | wall (ms) | minor page faults |",
    "| --- | --- | ---: | ---: | ---: | ---: |",
  ]
  for r in rows:
    lines.append(
      f"| {r['format']} | {r['allocator']} | {r['user_ms'] + r['system_ms']:.1f} | "
      f"{r['system_ms']:.1f} | {r['wall_ms']:.1f} | {r['minor_faults']:,.0f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--calls", type=int, default=20, help="timed sync calls per format")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.child, args.calls)))
    return None
  begin, rows = time.perf_counter(), []
  for name in FORMATS:
    for allocator, extra in (("glibc defaults", {}), ("keeping memory", launch.KEEP_MEMORY)):
      env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
      env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
      argv = [sys.executable, __file__, "--child", name, "--calls", str(args.calls)]
      done = subprocess.run(argv, env={**env, **extra}, capture_output=True, text=True, check=True)
      row = {"format": name, "allocator": allocator, **json.loads(done.stdout.splitlines()[-1])}
      rows.append(row)
      print(table([row]).splitlines()[-1], flush=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  seconds = time.perf_counter() - begin
  result = {"command": "python benchmarks/sync_cpu.py", "seconds": seconds, "rows": rows}
  (out / "sync_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
  text = (
    f"DiLoCo sync calls, {rows[0]['params']:,} params per worker, 2 simulated devices in one "
    f"process, {args.calls} calls per row, CPU time of both devices per call "
    f"({seconds:.0f} s in all).\n\n" + table(rows)
  )
  (out / "sync_cpu.md").write_text(text)
  print(text)
  return result


if __name__ == "__main__":
  main()
