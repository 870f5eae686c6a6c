"""Periodic model averaging (local SGD): the workers' params averaged every few steps."""

from typing import Any
from typing import NamedTuple

import jax
import optax

from optax_dist import _collectives
from optax_dist import _periodic
from optax_dist import _quantize
from optax_dist import _schedule


class ModelAverageState(NamedTuple):
  """State of the `GradientTransformation` returned by :func:`model_average`.

  Attributes:
    inner_state: State of the local (worker) optimizer.
    center: The workers' mean params at the last sync (the params at init
      before the first), in float32 for low-precision params.
    residual: With ``error_feedback=True``, what quantization dropped from
      this worker's last difference to the center, added to its next one;
      ``optax.EmptyState()`` otherwise.
    step: Number of calls since init (int32).
    num_syncs: Number of syncs that moved the center (int32), one per
      fragment synced; read by :func:`optax_dist.global_step`.
    num_skipped_syncs: Number of syncs whose average was not finite and that
      left the center as it was (int32); read by
      :func:`optax_dist.skipped_syncs`.
    schedule: When the transform syncs (static, no arrays); read by
      :func:`optax_dist.sync_schedule`.
  """

  inner_state: optax.OptState
  center: optax.Params
  residual: optax.Params | optax.EmptyState
  step: jax.Array
  num_syncs: jax.Array
  num_skipped_syncs: jax.Array
  schedule: _schedule.SyncSchedule


def model_average(
  inner: optax.GradientTransformation,
  *,
  axis_name: _collectives.AxisName,
  interval_steps: int = 100,
  sync_warmup: int | None = None,
  fragments: Any = None,
  comm_dtype: Any = None,
  error_feedback: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Periodic model averaging (local SGD): average the params every few steps.

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

  ``update`` takes the static extra argument ``sync``: ``None`` (the
  default) decides inside the program from the call counter; ``False``
  compiles the local step alone, ``True`` the sync alone (see
  :func:`optax_dist.sync_schedule` for the flags of a hand-written loop).

  ``sync_warmup=K`` is post-local SGD (Lin et al., 2018): the first ``K``
  calls average the gradients over the workers before the inner step
  (synchronous data parallelism; the center follows the params), and the
  averages fall on calls ``K + H``, ``K + 2H``, ...

  ``fragments`` streams the sync (Streaming DiLoCo): with ``F`` fragments,
  fragment ``f`` is averaged on the calls ``s`` with
  :math:`s \bmod H = ((f + 1) H / F) \bmod H` (after the warm-up), so one
  fragment moves every ``H / F`` calls and the peak bytes of a sync fall by
  ``F``. ``H`` must be a multiple of ``F``.

  ``comm_dtype`` chooses the format on the wire: ``None`` averages the params
  (float32 for low-precision params); otherwise each worker's difference to
  the center travels, cast to ``jnp.bfloat16``/``jnp.float16``, or through
  the quantized ring of ``jnp.int8`` (or a float8 type), about a quarter of
  the bytes of a float32 all-reduce, with optional ``error_feedback`` (see
  :func:`optax_dist.diloco`, whose pseudo-gradient travels the same way).

  A sync whose average is not finite (a worker's params hold an Inf or a NaN)
  leaves the center as it was, moves every worker back onto it, and counts
  in :func:`optax_dist.skipped_syncs`.

  Args:
    inner: The local optimizer (e.g. ``optax.sgd(0.1)``).
    axis_name: The mapped axis (or tuple of axes) of the workers.
    interval_steps: ``H``, calls between averages (static int >= 1).
    sync_warmup: ``K``, synchronous calls before the local steps start
      (static int >= 0; ``None``, the default, is 0 and keeps
      ``optax.inject_hyperparams`` from taking it for a hyperparameter).
    fragments: ``None`` (the whole model), an int ``F`` (the leaves in
      flatten order, cut into ``F`` contiguous groups of nearly equal bytes),
      a pytree of int labels in ``[0, F)`` that is a prefix of the params, or
      a callable ``params -> labels`` (static).
    comm_dtype: The format on the wire: ``None``, ``jnp.bfloat16``,
      ``jnp.float16``, ``jnp.int8`` or a float8 type (static).
    error_feedback: With an 8-bit ``comm_dtype``, carry what the rounding
      dropped into the next sync (static bool).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`ModelAverageState`. Its ``update`` needs ``params``.

  Raises:
    ValueError: for ``interval_steps < 1``, ``sync_warmup < 0``, a period
      that is not a multiple of the number of fragments, bad fragment labels,
      an unsupported ``comm_dtype``, ``error_feedback`` without an 8-bit
      ``comm_dtype``, or ``params=None`` at update time.
    TypeError: for integer params, or a traced ``sync`` flag.
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
  period = _periodic.check_period(interval_steps, "interval_steps")
  warmup = _periodic.check_warmup(sync_warmup)
  _periodic.check_schedule(period, warmup, fragments, "interval_steps")
  wire = _quantize.make_wire(comm_dtype, error_feedback)
  axes = _collectives.axis_tuple(axis_name)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    _periodic.check_floating(params, "model_average")
    center = _periodic.center_like(params)
    return ModelAverageState(
      inner_state=inner.init(params),
      center=center,
      residual=wire.residual_like(center),
      **_periodic.engine_fields(params, period=period, warmup=warmup, fragments=fragments),
    )

  def sync(local, carry):
    center, residual = carry["center"], carry["residual"]
    if wire.dtype is None:
      mean = _collectives.pmean(local.x, axes)
    else:
      # In a narrow format, the differences to the center (small, and the
      # same scale on every worker) travel rather than the params.
      diff = jax.tree.map(lambda xi, c: xi - c, local.x, center)
      moved, residual = _quantize.pmean(diff, axes, wire, residual)
      mean = jax.tree.map(lambda c, m: c + m, center, moved)
    finite = _periodic.all_finite(mean)
    new = {
      "center": _periodic.keep_unless(finite, mean, center),
      "residual": _periodic.keep_unless(finite, residual, carry["residual"]),
    }
    return _periodic.Synced(local.moved_to(new["center"]), new, finite)

  def restart(x, carry):
    return {**carry, "center": x}

  spec = _periodic.Spec("model_average", ("center", "residual"), sync, restart)

  def update_fn(updates, state, params=None, *, sync=None, **extra_args):
    return _periodic.periodic_update(
      spec, inner, state, updates, params, extra_args, axes=axes, sync=sync, fragments=fragments
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
