"""Elastic Averaging SGD (EASGD): workers tied to a center by an elastic force."""

import numbers
from typing import Any
from typing import NamedTuple

import jax
import optax

from optax_dist import _collectives
from optax_dist import _declare
from optax_dist import _engine
from optax_dist import _quantize
from optax_dist import _reduce
from optax_dist import _schedule


class ElasticAverageState(NamedTuple):
  """State of the transformation returned by :func:`elastic_average`.

  Attributes:
    inner_state: State of the local (worker) optimizer.
    center: This worker's copy of the center variables (identical on every
      worker), in float32 for low-precision params.
    snapshot: The center as this worker read it at its last sync (its stale
      copy), read by the ``rho`` term only: ``optax.EmptyState()`` when
      ``rho`` is a Python zero (the default), which needs no snapshot.
    residual: With ``error_feedback``, what the compression of a sync dropped
      (from this worker's difference to the center, and from the summed chunk
      it owns), sent again at the next sync; ``optax.EmptyState()`` otherwise.
    sync: The engine's counters and schedule (:class:`optax_dist.SyncState`).

  :doc:`/sync_options` says more of the fields every periodic state shares.
  """

  inner_state: optax.OptState
  center: optax.Params
  snapshot: optax.Params | optax.EmptyState
  residual: optax.Params | optax.EmptyState
  sync: _schedule.SyncState


# The roles of the state's fields (the engine handles inner_state and sync). The
# snapshot, which the rho term reads on every call, stays on the device.
FIELDS = _declare.Declaration(
  ElasticAverageState,
  "elastic_average",
  center=_declare.CENTER,
  snapshot=_declare.Field(restart="center"),
  residual=_declare.RESIDUAL,
)


