"""Convergence per byte: test accuracy against steps and bytes communicated.

The digits classifier of ``examples/train_digits.py`` (its data, MLP and loss,
imported from it) trained by 8 workers with synchronous data parallelism
(``tower``) and with every periodic algorithm (``elastic_average``, ``agn``,
``model_average``, ``diloco``) at periods 1, 4, 16 and 64. Every worker takes
16 images of a global batch of 128 per step; the inner optimizer is Adam.

How it runs. The 8 workers are simulated with ``jax.vmap(axis_name=...)`` on
one device: the transformations run unchanged under vmap (a collective is then
a reduction over the mapped axis), so the numbers are those of 8 real workers.
The hyperparameter grid and the seeds are two more vmapped axes, so each
(algorithm, period) is one compiled program that trains every trial and seed
at once, a ``lax.scan`` over steps, evaluated every ``--eval-every`` steps.

Tuning, the same budget for every (algorithm, period): 9 trials, each with
``--seeds`` seeds. ``sync``, ``agn`` and ``model_average`` try 9 Adam learning
rates, log-spaced from 3e-4 to 3e-2; ``easgd`` tries 3 learning rates (1e-3,
3e-3, 1e-2) x 3 moving rates (0.9 / (p N), the default; 0.3 / N; 0.9 / N,
the EASGD paper's beta = 0.9); ``diloco`` tries the same 3 learning rates x 3
outer learning rates (0.3, 0.7 the default, 1.0) of its Nesterov outer
optimizer (momentum 0.9). The trial with the best mean validation accuracy
at the last step is chosen; the validation images are held out of the demo's
training split, and the test split (the demo's, 360 images) is used only to
report the chosen trial. Periodic algorithms are evaluated on their center,
the model a checkpoint exports (``optax_dist.center_params``); every
evaluation step is a multiple of 64, so every period has just synced.

DiLoCo also runs streamed (``fragments=4``: one fragment syncs every
``period / 4`` steps), quantized (``comm_dtype=jnp.int8`` with error
feedback) and delayed (``delay`` 1 and 2, ``blend`` 0 and 0.5) at periods 16
and 64, with DiLoCo's tuning grid.

Bytes. Each worker's bytes are the collectives of the compiled step under
``jax.shard_map`` on 8 devices, read with ``optax_dist.communication_report``:
the gradients (tower) on every step, the params-sized sync once per period;
the table gives what a worker sends on the wire (ring convention).
:func:`bytes_communicated` computes the buffer bytes of the float32 syncs from
the params' bytes and the period; the run checks that both agree.

    python benchmarks/convergence.py            # about 11 minutes on 2 cores
    python benchmarks/convergence.py --quick    # a smoke run: 1 seed, 128 steps
"""

import argparse
import json
import os
import pathlib
import sys
import time

NUM_DEVICES = 8
# Simulated devices for the shard_map step whose bytes are measured; they must
# be requested before JAX starts. Training itself runs on one device.
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={NUM_DEVICES}"]
).strip()

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import train_digits as demo  # noqa: E402

import optax_dist  # noqa: E402

AXIS = demo.AXIS
N = NUM_DEVICES
BASE = ("sync", "easgd", "agn", "model_average", "diloco")
# DiLoCo's streaming and quantized syncs, at the long periods they are for.
VARIANTS = {
  "diloco_streaming": {"fragments": 4},
  "diloco_int8": {"comm_dtype": jnp.int8, "error_feedback": True},
  # Delayed syncs (docs/sync_options.md): reduced `delay - 1` calls before the
  # scheduled one, applied on it, the workers blended into the center.
  "diloco_delay1": {"delay": 1},
  "diloco_delay2": {"delay": 2},
  "diloco_delay1_blend": {"delay": 1, "blend": 0.5},
  "diloco_delay2_blend": {"delay": 2, "blend": 0.5},
}
ALGORITHMS = BASE + tuple(VARIANTS)
PERIODIC = ALGORITHMS[1:]
PERIODS = (1, 4, 16, 64)
VARIANT_PERIODS = (16, 64)
BATCH = 128  # Global, 16 images per worker; the demo's default.
HIDDEN = 128  # The demo's default.
TEST_SIZE = 45 * N  # The demo's test split: 360 images.
VAL_SIZE = 45 * N  # Held out of the demo's training split, for tuning.
SPLIT_SEED = 0  # The demo's default split.
NUM_TRIALS = 9
WIDE_LRS = tuple(float(x) for x in np.geomspace(3e-4, 3e-2, NUM_TRIALS))
NARROW_LRS = (1e-3, 3e-3, 1e-2)
OUTER_LRS = (0.3, 0.7, 1.0)


