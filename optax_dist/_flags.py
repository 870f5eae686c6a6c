"""The static ``sync`` flag of a periodic transform's call, checked.

The flag a call takes (the ``sync`` extra argument of ``update``):

* ``None``: the program decides from the call counter (one compiled program,
  the sync inside a loop of zero or one trip);
* ``False``: no sync (no sync code is compiled);
* ``True``: sync now (every fragment);
* an ``int`` ``f``: sync fragment ``f`` only;
* ``("apply", f)``: apply fragment ``f``'s delayed sync (``delay >= 2``);
* ``"warmup"``: a synchronous data-parallel call (gradients averaged over the
  workers before the inner step; the center follows the params).

:func:`checking_sync_flags` checks, in the program, that a hand-written
loop's flags follow the transform's own counter.
"""

from collections.abc import Iterator
import contextlib
import numbers
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_dist import _schedule


def check_flag(sync: Any, num_fragments: int) -> _schedule.Flag:
  """``sync`` if it is a static flag this transform understands, else a clear error."""
  if sync is None or isinstance(sync, bool) or (isinstance(sync, str) and sync == _schedule.WARMUP):
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
    and sync[0] == _schedule.APPLY
    and isinstance(sync[1], numbers.Integral)
    and not isinstance(sync[1], bool)
  ):
    if not 0 <= int(sync[1]) < num_fragments:
      raise ValueError(
        f"`sync={sync}` names fragment {sync[1]}, but this transform has {num_fragments} "
        f"fragment(s): use an index in [0, {num_fragments})."
      )
    return (_schedule.APPLY, int(sync[1]))
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


_VERIFY = [False]
# The disagreements found inside the innermost checking_sync_flags context
# (None outside one): the first is raised, once, when the context exits.
_FOUND: list[list[ValueError] | None] = [None]
_FOUND_LOCK = threading.Lock()


@contextlib.contextmanager
def checking_sync_flags() -> Iterator[None]:
  """Checks on every call that a static ``sync`` flag fits the call count.

  A hand-written loop that passes ``update(..., sync=flag)`` itself (see
  :func:`optax_dist.sync_schedule`) must count its calls: one that forgets
  ``count += 1``, or counts a call it did not make, passes flags that no
  longer follow the schedule, and the transform does what the flags say
  (syncs never, or at the wrong calls) without a word. Inside this context,
  every periodic transform traced with a static flag also computes, in the
  program, the flag its own counter gives, and a host callback notes any
  call where they differ; the context raises a ``ValueError`` naming the
  first when it exits. It costs a scalar comparison
  and a host callback per call, so use it while writing the loop, not for
  long runs. It applies to the steps traced inside the context (a jitted
  step traced before keeps its program).

  Args:
    None: it is a context manager, entered with ``with``.

  Returns:
    The context manager; inside it, the checks are on.

  Raises:
    ValueError: when the context exits, once, if a call made inside it had
      a static flag that is not the one its counter gives (the first such
      call is named). A checked program run after the context has ended
      raises it from the program instead.

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
  previous, outer = _VERIFY[0], _FOUND[0]
  found: list[ValueError] = []
  _VERIFY[0], _FOUND[0] = True, found
  try:
    yield
    jax.effects_barrier()  # The checks of the calls made inside have all run.
  finally:
    _VERIFY[0], _FOUND[0] = previous, outer
  if found:
    raise found[0]


def _flag_text(flag: Any) -> str:
  return repr(flag.item() if isinstance(flag, np.generic) else flag)


_APPLIED = 1 << 16  # Codes of the calls that apply a delayed sync (see verify_flag).


def verify_flag(flag: _schedule.Flag, counter: jax.Array, schedule: _schedule.SyncSchedule) -> None:
  """Inside :func:`checking_sync_flags`: a callback that raises if ``flag`` is not the counter's."""
  if not _VERIFY[0] or flag is None:
    return
  plan = schedule.plan(None, counter + 1)
  # The flag as a code: -2 warm-up, -1 no sync, F every fragment, f fragment
  # f, _APPLIED + f applying fragment f's delayed sync (a call that reduces a
  # fragment is named by it, even if it also applies another).
  code = jnp.where(plan.warmup, -2, -1)
  for f, phases in enumerate(plan.fragments if schedule.waits else ()):
    code = jnp.where(phases.apply, _APPLIED + f, code)
  for f, phases in enumerate(plan.fragments):
    code = jnp.where(phases.reduce, schedule.fragments if schedule.fragments == 1 else f, code)
  # (Not a dict lookup: 0 == False would read fragment 0 as no sync.)
  if isinstance(flag, tuple):
    given: Any = _APPLIED + flag[1]
  elif flag is False:
    given = -1
  elif flag is True:
    given = schedule.fragments
  elif flag == _schedule.WARMUP:
    given = -2
  else:
    given = flag

  def check(code: Any, counter: Any) -> None:
    code, counter = np.asarray(code).reshape(-1), np.asarray(counter).reshape(-1)
    if (code == given).all():
      return
    expected = int(code[code != given][0])
    count = int(counter[code != given][0])
    want: Any = {-2: _schedule.WARMUP, -1: False}.get(
      expected, True if schedule.fragments == 1 else expected
    )
    if expected >= _APPLIED:
      want = (_schedule.APPLY, expected - _APPLIED)
    error = ValueError(
      f"The static flag `sync={_flag_text(flag)}` disagrees with the transform's own call "
      f"counter: after {count} calls its schedule {schedule} gives `sync={want!r}`. A "
      "hand-written loop must count every call it makes (`count += 1` after each step), "
      "starting from `optax_dist.call_count(state)` for a restored state; or pass "
      "`sync=None` and let the program decide."
    )
    found = _FOUND[0]
    if found is None:  # A checked program run after its context ended.
      raise error
    with _FOUND_LOCK:  # One callback per device: the first one is kept.
      if not found:
        found.append(error)

  jax.debug.callback(check, code, counter)


def check_fits(name: str, flag: Any, schedule: _schedule.SyncSchedule) -> None:
  """Flags that a delay (or its absence) cannot take."""
  delay = schedule.delay
  if flag == _schedule.WARMUP and not schedule.warmup:
    raise ValueError(
      f"{name}: `sync='warmup'` asks for a synchronous warm-up call, but this "
      "transform has no warm-up (`sync_warmup=0`). Build it with `sync_warmup=K` for K "
      "warm-up calls, or pass the flags of `optax_dist.sync_schedule(state)`."
    )
  if isinstance(flag, tuple) and not schedule.waits:
    raise ValueError(
      f"{name}: `sync={flag}` names a call that applies a delayed sync, but this "
      f"transform has `delay={delay}`"
      + (": the call that reduces also applies (pass the fragment's index)." if delay else ".")
    )
  if flag is True and schedule.waits and schedule.fragments > 1:
    raise ValueError(
      f"{name}: `sync=True` would reduce all {schedule.fragments} fragments at once, but "
      f"with `delay={delay}` one fragment at a time waits for its outer step. Pass the "
      "flags of `optax_dist.sync_schedule(state)`."
    )
