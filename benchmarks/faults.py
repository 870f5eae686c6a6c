"""Fault injection: DiLoCo on digits goes on through bad workers and a crash.

The digits classifier of ``examples/train_digits.py`` (its data, MLP and loss)
trained by 8 workers (8 simulated CPU devices, ``data_parallel_step`` under
``jax.shard_map``) with ``diloco(adam)`` at H = 16, Adam learning rate 0.01
and Nesterov outer SGD at 0.3 (the tuned choice of
``benchmarks/convergence.py``), over 1,000 steps of a global batch of 128.
Three runs see the same batches:

* ``clean``: no fault;
* ``faults``: no guard (``data_parallel_step`` restarts a poisoned worker on
  the center at sync calls, as it always does), and
  - at 1% of the steps (10 steps, drawn at random), a random worker's
    gradient is NaN or Inf (its loss is multiplied by NaN or Inf);
  - one worker's batch is scaled by 1e6 for 10 steps in a row (finite, but
    huge gradients);
  - at step 530 (in the middle of a period) the training process sends
    itself SIGKILL; a new process restores the last orbax checkpoint (step
    500) and goes on to step 1,000;
* ``faults_guarded``: the same faults, the optimizer wrapped in
  ``apply_if_all_finite``.

Reported: the final test accuracy of the center (the model a checkpoint
exports) against the clean run, the syncs skipped (no finite worker), each
worker's dropped syncs, the steps the guard skipped, and that no checkpoint
and no center (checked after every step) ever held a non-finite value.

``--spike`` runs the spike cases instead: 320 steps (20 syncs) of the same
training, with Adam inside and with plain SGD inside (learning rate 0.1), each
clean and with one worker's gradient multiplied on one call (step 105, in the
middle of the period that ends at the sync of call 112) by 1e20 with Adam (its
second moment overflows to infinity) or 1e5 with SGD (its params stay finite,
far from the others). Reported: the
center's final test loss and accuracy against the clean run's, each worker's
dropped syncs, and each worker's drift from the center at the end of every
period (its L2 distance): a worker that trains drifts as the others do, a
stranded one stays on the center.

    python benchmarks/faults.py                 # about 8 minutes on 2 busy cores
    python benchmarks/faults.py --seeds 0 1 2   # more seeds
    python benchmarks/faults.py --spike --seeds 0 1 2
"""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

NUM_DEVICES = 8
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={NUM_DEVICES}"]
).strip()

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import train_digits as demo  # noqa: E402

import optax_dist  # noqa: E402

AXIS = demo.AXIS
N = NUM_DEVICES
STEPS = 1000
PERIOD = 16
BATCH = 128
HIDDEN = 64
LEARNING_RATE = 0.01
OUTER_LEARNING_RATE = 0.3
CHECKPOINT_EVERY = 100
KILL_AT = 530
SCALED_STEPS = range(300, 310)  # One worker's batch scaled by 1e6.
SCALE = 1e6
RUNS = ("clean", "faults", "faults_guarded")
SPIKE_STEPS = 320
SPIKE_AT = 105
SPIKE = {"adam": 1e20, "sgd": 1e5}  # Adam's second moment overflows; SGD's params stay finite.
SGD_LEARNING_RATE = 0.1
SPIKE_RUNS = ("adam_clean", "adam_spike", "sgd_clean", "sgd_spike")


def make_optimizer(guarded):
  outer = optax.sgd(OUTER_LEARNING_RATE, momentum=0.9, nesterov=True)
  tx = optax_dist.diloco(optax.adam(LEARNING_RATE), axis_name=AXIS, outer=outer, sync_period=PERIOD)
  return optax_dist.apply_if_all_finite(tx, axis_name=AXIS) if guarded else tx


