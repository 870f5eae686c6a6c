"""orbax: checkpoint the distributed training state, and export the center.

A run saved mid-period and restored continues bit-identically, for every
algorithm. The center (the reference's ``swapping_saver``) is saved under the
params' own names and loads into a fresh single-device model.
"""

import functools

from flax import linen as nn
from harness import AXIS
from harness import algorithm
from harness import worker_mesh
import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_dist

N = 4
PERIOD = 3
SAVE_AFTER = 4  # One step past the first sync: in the middle of a period.
MORE_STEPS = 4  # Through the next sync (step 6) and beyond.
ALGORITHMS = {
  name: functools.partial(algorithm, name, optax.adam(0.05), PERIOD, **kwargs)
  for name, kwargs in [
    ("tower", {}),
    ("elastic_average", {"moving_rate": 0.3, "rho": 0.1}),
    ("agn", {}),
    ("model_average", {}),
    ("diloco", {}),
  ]
}
# Variants whose states hold more: a snapshot-free round robin, and DiLoCo's
# fragments, warm-up and error-feedback residual.
ALGORITHMS["elastic_average_round_robin"] = functools.partial(
  algorithm, "elastic_average", optax.adam(0.05), PERIOD, ordering="round_robin"
)
ALGORITHMS["diloco_streaming_int8_warmup"] = functools.partial(
  algorithm,
  "diloco",
  optax.adam(0.05),
  2 * PERIOD,
  fragments=2,
  sync_warmup=1,
  comm_dtype=jnp.int8,
  error_feedback=True,
)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


MODEL = MLP()


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((MODEL.apply(params, x) - y) ** 2)


def batches(steps):
  rng = np.random.default_rng(0)
  return [
    (rng.normal(size=(4 * N, 5)).astype(np.float32), rng.normal(size=(4 * N, 3)).astype(np.float32))
    for _ in range(steps)
  ]


def start(tx, mesh):
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, 5)))
  return optax_dist.per_worker((params, tx.init(params)), mesh=mesh, axis_name=AXIS)


def train(step, params, opt_state, data):
  for batch in data:
    params, opt_state, _ = jax.block_until_ready(step(params, opt_state, batch))
  return params, opt_state


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_resume_mid_period_is_bit_identical(name, tmp_path):
  # The step dispatches statically (one program per kind of call, chosen on
  # the host); the resumed step reads the restored state's call count once.
  tx = ALGORITHMS[name]()
  mesh = worker_mesh(N)
  step = optax_dist.data_parallel_step(
    loss_fn, tx, mesh=mesh, axis_name=AXIS, params_layout="per_worker"
  )
  data = batches(SAVE_AFTER + MORE_STEPS)
  expected = train(step, *start(tx, mesh), data)
  if name != "tower":  # As deciding inside the program, to float rounding with Adam inside
    # (bit for bit with momentum SGD: tests/test_step.py).
    in_graph = optax_dist.data_parallel_step(
      loss_fn, tx, mesh=mesh, axis_name=AXIS, params_layout="per_worker", sync_dispatch="in_graph"
    )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      train(in_graph, *start(tx, mesh), data),
      expected,
    )

  # Interrupted: train, save everything (per-worker params and states,
  # centers, counters), then restore into a fresh process's abstract state.
  saved = train(step, *start(tx, mesh), data[:SAVE_AFTER])
  if name != "tower":
    # Mid-period: the call counter is past the last sync.
    assert optax_dist.call_count(saved[1]) == SAVE_AFTER
    assert optax_dist.sync_schedule(saved[1])(SAVE_AFTER) is False
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "state", saved)
    ckptr.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, start(tx, mesh))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(tmp_path / "state", target)
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.spec == jax.sharding.PartitionSpec(AXIS)
  jax.tree.map(np.testing.assert_array_equal, restored, saved)

  fresh_step = optax_dist.data_parallel_step(
    loss_fn, tx, mesh=mesh, axis_name=AXIS, params_layout="per_worker"
  )
  resumed = train(fresh_step, *restored, data[SAVE_AFTER:])
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)


@pytest.mark.parametrize("name", ["elastic_average", "diloco"])
def test_export_the_center_into_a_single_device_model(name, tmp_path):
  tx = ALGORITHMS[name]()
  mesh = worker_mesh(N)
  step = optax_dist.data_parallel_step(
    loss_fn, tx, mesh=mesh, axis_name=AXIS, params_layout="per_worker"
  )
  params, opt_state = train(step, *start(tx, mesh), batches(SAVE_AFTER))
  # The reference's swapping_saver: the center under the params' own names.
  # Every worker holds the same copy; take worker 0's.
  center = jax.tree.map(lambda c: c[0], optax_dist.center_params(opt_state))
  assert jax.tree.structure(center) == jax.tree.structure(jax.tree.map(lambda p: p[0], params))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "center", center)
    ckptr.wait_until_finished()

  # A fresh model on one device, for evaluation or serving.
  device = SingleDeviceSharding(jax.devices()[0])
  fresh = MODEL.init(jax.random.key(42), jnp.zeros((1, 5)))
  target = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=device), fresh)
  with ocp.StandardCheckpointer() as ckptr:
    loaded = ckptr.restore(tmp_path / "center", target)
  assert loaded["params"]["Dense_1"]["kernel"].sharding == device
  jax.tree.map(np.testing.assert_array_equal, loaded, center)
  # The workers have left the center since the sync: the export is not
  # worker 0's params.
  assert not np.array_equal(
    loaded["params"]["Dense_1"]["kernel"], params["params"]["Dense_1"]["kernel"][0]
  )
  x = np.random.default_rng(1).normal(size=(8, 5)).astype(np.float32)
  np.testing.assert_array_equal(MODEL.apply(loaded, x), MODEL.apply(center, x))
  # The distributed eval step evaluates that same model.
  evaluate = optax_dist.data_parallel_eval_step(
    loss_fn, mesh=mesh, axis_name=AXIS, params_layout="per_worker"
  )
  batch = batches(1)[0]
  np.testing.assert_allclose(
    evaluate(params, opt_state, batch)["loss"], loss_fn(loaded, batch), rtol=1e-6
  )
