"""Compiling for a multi-slice TPU topology on this machine, and reading the schedule.

JAX compiles for a TPU topology without a TPU (deviceless ahead-of-time
compilation): ``libtpu``, installed by the ``tpu`` extra, holds the compiler,
and :func:`topology_mesh` gives a mesh of its devices, the slices on the
first axis. :func:`compile_for_tpu` lowers a jitted function for that mesh and
returns the compiled program, whose ``as_text()`` is the scheduled HLO: its
entry computation lists the instructions in the order the chip runs them.

:func:`transfers` reads from that text every collective of the entry
computation, with the link it takes and the matrix multiplies it spans. A
transfer between slices is a ``send``/``recv`` pair that the runtime's
data-center network carries (``_xla_megascale_*`` attributes); an
asynchronous collective is a ``*-start``/``*-done`` pair; any other
collective blocks where it sits. A transfer is *hidden* when it starts
before the step's first matrix multiply and completes after its last: the
whole forward and backward pass runs while it is in flight.
:func:`transfers_hidden` says whether every transfer between slices is.

JAX stays on the CPU backend (``JAX_PLATFORMS=cpu``): the TPU compiler is
used for these programs only, and nothing runs on a TPU.
"""

from collections.abc import Callable
import os
import re
from typing import Any
from typing import NamedTuple

