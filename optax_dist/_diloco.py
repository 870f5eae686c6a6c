"""DiLoCo: local steps, and an outer optimizer on the averaged pseudo-gradient."""

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


class DiLoCoState(NamedTuple):
  """State of the `GradientTransformation` returned by :func:`diloco`.

  Attributes:
    inner_state: State of the local (worker) optimizer.
    outer_state: State of the outer optimizer, which moves the center; with
      ``F > 1`` fragments, a tuple of ``F`` states, one per fragment.
    center: This worker's copy of the center (the global model, identical on
      every worker), in float32 for low-precision params.
    residual: With ``error_feedback``, what the compression of a sync dropped
      (from this worker's pseudo-gradient, and, where the chunk it owns in
      the quantized ring stands, from the summed chunk too), sent again at
      the next sync; ``optax.EmptyState()`` otherwise.
    last_norm: The L2 norm of this worker's pseudo-gradient at its last sync
      (float32, 0 before the first; one per fragment), against which the next
      is checked for a spike (see "When a worker goes bad" in the docs).
    pending: With ``delay >= 2``, the sync reduced and not yet applied (a
      :class:`optax_dist.Pending`); ``optax.EmptyState()`` otherwise.
    sync: The engine's counters and schedule (:class:`optax_dist.SyncState`).

  :doc:`/sync_options` says more of the fields every periodic state shares.
  """

  inner_state: optax.OptState
  outer_state: optax.OptState
  center: optax.Params
  residual: optax.Params | optax.EmptyState
  last_norm: jax.Array | tuple[jax.Array, ...]
  pending: _declare.Pending | optax.EmptyState
  sync: _schedule.SyncState


# The roles of the state's fields (the engine handles inner_state, pending and sync).
FIELDS = _declare.Declaration(
  DiLoCoState,
  "diloco",
  center=_declare.CENTER,
  outer_state=_declare.Field(per_fragment=True, offloaded=True, shared=True),
  residual=_declare.RESIDUAL,
  last_norm=_declare.LAST_NORM,
)


def default_outer(wire: _quantize.Wire) -> optax.GradientTransformation:
  """DiLoCo's outer step when none is given.

  Nesterov SGD (learning rate 0.7, momentum 0.9), the DiLoCo paper's; with
  sparse top-k syncs, plain SGD at learning rate 1, SparseLoCo's: its decayed
  error-feedback buffer is already a momentum, and a second one on top
  diverges where plain SGD converges.
  """
  if wire.topk_fraction is not None:
    return optax.sgd(1.0)
  return optax.sgd(0.7, momentum=0.9, nesterov=True)


