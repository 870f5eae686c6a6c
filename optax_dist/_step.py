"""Data-parallel train and eval steps: the counterpart of ``replicate_model_fn``.

A step built here takes the *global* batch, splits it along dim 0 over the
workers of a mesh axis (:mod:`optax_dist._layout`), runs the user's loss on
every worker's slice under ``jax.shard_map``, lets the optimizer update the
params, and pools what the workers measured (:mod:`optax_dist._metrics`).
A train step holding a periodic transform picks, on the host, the program of
each call (:class:`HostSchedule`).
"""

from collections.abc import Callable
import functools
from typing import Any

import jax
from jax.sharding import PartitionSpec as P
import optax

from optax_dist import _collectives
from optax_dist import _engine
from optax_dist import _layout
from optax_dist import _metrics
from optax_dist import _schedule
from optax_dist import _settings
from optax_dist import _state
from optax_dist import _syncloop

_DISPATCHES = ("static", "in_graph")
_NO_FLAG = "no sync flag"  # The optimizer's update gets no `sync` argument.


class HostSchedule:
  """The ``sync`` flag of each call of a train step, from a count kept on the host.

  The count is read from the state (one device read) when the step is given
  a state it did not return itself: a fresh one, a restored checkpoint.
  Otherwise the state is the one the last call returned, and the count is
  the last call's plus one.
  """

  def __init__(self) -> None:
    self.schedule: Any = None
    self.count = 0
    self.counter: Any = None  # The counter leaf of the state the last call returned.

  def flag(self, opt_state: Any) -> Any:
    counter = _state.periodic_counter(opt_state)
    if counter is not self.counter:
      try:
        self.schedule = _state.sync_schedule(opt_state)
      except ValueError as e:
        raise ValueError(
          f"{e} With data_parallel_step, build the step with sync_dispatch='in_graph'."
        ) from e
      self.count = _state.call_count(opt_state)
    return self.schedule(self.count)

  def advance(self, opt_state: Any) -> None:
    self.count += 1
    self.counter = _state.periodic_counter(opt_state)


class _TrainStep:
  """A train step that picks its program per call (see :func:`data_parallel_step`)."""

  def __init__(self, run: Any, *, static: bool, mesh: Any):
    self._run = run
    self._static = static
    self._mesh = mesh
    self._host = HostSchedule()

  def __call__(self, params: Any, opt_state: Any, batch: Any) -> Any:
    try:
      if not self._static or not _state.holds_periodic(opt_state) or _traced(opt_state):
        return self._run(params, opt_state, batch)
      out = self._run(params, opt_state, batch, sync=self._host.flag(opt_state))
    except ValueError as e:
      if "incompatible devices" not in str(e):
        raise
      raise ValueError(
        "data_parallel_step: the params, optimizer state or batch live on devices other "
        f"than this step's mesh ({self._mesh.devices.size} devices, axes "
        f"{tuple(self._mesh.axis_names)}), e.g. a tree resized with `resize_workers` or "
        "restored on another mesh. Lay them out on this mesh first: "
        "`jax.device_put(tree, NamedSharding(mesh, P(axis_name)))` for per-worker trees "
        "(or `optax_dist.per_worker` for a single copy)."
      ) from e
    self._host.advance(out[1])
    return out

  def lower(self, params: Any, opt_state: Any, batch: Any) -> Any:
    """The program that decides inside (``sync=None``), e.g. for ``communication_report``.

    Its collectives are the static programs' together: those of every call,
    and, in its sync branches, those of the syncs.
    """
    return self._run.lower(params, opt_state, batch)


def _holds_periodic(optimizer: Any) -> bool:
  """Whether the optimizer (a transformation, before any state exists) holds a periodic one."""
  return any(line.endswith(_engine.SETTINGS_MARK) for line in _settings.lines(optimizer))


def _restart_on_sync(params: Any, opt_state: Any, flag: Any, axes: tuple) -> Any:
  """On sync calls, a worker whose params hold a non-finite value restarts at the center.

  See :func:`optax_dist.restart_nonfinite`. Local steps (``flag=False``) and
  warm-up calls check nothing; without a flag (the program decides), the
  check runs in the sync branch only.
  """
  periodic = [s for s in _state.iter_states(opt_state) if _state.is_periodic(s)]
  if len(periodic) != 1 or flag is False or flag == _schedule.WARMUP:
    return params
  if flag is not None:
    return _state.restart_nonfinite(params, opt_state)
  counters = periodic[0].sync
  return _syncloop.run_on_sync(
    counters.schedule.runs_a_sync(counters.calls),
    lambda p, _: _state.restart_nonfinite(p, opt_state),
    params,
    axes,
  )


