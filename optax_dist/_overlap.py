"""Which collectives of a step could run while its compute does: a jaxpr dependence walk."""

from collections.abc import Callable
from collections.abc import Sequence
import math
from typing import Any
from typing import NamedTuple

import jax
from jax.extend import core as jex_core

# Primitives that communicate between devices (``pcast``/``pvary`` only retype).
_COLLECTIVES = frozenset(
  {
    "psum",
    "psum2",
    "psum_invariant",
    "pmax",
    "pmin",
    "all_gather",
    "all_gather_invariant",
    "all_to_all",
    "ppermute",
    "reduce_scatter",
    "psum_scatter",
  }
)


class Dependence(NamedTuple):
  """One collective of a step and whether it waits for the batch.

  Attributes:
    primitive: The JAX primitive (``psum``, ``all_gather``, ...).
    axes: The mesh axes it spans.
    nbytes: Bytes of its operands.
    independent: True when nothing it reads (nor the loop or branch it
      runs in) is computed from the batch: it may run while the forward and
      backward passes do (overlappable).
  """

  primitive: str
  axes: tuple
  nbytes: int
  independent: bool


class OverlapReport(NamedTuple):
  """The collectives of a step, split by whether they depend on its batch.

  Attributes:
    collectives: Every collective, in program order.
    independent_bytes: Bytes of the collectives that do not depend on the
      batch (overlappable with the forward and backward passes).
    dependent_bytes: Bytes of those that do (they wait for the gradients).
  """

  collectives: tuple[Dependence, ...]
  independent_bytes: int
  dependent_bytes: int


def overlap_report(
  step: Callable[..., Any],
  *args: Any,
  batch_argnums: int | Sequence[int] = -1,
  **kwargs: Any,
) -> OverlapReport:
  """Which of a train step's collectives do not depend on its batch.

  Traces ``step(*args, **kwargs)`` to a jaxpr and follows every value from
  the batch arguments (and so from the gradients, which are computed from
  the batch) through the program, into jitted calls, ``shard_map``, loops
  and branches. A collective is *independent* when none of its operands,
  and none of the conditions of the loops and branches around it, is
  computed from the batch: nothing then orders it after the backward pass,
  and the compiler may run it while the forward and backward passes do. A
  delayed sync (``delay >= 1`` in :func:`optax_dist.diloco` and
  :func:`optax_dist.model_average`) is independent by construction; a sync
  with ``delay=0`` reduces the params after this call's inner step and is
  not.

  Trace the step mapped with ``jax.shard_map`` or ``jax.pmap``: under
  ``jax.vmap`` the workers are one program and collectives are local
  reductions (none is reported). This reads the program's data flow; whether
  the runtime does run the collective concurrently is the scheduler's
  choice (see the delay section of the DiLoCo page).

  Args:
    step: The train step (jitted or not).
    *args: Example arguments (arrays or ``jax.ShapeDtypeStruct``).
    batch_argnums: The positions in ``args`` of the batch (default: the last
      argument).
    **kwargs: Example keyword arguments (not followed).

  Returns:
    An :class:`OverlapReport`.

  Raises:
    ZeroDivisionError: if ``args`` is empty: there is no batch to follow.
      What tracing ``step`` on ``args`` raises passes through (nothing is
      compiled).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_dist
    >>> def step(params, batch):
    ...   grads = jax.grad(lambda p: jnp.sum((p * batch) ** 2))(params)
    ...   synced = jax.lax.psum(params, "w")  # Reads the params alone.
    ...   return params - 0.1 * jax.lax.psum(grads, "w") + 0 * synced
    >>> auto = (jax.sharding.AxisType.Auto,)
    >>> mesh = jax.make_mesh((1,), ("w",), axis_types=auto, devices=jax.devices()[:1])
    >>> fn = jax.shard_map(step, mesh=mesh, in_specs=jax.P("w"), out_specs=jax.P("w"))
    >>> report = optax_dist.overlap_report(fn, jnp.ones(2), jnp.ones(2))
    >>> [c.independent for c in report.collectives]
    [True, False]
  """
  argnums = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
  argnums = tuple(a % len(args) for a in argnums)
  flat = [jax.tree.leaves(a) for a in args]
  closed = jax.make_jaxpr(lambda *a: step(*a, **kwargs))(*args)
  tainted = [i in argnums for i, leaves in enumerate(flat) for _ in leaves]
  found: list[Dependence] = []
  _walk(closed.jaxpr, tainted, False, found)
  independent = sum(c.nbytes for c in found if c.independent)
  dependent = sum(c.nbytes for c in found if not c.independent)
  return OverlapReport(tuple(found), independent, dependent)


