"""The periodic engine: one call of any periodic transform.

Elastic averaging, AGN, model averaging and DiLoCo all take a local inner
step on every call, count their calls, and now and then run a sync that talks
to the other workers and moves the worker (and a center) by a correction added
to the inner update. :func:`periodic_update` is that pattern, written once. It
owns the state's bookkeeping (``inner_state``, ``step``, ``num_syncs``,
``num_skipped_syncs``, the ``schedule``) and decides when to sync; an algorithm
supplies a :class:`Spec`: the state fields its sync reads and writes, the sync
itself, and where those fields stand when every worker restarts from one point.

How a call decides (the ``sync`` flag, see :mod:`optax_dist._schedule`):

* ``None``: inside the program, from the counter. The sync runs in a loop of
  zero or one trip, so non-sync calls execute no collective. (A ``lax.cond``
  would do the same but copies its operands on every call; a while loop's
  carry is updated in place.)
* ``False``: the inner step and the counter, nothing else is compiled.
* ``True`` or a fragment index: the sync, unconditionally, with no loop.
* ``"warmup"``: synchronous data parallelism (gradients averaged before the
  inner step), and the algorithm's fields follow the params.

With fragments, a fragment's sync sees only that fragment's leaves (the others
are ``optax.MaskedNode``, as under ``optax.masked``) and its own entry of the
per-fragment fields (e.g. DiLoCo's outer state).
"""

from collections.abc import Callable
import dataclasses
import numbers
from typing import Any
from typing import NamedTuple
from typing import TypeVar

import jax
from jax import lax
import jax.numpy as jnp
import optax

from optax_dist import _collectives
from optax_dist import _fragments
from optax_dist import _nonfinite
from optax_dist import _placement
from optax_dist import _quantize
from optax_dist import _schedule

T = TypeVar("T")


def check_period(value: Any, name: str) -> int:
  """A period is a static Python int >= 1."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be a Python int (it is static), got {value!r}.")
  if value < 1:
    raise ValueError(f"`{name}` must be >= 1, got {value}.")
  return int(value)


def _static_count(name: str, value: Any, meaning: str = "") -> int:
  """A static Python int >= 0 named ``name`` (None: 0); ``meaning`` explains 0."""
  if value is None:
    return 0
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
      f"`{name}` must be a Python int (it is static), got {value!r}. Under "
      "`optax.inject_hyperparams`, list it in `static_args`."
    )
  if value < 0:
    raise ValueError(f"`{name}` must be >= 0{meaning}, got {value}.")
  return int(value)


def check_warmup(value: Any) -> int:
  """``sync_warmup`` is a static Python int >= 0 (None: 0)."""
  return _static_count("sync_warmup", value)


def check_delay(delay: Any, blend: Any) -> tuple[int, float]:
  """``delay`` is a static Python int >= 0 and ``blend`` a static float in [0, 1).

  ``None`` is 0 for either (the defaults, so that ``optax.inject_hyperparams``
  does not take them for hyperparameters).
  """
  delay = _static_count("delay", delay, " (0: the outer step on the sync's call)")
  blend = 0.0 if blend is None else blend
  if isinstance(blend, bool) or not isinstance(blend, numbers.Real):
    raise TypeError(f"`blend` must be a Python float in [0, 1) (it is static), got {blend!r}.")
  if not 0 <= float(blend) < 1:
    raise ValueError(
      f"`blend` must be in [0, 1), got {blend}: the workers land on "
      "`blend * x + (1 - blend) * center` (0: on the center)."
    )
  if blend and not delay:
    raise ValueError(
      f"`blend={blend}` needs `delay >= 1`: without a delay the workers land on the center "
      "they sent their pseudo-gradient to. Pass `delay=1` (or more), or `blend=0.0`."
    )
  return int(delay), float(blend)


def check_delay_fits(delay: int, period: int, num: int, period_name: str) -> None:
  """At most one fragment in flight: ``delay < period / fragments``."""
  if delay and delay >= period // num:
    raise ValueError(
      f"`delay` ({delay}) must be < `{period_name}` / fragments ({period} / {num} = "
      f"{period // num}), so that a fragment's outer step lands before the next fragment "
      "syncs. Use a smaller delay, fewer fragments or a longer period."
    )


def check_schedule(period: int, warmup: int, fragments: Any, period_name: str) -> None:
  """Validates ``fragments`` and, when its count is known, that the period divides by it."""
  num = _fragments.check(fragments)
  if num is not None and period % num:
    raise ValueError(
      f"`{period_name}` ({period}) must be a multiple of the number of fragments ({num}), "
      f"so that each fragment syncs every {period} calls."
    )


def check_rate(value: Any, name: str) -> None:
  """A rate in (0, 1]; traced values (inject_hyperparams) are not checked."""
  if isinstance(value, numbers.Real) and not 0 < float(value) <= 1:
    raise ValueError(f"`{name}` must be in (0, 1], got {value}.")


def require_params(params: Any, name: str) -> None:
  if params is None:
    raise ValueError(f"{name} needs the current params: call `update(updates, state, params)`.")


def check_floating(params: Any, name: str) -> None:
  """Periodic transforms average and move params: every leaf must be floating."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      where = jax.tree_util.keystr(path) or "params"
      raise TypeError(
        f"{name} needs floating params, but the leaf at {where} has dtype {dtype}. Keep "
        "integer and bool leaves out of the optimizer (e.g. with `optax.masked`, or "
        "`optax.multi_transform` with `optax.set_to_zero()` for them), or cast them to a "
        "floating dtype."
      )


