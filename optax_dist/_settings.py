"""The settings of an optimizer (or a config) as ``key = value`` lines of text.

Two processes that build their optimizer from different settings run
different programs; :func:`optax_dist.check_agreement` compares these lines
across processes. Settings are found where optax and optax_dist keep them: in
the variables a transformation's ``update`` and ``init`` close over, in the
arguments of ``functools.partial``, in the attributes of objects (schedules,
``optax.MultiSteps``), recursively.
"""

from collections.abc import Mapping
import functools
import hashlib
import numbers
import re
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

_MAX_DEPTH = 12


def _value_text(value: Any) -> str | None:
  """A stable text for a setting's value, or None for values that are not settings."""
  if value is None or isinstance(value, (bool, str, bytes, numbers.Number)):
    return repr(value)
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      return f"array{value.shape}:{value.dtype}"
    a = np.asarray(value)
    if a.size <= 16:
      return f"array({a.tolist()!r}, {a.dtype})"
    digest = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
    return f"array{a.shape}:{a.dtype}:{digest}"
  if isinstance(value, (jnp.dtype, np.dtype, type)):
    return repr(value)
  return None


def lines(settings: Any) -> list[str]:
  """``key = value`` lines describing ``settings``.

  A mapping or sequence is walked by key; a function (an optax transform's
  ``update``, a schedule) by the names and values of the variables it closes
  over, recursively, which is where optax and optax_dist transforms keep their
  settings (periods, rates, orderings, inner transforms); ``functools.partial``
  by its function and arguments; a bound method by its function and its
  object; any other object by its attributes.
  """
  lines: list[str] = []
  seen: set[int] = set()

  def walk(prefix: str, value: Any, depth: int) -> None:
    text = _value_text(value)
    if text is not None:
      lines.append(f"{prefix} = {text}")
      return
    if depth > _MAX_DEPTH or id(value) in seen:
      return
    seen.add(id(value))
    if isinstance(value, optax.GradientTransformation):
      # Settings live in what update closes over; some (a periodic
      # transform's warm-up and fragments) only in init's.
      walk(prefix, value.update, depth + 1)
      walk(f"{prefix}.init", value.init, depth + 1)
    elif isinstance(value, Mapping):
      for key in sorted(value, key=repr):
        walk(f"{prefix}[{key!r}]", value[key], depth + 1)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
      for field, item in zip(value._fields, value, strict=True):
        walk(f"{prefix}.{field}", item, depth + 1)
    elif isinstance(value, (tuple, list)):
      for i, item in enumerate(value):
        walk(f"{prefix}[{i}]", item, depth + 1)
    elif isinstance(value, functools.partial):
      walk(prefix, value.func, depth + 1)
      walk(f"{prefix}.args", value.args, depth + 1)
      walk(f"{prefix}.keywords", value.keywords, depth + 1)
    elif isinstance(value, types.MethodType):
      # A bound method (e.g. optax.MultiSteps(...).gradient_transformation()'s
      # update): the function, and the settings its object holds.
      walk(prefix, value.__func__, depth + 1)
      walk(f"{prefix}.self", value.__self__, depth + 1)
    elif isinstance(value, types.FunctionType):
      name = value.__qualname__.replace(".<locals>", "")
      lines.append(f"{prefix} = <function {value.__module__}.{name}>")
      names = value.__code__.co_freevars
      for var, cell in zip(names, value.__closure__ or (), strict=True):
        try:
          contents = cell.cell_contents
        except ValueError:  # An empty cell.
          continue
        walk(f"{prefix}.{var}", contents, depth + 1)
    elif not isinstance(value, (types.ModuleType, type)) and hasattr(value, "__dict__"):
      # An object holding settings in its attributes (a schedule object,
      # optax.MultiSteps, a wrapped schedule of inject_hyperparams).
      lines.append(f"{prefix} = <{type(value).__module__}.{type(value).__qualname__}>")
      for key in sorted(vars(value)):
        walk(f"{prefix}.{key}", vars(value)[key], depth + 1)

  walk("settings", settings, 0)
  return lines


_BOUND_AXIS = re.compile(r"\.axes\[\d+\] = ('.*'|\".*\")$")


def bound_axes(optimizer: Any) -> list[str]:
  """The axis names (as text) that the optimizer's transforms bind, in walk order."""
  found = []
  for line in lines(optimizer):
    match = _BOUND_AXIS.search(line)
    if match and match.group(1) not in found:
      found.append(match.group(1))
  return found


def check_bound_axes(optimizer: Any, axes: tuple, mesh: Any, where: str) -> None:
  """Every axis a transform of ``optimizer`` binds must be one of the workers' ``axes``.

  An optimizer bound to another axis runs its local calls and fails only at
  its first sync, possibly hundreds of calls later; this finds it when the
  step is built.
  """
  allowed = {repr(a) for a in axes}
  wrong = [a for a in bound_axes(optimizer) if a not in allowed]
  if wrong:
    raise ValueError(
      f"{where}: the optimizer binds the axis name {', '.join(wrong)}, but the workers are "
      f"on {axes} (mesh axes {tuple(mesh.axis_names)}), so it would fail only at its first "
      f"sync. Build the optimizer with `axis_name={axes[0]!r}`"
      + (" (or a tuple of these axes)" if len(axes) > 1 else "")
      + f", or give {where} the optimizer's axis as `axis_name`."
    )
