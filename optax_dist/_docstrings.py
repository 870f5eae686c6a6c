"""Docstring paragraphs the periodic transforms share, written once.

A docstring line that holds only ``{{name}}`` (or ``{{name:value}}``) is
replaced, when the module defining it is imported, by the paragraph ``name``
below (with ``value`` in place of ``{0}``), indented as the placeholder is; a
line of several placeholders gets their paragraphs one after the other.
Sphinx and doctest read the filled docstring.
"""

import re
from typing import TypeVar

T = TypeVar("T")

PARTS = {
  "sync_flag": """\
``update`` takes the static extra argument ``sync``: ``None`` (the default)
decides inside the program from the call counter; ``False`` compiles the
local step alone, ``True`` the sync alone, an int ``f`` the sync of fragment
``f`` (see :func:`optax_dist.sync_schedule` for the flags of a hand-written
loop; :func:`optax_dist.data_parallel_step` passes them by itself).""",
  "sync_warmup": """\
``sync_warmup=K`` is post-local SGD (Lin et al., 2018): the first ``K``
calls are synchronous data parallelism (the gradients are averaged over the
workers before the inner step, so the workers stay identical and keep their
inner optimizer's moments, and the center follows the params); the syncs
then fall on calls ``K + p``, ``K + 2p``, ...""",
  "arg_sync_warmup": """\
sync_warmup: ``K``, synchronous calls before the local steps start
  (static int >= 0; ``None``, the default, is 0 and keeps
  ``optax.inject_hyperparams`` from taking it for a hyperparameter).""",
  "arg_fragments": """\
fragments: ``None`` (the whole model), an int ``F`` (the leaves in
  flatten order, cut into ``F`` contiguous groups of nearly equal bytes),
  a pytree of int labels in ``[0, F)`` that is a prefix of the params, or
  a callable ``params -> labels`` (static; under
  ``optax.inject_hyperparams`` list it in ``static_args``).""",
  "arg_comm": """\
comm_dtype: The format on the wire (static): ``None`` (the center's
  dtype), ``jnp.bfloat16``/``jnp.float16``, ``jnp.int8``,
  ``jnp.float8_e4m3fn``/``jnp.float8_e5m2``, or below 8 bits
  ``jnp.int4`` (values -7..7, one float32 absmax scale per 64 numbers,
  packed two to a byte) and ``jnp.int2`` (values -1, 0, 1, one scale per
  32 numbers, packed four to a byte). The integer and float8 formats
  travel through the quantized ring; each of its two roundings moves a
  number by at most half a step, ``absmax / (2 T)`` with ``T`` = 127, 7
  or 1 and ``absmax`` the largest magnitude of its block.
error_feedback: With a quantized ``comm_dtype`` (or ``topk_fraction``,
  where there is one), send again at the next sync what the compression
  dropped (static bool; one params-sized buffer).""",
  "arg_topk": """\
topk_fraction: Sparse top-k syncs (SparseLoCo), a static float in (0, 1)
  or ``None`` (dense, the default; under ``optax.inject_hyperparams`` list
  it and ``error_decay`` in ``static_args``): each worker cuts its contribution (plus
  its error-feedback buffer) into chunks of 256 numbers and sends, for
  each chunk, the ``ceil(topk_fraction * 256)`` largest magnitudes with
  their positions (one byte each), in float32 or in ``comm_dtype``
  (``jnp.int8``, ``jnp.int4`` or ``jnp.int2``, with one float32 absmax
  scale per chunk), all in one ``all_gather``; every worker adds the N
  contributions in worker order (the same bits on every worker). What was
  not sent stays in the error-feedback buffer: ``error_feedback=None``
  (the default) is on with ``topk_fraction`` and off without.
error_decay: ``beta`` of the error-feedback rule
  :math:`a = \\Delta + \\beta e`, send :math:`s = Q(\\mathrm{{top}}_k(a))`,
  :math:`e \\leftarrow a - s` (static float in (0, 1]; ``None`` is 0.95
  with ``topk_fraction``, SparseLoCo's, and 1 otherwise). The decayed
  buffer carries past pseudo-gradients forward much as an outer momentum
  does; SparseLoCo pairs it with a plain outer SGD step.""",
  "returns": """\
Returns:
  A ``GradientTransformationExtraArgs`` whose state is
  :class:`optax_dist.{0}`. Its ``update`` needs ``params``.""",
  "sync_field": """\
sync: The engine's counters and schedule (:class:`optax_dist.SyncState`):
  calls, syncs, skipped syncs, this worker's dropped syncs, and when the
  transform syncs.""",
  "nonfinite_sync": """\
A worker that goes bad does not stop the others (see "When a worker goes
bad" in the docs): at a sync each worker checks its own contribution, a
non-finite one enters as zero, and the count of finite workers travels in
the same collective, so the center moves from the finite workers alone.
The dropped worker gets a fresh inner state (``inner.init``) and lands on
the center with the others (its params, NaN plus anything being NaN, are
repaired by whoever applies the updates: :func:`optax_dist.restart_nonfinite`,
which :func:`optax_dist.data_parallel_step` calls on sync calls). Only a
sync with no finite worker leaves the center as it was; it counts in
:func:`optax_dist.skipped_syncs`, and each drop in this worker's
:func:`optax_dist.dropped_syncs`. A warm-up call averages the finite
workers' gradients only.""",
  "pending_field": """\
pending: With ``delay >= 2``, the sync reduced and not yet applied
  (:class:`optax_dist.Pending`: the reduced value shaped like the center,
  only the leaves of the fragment in flight meaningful, whether it moves
  the center, whether this worker took part); ``optax.EmptyState()``
  otherwise.""",
  "delay": """\
``delay=tau`` and ``blend=alpha`` overlap a sync with compute (Streaming
DiLoCo's overlapping communication; DESIGN 11.1). The sync scheduled on
call ``s`` is reduced on call ``s + 1``, from the params that call receives
(the params after ``s`` inner steps) and the state, never from its
gradients, so inside a jitted train step the all-reduce can run while the
forward and backward passes do (:func:`optax_dist.overlap_report` checks
that it does not depend on them). The outer step lands on call ``s + tau``,
after that call's inner step, and the workers land on
:math:`\alpha x + (1 - \alpha) c` (``blend=0``: on the center ``c``).
With ``tau >= 2`` the reduced value waits in the state (``pending``) for
``tau - 1`` calls. ``tau < H / F``: one fragment is in flight at a time. The
static flags (:class:`optax_dist.SyncSchedule`) name the call that reduces
fragment ``f`` by ``f`` (``True`` with one fragment; with ``tau = 1`` it
also applies) and, with ``tau >= 2``, the call that applies it by
``("apply", f)``. :func:`optax_dist.resize_workers` drops a pending
fragment (its apply call leaves the center as it was and counts as
skipped).""",
  "arg_delay": """\
delay: ``tau``, calls from a sync's scheduled call to its outer step
  (static int, ``0 <= tau < H / F``; ``None``, the default, is 0: the sync
  on its scheduled call, as without it).
blend: ``alpha`` in ``[0, 1)``: where the workers land when a delayed sync
  is applied, :math:`\alpha x + (1 - \alpha) c` (static float; needs
  ``delay >= 1``; ``None``, the default, is 0).""",
  "residual_field": """\
residual: With ``error_feedback=True``, what the rounding of a quantized
  sync dropped (from this worker's contribution, and from the summed
  chunk it owns), sent again at the next sync; ``optax.EmptyState()``
  otherwise.""",
}

_LINE = re.compile(r"^( *)((?:\{\{[\w:]+\}\} ?)+)$", re.M)
_PLACEHOLDER = re.compile(r"\{\{(\w+)(?::(\w+))?\}\}")


def fill(obj: T) -> T:
  """``obj`` with the placeholders of its docstring replaced by their paragraphs."""

  def expand(line: re.Match) -> str:
    indent, placeholders = line.groups()
    text = "\n".join(
      PARTS[name].format(value) for name, value in _PLACEHOLDER.findall(placeholders)
    )
    return "\n".join(indent + row if row else "" for row in text.splitlines())

  obj.__doc__ = _LINE.sub(expand, obj.__doc__ or "")
  return obj
