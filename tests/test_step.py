"""data_parallel_step / data_parallel_eval_step: the replicate_model_fn counterpart."""

from harness import AXIS
from harness import run_transform
from harness import stack
from harness import worker_mesh
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
import numpy as np
import optax
import pytest

import optax_dist


def tower_loss(c, batch):
  """The reference test's per-tower loss: sum |x * c - y|."""
  x, y = batch
  return jnp.sum(jnp.abs(x * c - y))


# Gold values (TensorFlow's own TowerOptimizer test, tf.contrib.estimator): c = 10, SGD lr 1,
# two towers with x = y = [[1], [2]], one row each; tower gradients 1 and 2.
# "sum": c = 10 - 3 = 7, then with x = y = [[1.5], [2.5]]: c = 7 - 4 = 3.
# "mean": c = 10 - 1.5 = 8.5, then 8.5 - 2 = 6.5. The reported loss at c = 10
# is |10 - 1| + |20 - 2| = 27 summed, 13.5 averaged.
XS = [np.array([[1.0], [2.0]], np.float32), np.array([[1.5], [2.5]], np.float32)]
GOLD_C = {"sum": [7.0, 3.0], "mean": [8.5, 6.5]}
GOLD_LOSS = {"sum": 27.0, "mean": 13.5}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(
  "optimizer,layout",
  [
    ("tower", "replicated"),
    ("tower", "per_worker"),
    ("plain", "replicated"),
    ("plain", "per_worker"),
  ],
)
def test_gold_values_of_the_loss_reduction(reduction, optimizer, layout):
  mesh = worker_mesh(2)
  sgd = optax.sgd(1.0)
  # Plain optax: the step reduces the gradients itself, as tower would.
  tx = (
    optax_dist.tower(sgd, axis_name=AXIS, loss_reduction=reduction) if optimizer == "tower" else sgd
  )
  step = optax_dist.data_parallel_step(
    tower_loss, tx, mesh=mesh, axis_name=AXIS, loss_reduction=reduction, params_layout=layout
  )
  c = jnp.float32(10.0)
  state = tx.init(c)
  if layout == "per_worker":
    c, state = optax_dist.per_worker((c, state), mesh=mesh, axis_name=AXIS)
  for i, (x, expected) in enumerate(zip(XS, GOLD_C[reduction], strict=True)):
    c, state, metrics = jax.block_until_ready(step(c, state, (x, x)))
    np.testing.assert_allclose(c, np.full(np.shape(c), expected), rtol=0, atol=1e-6)
    if i == 0:
      assert float(metrics["loss"]) == GOLD_LOSS[reduction]
  if optimizer == "tower":
    np.testing.assert_array_equal(optax_dist.global_step(state), np.full(np.shape(c), 2))


def test_plain_optax_equals_full_batch_training_on_one_device():
  # "mean" over equal slices: the gradient of the mean of the towers' mean
  # losses is the full batch's gradient.
  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"][None, :] - y) ** 2)

  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 5)).astype(np.float32)
  y = (x @ rng.normal(size=(5, 2))).astype(np.float32)
  params = {"w": jnp.zeros((5, 2)), "b": jnp.zeros(2)}
  tx = optax.adam(0.05)
  step = optax_dist.data_parallel_step(loss_fn, tx, mesh=worker_mesh(8), axis_name=AXIS)
  ref_params, ref_state = params, tx.init(params)
  state = tx.init(params)
  for _ in range(10):
    params, state, metrics = jax.block_until_ready(step(params, state, (x, y)))
    ref_params, ref_state, ref_loss = optax_dist.minimize(
      loss_fn, tx, ref_params, ref_state, (x, y)
    )
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params
  )


def masked_loss(w, batch):
  """A loss whose accuracy counts only the unmasked examples of a slice."""
  x, label, mask = batch
  logits = x * w
  correct = jnp.sum(jnp.where(mask, (logits > 0) == label, False))
  loss = jnp.sum(jnp.where(mask, (logits - label) ** 2, 0.0))
  aux = {
    "metrics": {"accuracy": (correct, jnp.sum(mask)), "examples": jnp.sum(mask)},
    "predictions": {"logit": logits, "row": batch[0] * 0 + jnp.arange(x.shape[0])},
  }
  return loss, aux