def center_dtype(dtype: Any) -> Any:
  """Centers of low-precision params are kept in float32."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return dtype


def center_like(params: Any) -> Any:
  """A copy of params in center precision.

  An abstract leaf (``jax.ShapeDtypeStruct``) gives an abstract center leaf,
  so that ``init`` describes the state of abstract params.
  """

  def copy(p: Any) -> Any:
    dtype = center_dtype(p.dtype)
    if isinstance(p, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(p.shape, dtype, sharding=p.sharding)
    return jnp.asarray(p, dtype)

  return jax.tree.map(copy, params)


def zeros_like(tree: Any) -> Any:
  """Zeros shaped like ``tree``; abstract leaves stay abstract."""

  def zeros(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jnp.zeros_like(x)

  return jax.tree.map(zeros, tree)


def reduced_finite(tree: Any, axes: tuple) -> jax.Array:
  """Whether a reduced value is finite, as every device of every worker sees it.

  The value is the same on every worker (it was reduced over them), so no
  collective is needed there; when a worker's params are sharded over other
  mesh axes (FSDP), its devices agree with one scalar all-reduce over those.
  """
  return _collectives.agree(_nonfinite.all_finite(tree), axes)


def keep_unless(ok: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``ok``, ``old`` otherwise, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def own_finite(tree: Any, axes: tuple) -> jax.Array:
  """Whether this worker's own contribution is finite (a local check, no collective).

  When a worker is several devices (params sharded over other mesh axes,
  FSDP), its devices agree with one scalar all-reduce over those axes.
  """
  return _collectives.agree(_nonfinite.all_finite(tree), axes)


def zero_unless(ok: jax.Array, tree: Any) -> Any:
  """``tree`` where ``ok``, zeros otherwise (a dropped worker contributes nothing)."""
  return jax.tree.map(lambda x: jnp.where(ok, x, jnp.zeros_like(x)), tree)


class FiniteSum(NamedTuple):
  """The sum of the finite workers' contributions (see :func:`finite_sum`).

  Attributes:
    total: The sum over the workers whose contribution was finite.
    residual: The new error-feedback residual (as :func:`_quantize.psum`).
    num_finite: How many workers' contributions were finite (float32, exact,
      the same on every worker).
    mine: Whether this worker's contribution was finite.
  """

  total: Any
  residual: Any
  num_finite: jax.Array
  mine: jax.Array

  def mean(self) -> Any:
    """The finite workers' mean (zeros when none was finite)."""
    count = jnp.maximum(self.num_finite, 1.0)
    mean = jax.tree.map(lambda t: t / count.astype(t.dtype), self.total)
    # Rounded where it stands (the count is never negative), so that the two
    # dispatches, and programs that differ around the sync, round alike.
    return rounding_fence(mean, self.num_finite)

  def finite(self, value: Any, axes: tuple) -> jax.Array:
    """Whether the sync moves: some worker was finite, and ``value`` (its result) is."""
    return jnp.logical_and(self.num_finite > 0, reduced_finite(value, axes))


def finite_sum(
  tree: Any, axes: tuple, wire: _quantize.Wire | None = None, residual: Any = None
) -> FiniteSum:
  """The workers' sum of their contributions ``tree``, the non-finite ones left out.

  Each worker checks its own contribution; a non-finite one enters as zeros
  (and its error-feedback residual restarts from zero), and the count of
  finite workers travels in the same collective as the contribution: one
  more float32 element of the all-reduce, or after the scales of the
  quantized ring. No collective is added.
  """
  wire = _quantize.Wire() if wire is None else wire
  mine = own_finite(tree, axes)
  contribution = zero_unless(mine, tree)
  if wire.error_feedback:
    residual = zero_unless(mine, residual)
  total, residual, count = _quantize.psum(
    contribution, axes, wire, residual, side=count_operand(mine, axes)
  )
  return FiniteSum(total, residual, count[0], mine)


def count_operand(mine: jax.Array, axes: tuple) -> jax.Array:
  """This worker's 0/1 as the float32 vector the count is summed from.

  One element, except under ``vmap`` with an ``spmd_axis_name`` on mesh axes
  (the GSPMD path), where the partitioner shards the reduced result's first
  dimension over the workers: there it takes one element per worker.
  """
  mesh = jax.sharding.get_abstract_mesh()
  manual = getattr(mesh, "manual_axes", ())
  names = getattr(mesh, "axis_names", ())
  spmd = any(a in names and a not in manual for a in axes)
  size = _collectives.num_workers(axes) if spmd else 1
  return jnp.broadcast_to(mine.astype(jnp.float32), (size,))


