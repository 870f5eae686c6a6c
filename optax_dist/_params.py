"""Making workers' params agree: before training, and for a final model."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_dist import _collectives


def broadcast_params(params: optax.Params, *, axis_name: _collectives.AxisName) -> optax.Params:
  """Worker 0's params on every worker: the start of data-parallel training.

  The counterpart of TensorFlow's ``get_init_op`` for distributed optimizers.
  Workers must start from identical params; call this once, before
  ``tx.init``, inside the same mapped context as the training step. It costs
  one all-reduce of the params. Leaves keep their type: under ``jax.shard_map``
  a per-worker (varying) leaf stays varying, a replicated (invariant) one is
  already identical and is returned as is.

  Args:
    params: This worker's params (any tree of arrays; bool and integer leaves
      are copied too).
    axis_name: The mapped axis (or tuple of axes) of the workers.

  Returns:
    Worker 0's params.

  Raises:
    NameError: if ``axis_name`` is not bound by an enclosing shard_map, pmap or
      vmap.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_dist
    >>> per_worker = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> jax.vmap(lambda p: optax_dist.broadcast_params(p, axis_name="batch"),
    ...          axis_name="batch")(per_worker)
    Array([[1., 2.],
           [1., 2.],
           [1., 2.]], dtype=float32)
  """
  return _collectives.broadcast_from(params, axis_name, index=0)


def average_params(params: optax.Params, *, axis_name: _collectives.AxisName) -> optax.Params:
  r"""The mean of the workers' params, on every worker.

  For a final model after local training (:math:`\bar x = \frac1N \sum_k
  x_k`), rather than a center that may be up to one period stale. One
  all-reduce; low-precision leaves (bfloat16, float16) are averaged in float32
  and returned in their own dtype. Invariant leaves (replicated under
  ``jax.shard_map``) are already identical and are returned as is.

  Args:
    params: This worker's params: a tree of floating-point arrays.
    axis_name: The mapped axis (or tuple of axes) of the workers.

  Returns:
    The mean params.

  Raises:
    TypeError: if a leaf is not floating point (the mean of integers or
      booleans is not one of them: use :func:`broadcast_params` for those).
    NameError: if ``axis_name`` is not bound.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_dist
    >>> per_worker = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    >>> jax.vmap(lambda p: optax_dist.average_params(p, axis_name="batch"),
    ...          axis_name="batch")(per_worker)
    Array([[2., 4.],
           [2., 4.]], dtype=float32)
  """
  axes = _collectives.axis_tuple(axis_name)
  _collectives.num_workers(axes)

  def mean(path: Any, x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(
        f"average_params: the leaf at {jax.tree_util.keystr(path)} has dtype "
        f"{x.dtype}; only floating-point leaves can be averaged. Average the "
        "floating-point part and use `broadcast_params` for the rest."
      )
    if _collectives.is_invariant(x, axes):
      return x
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return _collectives.pmean(x.astype(wide), axes).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(mean, params)
