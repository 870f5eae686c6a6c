"""check_agreement in one process; tests/test_multiprocess.py runs it on two."""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_dist
from optax_dist import _agreement
from optax_dist import _settings

N = 4


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return jax.make_mesh((N,), ("w",), axis_types=(AxisType.Auto,), devices=jax.devices()[:N])


def stacked(mesh, **overrides):
  params = {
    "w": np.tile(np.linspace(-1, 1, 6, dtype=np.float32), (N, 1)),
    "h": np.ones((N, 2), jnp.bfloat16),
    "k": np.arange(N * 3, dtype=np.int32).reshape(N, 3) * 0,
  }
  params.update(overrides)
  return jax.device_put(params, NamedSharding(mesh, P("w")))


def elastic(**kwargs):
  kwargs.setdefault("communication_period", 4)
  return optax_dist.elastic_average(optax.adam(1e-3), axis_name="w", **kwargs)


def test_agreeing_workers_pass(mesh):
  params = stacked(mesh)
  optax_dist.check_agreement(elastic(), params, mesh=mesh, axis_name="w")
  replicated = jax.device_put({"w": np.ones(3, np.float32)}, NamedSharding(mesh, P()))
  optax_dist.check_agreement({"lr": 0.1}, replicated, mesh=mesh, axis_name="w")
  optax_dist.check_agreement((elastic(), {"seed": 0}), {"w": np.ones(3)}, mesh=mesh, axis_name="w")


@pytest.mark.parametrize("leaf", ["w", "h", "k"])
def test_one_worker_with_other_params_is_named(mesh, leaf):
  params = jax.tree.map(np.asarray, stacked(mesh))
  bumped = np.array(params[leaf])
  bumped[2, 1] = bumped[2, 1] + 1
  with pytest.raises(ValueError) as info:
    optax_dist.check_agreement(elastic(), stacked(mesh, **{leaf: bumped}), mesh=mesh, axis_name="w")
  message = str(info.value)
  assert f"params['{leaf}'] on workers 2 (process 0) differ from worker 0's" in message
  assert message.count("differ from worker 0's") == 1
  assert "broadcast_params" in message


def test_one_ulp_is_a_difference(mesh):
  w = np.tile(np.float32(1.0), (N, 6))
  w[3, 5] = np.nextafter(np.float32(1.0), np.float32(2.0))
  with pytest.raises(ValueError, match=r"workers 3 \(process 0\)"):
    optax_dist.check_agreement(elastic(), stacked(mesh, w=w), mesh=mesh, axis_name="w")


@pytest.mark.parametrize(
  "other, expected",
  [
    (elastic(communication_period=5), "settings.engine.phases.sync.period = 5 (process 0: 4)"),
    (
      elastic(ordering="round_robin"),
      "settings.engine.phases.sync.ordering = 'round_robin' (process 0: 'simultaneous')",
    ),
    (elastic(moving_rate=0.5), "settings.engine.phases.sync.moving_rate = 0.5 (process 0: None)"),
    (
      optax_dist.elastic_average(optax.adam(2e-3), axis_name="w", communication_period=4),
      "step_size = -0.002 (process 0: -0.001)",
    ),
  ],
)
def test_settings_that_differ_between_processes_are_named(mesh, monkeypatch, other, expected):
  # Stand in for a second process: the gathered settings rows of two processes.
  rows = np.stack([_agreement.to_row(_settings.lines(s)) for s in (elastic(), other)])
  monkeypatch.setattr(_agreement.multihost_utils, "process_allgather", lambda row, tiled: rows)
  monkeypatch.setattr(_agreement, "params_lines", lambda params: [])
  with pytest.raises(ValueError) as info:
    optax_dist.check_agreement(elastic(), stacked(mesh), mesh=mesh, axis_name="w")
  message = str(info.value)
  assert "process 1 (" in message and expected in message
  # Only the one setting that differs (seen where update and init keep it).
  name = expected.split(" = ")[0].rsplit(".", 1)[-1]
  listed = [line for line in message.splitlines() if " = " in line]
  assert listed and all(f".{name} = " in line for line in listed), listed


def test_settings_text_sees_every_static_setting():
  lines = "\n".join(_settings.lines(elastic(rho=0.25, ordering="round_robin", sync_warmup=3)))
  for text in ("period = 4", "ordering = 'round_robin'", "rho = 0.25", "b1 = 0.9", "'w'"):
    assert text in lines
  assert "warmup = 3" in lines  # Kept only by init.
  assert "0x" not in lines  # No memory addresses: the text is the same in every process.


def test_axis_must_be_a_mesh_axis(mesh):
  with pytest.raises(ValueError, match="'x' is not an axis of the mesh"):
    optax_dist.check_agreement(elastic(), stacked(mesh), mesh=mesh, axis_name="x")