ORDERINGS = ("simultaneous", "round_robin")


def check_ordering(ordering: Any) -> str:
  if ordering not in ORDERINGS:
    raise ValueError(f"`ordering` must be one of {ORDERINGS}, got {ordering!r}.")
  return ordering


class Local(NamedTuple):
  """What a sync sees of the worker: its params before this call, the inner
  optimizer's update, and ``x = params + updates`` in center precision."""

  params: Any
  updates: Any
  x: Any

  def corrected(self, correction: Any) -> Any:
    """Updates that land the worker at ``x + correction``."""
    return jax.tree.map(
      lambda u, d: (u.astype(d.dtype) + d).astype(u.dtype), self.updates, correction
    )

  def moved_to(self, target: Any) -> Any:
    """Updates that land the worker on ``target`` (e.g. the new center).

    ``target - params`` is rounded once, so ``apply_updates`` lands the
    worker on the target up to one float rounding (exactly when the params
    are within a factor of two of it).
    """
    return jax.tree.map(
      lambda t, p, u: (t - p.astype(t.dtype)).astype(u.dtype), target, self.params, self.updates
    )


def local_view(params: Any, updates: Any) -> Local:
  """The worker after its inner step, ``x = params + updates`` in center precision."""
  x = jax.tree.map(
    lambda p, u: p.astype(center_dtype(p.dtype)) + u.astype(center_dtype(p.dtype)),
    params,
    updates,
  )
  return Local(params, updates, x)


class Synced(NamedTuple):
  """What an algorithm's sync returns.

  Attributes:
    updates: The worker's updates for this call.
    carry: The new values of the fields the sync owns.
    finite: Whether the center moved: some worker's contribution was finite,
      and so was the result (otherwise the center stays and the sync counts
      as skipped).
    dropped: Whether this worker's own contribution was not finite and was
      left out; the engine then gives it a fresh inner state, and the
      algorithm lands it on the center.
  """

  updates: Any
  carry: dict[str, Any]
  finite: jax.Array
  dropped: jax.Array


class Pending(NamedTuple):
  """A delayed sync between its reduction and its outer step.

  Attributes:
    value: What the reduction gave, in center precision (DiLoCo: the mean
      pseudo-gradient; model averaging: the new center), shaped like the
      center (only the leaves of the fragment in flight are meaningful).
    ok: Whether the center moves when it is applied (some worker was finite,
      and so is ``value``).
    mine: Whether this worker's contribution was finite.
  """

  value: Any
  ok: jax.Array
  mine: jax.Array


def blended(x: Any, center: Any, blend: float, mine: jax.Array) -> Any:
  """Where a worker lands at an applied delayed sync: ``blend * x + (1 - blend) * center``.

  A worker whose contribution was left out, or an element of ``x`` that is
  not finite, lands on the center.
  """
  if not blend:
    return center

  def mix(xi: Any, c: Any) -> Any:
    ok = jnp.logical_and(mine, jnp.isfinite(xi))
    return jnp.where(ok, blend * xi + (1 - blend) * c, c)

  return jax.tree.map(mix, x, center)


class Spec(NamedTuple):
  """What an algorithm supplies to the engine.

  Attributes:
    carry: The state fields its sync reads and writes.
    sync: ``sync(local, carry) -> Synced``, given the worker after this
      call's inner step.
    restart: ``restart(x, carry) -> carry``: the fields once every worker
      stands on ``x`` (used by the warm-up, where they follow the params).
    per_fragment: The carry fields that hold one entry per fragment (a tuple
      of ``F`` values when there are several fragments); the others are
      shaped like the params.
    offload: The carry fields read only at a sync, which ``host_offload``
      keeps in the host's memory between syncs.
    reduce: With a ``delay``: ``reduce(x, carry) -> (Pending, carry)``, the
      sync's collective, given the params this call receives (in center
      precision) and nothing computed from the gradients.
    apply: With a ``delay``: ``apply(local, carry, pending) -> Synced``, the
      outer step of a reduced sync, after this call's inner step.
  """

  carry: tuple[str, ...]
  sync: Callable[[Local, dict[str, Any]], Synced]
  restart: Callable[[Any, dict[str, Any]], dict[str, Any]]
  per_fragment: tuple[str, ...] = ()
  offload: tuple[str, ...] = ()
  reduce: Callable[[Any, dict[str, Any]], tuple["Pending", dict[str, Any]]] | None = None
  apply: Callable[[Local, dict[str, Any], "Pending"], Synced] | None = None


class Options(NamedTuple):
  """The arguments a periodic transform passes on to the engine, as given."""

  sync_warmup: Any = None
  fragments: Any = None
  comm_dtype: Any = None
  error_feedback: Any = False
  host_offload: Any = False
  delay: Any = None
  blend: Any = None


