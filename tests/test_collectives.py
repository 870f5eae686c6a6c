"""The collectives layer: one behaviour under shard_map, pmap and vmap."""

from harness import AXIS
from harness import MODES
from harness import map_workers
from harness import worker_mesh
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from optax_dist import _collectives
from optax_dist import _reduce


@pytest.mark.parametrize("mode", MODES)
def test_size_index_sum_mean_gather(mode):
  n = 4

  def f(x):
    return (
      jnp.full((), _collectives.num_workers(AXIS)),
      _collectives.worker_index(AXIS),
      _collectives.psum(x, AXIS),
      _collectives.pmean(x, AXIS),
      _collectives.all_gather(x, AXIS),
    )

  x = np.arange(1.0, n + 1, dtype=np.float32)
  size, index, total, mean, gathered = jax.block_until_ready(map_workers(f, n, mode)(x))
  np.testing.assert_array_equal(size, [n] * n)
  np.testing.assert_array_equal(index, np.arange(n))
  np.testing.assert_array_equal(total, [10.0] * n)
  np.testing.assert_array_equal(mean, [2.5] * n)
  np.testing.assert_array_equal(gathered, np.tile(x, (n, 1)))


def test_typed_axes_only_under_shard_map_with_vma_checking():
  mesh = worker_mesh(2)
  seen = {}

  def probe(tag):
    def f(x):
      seen[tag] = _collectives.typed_axes(AXIS)
      return x

    return f

  x = jnp.zeros(2)
  jax.shard_map(probe("shard_map"), mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))(x)
  jax.shard_map(probe("no_vma"), mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False)(x)
  jax.vmap(probe("vmap"), axis_name=AXIS)(x)
  jax.pmap(probe("pmap"), axis_name=AXIS, devices=jax.devices()[:2])(x)
  assert seen == {"shard_map": {AXIS}, "no_vma": set(), "vmap": set(), "pmap": set()}


def test_to_varying_lets_invariant_values_meet_varying_ones_in_cond():
  def f(x):
    total = lax.psum(x, AXIS)  # Invariant.
    assert _collectives.is_invariant(total, AXIS)
    total = _collectives.to_varying(total, AXIS)
    assert not _collectives.is_invariant(total, AXIS)
    return lax.cond(x[0] > 1.0, lambda: total, lambda: x)

  out = jax.shard_map(f, mesh=worker_mesh(2), in_specs=P(AXIS), out_specs=P(AXIS))(
    jnp.array([1.0, 2.0])
  )
  np.testing.assert_array_equal(out, [1.0, 3.0])


@pytest.mark.parametrize("mode", MODES)
def test_broadcast_from_copies_one_workers_value_of_any_dtype(mode):
  n = 4
  # Fractions, so that a copy through an integer type would show.
  tree = {
    "f": np.arange(n * 3, dtype=np.float32).reshape(n, 3) * 0.37 + 0.25,
    "bf16": (np.arange(n, dtype=np.float32) + 0.5).astype(jnp.bfloat16),
    "i": np.arange(n, dtype=np.int32) + 7,
    "b": np.array([True, False, False, True]),
  }
  # NaN on the other workers must not leak into the copy.
  tree["f"][1:, 0] = np.nan
  out = jax.block_until_ready(
    map_workers(lambda t: _collectives.broadcast_from(t, AXIS), n, mode)(tree)
  )
  for k, v in tree.items():
    assert out[k].dtype == v.dtype
    np.testing.assert_array_equal(out[k], np.broadcast_to(v[0], v.shape))
  last = map_workers(lambda t: _collectives.broadcast_from(t, AXIS, index=3), n, mode)(tree)
  np.testing.assert_array_equal(last["i"], [10] * n)


def test_broadcast_from_keeps_the_varying_type_and_rejects_bad_index():
  def f(x):
    y = _collectives.broadcast_from(x, AXIS)
    assert not _collectives.is_invariant(y, AXIS)
    with pytest.raises(ValueError, match=r"`index` must be in \[0, 2\)"):
      _collectives.broadcast_from(x, AXIS, index=2)
    return y

  out = jax.shard_map(f, mesh=worker_mesh(2), in_specs=P(AXIS), out_specs=P(AXIS))(
    jnp.array([5.0, 6.0])
  )
  np.testing.assert_array_equal(out, [5.0, 5.0])


