"""When the periodic transforms sync: their schedule, and the static ``sync`` flag.

A periodic transform syncs on a fixed schedule of its calls (every ``period``
calls, after ``warmup`` synchronous calls, one fragment at a time when the
model is cut into ``fragments``). That schedule is static: it lives in the
transform's state as a :class:`SyncSchedule`, a pytree node with no leaves,
so that it survives ``optax.chain``, ``optax.masked``, orbax checkpoints and
Flax, and a training loop can read it back with :func:`sync_schedule`.

The flag a call takes (the ``sync`` extra argument of ``update``):

* ``None``: the program decides from the call counter (one compiled program,
  the sync inside a loop of zero or one trip);
* ``False``: no sync (no sync code is compiled);
* ``True``: sync now (every fragment);
* an ``int`` ``f``: sync fragment ``f`` only;
* ``"warmup"``: a synchronous data-parallel call (gradients averaged over the
  workers before the inner step; the center follows the params).
"""

from collections.abc import Iterator
import contextlib
import dataclasses
import numbers
import operator
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

WARMUP = "warmup"
APPLY = "apply"

Flag = bool | int | str | tuple[str, int] | None


def check_flag(sync: Any, num_fragments: int) -> Flag:
  """``sync`` if it is a static flag this transform understands, else a clear error."""
  if sync is None or isinstance(sync, bool) or (isinstance(sync, str) and sync == WARMUP):
    return sync
  # NumPy scalars are host values, as Python's: a bool or an int.
  if isinstance(sync, (np.generic, np.ndarray)) and not isinstance(sync, jax.Array):
    if np.ndim(sync) == 0 and np.asarray(sync).dtype == np.bool_:
      return bool(sync)
    if np.ndim(sync) == 0 and np.issubdtype(np.asarray(sync).dtype, np.integer):
      sync = int(sync)
  if isinstance(sync, (jax.Array, np.ndarray, np.generic)) or isinstance(sync, jax.core.Tracer):
    raise TypeError(
      "`sync` must be a static Python value (None, True, False, a fragment index or "
      f"'warmup'), got {type(sync).__name__} {sync!r}: a traced or array flag cannot "
      "choose which program to compile. Pass a Python bool (e.g. from "
      "`optax_dist.sync_schedule(state)(count)`) and mark it static, e.g. "
      "`jax.jit(step, static_argnames='sync')`, or pass `sync=None` to let the program "
      "decide from its own counter."
    )
  if (
    isinstance(sync, tuple)
    and len(sync) == 2
    and sync[0] == APPLY
    and isinstance(sync[1], numbers.Integral)
    and not isinstance(sync[1], bool)
  ):
    if not 0 <= int(sync[1]) < num_fragments:
      raise ValueError(
        f"`sync={sync}` names fragment {sync[1]}, but this transform has {num_fragments} "
        f"fragment(s): use an index in [0, {num_fragments})."
      )
    return (APPLY, int(sync[1]))
  if isinstance(sync, numbers.Integral):
    if not 0 <= int(sync) < num_fragments:
      raise ValueError(
        f"`sync={sync}` names a fragment, but this transform has {num_fragments} "
        f"fragment(s): use an index in [0, {num_fragments}), True for all of them, or False."
      )
    return int(sync)
  raise TypeError(
    "`sync` must be None, True, False, a fragment index, ('apply', fragment) or 'warmup', "
    f"got {sync!r}."
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
  scheduled on call ``s`` is split: its all-reduce runs on call ``s + 1`` and
  its outer step lands on call ``s + tau``. The flag of the call that reduces
  is the fragment's index (``True`` with one fragment); with ``tau = 1`` that
  call also applies. With ``tau >= 2`` the call that applies fragment ``f``
  has the flag ``("apply", f)``. The call ``s`` itself is a local call.

  Attributes:
    period: ``H``, calls between two syncs of the same fragment.
    warmup: Synchronous calls before the first local step.
    fragments: ``F``, the number of fragments (1: the whole model at once).
    delay: ``tau``, calls from a fragment's scheduled sync to its outer step
      (0: the sync happens on its call; at most ``H / F - 1``).

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
    [False, False, False, 0, ('apply', 0), False, 1, ('apply', 1)]
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
      reduced = self._scheduled(call - 1)
      if reduced is not False:
        return reduced
      applied = self._scheduled(call - self.delay)
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

  def in_graph(self, step: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """Traced decisions for the call that brings the counter to ``step``.

    Returns whether it is a warm-up call, and for each fragment whether it
    syncs.
    """
    is_warm = step <= self.warmup
    since = step - self.warmup
    syncs = [
      jnp.logical_and(since > 0, since % self.period == self.offset(f))
      for f in range(self.fragments)
    ]
    return is_warm, syncs

  def phases(self, step: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    """With a delay: for each fragment, whether the call that brings the counter to ``step``
    reduces it (the call after its scheduled one) and whether it applies it (``delay``
    calls after its scheduled one)."""
    _, reduces = self.in_graph(step - 1)
    _, applies = self.in_graph(step - self.delay)
    return reduces, applies


class SyncState(NamedTuple):
  """The periodic engine's part of a periodic transform's state.

  Every periodic transform's state holds one in its ``sync`` field; it is the
  same on every worker, except ``num_dropped``.

  Attributes:
    step: Number of calls since init (int32).
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

  step: jax.Array
  num_syncs: jax.Array
  num_skipped_syncs: jax.Array
  num_dropped: jax.Array
  schedule: SyncSchedule


_VERIFY = [False]


@contextlib.contextmanager
def checking_sync_flags() -> Iterator[None]:
  """Checks, on every call, that a static ``sync`` flag agrees with the call counter.

  A hand-written loop that passes ``update(..., sync=flag)`` itself (see
  :func:`optax_dist.sync_schedule`) must count its calls: one that forgets
  ``count += 1``, or counts a call it did not make, passes flags that no
  longer follow the schedule, and the transform does what the flags say
  (syncs never, or at the wrong calls) without a word. Inside this context,
  every periodic transform traced with a static flag also computes, in the
  program, the flag its own counter gives, and a host callback raises a
  ``ValueError`` naming both when they differ. It costs a scalar comparison
  and a host callback per call, so use it while writing the loop, not for
  long runs. It applies to the steps traced inside the context (a jitted
  step traced before keeps its program).

  Args:
    None: it is a context manager, entered with ``with``.

  Returns:
    The context manager; inside it, the checks are on.

  Raises:
    ValueError: from the program (as the runtime error that carries it),
      when a call's static flag is not the one its counter gives.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> tx = optax_dist.model_average(optax.sgd(0.1), axis_name="w", interval_steps=2)
    >>> def run(flags):
    ...   def train(params):
    ...     state = tx.init(params)
    ...     for flag in flags:
    ...       updates, state = tx.update(jnp.ones(2), state, params, sync=flag)
    ...       params = optax.apply_updates(params, updates)
    ...     return params
    ...   return jax.block_until_ready(jax.vmap(train, axis_name="w")(jnp.zeros((2, 2))))
    >>> with optax_dist.checking_sync_flags():
    ...   run([False, True])  # The schedule's flags.
    Array([[-0.2, -0.2],
           [-0.2, -0.2]], dtype=float32)
  """
  previous = _VERIFY[0]
  _VERIFY[0] = True
  try:
    yield
  finally:
    _VERIFY[0] = previous


def _flag_text(flag: Any) -> str:
  return repr(flag.item() if isinstance(flag, np.generic) else flag)


_APPLIED = 1 << 16  # Codes of the calls that apply a delayed sync (see verify_flag).


def verify_flag(flag: Flag, counter: jax.Array, schedule: SyncSchedule) -> None:
  """Inside :func:`checking_sync_flags`: a callback that raises if ``flag`` is not the counter's."""
  if not _VERIFY[0] or flag is None:
    return
  is_warm, syncs = schedule.in_graph(counter + 1)
  # The flag as a code: -2 warm-up, -1 no sync, F every fragment, f fragment f.
  code = jnp.where(is_warm, -2, -1)
  if schedule.delay:  # The calls that reduce (and, delay >= 2, apply): code _APPLIED + f.
    syncs, applies = schedule.phases(counter + 1)
    for f, a in enumerate(applies if schedule.delay > 1 else []):
      code = jnp.where(a, _APPLIED + f, code)
  for f, s in enumerate(syncs):
    code = jnp.where(s, schedule.fragments if schedule.fragments == 1 else f, code)
  # (Not a dict lookup: 0 == False would read fragment 0 as no sync.)
  if isinstance(flag, tuple):
    given: Any = _APPLIED + flag[1]
  elif flag is False:
    given = -1
  elif flag is True:
    given = schedule.fragments
  elif flag == WARMUP:
    given = -2
  else:
    given = flag

  def check(code: Any, counter: Any) -> None:
    code, counter = np.asarray(code).reshape(-1), np.asarray(counter).reshape(-1)
    if (code == given).all():
      return
    expected = int(code[code != given][0])
    count = int(counter[code != given][0])
    want: Any = {-2: WARMUP, -1: False}.get(expected, True if schedule.fragments == 1 else expected)
    if expected >= _APPLIED:
      want = (APPLY, expected - _APPLIED)
    raise ValueError(
      f"The static flag `sync={_flag_text(flag)}` disagrees with the transform's own call "
      f"counter: after {count} calls its schedule {schedule} gives `sync={want!r}`. A "
      "hand-written loop must count every call it makes (`count += 1` after each step), "
      "starting from `optax_dist.call_count(state)` for a restored state; or pass "
      "`sync=None` and let the program decide."
    )

  jax.debug.callback(check, code, counter)