class Setup(NamedTuple):
  """The static settings every periodic transform shares, validated once.

  Attributes:
    name: The transform's name, for error messages.
    inner: The inner optimizer, taking extra arguments.
    axes: The workers' axes.
    period: Calls between two syncs of the same fragment.
    warmup: Synchronous calls before the local steps.
    fragments: The ``fragments`` argument (labels are computed per trace).
    wire: How a sync's reduction travels (``comm_dtype``, error feedback).
    host_offload: Whether the fields read only at a sync live in the host's
      pinned memory between syncs.
    delay: ``tau``: a fragment's sync is reduced on the call after its
      scheduled one and applied ``tau`` calls after it (0: on its call).
    blend: Where the workers land at an applied delayed sync:
      ``blend * x + (1 - blend) * center``.
  """

  name: str
  inner: optax.GradientTransformationExtraArgs
  axes: tuple
  period: int
  warmup: int
  fragments: Any
  wire: _quantize.Wire
  host_offload: bool = False
  delay: int = 0
  blend: float = 0.0

  @classmethod
  def make(
    cls,
    name: str,
    inner: optax.GradientTransformation,
    axis_name: Any,
    period: tuple[str, Any],
    options: "Options",
  ) -> "Setup":
    """Validates the settings; ``period`` is ``(argument name, value)``."""
    sync_warmup, fragments, comm_dtype = options.sync_warmup, options.fragments, options.comm_dtype
    error_feedback, host_offload = options.error_feedback, options.host_offload
    delay, blend = check_delay(options.delay, options.blend)
    if not isinstance(host_offload, bool):
      raise TypeError(f"`host_offload` must be a Python bool, got {host_offload!r}.")
    if host_offload:
      _placement.check_host_memory()
    period_name, value = period
    value = check_period(value, period_name)
    warmup = check_warmup(sync_warmup)
    check_schedule(value, warmup, fragments, period_name)
    num = _fragments.check(fragments)
    if num is not None:
      check_delay_fits(delay, value, num, period_name)
    wire = _quantize.make_wire(comm_dtype, error_feedback)
    axes = _collectives.axis_tuple(axis_name)
    inner = optax.with_extra_args_support(inner)
    return cls(name, inner, axes, value, warmup, fragments, wire, host_offload, delay, blend)

  def start(self, params: Any) -> tuple[Any, dict[str, Any]]:
    """The center of a fresh state, and the fields the engine owns in it.

    Those are the inner state and the ``sync`` state: counters at zero and
    the schedule.
    """
    check_floating(params, self.name)
    _, num_fragments = _fragments.labels(self.fragments, params)
    check_delay_fits(self.delay, self.period, num_fragments, "period")
    zero = jnp.zeros([], jnp.int32)
    schedule = _schedule.SyncSchedule(self.period, self.warmup, num_fragments, self.delay)
    fields = {
      "inner_state": self.inner.init(params),
      "sync": _schedule.SyncState(zero, zero, zero, zero, schedule),
    }
    return center_like(params), fields

  def check_schedule(self, schedule: _schedule.SyncSchedule, params: Any) -> None:
    """A state made by an optimizer with another schedule is refused (at trace time)."""
    _, num_fragments = _fragments.labels(self.fragments, params)
    # Fields the engine does not set here (if any) are compared as they are.
    mine = dataclasses.replace(
      schedule, period=self.period, warmup=self.warmup, fragments=num_fragments, delay=self.delay
    )
    if schedule != mine:
      raise ValueError(
        f"{self.name}: this state was made with the schedule {schedule}, but this optimizer "
        f"syncs on {mine}. Driving it would sync on the wrong calls. Make the state with "
        "this optimizer's `init` (or restore it into a state made by that `init`), or "
        "build the optimizer with the settings the state was made with."
      )

  def placed(self, spec: "Spec", state: Any) -> Any:
    """A fresh ``state`` with the fields read only at a sync in host memory, if offloaded."""
    if not self.host_offload:
      return state
    fields = {f: _placement.to_host(getattr(state, f)) for f in spec.offload}
    if self.delay > 1:  # A reduced sync waits there too.
      fields["pending"] = state.pending._replace(value=_placement.to_host(state.pending.value))
    return state._replace(**fields)

  def pending_like(self, center: Any) -> Any:
    """The ``pending`` field of a fresh state: a buffer only when a reduced sync waits."""
    if self.delay < 2:
      return optax.EmptyState()
    false = jnp.zeros([], bool)
    return Pending(zeros_like(center), false, jnp.logical_not(false))

  def masks(self, params: Any) -> list[Any] | None:
    """One boolean mask tree per fragment, or None for one fragment."""
    return _fragments.masks(*_fragments.labels(self.fragments, params))

  def update(
    self, spec: "Spec", state: Any, grads: Any, params: Any, extra_args: dict, sync: Any
  ) -> tuple[Any, Any]:
    """One call: see :func:`periodic_update`."""
    return periodic_update(self, spec, state, grads, params, extra_args, sync)


