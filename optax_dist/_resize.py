"""Resizing: a checkpoint of N per-worker copies becomes one of M copies.

Every worker restarts from the center, and each field of a periodic state
restarts as its algorithm's declaration says (:mod:`optax_dist._declare`).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_dist import _declare
from optax_dist import _schedule
from optax_dist import _state


def resize_workers(
  params: optax.Params, opt_state: optax.OptState, num_workers: int
) -> tuple[optax.Params, optax.OptState]:
  """Per-worker params and state for a different number of workers.

  The way to resume a checkpoint on a different number of replicas (the JAX
  answer to elastic membership): the trees of a run with N workers, each leaf
  with a leading worker axis of N, become trees with a leading axis of M =
  ``num_workers``, as if every worker had just synced:

  * every worker's params are the center (in the params' dtype);
  * the center, the outer (DiLoCo) or center (AGN) optimizer's state and the
    counters are kept, so :func:`optax_dist.global_step` and the sync
    schedule go on where they were (each worker's count of dropped syncs,
    :func:`optax_dist.dropped_syncs`, restarts at zero);
  * the inner optimizer's floating leaves (Adam's moments, ...) are averaged
    over the old workers, its integer leaves (step counts) taken from worker
    0, and so are the leaves of any other state in ``opt_state`` (a chain's
    other transformations);
  * accumulators (AGN) and error-feedback residuals restart at zero, snapshots
    (EASGD) at the center;
  * a delayed sync in flight (``delay >= 2``, reduced and not yet applied)
    is dropped: its apply call leaves the center as it was and counts as a
    skipped sync.

  Lay the result out on the new mesh with :func:`optax_dist.per_worker`'s
  sharding (``jax.device_put`` with a ``NamedSharding`` over the workers'
  axis), or use it under ``jax.vmap``.

  Args:
    params: Per-worker params, a leading worker axis of N on every leaf.
    opt_state: The matching per-worker optimizer state; it must hold one
      periodic transform (the center to restart from).
    num_workers: M, the new number of workers (>= 1).

  Returns:
    ``(params, opt_state)`` with a leading worker axis of M.

  Raises:
    ValueError: for ``num_workers < 1``, a state without a periodic
      transform, or leaves without the same leading worker axis.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.model_average(optax.sgd(0.1), axis_name="w", interval_steps=4)
    >>> params = jnp.array([[1.0, 2.0], [3.0, 4.0]])  # Two workers, drifted apart.
    >>> state = jax.vmap(tx.init)(jnp.zeros((2, 2)))  # Their center is at zero.
    >>> params, state = optax_dist.resize_workers(params, state, 3)
    >>> params
    Array([[0., 0.],
           [0., 0.],
           [0., 0.]], dtype=float32)
    >>> state.sync.calls.shape
    (3,)
  """
  if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f"`num_workers` must be an int >= 1, got {num_workers!r}.")
  periodic = [s for s in _state.iter_states(opt_state) if _state.is_periodic(s)]
  if len(periodic) != 1:
    raise ValueError(
      "resize_workers needs a state that holds exactly one periodic optax_dist transform "
      f"({_declare.algorithms()}), whose center every worker "
      f"restarts from; this one holds {len(periodic)}."
    )
  leaves = jax.tree.leaves((params, opt_state))
  old = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(old) != 1 or None in old:
    raise ValueError(
      "resize_workers takes per-worker trees: every leaf of params and opt_state needs the "
      f"same leading worker axis; their leading sizes are {sorted(map(str, old))}."
    )

  def spread(tree: Any) -> Any:
    """Worker 0's value, for every new worker."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x[:1], (num_workers, *x.shape[1:])), tree)

  def pooled(tree: Any) -> Any:
    """Floating leaves averaged over the old workers, the others from worker 0."""

    def pool(x: Any) -> Any:
      if jnp.issubdtype(x.dtype, jnp.floating):
        x = jnp.mean(x, axis=0, keepdims=True, dtype=jnp.float32).astype(x.dtype)
      return jnp.broadcast_to(x[:1], (num_workers, *x.shape[1:]))

    return jax.tree.map(pool, tree)

  center = periodic[0].center

  def restarted(state: Any) -> Any:
    declared = _declare.declaration(state)
    fields = {}
    for name in state._fields:
      value = getattr(state, name)
      if name == "sync":  # The counters go on; the new workers have dropped nothing.
        fields[name] = spread(value._replace(num_dropped=jnp.zeros_like(value.num_dropped)))
      elif name == "pending" and jax.tree.leaves(value):
        # A delayed sync in flight is dropped: its apply call keeps the center.
        fresh = _declare.Pending.fresh(jax.tree.map(lambda x: x[0], value.value))
        fields[name] = jax.tree.map(
          lambda x: jnp.broadcast_to(x, (num_workers, *jnp.shape(x))), fresh
        )
      elif name in _declare.ENGINE_FIELDS:
        fields[name] = resize(value)
      else:
        field = declared.fields[name]
        if field.restart == "keep":
          fields[name] = spread(value) if field.shared else resize(value)
        else:
          fields[name] = declared.restart(name, spread(value), spread(center))
    return type(state)(**fields)

  def resize(tree: Any) -> Any:
    def one(node: Any) -> Any:
      if _state.is_periodic(node):
        return restarted(node)
      if isinstance(node, _schedule.SyncState):
        return spread(node)
      return pooled(node)

    return jax.tree.map(one, tree, is_leaf=lambda x: _state.is_periodic(x) or _is_array(x))

  # The center where the periodic transform has one; elsewhere (leaves it
  # does not see, e.g. under optax.masked) worker 0's params.
  start = _state.center_params(opt_state, params)
  new_params = jax.tree.map(
    lambda p, c: jnp.broadcast_to(c[:1].astype(p.dtype), (num_workers, *p.shape[1:])),
    params,
    start,
  )
  return new_params, resize(opt_state)


def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")
