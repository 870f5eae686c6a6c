"""Hierarchical sync: tower inside a host every step, a periodic sync across hosts.

A 2 x 4 mesh of the 8 simulated devices stands for 2 hosts of 4 devices:
``periodic(tower(inner, axis_name="local"), axis_name="hosts")``. Within a host
the gradients are averaged every step (the fast network); across hosts the
params meet every p steps (the slow one).
"""

import hlo
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
from numpy_reference import Inner
import optax
import pytest

import optax_dist

HOSTS, LOCAL = 2, 4
BATCH, DIM = 3, 5
STEPS, PERIOD, ALPHA, LR = 7, 3, 0.3, 0.05


def transform(algorithm, inner):
  inner_tx = optax.adam(LR, b2=0.99) if inner == "adam" else optax.sgd(LR)
  local = optax_dist.tower(inner_tx, axis_name="local")
  if algorithm == "elastic_average":
    return optax_dist.elastic_average(
      local, axis_name="hosts", communication_period=PERIOD, moving_rate=ALPHA
    )
  return optax_dist.model_average(local, axis_name="hosts", interval_steps=PERIOD)


def loss_fn(w, x, y):
  return jnp.mean((x @ w - y) ** 2)


def data():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(STEPS, HOSTS, LOCAL, BATCH, DIM)).astype(np.float32)
  y = rng.normal(size=(STEPS, HOSTS, LOCAL, BATCH)).astype(np.float32)
  return x, y


X0 = np.linspace(-0.5, 0.5, DIM, dtype=np.float32)


def numpy_reference(algorithm, inner, x, y):
  """Hosts' params (HOSTS, DIM) and the center after STEPS steps, in float64."""
  w = np.repeat(X0[None].astype(np.float64), HOSTS, axis=0)
  c = X0.astype(np.float64).copy()
  opts = [Inner(inner, (DIM,), lr=LR) for _ in range(HOSTS)]
  for t in range(STEPS):
    xt, yt = x[t].astype(np.float64), y[t].astype(np.float64)
    # Each device's gradient of its mean squared error; the host averages them.
    residual = np.einsum("hlbd,hd->hlb", xt, w) - yt
    g = (2 / BATCH * np.einsum("hlbd,hlb->hld", xt, residual)).mean(axis=1)
    w = w + np.stack([opts[h](g[h]) for h in range(HOSTS)])
    if (t + 1) % PERIOD == 0:
      if algorithm == "elastic_average":
        d = w - c
        w, c = w - ALPHA * d, c + ALPHA * d.sum(axis=0)
      else:
        c = w.mean(axis=0)
        w = np.repeat(c[None], HOSTS, axis=0)
  return w, c


def mesh():
  assert jax.device_count() == HOSTS * LOCAL
  return jax.make_mesh((HOSTS, LOCAL), ("hosts", "local"), axis_types=(AxisType.Auto,) * 2)


def compiled_run(tx, layout, **extra):
  """init and step, jitted under shard_map on the 2-D mesh.

  ``per_host``: params (HOSTS, DIM) sharded over "hosts", replicated on the
  devices of a host (jax.grad then already sums the host's gradients, and
  tower only divides by 4). ``per_device``: params (HOSTS, LOCAL, DIM), one
  copy per device (tower all-reduces them over "local").
  """
  lead = 1 if layout == "per_host" else 2
  spec = P("hosts") if layout == "per_host" else P("hosts", "local")
  index = (0,) * lead
  grow = (None,) * lead

  def init(w):
    return jax.tree.map(lambda a: a[grow], tx.init(w[index]))

  def step(w, state, x, y):
    w, state = w[index], jax.tree.map(lambda a: a[index], state)
    grads = jax.grad(loss_fn)(w, x[0, 0], y[0, 0])
    updates, state = tx.update(grads, state, w, **extra)
    return jax.tree.map(lambda a: a[grow], (optax.apply_updates(w, updates), state))

  m = mesh()
  data_spec = P("hosts", "local")
  init = jax.jit(jax.shard_map(init, mesh=m, in_specs=spec, out_specs=spec))
  step = jax.jit(
    jax.shard_map(step, mesh=m, in_specs=(spec, spec, data_spec, data_spec), out_specs=(spec, spec))
  )
  shape = (HOSTS, DIM) if layout == "per_host" else (HOSTS, LOCAL, DIM)
  return init, step, np.broadcast_to(X0, shape).copy()