def test_metrics_are_pooled_and_predictions_keep_the_batch_order():
  n = 4
  mesh = worker_mesh(n)
  # 16 rows, 4 per worker. Worker 0 sees one valid example (right), worker 1
  # four (all wrong), workers 2 and 3 two each (right). The pooled accuracy
  # is (1 + 0 + 2 + 2) / 9, not the mean of per-worker accuracies
  # (1 + 0 + 1 + 1) / 4.
  x = np.arange(1.0, 17.0, dtype=np.float32)
  label = np.array([1, 0, 0, 0] + [0] * 4 + [1, 1, 0, 0] * 2, bool)
  mask = np.array([1, 0, 0, 0] + [1] * 4 + [1, 1, 0, 0] * 2, bool)
  batch = (x, label, mask)
  w = jnp.float32(1.0)
  tx = optax.sgd(0.0)
  step = optax_dist.data_parallel_step(
    masked_loss, tx, mesh=mesh, axis_name=AXIS, loss_reduction="sum", has_aux=True
  )
  evaluate = optax_dist.data_parallel_eval_step(
    masked_loss, mesh=mesh, axis_name=AXIS, loss_reduction="sum", has_aux=True
  )
  _, _, train_metrics = jax.block_until_ready(step(w, tx.init(w), batch))
  eval_metrics = evaluate(w, None, batch)
  for metrics in (train_metrics, eval_metrics):
    assert set(metrics) == {"loss", "accuracy", "examples", "predictions"}
    assert float(metrics["accuracy"]) == pytest.approx(5 / 9, abs=1e-7)
    assert int(metrics["examples"]) == 9
    expected_loss = np.sum(np.where(mask, (x - label) ** 2, 0.0))
    assert float(metrics["loss"]) == expected_loss
    # Predictions come back in the global batch's order; "row" is each row's
    # index within its worker's slice.
    np.testing.assert_array_equal(metrics["predictions"]["logit"], x)
    np.testing.assert_array_equal(metrics["predictions"]["row"], np.tile(np.arange(4), n))


ALGORITHMS = {
  "tower": lambda: optax_dist.tower(optax.adam(0.05), axis_name=AXIS),
  "elastic_average": lambda: optax_dist.elastic_average(
    optax.adam(0.05), axis_name=AXIS, communication_period=2, moving_rate=0.3
  ),
  "elastic_average_round_robin": lambda: optax_dist.elastic_average(
    optax.sgd(0.1), axis_name=AXIS, communication_period=2, ordering="round_robin"
  ),
  "agn": lambda: optax_dist.agn(optax.sgd(0.1), axis_name=AXIS, communication_period=2),
  "model_average": lambda: optax_dist.model_average(
    optax.adam(0.05), axis_name=AXIS, interval_steps=2
  ),
  "diloco": lambda: optax_dist.diloco(optax.adam(0.05), axis_name=AXIS, sync_period=2),
}


def lsq(params, batch):
  x, y = batch
  return jnp.mean((x @ params["w"] + params["b"][None, :] - y) ** 2)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_transform_runs_as_it_does_by_hand(name):
  # The built step equals the transform run by hand on stacked per-worker
  # params under shard_map (tests/harness.py), step by step.
  n, steps = 4, 5
  tx = ALGORITHMS[name]()
  mesh = worker_mesh(n)
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
  batches = [
    (rng.normal(size=(8 * n, 3)).astype(np.float32), rng.normal(size=(8 * n, 2)).astype(np.float32))
    for _ in range(steps)
  ]
  by_hand = run_transform(
    tx,
    stack(params, n),
    [jax.tree.map(lambda a: a.reshape(n, 8, *a.shape[1:]), b) for b in batches],
    mode="shard_map",
    grad_fn=lsq,
  )
  step = optax_dist.data_parallel_step(
    lsq, tx, mesh=mesh, axis_name=AXIS, params_layout="per_worker"
  )
  p, s = optax_dist.per_worker((params, tx.init(params)), mesh=mesh, axis_name=AXIS)
  for batch, expected in zip(batches, by_hand.params, strict=True):
    # The reported loss is the mean of the workers' losses before the step.
    slices = jax.tree.map(lambda a: a.reshape(n, 8, *a.shape[1:]), batch)
    losses = [
      lsq(jax.tree.map(lambda a, k=k: a[k], p), (slices[0][k], slices[1][k])) for k in range(n)
    ]
    p, s, metrics = jax.block_until_ready(step(p, s, batch))
    jax.tree.map(np.testing.assert_array_equal, p, expected)
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, s, by_hand.state)


