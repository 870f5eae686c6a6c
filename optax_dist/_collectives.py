"""Cross-worker operations shared by every transform of the package.

Every algorithm talks to the other workers through this module only, so that
one transform runs unchanged under

1. ``jax.shard_map`` over a mesh axis, where values carry a *varying* type
   (they may differ between workers) or an *invariant* one (made identical by a
   collective, or replicated by ``in_specs=P()``),
2. ``jax.pmap(axis_name=...)`` and ``jax.shard_map(..., check_vma=False)``,
   where no such typing exists,
3. ``jax.vmap(axis_name=...)``, N simulated workers on one device,
4. several processes joined by ``jax.distributed.initialize`` (a shard_map
   over a global mesh: nothing special is needed here).

An axis argument is a name or a tuple of names (the collective then runs over
all of them, e.g. ``("hosts", "devices")`` on a 2-D mesh).
"""

from collections.abc import Hashable
from typing import Any
from typing import TypeAlias

import jax
from jax import lax
import jax.numpy as jnp

AxisName: TypeAlias = Hashable | tuple[Hashable, ...]

REDUCTIONS = ("sum", "mean")


def check_reduction(value: Any, name: str) -> str:
  """A reduction over the workers: ``"sum"`` or ``"mean"``."""
  if value not in REDUCTIONS:
    raise ValueError(f"`{name}` must be one of {REDUCTIONS}, got {value!r}.")
  return value


_HOW_TO_BIND = (
  "call it inside a function mapped over that axis, e.g. "
  "`jax.shard_map(f, mesh=mesh, in_specs=..., out_specs=...)` with a mesh "
  "axis named {name!r}, `jax.pmap(f, axis_name={name!r})` or "
  "`jax.vmap(f, axis_name={name!r})`"
)


def axis_tuple(axis_name: AxisName, *, argname: str = "axis_name") -> tuple[Hashable, ...]:
  """Normalizes an axis argument to a non-empty tuple of names."""
  axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  if not axes:
    raise ValueError(f"`{argname}` must name at least one axis, got {axis_name!r}.")
  for name in axes:
    if name is None or not isinstance(name, Hashable):
      raise TypeError(
        f"`{argname}` must be an axis name (a string) or a tuple of them, got {axis_name!r}."
      )
  return axes


def num_workers(axis_name: AxisName) -> int:
  """The number of workers along ``axis_name`` (a static Python int).

  Raises:
    NameError: if an axis is not bound by an enclosing shard_map, pmap or vmap.
  """
  size = 1
  for name in axis_tuple(axis_name):
    try:
      size *= lax.axis_size(name)
    except NameError as e:
      raise NameError(
        f"optax_dist: the axis name {name!r} is not bound here. To use it, "
        + _HOW_TO_BIND.format(name=name)
        + ". To run without communication, pass `axis_name=None` where the "
        "transform allows it."
      ) from e
  return size


def worker_index(axis_name: AxisName) -> jax.Array:
  """This worker's index along ``axis_name`` (row-major over several axes)."""
  num_workers(axis_name)  # Raises the explanatory error for unbound axes.
  return lax.axis_index(axis_tuple(axis_name))


def varying_axes(x: Any) -> frozenset:
  """The mesh axes over which ``x`` is typed varying (empty outside shard_map).

  ``x`` is a traced value or the ``jax.ShapeDtypeStruct`` that
  ``jax.eval_shape`` gives for one.
  """
  mat = getattr(x, "manual_axis_type", None)
  if mat is None:
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is None:
      return frozenset(getattr(aval, "vma", frozenset()))
  return frozenset(mat.varying)


def typed_axes(axis_name: AxisName) -> frozenset:
  """The axes among ``axis_name`` whose values carry a varying/invariant type.

  That is the axes of an enclosing ``jax.shard_map`` with ``check_vma=True``
  (the default). Under ``pmap``, ``vmap`` or ``check_vma=False`` every value
  may differ between workers and nothing is tracked. The probe is a trace-time
  query: the unused ``axis_index`` it builds is removed by XLA.
  """
  axes = axis_tuple(axis_name)
  num_workers(axes)
  return frozenset(a for a in axes if a in varying_axes(lax.axis_index(a)))


def is_invariant(x: jax.Array, axis_name: AxisName) -> bool:
  """Whether ``x`` is typed identical on every worker along all of ``axis_name``."""
  typed = typed_axes(axis_name)
  return len(typed) == len(axis_tuple(axis_name)) and not (typed & varying_axes(x))


def to_varying(tree: Any, axis_name: AxisName) -> Any:
  """Casts invariant leaves to varying, where shard_map tracks the type.

  Needed where values made equal by a collective meet per-worker values, e.g.
  in the two branches of a ``lax.cond``. A no-op under pmap and vmap.
  """
  typed = typed_axes(axis_name)

  def cast(x):
    missing = tuple(a for a in axis_tuple(axis_name) if a in typed and a not in varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def psum(tree: Any, axis_name: AxisName) -> Any:
  """Sum over workers (of an invariant value: N times the value)."""
  num_workers(axis_name)
  return _all_reduce(lax.psum, tree, axis_tuple(axis_name))


def pmean(tree: Any, axis_name: AxisName) -> Any:
  """Mean over workers."""
  num_workers(axis_name)
  return _all_reduce(lax.pmean, tree, axis_tuple(axis_name))


def _all_reduce(reduce: Any, tree: Any, axes: tuple) -> Any:
  """``reduce(tree, axes)``, also under ``vmap`` with ``spmd_axis_name`` on Explicit mesh axes.

  There (the GSPMD path with Explicit axes) the batched all-reduce lowers as a
  reduction of the batch dimension that keeps the operand's sharding, which
  names the workers' axis on that dimension: JAX gives the reduced result the
  wrong sharding (its first dimension sharded over the workers) or rejects it
  (``Length of sharding.spec ... must be equal to aval's ndim``). With those
  axes Auto for the reduction alone, the sharding is dropped from the type
  and the partitioner places the all-reduce; each leaf comes back with the
  sharding it had. Under shard_map the axes are Manual, and under pmap, plain
  vmap or Auto axes nothing changes.
  """
  mesh = jax.sharding.get_abstract_mesh()
  manual = getattr(mesh, "manual_axes", ())
  explicit = tuple(a for a in axes if a in getattr(mesh, "explicit_axes", ()) and a not in manual)
  if not explicit:
    return reduce(tree, axes)
  specs = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, tree)
  return jax.sharding.auto_axes(lambda t: reduce(t, axes), axes=explicit, out_sharding=specs)(tree)


