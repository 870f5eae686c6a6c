"""``minimize``: compute gradients and apply them in one call."""

from collections.abc import Callable
from typing import Any

import jax
import optax


def minimize(
  loss_fn: Callable[..., Any],
  optimizer: optax.GradientTransformation,
  params: optax.Params,
  opt_state: optax.OptState,
  *args: Any,
  has_aux: bool = False,
  **kwargs: Any,
) -> tuple[optax.Params, optax.OptState, Any]:
  """One optimization step: gradients of ``loss_fn``, then ``optimizer``.

  The counterpart of ``tf.train.Optimizer.minimize``, which "simply combines
  calls ``compute_gradients()`` and ``apply_gradients()``": here
  ``jax.value_and_grad`` and ``optimizer.update`` followed by
  ``optax.apply_updates``. To process the gradients in between (TF's three-step
  use), call those yourself, or put the processing in the optimizer with
  ``optax.chain``. ``var_list`` becomes ``optax.masked`` or
  ``optax.multi_transform``; ``global_step`` lives in the state (see
  :func:`optax_dist.global_step`). TF's ``gate_gradients``,
  ``aggregation_method`` and ``colocate_gradients_with_ops`` have no
  counterpart: a jitted step is a pure function that XLA schedules as a whole,
  so there is no race between computing and applying gradients to gate, and
  placement is XLA's.

  Use it inside the mapped step (shard_map, pmap, vmap) like any optax update.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` returns a scalar loss, or
      ``(loss, aux)`` when ``has_aux`` is true.
    optimizer: Any optax transformation, e.g. an optax_dist one.
    params: The params to differentiate and update.
    opt_state: ``optimizer``'s state.
    *args: Passed to ``loss_fn``.
    has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
    **kwargs: Passed to ``loss_fn``.

  Returns:
    ``(new_params, new_opt_state, value)``, ``value`` being what ``loss_fn``
    returned at the old params.

  Raises:
    TypeError: from ``jax.value_and_grad``, if the loss is not a real scalar
      (with ``has_aux=True``, the first of a pair). What ``loss_fn`` and
      ``optimizer`` raise passes through, e.g. a periodic transform's
      ``NameError`` for an unbound axis.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dist
    >>> def loss_fn(w, x):
    ...   return jnp.sum((w * x - 1.0) ** 2)
    >>> tx = optax.sgd(0.1)
    >>> w = jnp.array(0.0)
    >>> state = tx.init(w)
    >>> w, state, loss = optax_dist.minimize(loss_fn, tx, w, state, jnp.array(2.0))
    >>> float(loss), float(w)
    (1.0, 0.4000000059604645)
  """
  value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args, **kwargs)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value