def _traced(tree: Any) -> bool:
  """Whether the step is being traced by an enclosing transformation (no host count then)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def data_parallel_step(
  loss_fn: Callable[[optax.Params, Any], Any],
  optimizer: optax.GradientTransformation,
  *,
  mesh: jax.sharding.Mesh,
  axis_name: _collectives.AxisName,
  loss_reduction: str = "mean",
  has_aux: bool = False,
  params_layout: str = "replicated",
  sync_dispatch: str = "static",
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

  A worker that goes bad (its params hold an Inf or a NaN) does not stop the
  others: the sync averages the finite workers only, and on sync calls the
  step replaces the params of a worker that holds a non-finite value with the
  center (:func:`optax_dist.restart_nonfinite`); local steps check nothing.

  When to sync (periodic transforms): with ``sync_dispatch="static"`` (the
  default) the step chooses, on the host, the program of each call from the
  transform's schedule (:func:`optax_dist.sync_schedule`) and a count of
  calls it keeps itself: a local step compiles to the inner step alone (no
  loop, no conditional, no collective), a sync step to the sync alone, and
  at most one program is compiled per kind of call (local, sync, each
  fragment's sync, warm-up). The count is read from the state (one device
  read of a scalar, :func:`optax_dist.call_count`) only when the step is
  given a state it did not return itself, e.g. a restored checkpoint;
  otherwise nothing is read back. With ``sync_dispatch="in_graph"`` one
  program decides inside from the transform's counter (``sync=None``), as
  the step also does when it is traced by an enclosing transformation (a
  ``jax.jit`` around it), where the host cannot count. Both give the same
  results (see :func:`optax_dist.sync_schedule`).
  :func:`optax_dist.communication_report` of the step reads the program that
  decides inside: its every-step collectives are the local programs', its
  sync-branch collectives the sync programs'.

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
    sync_dispatch: ``"static"`` (the default: one program per kind of call,
      chosen on the host) or ``"in_graph"`` (one program that decides from
      the counter). Only periodic transforms have a choice to make.

  Returns:
    A ``step(params, opt_state, batch) -> (params, opt_state, metrics)`` that
    runs jitted programs;
    ``metrics`` is a dict with ``"loss"``, the pooled metrics under their
    names, and ``"predictions"`` when ``loss_fn`` returned some.

  Raises:
    ValueError: at construction, for an unknown ``loss_reduction``,
      ``params_layout`` or ``sync_dispatch``, an axis the mesh lacks, or an
      optimizer bound to an axis that is not the step's; when the step is called, if
      a batch leaf's dim 0 does not divide by the number of workers, if a
      per-worker leaf lacks the worker axis, if a periodic transform is given
      replicated params, if ``aux`` breaks the convention above, or if the
      sync schedule cannot be known with ``sync_dispatch="static"`` (see
      :func:`optax_dist.sync_schedule`).

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
  setup = _layout.StepLayout.make(mesh, axis_name, loss_reduction, params_layout)
  if sync_dispatch not in _DISPATCHES:
    raise ValueError(f"`sync_dispatch` must be one of {_DISPATCHES}, got {sync_dispatch!r}.")
  axes = setup.axes
  _settings.check_bound_axes(optimizer, axes, mesh, "data_parallel_step")
  if params_layout == "replicated" and _holds_periodic(optimizer):
    raise ValueError(f"data_parallel_step: {_layout.PERIODIC_NEEDS_PER_WORKER}")

  def body(params, opt_state, batch, extra):
    if params_layout == "per_worker":
      params, opt_state = jax.tree.map(lambda x: x[0], (params, opt_state))
    value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch)
    loss, aux = value if has_aux else (value, None)
    if not _state.communicates(opt_state):
      grads = _collectives.reduce_gradients(grads, axes, loss_reduction)
    updates, opt_state = optimizer.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    params = _restart_on_sync(params, opt_state, extra.get("sync"), axes)
    scalars, predictions = _metrics.pool(loss, aux, axes, loss_reduction, has_aux)
    if params_layout == "per_worker":
      params, opt_state = jax.tree.map(lambda x: x[None], (params, opt_state))
    return params, opt_state, scalars, predictions

  specs_in = (setup.layout, setup.layout, setup.workers)
  specs_out = (setup.layout, setup.layout, P(), setup.workers)

  @functools.partial(jax.jit, static_argnames="sync")
  def run(params, opt_state, batch, sync=_NO_FLAG):
    setup.check(params, opt_state, batch, params_layout)
    extra = {} if sync is _NO_FLAG else {"sync": sync}
    mapped = _layout.shard_mapped(
      functools.partial(body, extra=extra), mesh, axes, specs_in, specs_out
    )
    params, opt_state, scalars, predictions = mapped(params, opt_state, batch)
    return params, opt_state, _metrics.with_predictions(scalars, predictions)

  return _TrainStep(run, static=sync_dispatch == "static", mesh=mesh)


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

    >>> import jax, jax.numpy as jnp, numpy as np, optax, optax_dist
    >>> def loss_fn(w, batch):
    ...   x, y = batch
    ...   pred = x @ w
    ...   correct = jnp.sum((pred > 0) == y)
    ...   return jnp.mean(pred**2), {"metrics": {"accuracy": (correct, y.shape[0])},
    ...                              "predictions": pred}
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("batch",))
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
  setup = _layout.StepLayout.make(mesh, axis_name, loss_reduction, params_layout)

  def body(params, opt_state, batch):
    if params_layout == "per_worker":
      params, opt_state = jax.tree.map(lambda x: x[0], (params, opt_state))
    if opt_state is not None and _state.holds_periodic(opt_state):
      params = optax.tree.cast_like(_state.center_params(opt_state, params), params)
    value = loss_fn(params, batch)
    loss, aux = value if has_aux else (value, None)
    return _metrics.pool(loss, aux, setup.axes, loss_reduction, has_aux)

  mapped = _layout.shard_mapped(
    body,
    mesh,
    setup.axes,
    (setup.layout, setup.layout, setup.workers),
    (P(), setup.workers),
  )

  @jax.jit
  def eval_step(params, opt_state, batch):
    setup.check(params, opt_state, batch, params_layout)
    return _metrics.with_predictions(*mapped(params, opt_state, batch))

  return eval_step
