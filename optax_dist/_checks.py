"""What the periodic engine checks of a call's inputs, with errors that say what to do.

Floating params, gradients shaped like the params, and an inner optimizer
state made by this optimizer's own inner ``init``: each is checked when the
step is traced (no cost in the program).
"""

from typing import Any

import jax
import jax.numpy as jnp


def check_floating(params: Any, name: str) -> None:
  """Periodic transforms average and move params: every leaf must be floating."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      where = jax.tree_util.keystr(path) or "params"
      raise TypeError(
        f"{name} needs floating params, but the leaf at {where} has dtype {dtype}. Keep "
        "integer and bool leaves out of the optimizer (e.g. with `optax.masked`, or "
        "`optax.multi_transform` with `optax.set_to_zero()` for them), or cast them to a "
        "floating dtype."
      )


def check_inner_state(inner_state: Any, expected: Any, name: str) -> None:
  """A state's inner optimizer state must be the one this optimizer's inner ``init`` makes."""
  if jax.tree.structure(inner_state) != jax.tree.structure(expected):  # type: ignore[operator]
    raise ValueError(
      f"{name}: this state's inner optimizer state is {_state_name(inner_state)}, but this "
      f"optimizer's inner optimizer makes {_state_name(expected)}: the state was made by "
      "another optimizer. Make the state with this optimizer's `init` (or restore a "
      "checkpoint into a state made by that `init`), or build the optimizer with the inner "
      "optimizer the state was made with."
    )


def _state_name(state: Any) -> str:
  """A state's type, or its tuple of types (an ``optax.chain``'s)."""
  if isinstance(state, tuple) and not hasattr(state, "_fields"):
    return "(" + ", ".join(_state_name(s) for s in state) + ")"
  return type(state).__name__


def check_structures(grads: Any, params: Any, name: str) -> None:
  """The gradients and the params must be trees of the same structure."""
  grads_def: Any = jax.tree.structure(grads)
  params_def: Any = jax.tree.structure(params)
  if grads_def != params_def:
    raise ValueError(
      f"{name}: the gradients (`updates`) and `params` must have the same tree structure, "
      f"but the gradients are {grads_def} and the params {params_def}. Pass the gradients "
      "of the params you pass as `params` (e.g. `jax.grad(loss)(params)`), and under "
      "`optax.masked` or `optax.multi_transform` give both the same mask."
    )