def diloco(
  inner: optax.GradientTransformation,
  *,
  axis_name: _collectives.AxisName,
  outer: optax.GradientTransformation | None = None,
  sync_period: int = 500,
  comm_dtype: Any = None,
  error_feedback: bool | None = None,
  topk_fraction: float | None = None,
  error_decay: float | None = None,
  sync_warmup: int | None = None,
  fragments: Any = None,
  host_offload: bool = False,
  delay: int | None = None,
  blend: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DiLoCo: local steps, and an outer optimizer step every ``H`` calls.

  Distributed Low-Communication training (Douillard et al., 2023). Every
  worker takes local steps with ``inner``; every ``sync_period`` calls the
  workers average their *pseudo-gradient*, the distance from the center to
  where they went, an ``outer`` optimizer moves the center with it, and
  everybody restarts from the new center:

  .. math::

    x_k \leftarrow x_k + \mathrm{inner}(g), \quad s \leftarrow s + 1, \qquad
    \text{if } s \bmod H = 0: \quad \Delta = c - \frac1N \sum_k x_k, \quad
    c \leftarrow c + \mathrm{outer}(\Delta), \quad x_k \leftarrow c.

  ``outer=None`` means Nesterov momentum SGD with learning rate 0.7 and
  momentum 0.9, the paper's choice; with ``topk_fraction`` it means plain SGD
  with learning rate 1 (SparseLoCo's choice: the decayed error-feedback
  buffer already carries past pseudo-gradients, as a momentum would). With ``outer=optax.sgd(1.0)`` DiLoCo is
  model averaging (:func:`optax_dist.model_average`) up to float rounding.

  A sync is one all-reduce of the pseudo-gradient; non-sync steps run no
  collective. ``comm_dtype`` chooses its format on the wire (half the bytes
  in bfloat16, about a quarter through the int8 quantized ring, less in int4,
  int2 or sparse top-k), while the center and the outer optimizer stay in
  float32 (at least the params' precision); ``error_feedback`` sends again
  what the compression dropped. Each worker holds the center and the outer
  optimizer's state beside its own.

  The options DiLoCo shares with the other periodic transforms are explained
  once in :doc:`/sync_options`: the static ``sync`` flag of ``update``, the
  synchronous warm-up ``sync_warmup=K`` (post-local SGD; here the outer
  optimizer starts fresh at call ``K``), ``fragments`` (Streaming DiLoCo,
  Douillard et al., 2025: one fragment takes its outer step every ``H / F``
  calls, each with its own outer optimizer state), the formats on the wire
  and their error bounds, delayed syncs (``delay``, ``blend``), and what a
  sync does with a worker that is not finite: it is left out, the center
  moves from the finite workers, and it restarts on the center.

  Args:
    inner: The local optimizer (the paper uses AdamW).
    axis_name: The mapped axis (or tuple of axes) of the workers.
    outer: The optax transformation applied to the center with the averaged
      pseudo-gradient as its gradient; ``None`` for Nesterov SGD (0.7, 0.9),
      or plain SGD (1.0) with ``topk_fraction``.
    sync_period: ``H``, calls between outer steps (static int >= 1).
    comm_dtype: The pseudo-gradient's format on the wire (static): ``None``
      (the center's dtype), ``jnp.bfloat16``/``jnp.float16``, or the quantized
      ring of ``jnp.int8``, a float8 type, ``jnp.int4`` or ``jnp.int2``. Bytes
      and error bounds: :doc:`/sync_options`.
    error_feedback: Send again at the next sync what the compression dropped
      (static bool; one params-sized buffer). Needs a quantized ``comm_dtype``
      or ``topk_fraction``; ``None`` is on with ``topk_fraction``, else off.
    topk_fraction: Sparse top-k syncs (SparseLoCo): the fraction of each chunk
      of 256 numbers a worker sends, with their positions, in one
      ``all_gather`` (static float in (0, 1); ``None``, dense, by default).
    error_decay: ``beta`` of the error-feedback rule
      :math:`a = \Delta + \beta e` (static float in (0, 1], needs error
      feedback; ``None`` is 0.95 with ``topk_fraction``, else 1).
    sync_warmup: ``K``, synchronous calls before the local steps start
      (post-local SGD; static int >= 0, ``None`` is 0); the outer optimizer
      starts fresh at call ``K``.
    fragments: Streaming DiLoCo's ``F`` fragments (static): ``None`` (the whole
      model), an int ``F``, a pytree of int labels in ``[0, F)`` that is a
      prefix of the params, or a callable ``params -> labels``. Each fragment
      has its own outer state; ``sync_period`` must be a multiple of ``F``.
    host_offload: Keep the center, the outer state, the residual (and with
      ``delay >= 2`` the pending value), which a sync alone reads, in the
      host's pinned memory between syncs (static bool).
    delay: ``tau``: a sync scheduled on call ``s`` is sent from the params
      after ``s - tau`` calls and lands on call ``s``, so
      that the all-reduce overlaps compute (static int, ``0 <= tau < H / F``;
      ``None`` is 0: the sync on its scheduled call).
    blend: ``alpha``: a sync, delayed or not, lands the workers on
      :math:`\alpha x + (1 - \alpha) c` (static float in ``[0, 1]``; ``None``
      is 0, the center; 1 leaves the workers' params as they are).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is
    :class:`optax_dist.DiLoCoState`. Its ``update`` needs ``params`` and takes
    the static extra argument ``sync`` (see :doc:`/sync_options`).

  Raises:
    ValueError: for ``sync_period < 1``, ``sync_warmup < 0``, a period that
      is not a multiple of the number of fragments, bad fragment labels, a
      ``comm_dtype`` that is neither a float nor int8, int4 or int2,
      ``error_feedback`` without a quantized ``comm_dtype`` or
      ``topk_fraction``, ``topk_fraction`` outside (0, 1), ``error_decay``
      outside (0, 1] or without feedback, ``delay < 0`` or ``delay >= H / F``,
      ``blend`` outside [0, 1], a 64-bit ``comm_dtype`` without JAX's 64-bit
      mode, a static ``sync`` flag that names a fragment the transform does not
      have or a warm-up it does not have, ``params=None`` at update time, or,
      at update time, a state whose inner optimizer state another inner
      optimizer made.
    TypeError: if ``inner`` or ``outer`` is not an optax transformation, for
      a period, ``sync_warmup`` or ``delay`` that is not a Python int, a
      ``blend``, ``topk_fraction`` or ``error_decay`` that is not a float, a
      ``host_offload`` that is not a bool, integer params, or a traced
      ``sync`` flag.
    NameError: at update time, if ``axis_name`` is not bound.

  Examples:
    With ``outer=optax.sgd(1.0)`` the center moves to the workers' mean:

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.diloco(
    ...     optax.sgd(1.0), axis_name="w", outer=optax.sgd(1.0), sync_period=2)
    >>> def train(params, grads):
    ...   state = tx.init(params)
    ...   for _ in range(2):
    ...     updates, state = tx.update(grads, state, params)
    ...     params = optax.apply_updates(params, updates)
    ...   return params, optax_dist.center_params(state)
    >>> params = jnp.array([[0.0, 1.0], [0.0, 1.0]])
    >>> new, center = jax.vmap(train, axis_name="w")(
    ...     params, jnp.array([[-1.0, -1.0], [-2.0, -2.0]]))
    >>> center
    Array([[3., 4.],
           [3., 4.]], dtype=float32)

  References:
    Douillard et al., `DiLoCo: Distributed Low-Communication Training of
    Language Models <https://arxiv.org/abs/2311.08105>`_, 2023;
    Douillard et al., `Streaming DiLoCo with overlapping communication
    <https://arxiv.org/abs/2501.18512>`_, 2025;
    Lin et al., `Don't Use Large Mini-Batches, Use Local SGD
    <https://arxiv.org/abs/1808.07217>`_, ICLR 2020 (post-local SGD).
  """
  wire = _quantize.make_wire(
    comm_dtype, error_feedback, topk_fraction=topk_fraction, error_decay=error_decay
  )
  if outer is None:
    outer = default_outer(wire)
  _declare.check_transformation(outer, "outer", "optax.sgd(0.7, momentum=0.9, nesterov=True)")
  outer = optax.with_extra_args_support(outer)
  axes = _collectives.axis_tuple(axis_name)
  split = _reduce.splits_in_two(wire)

  def reduce(x, fields, first_phase=False):
    # The mean pseudo-gradient over the workers whose own is finite.
    pseudo_gradient = jax.tree.map(lambda c, xi: c - xi, fields.center, x)
    pseudo_gradient, last_norm = _reduce.unless_spike(pseudo_gradient, fields.last_norm, axes)
    reduced = _reduce.finite_sum(
      pseudo_gradient, axes, wire, fields.residual, first_phase=first_phase
    )
    if first_phase:
      pending, residual = reduced.first_phase_pending(fields.residual)
    else:
      pending, residual = reduced.pending(reduced.mean(), axes, fields.residual)
    return pending, fields._replace(residual=residual, last_norm=last_norm)

  def on_reduce(x, fields):
    return reduce(x, fields)

  def on_first_phase(x, fields):
    return reduce(x, fields, first_phase=True)

  def on_gather(pending, fields):
    pending, residual = _reduce.gathered(pending, axes, wire, fields.residual)
    return pending, fields._replace(residual=residual)

  def on_apply(fields, pending):
    # The outer step moves the center, unless no worker was finite.
    center, outer_state = fields.center, fields.outer_state
    outer_updates, new_outer_state = outer.update(pending.value, outer_state, center)
    new_center = optax.apply_updates(center, outer_updates)
    return fields._replace(
      center=_reduce.where(pending.moved, new_center, center),
      outer_state=_reduce.where(pending.moved, new_outer_state, outer_state),
    )

  return _engine.periodic(
    "diloco",
    inner,
    FIELDS,
    _engine.TwoPhase(on_reduce, on_apply, *((on_first_phase, on_gather) if split else ())),
    axis_name=axis_name,
    period_name="sync_period",
    period=sync_period,
    init=lambda center: {"residual": wire.residual_like(center)},
    init_fragment=lambda center: {
      "outer_state": outer.init(center),
      "last_norm": jnp.zeros([], jnp.float32),
    },
    sync_warmup=sync_warmup,
    fragments=fragments,
    host_offload=host_offload,
    delay=delay,
    blend=blend,
  )