def periodic_update(
  setup: Setup,
  spec: Spec,
  state: Any,
  grads: Any,
  params: Any,
  extra_args: dict[str, Any],
  sync: Any = None,
) -> tuple[Any, Any]:
  """One call of a periodic transform: ``(updates, new_state)``.

  ``state`` is the algorithm's state ``NamedTuple``: its fields
  ``inner_state`` and ``sync`` are handled here, the fields named by
  ``spec.carry`` by the algorithm's sync.
  """
  require_params(params, setup.name)
  check_structures(grads, params, setup.name)
  inner, axes = setup.inner, setup.axes
  counters: _schedule.SyncState = state.sync
  schedule = counters.schedule
  setup.check_schedule(schedule, params)
  flag = _schedule.check_flag(sync, schedule.fragments)
  if flag == _schedule.WARMUP and not schedule.warmup:
    raise ValueError(
      f"{setup.name}: `sync='warmup'` asks for a synchronous warm-up call, but this "
      "transform has no warm-up (`sync_warmup=0`). Build it with `sync_warmup=K` for K "
      "warm-up calls, or pass the flags of `optax_dist.sync_schedule(state)`."
    )
  _schedule.verify_flag(flag, counters.step, schedule)
  carry = {name: getattr(state, name) for name in spec.carry}
  step = optax.safe_increment(counters.step)
  views = _Views(spec, setup.masks(params) if schedule.fragments > 1 else None)

  def fence(tree: Any) -> Any:
    return rounding_fence(tree, counters.step)

  synced = jnp.zeros([], jnp.int32)
  skipped = jnp.zeros([], jnp.int32)
  dropped = jnp.zeros([], jnp.int32)

  # Both paths run the same code between the same rounding points (see
  # rounding_fence): the inner update, and a sync's inputs and outputs.
  def inner_step(grads: Any) -> tuple[Any, Any]:
    updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
    return fence(updates), inner_state

  # With host offload, the fields read only at a sync come to the device for
  # it and go back to the host after.
  offloaded = spec.offload if setup.host_offload else ()

  def moved(carry: dict[str, Any], move: Callable[[Any], Any]) -> dict[str, Any]:
    return {k: move(v) if k in offloaded else v for k, v in carry.items()}

  def warm(params: Any, updates: Any, carry: dict[str, Any]) -> dict[str, Any]:
    carry = fence(moved(carry, _placement.to_device))
    return moved(fence(spec.restart(local_view(params, updates).x, carry)), _placement.to_host)

  def fresh_inner() -> Any:
    """The inner state a dropped worker restarts with: ``inner.init`` at the center."""
    center = state.center
    if "center" in offloaded:
      center = _placement.to_device(center)
    return inner.init(optax.tree.cast_like(center, params))

  def restarted(was_dropped: jax.Array, inner_state: Any) -> Any:
    return _vary_tree_like(keep_unless(was_dropped, fresh_inner(), inner_state), inner_state)

  def sync_fragment(params_f: Any, updates_f: Any, carry_f: dict[str, Any], red: Any) -> tuple:
    """A fragment's sync; with a delay (``red`` not None), the call that applies it."""
    carry_f = fence(moved(carry_f, _placement.to_device))
    if red is None:
      out = spec.sync(local_view(params_f, updates_f), carry_f)
    else:
      assert spec.apply is not None
      if offload_pending:
        red = red._replace(value=_placement.to_device(red.value))
      out = spec.apply(local_view(params_f, updates_f), carry_f, fence(red))
    new = moved(fence(out.carry), _placement.to_host)
    return fence(out.updates), new, out.finite.astype(jnp.int32), out.dropped

  # A delayed sync (delay >= 1): reduced before this call's inner step, from
  # the params and the state only, and applied after it; with delay >= 2 the
  # reduced value waits in the state's `pending` field.
  delay = setup.delay
  pending: Any = state.pending if delay > 1 else None
  offload_pending = setup.host_offload and delay > 1

  def reduce_fragment(params_f: Any, carry_f: dict[str, Any]) -> tuple[Pending, dict]:
    assert spec.reduce is not None
    carry_f = fence(moved(carry_f, _placement.to_device))
    x = jax.tree.map(lambda p: p.astype(center_dtype(p.dtype)), params_f)
    red, new = spec.reduce(x, carry_f)
    red = fence(red)
    if offload_pending:
      red = red._replace(value=_placement.to_host(red.value))
    return red, moved(fence(new), _placement.to_host)

  def pending_view(f: int) -> Pending:
    return Pending(views.tree(pending.value, f), pending.ok, pending.mine)

  def pending_merge(red: Pending) -> Pending:
    return Pending(views.merge_tree(pending.value, red.value), red.ok, red.mine)

  def fresh_pending(params_f: Any) -> Pending:
    value = jax.tree.map(lambda p: jnp.zeros(p.shape, center_dtype(p.dtype)), params_f)
    false = jnp.zeros([], bool)
    return Pending(value, false, jnp.logical_not(false))

  if isinstance(flag, tuple) and delay < 2:
    raise ValueError(
      f"{setup.name}: `sync={flag}` names a call that applies a delayed sync, but this "
      f"transform has `delay={delay}`"
      + (": the call that reduces also applies (pass the fragment's index)." if delay else ".")
    )
  if flag is True and delay > 1 and schedule.fragments > 1:
    raise ValueError(
      f"{setup.name}: `sync=True` would reduce all {schedule.fragments} fragments at once, but "
      f"with `delay={delay}` one fragment at a time waits for its outer step. Pass the "
      "flags of `optax_dist.sync_schedule(state)`."
    )

  def reduced_for(f: int) -> Any:
    """What fragment ``f``'s sync applies: ``None`` without a delay (it reduces)."""
    if not delay:
      return None
    return reduced[f] if delay == 1 else pending_view(f)

  reduced: list[Any] = []
  if flag is None:  # Decided in the program, from the counter.
    is_warm, is_sync = schedule.in_graph(step)
    if schedule.warmup:

      def averaged(loop_carry: tuple, _: Any) -> tuple:
        mean, out = finite_mean(loop_carry[0], axes)
        return fence(mean), out.astype(jnp.int32)

      grads, dropped = run_on_sync(is_warm, averaged, (grads, dropped), axes)
    if delay:
      reduces, is_sync = schedule.phases(step)
      for f, is_reduce_f in enumerate(reduces):

        def on_reduce(loop_carry: tuple, params_f: Any) -> tuple:
          return reduce_fragment(params_f, loop_carry[1])

        start = pending_view(f) if delay > 1 else fresh_pending(views.tree(params, f))
        red, carry_f = run_on_sync(
          is_reduce_f, on_reduce, (start, views.carry(carry, f)), axes, views.tree(params, f)
        )
        carry = views.merge_carry(carry, carry_f, f)
        if delay > 1:
          pending = pending_merge(red)
        reduced.append(red)
    updates, inner_state = inner_step(grads)
    if schedule.warmup:

      def on_warmup(loop_carry: tuple, params: Any) -> tuple:
        updates, carry = loop_carry
        return updates, warm(params, updates, carry)

      updates, carry = run_on_sync(is_warm, on_warmup, (updates, carry), axes, params)
    for f, is_sync_f in enumerate(is_sync):

      def on_sync(loop_carry: tuple, inputs: Any) -> tuple:
        updates_f, carry_f, _, inner_state, dropped = loop_carry
        params_f, red = inputs
        updates_f, carry_f, ok, out = sync_fragment(params_f, updates_f, carry_f, red)
        inner_state = restarted(out, inner_state)
        return updates_f, carry_f, ok, inner_state, dropped + out.astype(jnp.int32)

      zero = jnp.zeros([], jnp.int32)
      updates_f, carry_f, ok, inner_state, dropped = run_on_sync(
        is_sync_f,
        on_sync,
        (views.tree(updates, f), views.carry(carry, f), zero, inner_state, dropped),
        axes,
        (views.tree(params, f), reduced_for(f)),
      )
      updates = views.merge_tree(updates, updates_f)
      carry = views.merge_carry(carry, carry_f, f)
      synced, skipped = synced + ok, skipped + is_sync_f.astype(jnp.int32) - ok
  elif flag == _schedule.WARMUP:
    mean, out = finite_mean(grads, axes)
    dropped = dropped + out.astype(jnp.int32)
    updates, inner_state = inner_step(fence(mean))
    carry = _vary_tree_like(warm(params, updates, carry), carry)
  else:  # A static flag: `False`, `True`, a fragment, or ("apply", f) with delay >= 2.
    if flag is False or isinstance(flag, tuple):
      reduce_fs: list[int] = []
    elif flag is True:
      reduce_fs = list(range(schedule.fragments))
    else:
      reduce_fs = [int(flag)]
    if delay > 1:
      sync_fs = [flag[1]] if isinstance(flag, tuple) else []
    else:
      sync_fs = reduce_fs
    reduced = [None] * schedule.fragments
    for f in reduce_fs if delay else ():
      old_carry = views.carry(carry, f)
      red, carry_f = reduce_fragment(views.tree(params, f), old_carry)
      carry = views.merge_carry(carry, _vary_tree_like(carry_f, old_carry), f)
      if delay > 1:
        pending = _vary_tree_like(pending_merge(red), pending)
      reduced[f] = red
    updates, inner_state = inner_step(grads)
    for f in sync_fs:
      old_updates, old_carry = views.tree(updates, f), views.carry(carry, f)
      updates_f, carry_f, ok, out = sync_fragment(
        views.tree(params, f), old_updates, old_carry, reduced_for(f)
      )
      updates = views.merge_tree(updates, _vary_tree_like(updates_f, old_updates))
      carry = views.merge_carry(carry, _vary_tree_like(carry_f, old_carry), f)
      inner_state = restarted(out, inner_state)
      synced, skipped = synced + ok, skipped + 1 - ok
      dropped = dropped + out.astype(jnp.int32)

  new_state = state._replace(
    inner_state=inner_state,
    sync=counters._replace(
      step=step,
      num_syncs=counters.num_syncs + synced,
      num_skipped_syncs=counters.num_skipped_syncs + skipped,
      num_dropped=counters.num_dropped + dropped,
    ),
    **carry,
    **({"pending": pending} if delay > 1 else {}),
  )
  return updates, new_state


