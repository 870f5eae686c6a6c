"""What a sync computes over the workers, the non-finite contributions left out.

A worker whose contribution to a sync is not finite (a NaN or an infinity in
its pseudo-gradient, params or accumulator) must not stall the others: each
worker checks its own contribution, a bad one enters the reduction as zeros,
and the count of finite workers travels in the same collective
(:func:`finite_sum`, :func:`finite_mean`). The round-robin orderings replay
every worker's commit and leave a bad one out (:func:`replay_commits`).
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from optax_dist import _collectives
from optax_dist import _nonfinite
from optax_dist import _quantize
from optax_dist import _syncloop
from optax_dist._declare import Pending

ORDERINGS = ("simultaneous", "round_robin")


def check_ordering(ordering: Any) -> str:
  if ordering not in ORDERINGS:
    raise ValueError(f"`ordering` must be one of {ORDERINGS}, got {ordering!r}.")
  return ordering


def all_finite(tree: Any, axes: tuple) -> jax.Array:
  """Whether ``tree`` is finite, as every device of this worker sees it.

  No collective over the workers: a value reduced over them is the same on
  each, and a worker's own contribution is its own business. When a worker
  is several devices (params sharded over other mesh axes, FSDP), its devices
  agree with one scalar all-reduce over those axes.
  """
  return _collectives.agree(_nonfinite.all_finite(tree), axes)


# A contribution more than this many times larger (in L2 norm) than the same
# worker's at its previous sync is a spike, left out of the sync.
SPIKE_FACTOR = 100.0


def unless_spike(contribution: Any, last_norm: jax.Array, axes: tuple) -> tuple[Any, jax.Array]:
  """The contribution, or NaN where it is a spike, and the norm to compare the next with.

  A huge but finite contribution (params carried to 1e29 by one gradient of
  1e30) would move the center as far. Each worker compares its own
  contribution's norm with its own at its previous sync: more than
  :data:`SPIKE_FACTOR` times larger, it is made non-finite, so that the sync
  leaves it out (counted as dropped) and the worker restarts on the center.
  Each worker checks itself (no collective, on sync calls only); its first
  sync, and the first after a warm-up or a resize, check nothing. The norm is
  kept even for a spike, so that a contribution that really grew is taken at
  the next sync. Where a worker is several devices (FSDP), they sum their
  shards' squares with one scalar all-reduce among themselves.
  """
  squares = sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in jax.tree.leaves(contribution))
  norm = jnp.sqrt(_collectives.sum_beside(jnp.asarray(squares, jnp.float32), axes))
  spike = jnp.logical_and(last_norm > 0, norm > SPIKE_FACTOR * last_norm)
  checked = jax.tree.map(lambda v: jnp.where(spike, jnp.asarray(jnp.nan, v.dtype), v), contribution)
  return checked, jnp.where(jnp.isfinite(norm), norm, last_norm)


def left_out_unless(sound: Any, x: Any) -> Any:
  """``x``, or NaN where the worker's inner optimizer state ``sound`` is not finite.

  A worker whose optimizer state went bad (Adam's second moment made
  infinite by one huge gradient) takes zero steps from then on while its
  params stay finite: made non-finite, its contribution is left out of the
  sync like any non-finite one, and the worker restarts on the center with a
  fresh inner state. A local check (no collective), run on sync calls only:
  where a worker is several devices, the contribution's own check agrees.
  """
  ok = _nonfinite.all_finite(sound)
  return jax.tree.map(lambda v: jnp.where(ok, v, jnp.asarray(jnp.nan, v.dtype)), x)


def where(ok: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``ok``, ``old`` otherwise, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def zeros_after(tree: Any, count: jax.Array) -> Any:
  """Zeros shaped like ``tree``, written once ``count`` is known.

  ``count`` is a count that the sync's collective gives (never negative,
  which XLA cannot prove). ``jnp.zeros_like`` depends on nothing, so XLA
  cannot order its write into the donated buffer after the reads of the old
  values (what the sync sent) and keeps both in copies. The select on
  ``count >= 0`` orders the write after the collective: the buffer is
  cleared in place.
  """
  return jax.tree.map(lambda x: jnp.where(count >= 0, jnp.zeros_like(x), x), tree)


def zeros_unless(ok: jax.Array, tree: Any) -> Any:
  """``tree`` where ``ok``, zeros otherwise (a dropped worker contributes nothing)."""
  return jax.tree.map(lambda x: jnp.where(ok, x, jnp.zeros_like(x)), tree)


class FiniteSum(NamedTuple):
  """The sum of the finite workers' contributions (see :func:`finite_sum`).

  Attributes:
    total: The sum over the workers whose contribution was finite.
    residual: The new error-feedback residual (as :func:`_quantize.wire_sum`).
    num_finite: How many workers' contributions were finite (float32, exact,
      the same on every worker).
    left_out: Whether this worker's contribution was left out (not finite).
  """

  total: Any
  residual: Any
  num_finite: jax.Array
  left_out: jax.Array

  def mean(self) -> Any:
    """The finite workers' mean (zeros when none was finite)."""
    count = jnp.maximum(self.num_finite, 1.0)
    mean = jax.tree.map(lambda t: t / count.astype(t.dtype), self.total)
    # Rounded where it stands (the count is never negative), so that the two
    # dispatches, and programs that differ around the sync, round alike.
    return _syncloop.rounding_fence(mean, self.num_finite)

  def moved(self, value: Any, axes: tuple) -> jax.Array:
    """Whether the sync moves: some worker was finite, and ``value`` (its result) is."""
    return jnp.logical_and(self.num_finite > 0, all_finite(value, axes))

  def first_phase_pending(self, residual: Any) -> tuple[Pending, Any]:
    """The ring's first phase as a reduced sync (completed by :func:`gathered`).

    It moves if some worker was finite (the gathered mean is checked too);
    the new residual where it does, ``residual`` otherwise.
    """
    moved = self.num_finite > 0
    pending = Pending(self.total, moved, self.left_out, self.num_finite)
    return pending, where(moved, self.residual, residual)

  def pending(self, value: Any, axes: tuple, residual: Any) -> tuple[Pending, Any]:
    """``value`` (the sync's result) as a reduced sync, and the residual it leaves.

    The new residual where the sync moves, ``residual`` (the old one) otherwise.
    """
    moved = self.moved(value, axes)
    pending = Pending(value, moved, self.left_out, self.num_finite)
    return pending, where(moved, self.residual, residual)


