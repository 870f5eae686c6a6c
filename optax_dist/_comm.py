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
from optax_dist import _periodic


class Collective(NamedTuple):
  """One collective operation of a compiled step.

  Attributes:
    kind: The HLO operation: ``"all-reduce"``, ``"all-gather"``,
      ``"reduce-scatter"``, ``"all-to-all"`` or ``"collective-permute"``.
    nbytes: The bytes of its result on one device (for an all-gather, the N
      gathered copies).
    shape: Its HLO result type, e.g. ``f32[64,32]{1,0}``.
    computation: The HLO computation it sits in.
    every_step: False when it sits in a loop body (the periodic transforms'
      sync branch, a loop of zero or one trip), True when it runs on every
      call.
  """

  kind: str
  nbytes: int
  shape: str
  computation: str
  every_step: bool


class CommunicationReport(NamedTuple):
  """The collectives of a compiled step and the bytes they move.

  Attributes:
    collectives: Every collective of the compiled program.
    every_step_bytes: Bytes per device moved by the collectives that run on
      every call.
    sync_bytes: Bytes per device moved by the collectives of the sync
      branch, on each sync.
  """

  collectives: tuple[Collective, ...]
  every_step_bytes: int
  sync_bytes: int

  def bytes_per_step(self, period: int = 1) -> float:
    """Average bytes per call when the sync branch runs every ``period`` calls."""
    period = _periodic.check_period(period, "period")
    return self.every_step_bytes + self.sync_bytes / period


def communication_report(
  step: Callable[..., Any], *args: Any, **kwargs: Any
) -> CommunicationReport:
  """Compiles ``step(*args, **kwargs)`` and accounts for its collectives.

  Reads the optimized HLO that XLA compiled, so the figures are what the
  program moves, after XLA has fused, combined or removed collectives. A
  collective inside a loop body is counted as part of the sync branch (the
  periodic transforms run their sync as a loop of zero or one trip); pass one
  training step, not a function that loops over steps.

  The bytes are per device and per collective result: an all-reduce of the
  params counts the params' bytes once, an all-gather counts the N copies it
  delivers. Under ``jax.vmap`` nothing is communicated (the workers are one
  program and a collective is a local reduction): measure a step mapped with
  ``jax.shard_map`` or ``jax.pmap``. How the backend implements them (a ring all-reduce sends about
  twice its payload) is left out. XLA's CPU backend widens bfloat16
  all-reduces to float32, so low-precision communication shows its savings
  only when compiled for an accelerator.

  Args:
    step: A function, jitted or not (``jax.jit(jax.shard_map(...))``, a
      ``jax.pmap``'ed function, ...). Functions that are not jitted are
      wrapped in ``jax.jit``.
    *args: Example arguments (arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: Example keyword arguments.

  Returns:
    A :class:`CommunicationReport`.

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
    >>> report.every_step_bytes, report.sync_bytes, report.bytes_per_step(8)
    (0, 4000, 500.0)
  """
  if not hasattr(step, "lower"):
    step = jax.jit(step)
  text = step.lower(*args, **kwargs).compile().as_text()
  if text is None:
    raise ValueError("XLA returned no HLO text for this step; cannot account for it.")
  bodies = _hlo.loop_computations(text)
  found = tuple(
    Collective(op.kind, op.nbytes, op.shape, op.computation, op.computation not in bodies)
    for op in _hlo.collectives(text)
  )
  return CommunicationReport(
    collectives=found,
    every_step_bytes=sum(c.nbytes for c in found if c.every_step),
    sync_bytes=sum(c.nbytes for c in found if not c.every_step),
  )
