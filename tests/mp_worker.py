"""One process of the multi-process tests (``tests/test_multiprocess.py``).

Started twice (2 processes x 2 CPU devices, joined by
``optax_dist.initialize_from_env``), either directly by the test or through
``python -m optax_dist.launch``. Usage::

  python tests/mp_worker.py all OUT_DIR CKPT_DIR
  python tests/mp_worker.py train OUT_DIR CKPT_DIR [--kill-at STEP]
  python tests/mp_worker.py disagree OUT_DIR

The training code (``algorithms``, ``run_algorithm``, ...) is shared with
the test, which runs it in one process on 4 of its 8 devices as the reference.
"""

import os
import pathlib
import signal
import sys

import numpy as np

N = 4  # Workers: 2 processes x 2 devices, or 4 devices of one process.
AXIS = "workers"
DIM = 8
BATCH = 4
STEPS = 7  # Two full periods of 3, and one step into the third.
TRAIN_STEPS = 12
CHECKPOINT_EVERY = 4


def algorithms():
  """name -> transform; every algorithm of the package, on the worker axis."""
  import optax

  import optax_dist

  adam = optax.adam(0.05, b2=0.99)
  return {
    "tower": optax_dist.tower(adam, axis_name=AXIS),
    "elastic_simultaneous": optax_dist.elastic_average(
      optax.sgd(0.1, momentum=0.9), axis_name=AXIS, communication_period=3, rho=0.05
    ),
    "elastic_round_robin": optax_dist.elastic_average(
      adam, axis_name=AXIS, communication_period=3, moving_rate=0.3, ordering="round_robin"
    ),
    "agn": optax_dist.agn(adam, axis_name=AXIS, communication_period=3),
    "agn_round_robin": optax_dist.agn(
      optax.sgd(0.05), axis_name=AXIS, communication_period=2, ordering="round_robin"
    ),
    "model_average": optax_dist.model_average(adam, axis_name=AXIS, interval_steps=3),
    "diloco": optax_dist.diloco(adam, axis_name=AXIS, sync_period=3),
    "diloco_streaming_int8": optax_dist.diloco(
      adam, axis_name=AXIS, sync_period=2, fragments=2, comm_dtype="int8", error_feedback=True
    ),
    "diloco_int2": optax_dist.diloco(
      adam, axis_name=AXIS, sync_period=3, comm_dtype="int2", error_feedback=True
    ),
    "model_average_topk_int4": optax_dist.model_average(
      adam, axis_name=AXIS, interval_steps=3, topk_fraction=0.1, comm_dtype="int4"
    ),
    # Delayed syncs: fragment 0 reduced and applied on calls 3 and 7,
    # fragment 1 on call 5.
    "diloco_delay1_fragments": optax_dist.diloco(
      adam, axis_name=AXIS, sync_period=4, fragments=2, delay=1, blend=0.25
    ),
  }


def data(steps):
  """Per-step, per-worker regression batches: x (steps, N, B, DIM), y (steps, N, B)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(steps, N, BATCH, DIM)).astype(np.float32)
  w = np.linspace(-1.0, 1.0, DIM, dtype=np.float32)
  y = (x @ w + 0.1 * rng.normal(size=(steps, N, BATCH))).astype(np.float32)
  return x, y


def initial_params():
  return {"w": np.full((N, DIM), 0.1, np.float32), "b": np.zeros((N,), np.float32)}


def loss_fn(params, x, y):
  import jax.numpy as jnp

  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def mesh():
  import jax
  from jax.sharding import AxisType

  assert jax.device_count() >= N, jax.devices()
  return jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:N])


def per_worker(fn, m):
  """``fn`` on every worker, args and results stacked along a leading worker axis."""
  import harness

  return harness.per_worker(fn, m, AXIS)


def put(tree, m):
  """A global array from the full NumPy value every process holds."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  sharding = NamedSharding(m, P(AXIS))

  def one(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

  return jax.tree.map(one, tree)


def fetch(tree):
  """The full value of global arrays, on every process."""
  import jax
  from jax.experimental import multihost_utils

  return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)


def make_step(tx, m, **extra):
  import harness

  return per_worker(harness.train_step(tx, loss_fn, **extra), m)