def test_broadcast_from_returns_invariant_leaves_without_a_collective():
  # A replicated input is typed invariant under shard_map: already the same on
  # every worker, it needs no all-reduce.
  def f(x, shared):
    return _collectives.broadcast_from({"x": x, "shared": shared}, AXIS)

  mapped = jax.shard_map(
    f, mesh=worker_mesh(2), in_specs=(P(AXIS), P()), out_specs={"x": P(AXIS), "shared": P()}
  )
  jaxpr = str(jax.make_jaxpr(mapped)(jnp.array([5.0, 6.0]), jnp.array(1.5)))
  assert jaxpr.count("psum") == 1, jaxpr  # The varying leaf's only.


def test_reduce_gradients_over_two_mesh_axes():
  # A 2-D mesh (2 hosts x 2 devices): a gradient varying over both axes is
  # reduced over both; one replicated over "devices" arrives summed there and
  # is only summed over "hosts".
  mesh = jax.make_mesh(
    (2, 2), ("hosts", "devices"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:4]
  )
  axes = ("hosts", "devices")

  def f(per_device, x_host):
    assert _collectives.num_workers(axes) == 4
    g_rep = jax.grad(lambda w: jnp.sum(w * per_device))(x_host)  # Summed over "devices" by grad.
    return (
      _collectives.reduce_gradients(per_device, axes, "sum"),
      _collectives.reduce_gradients(per_device, axes, "mean"),
      _collectives.reduce_gradients(g_rep, axes, "mean"),
    )

  g = jnp.arange(1.0, 5.0)  # Device (h, d) holds g[2h + d].
  total, mean, rep_mean = jax.shard_map(
    f,
    mesh=mesh,
    in_specs=(P(("hosts", "devices")), P("hosts")),
    out_specs=(P(), P(), P()),
  )(g, jnp.zeros(2))
  np.testing.assert_array_equal(total, [10.0])
  np.testing.assert_array_equal(mean, [2.5])
  np.testing.assert_array_equal(rep_mean, [2.5])


def test_unbound_axis_error_names_the_axis_and_the_fix():
  with pytest.raises(
    NameError, match=r"'nowhere' is not bound.*jax\.vmap\(f, axis_name='nowhere'\)"
  ):
    _collectives.psum(jnp.ones(2), "nowhere")
  with pytest.raises(NameError, match="'nowhere' is not bound"):
    jax.jit(lambda x: _collectives.worker_index("nowhere"))(1.0)


def test_bad_axis_arguments():
  with pytest.raises(ValueError, match="at least one axis"):
    _collectives.axis_tuple(())
  with pytest.raises(TypeError, match="axis name"):
    _collectives.axis_tuple(("a", None))


def test_finite_mean_of_a_leaf_already_summed_over_some_axes():
  # The warm-up's mean over the axes (hosts, local) of a 2 x 4 mesh. A leaf
  # that varies on every device is summed over all 8 and divided by 8. A leaf
  # typed invariant over "local" (already the sum of a host's 4 devices, as
  # jax.grad gives it for params replicated on a host) is summed over the
  # hosts only, then divided by the 8 workers.
  mesh = jax.make_mesh((2, 4), ("hosts", "local"), axis_types=(AxisType.Auto,) * 2)
  per_device = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
  per_host = np.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]], np.float32)

  def body(a, b):
    mean, left_out = _reduce.finite_mean({"a": a[0, 0], "b": b[0]}, ("hosts", "local"))
    return mean, left_out[None, None]

  specs = ({"a": P(), "b": P()}, P("hosts", "local"))
  fn = jax.jit(
    jax.shard_map(body, mesh=mesh, in_specs=(P("hosts", "local"), P("hosts")), out_specs=specs)
  )
  mean, left_out = fn(per_device, per_host)
  np.testing.assert_allclose(mean["a"], per_device.reshape(8, 3).mean(0))
  np.testing.assert_allclose(mean["b"], per_host.sum(0) / 8)
  assert not np.asarray(left_out).any()
