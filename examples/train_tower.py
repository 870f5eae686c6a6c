"""Synchronous data-parallel training with optax_dist.tower on simulated devices.

A small MLP learns a random teacher network. The global batch is split over 8
workers (simulated CPU devices); each worker computes gradients on its slice,
``tower`` averages them with one all-reduce, and every worker applies the same
Adam update. Each worker first initializes its own params (as separate hosts
would); ``broadcast_params`` makes them identical before training.

    python examples/train_tower.py --steps 300
"""

import argparse
import itertools
import os
import sys
import time

NUM_DEVICES = 8
# Simulated devices must be requested before JAX starts.
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={NUM_DEVICES}"]
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import optax  # noqa: E402

import optax_dist  # noqa: E402

AXIS = "workers"
# Silent rank broadcasting hides shape bugs (e.g. a state shaped like stacked params).
jax.config.update("jax_numpy_rank_promotion", "raise")


def init_mlp(key, sizes):
  params = []
  for fan_in, fan_out in itertools.pairwise(sizes):
    key, sub = jax.random.split(key)
    params.append(
      {"w": jax.random.normal(sub, (fan_in, fan_out)) / jnp.sqrt(fan_in), "b": jnp.zeros(fan_out)}
    )
  return params


def mlp(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"][None, :])
  return x @ params[-1]["w"] + params[-1]["b"][None, :]


def loss_fn(params, x, y):
  return jnp.mean((mlp(params, x) - y) ** 2)


def make_data(key, n, teacher):
  x = jax.random.normal(key, (n, teacher[0]["w"].shape[0]))
  return x, mlp(teacher, x)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument(
    "--batch-size", type=int, default=256, help="global batch, split over workers"
  )
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--reduction", choices=["mean", "sum"], default="mean")
  args = parser.parse_args(argv)

  n = jax.device_count()
  if n != NUM_DEVICES:
    sys.exit(
      f"expected {NUM_DEVICES} simulated devices, found {n}: was JAX initialized before this script?"
    )
  if args.batch_size % n:
    sys.exit(f"--batch-size {args.batch_size} must divide by the {n} workers")
  mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,))
  sizes = [16, 64, 64, 1]
  tx = optax_dist.tower(
    optax.adam(args.learning_rate), axis_name=AXIS, loss_reduction=args.reduction
  )

  def setup(worker_keys):
    # Each worker starts from its own random init, then takes worker 0's.
    params = optax_dist.broadcast_params(init_mlp(worker_keys[0], sizes), axis_name=AXIS)
    return jax.tree.map(lambda a: a[None], (params, tx.init(params)))

  def train_step(params, state, x, y):
    params, state = jax.tree.map(lambda a: a[0], (params, state))
    params, state, loss = optax_dist.minimize(loss_fn, tx, params, state, x, y)
    loss = jax.lax.pmean(loss, AXIS)
    return jax.tree.map(lambda a: a[None], (params, state)), loss

  per_worker = P(AXIS)
  setup = jax.jit(jax.shard_map(setup, mesh=mesh, in_specs=per_worker, out_specs=per_worker))
  train_step = jax.jit(
    jax.shard_map(train_step, mesh=mesh, in_specs=per_worker, out_specs=(per_worker, P()))
  )

  key = jax.random.key(0)
  teacher_key, test_key, init_key, data_key = jax.random.split(key, 4)
  teacher = init_mlp(teacher_key, sizes)
  x_test, y_test = make_data(test_key, 2048, teacher)
  params, state = setup(jax.random.split(init_key, n))
  first_loss = None
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    x, y = make_data(jax.random.fold_in(data_key, step), args.batch_size, teacher)
    # Wait for every step: with simulated CPU devices, collectives dispatched
    # without waiting can stall XLA's CPU rendezvous.
    (params, state), loss = jax.block_until_ready(train_step(params, state, x, y))
    first_loss = float(loss) if first_loss is None else first_loss
    if step == 1 or step % 50 == 0 or step == args.steps:
      print(f"step {step:4d}  train loss {float(loss):.5f}")
  elapsed = time.perf_counter() - start

  spread = max(float(jnp.max(jnp.abs(p - p[0:1]))) for p in jax.tree.leaves(params))
  worker0 = jax.tree.map(lambda p: p[0], params)
  test_loss = float(loss_fn(worker0, x_test, y_test))
  steps_done = int(optax_dist.global_step(state)[0])
  num_params = sum(p.size for p in jax.tree.leaves(worker0))
  print(f"{n} workers, {steps_done} steps in {elapsed:.1f} s, {num_params} params")
  print(f"test loss {test_loss:.5f} (first train loss {first_loss:.5f})")
  print(f"largest difference between workers' params: {spread:.1e}")
  return {"first_loss": first_loss, "test_loss": test_loss, "spread": spread, "steps": steps_done}


if __name__ == "__main__":
  main()