def trials(algorithm, period):
  """The 9 hyperparameter settings tried for (algorithm, period)."""
  if algorithm == "easgd":
    rates = (0.9 / period / N, 0.3 / N, 0.9 / N)
    return [{"learning_rate": lr, "moving_rate": a} for lr in NARROW_LRS for a in rates]
  if algorithm.startswith("diloco"):
    return [{"learning_rate": lr, "outer_learning_rate": o} for lr in NARROW_LRS for o in OUTER_LRS]
  return [{"learning_rate": lr} for lr in WIDE_LRS]


def make_optimizer(algorithm, period, hp):
  """The algorithm around Adam; ``hp`` values may be traced (they are vmapped)."""
  inner = optax.adam(hp["learning_rate"])
  if algorithm == "sync":
    return optax_dist.tower(inner, axis_name=AXIS)
  if algorithm == "easgd":
    return optax_dist.elastic_average(
      inner, axis_name=AXIS, communication_period=period, moving_rate=hp["moving_rate"]
    )
  if algorithm == "agn":
    return optax_dist.agn(inner, axis_name=AXIS, communication_period=period)
  if algorithm == "model_average":
    return optax_dist.model_average(inner, axis_name=AXIS, interval_steps=period)
  if algorithm.startswith("diloco"):
    outer = optax.sgd(hp["outer_learning_rate"], momentum=0.9, nesterov=True)
    return optax_dist.diloco(
      inner, axis_name=AXIS, outer=outer, sync_period=period, **VARIANTS.get(algorithm, {})
    )
  raise ValueError(f"unknown algorithm {algorithm!r}; one of {ALGORITHMS}")


def worker_step(algorithm, period, hp, params, opt_state, batch):
  """One worker's training step; ``AXIS`` must be bound by the caller."""
  tx = make_optimizer(algorithm, period, hp)
  grads, _ = jax.grad(demo.loss_fn, has_aux=True)(params, batch)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def init_worker(algorithm, period, hp, params):
  return make_optimizer(algorithm, period, hp).init(params)


# --- bytes ---------------------------------------------------------------------------------


def params_bytes(params):
  """Bytes of one copy of the params."""
  return sum(int(np.prod(p.shape)) * jnp.dtype(p.dtype).itemsize for p in jax.tree.leaves(params))


