"""Reading collectives out of compiled HLO text, for :func:`optax_dist.communication_report`.

Every instruction is read with the computation it sits in, the bytes of its
result, and for a collective the size of its replica groups (the workers it
spans). Loops are found from the entry computation: each ``while`` there,
with every computation it reaches, is one loop (a periodic transform's sync
branch, one per fragment).
"""

import itertools
import math
import re
from typing import NamedTuple

_DTYPE_BYTES: dict[str, float] = {
  # Sub-byte types, should XLA move them natively (our packed formats travel as u8).
  "s2": 0.25,
  "u2": 0.25,
  "s4": 0.5,
  "u4": 0.5,
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
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
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z-]+)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
# Newer XLA names the groups by mesh axes: ``replica_groups=mesh['r'=2,'g'=4] {'g'}``.
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'([^']+)'=(\d+)")
_PARTITIONS = re.compile(r"num_partitions=(\d+)")
_CALLEE = re.compile(
  r"(?:calls|body|condition|to_apply|branch_computations|\w+_computation)=\{?([^,}\s]+(?:, %[^,}\s]+)*)"
)


class Op(NamedTuple):
  """One instruction: where it sits, what it is, the bytes of its result."""

  computation: str
  kind: str
  nbytes: int
  shape: str
  name: str
  group: int  # Devices in each replica group (collectives); 0 otherwise.


def nbytes(shape: str) -> int:
  """Bytes of an HLO result type, e.g. ``(f32[512]{0}, bf16[2,3]{1,0})``."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = 1
    for d in filter(None, dims.split(",")):
      size *= int(d)
    total += math.ceil(size * _DTYPE_BYTES[dtype])  # A buffer is whole bytes.
  return total


def replica_groups(line: str) -> list[list[int]] | None:
  """The device groups of a collective's line, as listed or by mesh axes (None: not given).

  ``replica_groups={{0,4},{1,5}}`` lists them. ``replica_groups=mesh['r'=2,'g'=4]
  {'r'}`` names the mesh (devices numbered in row-major order over its axes)
  and the axes each group spans: one group per index of the other axes.
  """
  listed = _GROUPS.search(line)
  if listed:
    groups = listed.group(1)[1:-1].split("},{")
    return [[int(d) for d in g.split(",")] for g in groups if g]
  by_mesh = _MESH_GROUPS.search(line)
  if by_mesh:
    sizes = {name: int(n) for name, n in _MESH_AXIS.findall(by_mesh.group(1))}
    spanned = re.findall(r"'([^']+)'", by_mesh.group(2))
    names = list(sizes)
    shape = [sizes[n] for n in names]
    others = [n for n in names if n not in spanned]
    out = []
    for fixed in itertools.product(*(range(sizes[n]) for n in others)):
      index = dict(zip(others, fixed, strict=True))
      group = []
      for varied in itertools.product(*(range(sizes[n]) for n in spanned)):
        index.update(zip(spanned, varied, strict=True))
        group.append(_flat_index([index[n] for n in names], shape))
      out.append(sorted(group))
    return out
  return None


def _flat_index(index: list[int], shape: list[int]) -> int:
  flat = 0
  for i, size in zip(index, shape, strict=True):
    flat = flat * size + i
  return flat


def _group(line: str, default: int) -> int:
  groups = replica_groups(line)
  if groups:
    return len(groups[0])
  iota = _IOTA_GROUPS.search(line)
  if iota:
    return int(iota.group(2))
  return default


def ops(hlo: str) -> list[Op]:
  """Every instruction, with the computation it sits in."""
  partitions = _PARTITIONS.search(hlo.split("\n", 1)[0])
  default = int(partitions.group(1)) if partitions else 1
  out: list[Op] = []
  current = None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(1)
      continue
    instr = _INSTR.match(line)
    if instr and current:
      name, shape, kind = instr.groups()
      group = _group(line, default) if kind in COLLECTIVES else 0
      out.append(Op(current, kind, nbytes(shape), shape, name, group))
  return out


def collectives(hlo: str) -> list[Op]:
  return [op for op in ops(hlo) if op.kind in COLLECTIVES]


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


def loops(hlo: str) -> dict[str, str]:
  """Computation -> the loop it runs in (the name of the outermost ``while`` reaching it)."""
  graph = _call_graph(hlo)
  entry = hlo[hlo.index("\nENTRY") :] if "\nENTRY" in hlo else ""
  owner: dict[str, str] = {}
  for line in entry.splitlines():
    instr = _INSTR.match(line)
    if not instr or instr.group(3) != "while":
      continue
    pending = [n.strip().lstrip("%") for group in _CALLEE.findall(line) for n in group.split(",")]
    while pending:
      name = pending.pop()
      if name not in owner:
        owner[name] = instr.group(1)
        pending.extend(graph.get(name, ()))
  return owner
