"""Periodic model averaging (local SGD): the workers' params averaged every few steps."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_dist import _collectives
from optax_dist import _declare
from optax_dist import _engine
from optax_dist import _quantize
from optax_dist import _reduce
from optax_dist import _schedule


class ModelAverageState(NamedTuple):
  """State of the `GradientTransformation` returned by :func:`model_average`.

  Attributes:
    inner_state: State of the local (worker) optimizer.
    center: The workers' mean params at the last sync (the params at init
      before the first), in float32 for low-precision params.
    residual: With ``error_feedback``, what the compression of a sync dropped
      (from this worker's difference to the center, and from the summed chunk
      it owns), sent again at the next sync; ``optax.EmptyState()`` otherwise.
    last_norm: The L2 norm of this worker's difference to the center at its
      last sync (float32, 0 before the first; one per fragment), against which
      the next is checked for a spike (see "When a worker goes bad" in the
      docs).
    pending: With ``delay >= 2``, the average reduced and not yet applied (a
      :class:`optax_dist.Pending`); ``optax.EmptyState()`` otherwise.
    sync: The engine's counters and schedule (:class:`optax_dist.SyncState`).

  :doc:`/sync_options` says more of the fields every periodic state shares.
  """

  inner_state: optax.OptState
  center: optax.Params
  residual: optax.Params | optax.EmptyState
  last_norm: jax.Array | tuple[jax.Array, ...]
  pending: _declare.Pending | optax.EmptyState
  sync: _schedule.SyncState


# The roles of the state's fields (the engine handles inner_state, pending and sync).
FIELDS = _declare.Declaration(
  ModelAverageState,
  "model_average",
  center=_declare.CENTER,
  residual=_declare.RESIDUAL,
  last_norm=_declare.LAST_NORM,
)


def model_average(
  inner: optax.GradientTransformation,
  *,
  axis_name: _collectives.AxisName,
  interval_steps: int = 100,
  sync_warmup: int | None = None,
  fragments: Any = None,
  comm_dtype: Any = None,
  error_feedback: bool | None = None,
  topk_fraction: float | None = None,
  error_decay: float | None = None,
  host_offload: bool = False,
  delay: int | None = None,
  blend: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Model averaging (local SGD): the params averaged every few calls.

  The counterpart of TensorFlow's ``ModelAverageOptimizer``
  (``tf.contrib.opt``). Every worker :math:`k` takes local steps, and every
  ``interval_steps`` calls the params, after this call's gradient step, are
  averaged over the workers and everybody leaves with the mean:

  .. math::

    x_k \leftarrow x_k + \mathrm{inner}(g), \quad s \leftarrow s + 1, \qquad
    \text{if } s \bmod H = 0: \quad c \leftarrow \frac1N \sum_k x_k, \quad
    x_k \leftarrow c.

  Each worker's inner optimizer state stays its own (it is not averaged), as
  in the reference. A sync is one all-reduce of the params (in float32 for
  low-precision params); non-sync steps run no collective. The only extra
  buffer is the center, read with :func:`optax_dist.center_params`;
  :func:`optax_dist.global_step` counts the syncs. Start all workers from the
  same params (:func:`optax_dist.broadcast_params`).

  ``comm_dtype`` chooses the format on the wire: ``None`` averages the params
  (float32 for low-precision params); otherwise each worker's difference to
  the center travels, cast to ``jnp.bfloat16``/``jnp.float16``, through the
  quantized ring of ``jnp.int8``, a float8 type, ``jnp.int4`` or ``jnp.int2``
  (about a quarter of the bytes of a float32 all-reduce with 8 bits), or as
  sparse top-k chunks, with optional ``error_feedback`` (as DiLoCo's
  pseudo-gradient travels).

  The options model averaging shares with the other periodic transforms are
  explained once in :doc:`/sync_options`: the static ``sync`` flag of
  ``update``, the synchronous warm-up ``sync_warmup=K`` (post-local SGD),
  ``fragments`` (Streaming DiLoCo: one fragment averaged every ``H / F``
  calls, so the peak bytes of a sync fall by ``F``), the formats on the wire
  and their error bounds, delayed syncs (``delay``, ``blend``), and what a
  sync does with a worker that is not finite: it is left out, the center is
  the finite workers' mean, and it restarts on the center.

  Args:
    inner: The local optimizer (e.g. ``optax.sgd(0.1)``).
    axis_name: The mapped axis (or tuple of axes) of the workers.
    interval_steps: ``H``, calls between averages (static int >= 1).
    sync_warmup: ``K``, synchronous calls before the local steps start
      (post-local SGD; static int >= 0, ``None`` is 0).
    fragments: ``F`` fragments averaged in turn (static): ``None`` (the whole
      model), an int ``F``, a pytree of int labels in ``[0, F)`` that is a
      prefix of the params, or a callable ``params -> labels``;
      ``interval_steps`` must be a multiple of ``F``.
    comm_dtype: The format on the wire (static): ``None`` (the params, in the
      center's dtype), ``jnp.bfloat16``/``jnp.float16``, or the quantized ring
      of ``jnp.int8``, a float8 type, ``jnp.int4`` or ``jnp.int2``. Bytes and
      error bounds: :doc:`/sync_options`.
    error_feedback: Send again at the next sync what the compression dropped
      (static bool; one params-sized buffer). Needs a quantized ``comm_dtype``
      or ``topk_fraction``; ``None`` is on with ``topk_fraction``, else off.
    topk_fraction: Sparse top-k syncs (SparseLoCo): the fraction of each chunk
      of 256 numbers a worker sends, with their positions, in one
      ``all_gather`` (static float in (0, 1); ``None``, dense, by default).
    error_decay: ``beta`` of the error-feedback rule
      :math:`a = \Delta + \beta e` (static float in (0, 1], needs error
      feedback; ``None`` is 0.95 with ``topk_fraction``, else 1).
    host_offload: Keep the center and the residual (and with ``delay >= 2``
      the pending value), which a sync alone reads, in the host's pinned
      memory between syncs (static bool).
    delay: ``tau``: a sync scheduled on call ``s`` is sent from the params
      after ``s - tau`` calls and lands on call ``s``, so that
      the all-reduce overlaps compute (static int, ``0 <= tau < H / F``;
      ``None`` is 0: the sync on its scheduled call).
    blend: ``alpha``: a sync, delayed or not, lands the workers on
      :math:`\alpha x + (1 - \alpha) c` (static float in ``[0, 1]``; ``None``
      is 0, the mean; 1 leaves the workers' params as they are).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is
    :class:`optax_dist.ModelAverageState`. Its ``update`` needs ``params`` and
    takes the static extra argument ``sync`` (see :doc:`/sync_options`).

  Raises:
    ValueError: for ``interval_steps < 1``, ``sync_warmup < 0``, a period
      that is not a multiple of the number of fragments, bad fragment labels,
      an unsupported ``comm_dtype``, ``error_feedback`` without a quantized
      ``comm_dtype`` or ``topk_fraction``, ``topk_fraction`` outside (0, 1),
      ``error_decay`` outside (0, 1] or without feedback, ``delay < 0`` or
      ``delay >= H / F``, ``blend`` outside [0, 1], a 64-bit ``comm_dtype``
      without JAX's 64-bit mode, a static ``sync`` flag that names a fragment the transform does not
      have or a warm-up it does not have, ``params=None`` at update time, or,
      at update time, a state whose inner optimizer state another inner
      optimizer made.
    TypeError: if ``inner`` is not an optax transformation, for a period,
      ``sync_warmup`` or ``delay`` that is not a Python int, a ``blend``,
      ``topk_fraction`` or ``error_decay`` that is not a float, a
      ``host_offload`` that is not a bool, integer params, or a traced
      ``sync`` flag.
    NameError: at update time, if ``axis_name`` is not bound.

  Examples:
    Two workers with different gradients, averaged every second step (the
    reference's own test): they part on the first step and meet at the mean
    on the second.

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.model_average(optax.sgd(1.0), axis_name="w", interval_steps=2)
    >>> def train(params, grads):
    ...   state = tx.init(params)
    ...   for _ in range(2):
    ...     updates, state = tx.update(grads, state, params)
    ...     params = optax.apply_updates(params, updates)
    ...   return params
    >>> params = jnp.array([[0.0, 1.0], [0.0, 1.0]])
    >>> jax.vmap(train, axis_name="w")(params, jnp.array([[-1.0, -1.0], [-2.0, -2.0]]))
    Array([[3., 4.],
           [3., 4.]], dtype=float32)

  References:
    McMahan et al., `Communication-Efficient Learning of Deep Networks from
    Decentralized Data <https://arxiv.org/abs/1602.05629>`_, AISTATS 2017;
    Stich, `Local SGD Converges Fast and Communicates Little
    <https://arxiv.org/abs/1805.09767>`_, ICLR 2019;
    Lin et al., `Don't Use Large Mini-Batches, Use Local SGD
    <https://arxiv.org/abs/1808.07217>`_, ICLR 2020 (post-local SGD);
    Douillard et al., `Streaming DiLoCo with overlapping communication
    <https://arxiv.org/abs/2501.18512>`_, 2025 (fragments).
  """
  wire = _quantize.make_wire(
    comm_dtype, error_feedback, topk_fraction=topk_fraction, error_decay=error_decay
  )
  axes = _collectives.axis_tuple(axis_name)

  def on_reduce(x, fields):
    # The mean over the workers whose contribution is finite.
    center = fields.center
    # A spike is judged on the difference to the center, whatever travels.
    diff = jax.tree.map(lambda xi, c: xi - c, x, center)
    diff, last_norm = _reduce.unless_spike(diff, fields.last_norm, axes)
    if wire.dtype is None and wire.topk_fraction is None:
      x = jax.tree.map(lambda xi, d: jnp.where(jnp.isnan(d), d, xi), x, diff)
      reduced = _reduce.finite_sum(x, axes, wire, fields.residual)
      mean = reduced.mean()
    else:
      # In a narrow format, the differences to the center (small, and the
      # same scale on every worker) travel rather than the params.
      reduced = _reduce.finite_sum(diff, axes, wire, fields.residual)
      mean = jax.tree.map(lambda c, m: c + m, center, reduced.mean())
    pending, residual = reduced.pending(mean, axes, fields.residual)
    return pending, fields._replace(residual=residual, last_norm=last_norm)

  def on_first_phase(x, fields):
    # The ring's first phase alone (a delayed sync that waits): the differences.
    diff = jax.tree.map(lambda xi, c: xi - c, x, fields.center)
    diff, last_norm = _reduce.unless_spike(diff, fields.last_norm, axes)
    reduced = _reduce.finite_sum(diff, axes, wire, fields.residual, first_phase=True)
    pending, residual = reduced.first_phase_pending(fields.residual)
    return pending, fields._replace(residual=residual, last_norm=last_norm)

  def on_gather(pending, fields):
    pending, residual = _reduce.gathered(pending, axes, wire, fields.residual)
    center = jax.tree.map(lambda c, m: c + m, fields.center, pending.value)
    moved = jnp.logical_and(pending.moved, _reduce.all_finite(center, axes))
    return pending._replace(value=center, moved=moved), fields._replace(residual=residual)

  def on_apply(fields, pending):
    return fields._replace(center=_reduce.where(pending.moved, pending.value, fields.center))

  split = _reduce.splits_in_two(wire)

  return _engine.periodic(
    "model_average",
    inner,
    FIELDS,
    _engine.TwoPhase(on_reduce, on_apply, *((on_first_phase, on_gather) if split else ())),
    axis_name=axis_name,
    period_name="interval_steps",
    period=interval_steps,
    init=lambda center: {"residual": wire.residual_like(center)},
    init_fragment=lambda center: {"last_norm": jnp.zeros([], jnp.float32)},
    sync_warmup=sync_warmup,
    fragments=fragments,
    host_offload=host_offload,
    delay=delay,
    blend=blend,
  )
