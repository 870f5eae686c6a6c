"""Reading collectives and copies out of compiled HLO text.

Used by the tests and benchmarks to check, from what XLA compiled, where the
collectives sit (only in a sync loop's body?), how many bytes they move, and
which buffers are copied.
"""

import re
from typing import NamedTuple

_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) ([a-z-]+)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


class Op(NamedTuple):
  computation: str
  kind: str
  nbytes: int
  shape: str


def nbytes(shape: str) -> int:
  """Bytes of an HLO result type, e.g. ``(f32[512]{0}, f32[2,3]{1,0})``."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = 1
    for d in filter(None, dims.split(",")):
      size *= int(d)
    total += size * _DTYPE_BYTES[dtype]
  return total


def ops(hlo: str) -> list[Op]:
  """Every instruction, with the computation it sits in."""
  out: list[Op] = []
  current = None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      continue
    instr = _INSTR.match(line)
    if instr and current:
      out.append(Op(current, instr.group(2), nbytes(instr.group(1)), instr.group(1)))
  return out


def while_bodies(hlo: str) -> set[str]:
  return set(re.findall(r"while\(.*?body=%([\w.\-]+)", hlo))


def collectives(hlo: str) -> list[Op]:
  return [op for op in ops(hlo) if op.kind in _COLLECTIVES]


def copies_of_at_least(hlo: str, min_bytes: int) -> list[Op]:
  return [op for op in ops(hlo) if op.kind == "copy" and op.nbytes >= min_bytes]


_CALLEE = re.compile(
  r"(?:calls|body|condition|to_apply|branch_computations|\w+_computation)=\{?([^,}\s]+(?:, %[^,}\s]+)*)"
)


def _call_graph(hlo: str) -> dict[str, set[str]]:
  """Computation -> the computations its instructions call."""
  graph: dict[str, set[str]] = {}
  current = None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      graph.setdefault(current, set())
      continue
    if current is None:
      continue
    for group in _CALLEE.findall(line):
      graph[current].update(name.strip().lstrip("%") for name in group.split(","))
  return graph


def loop_computations(hlo: str) -> set[str]:
  """Computations that run inside a while loop (bodies, conditions, and what they call)."""
  graph = _call_graph(hlo)
  pending = [
    name for pair in re.findall(r"condition=%([\w.\-]+), body=%([\w.\-]+)", hlo) for name in pair
  ]
  seen: set[str] = set()
  while pending:
    name = pending.pop()
    if name not in seen:
      seen.add(name)
      pending.extend(graph.get(name, ()))
  return seen
