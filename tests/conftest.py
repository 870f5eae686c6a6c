"""Test configuration: 8 simulated CPU devices, strict numerics.

The device flag must be set before JAX initializes its backends, so this file
sets it at import, before any test module imports jax.
"""

import os

NUM_DEVICES = 8

os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={NUM_DEVICES}"]
).strip()

import jax  # noqa: E402

# Silent rank broadcasting hides bugs in tree arithmetic: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")
