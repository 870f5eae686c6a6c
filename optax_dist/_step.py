"""Data-parallel train and eval steps: the counterpart of ``replicate_model_fn``.

A step built here takes the *global* batch, splits it along dim 0 over the
workers of a mesh axis, runs the user's loss on every worker's slice under
``jax.shard_map``, lets the optimizer update the params, and pools what the
workers measured (the loss, metric totals and counts, predictions).

Two layouts of params and optimizer state are supported:

* ``"replicated"``: one copy, ``in_specs=P()``. For :func:`optax_dist.tower`
  and plain optax optimizers (workers stay identical).
* ``"per_worker"``: every leaf has a leading worker axis of size N, sharded over
  the mesh axis (see :func:`per_worker`). Needed by the periodic transforms
  (:func:`optax_dist.elastic_average`, ...), whose workers drift apart between
  syncs; tower and plain optax work with it too.
"""

from collections.abc import Callable
from collections.abc import Mapping
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from optax_dist import _collectives
from optax_dist import _state

_REDUCTIONS = ("sum", "mean")
_LAYOUTS = ("replicated", "per_worker")
_AUX_KEYS = frozenset({"metrics", "predictions"})
_RESERVED = frozenset({"loss", "predictions"})


def _holds(opt_state: Any, registry: Mapping[type, Any]) -> bool:
  return any(type(s) in registry for s in _state._iter_states(opt_state))


def _communicates(opt_state: Any) -> bool:
  """Whether the state holds an optax_dist transform (which then talks to the workers)."""
  return _holds(opt_state, _state._GLOBAL_STEP_GETTERS)


def _has_center(opt_state: Any) -> bool:
  return _holds(opt_state, _state._CENTER_GETTERS)


def _mesh_workers(mesh: jax.sharding.Mesh, axis_name: Any) -> tuple[tuple, int]:
  axes = _collectives.axis_tuple(axis_name)
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(
      f"`axis_name` {axis_name!r} names axes {missing} that the mesh does not have; "
      f"its axes are {tuple(mesh.axis_names)}."
    )
  return axes, math.prod(mesh.shape[a] for a in axes)


def _shard_mapped(
  fn: Callable, mesh: Any, axes: tuple, in_specs: tuple, out_specs: Any
) -> Callable:
  """``jax.shard_map(fn)``; inputs on a mesh with Explicit axes are first resharded."""
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
  if all(types[a] != AxisType.Explicit for a in axes):
    return mapped

  def resharded(*args):
    args = tuple(
      jax.tree.map(lambda x, s=spec: jax.reshard(x, NamedSharding(mesh, s)), arg)
      for arg, spec in zip(args, in_specs, strict=True)
    )
    return mapped(*args)

  return resharded


def _check_options(loss_reduction: str, params_layout: str) -> None:
  if loss_reduction not in _REDUCTIONS:
    raise ValueError(f"`loss_reduction` must be one of {_REDUCTIONS}, got {loss_reduction!r}.")
  if params_layout not in _LAYOUTS:
    raise ValueError(f"`params_layout` must be one of {_LAYOUTS}, got {params_layout!r}.")


def _check_batch(batch: Any, n: int) -> None:
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError("The batch holds no arrays to split over the workers.")
  for path, x in leaves:
    shape = jnp.shape(x)
    if not shape or shape[0] % n:
      size = shape[0] if shape else "no"
      raise ValueError(
        f"The batch leaf at {jax.tree_util.keystr(path) or 'batch'} has shape {shape}: "
        f"its dim 0 ({size}) must divide by the {n} workers, since every worker gets an "
        f"equal slice. Use a global batch size that is a multiple of {n} (pad or drop "
        "the remainder)."
      )


def _check_per_worker(tree: Any, n: int, what: str) -> None:
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    shape = jnp.shape(x)
    if not shape or shape[0] != n:
      raise ValueError(
        f"With params_layout='per_worker', every leaf of the {what} needs a leading "
        f"worker axis of size {n}; the leaf at {jax.tree_util.keystr(path) or what} has "
        f"shape {shape}. Lay the tree out with `optax_dist.per_worker(tree, mesh=mesh, "
        "axis_name=...)`."
      )


def _check_layout(opt_state: Any, params_layout: str) -> None:
  if params_layout == "replicated" and _has_center(opt_state):
    raise ValueError(
      "The optimizer holds a periodic transform (elastic_average, agn, model_average, "
      "diloco, ...), whose workers keep their own params between syncs: build the step "
      "with params_layout='per_worker' and lay params and state out with "
      "`optax_dist.per_worker`."
    )


