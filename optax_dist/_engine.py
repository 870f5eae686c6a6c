"""The periodic engine: the transformation every periodic algorithm is.

Elastic averaging, AGN, model averaging and DiLoCo all take a local inner
step on every call, count their calls, and now and then run a sync that talks
to the other workers and moves the worker (and a center) by a correction added
to the inner update. :func:`periodic` builds that transformation once. It
owns the state's bookkeeping (``inner_state``, the ``sync`` counters and
schedule, a delayed sync's ``pending`` value) and decides when to sync; an
algorithm supplies the declaration of its state's fields
(:mod:`optax_dist._declare`), their initial values and its sync.

How a call decides (the ``sync`` flag, :mod:`optax_dist._flags`):

* ``None``: inside the program, from the counter, the sync in a loop of zero
  or one trip (:func:`optax_dist._syncloop.run_on_sync`);
* ``False``: the inner step and the counter, nothing else is compiled;
* ``True``, a fragment index or ``("apply", f)``: that sync, with no loop;
* ``"warmup"``: synchronous data parallelism (the gradients averaged before
  the inner step), the synced fields restarting on the params.

With fragments, a fragment's sync sees only that fragment's leaves (the others
are ``optax.MaskedNode``, as under ``optax.masked``) and its own entry of the
per-fragment fields. With a ``delay``, a fragment's sync is split in two: its
reduction (``on_reduce``, from the params this call receives and the state,
before the inner step) and its outer step (``on_apply``, after it).
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_dist import _collectives
from optax_dist import _declare
from optax_dist import _flags
from optax_dist import _fragments
from optax_dist import _offload
from optax_dist import _reduce
from optax_dist import _schedule
from optax_dist import _syncloop
from optax_dist._declare import Pending

OnSync = Callable[[_declare.Local, Any], _declare.Synced]
OnReduce = Callable[[Any, Any], tuple[Pending, Any]]
OnApply = Callable[[Any, Pending], Any]


def periodic(
  name: str,
  inner: optax.GradientTransformation,
  declared: _declare.Declaration,
  *,
  axis_name: Any,
  period_name: str,
  period: Any,
  init: Callable[[Any], dict[str, Any]],
  on_sync: OnSync | None = None,
  init_fragment: Callable[[Any], dict[str, Any]] | None = None,
  on_reduce: OnReduce | None = None,
  on_apply: OnApply | None = None,
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
    axis_name: The workers' axis (or tuple of axes).
    period_name: The name of the period's argument (``sync_period``, ...).
    period: Calls between two syncs of the same fragment.
    init: ``init(center) -> fields``: the algorithm's own fields of a fresh
      state, except the per-fragment ones.
    on_sync: ``on_sync(local, fields) -> Synced``: a sync, given the worker
      after this call's inner step and the synced fields. ``None`` for an
      algorithm that gives ``on_reduce`` and ``on_apply``: a sync is then the
      one followed by the other, on the worker after its inner step.
    init_fragment: ``init_fragment(center_f) -> fields``: the per-fragment
      fields of one fragment (all of the center with one fragment).
    on_reduce: ``on_reduce(x, fields) -> (Pending, fields)``: a sync's
      collective. With a ``delay``, ``x`` is the params this call receives
      (in center precision): nothing computed from the gradients.
    on_apply: ``on_apply(fields, pending) -> fields``: the outer step of a
      reduced sync (with a ``delay``, after this call's inner step); the
      workers then land on ``blend * x + (1 - blend) * center``.
    before: ``before(grads, state, params) -> (grads, state)``: what the
      algorithm does on every call before the engine's (e.g. EASGD's ``rho``
      term, AGN's accumulator).
    sync_warmup, fragments, host_offload, delay, blend: The algorithm's
      arguments of those names, as given (they are validated here).

  Returns:
    The transformation; its ``update`` takes the static ``sync`` flag.
  """
  _declare.check_transformation(inner, "inner", "optax.adamw(1e-3)")
  settings = _schedule.Settings.check(period_name, period, sync_warmup, fragments, delay, blend)
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
    on_sync,
    on_reduce,
    on_apply,
  )

  def update_fn(updates, state, params=None, *, sync=None, **extra_args):
    if params is None:
      raise ValueError(f"{name} needs the current params: call `update(updates, state, params)`.")
    if before is not None:
      updates, state = before(updates, state, params)
    return engine.update(state, updates, params, extra_args, sync)

  return optax.GradientTransformationExtraArgs(engine.init, update_fn)


