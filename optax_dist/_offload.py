"""Host offload: the fields a periodic transform reads only at a sync, kept in host memory.

With ``host_offload=True`` the fields that the state's declaration marks
``offloaded`` (the center, and the outer optimizer's state, AGN's center
optimizer state or the error-feedback residual) live in the host's pinned
memory between syncs; the sync brings them to the device and puts the new
values back. A local step passes them through untouched.
"""

from typing import Any

import jax

HOST_MEMORY = "pinned_host"


def check_host_memory() -> None:
  """A clear error where the backend has no pinned host memory to offload to."""
  device = jax.devices()[0]
  kinds = sorted(m.kind for m in device.addressable_memories())
  if HOST_MEMORY not in kinds:
    raise ValueError(
      f"`host_offload=True` keeps state in {HOST_MEMORY!r} memory, which this backend "
      f"({device.platform}) does not offer (its memories: {kinds}). Pass host_offload=False."
    )


def _put(tree: Any, space: Any) -> Any:
  def put(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.device_put(x, space)

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """``tree`` in the host's pinned memory (inside or outside a jitted function)."""
  return _put(tree, jax.memory.Space.Host)


def to_device(tree: Any) -> Any:
  """``tree`` in device memory."""
  return _put(tree, jax.memory.Space.Device)