def _pool(loss: Any, aux: Any, axes: tuple, loss_reduction: str, has_aux: bool) -> tuple:
  """The loss reduced over workers, pooled metrics, and this worker's predictions."""
  if jnp.ndim(loss) != 0:
    raise ValueError(f"`loss_fn` must return a scalar loss, got shape {jnp.shape(loss)}.")
  reduce = _collectives.psum if loss_reduction == "sum" else _collectives.pmean
  scalars = {"loss": reduce(loss, axes)}
  if not has_aux:
    return scalars, None
  if not isinstance(aux, Mapping) or not set(aux) <= _AUX_KEYS:
    got = sorted(aux) if isinstance(aux, Mapping) else type(aux).__name__
    raise ValueError(
      "With has_aux=True, `loss_fn` returns (loss, aux) with aux a dict holding "
      f"'metrics' and/or 'predictions'; got {got}."
    )
  for name, value in aux.get("metrics", {}).items():
    if name in _RESERVED:
      raise ValueError(f"The metric name {name!r} is reserved; rename the metric.")
    if isinstance(value, tuple):
      if len(value) != 2:
        raise ValueError(
          f"Metric {name!r} must be a (total, count) pair or a single total; got a "
          f"tuple of {len(value)}."
        )
      total, count = _collectives.psum(tuple(jnp.asarray(v) for v in value), axes)
      scalars[name] = total / count
    else:
      scalars[name] = _collectives.psum(jnp.asarray(value), axes)
  return scalars, aux.get("predictions")


def _metrics(scalars: dict, predictions: Any) -> dict:
  if predictions is None:
    return scalars
  return {**scalars, "predictions": predictions}


