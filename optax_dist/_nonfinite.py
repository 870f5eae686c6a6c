"""Skipping a step on every worker when any worker's gradients are not finite."""

import numbers
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_dist import _collectives


class ApplyIfAllFiniteState(NamedTuple):
  """State of the transformation returned by :func:`apply_if_all_finite`.

  The counters are the same on every worker.

  Attributes:
    notfinite_count: Number of consecutive steps skipped because some worker's
      gradients held an Inf or a NaN (int32); 0 after a step that is applied.
    last_finite: Whether every worker's gradients were finite at the last step.
    total_notfinite: Number of steps whose gradients were not finite on some
      worker since init (int32), never reset.
    total_skipped: Number of steps skipped since init (int32): the non-finite
      ones, less those applied anyway after ``max_consecutive_errors``.
    inner_state: State of the wrapped transformation.
  """

  notfinite_count: jax.Array
  last_finite: jax.Array
  total_notfinite: jax.Array
  total_skipped: jax.Array
  inner_state: optax.OptState


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating element of ``tree`` is finite (a local reduction, no collective)."""
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def apply_if_all_finite(
  inner: optax.GradientTransformation,
  *,
  axis_name: _collectives.AxisName,
  max_consecutive_errors: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips a step on every worker if any worker's gradient is not finite.

  The cross-worker counterpart of ``optax.apply_if_finite``, safe around the
  periodic transforms (:func:`elastic_average`, :func:`agn`,
  :func:`model_average`, :func:`diloco`). Each step every worker checks its own
  gradients, and one scalar all-reduce (a ``psum`` of a 0/1 flag over
  ``axis_name``) tells all of them whether any worker saw an Inf or a NaN.
  Then, on every worker alike:

  * all finite: ``inner`` updates as usual;
  * otherwise: the update is all zeros and ``inner``'s state is kept as it
    was, so no step counter advances and no center moves.

  Why not ``optax.apply_if_finite``: it decides on each worker alone. Wrapped
  around a periodic transform, the worker that saw the NaN skips its step and
  its call counter falls one behind the others'. From then on it syncs one
  step later than they do: under ``jax.shard_map``, ``pmap`` or several
  processes the others wait in the sync's collective for a worker that is not
  there (a deadlock, or a rendezvous timeout on CPU); under ``vmap`` the
  workers silently drift apart, each with its own sync schedule. Deciding on
  the all-reduced flag keeps every worker's counters, params and center
  identical.

  Without any guard a periodic transform already keeps training going: a
  worker whose params turned non-finite is left out of the next sync and
  restarts on the center (see :func:`optax_dist.restart_nonfinite`). This
  guard goes further: the bad step is skipped before it reaches any params,
  so no worker loses the local steps until the sync.

  Cost: the one scalar all-reduce per step (the inner transform's own
  collectives are unchanged). The inner update is computed on every step and
  discarded with a select when skipped, so a skipped sync step still runs the
  sync's collectives (on every worker alike) and discards their result.

  Args:
    inner: The transformation to protect, e.g. a periodic transform.
    axis_name: The mapped axis (or tuple of axes) of all the workers that
      must agree: the axis of the periodic transform, and for a hierarchical
      composition every axis of the mesh.
    max_consecutive_errors: ``None`` (the default) skips every non-finite
      step. An int ``k`` applies the update anyway after ``k`` consecutive
      skipped steps, as ``optax.apply_if_finite`` does.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is an
    :class:`ApplyIfAllFiniteState`.

  Raises:
    ValueError: if ``max_consecutive_errors`` is negative.
    NameError: at update time, if ``axis_name`` is not bound.

  Examples:
    Worker 1's gradient is NaN at the first step: both workers skip it, and
    their elastic-averaging counters stay in step.

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.apply_if_all_finite(
    ...     optax_dist.elastic_average(optax.sgd(1.0), axis_name="w",
    ...                                communication_period=2),
    ...     axis_name="w")
    >>> def train(params, grads):
    ...   state = tx.init(params)
    ...   for g in grads:
    ...     updates, state = tx.update(g, state, params)
    ...     params = optax.apply_updates(params, updates)
    ...   return params, state.total_notfinite, state.inner_state.sync.calls
    >>> grads = jnp.array([[1.0, -1.0, -1.0], [jnp.nan, -2.0, -2.0]])
    >>> params, skipped, step = jax.vmap(train, axis_name="w")(jnp.zeros(2), grads)
    >>> skipped, step
    (Array([1, 1], dtype=int32), Array([2, 2], dtype=int32))
  """
  if max_consecutive_errors is not None and (
    isinstance(max_consecutive_errors, bool)
    or not isinstance(max_consecutive_errors, numbers.Integral)
    or max_consecutive_errors < 0
  ):
    raise ValueError(
      f"`max_consecutive_errors` must be None or an int >= 0, got {max_consecutive_errors!r}."
    )
  axes = _collectives.axis_tuple(axis_name)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return ApplyIfAllFiniteState(
      notfinite_count=jnp.zeros([], jnp.int32),
      last_finite=jnp.array(True),
      total_notfinite=jnp.zeros([], jnp.int32),
      total_skipped=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    bad = jnp.logical_not(all_finite(updates)).astype(jnp.int32)
    # The one collective: how many workers saw a non-finite gradient.
    finite_everywhere = _collectives.psum(bad, axes) == 0
    notfinite_count = jnp.where(
      finite_everywhere, jnp.zeros([], jnp.int32), optax.safe_increment(state.notfinite_count)
    )
    apply = finite_everywhere
    if max_consecutive_errors is not None:
      apply = jnp.logical_or(apply, notfinite_count > max_consecutive_errors)
    new_updates, new_inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    # A select, not a branch: every worker runs the same collectives.
    updates = jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), new_updates)
    inner_state = jax.tree.map(
      lambda new, old: jnp.where(apply, new, old), new_inner_state, state.inner_state
    )
    total = jnp.where(
      finite_everywhere, state.total_notfinite, optax.safe_increment(state.total_notfinite)
    )
    skipped = state.total_skipped + jnp.logical_not(apply).astype(jnp.int32)
    return updates, ApplyIfAllFiniteState(
      notfinite_count, finite_everywhere, total, skipped, inner_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
