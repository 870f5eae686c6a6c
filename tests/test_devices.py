"""The simulated devices the multi-device tests rely on are really there."""

from conftest import NUM_DEVICES
import jax


def test_eight_simulated_devices():
  assert jax.device_count() == NUM_DEVICES == 8
  assert {d.platform for d in jax.devices()} == {"cpu"}
