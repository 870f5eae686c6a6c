"""tower: gold values of TowerOptimizer, a NumPy reference, both gradient layouts."""

from harness import AXIS
from harness import MODES
from harness import map_workers
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


def tower_loss(c, batch):
  """The reference test's per-tower loss: sum |x * c - y|."""
  x, y = batch
  return jnp.sum(jnp.abs(x * c - y))


def split_rows(x, n):
  """A global batch split along dim 0 into n stacked per-worker slices."""
  x = np.asarray(x, np.float32)
  return x.reshape(n, x.shape[0] // n, *x.shape[1:])


# Gold values (TowerOptimizer's own test): c = 10, SGD lr 1, two towers with
# x = y = [[1], [2]], one row each. Per-tower gradients are x * sign(x c - y):
# 1 and 2. "sum": c = 10 - 3 = 7; "mean": c = 10 - 1.5 = 8.5. A second "sum"
# step with x = y = [[1.5], [2.5]]: c = 7 - 4 = 3.
GOLD = {"sum": [7.0, 3.0], "mean": [8.5, 10.0 - 1.5 - 2.0]}
XS = [np.array([[1.0], [2.0]]), np.array([[1.5], [2.5]])]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gold_values_per_worker_params(mode, reduction):
  tx = optax_dist.tower(optax.sgd(1.0), axis_name=AXIS, loss_reduction=reduction)
  batches = [(split_rows(x, 2), split_rows(x, 2)) for x in XS]
  traj = run_transform(tx, stack(np.float32(10.0), 2), batches, mode=mode, grad_fn=tower_loss)
  for params, expected in zip(traj.params, GOLD[reduction], strict=True):
    np.testing.assert_allclose(params, [expected, expected], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [2, 2])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gold_values_replicated_params_under_shard_map(reduction):
  # Params replicated with in_specs P(): jax.grad returns the gradient already
  # summed over the axis. Summing again would give c = 4 for "sum".
  tx = optax_dist.tower(optax.sgd(1.0), axis_name=AXIS, loss_reduction=reduction)

  def step(c, state, x, y):
    c, state, _ = optax_dist.minimize(tower_loss, tx, c, state, (x, y))
    return c, state

  step = jax.jit(
    jax.shard_map(
      step,
      mesh=worker_mesh(2),
      in_specs=(P(), P(), P(AXIS), P(AXIS)),
      out_specs=(P(), P()),
    )
  )
  c = jnp.float32(10.0)
  state = tx.init(c)
  for x, expected in zip(XS, GOLD[reduction], strict=True):
    c, state = jax.block_until_ready(
      step(c, state, jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32))
    )
    assert float(c) == pytest.approx(expected, abs=1e-6)
  assert int(optax_dist.global_step(state)) == 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gold_one_tower_gets_the_whole_batch(mode, reduction):
  # One tower: gradient 1 + 2 = 3 whatever the reduction, so c = 7.
  tx = optax_dist.tower(optax.sgd(1.0), axis_name=AXIS, loss_reduction=reduction)
  batch = (split_rows(XS[0], 1), split_rows(XS[0], 1))
  traj = run_transform(tx, stack(np.float32(10.0), 1), [batch], mode=mode, grad_fn=tower_loss)
  np.testing.assert_allclose(traj.params[0], [7.0], atol=1e-6)


def test_axis_name_none_is_a_passthrough():
  # TowerOptimizer without replicate_model_fn: no aggregation at all.
  tx = optax_dist.tower(optax.sgd(1.0), axis_name=None, loss_reduction="sum")
  grads = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  state = tx.init(jnp.zeros(2))
  updates = jax.vmap(lambda g: tx.update(g, state)[0])(grads)
  np.testing.assert_array_equal(updates, -grads)


# NumPy reference of the equations: reduce per-worker gradients, then SGD or Adam.


