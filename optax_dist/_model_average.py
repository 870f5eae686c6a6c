"""Periodic model averaging (local SGD): the workers' params averaged every few steps."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_dist import _collectives
from optax_dist import _periodic


class ModelAverageState(NamedTuple):
  """State of the `GradientTransformation` returned by :func:`model_average`.

  Attributes:
    inner_state: State of the local (worker) optimizer.
    center: The workers' mean params at the last sync (the params at init
      before the first), in float32 for low-precision params.
    step: Number of calls since init (int32); syncs happen when it reaches a
      multiple of ``interval_steps``.
    num_syncs: Number of completed syncs (int32), read by
      :func:`optax_dist.global_step`.
  """

  inner_state: optax.OptState
  center: optax.Params
  step: jax.Array
  num_syncs: jax.Array


def model_average(
  inner: optax.GradientTransformation,
  *,
  axis_name: _collectives.AxisName,
  interval_steps: int = 100,
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

  Args:
    inner: The local optimizer (e.g. ``optax.sgd(0.1)``).
    axis_name: The mapped axis (or tuple of axes) of the workers.
    interval_steps: ``H``, calls between averages (static int >= 1).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`ModelAverageState`. Its ``update`` needs ``params``.

  Raises:
    ValueError: for ``interval_steps < 1`` or ``params=None`` at update time.
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
    <https://arxiv.org/abs/1805.09767>`_, ICLR 2019.
  """
  period = _periodic.check_period(interval_steps, "interval_steps")
  axes = _collectives.axis_tuple(axis_name)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return ModelAverageState(
      inner_state=inner.init(params),
      center=_periodic.center_like(params),
      step=jnp.zeros([], jnp.int32),
      num_syncs=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _periodic.require_params(params, "model_average")

    def sync(local, center):
      del center
      center = _collectives.pmean(local.x, axes)
      return local.moved_to(center), center

    out = _periodic.periodic_update(
      inner,
      state,
      updates,
      params,
      extra_args,
      period=period,
      axes=axes,
      sync=sync,
      carry=state.center,
    )
    return out.updates, ModelAverageState(out.inner_state, out.carry, out.step, out.num_syncs)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_periodic.register(ModelAverageState)
