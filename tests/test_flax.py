"""Flax: linen TrainState and nnx.Optimizer drive every transform under shard_map.

Each run is compared with the same run written with plain optax (``tx.update``
then ``optax.apply_updates``, tests/harness.py) after every step. The two are
different programs, which XLA may fuse differently (Adam's arithmetic can then
round differently in the last bit), so they are compared to float32 rounding.
"""

import functools

from flax import linen as nn
from flax import nnx
from flax.training import train_state
import harness
from harness import AXIS
from harness import algorithm
from harness import run_transform
from harness import stack
from harness import worker_mesh
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import optax_dist

close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
N = 4
STEPS = 5  # Two syncs at period 2, and a local step after the second.
ALGORITHMS = {
  name: functools.partial(
    algorithm,
    name,
    optax.sgd(0.1) if name == "agn" else optax.adam(0.05),
    2,
    **({"moving_rate": 0.3} if name == "elastic_average" else {}),
  )
  for name in harness.ALGORITHMS
}


def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(STEPS, N, 4, 5)).astype(np.float32)  # Per-worker slices.
  y = rng.normal(size=(STEPS, N, 4, 3)).astype(np.float32)
  return x, y


def per_worker_step(fn):
  """``fn`` on each worker's slice of trees stacked along a leading worker axis."""

  def body(*args):
    out = fn(*jax.tree.map(lambda a: a[0], args))
    return jax.tree.map(lambda a: a[None], out)

  spec = P(AXIS)
  return jax.jit(jax.shard_map(body, mesh=worker_mesh(N), in_specs=spec, out_specs=spec))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_linen_train_state(name):
  tx = ALGORITHMS[name]()
  model = LinenMLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 5)))

  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((model.apply(params, x) - y) ** 2)

  # Workers start identical: one TrainState, laid out once per worker.
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  state = optax_dist.per_worker(state, mesh=worker_mesh(N), axis_name=AXIS)

  @per_worker_step
  def train_step(state, batch):
    grads = jax.grad(loss_fn)(state.params, batch)
    return state.apply_gradients(grads=grads)

  x, y = data()
  by_hand = run_transform(
    tx, stack(params, N), list(zip(x, y, strict=True)), mode="shard_map", grad_fn=loss_fn
  )
  for t in range(STEPS):
    state = jax.block_until_ready(train_step(state, (x[t], y[t])))
    jax.tree.map(close, state.params, by_hand.params[t])
  jax.tree.map(close, state.opt_state, by_hand.state)
  np.testing.assert_array_equal(state.step, np.full(N, STEPS))
  if name != "tower":
    assert int(optax_dist.global_step(state.opt_state)[0]) == 2
    # The center, under the params' own names, is the same on every worker.
    center = optax_dist.center_params(state.opt_state)
    assert jax.tree.structure(center) == jax.tree.structure(state.params)
    jax.tree.map(lambda c: np.testing.assert_array_equal(c, np.broadcast_to(c[0], c.shape)), center)


def test_linen_train_state_with_replicated_params_and_tower():
  # Replicated params (in_specs P()): jax.grad already sums over the workers
  # and tower only averages. The same numbers as the per-worker layout, up to
  # the order of the summation.
  tx = optax_dist.tower(optax.adam(0.05), axis_name=AXIS)
  model = LinenMLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 5)))

  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((model.apply(params, x) - y) ** 2)

  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  @jax.shard_map(mesh=worker_mesh(N), in_specs=(P(), P(AXIS)), out_specs=P())
  def train_step(state, batch):
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params, batch))

  x, y = data()
  by_hand = run_transform(
    tx, stack(params, N), list(zip(x, y, strict=True)), mode="shard_map", grad_fn=loss_fn
  )
  for t in range(STEPS):
    global_batch = (x[t].reshape(N * 4, 5), y[t].reshape(N * 4, 3))
    state = jax.block_until_ready(train_step(state, global_batch))
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b[0], rtol=1e-5, atol=1e-6),
      state.params,
      by_hand.params[t],
    )
  assert int(optax_dist.global_step(state.opt_state)) == STEPS


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def mse(model, batch):
  x, y = batch
  return jnp.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_nnx_optimizer(name):
  tx = ALGORITHMS[name]()
  model = NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # Split the objects into a static graph and a state of arrays, which is
  # laid out per worker and merged back inside the mapped step.
  graphdef, state = nnx.split((model, optimizer))
  state = optax_dist.per_worker(state, mesh=worker_mesh(N), axis_name=AXIS)

  @per_worker_step
  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    grads = nnx.grad(mse)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  # By hand: the same model as a function of its params.
  model_def, params = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param)

  def loss_fn(params, batch):
    return mse(nnx.merge(model_def, params), batch)

  x, y = data()
  by_hand = run_transform(
    tx, stack(params, N), list(zip(x, y, strict=True)), mode="shard_map", grad_fn=loss_fn
  )
  for t in range(STEPS):
    state = jax.block_until_ready(train_step(state, (x[t], y[t])))
    model, optimizer = nnx.merge(graphdef, state)
    got = jax.tree.leaves(nnx.state(model, nnx.Param))
    for a, b in zip(got, jax.tree.leaves(by_hand.params[t]), strict=True):
      close(a, b)
  opt_state = nnx.as_pure(optimizer.opt_state)  # The optax state, without nnx wrappers.
  np.testing.assert_array_equal(optimizer.step[...], np.full(N, STEPS))
  jax.tree.map(close, opt_state, by_hand.state)
  expected_step = STEPS if name == "tower" else 2
  np.testing.assert_array_equal(optax_dist.global_step(opt_state), np.full(N, expected_step))
  if name != "tower":
    center = optax_dist.center_params(opt_state)
    close(center["out"]["kernel"], optax_dist.center_params(by_hand.state)["out"]["kernel"])


def test_nnx_optimizer_takes_the_static_sync_flag():
  # nnx.Optimizer.update passes keyword arguments to the transform: a loop
  # reads the schedule once and compiles one step per kind of call.
  tx = optax_dist.diloco(optax.sgd(0.05, momentum=0.9), axis_name=AXIS, sync_period=2)
  model = NnxMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  schedule = optax_dist.sync_schedule(nnx.as_pure(optimizer.opt_state))
  graphdef, start = nnx.split((model, optimizer))
  start = optax_dist.per_worker(start, mesh=worker_mesh(N), axis_name=AXIS)

  def make_step(**flag):
    @per_worker_step
    def train_step(state, batch):
      model, optimizer = nnx.merge(graphdef, state)
      optimizer.update(model, nnx.grad(mse)(model, batch), **flag)
      return nnx.state((model, optimizer))

    return train_step

  x, y = data()
  in_graph, static = start, start
  steps = {flag: make_step(sync=flag) for flag in (False, True)}
  decide_inside = make_step()
  for t in range(STEPS):
    in_graph = jax.block_until_ready(decide_inside(in_graph, (x[t], y[t])))
    static = jax.block_until_ready(steps[schedule(t)](static, (x[t], y[t])))
  jax.tree.map(np.testing.assert_array_equal, static, in_graph)
  _, optimizer = nnx.merge(graphdef, static)
  np.testing.assert_array_equal(optax_dist.global_step(nnx.as_pure(optimizer.opt_state)), [2] * N)
