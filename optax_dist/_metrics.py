"""What a data-parallel step reports: the loss and metrics pooled over the workers.

``loss_fn`` returns a scalar loss, or ``(loss, aux)`` with ``aux`` a dict
holding (both optional) ``"metrics"``, a dict of name to a ``(total, count)``
pair or a single total, and ``"predictions"``, per-example arrays of the
worker's slice.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from optax_dist import _collectives

_AUX_KEYS = frozenset({"metrics", "predictions"})
_RESERVED = frozenset({"loss", "predictions"})


def pool(loss: Any, aux: Any, axes: tuple, loss_reduction: str, has_aux: bool) -> tuple:
  """The loss reduced over workers, pooled metrics, and this worker's predictions."""
  if jnp.ndim(loss) != 0:
    raise ValueError(f"`loss_fn` must return a scalar loss, got shape {jnp.shape(loss)}.")
  reduce = _collectives.psum if loss_reduction == "sum" else _collectives.pmean
  scalars = {"loss": reduce(loss, axes)}
  if not has_aux:
    return scalars, None
  if not isinstance(aux, Mapping) or not set(aux) <= _AUX_KEYS:
    got = sorted(aux) if isinstance(aux, Mapping) else type(aux).__name__
    raise ValueError(
      "With has_aux=True, `loss_fn` returns (loss, aux) with aux a dict holding "
      f"'metrics' and/or 'predictions'; got {got}."
    )
  for name, value in aux.get("metrics", {}).items():
    if name in _RESERVED:
      raise ValueError(f"The metric name {name!r} is reserved; rename the metric.")
    if isinstance(value, tuple):
      if len(value) != 2:
        raise ValueError(
          f"Metric {name!r} must be a (total, count) pair or a single total; got a "
          f"tuple of {len(value)}."
        )
      total, count = _collectives.psum(tuple(jnp.asarray(v) for v in value), axes)
      scalars[name] = total / count
    else:
      scalars[name] = _collectives.psum(jnp.asarray(value), axes)
  return scalars, aux.get("predictions")


def with_predictions(scalars: dict, predictions: Any) -> dict:
  """The scalars, and the predictions under "predictions" when there are some."""
  if predictions is None:
    return scalars
  return {**scalars, "predictions": predictions}