def bytes_communicated(algorithm, period, steps, nbytes):
  """Bytes each worker sends in ``steps`` steps, for params of ``nbytes`` bytes.

  ``sync`` all-reduces the gradients (params-sized) on every step; a periodic
  algorithm (in its default ``"simultaneous"`` ordering) all-reduces one
  params-sized tree per sync, on steps ``period, 2 period, ...``, with the
  count of finite workers (4 bytes) in the same all-reduce. Sizes are the
  all-reduced buffers, as :func:`optax_dist.communication_report` counts
  them.
  """
  if algorithm == "sync":
    return nbytes * steps
  if algorithm in BASE:
    return (nbytes + 4) * (steps // period)
  raise ValueError(f"unknown algorithm {algorithm!r}; one of {ALGORITHMS}")


def periods_of(algorithm, periods):
  if algorithm == "sync":
    return [1]
  if algorithm in VARIANTS:
    return [p for p in periods if p in VARIANT_PERIODS]
  return list(periods)


def wire_bytes(report, period, steps):
  """Bytes one worker sends on the wire in ``steps`` steps (ring convention), from a report."""
  return report["every_step_wire_bytes"] * steps + report["sync_wire_bytes"] * (steps // period)


def shard_map_report(algorithm, period, params):
  """communication_report of ``worker_step`` under shard_map, one worker per device."""
  assert jax.device_count() >= N, jax.devices()
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:N])
  hp = trials(algorithm, period)[0]

  def body(p, s, batch):
    p, s, batch = jax.tree.map(lambda a: a[0], (p, s, batch))
    out = worker_step(algorithm, period, hp, p, s, batch)
    return jax.tree.map(lambda a: a[None], out)

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
  state = init_worker(algorithm, period, hp, params)
  stack = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (N, *jnp.shape(a))), tree)  # noqa: E731
  batch = (
    jnp.zeros((N, BATCH // N, params[0]["w"].shape[0]), jnp.float32),
    jnp.zeros((N, BATCH // N), jnp.int32),
  )
  return optax_dist.communication_report(step, stack(params), stack(state), batch)


# --- training ------------------------------------------------------------------------------


def load_data():
  """The demo's train/test split, with a validation split held out of its training part."""
  from sklearn.model_selection import train_test_split

  x_train, x_test, y_train, y_test = demo.load_digits(SPLIT_SEED, test_size=TEST_SIZE)
  x_train, x_val, y_train, y_val = train_test_split(
    x_train, y_train, test_size=VAL_SIZE, random_state=SPLIT_SEED, stratify=y_train
  )
  return {
    "train": (jnp.asarray(x_train), jnp.asarray(y_train)),
    "val": (jnp.asarray(x_val), jnp.asarray(y_val)),
    "test": (jnp.asarray(x_test), jnp.asarray(y_test)),
  }


def run(algorithm, period, seeds, steps, eval_every, data):
  """Trains every trial and seed; returns accuracies of shape (evals, trials, seeds)."""
  hps = trials(algorithm, period)
  hp = {k: jnp.asarray([t[k] for t in hps], jnp.float32) for k in hps[0]}
  x_train, y_train = data["train"]
  num_features = x_train.shape[1]
  sizes = [num_features, HIDDEN, HIDDEN, 10]

  # Axes: trials (hp) x seeds x workers. The same seed gives the same initial
  # params and the same batches to every trial and algorithm.
  def init(hp, key):
    params = demo.init_mlp(key, sizes)
    state = init_worker(algorithm, period, hp, params)
    stack = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (N, *jnp.shape(a))), t)  # noqa: E731
    return stack(params), stack(state)

  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
  init_all = jax.jit(jax.vmap(jax.vmap(init, in_axes=(None, 0)), in_axes=(0, None)))
  carry = init_all(hp, keys)

  def sample(key, t):
    idx = jax.random.choice(jax.random.fold_in(key, t), x_train.shape[0], (BATCH,), replace=False)
    return (
      x_train[idx].reshape(N, BATCH // N, num_features),
      y_train[idx].reshape(N, BATCH // N),
    )

  step_workers = jax.vmap(
    lambda hp, p, s, b: worker_step(algorithm, period, hp, p, s, b),
    in_axes=(None, 0, 0, 0),
    axis_name=AXIS,
  )
  step_seeds = jax.vmap(step_workers, in_axes=(None, 0, 0, 0))
  step_all = jax.vmap(step_seeds, in_axes=(0, 0, 0, None))

  @jax.jit
  def train_chunk(carry, hp, start):
    def body(carry, t):
      batches = jax.vmap(sample, in_axes=(0, None))(keys, t)
      return step_all(hp, *carry, batches), None

    carry, _ = jax.lax.scan(body, carry, start + jnp.arange(eval_every))
    return carry

  @jax.jit
  def evaluate(carry):
    params, state = carry
    model = params if algorithm == "sync" else optax_dist.center_params(state)
    model = jax.tree.map(lambda a: a[:, :, 0], model)  # Worker 0's copy.

    def accuracy(split):
      x, y = data[split]
      correct = lambda m: jnp.mean(jnp.argmax(demo.mlp(m, x), axis=-1) == y)  # noqa: E731
      return jax.vmap(jax.vmap(correct))(model)

    return accuracy("val"), accuracy("test")

  val, test = [], []
  for start in range(0, steps, eval_every):
    carry = jax.block_until_ready(train_chunk(carry, hp, start))
    v, t = evaluate(carry)
    val.append(np.asarray(v))
    test.append(np.asarray(t))
  return np.stack(val), np.stack(test)


# --- results -------------------------------------------------------------------------------


def summarize(results, args):
  """Markdown table: chosen trial, final test accuracy, bytes, per (algorithm, period)."""
  periods = results["config"]["periods"]
  sync = results["runs"]["sync"]["1"]
  sync_mean = sync["test_mean"][-1]
  lines = [
    f"Final test accuracy after {args.steps} steps (mean ± sample standard deviation over {len(args.seeds)} seeds, "
    f"{TEST_SIZE} test images), 8 workers, global batch {BATCH}. *Δ vs sync* is the "
    "difference to sync in accuracy points; *MB sent per worker* is what one worker sends "
    "on the wire over the run (a ring all-reduce of B bytes sends 2 (N - 1) / N B, an "
    "all-to-all or all-gather that delivers B bytes (N - 1) / N B; read from the compiled "
    "step), and *bytes vs sync* its ratio to sync's. *Chosen hyperparameters* is the trial "
    "with the best validation accuracy. `diloco_streaming` syncs one of 4 fragments every "
    "period / 4 steps; `diloco_int8` sends its pseudo-gradient through the int8 ring, with "
    "error feedback.",
    "",
    "| algorithm | period | test accuracy (%) | Δ vs sync | val accuracy (%) "
    "| MB sent per worker | bytes vs sync | chosen hyperparameters |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
  ]
  for algorithm in ALGORITHMS:
    for period in periods_of(algorithm, periods):
      r = results["runs"][algorithm][str(period)]
      mean, std = r["test_mean"][-1], r["test_std"][-1]
      delta = 100 * (mean - sync_mean)
      ratio = sync["wire_bytes"][-1] / r["wire_bytes"][-1]
      chosen = ", ".join(f"{k}={v:.3g}" for k, v in r["chosen_hyperparameters"].items())
      lines.append(
        f"| {algorithm} | {'every step' if algorithm == 'sync' else period} "
        f"| {100 * mean:.2f} ± {100 * std:.2f} | {delta:+.2f} | {100 * r['val_mean'][-1]:.2f} "
        f"| {r['wire_bytes'][-1] / 1e6:.2f} | 1/{ratio:.0f} | {chosen} |"
      )
  lines += ["", "Target at p = 16: within 1 accuracy point of sync with 16x fewer bytes.", ""]
  lines += ["| algorithm (p = 16) | Δ vs sync (points) | bytes vs sync | target met |"]
  lines += ["| --- | ---: | ---: | --- |"]
  for algorithm in BASE[1:] if 16 in periods else ():
    r = results["runs"][algorithm]["16"]
    delta = 100 * (r["test_mean"][-1] - sync_mean)
    ratio = sync["wire_bytes"][-1] / r["wire_bytes"][-1]
    met = delta >= -1.0 and ratio >= 16
    target = "(not a target)" if algorithm == "agn" else ("yes" if met else "no")
    lines.append(f"| {algorithm} | {delta:+.2f} | 1/{ratio:.0f} | {target} |")
  lines += [
    "",
    "Streaming and int8 against DiLoCo in float32 at the same period (target: within 0.5 "
    "accuracy point).",
    "",
    "| variant | period | Δ vs diloco (points) | bytes vs diloco | target met |",
    "| --- | ---: | ---: | ---: | --- |",
  ]
  for algorithm in VARIANTS:
    for period in periods_of(algorithm, periods):
      r = results["runs"][algorithm][str(period)]
      base = results["runs"]["diloco"][str(period)]
      delta = 100 * (r["test_mean"][-1] - base["test_mean"][-1])
      ratio = r["wire_bytes"][-1] / base["wire_bytes"][-1]
      met = "yes" if delta >= -0.5 else "no"
      lines.append(f"| {algorithm} | {period} | {delta:+.2f} | {ratio:.3f} | {met} |")
  return "\n".join(lines) + "\n"


def plot(results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colors = {
    "sync": "black",
    "easgd": "tab:blue",
    "agn": "tab:orange",
    "model_average": "tab:green",
    "diloco": "tab:red",
    "diloco_streaming": "tab:purple",
    "diloco_int8": "tab:brown",
  }
  styles = {1: ":", 4: "-.", 16: "-", 64: "--"}
  periods = results["config"]["periods"]
  fig, (ax_steps, ax_bytes, ax_period) = plt.subplots(1, 3, figsize=(16, 4.6))
  sync = results["runs"]["sync"]["1"]
  for algorithm in ALGORITHMS:
    for period in periods_of(algorithm, periods):
      r = results["runs"][algorithm][str(period)]
      mean = 100 * np.asarray(r["test_mean"])
      label = "sync" if algorithm == "sync" else f"{algorithm} p={period}"
      style = dict(color=colors[algorithm], ls="-" if algorithm == "sync" else styles[period])
      if algorithm == "sync" or period == 16:
        ax_steps.plot(r["steps"], mean, label=label, **style)
      ax_bytes.plot(np.asarray(r["wire_bytes"]) / 1e6, mean, label=label, lw=1, **style)
  # Down to a little below the worst final accuracy; early evaluations may be cut off.
  low = min(100 * r["test_mean"][-1] for runs in results["runs"].values() for r in runs.values())
  ylim = (max(0.0, np.floor(low) - 3), 100)
  ax_steps.set(xlabel="step", ylabel="test accuracy (%)", ylim=ylim, title="p = 16")
  ax_bytes.set(
    xlabel="MB sent per worker",
    ylabel="test accuracy (%)",
    xscale="log",
    ylim=ylim,
    title="accuracy vs bytes (all periods)",
  )
  s_mean, s_std = 100 * sync["test_mean"][-1], 100 * sync["test_std"][-1]
  ax_period.axhspan(s_mean - s_std, s_mean + s_std, color="black", alpha=0.1)
  ax_period.axhline(s_mean, color="black", label="sync")
  ax_period.axhline(s_mean - 1, color="black", ls=":", lw=0.8, label="sync - 1 point")
  for algorithm in PERIODIC:
    shown = periods_of(algorithm, periods)
    rs = [results["runs"][algorithm][str(p)] for p in shown]
    ax_period.errorbar(
      shown,
      [100 * r["test_mean"][-1] for r in rs],
      yerr=[100 * r["test_std"][-1] for r in rs],
      color=colors[algorithm],
      marker="o",
      capsize=3,
      label=algorithm,
    )
  ax_period.set(
    xlabel="period p (steps between syncs)",
    ylabel="final test accuracy (%)",
    xscale="log",
    title="final accuracy, mean ± std",
  )
  ax_period.set_xticks(periods, [str(p) for p in periods])
  for ax in (ax_steps, ax_bytes, ax_period):
    ax.grid(alpha=0.3)
  ax_steps.legend(fontsize=8)
  proxies = [
    matplotlib.lines.Line2D([], [], color="gray", ls=styles[p], label=f"p = {p}") for p in periods
  ]
  ax_bytes.legend(handles=proxies, fontsize=8, title="colors as left", title_fontsize=8)
  ax_period.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=512)
  parser.add_argument("--eval-every", type=int, default=64, help="a multiple of every period")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--quick", action="store_true", help="1 seed, 128 steps, periods 1 and 16")
  parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
  parser.add_argument(
    "--replot", action="store_true", help="redraw the table and plot from the saved JSON"
  )
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if args.replot:
    results = json.loads((out / "convergence.json").read_text())
    args.steps, args.seeds = results["config"]["steps"], results["config"]["seeds"]
    (out / "convergence.md").write_text(summarize(results, args))
    plot(results, out / "convergence.png")
    print(f"table and plot redrawn in {out}")
    return
  periods = PERIODS
  if args.quick:
    args.steps, args.seeds, periods = 128, [0], (1, 16)
  if args.steps % args.eval_every or any(args.eval_every % p for p in periods):
    sys.exit("--steps must be a multiple of --eval-every, itself a multiple of every period")

  data = load_data()
  sizes = [data["train"][0].shape[1], HIDDEN, HIDDEN, 10]
  params = demo.init_mlp(jax.random.key(0), sizes)
  nbytes = params_bytes(params)
  print(
    f"digits: {len(data['train'][1])} train / {len(data['val'][1])} val / "
    f"{len(data['test'][1])} test images; MLP {sizes}, {nbytes // 4} params ({nbytes} B); "
    f"{N} workers x {BATCH // N} images; {args.steps} steps; seeds {args.seeds}",
    flush=True,
  )

  # Bytes: the compiled shard_map step, checked against the formula.
  reports = {}
  for algorithm in args.algorithms:
    period = 1 if algorithm == "sync" else 16
    r = shard_map_report(algorithm, period, params)
    measured = r.every_step_bytes * period + r.sync_bytes
    # The formula covers the float32 syncs; the variants are read from the report.
    expected = (
      bytes_communicated(algorithm, period, period, nbytes) if algorithm in BASE else measured
    )
    status = "agrees" if measured == expected else "DISAGREES"
    print(
      f"  bytes {algorithm:>13}: every step {r.every_step_bytes} B, per sync {r.sync_bytes} B "
      f"({len(r.collectives)} collectives); over {period} steps {measured} B, formula "
      f"{expected} B: {status}",
      flush=True,
    )
    if measured != expected:
      sys.exit("communication_report and bytes_communicated disagree")
    reports[algorithm] = {
      "every_step_bytes": r.every_step_bytes,
      "sync_bytes": r.sync_bytes,
      "every_step_wire_bytes": r.every_step_wire_bytes,
      "sync_wire_bytes": r.sync_wire_bytes,
      "peak_sync_wire_bytes": r.peak_sync_wire_bytes,
      "collectives": [f"{c.kind} {c.shape}" for c in r.collectives],
    }

  results = {
    "machine": machine(),
    "config": {
      "steps": args.steps,
      "eval_every": args.eval_every,
      "seeds": args.seeds,
      "periods": list(periods),
      "workers": N,
      "global_batch": BATCH,
      "mlp": sizes,
      "params_bytes": nbytes,
      "train/val/test": [len(data[s][1]) for s in ("train", "val", "test")],
      "inner": "adam",
    },
    "communication_report": reports,
    "runs": {},
  }
  start_all = time.perf_counter()
  for algorithm in args.algorithms:
    results["runs"][algorithm] = {}
    for period in periods_of(algorithm, periods):
      start = time.perf_counter()
      val, test = run(algorithm, period, args.seeds, args.steps, args.eval_every, data)
      hps = trials(algorithm, period)
      best = int(np.argmax(val[-1].mean(axis=-1)))  # Mean over seeds at the last step.
      evals = list(range(args.eval_every, args.steps + 1, args.eval_every))
      r = results["runs"][algorithm][str(period)] = {
        "trials": hps,
        "chosen": best,
        "chosen_hyperparameters": hps[best],
        "steps": evals,
        "bytes": [
          reports[algorithm]["every_step_bytes"] * t
          + reports[algorithm]["sync_bytes"] * (t // period)
          for t in evals
        ],
        "wire_bytes": [wire_bytes(reports[algorithm], period, t) for t in evals],
        "val_mean": val[:, best].mean(-1).tolist(),
        "test_mean": test[:, best].mean(-1).tolist(),
        "test_std": test[:, best].std(-1, ddof=1 if len(args.seeds) > 1 else 0).tolist(),
        "test_per_seed": test[:, best].T.tolist(),  # [seed][evaluation]
        "final_val_mean_per_trial": val[-1].mean(-1).tolist(),
        "final_test_mean_per_trial": test[-1].mean(-1).tolist(),
        "seconds": time.perf_counter() - start,
      }
      chosen = ", ".join(f"{k}={v:.3g}" for k, v in hps[best].items())
      print(
        f"{algorithm:>13} p={period:<3} test {100 * r['test_mean'][-1]:6.2f} ± "
        f"{100 * r['test_std'][-1]:4.2f} (val {100 * r['val_mean'][-1]:6.2f}; {chosen}) "
        f"in {time.perf_counter() - start:5.1f} s, {time.perf_counter() - start_all:6.1f} s "
        "so far",
        flush=True,
      )

  out.mkdir(parents=True, exist_ok=True)
  suffix = "_quick" if args.quick else ""
  (out / f"convergence{suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
  if set(args.algorithms) == set(ALGORITHMS):
    table = summarize(results, args)
    (out / f"convergence{suffix}.md").write_text(table)
    plot(results, out / f"convergence{suffix}.png")
    print(table)
  print(f"results in {out}")


def machine():
  import platform

  cpu = "unknown"
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "python": platform.python_version(),
  }


if __name__ == "__main__":
  main()