def check_structures(grads: Any, params: Any, name: str) -> None:
  """The gradients and the params must be trees of the same structure."""
  grads_def: Any = jax.tree.structure(grads)
  params_def: Any = jax.tree.structure(params)
  if grads_def != params_def:
    raise ValueError(
      f"{name}: the gradients (`updates`) and `params` must have the same tree structure, "
      f"but the gradients are {grads_def} and the params {params_def}. Pass the gradients "
      "of the params you pass as `params` (e.g. `jax.grad(loss)(params)`), and under "
      "`optax.masked` or `optax.multi_transform` give both the same mask."
    )


def finite_mean(grads: Any, axes: tuple) -> tuple[Any, jax.Array]:
  """The finite workers' mean gradient (a warm-up call), and whether this worker's was not.

  One collective, as the plain mean: the count of finite workers travels in
  it. With no finite worker the mean is zero.
  """
  n = _collectives.num_workers(axes)
  typed = _collectives.typed_axes(axes)
  mine = own_finite(grads, axes)
  leaves, treedef = jax.tree.flatten(grads)

  def to_sum(g: Any) -> tuple:
    if g.dtype == jax.dtypes.float0:
      return ()
    varying = _collectives.varying_axes(g)
    return tuple(a for a in axes if a not in typed or a in varying)

  # Leaves already summed over the workers (invariant under shard_map: the
  # gradient of replicated params) cannot leave a worker out; they are
  # averaged as before.
  summed = [to_sum(g) == axes for g in leaves]
  sent = [jnp.where(mine, g, jnp.zeros_like(g)) for g, s in zip(leaves, summed, strict=True) if s]
  sent_total, count = _collectives.psum((sent, count_operand(mine, axes)), axes)
  count = jnp.maximum(count[0], 1.0)
  totals = iter(sent_total)
  out = []
  for g, s in zip(leaves, summed, strict=True):
    if g.dtype == jax.dtypes.float0:
      out.append(g)
    elif s:
      out.append(next(totals) / count.astype(g.dtype))
    else:
      part = to_sum(g)
      g = lax.psum(g, part) if part else g
      out.append(g / jnp.asarray(n, g.dtype) if n > 1 else g)
  return jax.tree.unflatten(treedef, out), jnp.logical_not(mine)


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def rounding_fence(tree: Any, counter: jax.Array) -> Any:
  """``tree`` unchanged, rounded where it stands, so that consumers cannot fuse into it.

  XLA contracts a multiply that feeds an add (an inner update ``-lr * r``
  that meets ``params + updates``) into one fused multiply-add, which rounds
  once. In the in-graph path the inner update crosses the sync loop's
  boundary first and is rounded on its own; without a fence the static path
  would round differently and the two would part by an ulp. The fence XORs
  the bits with a zero that XLA cannot prove to be zero (``counter < 0``):
  one integer operation per element inside the fused kernel, no memory.
  """
  zero = counter < 0

  def fence(x: Any) -> Any:
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    bits = _UNSIGNED[x.dtype.itemsize]
    flip = zero.astype(bits)
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, bits) ^ flip, x.dtype)

  return jax.tree.map(fence, tree)


