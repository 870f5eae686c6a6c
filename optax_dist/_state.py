"""Reading optimizer states: centers, counters and sync schedules.

Optax states are trees of ``NamedTuple`` s (``optax.chain`` gives a tuple of
them, ``optax.masked`` and ``optax.multi_transform`` wrap them, optax_dist's
own states hold the inner state in a field). The helpers here walk any such
tree in a fixed order: depth first, fields in declaration order, containers in
``jax.tree`` order (dicts by sorted key), each state before the states nested
in it.

The states of optax_dist are recognized by their type (:class:`TowerState`)
or their shape: a periodic transform's state holds a
:class:`~optax_dist.SyncState` (counters and schedule) in a ``sync`` field,
beside its ``center``.
"""

from collections.abc import Iterator
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_dist import _declare
from optax_dist import _nonfinite
from optax_dist import _schedule
from optax_dist import _tower

# Wrappers that call the transform inside them on some calls only, or on
# each worker's own decision: a host-side count of calls cannot follow them.
_CALL_SKIPPING = {
  optax.MultiStepsState: "optax.MultiSteps calls it once every k calls",
  optax.ApplyIfFiniteState: (
    "optax.apply_if_finite skips calls on each worker alone (use "
    "optax_dist.apply_if_all_finite, which skips on every worker alike)"
  ),
  optax.ConditionallyTransformState: "optax.conditionally_transform calls it on some calls only",
  optax.ConditionallyMaskState: "optax.conditionally_mask calls it on some calls only",
}


def is_periodic(state: Any) -> bool:
  """Whether ``state`` is the state of a periodic transform (it holds a ``SyncState``)."""
  return isinstance(getattr(state, "sync", None), _schedule.SyncState)


def holds_periodic(opt_state: Any) -> bool:
  """Whether a periodic transform's state is anywhere in ``opt_state``."""
  return any(is_periodic(s) for s in iter_states(opt_state))


def periodic_counter(opt_state: Any) -> Any:
  """The call counter (``calls``) of the first periodic state in ``opt_state``, or None."""
  return next((s.sync.calls for s in iter_states(opt_state) if is_periodic(s)), None)


