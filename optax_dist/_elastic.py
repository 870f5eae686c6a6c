"""Elastic Averaging SGD (EASGD): workers tied to a center by an elastic force."""

import numbers
from typing import Any
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from optax_dist import _collectives
from optax_dist import _periodic


class ElasticAverageState(NamedTuple):
  """State of the `GradientTransformation` returned by :func:`elastic_average`.

  Attributes:
    inner_state: State of the local (worker) optimizer.
    center: This worker's copy of the center variables (identical on every
      worker), in float32 for low-precision params.
    snapshot: The center as this worker read it at its last sync (its stale
      copy, used by the ``rho`` term).
    step: Number of calls since init (int32); syncs happen when it reaches a
      multiple of the communication period.
    num_syncs: Number of completed syncs (int32), read by
      :func:`optax_dist.global_step`.
  """

  inner_state: optax.OptState
  center: optax.Params
  snapshot: optax.Params
  step: jax.Array
  num_syncs: jax.Array


def elastic_average(
  inner: optax.GradientTransformation,
  *,
  axis_name: _collectives.AxisName,
  communication_period: int = 10,
  moving_rate: float | jax.Array | None = None,
  rho: float | jax.Array = 0.0,
  ordering: str = "simultaneous",
) -> optax.GradientTransformationExtraArgs:
  r"""Elastic Averaging SGD: local steps, and every ``p`` calls an elastic pull.

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

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is an
    :class:`ElasticAverageState`. Its ``update`` needs ``params``.

  Raises:
    ValueError: for a period < 1, a moving rate outside (0, 1], a negative
      ``rho``, an unknown ordering, or ``params=None`` at update time.
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
  period = _periodic.check_period(communication_period, "communication_period")
  if moving_rate is not None:
    _periodic.check_rate(moving_rate, "moving_rate")
  if isinstance(rho, numbers.Real) and float(rho) < 0:
    raise ValueError(f"`rho` must be >= 0, got {rho}.")
  _periodic.check_ordering(ordering)
  axes = _collectives.axis_tuple(axis_name)
  use_rho = not (isinstance(rho, numbers.Real) and rho == 0)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    center = _periodic.center_like(params)
    return ElasticAverageState(
      inner_state=inner.init(params),
      center=center,
      snapshot=center,
      step=jnp.zeros([], jnp.int32),
      num_syncs=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _periodic.require_params(params, "elastic_average")
    n = _collectives.num_workers(axes)
    alpha = 0.9 / period / n if moving_rate is None else moving_rate
    if use_rho:
      # g' = g + rho (x - c_snap): the gradient of rho/2 ||x - c_snap||^2.
      updates = jax.tree.map(
        lambda g, x, c: g + (rho * (x.astype(c.dtype) - c)).astype(g.dtype),
        updates,
        params,
        state.snapshot,
      )

    def sync(local, carry):
      center, _ = carry
      x = local.x
      if ordering == "simultaneous":
        snapshot = center
        diff = jax.tree.map(lambda xi, c: xi - c, x, center)
        total = _collectives.psum(diff, axes)
        center = jax.tree.map(lambda c, t: c + alpha * t, center, total)
      else:
        snapshot, diff, center = _round_robin(x, center, alpha, axes)
      correction = jax.tree.map(lambda d: -alpha * d, diff)
      return local.corrected(correction), (center, snapshot)

    out = _periodic.periodic_update(
      inner,
      state,
      updates,
      params,
      extra_args,
      period=period,
      axes=axes,
      sync=sync,
      carry=(state.center, state.snapshot),
    )
    center, snapshot = out.carry
    return out.updates, ElasticAverageState(
      out.inner_state, center, snapshot, out.step, out.num_syncs
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _round_robin(x: Any, center: Any, alpha: Any, axes: tuple) -> tuple[Any, Any, Any]:
  """The reference's parameter server, one worker commit at a time.

  Every worker receives all workers' params and replays the N commits in
  worker order: worker k reads the center c_{k-1} (its snapshot), computes
  d_k = x_k - c_{k-1}, and leaves c_k = c_{k-1} + alpha d_k. Returns this
  worker's snapshot and difference, and the final center.
  """
  me = _collectives.worker_index(axes)
  gathered = _collectives.all_gather(x, axes)

  def commit(carry, x_k):
    c, k, snap = carry
    snap = jax.tree.map(lambda s, ci: jnp.where(k == me, ci, s), snap, c)
    c = jax.tree.map(lambda ci, xi: ci + alpha * (xi - ci), c, x_k)
    return (c, k + 1, snap), None

  init = (center, jnp.zeros([], jnp.int32), center)
  (center, _, snapshot), _ = lax.scan(commit, _collectives.to_varying(init, axes), gathered)
  diff = jax.tree.map(lambda xi, s: xi - s, x, snapshot)
  return snapshot, diff, center


_periodic.register(ElasticAverageState)
