"""Cutting the params into fragments that sync one at a time (Streaming DiLoCo).

A ``fragments`` argument is one of

* ``None`` or ``1``: the whole model, one fragment;
* an int ``F``: the leaves in flatten order, cut into ``F`` contiguous groups
  of nearly equal bytes;
* a pytree of int labels in ``[0, F)``, a prefix of the params (as
  ``optax.multi_transform`` takes them), e.g. one label per layer;
* a callable ``params -> labels``.

Every fragment must hold at least one leaf. The labels depend on the params'
structure and shapes only, so they are computed again, statically, at every
trace.
"""

import numbers
from typing import Any

import jax
import numpy as np
import optax


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check(fragments: Any) -> int | None:
  """Validates a ``fragments`` argument; its number of fragments, or None for a callable."""
  if fragments is None:
    return 1
  if _is_int(fragments):
    if fragments < 1:
      raise ValueError(f"`fragments` must be >= 1, got {fragments}.")
    return int(fragments)
  if callable(fragments):
    return None
  return _count(_check_labels(fragments))


def _check_labels(labels: Any) -> list[int]:
  values = []
  for path, label in jax.tree_util.tree_leaves_with_path(labels):
    if not _is_int(label) or label < 0:
      where = jax.tree_util.keystr(path) or "fragments"
      raise ValueError(
        f"`fragments` labels must be Python ints >= 0 (fragment indices); the label at "
        f"{where} is {label!r}."
      )
    values.append(int(label))
  if not values:
    raise ValueError("`fragments` holds no labels: give one int label per leaf (or subtree).")
  return values


def _count(values: list[int]) -> int:
  num = max(values) + 1
  missing = sorted(set(range(num)) - set(values))
  if missing:
    raise ValueError(
      f"`fragments` labels must use every fragment in [0, {num}); no leaf is labelled "
      f"{missing}. Number the fragments 0, 1, ..., F - 1."
    )
  return num


def _nbytes(leaf: Any) -> int:
  return int(np.prod(np.shape(leaf), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def labels(fragments: Any, params: Any) -> tuple[Any, int]:
  """A tree of int labels shaped like ``params``, and the number of fragments."""
  if fragments is None or (_is_int(fragments) and fragments == 1):
    return jax.tree.map(lambda _: 0, params), 1
  if _is_int(fragments):
    return _contiguous(params, fragments), fragments
  given = fragments(params) if callable(fragments) else fragments
  values = _check_labels(given)
  try:
    full = jax.tree.map(lambda label, sub: jax.tree.map(lambda _: label, sub), given, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
      "`fragments` labels must be a prefix of the params tree (one int per leaf, or per "
      f"subtree); they do not match it: {e}"
    ) from e
  num = _count(values)
  used = set(jax.tree.leaves(full))
  if used != set(range(num)):
    raise ValueError(
      f"`fragments` labels {sorted(set(values))} label only the subtrees "
      f"{sorted(used)} that hold params; every fragment in [0, {num}) needs a leaf."
    )
  return full, num


def _contiguous(params: Any, num: int) -> Any:
  """Leaves in flatten order, cut into ``num`` contiguous groups of nearly equal bytes."""
  leaves, treedef = jax.tree.flatten(params)
  if len(leaves) < num:
    raise ValueError(
      f"`fragments={num}` needs at least {num} leaves to cut the params into, but they have "
      f"{len(leaves)}. Use fewer fragments, or give labels that split leaves your way."
    )
  sizes = [_nbytes(leaf) for leaf in leaves]
  before = np.concatenate([[0], np.cumsum(sizes)])  # before[j]: bytes of leaves [0, j).
  total = before[-1]
  starts = [0]
  for k in range(1, num):
    # Fragment k starts at the leaf boundary nearest to k / num of the bytes,
    # leaving at least one leaf to every fragment.
    lo, hi = starts[-1] + 1, len(leaves) - (num - k)
    candidates = range(lo, hi + 1)
    starts.append(min(candidates, key=lambda j: abs(before[j] * num - k * total)))
  label_of = np.searchsorted(starts, np.arange(len(leaves)), side="right") - 1
  return jax.tree.unflatten(treedef, [int(v) for v in label_of])


def masks(full_labels: Any, num: int) -> list[Any] | None:
  """One boolean mask tree per fragment, or None for a single fragment."""
  if num == 1:
    return None
  return [jax.tree.map(lambda label, f=f: label == f, full_labels) for f in range(num)]


def view(tree: Any, mask: Any) -> Any:
  """``tree`` with the leaves outside ``mask`` replaced by ``optax.MaskedNode``."""
  return jax.tree.map(lambda m, x: x if m else optax.MaskedNode(), mask, tree)


def masks_of(fragments: Any, params: Any) -> list[Any] | None:
  """One boolean mask tree per fragment of ``params``, or None for one fragment."""
  return masks(*labels(fragments, params))


class Views:
  """One fragment's part of params-shaped trees and of the synced fields."""

  def __init__(self, per_fragment: tuple[str, ...], masks: list[Any] | None):
    self.per_fragment = per_fragment
    self.masks = masks

  def tree(self, tree: Any, f: int) -> Any:
    if self.masks is None or not jax.tree.leaves(tree):
      return tree
    return view(tree, self.masks[f])

  def merge_tree(self, tree: Any, part: Any) -> Any:
    if self.masks is None or not jax.tree.leaves(tree):
      return part
    return jax.tree.map(
      lambda old, new: old if isinstance(new, optax.MaskedNode) else new,
      tree,
      part,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )

  def fields(self, fields: Any, f: int) -> Any:
    if self.masks is None:
      return fields
    return fields._replace(
      **{
        n: v[f] if n in self.per_fragment else self.tree(v, f) for n, v in fields._asdict().items()
      }
    )

  def merge_fields(self, fields: Any, part: Any, f: int) -> Any:
    if self.masks is None:
      return part
    out = {}
    for name, value in fields._asdict().items():
      new = getattr(part, name)
      if name in self.per_fragment:
        out[name] = (*value[:f], new, *value[f + 1 :])
      else:
        out[name] = self.merge_tree(value, new)
    return fields._replace(**out)
