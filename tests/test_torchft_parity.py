"""torchft's own regression fixtures of Streaming DiLoCo, reproduced by ``diloco``.

The gold values are the expected histories of torchft's deterministic test
``DiLoCoMockedUpdateTest.test_diloco_mocked_updates`` (repository
meta-pytorch/torchft, ``torchft/diloco_regression_test.py``; fixtures
``test_fixtures/torchft.diloco_regression_test.DiLoCoMockedUpdateTest.
test_diloco_mocked_updates_{0..5}.json``). Its setup: 2 replicas, a model of
two one-number layers (one fragment each) starting at 1.0, a constant gradient
of 2, inner SGD at learning rate 1, one outer SGD at learning rate 2 per
fragment, ``sync_every=6``, ``fragment_sync_delay`` 0 or 1 and
``fragment_update_alpha`` 0, 0.5 or 1. A history holds each layer's value
before each of 16 steps (after 0 to 15 inner steps); both replicas' are the
same. torchft's ``LocalSGD`` has no such deterministic test to compare model
averaging with.

The same run here: ``diloco(optax.sgd(1.0), outer=optax.sgd(2.0),
sync_period=6, fragments=2, delay=fragment_sync_delay,
blend=fragment_update_alpha)`` on 2 workers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dist
from tests.harness import AXIS
from tests.harness import run_transform

N = 2
STEPS = 15
# (fragment_sync_delay, fragment_update_alpha): (layer 0's history, layer 1's history).
FIXTURES = {
  (0, 0.0): (
    [1, -1, -3, -11, -13, -15, -17, -19, -21, -35, -37, -39, -41, -43, -45, -59],
    [1, -1, -3, -5, -7, -9, -23, -25, -27, -29, -31, -33, -47, -49, -51, -53],
  ),
  (0, 0.5): (
    [1, -1, -3, -8, -10, -12, -14, -16, -18, -24.5, -26.5, -28.5, -30.5, -32.5, -34.5, -40.25],
    [1, -1, -3, -5, -7, -9, -17, -19, -21, -23, -25, -27, -32, -34, -36, -38],
  ),
  (0, 1.0): (
    [1, -1, -3, -5, -7, -9, -11, -13, -15, -17, -19, -21, -23, -25, -27, -29],
    [1, -1, -3, -5, -7, -9, -11, -13, -15, -17, -19, -21, -23, -25, -27, -29],
  ),
  (1, 0.0): (
    [1, -1, -3, -7, -9, -11, -13, -15, -17, -27, -29, -31, -33, -35, -37, -47],
    [1, -1, -3, -5, -7, -9, -19, -21, -23, -25, -27, -29, -39, -41, -43, -45],
  ),
  (1, 0.5): (
    [1, -1, -3, -6, -8, -10, -12, -14, -16, -21.5, -23.5, -25.5, -27.5, -29.5, -31.5, -35.75],
    [1, -1, -3, -5, -7, -9, -15, -17, -19, -21, -23, -25, -29, -31, -33, -35],
  ),
  (1, 1.0): (
    [1, -1, -3, -5, -7, -9, -11, -13, -15, -17, -19, -21, -23, -25, -27, -29],
    [1, -1, -3, -5, -7, -9, -11, -13, -15, -17, -19, -21, -23, -25, -27, -29],
  ),
}
# torchft's global copy of each layer after the syncs that land on steps 3, 6,
# 9 and 12 (its `global_parameter_history`), by fixture.
CENTERS = {
  (0, 0.0): {3: (-11, 1), 6: (-11, -23), 9: (-35, -23), 12: (-35, -47)},
  (0, 0.5): {3: (-11, 1), 6: (-11, -23), 9: (-29, -23), 12: (-29, -35)},
  (0, 1.0): {3: (-11, 1), 6: (-11, -23), 9: (-23, -23), 12: (-23, -23)},
  (1, 0.0): {3: (-7, 1), 6: (-7, -19), 9: (-27, -19), 12: (-27, -39)},
  (1, 0.5): {3: (-7, 1), 6: (-7, -19), 9: (-25, -19), 12: (-25, -31)},
  (1, 1.0): {3: (-7, 1), 6: (-7, -19), 9: (-23, -19), 12: (-23, -23)},
}


def make(delay, blend):
  return optax_dist.diloco(
    optax.sgd(1.0),
    axis_name=AXIS,
    outer=optax.sgd(2.0),
    sync_period=6,
    fragments={"layer0": 0, "layer1": 1},
    delay=delay,
    blend=blend,
  )


def history(traj):
  """Each layer's value after 0 to 15 calls, as torchft records it (worker 0)."""
  values = [(1.0, 1.0)] + [(float(p["layer0"][0]), float(p["layer1"][0])) for p in traj.params]
  return np.asarray(values).T


def train(delay, blend, flags=None):
  params = {"layer0": jnp.ones((N,)), "layer1": jnp.ones((N,))}
  grads = [jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)] * STEPS
  return run_transform(make(delay, blend), params, grads, mode="vmap", flags=flags)


@pytest.mark.parametrize(("delay", "blend"), list(FIXTURES))
def test_reproduces_torchfts_regression_fixture(delay, blend):
  traj = train(delay, blend)
  for p in traj.params:  # The two workers agree, as torchft's replicas do.
    jax.tree.map(lambda x: np.testing.assert_array_equal(x[0], x[1]), p)
  np.testing.assert_allclose(history(traj), FIXTURES[delay, blend], rtol=1e-6)
  for call, expected in CENTERS[delay, blend].items():
    center = optax_dist.center_params(traj.states[call - 1])
    np.testing.assert_array_equal(
      [center["layer0"], center["layer1"]], np.transpose([expected] * N)
    )
  # Fragment 0 lands on calls 3, 9 and 15, fragment 1 on calls 6 and 12.
  np.testing.assert_array_equal(optax_dist.global_step(traj.state), [5, 5])


@pytest.mark.parametrize("delay", [0, 1])
def test_the_static_flags_give_the_same_history(delay):
  schedule = optax_dist.SyncSchedule(period=6, fragments=2, delay=delay)
  flags = [schedule(count) for count in range(STEPS)]
  # Each fragment lands on its scheduled call whatever the delay.
  assert flags == [False, False, 0, False, False, 1] * 2 + [False, False, 0]
  traj = train(delay, 0.5, flags)
  np.testing.assert_allclose(history(traj), FIXTURES[delay, 0.5], rtol=1e-6)
