"""Data-parallel training of a digit classifier on 8 simulated CPU devices.

An MLP learns scikit-learn's bundled 8x8 handwritten digits (1797 images, no
download). The global batch is split over 8 workers by
``optax_dist.data_parallel_step``; the algorithm decides how they talk:

* ``sync``: ``tower`` averages the gradients every step (one all-reduce of the
  gradients per step);
* ``easgd``: ``elastic_average``, an elastic pull toward a center every
  ``--period`` steps;
* ``agn``: accumulated gradient normalization, a commit to the center every
  ``--period`` steps;
* ``model_average``: local SGD, the params averaged every ``--period`` steps;
* ``diloco``: DiLoCo, an outer Nesterov step on the averaged change every
  ``--period`` steps.

By default it trains ``sync`` and ``diloco`` side by side from the same
initial params on the same batches; ``--algorithm`` names the one or more to
train. For each it prints the final and the best test accuracy of the model a
checkpoint would export (the center, for the periodic algorithms: DiLoCo is
evaluated on its center, not on a worker's params) and the bytes each worker
sent, read from the compiled step's collectives
(``optax_dist.communication_report``), and it saves one figure: the test
accuracy against the steps and against the bytes sent per worker, titled with
the algorithms it compares.

With ``--hierarchical`` the 8 devices stand for 2 hosts of 4: ``tower``
averages the gradients within a host every step, and the periodic algorithm
syncs the 2 hosts every ``--period`` steps
(``elastic_average(tower(adam, axis_name="local"), axis_name="hosts")``);
``sync`` averages the gradients over all 8 devices every step.

    python examples/train_digits.py
    python examples/train_digits.py --algorithm sync easgd model_average --period 8
    python examples/train_digits.py --algorithm easgd --period 8 --hierarchical
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
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optax_dist  # noqa: E402

AXIS = "workers"
ALGORITHMS = ("sync", "easgd", "agn", "model_average", "diloco")
# Silent rank broadcasting hides shape bugs: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


def make_optimizer(algorithm, learning_rate, period, hierarchical=False):
  """The inner optimizer is Adam; the algorithm wraps it."""
  inner = optax.adam(learning_rate)
  axis = AXIS
  if hierarchical:
    # Gradients averaged within a host every step; the algorithm syncs the hosts.
    inner, axis = optax_dist.tower(inner, axis_name="local"), "hosts"
  if algorithm == "sync":
    if hierarchical:
      # The gradients averaged over all devices (both axes) every step.
      return optax_dist.tower(optax.adam(learning_rate), axis_name=("hosts", "local"))
    return optax_dist.tower(inner, axis_name=axis)
  if algorithm == "easgd":
    return optax_dist.elastic_average(inner, axis_name=axis, communication_period=period)
  if algorithm == "agn":
    return optax_dist.agn(inner, axis_name=axis, communication_period=period)
  if algorithm == "model_average":
    return optax_dist.model_average(inner, axis_name=axis, interval_steps=period)
  if algorithm == "diloco":
    return optax_dist.diloco(inner, axis_name=axis, sync_period=period)
  raise ValueError(f"unknown algorithm {algorithm!r}; one of {ALGORITHMS}")


def load_digits(seed, test_size):
  from sklearn.datasets import load_digits as sklearn_digits
  from sklearn.model_selection import train_test_split

  x, y = sklearn_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)  # Pixels are 0..16.
  y = y.astype(np.int32)
  return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)


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
    x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
  return x @ params[-1]["w"] + params[-1]["b"][None, :]


def loss_fn(params, batch):
  """Mean cross-entropy of a worker's slice; the accuracy as (correct, count)."""
  x, labels = batch
  logits = mlp(params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
  return loss, {"metrics": {"accuracy": (correct, labels.shape[0])}}


def cumulative_bytes(flags, every_step_bytes, sync_bytes):
  """Bytes one worker has sent after each call, from the calls' sync flags.

  Every call sends ``every_step_bytes``; a call whose flag is ``True`` (a
  sync, see ``optax_dist.sync_schedule``) also sends ``sync_bytes``.
  """
  return np.cumsum([every_step_bytes + (sync_bytes if flag is True else 0) for flag in flags])


def plot(path, runs, title, period):
  """Test accuracy against steps and against bytes sent per worker, one curve per run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_steps, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for name, run in runs.items():
    history = run["history"]
    label = name if name == "sync" else f"{name}, period {period} (its center)"
    ax_steps.plot(history["eval_step"], history["test_accuracy"], marker="o", ms=3, label=label)
    megabytes = np.asarray(history["bytes"]) / 1e6
    ax_bytes.plot(megabytes, history["test_accuracy"], marker="o", ms=3, label=label)
  ax_steps.set(xlabel="step", ylabel="test accuracy", title=title)
  ax_bytes.set(xlabel="MB sent per worker", xscale="log", title="test accuracy per byte sent")
  for ax in (ax_steps, ax_bytes):
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def train(algorithm, args, mesh, axes, data):
  """Trains one algorithm; returns its accuracy curve, the bytes it sent and its timing."""
  from tqdm import tqdm

  x_train, x_test, y_train, y_test = data
  tx = make_optimizer(algorithm, args.learning_rate, args.period, args.hierarchical)
  # Synchronous training keeps one replicated copy of the params; the
  # periodic algorithms keep one per worker.
  layout = "replicated" if algorithm == "sync" else "per_worker"
  step = optax_dist.data_parallel_step(
    loss_fn, tx, mesh=mesh, axis_name=axes, has_aux=True, params_layout=layout
  )
  evaluate = optax_dist.data_parallel_eval_step(
    loss_fn, mesh=mesh, axis_name=axes, has_aux=True, params_layout=layout
  )

  # Every algorithm starts from the same params and sees the same batches.
  key = jax.random.key(args.seed)
  params = init_mlp(key, [x_train.shape[1], args.hidden, args.hidden, 10])
  opt_state = tx.init(params)  # Local: no communication.
  if layout == "per_worker":
    flags = [optax_dist.sync_schedule(opt_state)(count) for count in range(args.steps)]
    # Every worker starts from the same params.
    params, opt_state = optax_dist.per_worker((params, opt_state), mesh=mesh, axis_name=axes)
  else:
    flags = [False] * args.steps

  rng = np.random.default_rng(args.seed)

  def sample():
    idx = rng.choice(len(x_train), size=args.batch_size, replace=False)
    return x_train[idx], y_train[idx]

  # Bytes of the compiled step's collectives, per worker: those that run on
  # every step, and those of the sync branch (a loop of zero or one trip).
  example = (x_train[: args.batch_size], y_train[: args.batch_size])
  report = optax_dist.communication_report(step, params, opt_state, example)
  # What one worker sends on the wire (ring convention: an all-reduce over N
  # workers sends 2 (N - 1) / N of its bytes).
  every_step_bytes, per_sync_bytes = report.every_step_wire_bytes, report.sync_wire_bytes
  sent = cumulative_bytes(flags, every_step_bytes, per_sync_bytes)
  history = {"step": [], "loss": [], "eval_step": [], "test_accuracy": [], "bytes": []}
  start = time.perf_counter()
  bar = tqdm(range(1, args.steps + 1), desc=algorithm, disable=args.no_progress)
  for t in bar:
    # Wait for every step: with simulated CPU devices, collectives dispatched
    # without waiting can stall XLA's CPU rendezvous.
    params, opt_state, metrics = jax.block_until_ready(step(params, opt_state, sample()))
    history["step"].append(t)
    history["loss"].append(float(metrics["loss"]))
    if t % args.eval_every == 0 or t == args.steps:
      accuracy = float(evaluate(params, opt_state, (x_test, y_test))["accuracy"])
      history["eval_step"].append(t)
      history["test_accuracy"].append(accuracy)
      history["bytes"].append(int(sent[t - 1]))
      bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", test_acc=f"{accuracy:.3f}")
  bar.close()
  elapsed = time.perf_counter() - start

  # The number of syncs (of updates for sync), the same on every worker.
  syncs = int(jnp.ravel(optax_dist.global_step(opt_state))[0])
  one_copy = jax.tree.leaves(params)
  if layout == "per_worker":
    one_copy = [p[0] for p in one_copy]
  return {
    "algorithm": algorithm,
    "test_accuracy": history["test_accuracy"][-1],
    "first_accuracy": history["test_accuracy"][0],
    # The best evaluation and its step: a periodic run may peak before the end.
    "best_accuracy": max(history["test_accuracy"]),
    "best_step": history["eval_step"][int(np.argmax(history["test_accuracy"]))],
    "bytes": int(sent[-1]),
    "every_step_bytes": every_step_bytes,
    "per_sync_bytes": per_sync_bytes,
    "syncs": syncs,
    "num_params": sum(p.size for p in one_copy),
    "params_bytes": sum(p.nbytes for p in one_copy),
    "seconds": elapsed,
    "history": history,
  }


def report_run(run, args, n, num_test):
  """Prints what one algorithm reached and what its workers sent."""
  algorithm, syncs = run["algorithm"], run["syncs"]
  every_step_bytes, per_sync_bytes = run["every_step_bytes"], run["per_sync_bytes"]
  # A periodic algorithm is evaluated on its center, the model a checkpoint exports.
  evaluated = "params" if algorithm == "sync" else "center"
  print(
    f"{algorithm}: {n} workers{' (2 hosts x 4 devices)' if args.hierarchical else ''}, "
    f"{args.steps} steps in {run['seconds']:.1f} s, {run['num_params']} params"
  )
  print(
    f"test accuracy ({evaluated}): {run['test_accuracy']:.4f} on {num_test} images at the end, "
    f"best {run['best_accuracy']:.4f} at step {run['best_step']}"
  )
  if args.hierarchical and per_sync_bytes:
    # Every step: the gradients within each host (and the metrics); per sync:
    # the params across the 2 hosts, the only traffic on the slow network
    # besides the metrics.
    detail = (
      f"{every_step_bytes:.0f} B sent per step within its host: gradients and metrics; "
      f"{per_sync_bytes:.0f} B per sync across hosts x {syncs} syncs"
    )
  elif per_sync_bytes:
    detail = f"{per_sync_bytes:.0f} B sent per sync x {syncs} syncs, {every_step_bytes:.0f} B of metrics per step"
  else:
    detail = f"{every_step_bytes:.0f} B sent per step: gradients and metrics"
  print(f"communicated per worker: {run['bytes'] / 1e6:.2f} MB ({detail})")
  # Savings in wire bytes, the unit of the summary: what synchronous training
  # would send, all-reducing the gradients every step (with the same metrics).
  if args.hierarchical and per_sync_bytes:
    # Across 2 hosts a ring all-reduce sends the whole buffer once (2 (2 - 1) / 2).
    saving = run["params_bytes"] * args.steps / (per_sync_bytes * max(syncs, 1))
    print(f"  {saving:.1f}x fewer bytes across hosts than all-reducing the gradients every step")
  elif per_sync_bytes:
    ring = 2 * (n - 1) / n
    every_step_sync = ring * run["params_bytes"] + every_step_bytes
    saving = every_step_sync * args.steps / run["bytes"]
    print(f"  {saving:.1f}x fewer bytes than all-reducing the gradients every step")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--algorithm",
    nargs="+",
    choices=ALGORITHMS,
    default=["sync", "diloco"],
    help="one or more algorithms to train side by side",
  )
  parser.add_argument("--period", type=int, default=16, help="steps between syncs (periodic)")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch-size", type=int, default=128, help="global, split over workers")
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval-every", type=int, default=25)
  parser.add_argument("--plot", default="train_digits.png", help="where to save the figure")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  parser.add_argument(
    "--hierarchical",
    action="store_true",
    help="2 hosts x 4 devices: tower within a host, the periodic algorithm across hosts "
    "(sync averages over all devices every step)",
  )
  args = parser.parse_args(argv)
  algorithms = list(dict.fromkeys(args.algorithm))  # In order, each once.

  n = jax.device_count()
  if n != NUM_DEVICES:
    sys.exit(
      f"expected {NUM_DEVICES} simulated devices, found {n}: was JAX initialized before this script?"
    )
  if args.batch_size % n:
    sys.exit(f"--batch-size {args.batch_size} must divide by the {n} workers")

  data = load_digits(args.seed, test_size=45 * n)
  if args.hierarchical:
    # The batch and the per-device params are split over both axes.
    axes = ("hosts", "local")
    mesh = jax.make_mesh((2, n // 2), axes, axis_types=(AxisType.Auto,) * 2)
  else:
    axes = AXIS
    mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,))

  runs = {}
  for algorithm in algorithms:
    runs[algorithm] = train(algorithm, args, mesh, axes, data)
  for run in runs.values():
    report_run(run, args, n, num_test=len(data[3]))
  if len(runs) > 1:
    first = algorithms[0]
    print(f"summary: test accuracy, final and best, and bytes sent per worker (vs {first});")
    print("periodic algorithms are evaluated on their center")
    for name, run in runs.items():
      ratio = runs[first]["bytes"] / run["bytes"]
      versus = f"{ratio:.1f}x fewer" if ratio >= 1 else f"{1 / ratio:.1f}x more"
      versus = f", {versus}" if name != first else ""
      best = f"best {run['best_accuracy']:.4f} (step {run['best_step']})"
      print(
        f"  {name:<14} {run['test_accuracy']:.4f} final, {best:<20} "
        f"{run['bytes'] / 1e6:9.2f} MB{versus}"
      )
  compared = " vs ".join(
    name if name == "sync" else f"{name} (period {args.period})" for name in runs
  )
  where = " (2 hosts x 4 devices)" if args.hierarchical else ""
  title = f"{compared}, {n} workers{where}"
  plot(args.plot, runs, title, args.period)
  print(f"plot saved to {args.plot}")
  return runs


if __name__ == "__main__":
  main()