def fault_plan(seed):
  """Per step: the worker whose loss is scaled, and by what (1.0: no fault)."""
  rng = np.random.default_rng(1000 + seed)
  plan = np.ones((STEPS, N), np.float32)
  bad_steps = rng.choice(STEPS, size=STEPS // 100, replace=False)
  for t in bad_steps:
    plan[t, rng.integers(N)] = rng.choice([np.nan, np.inf])
  scaled_worker = int(rng.integers(N))
  return plan, sorted(int(t) for t in bad_steps), scaled_worker


def loss_fn(params, batch):
  """The demo's loss, times this worker's fault factor (1, NaN or Inf)."""
  x, labels, factor = batch
  loss, aux = demo.loss_fn(params, (x, labels))
  return loss * factor[0], aux


def batch_at(t, data, seed, plan, scaled_worker, faulty):
  x_train, _, y_train, _ = data
  rng = np.random.default_rng([seed, t])  # The same batch for a step in every run.
  idx = rng.choice(len(x_train), size=BATCH, replace=False)
  x, y = x_train[idx].copy(), y_train[idx]
  factor = np.ones(BATCH, np.float32)
  if faulty:
    per = BATCH // N
    factor = np.repeat(plan[t], per)
    if t in SCALED_STEPS:
      x[scaled_worker * per : (scaled_worker + 1) * per] *= SCALE
  return x, y, factor


def child(args):
  """One run (or its resumed part) in this process; writes a JSON result."""
  import orbax.checkpoint as ocp

  data = demo.load_digits(args.seed, test_size=45 * N)
  _, x_test, _, y_test = data
  plan, _, scaled_worker = fault_plan(args.seed)
  faulty = args.run != "clean"
  guarded = args.run == "faults_guarded"
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  tx = make_optimizer(guarded)
  step = optax_dist.data_parallel_step(
    loss_fn, tx, mesh=mesh, axis_name=AXIS, has_aux=True, params_layout="per_worker"
  )
  evaluate = optax_dist.data_parallel_eval_step(
    demo.loss_fn, mesh=mesh, axis_name=AXIS, has_aux=True, params_layout="per_worker"
  )
  params = demo.init_mlp(jax.random.key(args.seed), [data[0].shape[1], HIDDEN, HIDDEN, 10])
  start = optax_dist.per_worker((params, tx.init(params)), mesh=mesh, axis_name=AXIS)
  ckpt_dir = pathlib.Path(args.workdir) / f"{args.run}_{args.seed}"
  first = 0
  params, opt_state = start
  if args.resume:
    saved = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    first = saved[-1]
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, start)
    with ocp.StandardCheckpointer() as ckptr:
      params, opt_state = ckptr.restore(ckpt_dir / str(first), target)
    assert optax_dist.call_count(opt_state) == first

  @jax.jit
  def center_finite(opt_state):
    leaves = jax.tree.leaves(optax_dist.center_params(opt_state))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))

  checks = {
    "centers_checked": 0,
    "nonfinite_centers": 0,
    "checkpoints": 0,
    "nonfinite_checkpoints": 0,
  }
  began = time.perf_counter()
  for t in range(first, STEPS):
    if faulty and t == KILL_AT and not args.resume:
      # What this process checked, then a crash in the middle of a period.
      part = pathlib.Path(args.workdir) / f"{args.run}_{args.seed}_a.json"
      part.write_text(json.dumps({**checks, "seconds": time.perf_counter() - began}))
      os.kill(os.getpid(), signal.SIGKILL)
    batch = batch_at(t, data, args.seed, plan, scaled_worker, faulty)
    params, opt_state, _ = jax.block_until_ready(step(params, opt_state, batch))
    checks["centers_checked"] += 1
    checks["nonfinite_centers"] += int(not bool(center_finite(opt_state)))
    if (t + 1) % CHECKPOINT_EVERY == 0:
      leaves = jax.tree.leaves(optax_dist.center_params(opt_state))
      checks["checkpoints"] += 1
      checks["nonfinite_checkpoints"] += int(
        not all(np.isfinite(np.asarray(x)).all() for x in leaves)
      )
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(ckpt_dir / str(t + 1), (params, opt_state))
        ckptr.wait_until_finished()
  seconds = time.perf_counter() - began
  accuracy = float(evaluate(params, opt_state, (x_test, y_test))["accuracy"])
  state = opt_state.inner_state if guarded else opt_state
  result = {
    "run": args.run,
    "seed": args.seed,
    "resumed_at": first if args.resume else None,
    "test_accuracy": accuracy,
    "syncs": int(np.ravel(optax_dist.global_step(state))[0]),
    "skipped_syncs": int(np.ravel(optax_dist.skipped_syncs(state))[0]),
    "dropped_syncs": np.asarray(optax_dist.dropped_syncs(state)).reshape(-1).tolist(),
    "guard_skipped_steps": int(np.ravel(opt_state.total_skipped)[0]) if guarded else 0,
    "params_finite": bool(all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))),
    "seconds": seconds,
    **checks,
  }
  out = pathlib.Path(args.workdir) / f"{args.run}_{args.seed}_{'b' if args.resume else 'a'}.json"
  out.write_text(json.dumps(result))