def finite_sum(
  tree: Any,
  axes: tuple,
  wire: _quantize.Wire | None = None,
  residual: Any = None,
  *,
  first_phase: bool = False,
) -> FiniteSum:
  """The workers' sum of their contributions ``tree``, the non-finite ones left out.

  Each worker checks its own contribution; a non-finite one enters as zeros
  (and its error-feedback residual restarts from zero), and the count of
  finite workers travels in the same collective as the contribution: one
  more float32 element of the all-reduce, or after the scales of the
  quantized ring. No collective is added.

  ``first_phase``: only the quantized ring's first phase
  (:func:`optax_dist._quantize.ring_reduce`); the total is then the summed
  chunk this worker owns, which :func:`gathered` completes.
  """
  wire = _quantize.Wire() if wire is None else wire
  mine = all_finite(tree, axes)
  contribution = zeros_unless(mine, tree)
  if wire.error_feedback:
    residual = zeros_unless(mine, residual)
  side = count_operand(mine, axes)
  if first_phase:
    fed = residual if wire.error_feedback else None
    decay = wire.error_decay
    total, dropped, count = _quantize.ring_reduce(
      contribution, axes, wire.dtype, residual=fed, decay=decay, side=side
    )
    residual = dropped if wire.error_feedback else residual
  else:
    total, residual, count = _quantize.wire_sum(contribution, axes, wire, residual, side=side)
  return FiniteSum(total, residual, count[0], jnp.logical_not(mine))


def splits_in_two(wire: _quantize.Wire) -> bool:
  """Whether ``wire``'s sum runs in two collectives that a delayed sync can part (a ring)."""
  return wire.quantized and wire.topk_fraction is None


def gathered(pending: Pending, axes: tuple, wire: _quantize.Wire, residual: Any) -> tuple:
  """A reduced sync whose ring stopped after its first phase, completed.

  ``pending`` holds the summed chunk this worker owns (a
  :meth:`FiniteSum.first_phase_pending`). The ring's second phase rounds it
  and gathers every chunk; the result is the finite workers' mean. With
  error feedback, the owner's part of ``residual`` (as the first phase left
  it) goes into the summed chunk before its rounding, and what that rounding
  dropped takes its place where the sync moves. Returns
  ``(pending, residual)``: the mean as the reduced value.
  """
  fed = residual if wire.error_feedback else None
  total, kept = _quantize.ring_gather(pending.value, axes, wire.dtype, residual=fed)
  count = jnp.maximum(pending.num_finite, 1.0)
  mean = jax.tree.map(lambda t: t / count.astype(t.dtype), total)
  mean = _syncloop.rounding_fence(mean, pending.num_finite)
  moved = jnp.logical_and(pending.moved, all_finite(mean, axes))
  if wire.error_feedback:
    residual = where(moved, kept, residual)
  return pending._replace(value=mean, moved=moved), residual


