"""Where params, optimizer states and batches live on a mesh of workers.

Two layouts of params and optimizer state:

* ``"replicated"``: one copy, ``in_specs=P()``. For :func:`optax_dist.tower`
  and plain optax optimizers (workers stay identical).
* ``"per_worker"``: every leaf has a leading worker axis of size N, sharded over
  the mesh axis (see :func:`per_worker`). Needed by the periodic transforms
  (:func:`optax_dist.elastic_average`, ...), whose workers drift apart between
  syncs; tower and plain optax work with it too.

A batch is split along dim 0 into N equal slices, one per worker.
"""

from collections.abc import Callable
import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_dist import _collectives
from optax_dist import _state

LAYOUTS = ("replicated", "per_worker")


def mesh_workers(mesh: jax.sharding.Mesh, axis_name: Any) -> tuple[tuple, int]:
  axes = _collectives.axis_tuple(axis_name)
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(
      f"`axis_name` {axis_name!r} names axes {missing} that the mesh does not have; "
      f"its axes are {tuple(mesh.axis_names)}."
    )
  return axes, math.prod(mesh.shape[a] for a in axes)


def shard_mapped(fn: Callable, mesh: Any, axes: tuple, in_specs: tuple, out_specs: Any) -> Callable:
  """``jax.shard_map(fn)``; inputs on a mesh with Explicit axes are first resharded."""
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
  if all(types[a] != AxisType.Explicit for a in axes):
    return mapped

  def resharded(*args):
    args = tuple(
      jax.tree.map(lambda x, s=spec: jax.reshard(x, NamedSharding(mesh, s)), arg)
      for arg, spec in zip(args, in_specs, strict=True)
    )
    return mapped(*args)

  return resharded


def check_layout_name(params_layout: str) -> None:
  if params_layout not in LAYOUTS:
    raise ValueError(f"`params_layout` must be one of {LAYOUTS}, got {params_layout!r}.")


def check_batch(batch: Any, n: int) -> None:
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError("The batch holds no arrays to split over the workers.")
  for path, x in leaves:
    shape = jnp.shape(x)
    if not shape or shape[0] % n:
      size = shape[0] if shape else "no"
      raise ValueError(
        f"The batch leaf at {jax.tree_util.keystr(path) or 'batch'} has shape {shape}: "
        f"its dim 0 ({size}) must divide by the {n} workers, since every worker gets an "
        f"equal slice. Use a global batch size that is a multiple of {n} (pad or drop "
        "the remainder)."
      )


def check_per_worker(tree: Any, n: int, what: str) -> None:
  leading = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(tree)}
  if len(leading) == 1 and None not in leading and leading != {n}:
    (m,) = leading
    raise ValueError(
      f"Every leaf of the {what} has a leading worker axis of {m}, but this step's mesh "
      f"has {n} workers on its workers' axis. A tree resized with "
      f"`resize_workers(params, opt_state, {m})` runs on a mesh of {m} devices along that "
      f"axis: build the step on such a mesh, or resize to {n} workers."
    )
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    shape = jnp.shape(x)
    if not shape or shape[0] != n:
      raise ValueError(
        f"With params_layout='per_worker', every leaf of the {what} needs a leading "
        f"worker axis of size {n}; the leaf at {jax.tree_util.keystr(path) or what} has "
        f"shape {shape}. Lay the tree out with `optax_dist.per_worker(tree, mesh=mesh, "
        "axis_name=...)`."
      )


PERIODIC_NEEDS_PER_WORKER = (
  "The optimizer holds a periodic transform (elastic_average, agn, model_average, "
  "diloco, ...), whose workers keep their own params between syncs: build the step "
  "with params_layout='per_worker' and lay params and state out with "
  "`optax_dist.per_worker`."
)


def check_layout(opt_state: Any, params_layout: str) -> None:
  if params_layout == "replicated" and _state.holds_periodic(opt_state):
    raise ValueError(PERIODIC_NEEDS_PER_WORKER)


def per_worker(tree: Any, *, mesh: jax.sharding.Mesh, axis_name: _collectives.AxisName) -> Any:
  """N copies of ``tree`` on a leading worker axis, sharded over it.

  The ``"per_worker"`` layout of :func:`data_parallel_step`: worker ``k`` holds
  slice ``k`` of every leaf. Build the optimizer state with ``optimizer.init``
  on one copy of the params (``init`` is local), then lay out both; all
  workers then start identical, as the periodic transforms require (the
  effect of :func:`optax_dist.broadcast_params`). Read worker ``k``'s copy
  back with ``jax.tree.map(lambda x: x[k], tree)``.

  Args:
    tree: A tree of arrays (params, an optimizer state, ...).
    mesh: The device mesh.
    axis_name: The mesh axis (or tuple of axes) of the workers.

  Returns:
    The tree with every leaf of shape ``(N, *leaf.shape)``, sharded along the
    workers' axis.

  Raises:
    ValueError: if the mesh has no axis ``axis_name``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_dist
    >>> from jax.sharding import AxisType
    >>> mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Auto,),
    ...                      devices=jax.devices()[:4])
    >>> stacked = optax_dist.per_worker({"w": jnp.arange(3.0)}, mesh=mesh, axis_name="batch")
    >>> stacked["w"].shape, len(stacked["w"].sharding.device_set)
    ((4, 3), 4)
  """
  axes, n = mesh_workers(mesh, axis_name)
  spec = P(axes[0] if len(axes) == 1 else axes)

  def lay_out(x: Any) -> jax.Array:
    # A leaf kept in host memory (host_offload) stays there.
    kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
    sharding = NamedSharding(mesh, spec, memory_kind=kind)
    x = jnp.asarray(x)
    return jax.device_put(jnp.broadcast_to(x[None], (n, *x.shape)), sharding)

  return jax.tree.map(lay_out, tree)


class StepLayout(NamedTuple):
  """What a train and an eval step share: the workers and where things live."""

  axes: tuple
  n: int
  workers: P
  layout: P

  @classmethod
  def make(cls, mesh: Any, axis_name: Any, loss_reduction: str, params_layout: str) -> "StepLayout":
    _collectives.check_reduction(loss_reduction, "loss_reduction")
    check_layout_name(params_layout)
    axes, n = mesh_workers(mesh, axis_name)
    workers = P(axes[0] if len(axes) == 1 else axes)
    return cls(axes, n, workers, workers if params_layout == "per_worker" else P())

  def check(self, params: Any, opt_state: Any, batch: Any, params_layout: str) -> None:
    check_batch(batch, self.n)
    if opt_state is not None:
      check_layout(opt_state, params_layout)
    if params_layout == "per_worker":
      check_per_worker(params, self.n, "params")
      check_per_worker(opt_state, self.n, "optimizer state")
