"""When the periodic transforms sync: their schedule, validated once.

A periodic transform syncs on a fixed schedule of its calls (every ``period``
calls, after ``warmup`` synchronous calls, one fragment at a time when the
model is cut into ``fragments``, sent ``delay`` calls before the call where it
lands). That
schedule is static: it lives in the transform's state as a
:class:`SyncSchedule`, a pytree node with no leaves, so that it survives
``optax.chain``, ``optax.masked``, orbax checkpoints and Flax, and a training
loop can read it back with :func:`optax_dist.sync_schedule`. The static flag
that a call takes is checked by :mod:`optax_dist._flags`.
"""

import dataclasses
import functools
import numbers
import operator
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_dist import _fragments

# The static flags that name a warm-up call and a call that applies a delayed
# sync (``("apply", f)``); a flag is one of these, a bool or a fragment index.
WARMUP = "warmup"
APPLY = "apply"
Flag = bool | int | str | tuple[str, int] | None


class Phases(NamedTuple):
  """What one call does with one fragment's sync.

  Each decision is a Python bool (a static flag: ``False`` compiles nothing)
  or a traced bool (the program decides from its counter).

  Attributes:
    reduce: Whether the call runs the fragment's reduction (undelayed: its
      whole sync, after the inner step; delayed: before the inner step).
    apply: Whether the call lands the fragment's sync: its outer step, after
      the inner step (undelayed: the same as ``reduce``).
  """

  reduce: Any
  apply: Any


class Plan(NamedTuple):
  """What one call of a periodic transform does: :meth:`SyncSchedule.plan`.

  Attributes:
    warmup: Whether it is a synchronous warm-up call (Python or traced bool).
    fragments: One :class:`Phases` per fragment.
  """

  warmup: Any
  fragments: tuple[Phases, ...]


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


def check_delay(delay: Any, blend: Any) -> tuple[int, float]:
  """``delay`` is a static Python int >= 0 and ``blend`` a static float in [0, 1].

  ``None`` is 0 for either (the defaults, so that ``optax.inject_hyperparams``
  does not take them for hyperparameters).
  """
  delay = _static_count("delay", delay, " (0: the whole sync on its scheduled call)")
  blend = 0.0 if blend is None else blend
  if isinstance(blend, bool) or not isinstance(blend, numbers.Real):
    raise TypeError(f"`blend` must be a Python float in [0, 1] (it is static), got {blend!r}.")
  if not 0 <= float(blend) <= 1:
    raise ValueError(
      f"`blend` must be in [0, 1], got {blend}: after a sync the workers land on "
      "`blend * x + (1 - blend) * center` (0: on the center; 1: they keep their params)."
    )
  return int(delay), float(blend)


def check_fragments(period: int, num: int, delay: int, period_name: str) -> None:
  """Each fragment syncs every ``period`` calls, and at most one is in flight."""
  if period % num:
    raise ValueError(
      f"`{period_name}` ({period}) must be a multiple of the number of fragments ({num}), "
      f"so that each fragment syncs every {period} calls."
    )
  check_delay_fits(period, num, delay, period_name)


def check_delay_fits(period: int, num: int, delay: int, period_name: str) -> None:
  """At most one fragment in flight: ``delay < period / fragments``."""
  if delay and delay >= period // num:
    raise ValueError(
      f"`delay` ({delay}) must be < `{period_name}` / fragments ({period} / {num} = "
      f"{period // num}), so that a fragment's outer step lands before the next fragment "
      "syncs. Use a smaller delay, fewer fragments or a longer period."
    )


