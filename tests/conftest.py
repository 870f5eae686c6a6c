"""Test configuration: 8 simulated CPU devices, strict numerics, two processes.

The device flag must be set before JAX initializes its backends, so this file
sets it at import, before any test module imports jax.

The suite runs on two processes (pytest-xdist's ``-n 2`` in pyproject.toml),
each with its own 8 simulated devices; the tests of a module whose fixture
is expensive and shared by them (``MODULE_GROUPS``) run in one process, so
that the fixture runs once. ``OPTAX_DIST_COMPILE_STATS=1`` (with ``-n 0
-s``) prints the run's compilations and their time at the end.
"""

import collections
import os

import pytest

NUM_DEVICES = 8

os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={NUM_DEVICES}"]
).strip()

import jax  # noqa: E402

# Silent rank broadcasting hides bugs in tree arithmetic: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")

# Modules whose tests share a module-scoped fixture that takes long (the
# multi-process launch of every scenario).
MODULE_GROUPS = ("test_multiprocess.py",)


def pytest_collection_modifyitems(config, items):
  if not config.pluginmanager.hasplugin("xdist"):
    return
  for item in items:
    if item.path.name in MODULE_GROUPS:
      item.add_marker(pytest.mark.xdist_group(item.path.stem))


_STATS: collections.Counter = collections.Counter()
if os.environ.get("OPTAX_DIST_COMPILE_STATS"):

  def _count(event, duration, **kwargs):
    _STATS[event] += 1
    _STATS[event + " (s)"] += duration

  jax.monitoring.register_event_duration_secs_listener(_count)


def pytest_sessionfinish(session):
  if _STATS:
    print("\ncompile stats:", {k: round(v, 1) for k, v in sorted(_STATS.items())})
