"""What elastic_average costs per step, next to plain Adam, on simulated devices.

Side by side in one run, median of interleaved repetitions, 8 simulated CPU
devices under ``jax.shard_map``, an MLP of about 1M parameters, per-worker
params and state donated as in a real training loop. Each timed step is the
optimizer update alone (gradients given), the strictest setting for overhead:

* non-sync elastic_average(adam) step / plain adam step (target <= 1.03),
* sync elastic_average(adam) step / plain pmean(grads) + adam step.

The compiled HLO of each step is read for evidence: collectives (and their
bytes) and params-sized ``copy`` instructions outside loop bodies.

    python benchmarks/elastic_overhead.py --repeats 7
"""

import argparse
import itertools
import os
import statistics
import time

NUM_DEVICES = 8
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


def make_params(n):
  key = jax.random.key(0)
  params = {}
  for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
    key, sub = jax.random.split(key)
    params[f"w{i}"] = jnp.broadcast_to(jax.random.normal(sub, (a, b)) / a**0.5, (n, a, b))
    params[f"b{i}"] = jnp.zeros((n, b))
  return params


def build(tx, mesh, reduce_grads=False):
  def step(p, s, g):
    p, s, g = jax.tree.map(lambda a: a[0], (p, s, g))
    if reduce_grads:
      g = jax.lax.pmean(g, AXIS)
    u, s = tx.update(g, s, p)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, u), s))

  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)), donate_argnums=(0, 1)
  )


def hlo_evidence(fn, params, state, grads, min_copy_bytes):
  text = fn.lower(params, state, grads).compile().as_text()
  entry = text[text.index("\nENTRY") :]
  big = [op.shape for op in hlo.copies_of_at_least(entry, min_copy_bytes)]
  comms = [f"{op.kind} {op.nbytes:,} B" for op in hlo.collectives(text)]
  return big, comms


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per round and variant")
  args = parser.parse_args(argv)
  n = jax.device_count()
  mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,))
  adam = optax.adam(1e-3)
  variants = {
    "adam (local)": (adam, False),
    "easgd non-sync": (
      optax_dist.elastic_average(adam, axis_name=AXIS, communication_period=10**9),
      False,
    ),
    "pmean + adam": (adam, True),
    "easgd sync": (optax_dist.elastic_average(adam, axis_name=AXIS, communication_period=1), False),
  }
  grads = jax.tree.map(lambda a: a * 1e-3 + 1e-4, make_params(n))
  num_params = sum(a[0].size for a in jax.tree.leaves(grads))
  smallest_leaf = min(a[0].size for a in jax.tree.leaves(grads) if a.ndim > 2) * 4
  runs, times = {}, {name: [] for name in variants}
  print(
    f"{n} simulated devices, {num_params:,} parameters per worker, backend {jax.default_backend()}"
  )
  for name, (tx, reduce_grads) in variants.items():
    fn = build(tx, mesh, reduce_grads)
    params = make_params(n)
    state = jax.vmap(tx.init)(params)
    big, comms = hlo_evidence(fn, params, state, grads, smallest_leaf)
    print(
      f"  HLO {name:15s}: params-sized copies in ENTRY {big or 'none'}; collectives {comms or 'none'}"
    )
    params = make_params(n)
    state = jax.vmap(tx.init)(params)
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
  print(f"\nmedian step time over {args.repeats} interleaved rounds of {args.steps} steps:")
  for name, t in med.items():
    print(f"  {name:15s} {t * 1e3:8.3f} ms")
  ratio_local = med["easgd non-sync"] / med["adam (local)"]
  ratio_sync = med["easgd sync"] / med["pmean + adam"]
  print(f"\nnon-sync easgd / adam      = {ratio_local:.3f}  (target <= 1.03)")
  print(f"sync easgd / pmean + adam  = {ratio_sync:.3f}")
  return {"non_sync_ratio": ratio_local, "sync_ratio": ratio_sync}


if __name__ == "__main__":
  main()