class _Views:
  """One fragment's part of params-shaped trees and of the per-fragment fields."""

  def __init__(self, spec: Spec, masks: list[Any] | None):
    self.spec = spec
    self.masks = masks

  def tree(self, tree: Any, f: int) -> Any:
    if self.masks is None or not jax.tree.leaves(tree):
      return tree
    return _fragments.view(tree, self.masks[f])

  def merge_tree(self, tree: Any, part: Any) -> Any:
    if self.masks is None or not jax.tree.leaves(tree):
      return part
    return jax.tree.map(
      lambda old, new: old if isinstance(new, optax.MaskedNode) else new,
      tree,
      part,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )

  def carry(self, carry: dict[str, Any], f: int) -> dict[str, Any]:
    if self.masks is None:
      return carry
    return {
      name: value[f] if name in self.spec.per_fragment else self.tree(value, f)
      for name, value in carry.items()
    }

  def merge_carry(self, carry: dict[str, Any], part: dict[str, Any], f: int) -> dict[str, Any]:
    if self.masks is None:
      return part
    out = {}
    for name, value in carry.items():
      if name in self.spec.per_fragment:
        out[name] = (*value[:f], part[name], *value[f + 1 :])
      else:
        out[name] = self.merge_tree(value, part[name])
    return out


def run_on_sync(
  is_sync: jax.Array, sync: Callable[[T, Any], T], carry: T, axis_name: Any, inputs: Any = ()
) -> T:
  """``sync(carry, inputs)`` on sync steps, ``carry`` otherwise; one branch runs.

  The carry is made varying first (under shard_map) since the sync mixes it
  with per-worker values; so is what the sync returns, since a value made
  equal by a collective (e.g. a ``pmean`` of the params) is invariant.
  ``inputs`` are read-only values the sync reads (the params): they go
  through the loop unchanged rather than being captured by it.

  Under shard_map and pmap (mesh axes, not vmap), every leaf crosses the loop
  with a leading axis of one (``x[None]`` in, ``x[0]`` out). A step that runs
  on its ``[1, ...]`` block squeezes that axis off (``p[0]``); XLA then sees
  the loop's results and the step's params as reshapes of the same
  ``[1, ...]`` buffers and computes ``params + updates`` on the donated
  buffer in place. Without the axis the loop's results are the squeezed
  shape, the add reads the params through a reshape, and XLA copies the new
  params into the donated buffer (a params-sized copy on every step).
  """
  carry = _collectives.to_varying(carry, axis_name)
  inputs = _collectives.to_varying(inputs, axis_name)

  def body(c: T, i: Any) -> T:
    return _collectives.to_varying(sync(c, i), axis_name)

  # On a mesh of several axes the sync may also make values vary over an axis
  # other than `axis_name` (a hierarchical composition: an update that a tower
  # made invariant over "local" meets params that vary over it). The loop's
  # carry must have one type: the union of what goes in and what comes out.
  out = jax.eval_shape(body, carry, inputs)
  carry = jax.tree.map(_vary_like, carry, out)
  # Under vmap the leading axis would not help (the step has no [1, ...]
  # block) and XLA lays an [N, 1, ...] carry out apart from [N, ...] and
  # copies it, so it is added on mesh axes only.
  lead = _on_mesh(axis_name)

  def expand(tree: Any) -> Any:
    return jax.tree.map(lambda x: lax.expand_dims(x, (0,)), tree) if lead else tree

  def squeeze(tree: Any) -> Any:
    return jax.tree.map(lambda x: lax.squeeze(x, (0,)), tree) if lead else tree

  def loop_body(_: Any, loop_carry: tuple[Any, Any]) -> tuple[Any, Any]:
    c, i = loop_carry
    return expand(jax.tree.map(_vary_like, body(squeeze(c), squeeze(i)), carry)), i

  trips = jnp.where(is_sync, 1, 0).astype(jnp.int32)
  out, _ = lax.fori_loop(0, trips, loop_body, (expand(carry), expand(inputs)))
  return squeeze(out)