class ScheduleArgs(NamedTuple):
  """A periodic transform's schedule arguments, validated.

  Attributes:
    period: Calls between two syncs of the same fragment.
    period_name: The argument that gave it (``sync_period``, ...), for errors.
    warmup: Synchronous calls before the local steps.
    fragments: The ``fragments`` argument (labels are computed per trace).
    delay: ``tau``: calls by which a fragment's reduction precedes its outer step.
    blend: Where the workers land after a sync.
  """

  period: int
  period_name: str
  warmup: int
  fragments: Any
  delay: int
  blend: float

  @classmethod
  def check(
    cls, period_name: str, period: Any, sync_warmup: Any, fragments: Any, delay: Any, blend: Any
  ) -> "ScheduleArgs":
    """Every schedule argument checked once, with an error that says what to pass."""
    period = check_period(period, period_name)
    warmup = _static_count("sync_warmup", sync_warmup)
    delay, blend = check_delay(delay, blend)
    num = _fragments.check(fragments)
    if num is not None:
      check_fragments(period, num, delay, period_name)
    return cls(period, period_name, warmup, fragments, delay, blend)

  def schedule(self, params: Any) -> "SyncSchedule":
    """The schedule for ``params`` (whose tree gives the number of fragments)."""
    _, num = _fragments.labels(self.fragments, params)
    check_delay_fits(self.period, num, self.delay, self.period_name)
    return SyncSchedule(self.period, self.warmup, num, self.delay)

  def check_state(self, schedule: "SyncSchedule", params: Any, name: str) -> None:
    """A state made by an optimizer with another schedule is refused (at trace time)."""
    _, num = _fragments.labels(self.fragments, params)
    # Fields not set here (if any) are compared as they are.
    mine = dataclasses.replace(
      schedule, period=self.period, warmup=self.warmup, fragments=num, delay=self.delay
    )
    if schedule != mine:
      raise ValueError(
        f"{name}: this state was made with the schedule {schedule}, but this optimizer "
        f"syncs on {mine}. Driving it would sync on the wrong calls. Make the state with "
        "this optimizer's `init` (or restore it into a state made by that `init`), or "
        "build the optimizer with the settings the state was made with."
      )


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SyncSchedule:
  """When a periodic transform syncs: the static part of its state.

  Calls are counted from 1. The first ``warmup`` calls are synchronous data
  parallelism (flag ``"warmup"``). After them, with ``r`` the number of calls
  since the warm-up, fragment ``f`` of ``fragments`` syncs on the calls with

  .. math::

    r \\bmod H = \\big((f + 1) H / F\\big) \\bmod H,

  ``H`` being the period: with one fragment, on calls ``warmup + H``,
  ``warmup + 2H``, ...; with ``F`` fragments, one fragment every ``H / F``
  calls, each fragment every ``H`` calls.

  A schedule is read from a state with :func:`optax_dist.sync_schedule`. Called
  with the number of calls made so far (:func:`optax_dist.call_count` of a
  restored state), it returns the static flag for the next call, to pass as
  ``update(..., sync=flag)``.

  With a ``delay`` ``tau >= 1`` (see :func:`optax_dist.diloco`), the sync
  scheduled on call ``s`` still lands on call ``s``, but is sent ``tau`` calls
  earlier: its all-reduce runs on call ``s - tau + 1``, from the params after
  ``s - tau`` calls, and its outer step lands on call ``s``. The flag of the
  call that reduces is the fragment's index (``True`` with one fragment); with
  ``tau = 1`` that call is ``s`` itself and also applies. With ``tau >= 2`` the
  call ``s`` that applies fragment ``f`` has the flag ``("apply", f)``.

  Attributes:
    period: ``H``, calls between two syncs of the same fragment.
    warmup: Synchronous calls before the first local step.
    fragments: ``F``, the number of fragments (1: the whole model at once).
    delay: ``tau``, calls from a fragment's reduction (sent after ``s - tau``
      calls) to its outer step on its scheduled call ``s`` (0: the whole sync
      on call ``s``; at most ``H / F - 1``).

  Examples:
    >>> import optax_dist
    >>> schedule = optax_dist.SyncSchedule(period=4, warmup=2)
    >>> [schedule(count) for count in range(8)]
    ['warmup', 'warmup', False, False, False, True, False, False]
    >>> streaming = optax_dist.SyncSchedule(period=4, fragments=2)
    >>> [streaming(count) for count in range(8)]
    [False, 0, False, 1, False, 0, False, 1]
    >>> delayed = optax_dist.SyncSchedule(period=6, fragments=2, delay=2)
    >>> [delayed(count) for count in range(8)]
    [False, 0, ('apply', 0), False, 1, ('apply', 1), False, 0]
  """

  period: int
  warmup: int = 0
  fragments: int = 1
  delay: int = 0

  def __post_init__(self) -> None:
    for name in ("period", "warmup", "fragments", "delay"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be a Python int (it is static), got {value!r}.")
    if self.period < 1 or self.fragments < 1 or self.warmup < 0:
      raise ValueError(f"A schedule needs period >= 1, fragments >= 1 and warmup >= 0, got {self}.")
    if self.period % self.fragments:
      raise ValueError(
        f"The period ({self.period}) must be a multiple of the number of fragments "
        f"({self.fragments}), so that each fragment syncs every {self.period} calls and "
        "one fragment every period / fragments calls."
      )
    if self.delay < 0 or (self.delay and self.delay >= self.period // self.fragments):
      raise ValueError(
        f"A schedule needs 0 <= delay < period / fragments, got {self}: one fragment at a "
        "time may be in flight."
      )

  def __repr__(self) -> str:
    # A schedule without a delay reads as before delays existed.
    delay = f", delay={self.delay}" if self.delay else ""
    return (
      f"SyncSchedule(period={self.period}, warmup={self.warmup}, fragments={self.fragments}{delay})"
    )

  def __call__(self, count: int) -> bool | int | str | tuple[str, int]:
    """The ``sync`` flag of the call made after ``count`` calls.

    Args:
      count: Calls made so far (0 for the first call), a Python int.

    Returns:
      ``"warmup"``, ``False``, ``True`` (one fragment) or the index of the
      fragment that syncs.
    """
    count = operator.index(count)
    if count < 0:
      raise ValueError(f"`count` must be >= 0, got {count}.")
    call = count + 1
    if call <= self.warmup:
      return WARMUP
    if self.delay:
      reduced = self._scheduled(call + self.delay - 1)
      if reduced is not False:
        return reduced
      applied = self._scheduled(call)
      if applied is not False and self.delay > 1:
        return (APPLY, 0 if applied is True else applied)
      return False
    return self._scheduled(call)

  def _scheduled(self, call: int) -> bool | int:
    """The fragment whose sync is scheduled on ``call`` (True: the only one), or False."""
    if call <= self.warmup:
      return False
    since = call - self.warmup
    width = self.period // self.fragments
    if since % width:
      return False
    if self.fragments == 1:
      return True
    return ((since % self.period) // width - 1) % self.fragments

  def offset(self, fragment: int) -> int:
    """The call, modulo the period and counted after the warm-up, when ``fragment`` syncs."""
    return ((fragment + 1) * self.period // self.fragments) % self.period

  def in_graph(self, calls: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """Traced decisions for the call that brings the counter to ``calls``.

    Returns whether it is a warm-up call, and for each fragment whether it
    syncs.
    """
    is_warm = calls <= self.warmup
    since = calls - self.warmup
    syncs = [
      jnp.logical_and(since > 0, since % self.period == self.offset(f))
      for f in range(self.fragments)
    ]
    return is_warm, syncs

  @property
  def splits(self) -> bool:
    """Whether a sync is split in two (``delay >= 1``): its reduction runs before the
    inner step, from the params the call receives, and its outer step after it."""
    return self.delay >= 1

  @property
  def waits(self) -> bool:
    """Whether a reduced sync waits in the state (``delay >= 2``): reduced on one call,
    applied on a later one (``("apply", f)``)."""
    return self.delay >= 2

  def plan(self, flag: Flag, calls: jax.Array) -> Plan:
    """What the call that brings the counter to ``calls`` does, under the static ``flag``.

    ``flag=None``: traced decisions, from ``calls``; any other flag (checked
    by :func:`optax_dist._flags.check_flag`): Python bools, from the flag
    alone.
    """
    if flag is None:
      is_warm, syncs = self.in_graph(calls)
      reduces, applies = self.phases(calls) if self.splits else (syncs, syncs)
      # Without a warm-up no call is one: nothing of it is compiled.
      return Plan(is_warm if self.warmup else False, tuple(map(Phases, reduces, applies)))
    if flag == WARMUP:
      return Plan(True, (Phases(False, False),) * self.fragments)
    if flag is False or isinstance(flag, tuple):
      named: list[int] = []
    else:
      named = list(range(self.fragments)) if flag is True else [int(flag)]
    if self.waits:
      applied = [flag[1]] if isinstance(flag, tuple) else []
    else:
      applied = named
    return Plan(False, tuple(Phases(f in named, f in applied) for f in range(self.fragments)))

  def runs_a_sync(self, calls: jax.Array) -> jax.Array:
    """Whether the call that brings the counter to ``calls`` syncs a fragment, or with a
    delay reduces or applies one (a warm-up call does not)."""
    decisions = [d for phases in self.plan(None, calls).fragments for d in phases]
    return functools.reduce(jnp.logical_or, decisions)

  def phases(self, calls: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    """With a delay: for each fragment, whether the call that brings the counter to ``calls``
    reduces it (``delay - 1`` calls before its scheduled one) and whether it applies it
    (its scheduled call)."""
    _, reduces = self.in_graph(calls + self.delay - 1)
    _, applies = self.in_graph(calls)
    return reduces, applies


class SyncState(NamedTuple):
  """The periodic engine's part of a periodic transform's state.

  Every periodic transform's state holds one in its ``sync`` field; it is the
  same on every worker, except ``num_dropped``.

  Attributes:
    calls: Number of calls since init (int32); read by
      :func:`optax_dist.call_count`.
    num_syncs: Number of syncs that moved the center, one per fragment synced
      (int32); read by :func:`optax_dist.global_step`.
    num_skipped_syncs: Number of syncs that left the center as it was because
      no worker's contribution was finite (int32); read by
      :func:`optax_dist.skipped_syncs`.
    num_dropped: Number of syncs (one per fragment synced) and warm-up calls
      at which *this worker's* contribution was not finite and was left out
      of the average (int32). Unlike the other counters it differs between
      workers: stacked per worker it says which worker went bad, and how
      often. Read by :func:`optax_dist.dropped_syncs`.
    schedule: When the transform syncs (static, no arrays); read by
      :func:`optax_dist.sync_schedule`.
  """

  calls: jax.Array
  num_syncs: jax.Array
  num_skipped_syncs: jax.Array
  num_dropped: jax.Array
  schedule: SyncSchedule