@dataclasses.dataclass(frozen=True)
class _Engine:
  name: str
  inner: optax.GradientTransformationExtraArgs
  declared: _declare.Declaration
  axes: tuple
  settings: _schedule.Settings
  host_offload: bool
  init_fields: Callable[[Any], dict[str, Any]]
  init_fragment: Callable[[Any], dict[str, Any]] | None
  on_sync: OnSync | None
  on_reduce: OnReduce | None
  on_apply: OnApply | None

  def init(self, params: Any) -> Any:
    """A fresh state: the center at the params, the counters at zero."""
    _declare.check_floating(params, self.name)
    schedule = self.settings.schedule(params)
    center = _declare.center_like(params)
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
      delayed = self.settings.delay > 1
      engine_fields["pending"] = Pending.fresh(center) if delayed else optax.EmptyState()
    state = self.declared.state(center=center, **fields, **engine_fields)
    if not self.host_offload:
      return state
    placed = {f: _offload.to_host(getattr(state, f)) for f in self.declared.offloaded}
    if self.settings.delay > 1:  # A reduced sync waits there too.
      placed["pending"] = state.pending._replace(value=_offload.to_host(state.pending.value))
    return state._replace(**placed)

  def update(self, state: Any, grads: Any, params: Any, extra_args: dict, sync: Any) -> tuple:
    """One call: ``(updates, new_state)``."""
    _declare.check_structures(grads, params, self.name)
    expected = jax.eval_shape(self.inner.init, params)
    _declare.check_inner_state(state.inner_state, expected, self.name)
    counters: _schedule.SyncState = state.sync
    schedule = counters.schedule
    self.settings.check_state(schedule, params, self.name)
    flag = _flags.check_flag(sync, schedule.fragments)
    _flags.check_fits(self.name, flag, schedule)
    _flags.verify_flag(flag, counters.step, schedule)
    masks = _fragments.masks_of(self.settings.fragments, params) if schedule.fragments > 1 else None
    call = _Call(
      self, state, params, extra_args, _fragments.Views(self.declared.per_fragment, masks)
    )
    if flag is None:
      call.decided_in_program(grads, schedule)
    elif flag == _schedule.WARMUP:
      call.warmup(grads)
    else:
      call.static(grads, flag, schedule)
    return call.updates, call.new_state()


# How a periodic transform's engine reads in its settings (``_settings.lines``),
# so that a step can tell a periodic optimizer before any state exists.
SETTINGS_MARK = f"<{__name__}.{_Engine.__qualname__}>"


