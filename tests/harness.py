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

AXIS = "workers"
MODES = ("vmap", "shard_map", "pmap")


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

    def body(*args):
      out = fn(*jax.tree.map(lambda x: x[0], args))
      return jax.tree.map(lambda x: x[None], out)

    spec = P(axis_name)
    return jax.jit(
      jax.shard_map(body, mesh=worker_mesh(n, axis_name), in_specs=spec, out_specs=spec)
    )
  raise ValueError(f"unknown mode {mode!r}; one of {MODES}")


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

  state = map_workers(tx.init, n, mode, axis_name)(params)
  programs: dict[Any, Callable] = {}
  traj = Trajectory([], [], None, [])
  for i, batch in enumerate(batches):
    extra = {} if flags is None else {"sync": flags[i]}
    key = repr(extra)
    if key not in programs:
      programs[key] = make_step(extra)
    params, state, updates = jax.block_until_ready(programs[key](params, state, batch))
    traj.params.append(jax.tree.map(np.asarray, params))
    traj.updates.append(jax.tree.map(np.asarray, updates))
    traj.states.append(state)
  return traj._replace(state=state)


def stack(tree: Any, n: int) -> Any:
  """n identical copies of every leaf, stacked along a new leading axis."""
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))).copy(), tree)