@pytest.mark.parametrize(
  "algorithm, inner, layout",
  [
    ("elastic_average", "adam", "per_host"),
    ("elastic_average", "sgd", "per_device"),
    ("model_average", "adam", "per_device"),
    ("model_average", "sgd", "per_host"),
  ],
)
def test_matches_numpy_reference(algorithm, inner, layout):
  tx = transform(algorithm, inner)
  init, step, w = compiled_run(tx, layout)
  state = init(w)
  x, y = data()
  for t in range(STEPS):
    w, state = jax.block_until_ready(step(w, state, x[t], y[t]))
  ref_w, ref_c = numpy_reference(algorithm, inner, x, y)
  w = np.asarray(w)
  center = np.asarray(optax_dist.center_params(state))
  if layout == "per_device":
    # The devices of a host stay identical: same reduced gradient, same sync.
    np.testing.assert_array_equal(w, np.repeat(w[:, :1], LOCAL, axis=1))
    w, center = w[:, 0], center[:, 0]
  np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(center, np.broadcast_to(ref_c, center.shape), rtol=1e-5, atol=1e-6)
  assert not np.allclose(ref_w[0], ref_w[1])  # The hosts really did train apart.
  np.testing.assert_array_equal(optax_dist.global_step(state), STEPS // PERIOD)


def test_hlo_every_step_inside_hosts_every_p_steps_across_them():
  init, step, w = compiled_run(transform("elastic_average", "adam"), "per_host")
  x, y = data()
  text = step.lower(w, init(w), x[0], y[0]).compile().as_text()
  bodies = hlo.while_bodies(text)
  ops = hlo.collectives(text)
  lines = [ln for ln in text.splitlines() if " all-reduce(" in ln]
  assert len(lines) == len(ops) == 2
  found = {
    op.computation in bodies: (op.kind, op.nbytes, hlo.replica_groups(line))
    for op, line in zip(ops, lines, strict=True)
  }
  # Every step: the gradients, all-reduced over the devices of each host.
  assert found[False] == ("all-reduce", DIM * 4, [[0, 1, 2, 3], [4, 5, 6, 7]])
  # In the sync loop only (every p steps): the params across the hosts, and
  # in the same all-reduce the count of finite hosts (4 bytes).
  assert found[True] == ("all-reduce", DIM * 4 + 4, [[0, 4], [1, 5], [2, 6], [3, 7]])


@pytest.mark.parametrize("layout", ["per_host", "per_device"])
def test_int8_syncs_across_hosts_with_static_flags(layout):
  # Quantized syncs across the hosts (the slow network), the gradients
  # averaged exactly within each; the host's loop passes the static flags.
  tx = optax_dist.model_average(
    optax_dist.tower(optax.sgd(LR), axis_name="local"),
    axis_name="hosts",
    interval_steps=PERIOD,
    comm_dtype=jnp.int8,
    error_feedback=True,
  )
  x, y = data()
  init, in_graph, w0 = compiled_run(tx, layout)
  schedule = optax_dist.sync_schedule(init(w0))
  static = {flag: compiled_run(tx, layout, sync=flag)[1] for flag in (False, True)}
  runs = {"in_graph": (w0, init(w0)), "static": (w0, init(w0))}
  for t in range(STEPS):
    runs["in_graph"] = jax.block_until_ready(in_graph(*runs["in_graph"], x[t], y[t]))
    runs["static"] = jax.block_until_ready(static[schedule(t)](*runs["static"], x[t], y[t]))
  jax.tree.map(np.testing.assert_array_equal, runs["static"], runs["in_graph"])
  _, state = runs["static"]
  center = np.asarray(optax_dist.center_params(state))
  # Every device holds the same center, within int8 rounding of float64's.
  np.testing.assert_array_equal(center, np.broadcast_to(center.reshape(-1, DIM)[0], center.shape))
  _, ref_c = numpy_reference("model_average", "sgd", x, y)
  np.testing.assert_allclose(center.reshape(-1, DIM)[0], ref_c, atol=2e-2 * np.abs(ref_c).max())
  np.testing.assert_array_equal(optax_dist.global_step(state), STEPS // PERIOD)
