"""Synchronous data parallelism: reduce gradients over workers, then update."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_dist import _collectives
from optax_dist import _declare


class TowerState(NamedTuple):
  """State of the `GradientTransformation` returned by :func:`tower`.

  Attributes:
    inner_state: State of the wrapped optimizer.
    num_updates: Number of updates applied so far (int32), read by
      :func:`optax_dist.global_step`.
  """

  inner_state: optax.OptState
  num_updates: jax.Array


def tower(
  inner: optax.GradientTransformation,
  *,
  axis_name: _collectives.AxisName | None,
  loss_reduction: str = "mean",
) -> optax.GradientTransformationExtraArgs:
  r"""Synchronous data parallelism: all-reduced gradients, then ``inner``.

  The counterpart of TensorFlow's ``TowerOptimizer`` with ``replicate_model_fn``:
  every worker (tower) computes gradients on its slice of the batch, and all
  workers apply the same reduced gradient

  .. math::

    g = \sum_{k=1}^{N} g_k \quad (\text{"sum"}), \qquad
    g = \frac{1}{N} \sum_{k=1}^{N} g_k \quad (\text{"mean"}),

  where ``"mean"`` equals TensorFlow's scaling of each tower's loss by
  ``1 / num_towers``. With one worker nothing is scaled. Starting from the same
  params (see :func:`optax_dist.broadcast_params`), workers stay identical.

  Under ``jax.shard_map``, ``jax.grad`` with respect to *replicated* params
  (``in_specs=P()``) already returns the gradient summed over the axis; such
  (invariant) gradient leaves are not summed again, only divided by N for
  ``"mean"``. Per-worker (varying) gradients, and all gradients under
  ``jax.pmap`` and ``jax.vmap``, are reduced with one all-reduce.

  ``axis_name=None`` reduces nothing: ``inner`` is applied to the local
  gradients, as ``TowerOptimizer`` does when ``replicate_model_fn`` is not used.

  Several towers may be used in one step (two losses with two optimizers, or
  ``optax.multi_transform`` over parts of the params); each reduces only the
  gradients it is given.

  ``tower`` reduces on every call, so it takes none of the options of the
  periodic transforms (:doc:`/sync_options`); to sync every few calls instead,
  see :func:`optax_dist.model_average` or :func:`optax_dist.diloco`, or put
  ``tower`` inside one of them over a second axis (:doc:`/multi_host`).

  Args:
    inner: The optimizer applied to the reduced gradients.
    axis_name: The mapped axis (or tuple of axes) to reduce over, or ``None``.
    loss_reduction: ``"mean"`` (the default) or ``"sum"``.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a :class:`TowerState`.

  Raises:
    ValueError: at construction, for an unknown ``loss_reduction``.
    TypeError: at construction, if ``inner`` is not an optax transformation.
    NameError: at update time, if ``axis_name`` is not bound by an enclosing
      shard_map, pmap or vmap.

  Examples:
    Two workers simulated with ``jax.vmap``; each sees its own gradient and
    both apply the mean:

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.tower(optax.sgd(1.0), axis_name="batch")
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> def step(grads):
    ...   updates, _ = tx.update(grads, state, params)
    ...   return optax.apply_updates(params, updates)
    >>> jax.vmap(step, axis_name="batch")(jnp.array([[1.0, 2.0], [3.0, 4.0]]))
    Array([[-2., -3.],
           [-2., -3.]], dtype=float32)
  """
  _collectives.check_reduction(loss_reduction, "loss_reduction")
  axes = None if axis_name is None else _collectives.axis_tuple(axis_name)
  _declare.check_transformation(inner, "inner", "optax.adamw(1e-3)")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return TowerState(inner_state=inner.init(params), num_updates=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if axes is not None:
      updates = _collectives.reduce_gradients(updates, axes, loss_reduction)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    num_updates = optax.safe_increment(state.num_updates)
    return updates, TowerState(inner_state=inner_state, num_updates=num_updates)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