def spike_run(run, seed):
  """One spike case in this process: ``adam_*`` or ``sgd_*``, ``*_clean`` or ``*_spike``."""
  inner_name, kind = run.split("_")
  data = demo.load_digits(seed, test_size=45 * N)
  _, x_test, _, y_test = data
  rng = np.random.default_rng(2000 + seed)
  spiked_worker = int(rng.integers(N))
  plan = np.ones((SPIKE_STEPS, N), np.float32)
  if kind == "spike":
    plan[SPIKE_AT, spiked_worker] = SPIKE[inner_name]
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  inner = optax.adam(LEARNING_RATE) if inner_name == "adam" else optax.sgd(SGD_LEARNING_RATE)
  outer = optax.sgd(OUTER_LEARNING_RATE, momentum=0.9, nesterov=True)
  tx = optax_dist.diloco(inner, axis_name=AXIS, outer=outer, sync_period=PERIOD)
  step = optax_dist.data_parallel_step(
    loss_fn, tx, mesh=mesh, axis_name=AXIS, has_aux=True, params_layout="per_worker"
  )
  evaluate = optax_dist.data_parallel_eval_step(
    demo.loss_fn, mesh=mesh, axis_name=AXIS, has_aux=True, params_layout="per_worker"
  )
  params = demo.init_mlp(jax.random.key(seed), [data[0].shape[1], HIDDEN, HIDDEN, 10])
  params, opt_state = optax_dist.per_worker((params, tx.init(params)), mesh=mesh, axis_name=AXIS)

  @jax.jit
  def drift(params, opt_state):
    """Each worker's L2 distance from the center."""
    center = optax_dist.center_params(opt_state)
    squares = jax.tree.map(
      lambda p, c: jnp.sum(jnp.square(p - c).reshape(N, -1), axis=1), params, center
    )
    return jnp.sqrt(sum(jax.tree.leaves(squares)))

  drifts = []
  began = time.perf_counter()
  for t in range(SPIKE_STEPS):
    x, y, _ = batch_at(t, data, seed, plan, None, faulty=False)
    batch = x, y, np.repeat(plan[t], BATCH // N)  # The spike, if any, and no other fault.
    params, opt_state, _ = jax.block_until_ready(step(params, opt_state, batch))
    if (t + 2) % PERIOD == 0:  # The call before a sync: the period's whole drift.
      drifts.append(np.asarray(drift(params, opt_state)).tolist())
  seconds = time.perf_counter() - began
  metrics = evaluate(params, opt_state, (x_test, y_test))
  return {
    "run": run,
    "seed": seed,
    "spiked_worker": spiked_worker if kind == "spike" else None,
    "test_accuracy": float(metrics["accuracy"]),
    "test_loss": float(metrics["loss"]),
    "syncs": int(np.ravel(optax_dist.global_step(opt_state))[0]),
    "skipped_syncs": int(np.ravel(optax_dist.skipped_syncs(opt_state))[0]),
    "dropped_syncs": np.asarray(optax_dist.dropped_syncs(opt_state)).reshape(-1).tolist(),
    "drift_before_sync": drifts,
    "params_finite": bool(all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))),
    "seconds": seconds,
  }


