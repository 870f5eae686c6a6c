"""Runs a transform on N workers under vmap, shard_map or pmap.

Per-worker values are stacked along a leading worker axis outside the mapped
function; inside it each worker sees its own slice, as a user's step does.
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import optax_dist

AXIS = "workers"
MODES = ("vmap", "shard_map", "pmap")

# The tests' one list of the library's algorithms: each one's transform and
# the name of its period argument (None: it has none). Every test file that
# runs "each algorithm" builds its transforms from here
# (test_harness.py checks that the list names every periodic algorithm).
ALGORITHMS: dict[str, tuple[Callable, str | None]] = {
  "tower": (optax_dist.tower, None),
  "elastic_average": (optax_dist.elastic_average, "communication_period"),
  "agn": (optax_dist.agn, "communication_period"),
  "model_average": (optax_dist.model_average, "interval_steps"),
  "diloco": (optax_dist.diloco, "sync_period"),
}
# The algorithms whose syncs take a ``comm_dtype`` (quantized and low-bit rings).
COMPRESSED = ("diloco", "model_average", "elastic_average")


def algorithm(name: str, inner: Any, period: int = 2, **kwargs: Any) -> Any:
  """Algorithm ``name`` around ``inner`` on the workers' axis, syncing every ``period`` calls."""
  make, period_name = ALGORITHMS[name]
  if period_name is not None:
    kwargs[period_name] = period
  return make(inner, axis_name=AXIS, **kwargs)


def compressed(name: str, **kwargs: Any) -> Any:
  """The compressed-sync tests' transform ``name`` (SGD inside, period 2)."""
  extra = {
    "diloco": {"outer": optax.sgd(0.7, momentum=0.5)},
    "model_average": {},
    "elastic_average": {"moving_rate": 0.2},
  }[name]
  return algorithm(name, optax.sgd(0.1), 2, **extra, **kwargs)


def compressed_problem(n: int = 4, steps: int = 6, seed: int = 1) -> tuple[Any, list]:
  """The compressed-sync tests' params (one 40 x 30 matrix) and gradients."""
  rng = np.random.default_rng(seed)
  params = stack({"w": rng.normal(size=(40, 30)).astype(np.float32)}, n)
  grads = [{"w": rng.normal(size=(n, 40, 30)).astype(np.float32)} for _ in range(steps)]
  return params, grads


def worker_mesh(n: int, axis_name: str = AXIS) -> jax.sharding.Mesh:
  """A 1-D mesh over the first n devices, with an Auto axis."""
  assert jax.device_count() >= n, f"need {n} devices, have {jax.device_count()}"
  return jax.make_mesh((n,), (axis_name,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def map_workers(fn: Callable, n: int, mode: str, axis_name: str = AXIS) -> Callable:
  """Maps ``fn(*per_worker_args)`` over args stacked along a leading axis of n."""
  if mode == "vmap":
    return jax.jit(jax.vmap(fn, axis_name=axis_name))
  if mode == "pmap":
    return jax.pmap(fn, axis_name=axis_name, devices=jax.devices()[:n])
  if mode == "shard_map":
    return per_worker(fn, worker_mesh(n, axis_name), axis_name)
  raise ValueError(f"unknown mode {mode!r}; one of {MODES}")


def per_worker(fn: Callable, mesh: jax.sharding.Mesh, axis_name: str = AXIS) -> Callable:
  """``fn`` on every worker of ``mesh`` under jit(shard_map), args and results
  stacked along a leading worker axis (each worker sees its own slice)."""

  def body(*args):
    out = fn(*jax.tree.map(lambda x: x[0], args))
    return jax.tree.map(lambda x: x[None], out)

  spec = P(axis_name)
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))


def train_step(tx: optax.GradientTransformation, grad_fn: Callable | None = None, **extra):
  """``step(params, state, *batch) -> (params, state)`` of one worker.

  Without ``grad_fn`` the batch is the gradient itself; with it, the gradient
  is ``jax.grad(grad_fn)(params, *batch)``. ``extra`` goes to ``tx.update``
  (e.g. the static ``sync`` flag).
  """

  def step(params, state, *batch):
    grads = batch[0] if grad_fn is None else jax.grad(grad_fn)(params, *batch)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return step


def fsdp_specs(tree: Any, replica: str = "replica", fsdp: str = "fsdp") -> Any:
  """Leaves sharded over ``fsdp`` along their first params dim; per-replica scalars not."""
  return jax.tree.map(lambda a: P(replica, fsdp) if a.ndim >= 2 else P(replica), tree)


