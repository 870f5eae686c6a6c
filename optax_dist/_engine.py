"""The periodic engine: the transformation every periodic algorithm is.

Elastic averaging, AGN, model averaging and DiLoCo all take a local inner
step on every call, count their calls, and now and then run a sync that talks
to the other workers and moves the worker (and a center) by a correction added
to the inner update. :func:`periodic` builds that transformation once. It
owns the state's bookkeeping (``inner_state``, the ``sync`` counters and
schedule, a delayed sync's ``pending`` value) and decides when to sync; an
algorithm supplies the declaration of its state's fields
(:mod:`optax_dist._declare`), their initial values and its sync, in one of
two shapes:

* :class:`OnePhase` (elastic averaging, AGN): ``sync(local, fields)``, on the
  worker after its inner step;
* :class:`TwoPhase` (model averaging, DiLoCo): ``reduce(x, fields)``, the
  collective, and ``apply(fields, pending)``, the outer step; only a sync in
  two phases can be delayed (``delay``) or land the workers part-way
  (``blend``).

Every call follows one plan (:meth:`optax_dist.SyncSchedule.plan`): the
warm-up's averaged gradients, each fragment's reduction when it is delayed,
the inner step, then each fragment's outer step. A static ``sync`` flag makes
each decision a Python bool (``False`` compiles nothing); ``sync=None`` makes
it a traced bool, the code in a loop of zero or one trip
(:func:`optax_dist._syncloop.run_on_sync`). With fragments, a fragment's sync
sees only that fragment's leaves (the others are ``optax.MaskedNode``, as
under ``optax.masked``) and its own entry of the per-fragment fields.
"""

from collections.abc import Callable
import dataclasses
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_dist import _checks
from optax_dist import _collectives
from optax_dist import _declare
from optax_dist import _flags
from optax_dist import _fragments
from optax_dist import _offload
from optax_dist import _reduce
from optax_dist import _schedule
from optax_dist import _syncloop
from optax_dist._declare import Pending


class OnePhase(NamedTuple):
  """A sync in one phase: ``sync(local, fields) -> Synced``.

  ``local`` is the worker after this call's inner step
  (:class:`optax_dist._declare.Local`), ``fields`` the synced fields.
  """

  sync: Callable[[_declare.Local, Any], _declare.Synced]


class TwoPhase(NamedTuple):
  """A sync in two phases: its collective, then its outer step.

  Attributes:
    reduce: ``reduce(x, fields) -> (Pending, fields)``: the collective, from
      ``x``, the worker in center precision: after this call's inner step,
      or with a ``delay`` the params this call receives (nothing computed
      from its gradients).
    apply: ``apply(fields, pending) -> fields``: the outer step; the workers
      then land on ``blend * x + (1 - blend) * center``.
    first_phase: Optional, for a collective of two phases (the quantized
      ring): ``first_phase(x, fields) -> (Pending, fields)``, the first
      alone. When a reduced sync waits (``delay >= 2``) it runs on the
      reducing call, and ``gather`` on the applying one, so that each phase
      overlaps a different call's compute.
    gather: ``gather(pending, fields) -> (Pending, fields)``: the second
      phase, before ``apply``.
  """

  reduce: Callable[[Any, Any], tuple[Pending, Any]]
  apply: Callable[[Any, Pending], Any]
  first_phase: Callable[[Any, Any], tuple[Pending, Any]] | None = None
  gather: Callable[[Any, Any], tuple[Pending, Any]] | None = None