def all_gather(tree: Any, axis_name: AxisName) -> Any:
  """Every worker's value, stacked along a new leading axis of size N.

  The gathered axis is held whole on every worker (under ``jax.vmap`` with
  ``spmd_axis_name`` on Explicit mesh axes, the partitioner would otherwise
  leave it sharded, and it could not be indexed).
  """
  num_workers(axis_name)
  return jax.tree.map(_whole_leading_axis, lax.all_gather(tree, axis_tuple(axis_name)))


def _whole_leading_axis(x: jax.Array) -> jax.Array:
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  if spec is None or not len(spec) or spec[0] is None:
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(None, *spec[1:]))


def all_to_all(tree: Any, axis_name: AxisName) -> Any:
  """Every leaf's leading axis (of size N) scattered: worker k gets block k of every worker.

  The result's leading axis holds, at j, worker j's block for this worker.
  """
  num_workers(axis_name)
  axes = axis_tuple(axis_name)
  return jax.tree.map(lambda x: lax.all_to_all(x, axes, 0, 0), tree)


def agree(flag: jax.Array, axis_name: AxisName) -> jax.Array:
  """``flag`` true where it is true on every device it varies over, beside ``axis_name``.

  A value reduced over the workers' axis is the same on every worker; when
  each worker is itself several devices (params sharded over another mesh
  axis, FSDP), each device checked its own shard, and the devices of a worker
  agree with one scalar all-reduce over those other axes. On a mesh of the
  workers' axis alone, and under pmap and vmap, this adds nothing.
  """
  others = tuple(sorted(varying_axes(flag) - set(axis_tuple(axis_name)), key=str))
  if not others:
    return flag
  return lax.pmin(flag.astype(jnp.int32), others).astype(jnp.bool_)


def sum_beside(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """``x`` summed over the devices it varies over, beside ``axis_name``.

  A worker's own sum of a value each of its devices holds a part of (params
  sharded over another mesh axis, FSDP): one scalar all-reduce over those
  other axes. On a mesh of the workers' axis alone, and under pmap and vmap,
  this adds nothing.
  """
  others = tuple(sorted(varying_axes(x) - set(axis_tuple(axis_name)), key=str))
  if not others:
    return x
  return lax.psum(x, others)


def reduce_gradients(grads: Any, axis_name: AxisName, reduction: str) -> Any:
  """Sums (``"sum"``) or averages (``"mean"``) per-worker gradients.

  Under ``jax.shard_map``, ``jax.grad`` with respect to replicated (invariant)
  params already returns the gradient summed over the axis: the transpose of
  the implicit broadcast is a psum. Such leaves are not summed again, only
  divided by N for ``"mean"``. Varying leaves, and every leaf under pmap, vmap
  or ``check_vma=False``, are reduced with one collective. The reduction runs
  in each gradient's own dtype; ``float0`` leaves (gradients of integer
  inputs) pass through.
  """
  axes = axis_tuple(axis_name)
  n = num_workers(axes)
  typed = typed_axes(axes)

  def reduce_leaf(g):
    if g.dtype == jax.dtypes.float0:
      return g
    varying = varying_axes(g)
    # Axes over which `g` is already a sum: typed, and `g` invariant there.
    to_sum = tuple(a for a in axes if a not in typed or a in varying)
    if to_sum:
      g = _all_reduce(lax.psum, g, to_sum)
    if reduction == "mean" and n > 1:
      g = g / jnp.asarray(n, g.dtype)
    return g

  return jax.tree.map(reduce_leaf, grads)


def broadcast_from(tree: Any, axis_name: AxisName, *, index: int = 0) -> Any:
  """Worker ``index``'s value on every worker (one all-reduce).

  Leaves keep their varying type, so the result can stand in for the input.
  Invariant leaves are already identical everywhere and are returned as is.
  """
  axes = axis_tuple(axis_name)
  n = num_workers(axes)
  if not 0 <= index < n:
    raise ValueError(f"`index` must be in [0, {n}) for {n} workers, got {index}.")
  is_source = lax.axis_index(axes) == index
  typed = typed_axes(axes)

  def bcast(x):
    x = jnp.asarray(x)
    varying = varying_axes(x)
    if len(typed) == len(axes) and not (typed & varying):
      return x
    dtype = x.dtype
    wide = jnp.int32 if dtype == jnp.bool_ else dtype
    y = _all_reduce(lax.psum, jnp.where(is_source, x.astype(wide), jnp.zeros((), wide)), axes)
    y = y.astype(dtype)
    back = tuple(a for a in axes if a in varying)
    return lax.pcast(y, back, to="varying") if back else y

  return jax.tree.map(bcast, tree)
