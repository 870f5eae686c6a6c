"""Checking, before training, that every worker has the same settings and params."""

import hashlib
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from optax_dist import _collectives
from optax_dist import _settings

_MAX_TEXT_BYTES = 8192  # Settings text gathered from each process (a digest covers the rest).
_MAX_REPORTED = 8  # Differences listed in the error message.


def params_lines(params: Any) -> list[str]:
  lines = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    lines.append(f"params{jax.tree_util.keystr(path)}: {jnp.shape(leaf)} {jnp.result_type(leaf)}")
  structure = jax.tree.structure(params)
  lines.append(f"params structure: {structure}")
  return lines


def to_row(lines: list[str]) -> np.ndarray:
  """Fixed-size int32 row: digest (8 words), length, then the UTF-8 text."""
  data = "\n".join(lines).encode()
  digest = np.frombuffer(hashlib.sha256(data).digest(), np.int32)
  text = np.zeros(_MAX_TEXT_BYTES, np.int32)
  head = np.frombuffer(data[:_MAX_TEXT_BYTES], np.uint8)
  text[: head.size] = head
  return np.concatenate([digest, np.array([len(data)], np.int32), text])


def from_row(row: np.ndarray) -> tuple[bytes, list[str]]:
  digest = row[:8].tobytes()
  length = min(int(row[8]), _MAX_TEXT_BYTES)
  text = row[9 : 9 + length].astype(np.uint8).tobytes().decode(errors="replace")
  return digest, text.split("\n")


def checksum(x: jax.Array) -> jax.Array:
  """Two position-dependent 32-bit sums of the bits of ``x`` (uint32[2])."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = x.dtype.itemsize
    if width == 8:
      halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
      bits = halves.reshape(-1)
    else:
      unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
      bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  bits = bits.reshape(-1)
  position = jnp.arange(bits.size, dtype=jnp.uint32)
  a = jnp.sum(bits * (position * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(2654435761))
  b = jnp.sum((bits ^ jnp.uint32(0x9E3779B9)) * (position + jnp.uint32(0x85EBCA6B)))
  return jnp.stack([a, b]).astype(jnp.uint32)


def _spec(leaf: Any, mesh: jax.sharding.Mesh) -> P:
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, NamedSharding) and sharding.mesh.shape_tuple == mesh.shape_tuple:
    return sharding.spec
  return P()


def worker_processes(mesh: jax.sharding.Mesh, axes: tuple) -> list[list[int]]:
  """For each worker index along ``axes`` (row-major), the processes of its devices."""
  names = list(mesh.axis_names)
  order = [names.index(a) for a in axes] + [i for i in range(len(names)) if names[i] not in axes]
  devices = np.transpose(mesh.devices, order)
  n = int(np.prod([mesh.shape[a] for a in axes]))
  devices = devices.reshape(n, -1)
  return [sorted({d.process_index for d in row}) for row in devices]


def check_agreement(
  settings: Any,
  params: optax.Params,
  *,
  mesh: jax.sharding.Mesh,
  axis_name: _collectives.AxisName,
) -> None:
  """Raises the same error on every process if the workers disagree.

  Workers that disagree on a static setting (a communication period, an
  ordering, a moving rate) run different programs: the periodic transforms
  then sync at different steps and wait for each other forever, or average
  params that were never meant to be averaged. Workers that start from
  different params drift apart silently. Neither is visible from one process,
  so this gathers, from every process and worker:

  * a text of the settings (for an optax transform, the values its functions
    close over, recursively: periods, rates, orderings, the inner optimizer's
    hyperparameters), with a digest of it, and the params' tree structure,
    shapes and dtypes;
  * two 32-bit checksums of the bits of every params leaf, per worker.

  Every process receives the same gathered table and, if anything differs,
  raises the same ``ValueError`` naming the settings, leaves, workers and
  processes that differ from worker 0's. An error raised on some processes
  only would leave the others waiting in their next collective.

  Call it once, outside ``jit``, on every process with the same mesh. It runs
  two small collectives (one ``process_allgather`` of the settings text, one
  jitted ``all_gather`` of the checksums) and compiles one small program.

  Args:
    settings: What must agree: an optax transformation (``tx``), a mapping
      of settings (e.g. your config), or a tuple of these.
    params: The params every worker starts from: global arrays on ``mesh``,
      either replicated along ``axis_name`` or stacked per worker with a
      leading worker axis sharded over it (as the periodic transforms hold
      them). Each worker's block must be bit-identical to worker 0's.
    mesh: The mesh of the training step.
    axis_name: The mesh axis (or tuple of axes) of the workers.

  Returns:
    None, when every worker agrees.

  Raises:
    ValueError: on every process, when settings or params differ; the message
      lists what differs. Also if ``axis_name`` is not an axis of ``mesh``, or
      if a transform in ``settings`` binds an axis other than ``axis_name``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((2,), ("w",), axis_types=(AxisType.Auto,),
    ...                      devices=jax.devices()[:2])
    >>> tx = optax_dist.elastic_average(optax.sgd(0.1), axis_name="w",
    ...                                 communication_period=4)
    >>> params = jax.device_put(jnp.zeros((2, 3)), NamedSharding(mesh, P("w")))
    >>> optax_dist.check_agreement(tx, params, mesh=mesh, axis_name="w")
    >>> params = params.at[1, 0].set(1.0)  # Worker 1 starts elsewhere.
    >>> optax_dist.check_agreement(tx, params, mesh=mesh, axis_name="w")
    Traceback (most recent call last):
      ...
    ValueError: check_agreement: the 2 workers on axis ('w',) disagree...
  """
  axes = _collectives.axis_tuple(axis_name)
  for a in axes:
    if a not in mesh.axis_names:
      raise ValueError(
        f"check_agreement: {a!r} is not an axis of the mesh (axes {mesh.axis_names})."
      )
  _settings.check_bound_axes(settings, axes, mesh, "check_agreement")
  workers_of = worker_processes(mesh, axes)
  decoded = gather_lines(_settings.lines(settings) + params_lines(params))
  problems = settings_differences(decoded, workers_of)
  if all(params_of(lines) == params_of(decoded[0][1]) for _, lines in decoded):
    problems += params_differences(params, mesh, axes, workers_of)
  if problems:
    raise ValueError(
      f"check_agreement: the {len(workers_of)} workers on axis {axes} disagree, so training "
      "would deadlock or silently diverge (every process raises this error):\n  "
      + "\n  ".join(problems)
      + "\nBuild the optimizer from the same settings on every process, and start "
      "every worker from the same params (`optax_dist.broadcast_params` copies "
      "worker 0's)."
    )


def gather_lines(lines: list[str]) -> list[tuple[bytes, list[str]]]:
  """Every process's lines (digest and text), in process order; one collective."""
  row = to_row(lines)
  rows = np.asarray(multihost_utils.process_allgather(row, tiled=False)).reshape(-1, row.size)
  return [from_row(r) for r in rows]