def periodic(
  name: str,
  inner: optax.GradientTransformation,
  declared: _declare.Declaration,
  sync: OnePhase | TwoPhase,
  *,
  axis_name: Any,
  period_name: str,
  period: Any,
  init: Callable[[Any], dict[str, Any]],
  init_fragment: Callable[[Any], dict[str, Any]] | None = None,
  before: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None,
  sync_warmup: Any = None,
  fragments: Any = None,
  host_offload: Any = False,
  delay: Any = None,
  blend: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """A periodic transform.

  Args:
    name: The algorithm's name, for error messages.
    inner: The local optimizer.
    declared: The declaration of the state's fields.
    sync: The algorithm's sync, a :class:`OnePhase` or a :class:`TwoPhase`.
    axis_name: The workers' axis (or tuple of axes).
    period_name: The name of the period's argument (``sync_period``, ...).
    period: Calls between two syncs of the same fragment.
    init: ``init(center) -> fields``: the algorithm's own fields of a fresh
      state, except the per-fragment ones.
    init_fragment: ``init_fragment(center_f) -> fields``: the per-fragment
      fields of one fragment (all of the center with one fragment).
    before: ``before(grads, state, params) -> (grads, state)``: what the
      algorithm does on every call before the engine's (e.g. EASGD's ``rho``
      term, AGN's accumulator).
    sync_warmup, fragments, host_offload, delay, blend: The algorithm's
      arguments of those names, as given (they are validated here); ``delay``
      and ``blend`` need a :class:`TwoPhase` sync.

  Returns:
    The transformation; its ``update`` takes the static ``sync`` flag.
  """
  _declare.check_transformation(inner, "inner", "optax.adamw(1e-3)")
  if not isinstance(sync, (OnePhase, TwoPhase)):
    raise TypeError(f"{name}: the sync must be a OnePhase or a TwoPhase, got {sync!r}.")
  if isinstance(sync, OnePhase) and (delay is not None or blend is not None):
    raise TypeError(f"{name}: `delay` and `blend` need a sync in two phases (a TwoPhase).")
  settings = _schedule.ScheduleArgs.check(period_name, period, sync_warmup, fragments, delay, blend)
  if not isinstance(host_offload, bool):
    raise TypeError(f"`host_offload` must be a Python bool, got {host_offload!r}.")
  if host_offload:
    _offload.check_host_memory()
  engine = _Engine(
    name,
    optax.with_extra_args_support(inner),
    declared,
    _collectives.axis_tuple(axis_name),
    settings,
    host_offload,
    init,
    init_fragment,
    sync,
  )

  def update_fn(updates, state, params=None, *, sync=None, **extra_args):
    if params is None:
      raise ValueError(f"{name} needs the current params: call `update(updates, state, params)`.")
    if before is not None:
      updates, state = before(updates, state, params)
    return engine.update(state, updates, params, extra_args, sync)

  return optax.GradientTransformationExtraArgs(engine.init, update_fn)


def center_like(params: Any) -> Any:
  """A copy of params in center precision (an abstract leaf gives an abstract one)."""

  def copy(p: Any) -> Any:
    dtype = _declare.center_dtype(p.dtype)
    if isinstance(p, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(p.shape, dtype, sharding=p.sharding)
    return jnp.asarray(p, dtype)

  return jax.tree.map(copy, params)


@dataclasses.dataclass(frozen=True)
class _Engine:
  name: str
  inner: optax.GradientTransformationExtraArgs
  declared: _declare.Declaration
  axes: tuple
  settings: _schedule.ScheduleArgs
  host_offload: bool
  init_fields: Callable[[Any], dict[str, Any]]
  init_fragment: Callable[[Any], dict[str, Any]] | None
  phases: OnePhase | TwoPhase

  def init(self, params: Any) -> Any:
    """A fresh state: the center at the params, the counters at zero."""
    _checks.check_floating(params, self.name)
    schedule = self.settings.schedule(params)
    center = center_like(params)
    fields = dict(self.init_fields(center))
    if self.init_fragment is not None:
      masks = _fragments.masks_of(self.settings.fragments, params)
      if masks is None:
        fields.update(self.init_fragment(center))
      else:  # A tuple of F entries, each over its fragment's leaves.
        parts = [self.init_fragment(_fragments.view(center, m)) for m in masks]
        fields.update({k: tuple(p[k] for p in parts) for k in parts[0]})
    zero = jnp.zeros([], jnp.int32)
    engine_fields = {
      "inner_state": self.inner.init(params),
      "sync": _schedule.SyncState(zero, zero, zero, zero, schedule),
    }
    if "pending" in self.declared.names:
      # A buffer only when a reduced sync waits.
      engine_fields["pending"] = Pending.fresh(center) if schedule.waits else optax.EmptyState()
    state = self.declared.state(center=center, **fields, **engine_fields)
    if not self.host_offload:
      return state
    placed = {f: _offload.to_host(getattr(state, f)) for f in self.declared.offloaded}
    if schedule.waits:  # A reduced sync waits there too.
      placed["pending"] = state.pending._replace(value=_offload.to_host(state.pending.value))
    return state._replace(**placed)

  def update(self, state: Any, grads: Any, params: Any, extra_args: dict, sync: Any) -> tuple:
    """One call: ``(updates, new_state)``."""
    _checks.check_structures(grads, params, self.name)
    expected = jax.eval_shape(self.inner.init, params)
    _checks.check_inner_state(state.inner_state, expected, self.name)
    counters: _schedule.SyncState = state.sync
    schedule = counters.schedule
    self.settings.check_state(schedule, params, self.name)
    flag = _flags.check_flag(sync, schedule.fragments)
    _flags.check_fits(self.name, flag, schedule)
    _flags.verify_flag(flag, counters.calls, schedule)
    masks = _fragments.masks_of(self.settings.fragments, params) if schedule.fragments > 1 else None
    call = _Call(
      self, state, params, extra_args, _fragments.Views(self.declared.per_fragment, masks)
    )
    call.run(grads, schedule.plan(flag, optax.safe_increment(counters.calls)))
    return call.updates, call.new_state()


# How a periodic transform's engine reads in its settings (``_settings.lines``),
# so that a step can tell a periodic optimizer before any state exists.
SETTINGS_MARK = f"<{__name__}.{_Engine.__qualname__}>"


class _Call:
  """One call of a periodic transform: what it computes, step by step."""

  def __init__(self, engine: _Engine, state: Any, params: Any, extra_args: dict, views: Any):
    self.engine, self.state, self.params, self.extra_args = engine, state, params, extra_args
    self.views = views
    self.schedule: _schedule.SyncSchedule = state.sync.schedule
    self.fields = engine.declared.view(state)
    self.inner_state = state.inner_state
    self.counter = state.sync.calls
    self.pending: Any = state.pending if self.schedule.waits else None
    self.offloaded = engine.declared.offloaded if engine.host_offload else ()
    self.offload_pending = engine.host_offload and self.schedule.waits
    zero = jnp.zeros([], jnp.int32)
    self.synced = self.skipped = self.dropped = zero
    self.updates: Any = None

  def when(self, decision: Any, phase: Callable[[Any, Any], Any], carry: Any, inputs: Any) -> Any:
    """``phase(carry, inputs)`` where ``decision`` holds (a Python or a traced bool).

    ``True`` runs it inline and ``False`` not at all (a static flag); a
    traced decision runs it in a loop of zero or one trip. Either way the
    result keeps the carry's varying type.
    """
    if decision is False:
      return carry
    if decision is True:
      return _syncloop.vary_tree_like(phase(carry, inputs), carry)
    return _syncloop.run_on_sync(decision, phase, carry, self.engine.axes, inputs)

  def run(self, grads: Any, plan: _schedule.Plan) -> None:
    """The call's plan: the warm-up's average, each delayed reduction, the inner step,
    the warm-up's restart, each outer step."""
    views, schedule = self.views, self.schedule
    grads, self.dropped = self.when(plan.warmup, self.averaged, (grads, self.dropped), ())
    reduced: list[Any] = [None] * schedule.fragments
    for f, phases in enumerate(plan.fragments if schedule.splits else ()):
      if phases.reduce is False:
        continue
      params_f = views.tree(self.params, f)
      start = self.pending_view(f) if schedule.waits else Pending.fresh(params_f)
      reduced[f], fields_f = self.when(
        phases.reduce,
        lambda loop, p: self.reduce_fragment(p, loop[1]),
        (start, views.fields(self.fields, f)),
        params_f,
      )
      self.fields = views.merge_fields(self.fields, fields_f, f)
      if schedule.waits:
        self.pending = self.pending_merge(reduced[f])
    self.inner_step(grads)
    self.updates, self.fields = self.when(
      plan.warmup,
      lambda loop, params: (loop[0], self.restarted_on(params, *loop)),
      (self.updates, self.fields),
      self.params,
    )
    for f, phases in enumerate(plan.fragments):
      if phases.apply is False:
        continue
      red = self.pending_view(f) if schedule.waits else reduced[f]
      zero = jnp.zeros([], jnp.int32)
      first = (views.tree(self.updates, f), views.fields(self.fields, f), zero)
      updates_f, fields_f, moved, self.inner_state, self.dropped = self.when(
        phases.apply,
        self.sync_phase,
        (*first, self.inner_state, self.dropped),
        (views.tree(self.params, f), red),
      )
      self.updates = views.merge_tree(self.updates, updates_f)
      self.fields = views.merge_fields(self.fields, fields_f, f)
      ran = jnp.asarray(phases.apply, jnp.int32)
      self.synced, self.skipped = self.synced + moved, self.skipped + ran - moved

  # Both kinds of decision run the same code between the same rounding
  # points (see rounding_fence): the inner update, and a sync's inputs and
  # outputs.
  def fence(self, tree: Any) -> Any:
    return _syncloop.rounding_fence(tree, self.counter)

  def averaged(self, loop: tuple, _: Any) -> tuple:
    """A warm-up call's gradients: the finite workers' mean."""
    mean, left_out = _reduce.finite_mean(loop[0], self.engine.axes)
    return self.fence(mean), loop[1] + left_out.astype(jnp.int32)

  def inner_step(self, grads: Any) -> None:
    updates, self.inner_state = self.engine.inner.update(
      grads, self.state.inner_state, self.params, **self.extra_args
    )
    self.updates = self.fence(updates)

  def moved(self, fields: Any, move: Callable[[Any], Any]) -> Any:
    """With host offload, the offloaded fields come to the device for a sync and go back."""
    names = [n for n in self.offloaded if n in fields._fields]
    return fields._replace(**{n: move(getattr(fields, n)) for n in names})

  def restarted_on(self, params: Any, updates: Any, fields: Any) -> Any:
    """The synced fields once every worker stands where ``updates`` land it (warm-up)."""
    fields = self.fence(self.moved(fields, _offload.to_device))
    x = _declare.Local.of(params, updates).x
    return self.moved(self.fence(self.engine.declared.restarted(fields, x)), _offload.to_host)

  def fresh_inner(self, left_out: jax.Array, inner_state: Any) -> Any:
    """A worker left out of a sync restarts its inner state: ``inner.init`` at the center."""
    center = self.state.center
    if "center" in self.offloaded:
      center = _offload.to_device(center)
    fresh = self.engine.inner.init(optax.tree.cast_like(center, self.params))
    return _syncloop.vary_tree_like(_reduce.where(left_out, fresh, inner_state), inner_state)

  def sync_phase(self, loop: tuple, inputs: Any) -> tuple:
    """A fragment's sync (with a delay, its outer step), its counters and the inner state."""
    updates_f, fields_f, _, inner_state, dropped = loop
    params_f, red = inputs
    updates_f, fields_f, moved, left_out = self.sync_fragment(
      params_f, updates_f, fields_f, red, inner_state
    )
    inner_state = self.fresh_inner(left_out, inner_state)
    return updates_f, fields_f, moved, inner_state, dropped + left_out.astype(jnp.int32)

  def sync_fragment(
    self, params_f: Any, updates_f: Any, fields_f: Any, red: Any, inner_state: Any
  ) -> tuple:
    """A fragment's sync; with a delay (``red`` not None), the call that applies it.

    A worker whose ``inner_state`` is not finite is left out, as a non-finite one
    (undelayed syncs: a delayed sync's reduction reads the state it receives).
    """
    engine, sync = self.engine, self.engine.phases
    fields_f = self.fence(self.moved(fields_f, _offload.to_device))
    local = _declare.Local.of(params_f, updates_f)
    sent = local._replace(x=_reduce.left_out_unless(inner_state, local.x))
    if isinstance(sync, OnePhase):
      out = sync.sync(sent, fields_f)
    else:
      if red is None:  # Undelayed: the reduction, then the outer step.
        red, fields_f = sync.reduce(sent.x, fields_f)
      else:
        if self.offload_pending:
          red = red._replace(value=_offload.to_device(red.value))
        red = self.fence(red)
        if self.schedule.waits and sync.gather is not None:  # The second phase, here.
          red, fields_f = sync.gather(red, fields_f)
          red, fields_f = self.fence((red, fields_f))
      new = sync.apply(fields_f, red)
      target = _reduce.blended(local.x, new.center, engine.settings.blend, red.left_out)
      out = _declare.Synced(local.moved_to(target), new, red.moved, red.left_out)
    new = self.moved(self.fence(out.fields), _offload.to_host)
    return self.fence(out.updates), new, out.moved.astype(jnp.int32), out.left_out

  def reduce_fragment(self, params_f: Any, fields_f: Any) -> tuple[Pending, Any]:
    """A delayed sync's reduction, from the params this call receives."""
    sync = self.engine.phases
    assert isinstance(sync, TwoPhase)  # periodic() refuses a delay otherwise.
    fields_f = self.fence(self.moved(fields_f, _offload.to_device))
    x = jax.tree.map(lambda p: p.astype(_declare.center_dtype(p.dtype)), params_f)
    # The reduction's inputs behind a barrier: without it XLA fuses a pass
    # of the reduction over a param (the spike check's sum of squares) into
    # the inner step's kernel over the same param, and the collective then
    # waits for the gradients; with it, the reduction reads only this call's
    # inputs and can run while the forward and backward passes do.
    x, fields_f = jax.lax.optimization_barrier((x, fields_f))
    # A reduced sync that waits runs the first phase of a two-phase collective.
    first = sync.first_phase if self.schedule.waits and sync.gather is not None else None
    red, new = (first or sync.reduce)(x, fields_f)
    red = self.fence(red)
    if self.offload_pending:
      red = red._replace(value=_offload.to_host(red.value))
    return red, self.moved(self.fence(new), _offload.to_host)

  def pending_view(self, f: int) -> Pending:
    return self.pending._replace(value=self.views.tree(self.pending.value, f))

  def pending_merge(self, red: Pending) -> Pending:
    return red._replace(value=self.views.merge_tree(self.pending.value, red.value))

  def new_state(self) -> Any:
    counters = self.state.sync
    return self.state._replace(
      inner_state=self.inner_state,
      sync=counters._replace(
        calls=optax.safe_increment(counters.calls),
        num_syncs=counters.num_syncs + self.synced,
        num_skipped_syncs=counters.num_skipped_syncs + self.skipped,
        num_dropped=counters.num_dropped + self.dropped,
      ),
      **self.fields._asdict(),
      **({"pending": self.pending} if self.schedule.waits else {}),
    )