def communicates(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds an optax_dist transform that talks to the workers."""
  return any(is_periodic(s) or isinstance(s, _tower.TowerState) for s in iter_states(opt_state))


def is_state(x: Any) -> bool:
  """A non-empty NamedTuple (``optax.MaskedNode`` is an empty one)."""
  return isinstance(x, tuple) and bool(getattr(x, "_fields", ()))


def iter_states(tree: Any) -> Iterator[Any]:
  """The NamedTuple states in ``tree``, depth first, parents first."""
  for state, _ in walk(tree):
    yield state


def walk(tree: Any, ancestors: tuple = ()) -> Iterator[tuple[Any, tuple]]:
  """``(state, ancestors)`` for every NamedTuple state in ``tree``, parents first."""
  for node in jax.tree.leaves(tree, is_leaf=is_state):
    if is_state(node):
      yield node, ancestors
      for value in node:
        yield from walk(value, (*ancestors, node))


def center_params(opt_state: optax.OptState, params: optax.Params | None = None) -> optax.Params:
  """The center variables of the periodic transform inside ``opt_state``.

  The counterpart of the reference's ``swapping_saver``: the center, shaped
  like the params and under their names, ready for evaluation or for an orbax
  checkpoint. Every worker holds an identical copy; this returns the caller's.
  The center keeps its own dtype (float32 for bfloat16 params): cast it with
  ``optax.tree.cast_like(center, params)`` where the params' dtype is needed.

  Under ``optax.masked`` (or ``optax.multi_transform``) the center has
  ``optax.MaskedNode`` where the transform does not apply; pass ``params`` to
  fill those leaves from them.

  Args:
    opt_state: A state holding exactly one periodic optax_dist transform
      (anywhere inside a chain or wrapper).
    params: Optional params, to fill the leaves that have no center.

  Returns:
    The center params.

  Raises:
    ValueError: if the state holds no periodic transform, or several (e.g.
      nested ones; read the one you want from its own state).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax.chain(optax.clip(1.0), optax_dist.elastic_average(
    ...     optax.sgd(0.5), axis_name="w", communication_period=1, moving_rate=0.5))
    >>> def step(params):
    ...   state = tx.init(params)
    ...   updates, state = tx.update(-jnp.ones(2), state, params)
    ...   return optax_dist.center_params(state)
    >>> jax.vmap(step, axis_name="w")(jnp.zeros((1, 2)))
    Array([[0.25, 0.25]], dtype=float32)
  """
  centers = [state.center for state in iter_states(opt_state) if is_periodic(state)]
  if not centers:
    raise ValueError(
      "This optimizer state holds no periodic optax_dist transform (such as "
      "`elastic_average`), so it has no center variables."
    )
  if len(centers) > 1:
    raise ValueError(
      f"This optimizer state holds {len(centers)} periodic optax_dist "
      "transforms, each with its own center; call `center_params` on the "
      "state of the one you want."
    )
  center = centers[0]
  if params is None:
    return center

  def fill(c: Any, p: Any) -> Any:
    return p if isinstance(c, optax.MaskedNode) else c

  return jax.tree.map(fill, center, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def _periodic_states(opt_state: Any, what: str) -> list[tuple[Any, tuple]]:
  found = [(state, ancestors) for state, ancestors in walk(opt_state) if is_periodic(state)]
  if not found:
    raise ValueError(
      f"This optimizer state holds no periodic optax_dist transform "
      f"({_declare.algorithms()}), so it has no {what}."
    )
  return found


def skipped_syncs(opt_state: optax.OptState) -> jax.Array:
  """The syncs that left the center as it was: no worker was finite.

  A periodic transform reduces the workers' params, differences or
  pseudo-gradients at a sync. Each worker checks its own contribution, a
  non-finite one is left out (it counts in :func:`dropped_syncs` of that
  worker), and the center moves from the finite workers. Only when none is
  finite does the center keep its last value; the sync then counts here
  instead of in :func:`global_step`, and every worker restarts from that
  finite center. See "When a worker goes bad" in the docs.

  Args:
    opt_state: A state holding one periodic transform (anywhere inside).

  Returns:
    A 0-d int32 array (a leading worker axis when the state has one), the same
    on every worker.

  Raises:
    ValueError: if the state holds no periodic transform.

  Examples:
    Both workers' params turn infinite: the sync has nothing finite to
    average, and both restart from the center (zeros):

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.model_average(optax.sgd(1.0), axis_name="w", interval_steps=1)
    >>> def step(params, grads):
    ...   updates, state = tx.update(grads, tx.init(params), params)
    ...   return optax.apply_updates(params, updates), optax_dist.skipped_syncs(state)
    >>> params = jnp.zeros((2, 3))
    >>> grads = jnp.array([[1.0, jnp.inf, 1.0], [jnp.inf, 1.0, 1.0]])
    >>> jax.vmap(step, axis_name="w")(params, grads)
    (Array([[0., 0., 0.],
           [0., 0., 0.]], dtype=float32), Array([1, 1], dtype=int32))
  """
  return _periodic_states(opt_state, "skipped syncs")[0][0].sync.num_skipped_syncs


def dropped_syncs(opt_state: optax.OptState) -> jax.Array:
  """How often a sync left this worker out for not being finite.

  At a sync each worker checks its own contribution (params, difference,
  pseudo-gradient or accumulated gradient); a non-finite one enters the
  average as zero, the center moves from the other workers, and this worker
  restarts on the center with a fresh inner state. Warm-up calls count too
  (a worker whose gradient was not finite is left out of the mean). Unlike
  the other counters this one differs between workers: read on per-worker
  state (a leading worker axis), it says which worker went bad and how often.

  Args:
    opt_state: A state holding one periodic transform (anywhere inside).

  Returns:
    A 0-d int32 array (a leading worker axis when the state has one).

  Raises:
    ValueError: if the state holds no periodic transform.

  Examples:
    Worker 1's gradient is NaN at a sync: the center is worker 0's params,
    and both workers leave on it.

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.model_average(optax.sgd(1.0), axis_name="w", interval_steps=1)
    >>> def step(params, grads):
    ...   updates, state = tx.update(grads, tx.init(params), params)
    ...   params = optax_dist.restart_nonfinite(optax.apply_updates(params, updates), state)
    ...   return params, optax_dist.dropped_syncs(state), optax_dist.skipped_syncs(state)
    >>> grads = jnp.array([[1.0, 2.0], [jnp.nan, 1.0]])
    >>> jax.vmap(step, axis_name="w")(jnp.zeros((2, 2)), grads)
    (Array([[-1., -2.],
           [-1., -2.]], dtype=float32), Array([0, 1], dtype=int32), Array([0, 0], dtype=int32))
  """
  return _periodic_states(opt_state, "dropped syncs")[0][0].sync.num_dropped


def restart_nonfinite(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
  """This worker's params, or the center if any of them is not finite.

  A sync repairs a bad worker's optimizer state (it restarts from a fresh
  inner state) and sends it the update that lands it on the center, but
  params that hold a NaN cannot be repaired by an update: ``NaN + u`` is
  NaN for every ``u``. Whoever applies the updates does it: call this right
  after ``optax.apply_updates``, on each worker's own params (inside the
  function mapped over the workers):

  .. code-block:: python

    updates, opt_state = tx.update(grads, opt_state, params, sync=flag)
    params = optax.apply_updates(params, updates)
    if flag is not False:  # On sync calls (a local step need not pay for it).
      params = optax_dist.restart_nonfinite(params, opt_state)

  :func:`optax_dist.data_parallel_step` does this by itself on sync calls.
  It acts on the calls that sync (that reduce or apply a delayed sync) only,
  whatever the flag: called on every call, it leaves a bad worker as it is
  until the sync, which leaves it out and counts it in
  :func:`dropped_syncs`. On a finite worker it changes nothing. It reads the center of the state
  after the update (cast to the params' dtypes) and checks the params with a
  local reduction (no collective); where params are sharded over other mesh
  axes (FSDP), each device replaces its own shard when it holds a non-finite
  value.

  Args:
    params: One worker's params.
    opt_state: Its optimizer state, holding one periodic transform.

  Returns:
    ``params``, or the center in the params' dtypes.

  Raises:
    ValueError: if the state holds no periodic transform, or several.

  Examples:
    One worker whose gradient is NaN on its first call (a local call, left
    as it is) is restarted on the center by the sync of call 2:

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.diloco(optax.sgd(0.1), axis_name="w", sync_period=2)
    >>> def train(params, grads):
    ...   state, seen = tx.init(params), []
    ...   for g in grads:
    ...     updates, state = tx.update(g, state, params)
    ...     params = optax_dist.restart_nonfinite(optax.apply_updates(params, updates), state)
    ...     seen.append(params)
    ...   return seen
    >>> grads = jnp.array([[[jnp.nan, 0.0]], [[0.0, 0.0]]])  # (calls, workers, params)
    >>> jax.vmap(train, axis_name="w", in_axes=(0, 1))(jnp.array([[1.0, 2.0]]), grads)
    [Array([[nan,  2.]], dtype=float32), Array([[1., 2.]], dtype=float32)]
  """
  center = center_params(opt_state, params)
  # A center kept in host memory (host_offload) comes to the device first.
  center = jax.tree.map(lambda c: jax.device_put(c, jax.memory.Space.Device), center)
  center = optax.tree.cast_like(center, params)
  state = _periodic_states(opt_state, "center")[0][0]
  # Only on the calls that sync: repaired on a local call, the worker would
  # be finite at the sync, which would not count it as dropped.
  repair = jnp.logical_and(
    state.sync.schedule.runs_a_sync(state.sync.calls),
    jnp.logical_not(_nonfinite.all_finite(params)),
  )
  return jax.tree.map(lambda p, c: jnp.where(repair, c, p), params, center)


def sync_schedule(opt_state: optax.OptState) -> _schedule.SyncSchedule:
  """When the periodic transform inside ``opt_state`` syncs.

  A training loop that passes the static ``sync`` flag itself (so that each
  kind of call compiles to its own program and a local step carries no sync
  code) reads the schedule once and asks it for the flag of every call,
  without repeating the period:

  .. code-block:: python

    schedule = optax_dist.sync_schedule(opt_state)
    count = optax_dist.call_count(opt_state)  # 0, or the calls of a restored state
    step = jax.jit(train_step, static_argnames="sync")
    for batch in batches:
      params, opt_state = step(params, opt_state, batch, sync=schedule(count))
      count += 1

  The schedule is static (it lives in the state as a pytree node without
  arrays), so this reads nothing from the device. :func:`data_parallel_step`
  does the same by itself. While writing such a loop, trace it inside
  :func:`optax_dist.checking_sync_flags`: a flag that disagrees with the
  transform's own call counter (a forgotten ``count += 1``) is then an
  error.

  Args:
    opt_state: A state holding periodic transforms, anywhere inside
      ``optax.chain``, ``optax.masked``, ``optax.multi_transform``,
      ``optax.inject_hyperparams``, :func:`optax_dist.tower` or
      :func:`optax_dist.apply_if_all_finite`. Several periodic transforms
      must share one schedule (they all receive the same flag).

  Returns:
    The :class:`~optax_dist.SyncSchedule`.

  Raises:
    ValueError: if the state holds no periodic transform; if it holds several
      with different schedules; or if one sits inside a wrapper that calls it
      on some calls only (``optax.MultiSteps``, ``optax.apply_if_finite``,
      ``optax.conditionally_transform``, ``optax.conditionally_mask``), so
      that the calls of the loop are not the calls of the transform. There,
      pass ``sync=None`` (the program decides from the transform's own
      counter).

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dist
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), optax_dist.diloco(
    ...     optax.adamw(1e-3), axis_name="w", sync_period=4, sync_warmup=2))
    >>> schedule = optax_dist.sync_schedule(tx.init({"w": jnp.zeros(3)}))
    >>> schedule
    SyncSchedule(period=4, warmup=2, fragments=1)
    >>> [schedule(count) for count in range(7)]
    ['warmup', 'warmup', False, False, False, True, False]
  """
  found = _periodic_states(opt_state, "sync schedule")
  for _, ancestors in found:
    for ancestor in ancestors:
      reason = _CALL_SKIPPING.get(type(ancestor))
      if reason is not None:
        raise ValueError(
          f"The sync schedule of this optimizer cannot be known from its calls: a periodic "
          f"transform sits inside {type(ancestor).__name__}, and {reason}. Pass `sync=None` "
          "and let the program decide from the transform's own counter."
        )
  schedules = {state.sync.schedule for state, _ in found}
  if len(schedules) > 1:
    raise ValueError(
      f"This optimizer holds periodic transforms with different schedules {sorted(map(str, schedules))}; "
      "one `sync` flag cannot serve them all. Give them one schedule, or pass `sync=None`."
    )
  return found[0][0].sync.schedule


def call_count(opt_state: optax.OptState) -> int:
  """The calls the periodic transform inside ``opt_state`` has taken so far.

  The count that :func:`sync_schedule` takes, read from a state (for
  example a restored checkpoint) with one device read of a scalar. Steps
  that :func:`optax_dist.apply_if_all_finite` skipped on every worker count
  as calls, as a loop counts them.

  Args:
    opt_state: A state holding a periodic transform, stacked per worker or
      not, on one process or several.

  Returns:
    A Python int.

  Raises:
    ValueError: as :func:`sync_schedule`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.model_average(optax.sgd(0.1), axis_name="w", interval_steps=4)
    >>> optax_dist.call_count(tx.init(jnp.zeros(3)))
    0
  """
  sync_schedule(opt_state)  # The same errors where a count cannot be known.
  state, ancestors = _periodic_states(opt_state, "call count")[0]
  count = _read_scalar(state.sync.calls)
  for ancestor in ancestors:
    if isinstance(ancestor, _nonfinite.ApplyIfAllFiniteState):
      count += _read_scalar(ancestor.total_skipped)
  return count


def sync_flags(opt_state: optax.OptState) -> Iterator[Any]:
  """The static ``sync`` flag of every call from ``opt_state`` on, counted for you.

  A hand-written loop that passes the static flag itself must count its
  calls; one that forgets ``count += 1`` never syncs, without a word. This
  iterator owns the count instead: it starts from the calls ``opt_state`` has
  taken (:func:`call_count`, so a restored checkpoint resumes where it
  stopped) and gives :func:`sync_schedule`'s flag for each next call, one
  call per item, without end:

  .. code-block:: python

    step = jax.jit(train_step, static_argnames="sync")
    for flag, batch in zip(optax_dist.sync_flags(opt_state), batches):
      params, opt_state = step(params, opt_state, batch, sync=flag)

  Take exactly one flag per call made: build a new iterator from the state
  after anything that runs calls outside the loop.

  Args:
    opt_state: A state holding a periodic transform, stacked per worker or
      not, on one process or several.

  Returns:
    An endless iterator of flags (``"warmup"``, ``False``, ``True``, a
    fragment index or ``("apply", f)``).

  Raises:
    ValueError: as :func:`sync_schedule`, at once (not at the first item).

  Examples:
    >>> import itertools, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.model_average(optax.sgd(0.1), axis_name="w", interval_steps=3)
    >>> list(itertools.islice(optax_dist.sync_flags(tx.init(jnp.zeros(2))), 6))
    [False, False, True, False, False, True]
  """
  schedule = sync_schedule(opt_state)
  count = call_count(opt_state)
  return (schedule(c) for c in itertools.count(count))


def _read_scalar(x: Any) -> int:
  """One element of a counter that is the same on every worker (one device read)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_shards[0].data
  return int(np.asarray(x).reshape(-1)[0])