def data_parallel_step(
  loss_fn: Callable[[optax.Params, Any], Any],
  optimizer: optax.GradientTransformation,
  *,
  mesh: jax.sharding.Mesh,
  axis_name: _collectives.AxisName,
  loss_reduction: str = "mean",
  has_aux: bool = False,
  params_layout: str = "replicated",
) -> Callable[[optax.Params, optax.OptState, Any], tuple[optax.Params, optax.OptState, dict]]:
  r"""Builds a jitted data-parallel train step over a mesh axis.

  The counterpart of TensorFlow's ``replicate_model_fn``: the global batch is
  split along dim 0 into N equal slices, one per worker of ``axis_name`` (the
  towers), every worker evaluates ``loss_fn`` and its gradient on its slice
  under ``jax.shard_map``, and ``optimizer`` updates the params. With the
  towers' losses :math:`L_k`, the step reports

  .. math::

    L = \sum_{k=1}^{N} L_k \quad (\text{"sum"}), \qquad
    L = \frac{1}{N} \sum_{k=1}^{N} L_k \quad (\text{"mean"}).

  Who reduces the gradients:

  * An optimizer holding an optax_dist transform is in charge of all
    communication: :func:`optax_dist.tower` sums or averages the gradients
    (give it the same ``loss_reduction``); the periodic transforms
    (:func:`optax_dist.elastic_average`, ...) step on each worker's own
    gradient and sync every few steps.
  * A plain optax optimizer (e.g. ``optax.adam(1e-3)``) gets the gradient of
    :math:`L` above: the step sums (``"sum"``) or averages (``"mean"``) the
    workers' gradients itself, with one all-reduce, exactly as
    ``tower(optimizer, loss_reduction=...)`` would.

  Metrics are pooled over the workers, not averaged per worker: with
  ``has_aux=True``, ``loss_fn`` returns ``(loss, aux)`` and ``aux`` is a dict
  with (both optional)

  * ``"metrics"``: a dict of name to either a ``(total, count)`` pair (the step
    reports :math:`\sum_k \mathrm{total}_k / \sum_k \mathrm{count}_k`, e.g.
    ``(jnp.sum(correct), labels.shape[0])`` for an accuracy), or a single total
    (summed over workers, e.g. a count of examples);
  * ``"predictions"``: a tree of per-example arrays of the worker's slice
    (leading dim = slice size); the step returns them concatenated in the
    global batch's order.

  Params and optimizer state are laid out as ``params_layout`` says:
  ``"replicated"`` (one copy; for tower and plain optax) or ``"per_worker"``
  (a leading worker axis of size N on every leaf, see
  :func:`optax_dist.per_worker`; needed by the periodic transforms, which
  keep one set of params per worker). Initialize the state with
  ``optimizer.init`` on one copy of the params (it is local), then lay it out.

  The step returns as soon as the work is dispatched. With simulated CPU
  devices, wait for each step's result (``jax.block_until_ready``) inside a
  loop: collectives dispatched without waiting can stall XLA's CPU rendezvous.

  Args:
    loss_fn: ``loss_fn(params, batch)`` on one worker's params and slice of the
      batch; returns a scalar loss, or ``(loss, aux)`` when ``has_aux``.
    optimizer: An optax_dist transform bound to ``axis_name``, or any plain
      optax optimizer.
    mesh: The device mesh.
    axis_name: The mesh axis (or tuple of axes) of the workers.
    loss_reduction: ``"mean"`` (the default) or ``"sum"`` of the towers' losses.
    has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
    params_layout: ``"replicated"`` (the default) or ``"per_worker"``.

  Returns:
    A jitted ``step(params, opt_state, batch) -> (params, opt_state, metrics)``;
    ``metrics`` is a dict with ``"loss"``, the pooled metrics under their
    names, and ``"predictions"`` when ``loss_fn`` returned some.

  Raises:
    ValueError: at construction, for an unknown ``loss_reduction`` or
      ``params_layout``, or an axis the mesh lacks; when the step is called, if
      a batch leaf's dim 0 does not divide by the number of workers, if a
      per-worker leaf lacks the worker axis, if a periodic transform is given
      replicated params, or if ``aux`` breaks the convention above.

  Examples:
    TowerOptimizer's own test: c = 10, per-tower loss :math:`\sum |x c - y|`,
    SGD with learning rate 1, two towers with one row each. Their gradients are
    1 and 2, so ``"sum"`` moves c to 7:

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> from jax.sharding import AxisType
    >>> mesh = jax.make_mesh((2,), ("batch",), axis_types=(AxisType.Auto,),
    ...                      devices=jax.devices()[:2])
    >>> def loss_fn(c, batch):
    ...   x, y = batch
    ...   return jnp.sum(jnp.abs(x * c - y))
    >>> tx = optax_dist.tower(optax.sgd(1.0), axis_name="batch", loss_reduction="sum")
    >>> step = optax_dist.data_parallel_step(
    ...     loss_fn, tx, mesh=mesh, axis_name="batch", loss_reduction="sum")
    >>> c = jnp.float32(10.0)
    >>> x = jnp.array([[1.0], [2.0]])
    >>> c, state, metrics = jax.block_until_ready(step(c, tx.init(c), (x, x)))
    >>> float(c), float(metrics["loss"])
    (7.0, 27.0)
  """
  _check_options(loss_reduction, params_layout)
  axes, n = _mesh_workers(mesh, axis_name)
  workers = P(axes[0] if len(axes) == 1 else axes)
  layout = workers if params_layout == "per_worker" else P()

  def body(params, opt_state, batch):
    if params_layout == "per_worker":
      params, opt_state = jax.tree.map(lambda x: x[0], (params, opt_state))
    value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch)
    loss, aux = value if has_aux else (value, None)
    if not _communicates(opt_state):
      grads = _collectives.reduce_gradients(grads, axes, loss_reduction)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    scalars, predictions = _pool(loss, aux, axes, loss_reduction, has_aux)
    if params_layout == "per_worker":
      params, opt_state = jax.tree.map(lambda x: x[None], (params, opt_state))
    return params, opt_state, scalars, predictions

  mapped = _shard_mapped(
    body, mesh, axes, (layout, layout, workers), (layout, layout, P(), workers)
  )

  @jax.jit
  def step(params, opt_state, batch):
    _check_batch(batch, n)
    _check_layout(opt_state, params_layout)
    if params_layout == "per_worker":
      _check_per_worker(params, n, "params")
      _check_per_worker(opt_state, n, "optimizer state")
    params, opt_state, scalars, predictions = mapped(params, opt_state, batch)
    return params, opt_state, _metrics(scalars, predictions)

  return step