def _nbytes(aval: Any) -> int:
  shape = getattr(aval, "shape", ())
  dtype = getattr(aval, "dtype", None)
  if dtype is None:
    return 0
  return math.prod(shape) * dtype.itemsize


def _axes(params: dict) -> tuple:
  for key in ("axes", "axis_name"):
    if key in params:
      value = params[key]
      return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  return ()


def _jaxpr(x: Any) -> Any:
  if isinstance(x, jex_core.ClosedJaxpr):
    return x.jaxpr
  if isinstance(x, jex_core.Jaxpr):
    return x
  return None


def _walk(jaxpr: Any, tainted: list[bool], control: bool, found: list | None) -> list[bool]:
  """Taints ``jaxpr``'s values from its inputs; returns whether each output is tainted.

  ``control``: whether the code runs under a loop or branch whose condition
  is tainted. Collectives are recorded in ``found`` (``None``: a pass that
  only propagates, e.g. a loop's fixpoint).
  """
  env: dict[Any, bool] = {}

  def read(v: Any) -> bool:
    return isinstance(v, jex_core.Var) and env.get(v, False)

  for v, t in zip(jaxpr.invars, tainted, strict=True):
    env[v] = t
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _COLLECTIVES and found is not None:
      nbytes = sum(_nbytes(v.aval) for v in eqn.invars)
      found.append(Dependence(name, _axes(eqn.params), nbytes, not (control or any(ins))))
    outs = _through(eqn, ins, control, found)
    for v, t in zip(eqn.outvars, outs, strict=True):
      env[v] = t
  return [read(v) for v in jaxpr.outvars]


def _through(eqn: Any, ins: list[bool], control: bool, found: list | None) -> list[bool]:
  """Taint of an equation's outputs, recursing into the programs it calls."""
  p = eqn.params
  name = eqn.primitive.name
  n_out = len(eqn.outvars)
  if name == "while":
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cond_c, body_c, carry = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
    cond, body = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr
    while True:  # The carry's taint, to a fixpoint.
      inner = control or any(_walk(cond, cond_c + carry, control, None))
      new = [a or b for a, b in zip(carry, _walk(body, body_c + carry, inner, None), strict=True)]
      if new == carry:
        break
      carry = new
    inner = control or any(_walk(cond, cond_c + carry, control, found))
    _walk(body, body_c + carry, inner, found)
    return [c or inner for c in carry]
  if name == "cond":
    inner = control or ins[0]
    outs = [False] * n_out
    for branch in p["branches"]:
      got = _walk(branch.jaxpr, ins[1:], inner, found)
      outs = [a or b for a, b in zip(outs, got, strict=True)]
    return [o or inner for o in outs]
  if name == "scan":
    nc, ncarry = p["num_consts"], p["num_carry"]
    consts, carry, xs = ins[:nc], ins[nc : nc + ncarry], ins[nc + ncarry :]
    body = p["jaxpr"].jaxpr
    while True:
      got = _walk(body, consts + carry + xs, control, None)
      new = [a or b for a, b in zip(carry, got[:ncarry], strict=True)]
      if new == carry:
        break
      carry = new
    return _walk(body, consts + carry + xs, control, found)
  subs = [j for j in (_jaxpr(v) for v in p.values()) if j is not None]
  if len(subs) == 1 and len(subs[0].invars) == len(ins) and len(subs[0].outvars) == n_out:
    return _walk(subs[0], ins, control, found)  # jit, shard_map, custom_jvp/vjp, remat.
  # Anything else: every output depends on every input (and so does what it holds).
  for sub in subs:
    if len(sub.invars) == len(ins):
      _walk(sub, ins, control or any(ins), found)
    else:
      _walk(sub, [any(ins)] * len(sub.invars), control or any(ins), found)
  return [any(ins) or control] * n_out