def fsdp_step(
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  params: Any,
  loss: Callable,
  replica: str = "replica",
  fsdp: str = "fsdp",
  **extra,
) -> tuple[Callable, Callable, Any, Any]:
  """``(init, step, params_spec, state_spec)``: FSDP inside each replica.

  ``params`` are stacked per replica (a leading axis of the number of
  replicas). Each device holds a slice of every params leaf (its first params
  dim) and its slice of the replica's batch; the model all-gathers the params
  over ``fsdp`` and ``jax.grad`` scatters the gradients back (a
  reduce-scatter). ``loss(full_params, x, y)`` is the mean over one device's
  batch, so the replica's loss is the sum over its devices divided by their
  count. The optimizer runs on the local shards, ``tx`` on the ``replica``
  axis; ``step(params, state, x, y) -> (params, state)``.
  """
  size = mesh.shape[fsdp]
  params_spec = fsdp_specs(params, replica, fsdp)
  state_spec = fsdp_specs(jax.eval_shape(jax.vmap(tx.init), params), replica, fsdp)
  batch_spec = P(replica, fsdp)

  def local_loss(shards, x, y):
    full = jax.tree.map(lambda s: jax.lax.all_gather(s, fsdp, axis=0, tiled=True), shards)
    return loss(full, x, y) / size

  def body(params, state, x, y):
    params, state = jax.tree.map(lambda a: a[0], (params, state))
    params, state = train_step(tx, local_loss, **extra)(params, state, x[0], y[0])
    return jax.tree.map(lambda a: a[None], (params, state))

  step = jax.jit(
    jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(params_spec, state_spec, batch_spec, batch_spec),
      out_specs=(params_spec, state_spec),
    )
  )
  init = jax.jit(
    jax.shard_map(
      lambda p: jax.tree.map(lambda a: a[None], tx.init(jax.tree.map(lambda a: a[0], p))),
      mesh=mesh,
      in_specs=(params_spec,),
      out_specs=state_spec,
    )
  )
  return init, step, params_spec, state_spec


class Trajectory(NamedTuple):
  params: list[Any]  # Stacked params after each step, as NumPy arrays.
  updates: list[Any]  # Stacked updates of each step.
  state: Any  # Final stacked state.
  states: list[Any]  # Stacked state after each step.


def run_transform(
  tx: optax.GradientTransformation,
  params: Any,
  batches: list[Any],
  *,
  mode: str,
  grad_fn: Callable | None = None,
  axis_name: str = AXIS,
  flags: list[Any] | None = None,
) -> Trajectory:
  """Runs ``tx`` for ``len(batches)`` steps on stacked per-worker ``params``.

  Each batch is stacked per worker too. Without ``grad_fn`` a batch is the
  gradient itself; with it, the gradient is ``jax.grad(grad_fn)(params, batch)``.
  ``flags``, one per step, are passed as the static ``sync`` argument (one
  program per distinct flag); without them ``update`` gets no ``sync``.
  Every step waits for its result (see the note on CPU rendezvous in the README).
  """
  n = jax.tree.leaves(params)[0].shape[0]

  def make_step(extra):
    def step(p, s, batch):
      g = batch if grad_fn is None else jax.grad(grad_fn)(p, batch)
      u, s = tx.update(g, s, p, **extra)
      return optax.apply_updates(p, u), s, u

    return map_workers(step, n, mode, axis_name)

  state = _program(
    ("init", tx.init, n, mode, axis_name), lambda: map_workers(tx.init, n, mode, axis_name)
  )(params)
  traj = Trajectory([], [], None, [])
  for i, batch in enumerate(batches):
    extra = {} if flags is None else {"sync": flags[i]}
    key = ("step", tx, n, mode, axis_name, grad_fn, repr(extra))
    step = _program(key, lambda extra=extra: make_step(extra))
    params, state, updates = jax.block_until_ready(step(params, state, batch))
    traj.params.append(jax.tree.map(np.asarray, params))
    traj.updates.append(jax.tree.map(np.asarray, updates))
    traj.states.append(state)
  return traj._replace(state=state)


# The jitted programs of run_transform, by transformation, workers, mode and
# flag: a transformation run again (e.g. by its in-graph and static runs, or
# a test table's shared instance) reuses them, and jax.jit compiles each
# once per shape. Bounded, oldest first out.
_PROGRAMS: dict[Any, Callable] = {}
_MAX_PROGRAMS = 256


def _program(key: Any, make: Callable[[], Callable]) -> Callable:
  try:
    hash(key)
  except TypeError:  # A transformation holding unhashable values: not kept.
    return make()
  if key not in _PROGRAMS:
    if len(_PROGRAMS) >= _MAX_PROGRAMS:
      del _PROGRAMS[next(iter(_PROGRAMS))]
    _PROGRAMS[key] = make()
  return _PROGRAMS[key]


def stack(tree: Any, n: int) -> Any:
  """n identical copies of every leaf, stacked along a new leading axis."""
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))).copy(), tree)
