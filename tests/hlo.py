"""HLO helpers the tests use beside the package's reader (``optax_dist._hlo``)."""

import re

from optax_dist import _hlo

collectives = _hlo.collectives
nbytes = _hlo.nbytes
ops = _hlo.ops
replica_groups = _hlo.replica_groups


def while_bodies(hlo: str) -> set[str]:
  return set(re.findall(r"while\(.*?body=%([\w.\-]+)", hlo))


def copies_of_at_least(hlo: str, min_bytes: int) -> list[_hlo.Op]:
  return [op for op in ops(hlo) if op.kind == "copy" and op.nbytes >= min_bytes]


def entry(hlo: str) -> str:
  """The entry computation's text."""
  return hlo[hlo.index("\nENTRY") :]
