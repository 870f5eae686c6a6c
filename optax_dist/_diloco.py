"""DiLoCo: local steps, and an outer optimizer on the averaged pseudo-gradient."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_dist import _collectives
from optax_dist import _periodic


class DiLoCoState(NamedTuple):
  """State of the `GradientTransformation` returned by :func:`diloco`.

  Attributes:
    inner_state: State of the local (worker) optimizer.
    outer_state: State of the outer optimizer, which moves the center.
    center: This worker's copy of the center (the global model, identical on
      every worker), in float32 for low-precision params.
    step: Number of calls since init (int32); syncs happen when it reaches a
      multiple of ``sync_period``.
    num_syncs: Number of completed syncs, i.e. outer steps (int32), read by
      :func:`optax_dist.global_step`.
  """

  inner_state: optax.OptState
  outer_state: optax.OptState
  center: optax.Params
  step: jax.Array
  num_syncs: jax.Array


def diloco(
  inner: optax.GradientTransformation,
  *,
  axis_name: _collectives.AxisName,
  outer: optax.GradientTransformation | None = None,
  sync_period: int = 500,
  comm_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DiLoCo: local inner steps, and every ``H`` calls an outer optimizer step.

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
  momentum 0.9, the paper's choice. With ``outer=optax.sgd(1.0)`` DiLoCo is
  model averaging (:func:`optax_dist.model_average`) up to float rounding.

  A sync is one all-reduce of the pseudo-gradient. ``comm_dtype`` (e.g.
  ``jnp.bfloat16``) casts it for the all-reduce only, halving the bytes on the
  wire; the center and the outer optimizer stay in float32 (at least the
  params' precision). Non-sync steps run no collective. Each worker holds the
  center and the outer optimizer's state beside its own.

  Args:
    inner: The local optimizer (the paper uses AdamW).
    axis_name: The mapped axis (or tuple of axes) of the workers.
    outer: The optax transformation applied to the center with the averaged
      pseudo-gradient as its gradient; ``None`` for Nesterov SGD (0.7, 0.9).
    sync_period: ``H``, calls between outer steps (static int >= 1).
    comm_dtype: A floating dtype for communicating the pseudo-gradient, or
      ``None`` for the center's dtype (static).

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`DiLoCoState`. Its ``update`` needs ``params``.

  Raises:
    ValueError: for ``sync_period < 1``, a non-floating ``comm_dtype``, or
      ``params=None`` at update time.
    TypeError: if ``outer`` is not an optax transformation.
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
    Language Models <https://arxiv.org/abs/2311.08105>`_, 2023.
  """
  period = _periodic.check_period(sync_period, "sync_period")
  if outer is None:
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
  if not (callable(getattr(outer, "init", None)) and callable(getattr(outer, "update", None))):
    raise TypeError(
      f"`outer` must be an optax GradientTransformation (e.g. optax.sgd(0.7, momentum=0.9, "
      f"nesterov=True)), got {outer!r}."
    )
  if comm_dtype is not None:
    try:
      comm_dtype = jnp.dtype(comm_dtype)
    except TypeError as e:
      raise ValueError(f"`comm_dtype` must be a floating dtype, got {comm_dtype!r}.") from e
    if not jnp.issubdtype(comm_dtype, jnp.floating):
      raise ValueError(
        f"`comm_dtype` must be a floating dtype such as jnp.bfloat16, got {comm_dtype}."
      )
  axes = _collectives.axis_tuple(axis_name)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    center = _periodic.center_like(params)
    return DiLoCoState(
      inner_state=inner.init(params),
      outer_state=outer.init(center),
      center=center,
      step=jnp.zeros([], jnp.int32),
      num_syncs=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _periodic.require_params(params, "diloco")

    def sync(local, carry):
      center, outer_state = carry

      def pseudo_gradient(c, xi):
        delta = c - xi
        if comm_dtype is None:
          return delta
        return delta.astype(comm_dtype)

      delta = _collectives.pmean(jax.tree.map(pseudo_gradient, center, local.x), axes)
      delta = jax.tree.map(lambda d, c: d.astype(c.dtype), delta, center)
      outer_updates, outer_state = outer.update(delta, outer_state, center)
      center = optax.apply_updates(center, outer_updates)
      return local.moved_to(center), (center, outer_state)

    out = _periodic.periodic_update(
      inner,
      state,
      updates,
      params,
      extra_args,
      period=period,
      axes=axes,
      sync=sync,
      carry=(state.center, state.outer_state),
    )
    center, outer_state = out.carry
    return out.updates, DiLoCoState(out.inner_state, outer_state, center, out.step, out.num_syncs)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_periodic.register(DiLoCoState)