import hlo

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z-]+)\((.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
_FIRST_ARRAY = re.compile(r"\b([a-z]+\d*[a-z\d]*\[[\d,]*\])")
# Kernels that hold a matrix multiply (XLA:TPU lowers dots to convolutions).
_MATMUL = re.compile(r"= [^=]*? (?:convolution|dot)\(")
_ASYNC_DONE = {"send": "send-done", "recv": "recv-done"}
TPU_EXTRA_MISSING = (
  "the TPU compiler (libtpu) is not installed: install the package with its `tpu` extra, "
  '`pip install -e ".[test,tpu]"` (README.md, "Run the tests")'
)


class Transfer(NamedTuple):
  """One collective of the entry computation, where it starts and completes.

  Attributes:
    name: The instruction that starts it.
    kind: ``send``, ``recv``, ``all-reduce-start``, or a blocking collective
      (``all-reduce``, ``all-gather``, ...).
    nbytes: Bytes of the buffers it moves (of its result; a ``send`` or
      ``recv``: of its buffer).
    across_slices: True for a transfer between slices (data-center network),
      False within a slice (the chips' interconnect).
    start: Its start's position in the entry schedule.
    done: Its completion's position (``start`` for a blocking collective).
    matmuls_before_start: Matrix-multiply kernels scheduled before it starts.
    matmuls_after_done: Matrix-multiply kernels scheduled after it completes.
    matmuls: Matrix-multiply kernels in the whole entry schedule.
  """

  name: str
  kind: str
  nbytes: int
  across_slices: bool
  start: int
  done: int
  matmuls_before_start: int
  matmuls_after_done: int
  matmuls: int

  @property
  def hidden(self) -> bool:
    """Starts before the first matrix multiply and completes after the last."""
    return self.matmuls > 0 and self.matmuls_before_start == 0 and self.matmuls_after_done == 0

  @property
  def link(self) -> str:
    return "across slices" if self.across_slices else "within a slice"


def _computations(text: str) -> dict[str, str]:
  """Computation name -> its body's text."""
  out: dict[str, str] = {}
  current, lines = None, []
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if header:
      current, lines = header.group(1), []
    elif line.startswith("}") and current is not None:
      out[current] = "\n".join(lines)
      current = None
    elif current is not None:
      lines.append(line)
  return out


def _with_matmuls(text: str) -> set[str]:
  """The computations that run a matrix multiply, themselves or through what they call."""
  bodies = _computations(text)
  graph = hlo._hlo._call_graph(text)
  direct = {name for name, body in bodies.items() if _MATMUL.search(body)}
  found = set(direct)
  changed = True
  while changed:
    changed = False
    for name, callees in graph.items():
      if name not in found and callees & found:
        found.add(name)
        changed = True
  return found


def entry_schedule(text: str) -> list[tuple[str, str, str]]:
  """The entry computation's instructions in schedule order: ``(name, kind, line)``."""
  entry = text[text.index("\nENTRY") :]
  entry = entry[: entry.index("\n}")]
  out = []
  for line in entry.splitlines()[1:]:
    m = _INSTR.match(line)
    if m:
      out.append((m.group(1), m.group(3), line))
  return out


def matmul_positions(text: str) -> list[int]:
  """Positions in the entry schedule of the instructions that run a matrix multiply.

  A fusion whose kernel holds a convolution or dot, or a loop, call or branch
  that reaches one (a scanned model's layers are one ``while``).
  """
  with_matmuls = _with_matmuls(text)
  positions = []
  for i, (_, kind, line) in enumerate(entry_schedule(text)):
    if kind in ("convolution", "dot"):
      positions.append(i)
      continue
    callees = {
      n.strip().lstrip("%") for group in hlo._hlo._CALLEE.findall(line) for n in group.split(",")
    }
    if callees & with_matmuls:
      positions.append(i)
  return positions


def _across(line: str, per_slice: int) -> bool:
  if "_xla_megascale" in line:
    return True
  groups = hlo.replica_groups(line)
  if groups is None:
    return False
  return any(len({d // per_slice for d in g}) > 1 for g in groups)


def transfers(text: str, per_slice: int) -> list[Transfer]:
  """Every collective of the entry computation, in schedule order.

  ``per_slice`` is the number of devices in a slice: a collective whose
  replica groups mix devices ``d`` of different ``d // per_slice`` crosses
  slices (the mesh numbers its devices slice by slice).
  """
  schedule = entry_schedule(text)
  matmuls = matmul_positions(text)
  done_at: dict[str, int] = {}
  for i, (_, kind, line) in enumerate(schedule):
    if kind.endswith("-done"):
      operand = _OPERAND.search(line.split(f" {kind}(", 1)[1])
      if operand:
        done_at[operand.group(1)] = i
  out = []
  for i, (name, kind, line) in enumerate(schedule):
    if kind in _ASYNC_DONE or kind.endswith("-start"):
      base = kind.removesuffix("-start")
      if kind.endswith("-start") and base not in hlo._hlo.COLLECTIVES:
        continue  # copy-start (memory), async-start of a computation, ...
      if kind in _ASYNC_DONE and "is_host_transfer=true" in line and "_xla_megascale" not in line:
        continue  # A transfer to the host, not between devices.
      done = done_at.get(name, i)
    elif kind in hlo._hlo.COLLECTIVES:
      done = i
    else:
      continue
    result = _INSTR.match(line).group(2)
    if kind in _ASYNC_DONE:  # (buffer, u32[] context, token[])
      first = _FIRST_ARRAY.search(result)
      nbytes = hlo.nbytes(first.group(1)) if first else 0
    else:
      nbytes = hlo.nbytes(result)
    out.append(
      Transfer(
        name=name,
        kind=kind,
        nbytes=nbytes,
        across_slices=_across(line, per_slice),
        start=i,
        done=done,
        matmuls_before_start=sum(p < i for p in matmuls),
        matmuls_after_done=sum(p > done for p in matmuls),
        matmuls=len(matmuls),
      )
    )
  return out


def transfers_hidden(text: str, per_slice: int) -> bool:
  """Whether every transfer between slices starts before the first matmul and completes after the last.

  False when the program has no transfer between slices (nothing to hide is
  not evidence of hiding).
  """
  across = [t for t in transfers(text, per_slice) if t.across_slices]
  return bool(across) and all(t.hidden for t in across)


def topology_mesh(topology: str = "v5e:2x2", num_slices: int = 2, axes=("slices", "chips")):
  """A mesh of a TPU topology's devices: ``num_slices`` rows, a slice's chips in each.

  Raises:
    RuntimeError: if the TPU compiler is not installed.
  """
  # One process at a time may hold libtpu's lockfile; compiling needs no
  # device, so every test process may load it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  from jax.sharding import AxisType
  from jax.sharding import Mesh
  import numpy as np

  try:
    desc = topologies.get_topology_desc(topology, "tpu", num_slices=num_slices)
  except Exception as e:  # jax raises RuntimeError or ValueError by version.
    if "tpu" in str(e).lower() or "plugin" in str(e).lower():
      raise RuntimeError(TPU_EXTRA_MISSING) from e
    raise
  devices = sorted(desc.devices, key=lambda d: (d.slice_index, d.id))
  grid = np.array(devices).reshape(num_slices, -1)
  assert all(len({d.slice_index for d in row}) == 1 for row in grid)
  return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))


def compile_for_tpu(fn: Callable[..., Any], *args: Any):
  """``fn`` (jitted) lowered for TPU with ``args`` (arrays or ShapeDtypeStructs) and compiled."""
  return fn.trace(*args).lower(lowering_platforms=("tpu",)).compile()