def spike_main(args, argv):
  began = time.perf_counter()
  results = []
  for seed in args.seeds:
    for run in SPIKE_RUNS:
      result = spike_run(run, seed)
      results.append(result)
      print(json.dumps({k: v for k, v in result.items() if k != "drift_before_sync"}))
  summary = {
    "command": "python benchmarks/faults.py " + " ".join(argv or sys.argv[1:]),
    "steps": SPIKE_STEPS,
    "workers": N,
    "period": PERIOD,
    "spike_at": SPIKE_AT,
    "spike": SPIKE,
    "wall_seconds": time.perf_counter() - began,
    "runs": results,
  }
  out = args.out or str(ROOT / "benchmarks" / "results" / "faults_spike.json")
  pathlib.Path(out).write_text(json.dumps(summary, indent=1))
  print(f"wall time {summary['wall_seconds']:.0f} s")


def run_child(run, seed, workdir, resume=False):
  cmd = [
    sys.executable,
    __file__,
    "--child",
    "--run",
    run,
    "--seed",
    str(seed),
    "--workdir",
    workdir,
  ] + (["--resume"] if resume else [])
  proc = subprocess.run(cmd, check=False)
  return proc.returncode


def merge(workdir, run, seed):
  parts = [pathlib.Path(workdir) / f"{run}_{seed}_{p}.json" for p in "ab"]
  found = [json.loads(p.read_text()) for p in parts if p.exists()]
  out = dict(found[-1])  # The last part's final figures; the checks of both parts.
  for key in (
    "centers_checked",
    "nonfinite_centers",
    "checkpoints",
    "nonfinite_checkpoints",
    "seconds",
  ):
    out[key] = sum(r[key] for r in found)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--workdir", default="/tmp/optax_dist_faults")
  parser.add_argument("--spike", action="store_true", help="run the spike cases instead")
  parser.add_argument("--out", default=None, help="the results' JSON file")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
  parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    child(args)
    return
  if args.spike:
    spike_main(args, argv)
    return
  import shutil

  began = time.perf_counter()
  results = []
  for seed in args.seeds:
    for run in RUNS:
      shutil.rmtree(pathlib.Path(args.workdir) / f"{run}_{seed}", ignore_errors=True)
      for part in "ab":
        (pathlib.Path(args.workdir) / f"{run}_{seed}_{part}.json").unlink(missing_ok=True)
      code = run_child(run, seed, args.workdir)
      killed = code == -signal.SIGKILL
      if run != "clean":
        assert killed, f"the {run} run should have been killed, exit code {code}"
        code = run_child(run, seed, args.workdir, resume=True)
      assert code == 0, f"{run} seed {seed} failed with exit code {code}"
      result = merge(args.workdir, run, seed)
      result["killed_and_resumed"] = killed
      results.append(result)
      print(json.dumps(result))
  total = time.perf_counter() - began
  _, bad_steps, scaled_worker = fault_plan(args.seeds[0])
  summary = {
    "command": "python benchmarks/faults.py " + " ".join(argv or sys.argv[1:]),
    "steps": STEPS,
    "workers": N,
    "period": PERIOD,
    "nan_inf_steps_seed0": bad_steps,
    "scaled_worker_seed0": scaled_worker,
    "kill_at": KILL_AT,
    "wall_seconds": total,
    "runs": results,
  }
  out = args.out or str(ROOT / "benchmarks" / "results" / "faults.json")
  pathlib.Path(out).write_text(json.dumps(summary, indent=1))
  print(f"wall time {total:.0f} s")


if __name__ == "__main__":
  main()