def data_parallel_eval_step(
  loss_fn: Callable[[optax.Params, Any], Any],
  *,
  mesh: jax.sharding.Mesh,
  axis_name: _collectives.AxisName,
  loss_reduction: str = "mean",
  has_aux: bool = False,
  params_layout: str = "replicated",
) -> Callable[[optax.Params, optax.OptState | None, Any], dict]:
  r"""Builds a jitted data-parallel evaluation step of the *center* params.

  The evaluation counterpart of :func:`data_parallel_step`, with the same
  ``loss_fn`` convention, batch splitting and pooling (loss reduced by
  ``loss_reduction``, ``(total, count)`` metrics pooled over workers,
  predictions concatenated in the global batch's order). The params evaluated
  are the ones a checkpoint would export: for a periodic transform
  (:func:`optax_dist.elastic_average`, ...) the center,
  :func:`optax_dist.center_params` of the state, cast to the params' dtypes
  (the reference's ``swapping_saver`` model); for :func:`optax_dist.tower`, a
  plain optax state, or ``opt_state=None``, the params themselves.

  Args:
    loss_fn: ``loss_fn(params, batch)`` on one worker's slice of the batch;
      returns a scalar loss, or ``(loss, aux)`` when ``has_aux``.
    mesh: The device mesh.
    axis_name: The mesh axis (or tuple of axes) of the workers.
    loss_reduction: ``"mean"`` (the default) or ``"sum"`` of the workers' losses.
    has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
    params_layout: ``"replicated"`` (the default) or ``"per_worker"``, as the
      train step's.

  Returns:
    A jitted ``eval_step(params, opt_state, batch) -> metrics``, ``metrics``
    as :func:`data_parallel_step` returns it.

  Raises:
    ValueError: as :func:`data_parallel_step`.

  Examples:
    Two workers of elastic averaging have drifted apart; the evaluation uses
    their center (zeros here), and the accuracy pools both workers' counts:

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> from jax.sharding import AxisType
    >>> mesh = jax.make_mesh((2,), ("batch",), axis_types=(AxisType.Auto,),
    ...                      devices=jax.devices()[:2])
    >>> def loss_fn(w, batch):
    ...   x, y = batch
    ...   pred = x @ w
    ...   correct = jnp.sum((pred > 0) == y)
    ...   return jnp.mean(pred**2), {"metrics": {"accuracy": (correct, y.shape[0])},
    ...                              "predictions": pred}
    >>> tx = optax_dist.elastic_average(optax.sgd(0.1), axis_name="batch")
    >>> w = jnp.zeros(2)
    >>> state = optax_dist.per_worker(tx.init(w), mesh=mesh, axis_name="batch")
    >>> drifted = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # Per-worker params.
    >>> evaluate = optax_dist.data_parallel_eval_step(
    ...     loss_fn, mesh=mesh, axis_name="batch", has_aux=True, params_layout="per_worker")
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    >>> y = jnp.array([False, True, False, False])
    >>> metrics = evaluate(drifted, state, (x, y))
    >>> float(metrics["loss"]), float(metrics["accuracy"]), metrics["predictions"].shape
    (0.0, 0.75, (4,))
  """
  _check_options(loss_reduction, params_layout)
  axes, n = _mesh_workers(mesh, axis_name)
  workers = P(axes[0] if len(axes) == 1 else axes)
  layout = workers if params_layout == "per_worker" else P()

  def body(params, opt_state, batch):
    if params_layout == "per_worker":
      params, opt_state = jax.tree.map(lambda x: x[0], (params, opt_state))
    if opt_state is not None and _has_center(opt_state):
      params = optax.tree.cast_like(_state.center_params(opt_state, params), params)
    value = loss_fn(params, batch)
    loss, aux = value if has_aux else (value, None)
    return _pool(loss, aux, axes, loss_reduction, has_aux)

  mapped = _shard_mapped(body, mesh, axes, (layout, layout, workers), (P(), workers))

  @jax.jit
  def eval_step(params, opt_state, batch):
    _check_batch(batch, n)
    if opt_state is not None:
      _check_layout(opt_state, params_layout)
    if params_layout == "per_worker":
      _check_per_worker(params, n, "params")
      _check_per_worker(opt_state, n, "optimizer state")
    return _metrics(*mapped(params, opt_state, batch))

  return eval_step


def per_worker(tree: Any, *, mesh: jax.sharding.Mesh, axis_name: _collectives.AxisName) -> Any:
  """N identical copies of ``tree``, stacked on a leading worker axis and sharded over it.

  The ``"per_worker"`` layout of :func:`data_parallel_step`: worker ``k`` holds
  slice ``k`` of every leaf. Build the optimizer state with ``optimizer.init``
  on one copy of the params (``init`` is local), then lay out both; all
  workers then start identical, as the periodic transforms require (the
  effect of :func:`optax_dist.broadcast_params`). Read worker ``k``'s copy
  back with ``jax.tree.map(lambda x: x[k], tree)``.

  Args:
    tree: A tree of arrays (params, an optimizer state, ...).
    mesh: The device mesh.
    axis_name: The mesh axis (or tuple of axes) of the workers.

  Returns:
    The tree with every leaf of shape ``(N, *leaf.shape)``, sharded along the
    workers' axis.

  Raises:
    ValueError: if the mesh has no axis ``axis_name``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_dist
    >>> from jax.sharding import AxisType
    >>> mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Auto,),
    ...                      devices=jax.devices()[:4])
    >>> stacked = optax_dist.per_worker({"w": jnp.arange(3.0)}, mesh=mesh, axis_name="batch")
    >>> stacked["w"].shape, len(stacked["w"].sharding.device_set)
    ((4, 3), 4)
  """
  axes, n = _mesh_workers(mesh, axis_name)
  sharding = NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))

  def lay_out(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return jax.device_put(jnp.broadcast_to(x[None], (n, *x.shape)), sharding)

  return jax.tree.map(lay_out, tree)