def run_algorithm(tx, m, x, y, static=False):
  """Params and state after ``len(x)`` steps of ``tx``, as NumPy trees.

  ``static``: pass the schedule's static ``sync`` flag to every call (one
  program per kind of call), instead of letting the program decide.
  """
  import jax

  import optax_dist

  params = put(initial_params(), m)
  state = per_worker(tx.init, m)(params)
  steps = {}
  schedule = optax_dist.sync_schedule(state) if static else None
  for t in range(len(x)):
    flag = schedule(t) if static else None
    key = repr(flag)  # Not the flag: 0 == False would share a program.
    if key not in steps:
      steps[key] = make_step(tx, m, **({"sync": flag} if static else {}))
    params, state = jax.block_until_ready(steps[key](params, state, put(x[t], m), put(y[t], m)))
  return fetch(params), fetch(state)


def fsdp_mesh():
  """2 replicas x 2 FSDP devices: on 2 processes, each replica is one process's devices."""
  import jax
  from jax.sharding import AxisType

  return jax.make_mesh(
    (2, 2), ("replica", "fsdp"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4]
  )


def fsdp_run(m):
  """DiLoCo over the replicas, params and state sharded over "fsdp" inside each."""
  import harness
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import optax

  import optax_dist

  tx = optax_dist.diloco(optax.adam(0.05), axis_name="replica", sync_period=2)

  def place(tree, spec_tree):
    def one(a, spec):
      a = np.asarray(a)
      sharding = NamedSharding(m, spec)
      return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(one, tree, spec_tree)

  def loss(params, x, y):
    return jnp.mean((x @ params["w"] - y[..., None]) ** 2)

  params = {"w": np.full((2, DIM, 3), 0.1, np.float32)}
  init, step, params_spec, _ = harness.fsdp_step(tx, m, params, loss)
  batch_spec = P("replica", "fsdp")
  p = place(params, params_spec)
  s = init(p)
  x, y = data(STEPS)  # (steps, 4, BATCH, DIM): 2 replicas x 2 FSDP devices' rows.
  for t in range(STEPS):
    xt = x[t].reshape(2, 2 * BATCH, DIM)
    yt = y[t].reshape(2, 2 * BATCH)
    p, s = jax.block_until_ready(step(p, s, place(xt, batch_spec), place(yt, batch_spec)))
  return fetch(p), fetch(s)


def flat(name, params, state):
  """``{name/params/i: leaf, name/state/i: leaf}`` for np.savez."""
  import jax

  out = {}
  for kind, tree in (("params", params), ("state", state)):
    for i, leaf in enumerate(jax.tree.leaves(tree)):
      out[f"{name}/{kind}/{i}"] = np.asarray(leaf)
  return out


def nonfinite_transform():
  import optax

  import optax_dist

  inner = optax_dist.elastic_average(
    optax.adam(0.05, b2=0.99), axis_name=AXIS, communication_period=2, moving_rate=0.3
  )
  return optax_dist.apply_if_all_finite(inner, axis_name=AXIS)


def nonfinite_data():
  """Worker 3 (on process 1) gets a NaN gradient at step 3, a sync step of period 2."""
  x, y = data(STEPS)
  x = x.copy()
  x[3, 3, 0, 0] = np.nan
  return x, y


def recovery_run(m):
  """DiLoCo with no guard; worker 3 (on process 1) gets a NaN gradient on call 4.

  Call 4 is a local step of period 3; the sync on call 6 leaves worker 3 out.
  Static flags; on sync calls every worker applies ``restart_nonfinite``.
  """
  import jax
  import optax

  import optax_dist

  tx = optax_dist.diloco(optax.adam(0.05, b2=0.99), axis_name=AXIS, sync_period=3)
  x, y = nonfinite_data()

  def make(flag):
    def step(params, state, xb, yb):
      grads = jax.grad(loss_fn)(params, xb, yb)
      updates, state = tx.update(grads, state, params, sync=flag)
      params = optax.apply_updates(params, updates)
      if flag is not False:
        params = optax_dist.restart_nonfinite(params, state)
      return params, state

    return per_worker(step, m)

  params = put(initial_params(), m)
  state = per_worker(tx.init, m)(params)
  schedule = optax_dist.sync_schedule(state)
  steps = {flag: make(flag) for flag in (False, True)}
  for t in range(len(x)):
    step = steps[schedule(t)]
    params, state = jax.block_until_ready(step(params, state, put(x[t], m), put(y[t], m)))
  return fetch(params), fetch(state)


