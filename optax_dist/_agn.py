"""Accumulated Gradient Normalization (AGN): workers commit averaged gradients to a center."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_dist import _collectives
from optax_dist import _declare
from optax_dist import _engine
from optax_dist import _reduce
from optax_dist import _schedule


class AGNState(NamedTuple):
  """State of the `GradientTransformation` returned by :func:`agn`.

  Attributes:
    inner_state: State of the local (worker) optimizer.
    center_state: State of the center's optimizer (the same inner optimizer,
      with its own slots, as the reference keeps them for the center).
    center: This worker's copy of the center variables (identical on every
      worker), in float32 for low-precision params.
    accumulator: The gradients summed since the last sync, in center precision.
    sync: The engine's counters and schedule (:class:`optax_dist.SyncState`);
      :doc:`/sync_options` says more.
  """

  inner_state: optax.OptState
  center_state: optax.OptState
  center: optax.Params
  accumulator: optax.Params
  sync: _schedule.SyncState


# The roles of the state's fields (the engine handles inner_state and sync). The
# accumulator, added to on every call, stays on the device.
FIELDS = _declare.Declaration(
  AGNState,
  "agn",
  center=_declare.CENTER,
  center_state=_declare.Field(offloaded=True, shared=True),
  accumulator=_declare.Field(restart="zeros"),
)


def agn(
  inner: optax.GradientTransformation,
  *,
  axis_name: _collectives.AxisName,
  communication_period: int = 10,
  ordering: str = "simultaneous",
  center_reduction: str = "sum",
  sync_warmup: int | None = None,
  host_offload: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AGN: local steps, then a normalized commit to a center.

  The counterpart of TensorFlow's ``AGNOptimizer`` (Hermans, 2017). Each
  worker :math:`k` steps locally and accumulates its gradients; every ``p``
  calls it commits the accumulated gradient, normalized by ``p``, to a center
  that the same inner optimizer (with its own slots) updates, and restarts
  from the center:

  .. math::

    x_k \leftarrow x_k + \mathrm{inner}(g), \quad a_k \leftarrow a_k + g,
    \quad s \leftarrow s + 1,

  and when :math:`s \bmod p = 0` (calls :math:`p, 2p, \dots`):

  .. math::

    c \leftarrow c + \mathrm{inner}_c\Big(\sum_k a_k / p\Big), \quad
    x_k \leftarrow c, \quad a_k \leftarrow 0.

  The accumulated gradient is divided by ``p``, not by the number of workers
  N. ``ordering="simultaneous"`` (the default) feeds the center optimizer the
  sum of the workers' normalized gradients in one step, one all-reduce of the
  params per sync. ``ordering="round_robin"`` emulates the reference's
  parameter server: it all-gathers the accumulators (about N/2 times the
  bytes of the all-reduce) and applies the N commits in worker order, one
  center-optimizer step each; worker ``k`` leaves with the center as it stood
  right after its own commit (worker 0 does not see worker 1's).

  Parity with the reference: it uses one optimizer object for the local and
  the center variables, so with Adam their bias-correction powers are shared;
  here each has its own state. The results agree exactly for SGD, and for
  Adam with ``b1 = b2 = 0``. In simultaneous mode the center optimizer takes
  one step per sync where the parameter server takes N, and with SGD feeding
  :math:`\sum_k a_k` gives the center N times the local learning rate (as the
  reference's N commits do); ``center_reduction="mean"`` feeds
  :math:`\frac1N \sum_k a_k` instead (in round_robin each commit is scaled by
  :math:`1/N`).

  The options AGN shares with the other periodic transforms are explained
  once in :doc:`/sync_options`: the static ``sync`` flag of ``update``, the
  synchronous warm-up ``sync_warmup=K`` (post-local SGD), and what a sync
  does with a worker that is not finite: its commit is left out of the sum
  (with ``center_reduction="mean"``, the mean is over the finite workers),
  and it gets a fresh inner state and restarts on the center.

  A sync's update lands each worker on the center up to one float rounding
  (``params + (center - params)``). Non-sync steps run no collective. Each
  worker holds the center, the
  accumulator and the center optimizer's state beside its own (three extra
  params-sized buffers plus the inner optimizer's slots). Read the center with
  :func:`optax_dist.center_params` and the number of syncs with
  :func:`optax_dist.global_step` (the reference counts one per worker commit).

  Args:
    inner: The optimizer for both the local and the center updates (e.g.
      ``optax.adam(0.1)``).
    axis_name: The mapped axis (or tuple of axes) of the workers.
    communication_period: ``p``, calls between syncs (static int >= 1).
    ordering: ``"simultaneous"`` or ``"round_robin"`` (static).
    center_reduction: ``"sum"`` (the reference) or ``"mean"`` of the workers'
      normalized accumulated gradients (static).
    sync_warmup: ``K``, synchronous calls before the local steps start
      (post-local SGD; static int >= 0, ``None`` is 0).
    host_offload: Keep the center and its optimizer's state, which a sync
      alone reads, in the host's pinned memory between syncs; the
      accumulator, added to on every call, stays on the device (static bool).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is
    :class:`optax_dist.AGNState`. Its ``update`` needs ``params`` and takes
    the static extra argument ``sync`` (see :doc:`/sync_options`).

  Raises:
    ValueError: for a period < 1, ``sync_warmup < 0``, an unknown ordering or
      center reduction, a static ``sync`` flag that names a fragment the transform does not
      have or a warm-up it does not have, ``params=None`` at update time, or,
      at update time, a state whose inner optimizer state another inner
      optimizer made.
    TypeError: if ``inner`` is not an optax transformation, for a period or
      ``sync_warmup`` that is not a Python int, a ``host_offload`` that is not
      a bool, integer params, or a traced ``sync`` flag.
    NameError: at update time, if ``axis_name`` is not bound.

  Examples:
    One worker, period 4, Adam with ``b1 = b2 = 0`` (each step moves about
    ``0.1 * sign(g)``), the reference's own test: four local steps, then the
    worker restarts from the center, which took one step.

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.agn(
    ...     optax.adam(0.1, b1=0.0, b2=0.0), axis_name="w", communication_period=4)
    >>> step = jax.vmap(lambda p, s: tx.update(-jnp.ones(2), s, p), axis_name="w")
    >>> params = jnp.array([[0.0, 0.5]])  # One worker.
    >>> state = jax.vmap(tx.init)(params)
    >>> for _ in range(4):
    ...   updates, state = step(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> print(params.round(6), optax_dist.center_params(state))
    [[0.1 0.6]] [[0.1 0.6]]

  References:
    Hermans, Spanakis, Möckel, `Accumulated Gradient Normalization
    <https://arxiv.org/abs/1710.02368>`_, ACML 2017.
  """
  period = _schedule.check_period(communication_period, "communication_period")
  _reduce.check_ordering(ordering)
  _collectives.check_reduction(center_reduction, "center_reduction")
  axes = _collectives.axis_tuple(axis_name)
  _declare.check_transformation(inner, "inner", "optax.adamw(1e-3)")
  inner = optax.with_extra_args_support(inner)

  def on_sync(local, fields):
    center, center_state = fields.center, fields.center_state
    scale = 1.0 / period
    if center_reduction == "mean":
      scale = scale / _collectives.num_workers(axes)
    normalized = jax.tree.map(lambda a: a * scale, fields.accumulator)
    if ordering == "simultaneous":
      # The finite workers' commits; with "mean", their mean.
      reduced = _reduce.finite_sum(normalized, axes)
      total = reduced.total
      if center_reduction == "mean":
        n = _collectives.num_workers(axes)
        rescale = n / jnp.maximum(reduced.num_finite, 1.0)
        total = jax.tree.map(lambda t: t * rescale.astype(t.dtype), total)
      moved = reduced.moved(total, axes)
      left_out = reduced.left_out
      # Cleared after the all-reduce that read it, in its own buffer.
      cleared = _reduce.zeros_after(fields.accumulator, reduced.num_finite)
      center_updates, new_center_state = inner.update(total, center_state, center)
      new_center = optax.apply_updates(center, center_updates)
      target = new_center
    else:
      # Each commit is one step of the center's optimizer; worker k leaves
      # with the center right after its own commit.
      def commit(c, g_k):
        c, c_state = c
        u, c_state = inner.update(g_k, c_state, c)
        return optax.apply_updates(c, u), c_state

      target, (new_center, new_center_state), moved, left_out = _reduce.replay_commits(
        commit, (center, center_state), normalized, axes, mine=lambda c: c[0], after=True
      )
      cleared = _declare.zeros_like(fields.accumulator)
    center = _reduce.where(moved, new_center, center)
    # A worker left out lands on the center as it stands after every commit.
    target = _reduce.where(left_out, center, _reduce.where(moved, target, fields.center))
    new = fields._replace(
      center=center,
      center_state=_reduce.where(moved, new_center_state, center_state),
      accumulator=cleared,
    )
    return _declare.Synced(local.moved_to(target), new, moved, left_out)

  def before(grads, state, params):
    # Every call adds its gradient to the accumulator.
    accumulator = jax.tree.map(lambda a, g: a + g.astype(a.dtype), state.accumulator, grads)
    return grads, state._replace(accumulator=accumulator)

  return _engine.periodic(
    "agn",
    inner,
    FIELDS,
    _engine.OnePhase(on_sync),
    axis_name=axis_name,
    period_name="communication_period",
    period=period,
    init=lambda center: {
      "center_state": inner.init(center),
      "accumulator": _declare.zeros_like(center),
    },
    before=before,
    sync_warmup=sync_warmup,
    host_offload=host_offload,
  )