def count_operand(mine: jax.Array, axes: tuple) -> jax.Array:
  """This worker's 0/1 as the float32 vector the count is summed from.

  One element, except under ``vmap`` with an ``spmd_axis_name`` on mesh axes
  (the GSPMD path), where the partitioner shards the reduced result's first
  dimension over the workers: there it takes one element per worker.
  """
  mesh = jax.sharding.get_abstract_mesh()
  manual = getattr(mesh, "manual_axes", ())
  names = getattr(mesh, "axis_names", ())
  spmd = any(a in names and a not in manual for a in axes)
  size = _collectives.num_workers(axes) if spmd else 1
  return jnp.broadcast_to(mine.astype(jnp.float32), (size,))


def finite_mean(grads: Any, axes: tuple) -> tuple[Any, jax.Array]:
  """The finite workers' mean gradient (a warm-up call), and whether this worker's was not.

  One collective, as the plain mean: the count of finite workers travels in
  it. With no finite worker the mean is zero.
  """
  n = _collectives.num_workers(axes)
  typed = _collectives.typed_axes(axes)
  mine = all_finite(grads, axes)
  leaves, treedef = jax.tree.flatten(grads)

  def to_sum(g: Any) -> tuple:
    varying = _collectives.varying_axes(g)
    return tuple(a for a in axes if a not in typed or a in varying)

  # Leaves already summed over the workers (invariant under shard_map: the
  # gradient of replicated params) cannot leave a worker out; they are
  # averaged as before.
  summed = [to_sum(g) == axes for g in leaves]
  sent = [jnp.where(mine, g, jnp.zeros_like(g)) for g, s in zip(leaves, summed, strict=True) if s]
  sent_total, count = _collectives.psum((sent, count_operand(mine, axes)), axes)
  count = jnp.maximum(count[0], 1.0)
  totals = iter(sent_total)
  out = []
  for g, s in zip(leaves, summed, strict=True):
    if s:
      out.append(next(totals) / count.astype(g.dtype))
    else:
      part = to_sum(g)
      g = lax.psum(g, part) if part else g
      out.append(g / jnp.asarray(n, g.dtype) if n > 1 else g)
  return jax.tree.unflatten(treedef, out), jnp.logical_not(mine)


def blended(x: Any, center: Any, blend: float, left_out: jax.Array) -> Any:
  """Where a worker lands after a sync: ``blend * x + (1 - blend) * center``.

  A worker whose contribution was left out, or an element of ``x`` that is
  not finite, lands on the center.
  """
  if not blend:
    return center

  def mix(xi: Any, c: Any) -> Any:
    ok = jnp.logical_and(jnp.logical_not(left_out), jnp.isfinite(xi))
    return jnp.where(ok, blend * xi + (1 - blend) * c, c)

  return jax.tree.map(mix, x, center)


def replay_commits(
  commit: Callable[[Any, Any], Any],
  carry: Any,
  contribution: Any,
  axes: tuple,
  *,
  mine: Callable[[Any], Any],
  after: bool,
) -> tuple[Any, Any, jax.Array, jax.Array]:
  """The reference's parameter server: every worker's commit, in worker order.

  Every worker receives all workers' ``contribution`` (one all-gather) and
  runs ``carry = commit(carry, contribution_k)`` for k = 0, ..., N - 1, so all
  workers end with the same final carry. A contribution that is not finite
  is not committed (every worker sees which, in what it gathered). Returns
  ``mine(carry)`` as this worker saw it just before (``after=False``) or just
  after (``after=True``) its own commit, the final carry, whether the center
  moved (some contribution was finite, and so is the final carry), and
  whether this worker's own contribution was left out.
  """
  me = _collectives.worker_index(axes)
  gathered = _collectives.all_gather(contribution, axes)
  n = _collectives.num_workers(axes)
  each = [_nonfinite.all_finite(jax.tree.map(lambda g, k=k: g[k], gathered)) for k in range(n)]
  # A worker sharded over other mesh axes (FSDP) agrees on every flag at once.
  oks = _collectives.agree(jnp.stack(each), axes)
  # A Python loop over the N (static, few) commits: straight-line code, so a
  # static sync step holds no loop.
  c = _collectives.to_varying(carry, axes)
  kept = mine(c)
  for k in range(n):
    if not after:
      kept = jax.tree.map(lambda m, v, k=k: jnp.where(k == me, v, m), kept, mine(c))
    committed = commit(c, jax.tree.map(lambda g, k=k: g[k], gathered))
    c = where(oks[k], committed, c)
    if after:
      kept = jax.tree.map(lambda m, v, k=k: jnp.where(k == me, v, m), kept, mine(c))
  final = c
  moved = jnp.logical_and(jnp.any(oks), all_finite(final, axes))
  # This worker's own flag, checked on its own contribution (the same value
  # as its entry of `oks`, without indexing a gathered array by worker).
  return kept, final, moved, jnp.logical_not(all_finite(contribution, axes))