def numpy_tower(params, grads_per_step, *, inner, reduction, lr=0.1, b1=0.9, b2=0.99, eps=1e-8):
  """params: dict of arrays; grads_per_step: list of dicts of (N, ...) arrays."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  nu = {k: np.zeros_like(v) for k, v in params.items()}
  trajectory = []
  for t, grads in enumerate(grads_per_step, start=1):
    for k in params:
      g = np.asarray(grads[k], np.float64).sum(axis=0)
      if reduction == "mean":
        g = g / grads[k].shape[0]
      if inner == "sgd":
        params[k] = params[k] - lr * g
      else:
        mu[k] = b1 * mu[k] + (1 - b1) * g
        nu[k] = b2 * nu[k] + (1 - b2) * g**2
        m_hat, v_hat = mu[k] / (1 - b1**t), nu[k] / (1 - b2**t)
        params[k] = params[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    trajectory.append({k: v.copy() for k, v in params.items()})
  return trajectory


# Adam with b2 = 0.99: with the default 0.999, float32's 1 - b2**t cancels
# (one ulp of b2**t is 2e-5 of 1 - 0.999**3), which alone moves params by
# about 1e-6 whatever the transform does.
INNERS = {
  "sgd": optax.sgd(0.1),
  "adam": optax.adam(0.1, b2=0.99),
  # A large eps makes Adam's step depend on the gradient's size (a sum of N
  # gradients is N times a mean), which a small one hides.
  "adam_eps": optax.adam(0.1, b2=0.99, eps=0.5),
}


# Every mode and worker count with SGD summed and Adam averaged; Adam summed,
# with an eps that lets the sum's size show, on 2 and 8 workers in every mode.
NUMPY_GRID = [
  (mode, n, inner, reduction)
  for mode in MODES
  for n in (1, 2, 4, 8)
  for inner, reduction in (("sgd", "sum"), ("adam", "mean"))
] + [(mode, n, "adam_eps", "sum") for mode in MODES for n in (2, 8)]


@pytest.mark.parametrize(("mode", "n", "inner", "reduction"), NUMPY_GRID)
def test_matches_numpy_reference(mode, n, inner, reduction):
  rng = np.random.default_rng(n)
  params = {
    "w": rng.normal(size=(3, 4)).astype(np.float32),
    "b": rng.normal(size=(4,)).astype(np.float32),
  }
  grads = [
    {k: rng.normal(size=(n, *v.shape)).astype(np.float32) for k, v in params.items()}
    for _ in range(3)
  ]
  tx = optax_dist.tower(INNERS[inner], axis_name=AXIS, loss_reduction=reduction)
  traj = run_transform(tx, stack(params, n), grads, mode=mode)
  eps = 0.5 if inner == "adam_eps" else 1e-8
  expected = numpy_tower(params, grads, inner=inner.split("_")[0], reduction=reduction, eps=eps)
  for got, want in zip(traj.params, expected, strict=True):
    for k in params:
      for worker in range(n):  # Every worker applies the same update.
        np.testing.assert_allclose(got[k][worker], want[k], rtol=1e-6, atol=1e-6)


def test_mixed_replicated_and_per_worker_leaves_under_shard_map():
  # One tree, two layouts: "shared" is replicated (in_specs P(), its gradient
  # arrives summed), "local" is per worker (its gradient arrives per worker).
  n = 4
  tx = optax_dist.tower(optax.sgd(1.0), axis_name=AXIS, loss_reduction="mean")
  x = np.arange(1.0, n + 1, dtype=np.float32)  # Worker k sees x = k + 1.

  def loss(params, xk):
    return params["shared"] * xk[0] + params["local"][0] * xk[0] ** 2

  def step(shared, local, xk):
    params = {"shared": shared, "local": local}
    params, _, _ = optax_dist.minimize(loss, tx, params, tx.init(params), xk)
    return params["shared"], params["local"]

  step = jax.jit(
    jax.shard_map(
      step, mesh=worker_mesh(n), in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P(AXIS))
    )
  )
  shared, local = jax.block_until_ready(step(jnp.float32(0.0), jnp.zeros(n), jnp.asarray(x)))
  # Both gradients are averaged over workers: mean(x) and mean(x**2).
  assert float(shared) == pytest.approx(-x.mean(), abs=1e-6)
  np.testing.assert_allclose(local, np.full(n, -(x**2).mean()), atol=1e-6)


@pytest.mark.parametrize("layout", ["per_worker", "replicated"])
def test_multi_transform_of_two_towers(layout):
  # Several optimizers in one step: each tower reduces only its own leaves.
  n = 2
  tx = optax.multi_transform(
    {
      "a": optax_dist.tower(optax.sgd(1.0), axis_name=AXIS, loss_reduction="sum"),
      "b": optax_dist.tower(optax.sgd(1.0), axis_name=AXIS, loss_reduction="mean"),
    },
    {"a": "a", "b": "b"},
  )
  spec = P() if layout == "replicated" else P(AXIS)

  def loss(params, xk):
    return params["a"] * xk + params["b"] * 2 * xk

  def step(params, xk):
    if layout == "per_worker":
      params = jax.tree.map(lambda v: v[0], params)
    params, state, _ = optax_dist.minimize(loss, tx, params, tx.init(params), xk[0])
    assert optax_dist.get_slot_names(state) == []
    if layout == "per_worker":
      params = jax.tree.map(lambda v: v[None], params)
    return params

  step = jax.jit(jax.shard_map(step, mesh=worker_mesh(n), in_specs=(spec, P(AXIS)), out_specs=spec))
  params = {"a": jnp.float32(0.0), "b": jnp.float32(0.0)}
  if layout == "per_worker":
    params = jax.tree.map(lambda v: jnp.stack([v] * n), params)
  out = jax.block_until_ready(step(params, jnp.array([1.0, 3.0])))
  # a: sum of x = 4; b: mean of 2x = 4.
  np.testing.assert_allclose(out["a"], np.broadcast_to(-4.0, np.shape(out["a"])))
  np.testing.assert_allclose(out["b"], np.broadcast_to(-4.0, np.shape(out["b"])))


def test_two_losses_two_optimizers_in_one_step():
  # The reference's promise: several optimizers, same or different losses,
  # called in the same order by every tower.
  n = 4
  tx1 = optax_dist.tower(optax.sgd(1.0), axis_name=AXIS, loss_reduction="sum")
  tx2 = optax_dist.tower(optax.adam(0.1), axis_name=AXIS, loss_reduction="mean")

  def step(w1, w2, xk):
    w1, s1, _ = optax_dist.minimize(lambda w: jnp.sum(w * xk), tx1, w1, tx1.init(w1))
    w2, s2, _ = optax_dist.minimize(lambda w: jnp.sum((w - xk) ** 2), tx2, w2, tx2.init(w2))
    return w1, w2, optax_dist.global_step(s1) + optax_dist.global_step(s2)

  step = map_workers(step, n, "shard_map")
  xs = np.arange(n, dtype=np.float32)[:, None] * np.ones((n, 2), np.float32)
  w1, w2, steps = jax.block_until_ready(
    step(np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32), xs)
  )
  np.testing.assert_allclose(w1, np.full((n, 2), -xs[:, 0].sum()))
  # Adam's first step moves every coordinate by lr against the gradient's sign:
  # the mean gradient of (w - x)^2 at w = 0 is -2 mean(x) < 0.
  np.testing.assert_allclose(w2, np.full((n, 2), 0.1), atol=1e-6)
  np.testing.assert_array_equal(steps, [2] * n)


def test_unknown_loss_reduction_is_rejected():
  with pytest.raises(ValueError, match=r"loss_reduction.*'sum', 'mean'.*'max'"):
    optax_dist.tower(optax.sgd(1.0), axis_name=AXIS, loss_reduction="max")


def test_unbound_axis_name_says_how_to_bind_it():
  tx = optax_dist.tower(optax.sgd(1.0), axis_name="batch")
  params = jnp.zeros(2)
  state = tx.init(params)  # init is local: no axis needed.
  with pytest.raises(NameError, match=r"'batch' is not bound.*shard_map.*axis_name='batch'"):
    jax.jit(tx.update)(jnp.ones(2), state, params)
  # Bound under another name is still unbound.
  with pytest.raises(NameError, match="'batch' is not bound"):
    jax.vmap(lambda g: tx.update(g, state, params), axis_name="other")(jnp.ones((2, 2)))


def test_params_none_where_the_inner_optimizer_needs_them():
  tx = optax_dist.tower(optax.adamw(0.1, weight_decay=0.1), axis_name=None)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones(2), state)


def test_the_inner_optimizer_gets_the_params_and_the_extra_args():
  # AdamW's weight decay reads the params; a transformation with an extra
  # argument reads it: tower passes both on, after reducing the gradients.
  n = 4
  rng = np.random.default_rng(5)
  params = rng.normal(size=(3,)).astype(np.float32)
  grads = rng.normal(size=(n, 3)).astype(np.float32)

  def scale_by_factor():
    def update(updates, state, params=None, *, factor):
      del params
      return jax.tree.map(lambda u: u * factor, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)

  inner = optax.chain(optax.adamw(0.1, weight_decay=0.5), scale_by_factor())
  tx = optax_dist.tower(inner, axis_name=AXIS)
  p = stack(params, n)
  updates, _ = jax.vmap(lambda g, s, p: tx.update(g, s, p, factor=3.0), axis_name=AXIS)(
    grads, jax.vmap(tx.init)(p), p
  )
  want, _ = inner.update(grads.mean(0), inner.init(params), params, factor=3.0)
  for worker in range(n):
    np.testing.assert_allclose(updates[worker], want, rtol=1e-6, atol=1e-7)