def agreement_messages(m):
  """check_agreement's error (caught) for a period, then params, that differ per process."""
  import jax

  import optax_dist

  pid = jax.process_index()
  params = put(initial_params(), m)
  optax_dist.check_agreement(train_transform(), params, mesh=m, axis_name=AXIS)  # Agrees.
  messages = {}
  try:
    optax_dist.check_agreement(train_transform(period=3 + pid), params, mesh=m, axis_name=AXIS)
  except ValueError as e:
    messages["agree/period"] = np.array(str(e))
  # Only inside optax.MultiSteps (a bound method's object): every_k_schedule.
  import optax

  multi = optax.MultiSteps(train_transform(), every_k_schedule=2 + pid).gradient_transformation()
  try:
    optax_dist.check_agreement(multi, params, mesh=m, axis_name=AXIS)
  except ValueError as e:
    messages["agree/multisteps"] = np.array(str(e))
  shifted = put(jax.tree.map(lambda a: a + 0.5 * pid, initial_params()), m)
  try:
    optax_dist.check_agreement(train_transform(), shifted, mesh=m, axis_name=AXIS)
  except ValueError as e:
    messages["agree/params"] = np.array(str(e))
  return messages


def all_scenarios(out_dir, ckpt_dir):
  """Every algorithm, the skip wrapper, the agreement checks, and an uninterrupted train."""
  import jax

  m = mesh()
  results = {}
  x, y = data(STEPS)
  for name, tx in algorithms().items():
    results.update(flat(name, *run_algorithm(tx, m, x, y)))
    if name != "tower":
      results.update(flat(f"static/{name}", *run_algorithm(tx, m, x, y, static=True)))
  results.update(flat("nonfinite", *run_algorithm(nonfinite_transform(), m, *nonfinite_data())))
  results.update(flat("recovery", *recovery_run(m)))
  results.update(flat("fsdp", *fsdp_run(fsdp_mesh())))
  results.update(agreement_messages(m))
  np.savez(out_dir / f"all_{jax.process_index()}.npz", **results)
  train(out_dir, ckpt_dir)


def disagree():
  """Each process builds its transform with its own period: both must raise."""
  import jax

  import optax_dist

  m = mesh()
  tx = train_transform(period=3 + jax.process_index())
  optax_dist.check_agreement(tx, put(initial_params(), m), mesh=m, axis_name=AXIS)


def train_transform(period=3):
  import optax

  import optax_dist

  return optax_dist.elastic_average(
    optax.adam(0.05, b2=0.99), axis_name=AXIS, communication_period=period, moving_rate=0.3
  )


def train(out_dir, ckpt_dir, kill_at=None):
  """Trains with an orbax checkpoint every CHECKPOINT_EVERY steps, resuming from the latest.

  With ``kill_at``, process 1 kills itself with SIGKILL before step ``kill_at``
  on the first run (the launcher's restart count is 0), mid-period and after a
  checkpoint.
  """
  import jax
  import orbax.checkpoint as ocp

  m = mesh()
  tx = train_transform()
  x, y = data(TRAIN_STEPS)
  params = put(initial_params(), m)
  state = per_worker(tx.init, m)(params)
  step = make_step(tx, m)
  manager = ocp.CheckpointManager(
    ckpt_dir,
    options=ocp.CheckpointManagerOptions(
      save_interval_steps=CHECKPOINT_EVERY, enable_async_checkpointing=False
    ),
  )
  start = manager.latest_step() or 0
  if start:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "state": state})
    restored = manager.restore(start, args=ocp.args.StandardRestore(target))
    params, state = restored["params"], restored["state"]
  restart = int(os.environ.get("OPTAX_DIST_RESTART", "0"))
  for t in range(start, TRAIN_STEPS):
    if kill_at == t and restart == 0 and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGKILL)
    params, state = jax.block_until_ready(step(params, state, put(x[t], m), put(y[t], m)))
    if (t + 1) % CHECKPOINT_EVERY == 0:
      manager.save(t + 1, args=ocp.args.StandardSave({"params": params, "state": state}))
  manager.wait_until_finished()
  manager.close()
  params, state = fetch(params), fetch(state)
  np.savez(
    out_dir / f"train_{jax.process_index()}.npz",
    start=start,
    restart=restart,
    step=state.sync.calls,
    num_syncs=state.sync.num_syncs,
    **flat("train", params, state),
  )


def main(argv):
  import optax_dist

  optax_dist.initialize_from_env()
  scenario, out_dir = argv[0], pathlib.Path(argv[1])
  if scenario == "all":
    all_scenarios(out_dir, pathlib.Path(argv[2]))
  elif scenario == "disagree":
    disagree()
  elif scenario == "train":
    kill_at = int(argv[argv.index("--kill-at") + 1]) if "--kill-at" in argv else None
    train(out_dir, pathlib.Path(argv[2]), kill_at)
  else:
    raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
  main(sys.argv[1:])