def elastic_average(
  inner: optax.GradientTransformation,
  *,
  axis_name: _collectives.AxisName,
  communication_period: int = 10,
  moving_rate: float | jax.Array | None = None,
  rho: float | jax.Array = 0.0,
  ordering: str = "simultaneous",
  sync_warmup: int | None = None,
  comm_dtype: Any = None,
  error_feedback: bool = False,
  host_offload: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Elastic Averaging SGD (EASGD): an elastic pull every ``p`` calls.

  The counterpart of TensorFlow's ``ElasticAverageOptimizer`` (Zhang,
  Choromanska and LeCun, 2015). Each worker :math:`k` keeps its own params
  :math:`x_k`, a copy of the center :math:`c` and a stale snapshot
  :math:`\tilde c_k` of it. Every call (step counter :math:`s`):

  .. math::

    g' = g + \rho\,(x_k - \tilde c_k), \qquad x_k \leftarrow x_k + \mathrm{inner}(g'),
    \qquad s \leftarrow s + 1,

  and when :math:`s \bmod p = 0` (calls :math:`p, 2p, \dots`), on the updated
  :math:`x_k`, with :math:`\alpha` the moving rate:

  .. math::

    \tilde c_k \leftarrow c, \quad d_k = x_k - \tilde c_k, \quad
    x_k \leftarrow x_k - \alpha d_k, \quad c \leftarrow c + \alpha \sum_k d_k.

  An elastic step conserves :math:`\sum_k x_k + c`.

  ``ordering="simultaneous"`` (the default): all workers pull against the same
  center and the center moves by the sum of their differences, one all-reduce
  of the params per sync. ``ordering="round_robin"`` emulates the reference's
  parameter server exactly: worker 0 syncs against the center, then worker 1
  against the center as worker 0 left it, and so on; each worker keeps as
  snapshot the center it read at its own turn. It all-gathers the params (N
  copies arrive on every worker, about N/2 times the bytes of the ring
  all-reduce behind ``"simultaneous"``) and runs the N commits in order on
  every worker.

  Non-sync steps run no collective: the sync is a loop of zero or one trip.
  The center and snapshot of bfloat16/float16 params are kept in float32, so
  an elastic move below the params' resolution still reaches the center;
  updates come back in the params' dtype.

  ``comm_dtype`` (``ordering="simultaneous"`` only) chooses the format of the
  summed differences on the wire: ``jnp.bfloat16``/``jnp.float16``, or the
  quantized ring of ``jnp.int8`` (or a float8 type), about a quarter of the
  bytes of a float32 all-reduce, or of ``jnp.int4``/``jnp.int2``, with
  optional ``error_feedback``.

  The options EASGD shares with the other periodic transforms are explained
  once in :doc:`/sync_options`: the static ``sync`` flag of ``update``, the
  synchronous warm-up ``sync_warmup=K`` (post-local SGD), the formats on the
  wire and their error bounds, and what a sync does with a worker that is not
  finite: it is left out, the center moves by the finite workers' differences
  alone, and the dropped worker gets a fresh inner state and lands on the
  center as it stands after the sync.

  Start all workers from the same params (:func:`optax_dist.broadcast_params`,
  the reference's ``get_init_op``); ``init`` is local and the center starts as
  the params given to it. Read the center with :func:`optax_dist.center_params`
  (the reference's ``swapping_saver``) and the number of syncs with
  :func:`optax_dist.global_step` (the reference counts one per worker commit,
  N per round).

  The reference's default ``rho`` is ``moving_rate / learning_rate``; optax
  cannot read an inner learning rate, so here ``rho`` defaults to 0. Pass
  ``rho=moving_rate / learning_rate`` to reproduce it.

  Args:
    inner: The local optimizer (e.g. ``optax.sgd(0.1)``).
    axis_name: The mapped axis (or tuple of axes) of the workers.
    communication_period: ``p``, calls between syncs (static int >= 1).
    moving_rate: ``alpha`` in (0, 1]; ``None`` means ``0.9 / p / N`` as in the
      reference, N being the number of workers. May be traced (e.g. under
      ``optax.inject_hyperparams``).
    rho: The elastic term's strength in the gradient, >= 0. May be traced.
    ordering: ``"simultaneous"`` or ``"round_robin"`` (static).
    sync_warmup: ``K``, synchronous calls before the local steps start
      (post-local SGD; static int >= 0, ``None`` is 0).
    comm_dtype: The summed differences' format on the wire (static;
      ``ordering="simultaneous"`` only): ``None`` (the center's dtype),
      ``jnp.bfloat16``/``jnp.float16``, or the quantized ring of ``jnp.int8``,
      a float8 type, ``jnp.int4`` or ``jnp.int2``. Bytes and error bounds:
      :doc:`/sync_options`.
    error_feedback: With a quantized ``comm_dtype``, send again at the next
      sync what the rounding dropped (static bool; one params-sized buffer).
    host_offload: Keep the center and the residual, which a sync alone reads,
      in the host's pinned memory between syncs; the snapshot, read on every
      call, stays on the device (static bool).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is
    :class:`optax_dist.ElasticAverageState`. Its ``update`` needs ``params``
    and takes the static extra argument ``sync`` (see :doc:`/sync_options`).

  Raises:
    ValueError: for a period < 1, ``sync_warmup < 0``, a moving rate outside
      (0, 1], a negative ``rho``, an unknown ordering, an unsupported
      ``comm_dtype`` (or one with ``"round_robin"``), a 64-bit ``comm_dtype``
      without JAX's 64-bit mode, ``error_feedback`` without an 8-bit
      ``comm_dtype``, a static ``sync`` flag that names a fragment the transform does not
      have or a warm-up it does not have, ``params=None`` at update time, or,
      at update time, a state whose inner optimizer state another inner
      optimizer made.
    TypeError: if ``inner`` is not an optax transformation, for a period or
      ``sync_warmup`` that is not a Python int, a ``host_offload`` that is not
      a bool, integer params, or a traced ``sync`` flag.
    NameError: at update time, if ``axis_name`` is not bound.

  Examples:
    One worker, period 2, moving rate 1 (the reference's own test): after two
    calls the worker is pulled back to the old center and the center moves to
    where the worker was.

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.elastic_average(
    ...     optax.sgd(1.0), axis_name="w", communication_period=2, moving_rate=1.0)
    >>> def train(params):
    ...   state = tx.init(params)
    ...   for _ in range(2):
    ...     updates, state = tx.update(-jnp.ones(2), state, params)
    ...     params = optax.apply_updates(params, updates)
    ...   return params, optax_dist.center_params(state)
    >>> jax.vmap(train, axis_name="w")(jnp.array([[0.0, 1.0]]))
    (Array([[0., 1.]], dtype=float32), Array([[2., 3.]], dtype=float32))

  References:
    Zhang, Choromanska, LeCun, `Deep learning with Elastic Averaging SGD
    <https://arxiv.org/abs/1412.6651>`_, NeurIPS 2015.
  """
  period = _schedule.check_period(communication_period, "communication_period")
  wire = _quantize.make_wire(comm_dtype, error_feedback)
  # A traced rate (inject_hyperparams) is not checked.
  if isinstance(moving_rate, numbers.Real) and not 0 < float(moving_rate) <= 1:
    raise ValueError(f"`moving_rate` must be in (0, 1], got {moving_rate}.")
  if isinstance(rho, numbers.Real) and float(rho) < 0:
    raise ValueError(f"`rho` must be >= 0, got {rho}.")
  _reduce.check_ordering(ordering)
  axes = _collectives.axis_tuple(axis_name)
  if wire.dtype is not None and ordering != "simultaneous":
    raise ValueError(
      "`comm_dtype` applies to ordering='simultaneous' (one summed reduction); "
      "ordering='round_robin' gathers every worker's params exactly, as the reference's "
      "parameter server reads them."
    )
  # A Python zero needs no rho term, hence no snapshot; a traced rho
  # (inject_hyperparams) may become non-zero and keeps one.
  use_rho = not (isinstance(rho, numbers.Real) and rho == 0)

  def on_sync(local, fields):
    center, residual = fields.center, fields.residual
    alpha = moving_rate
    if alpha is None:
      alpha = 0.9 / period / _collectives.num_workers(axes)
    if ordering == "simultaneous":
      snapshot = center
      diff = jax.tree.map(lambda xi, c: xi - c, local.x, center)
      # The finite workers' differences (one left out enters as zero).
      reduced = _reduce.finite_sum(diff, axes, wire, residual)
      residual, total = reduced.residual, reduced.total
      moved = reduced.moved(total, axes)
      left_out = reduced.left_out
      new_center = jax.tree.map(lambda c, t: c + alpha * t, center, total)
    else:
      # Worker k reads the center as workers 0..k-1 left it (its snapshot)
      # and commits c <- c + alpha (x_k - c).
      def commit(c, x_k):
        return jax.tree.map(lambda ci, xi: ci + alpha * (xi - ci), c, x_k)

      snapshot, new_center, moved, left_out = _reduce.replay_commits(
        commit, center, local.x, axes, mine=lambda c: c, after=False
      )
    correction = jax.tree.map(lambda xi, s: -alpha * (xi - s), local.x, snapshot)
    center = _reduce.where(moved, new_center, center)
    new = fields._replace(center=center, residual=_reduce.where(moved, residual, fields.residual))
    if use_rho:
      snapshot = _reduce.where(left_out, center, snapshot)
      snapshot = _reduce.where(moved, snapshot, fields.snapshot)
      new = new._replace(snapshot=_reduce.where(left_out, center, snapshot))
    updates = _reduce.where(moved, local.corrected(correction), local.updates)
    # A worker left out restarts on the center.
    updates = _reduce.where(left_out, local.moved_to(center), updates)
    return _declare.Synced(updates, new, moved, left_out)

  def before(grads, state, params):
    if use_rho:
      # g' = g + rho (x - c_snap): the gradient of rho/2 ||x - c_snap||^2.
      grads = jax.tree.map(
        lambda g, x, c: g + (rho * (x.astype(c.dtype) - c)).astype(g.dtype),
        grads,
        params,
        state.snapshot,
      )
    return grads, state

  return _engine.periodic(
    "elastic_average",
    inner,
    FIELDS,
    _engine.OnePhase(on_sync),
    axis_name=axis_name,
    period_name="communication_period",
    period=period,
    init=lambda center: {
      "snapshot": center if use_rho else optax.EmptyState(),
      "residual": wire.residual_like(center),
    },
    before=before,
    sync_warmup=sync_warmup,
    host_offload=host_offload,
  )
