"""Where a sync's all-reduce sits in a compiled train step, with and without a delay.

Builds one DiLoCo train step (forward, backward, update) of an MLP under
``jax.shard_map`` over 2 CPU devices, with the static flag of the call that
syncs (``delay=0``) or reduces (``delay=1``), and prints for each:

* what :func:`optax_dist.overlap_report` reads from the jaxpr: the bytes of
  the collectives that do and do not depend on the batch;
* the compiled entry computation's schedule: how many matrix-multiply kernels
  of the forward and backward passes come before and after the all-reduce,
  and whether XLA made it an asynchronous start/done pair.

Run: ``python benchmarks/overlap.py`` (a few seconds; prints a Markdown table).
"""

import itertools
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import optax_dist

N = 2
AXIS = "w"
WIDTHS = (256, 512, 512, 10)
_OP = re.compile(r"^\s*(?:ROOT )?%(\S+) = .+? ([a-z-]+)\(")


def loss(params, batch):
  x, y = batch
  for w in params[:-1]:
    x = jnp.tanh(x @ w)
  return jnp.mean((x @ params[-1] - y) ** 2)


def step_for(delay):
  tx = optax_dist.diloco(optax.adamw(1e-3), axis_name=AXIS, sync_period=8, delay=delay)

  def step(params, state, batch):
    params, state, batch = jax.tree.map(lambda a: a[0], (params, state, batch))
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params, sync=True)
    return jax.tree.map(lambda a: a[None], (optax.apply_updates(params, updates), state))

  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:N])
  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
  params = [np.zeros((N, a, b), np.float32) for a, b in itertools.pairwise(WIDTHS)]
  state = jax.eval_shape(jax.vmap(tx.init), params)
  batch = (np.zeros((N, 64, WIDTHS[0]), np.float32), np.zeros((N, 64, WIDTHS[-1]), np.float32))
  return fn, (params, state, batch)


def schedule(hlo):
  """Kinds of the entry computation's instructions, in the order XLA runs them."""
  entry = hlo[hlo.index("\nENTRY") :]
  kinds = []
  for line in entry.splitlines()[1:]:
    m = _OP.match(line)
    if m:
      name, kind = m.groups()
      # Matrix multiplies: dots, or the CPU backend's fused matmul kernels.
      matmul = kind == "dot" or (kind == "fusion" and ("ynn" in name or "dot" in name))
      kinds.append("matmul" if matmul else kind)
  return kinds


def main():
  print("| delay | independent bytes | dependent bytes | matmuls before / after the all-reduce |")
  print("| --- | --- | --- | --- |")
  for delay in (0, 1):
    fn, args = step_for(delay)
    report = optax_dist.overlap_report(fn, *args)
    hlo = fn.lower(*args).compile().as_text()
    kinds = schedule(hlo)
    where = [i for i, k in enumerate(kinds) if k.startswith("all-reduce")]
    before = kinds[: where[0]].count("matmul") if where else None
    after = kinds[where[-1] + 1 :].count("matmul") if where else None
    asynchronous = "all-reduce-start" in hlo
    print(
      f"| {delay} | {report.independent_bytes} | {report.dependent_bytes} | "
      f"{before} / {after}{' (async start/done)' if asynchronous else ''} |"
    )


if __name__ == "__main__":
  main()