class _Call:
  """One call of a periodic transform: what it computes, step by step."""

  def __init__(self, engine: _Engine, state: Any, params: Any, extra_args: dict, views: Any):
    self.engine, self.state, self.params, self.extra_args = engine, state, params, extra_args
    self.views = views
    self.fields = engine.declared.view(state)
    self.inner_state = state.inner_state
    self.counter = state.sync.step
    self.delay = engine.settings.delay
    self.pending: Any = state.pending if self.delay > 1 else None
    self.offloaded = engine.declared.offloaded if engine.host_offload else ()
    self.offload_pending = engine.host_offload and self.delay > 1
    zero = jnp.zeros([], jnp.int32)
    self.synced = self.skipped = self.dropped = zero
    self.updates: Any = None

  # Both paths run the same code between the same rounding points (see
  # rounding_fence): the inner update, and a sync's inputs and outputs.
  def fence(self, tree: Any) -> Any:
    return _syncloop.rounding_fence(tree, self.counter)

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
    x = _declare.local_view(params, updates).x
    return self.moved(self.fence(self.engine.declared.restarted(fields, x)), _offload.to_host)

  def fresh_inner(self, was_dropped: jax.Array, inner_state: Any) -> Any:
    """A dropped worker's inner state restarts: ``inner.init`` at the center."""
    center = self.state.center
    if "center" in self.offloaded:
      center = _offload.to_device(center)
    fresh = self.engine.inner.init(optax.tree.cast_like(center, self.params))
    return _syncloop.vary_tree_like(_reduce.where(was_dropped, fresh, inner_state), inner_state)

  def sync_fragment(
    self, params_f: Any, updates_f: Any, fields_f: Any, red: Any, inner_state: Any
  ) -> tuple:
    """A fragment's sync; with a delay (``red`` not None), the call that applies it.

    A worker whose ``inner_state`` is not finite is left out, as a non-finite one
    (undelayed syncs: a delayed sync's reduction reads the state it receives).
    """
    engine = self.engine
    fields_f = self.fence(self.moved(fields_f, _offload.to_device))
    local = _declare.local_view(params_f, updates_f)
    sent = local._replace(x=_reduce.left_out_unless(inner_state, local.x))
    if red is not None:
      if self.offload_pending:
        red = red._replace(value=_offload.to_device(red.value))
      red = self.fence(red)
    elif engine.on_sync is None:  # The reduction and the outer step, one after the other.
      assert engine.on_reduce is not None
      red, fields_f = engine.on_reduce(sent.x, fields_f)
    if red is None:
      assert engine.on_sync is not None
      out = engine.on_sync(sent, fields_f)
    else:
      assert engine.on_apply is not None
      new = engine.on_apply(fields_f, red)
      target = _reduce.blended(local.x, new.center, engine.settings.blend, red.mine)
      out = _declare.Synced(local.moved_to(target), new, red.ok, jnp.logical_not(red.mine))
    new = self.moved(self.fence(out.fields), _offload.to_host)
    return self.fence(out.updates), new, out.finite.astype(jnp.int32), out.dropped

  def reduce_fragment(self, params_f: Any, fields_f: Any) -> tuple[Pending, Any]:
    """A delayed sync's reduction, from the params this call receives."""
    assert self.engine.on_reduce is not None
    fields_f = self.fence(self.moved(fields_f, _offload.to_device))
    x = jax.tree.map(lambda p: p.astype(_declare.center_dtype(p.dtype)), params_f)
    red, new = self.engine.on_reduce(x, fields_f)
    red = self.fence(red)
    if self.offload_pending:
      red = red._replace(value=_offload.to_host(red.value))
    return red, self.moved(self.fence(new), _offload.to_host)

  def pending_view(self, f: int) -> Pending:
    return Pending(self.views.tree(self.pending.value, f), self.pending.ok, self.pending.mine)

  def pending_merge(self, red: Pending) -> Pending:
    return Pending(self.views.merge_tree(self.pending.value, red.value), red.ok, red.mine)

  def decided_in_program(self, grads: Any, schedule: _schedule.SyncSchedule) -> None:
    """The sync decided from the counter, in loops of zero or one trip."""
    axes, views, delay = self.engine.axes, self.views, self.delay
    step = optax.safe_increment(self.counter)
    is_warm, is_sync = schedule.in_graph(step)
    if schedule.warmup:

      def averaged(loop: tuple, _: Any) -> tuple:
        mean, out = _reduce.finite_mean(loop[0], axes)
        return self.fence(mean), out.astype(jnp.int32)

      grads, self.dropped = _syncloop.run_on_sync(is_warm, averaged, (grads, self.dropped), axes)
    reduced: list[Any] = []
    if delay:
      reduces, is_sync = schedule.phases(step)
      for f, is_reduce_f in enumerate(reduces):
        params_f = views.tree(self.params, f)
        start = self.pending_view(f) if delay > 1 else Pending.fresh(params_f)
        red, fields_f = _syncloop.run_on_sync(
          is_reduce_f,
          lambda loop, p: self.reduce_fragment(p, loop[1]),
          (start, views.fields(self.fields, f)),
          axes,
          params_f,
        )
        self.fields = views.merge_fields(self.fields, fields_f, f)
        if delay > 1:
          self.pending = self.pending_merge(red)
        reduced.append(red)
    self.inner_step(grads)
    if schedule.warmup:
      self.updates, self.fields = _syncloop.run_on_sync(
        is_warm,
        lambda loop, params: (loop[0], self.restarted_on(params, *loop)),
        (self.updates, self.fields),
        axes,
        self.params,
      )
    for f, is_sync_f in enumerate(is_sync):

      def on_sync(loop: tuple, inputs: Any) -> tuple:
        updates_f, fields_f, _, inner_state, dropped = loop
        params_f, red = inputs
        updates_f, fields_f, ok, out = self.sync_fragment(
          params_f, updates_f, fields_f, red, inner_state
        )
        inner_state = self.fresh_inner(out, inner_state)
        return updates_f, fields_f, ok, inner_state, dropped + out.astype(jnp.int32)

      applied = None if not delay else reduced[f] if delay == 1 else self.pending_view(f)
      zero = jnp.zeros([], jnp.int32)
      first = (views.tree(self.updates, f), views.fields(self.fields, f), zero)
      updates_f, fields_f, ok, self.inner_state, self.dropped = _syncloop.run_on_sync(
        is_sync_f,
        on_sync,
        (*first, self.inner_state, self.dropped),
        axes,
        (views.tree(self.params, f), applied),
      )
      self.updates = views.merge_tree(self.updates, updates_f)
      self.fields = views.merge_fields(self.fields, fields_f, f)
      self.synced, self.skipped = self.synced + ok, self.skipped + is_sync_f.astype(jnp.int32) - ok

  def warmup(self, grads: Any) -> None:
    """A synchronous call: the finite workers' mean gradient, the fields follow the params."""
    mean, out = _reduce.finite_mean(grads, self.engine.axes)
    self.dropped = self.dropped + out.astype(jnp.int32)
    self.inner_step(self.fence(mean))
    fields = self.restarted_on(self.params, self.updates, self.fields)
    self.fields = _syncloop.vary_tree_like(fields, self.fields)

  def static(self, grads: Any, flag: Any, schedule: _schedule.SyncSchedule) -> None:
    """A static flag: ``False``, ``True``, a fragment, or ``("apply", f)`` with delay >= 2."""
    views, delay, vary = self.views, self.delay, _syncloop.vary_tree_like
    if flag is False or isinstance(flag, tuple):
      reduce_fs: list[int] = []
    else:
      reduce_fs = list(range(schedule.fragments)) if flag is True else [int(flag)]
    sync_fs = ([flag[1]] if isinstance(flag, tuple) else []) if delay > 1 else reduce_fs
    reduced: list[Any] = [None] * schedule.fragments
    for f in reduce_fs if delay else ():
      old = views.fields(self.fields, f)
      red, fields_f = self.reduce_fragment(views.tree(self.params, f), old)
      self.fields = views.merge_fields(self.fields, vary(fields_f, old), f)
      if delay > 1:
        self.pending = vary(self.pending_merge(red), self.pending)
      reduced[f] = red
    self.inner_step(grads)
    for f in sync_fs:
      applied = None if not delay else reduced[f] if delay == 1 else self.pending_view(f)
      old_updates, old = views.tree(self.updates, f), views.fields(self.fields, f)
      updates_f, fields_f, ok, out = self.sync_fragment(
        views.tree(self.params, f), old_updates, old, applied, self.inner_state
      )
      self.updates = views.merge_tree(self.updates, vary(updates_f, old_updates))
      self.fields = views.merge_fields(self.fields, vary(fields_f, old), f)
      self.inner_state = self.fresh_inner(out, self.inner_state)
      self.synced, self.skipped = self.synced + ok, self.skipped + 1 - ok
      self.dropped = self.dropped + out.astype(jnp.int32)

  def new_state(self) -> Any:
    counters = self.state.sync
    return self.state._replace(
      inner_state=self.inner_state,
      sync=counters._replace(
        step=optax.safe_increment(counters.step),
        num_syncs=counters.num_syncs + self.synced,
        num_skipped_syncs=counters.num_skipped_syncs + self.skipped,
        num_dropped=counters.num_dropped + self.dropped,
      ),
      **self.fields._asdict(),
      **({"pending": self.pending} if self.delay > 1 else {}),
    )