def params_of(lines: list[str]) -> list[str]:
  return [ln for ln in lines if ln.startswith("params")]


def _workers_on(process: int, workers_of: list[list[int]]) -> str:
  ws = [str(w) for w, ps in enumerate(workers_of) if process in ps]
  if not ws:
    return "no worker of the mesh"
  return f"workers {', '.join(ws)}" if len(ws) > 1 else f"worker {ws[0]}"


def settings_differences(
  decoded: list[tuple[bytes, list[str]]], workers_of: list[list[int]]
) -> list[str]:
  """One message per process whose settings text differs from process 0's."""
  digest0, lines0 = decoded[0]
  ref = dict(_split(ln) for ln in lines0)
  problems = []
  for process, (digest, lines) in enumerate(decoded[1:], start=1):
    if digest == digest0:
      continue
    own = dict(_split(ln) for ln in lines)
    diffs = [
      f"{key} = {own.get(key, '<absent>')} (process 0: {ref.get(key, '<absent>')})"
      for key in sorted(set(ref) | set(own))
      if ref.get(key) != own.get(key)
    ]
    if not diffs:
      diffs = ["the settings differ beyond the part compared in text"]
    shown = diffs[:_MAX_REPORTED] + (
      [f"... and {len(diffs) - _MAX_REPORTED} more"] if len(diffs) > _MAX_REPORTED else []
    )
    problems.append(
      f"process {process} ({_workers_on(process, workers_of)}) differs from process 0:\n    "
      + "\n    ".join(shown)
    )
  return problems


def params_differences(
  params: Any, mesh: jax.sharding.Mesh, axes: tuple, workers_of: list[list[int]]
) -> list[str]:
  """One message per params leaf whose bits differ from worker 0's on some worker."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  if not leaves:
    return []
  paths = [jax.tree_util.keystr(path) for path, _ in leaves]
  values = [leaf for _, leaf in leaves]
  specs = tuple(_spec(v, mesh) for v in values)

  def gather(*blocks):
    sums = jnp.stack([checksum(b) for b in blocks])  # (leaves, 2)
    return _collectives.all_gather(sums, axes)  # (workers, leaves, 2)

  gathered = jax.jit(
    jax.shard_map(gather, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)
  )(*values)
  table = np.asarray(gathered.addressable_data(0))
  problems = []
  for i, path in enumerate(paths):
    differ = [w for w in range(table.shape[0]) if not np.array_equal(table[w, i], table[0, i])]
    if differ:
      procs = sorted({p for w in differ for p in workers_of[w]})
      problems.append(
        f"params{path} on workers {', '.join(map(str, differ))} "
        f"(process {', '.join(map(str, procs))}) differ from worker 0's"
      )
  return problems


def _split(line: str) -> tuple[str, str]:
  key, _, value = line.partition(" = ")
  if not _:
    key, _, value = line.partition(": ")
  return key, value