def _on_mesh(axis_name: Any) -> bool:
  """Whether every axis is a manual mesh axis (shard_map, pmap), not a vmap axis."""
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  return all(a in manual for a in _collectives.axis_tuple(axis_name))


def _vary_like(x: Any, like: Any) -> Any:
  """``x``, cast to varying over the axes ``like`` varies over and ``x`` does not."""
  missing = tuple(sorted(_collectives.varying_axes(like) - _collectives.varying_axes(x), key=str))
  return lax.pcast(x, missing, to="varying") if missing else x


def _vary_tree_like(tree: Any, like: Any) -> Any:
  """``tree`` with the varying type of ``like`` (a state keeps its type across calls)."""
  return jax.tree.map(_vary_like, tree, like)


def replay_commits(
  commit: Callable[[Any, Any], Any],
  carry: Any,
  contribution: Any,
  axes: tuple,
  *,
  mine: Callable[[Any], Any],
  after: bool,
) -> tuple[Any, Any, jax.Array, jax.Array]:
  """The reference's parameter server: every worker's commit, in worker order.

  Every worker receives all workers' ``contribution`` (one all-gather) and
  runs ``carry = commit(carry, contribution_k)`` for k = 0, ..., N - 1, so all
  workers end with the same final carry. A contribution that is not finite
  is not committed (every worker sees which, in what it gathered). Returns
  ``mine(carry)`` as this worker saw it just before (``after=False``) or just
  after (``after=True``) its own commit, the final carry, whether the center
  moved (some contribution was finite, and so is the final carry), and
  whether this worker's own contribution was left out.
  """
  me = _collectives.worker_index(axes)
  gathered = _collectives.all_gather(contribution, axes)
  n = _collectives.num_workers(axes)
  each = [_nonfinite.all_finite(jax.tree.map(lambda g, k=k: g[k], gathered)) for k in range(n)]
  # A worker sharded over other mesh axes (FSDP) agrees on every flag at once.
  oks = _collectives.agree(jnp.stack(each), axes)
  # A Python loop over the N (static, few) commits: straight-line code, so a
  # static sync step holds no loop.
  c = _collectives.to_varying(carry, axes)
  kept = mine(c)
  for k in range(n):
    if not after:
      kept = jax.tree.map(lambda m, v, k=k: jnp.where(k == me, v, m), kept, mine(c))
    committed = commit(c, jax.tree.map(lambda g, k=k: g[k], gathered))
    c = keep_unless(oks[k], committed, c)
    if after:
      kept = jax.tree.map(lambda m, v, k=k: jnp.where(k == me, v, m), kept, mine(c))
  final = c
  moved = jnp.logical_and(jnp.any(oks), reduced_finite(final, axes))
  # This worker's own flag, checked on its own contribution (the same value
  # as its entry of `oks`, without indexing a gathered array by worker).
  return kept, final, moved, jnp.logical_not(own_finite(contribution, axes))