STATIC = {
  "elastic_average": lambda: optax_dist.elastic_average(
    SGD, axis_name=AXIS, communication_period=3, moving_rate=0.3, rho=0.1
  ),
  "elastic_average_round_robin": lambda: optax_dist.elastic_average(
    SGD, axis_name=AXIS, communication_period=3, ordering="round_robin"
  ),
  "agn": lambda: optax_dist.agn(SGD, axis_name=AXIS, communication_period=3, sync_warmup=2),
  "model_average": lambda: optax_dist.model_average(SGD, axis_name=AXIS, interval_steps=3),
  "diloco_streaming_warmup": lambda: optax_dist.diloco(
    SGD, axis_name=AXIS, sync_period=4, fragments=2, sync_warmup=1
  ),
}
SGD = optax.sgd(0.05, momentum=0.9)


@pytest.mark.parametrize("name", sorted(STATIC))
def test_static_dispatch_equals_in_graph_with_one_program_per_kind_of_call(name, monkeypatch):
  n, steps = 4, 9
  tx = STATIC[name]()
  mesh = worker_mesh(n)
  rng = np.random.default_rng(2)
  params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
  batches = [
    (rng.normal(size=(8 * n, 3)).astype(np.float32), rng.normal(size=(8 * n, 2)).astype(np.float32))
    for _ in range(steps)
  ]
  traces = []

  def counted_loss(params, batch):
    traces.append(None)
    return lsq(params, batch)

  reads = []
  call_count = optax_dist._state.call_count
  monkeypatch.setattr(optax_dist._state, "call_count", lambda s: reads.append(1) or call_count(s))
  results = {}
  for dispatch in ("in_graph", "static"):
    traces.clear()
    step = optax_dist.data_parallel_step(
      counted_loss,
      tx,
      mesh=mesh,
      axis_name=AXIS,
      params_layout="per_worker",
      sync_dispatch=dispatch,
    )
    p, s = optax_dist.per_worker((params, tx.init(params)), mesh=mesh, axis_name=AXIS)
    for batch in batches:
      p, s, _ = jax.block_until_ready(step(p, s, batch))
    results[dispatch] = (p, s)
    # One program decides inside; or one per kind of call, chosen on the host.
    schedule = optax_dist.sync_schedule(s)
    kinds = {repr(schedule(i)) for i in range(steps)}
    assert len(traces) == (1 if dispatch == "in_graph" else len(kinds)), kinds
  jax.tree.map(np.testing.assert_array_equal, results["static"], results["in_graph"])
  # The host read the count once, when it first saw the (fresh) state.
  assert len(reads) == 1


def test_eval_step_evaluates_the_center():
  n = 2
  mesh = worker_mesh(n)
  tx = optax_dist.elastic_average(
    optax.sgd(0.1), axis_name=AXIS, communication_period=3, moving_rate=0.5
  )
  params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
  step = optax_dist.data_parallel_step(
    lsq, tx, mesh=mesh, axis_name=AXIS, params_layout="per_worker"
  )
  evaluate = optax_dist.data_parallel_eval_step(
    lsq, mesh=mesh, axis_name=AXIS, params_layout="per_worker"
  )
  rng = np.random.default_rng(2)
  batch = (rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32))
  p, s = optax_dist.per_worker((params, tx.init(params)), mesh=mesh, axis_name=AXIS)
  for _ in range(4):  # One sync (call 3) and one local step after it.
    p, s, _ = jax.block_until_ready(step(p, s, batch))
  center = jax.tree.map(lambda c: c[0], optax_dist.center_params(s))
  assert int(optax_dist.global_step(s)[0]) == 1
  # The workers have moved away from the center since the sync.
  assert not np.allclose(p["w"][0], center["w"])
  metrics = evaluate(p, s, batch)
  np.testing.assert_allclose(metrics["loss"], lsq(center, batch), rtol=1e-6)
  # Without a periodic transform, the params themselves are evaluated.
  worker0 = jax.tree.map(lambda a: a[0], p)
  evaluate_replicated = optax_dist.data_parallel_eval_step(lsq, mesh=mesh, axis_name=AXIS)
  np.testing.assert_allclose(
    evaluate_replicated(worker0, None, batch)["loss"], lsq(worker0, batch), rtol=1e-6
  )


