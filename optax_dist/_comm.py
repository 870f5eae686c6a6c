"""Communication accounting, read from the compiled program.

What a training step sends over the network is decided by XLA, not by the
Python code: this module compiles the step and reads its collectives out of
the optimized HLO, with their bytes and whether they run on every step or
only in a sync branch.
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax

from optax_dist import _hlo
from optax_dist import _schedule


class Collective(NamedTuple):
  """One collective operation of a compiled step.

  Attributes:
    kind: The HLO operation: ``"all-reduce"``, ``"all-gather"``,
      ``"reduce-scatter"``, ``"all-to-all"`` or ``"collective-permute"``.
    nbytes: The bytes of its result on one device (for an all-gather, the N
      gathered copies; for an all-to-all, the N received blocks).
    shape: Its HLO result type, e.g. ``f32[64,32]{1,0}``.
    computation: The HLO computation it sits in.
    every_step: False when it sits in a loop (the periodic transforms' sync
      branch, a loop of zero or one trip), True when it runs on every call.
    workers: The devices it spans (the size of its replica groups), N.
    wire_bytes: The bytes one device sends for it in a ring implementation:
      :math:`2 (N-1)/N` times the result for an all-reduce, :math:`(N-1)/N`
      times the result for an all-gather and an all-to-all, :math:`N - 1`
      times it for a reduce-scatter, the result for a collective-permute.
    loop: The loop it runs in (one per sync branch, e.g. per fragment), or
      ``None`` when it runs on every call.
  """

  kind: str
  nbytes: int
  shape: str
  computation: str
  every_step: bool
  workers: int
  wire_bytes: float
  loop: str | None


class CommunicationReport(NamedTuple):
  """The collectives of a compiled step and the bytes they move.

  Attributes:
    collectives: Every collective of the compiled program.
    every_step_bytes: Bytes per device moved by the collectives that run on
      every call (their results' sizes).
    sync_bytes: Bytes per device moved by the collectives of the sync
      branches, once each (every fragment's, when there are several).
    every_step_wire_bytes: Bytes one device sends on the wire, on every call.
    sync_wire_bytes: Bytes one device sends on the wire for the sync
      branches, once each.
    peak_sync_bytes: The most bytes one sync branch moves (with ``F``
      fragments, one fragment's: about ``sync_bytes / F``).
    peak_sync_wire_bytes: The most bytes one device sends in one sync
      branch.
  """

  collectives: tuple[Collective, ...]
  every_step_bytes: int
  sync_bytes: int
  every_step_wire_bytes: float
  sync_wire_bytes: float
  peak_sync_bytes: int
  peak_sync_wire_bytes: float

  def bytes_per_step(self, period: int = 1) -> float:
    """Average bytes per call when every sync branch runs once every ``period`` calls."""
    period = _schedule.check_period(period, "period")
    return self.every_step_bytes + self.sync_bytes / period

  def wire_bytes_per_step(self, period: int = 1) -> float:
    """Average bytes one device sends per call, every sync branch once every ``period`` calls."""
    period = _schedule.check_period(period, "period")
    return self.every_step_wire_bytes + self.sync_wire_bytes / period


def wire_bytes(kind: str, nbytes: int, workers: int) -> float:
  """Bytes one device sends for a collective whose result has ``nbytes`` (ring convention)."""
  if workers <= 1:
    return 0.0
  share = (workers - 1) / workers
  if kind == "all-reduce":
    return 2 * share * nbytes
  if kind in ("all-gather", "all-to-all"):
    return share * nbytes
  if kind == "reduce-scatter":
    return float((workers - 1) * nbytes)
  return float(nbytes)  # collective-permute: its result, to one peer.


def communication_report(
  step: Callable[..., Any], *args: Any, **kwargs: Any
) -> CommunicationReport:
  r"""Compiles ``step(*args, **kwargs)`` and accounts for its collectives.

  Reads the optimized HLO that XLA compiled, so the figures are what the
  program moves, after XLA has fused, combined or removed collectives. A
  collective inside a loop body is counted as part of the sync branch (the
  periodic transforms run their sync as a loop of zero or one trip); pass one
  training step, not a function that loops over steps.

  Two measures of bytes, per device: the size of each collective's result
  (an all-reduce of the params counts the params' bytes once, an all-gather
  the N copies it delivers), and the bytes the device sends on the wire in a
  ring implementation (an all-reduce of B bytes over N devices sends
  :math:`2 (N-1)/N \cdot B`, an all-gather or all-to-all delivering B bytes
  :math:`(N-1)/N \cdot B`), which is what compares algorithms by what
  crosses the network. Under ``jax.vmap`` nothing is communicated (the
  workers are one program and a collective is a local reduction): measure a
  step mapped with ``jax.shard_map`` or ``jax.pmap``. XLA's CPU backend
  widens bfloat16 all-reduces to float32 (and float8 collectives to
  float16), so those formats show their savings only when compiled for an
  accelerator; int8 moves as int8 everywhere.

  Args:
    step: A function, jitted or not (``jax.jit(jax.shard_map(...))``, a
      ``jax.pmap``'ed function, ...). Functions that are not jitted are
      wrapped in ``jax.jit``.
    *args: Example arguments (arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: Example keyword arguments.

  Returns:
    A :class:`CommunicationReport`.

  Raises:
    ValueError: if XLA returns no HLO text for the compiled step. What tracing
      or compiling ``step`` on ``args`` raises passes through.

  Examples:
    A tower step all-reduces the gradients on every step; an elastic
    averaging step all-reduces the params only on syncs. (Measure under
    ``jax.shard_map`` or ``jax.pmap``: under ``jax.vmap`` the workers are one
    program and a collective is a local reduction.)

    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> params = jnp.zeros((8, 1000))  # 8 workers, 4000 bytes of params each.
    >>> def train_step(tx):
    ...   def step(p, s, g):
    ...     u, s = tx.update(g, s, p)
    ...     return optax.apply_updates(p, u), s
    ...   return jax.pmap(step, axis_name="w"), jax.vmap(tx.init)(params)
    >>> step, state = train_step(optax_dist.tower(optax.sgd(0.1), axis_name="w"))
    >>> optax_dist.communication_report(step, params, state, params).every_step_bytes
    4000
    >>> tx = optax_dist.elastic_average(optax.sgd(0.1), axis_name="w", communication_period=8)
    >>> step, state = train_step(tx)
    >>> report = optax_dist.communication_report(step, params, state, params)
    >>> # The sync reduces the params and, in the same all-reduce, the count
    >>> # of workers whose params are finite (4 bytes).
    >>> report.every_step_bytes, report.sync_bytes, report.bytes_per_step(8)
    (0, 4004, 500.5)
    >>> report.sync_wire_bytes  # A ring all-reduce over 8 devices: 2 * 7/8 * 4004.
    7007.0
  """
  if not hasattr(step, "lower"):
    step = jax.jit(step)
  text = step.lower(*args, **kwargs).compile().as_text()
  if text is None:
    raise ValueError("XLA returned no HLO text for this step; cannot account for it.")
  owner = _hlo.loops(text)
  found = tuple(
    Collective(
      kind=op.kind,
      nbytes=op.nbytes,
      shape=op.shape,
      computation=op.computation,
      every_step=op.computation not in owner,
      workers=op.group,
      wire_bytes=wire_bytes(op.kind, op.nbytes, op.group),
      loop=owner.get(op.computation),
    )
    for op in _hlo.collectives(text)
  )
  per_loop: dict[str, list[Collective]] = {}
  for c in found:
    if c.loop is not None:
      per_loop.setdefault(c.loop, []).append(c)
  return CommunicationReport(
    collectives=found,
    every_step_bytes=sum(c.nbytes for c in found if c.every_step),
    sync_bytes=sum(c.nbytes for c in found if not c.every_step),
    every_step_wire_bytes=sum(c.wire_bytes for c in found if c.every_step),
    sync_wire_bytes=sum(c.wire_bytes for c in found if not c.every_step),
    peak_sync_bytes=max((sum(c.nbytes for c in cs) for cs in per_loop.values()), default=0),
    peak_sync_wire_bytes=max(
      (sum(c.wire_bytes for c in cs) for cs in per_loop.values()), default=0.0
    ),
  )
