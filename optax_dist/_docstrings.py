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
  dtype), ``jnp.bfloat16``/``jnp.float16``, ``jnp.int8`` or
  ``jnp.float8_e4m3fn``/``jnp.float8_e5m2``.
error_feedback: With an 8-bit ``comm_dtype``, send again at the next sync
  what the rounding dropped (static bool; one params-sized buffer).""",
  "returns": """\
Returns:
  A ``GradientTransformationExtraArgs`` whose state is
  :class:`optax_dist.{0}`. Its ``update`` needs ``params``.""",
  "sync_field": """\
sync: The engine's counters and schedule (:class:`optax_dist.SyncState`):
  calls, syncs, skipped syncs, and when the transform syncs.""",
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