def test_explicit_mesh_axes_work():
  # jax.make_mesh's default axis type is Explicit.
  mesh = jax.make_mesh((2,), (AXIS,), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
  tx = optax.sgd(1.0)
  step = optax_dist.data_parallel_step(
    tower_loss, tx, mesh=mesh, axis_name=AXIS, loss_reduction="sum"
  )
  c, _, metrics = jax.block_until_ready(
    step(jnp.float32(10.0), tx.init(jnp.float32(10.0)), (XS[0], XS[0]))
  )
  assert float(c) == 7.0
  assert float(metrics["loss"]) == 27.0


def test_batch_that_does_not_divide_by_the_workers_is_an_error():
  mesh = worker_mesh(4)
  tx = optax.sgd(1.0)
  step = optax_dist.data_parallel_step(tower_loss, tx, mesh=mesh, axis_name=AXIS)
  x = np.ones((6, 1), np.float32)
  with pytest.raises(
    ValueError, match=r"shape \(6, 1\): its dim 0 \(6\) must divide by the 4 workers"
  ):
    step(jnp.float32(1.0), tx.init(jnp.float32(1.0)), (x, x))
  evaluate = optax_dist.data_parallel_eval_step(tower_loss, mesh=mesh, axis_name=AXIS)
  with pytest.raises(ValueError, match="must divide by the 4 workers"):
    evaluate(jnp.float32(1.0), None, (x, x))


def test_bad_configurations_are_errors():
  mesh = worker_mesh(2)
  sgd = optax.sgd(1.0)
  with pytest.raises(ValueError, match="loss_reduction"):
    optax_dist.data_parallel_step(tower_loss, sgd, mesh=mesh, axis_name=AXIS, loss_reduction="avg")
  with pytest.raises(ValueError, match="params_layout"):
    optax_dist.data_parallel_eval_step(
      tower_loss, mesh=mesh, axis_name=AXIS, params_layout="stacked"
    )
  with pytest.raises(ValueError, match="mesh does not have"):
    optax_dist.data_parallel_step(tower_loss, sgd, mesh=mesh, axis_name="batch")
  x = (XS[0], XS[0])
  # A periodic transform needs per-worker params: refused when the step is built.
  ea = optax_dist.elastic_average(sgd, axis_name=AXIS)
  with pytest.raises(ValueError, match="params_layout='per_worker'"):
    optax_dist.data_parallel_step(tower_loss, ea, mesh=mesh, axis_name=AXIS)
  # Per-worker leaves need the worker axis.
  step = optax_dist.data_parallel_step(
    tower_loss, ea, mesh=mesh, axis_name=AXIS, params_layout="per_worker"
  )
  with pytest.raises(ValueError, match=r"leading worker axis of size 2.*shape \(\)"):
    step(jnp.float32(1.0), ea.init(jnp.float32(1.0)), x)

  # aux must follow the convention.
  def bad_aux(c, batch):
    return tower_loss(c, batch), {"accuracy": 1.0}

  step = optax_dist.data_parallel_step(bad_aux, sgd, mesh=mesh, axis_name=AXIS, has_aux=True)
  with pytest.raises(ValueError, match="'metrics' and/or 'predictions'"):
    step(jnp.float32(1.0), sgd.init(jnp.float32(1.0)), x)

  def reserved(c, batch):
    return tower_loss(c, batch), {"metrics": {"loss": (1.0, 1.0)}}

  step = optax_dist.data_parallel_step(reserved, sgd, mesh=mesh, axis_name=AXIS, has_aux=True)
  with pytest.raises(ValueError, match="reserved"):
    step(jnp.float32(1.0), sgd.init(jnp.float32(1.0)), x)


def test_per_worker_lays_out_identical_copies():
  mesh = worker_mesh(4)
  tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "n": np.int32(3)}
  out = optax_dist.per_worker(tree, mesh=mesh, axis_name=AXIS)
  assert out["w"].shape == (4, 2, 3) and out["n"].shape == (4,)
  np.testing.assert_array_equal(out["w"], np.broadcast_to(tree["w"], (4, 2, 3)))
  assert out["w"].sharding.spec == jax.sharding.PartitionSpec(AXIS)
  assert out["n"].dtype == np.int32
