"""Test configuration: 8 simulated CPU devices, strict numerics, two processes.

The device flag must be set before JAX initializes its backends, so this file
sets it at import, before any test module imports jax.

The suite runs on two processes (pytest-xdist's ``-n 2`` in pyproject.toml),
each with its own 8 simulated devices; the tests that share an expensive
result (``GROUPS``) run in one process, so that it is computed once, and the
slowest start first (``FIRST``). XLA compiles with settings that compile
faster (``COMPILER_FLAGS``). ``OPTAX_DIST_COMPILE_STATS=1`` (with ``-n 0
-s``) prints the run's compilations and their time at the end.
"""

import collections
import json
import os
import platform
import time

import pytest
import xla_flags

NUM_DEVICES = 8

# The tests' programs are small and run a few steps each, so that compiling
# them, not running them, takes most of the suite's time. Four XLA CPU
# settings make compiling about three times cheaper (docs/development.md,
# "Suite time"): the older fusion emitters, which build no MLIR context per fused
# kernel; LLVM's optimization level 0; one LLVM module per program (the two
# test processes already keep both cores busy); and AVX code, without the
# fused multiply-add of AVX2, so that the arithmetic is the same in every
# program. Without the last one, XLA contracts a multiply and an add into one
# rounding in some fusions and not in others: two programs that compute the
# same numbers (a static flag and the in-graph sync) then part in their last
# bits, not from anything the package does. The multi-process tests launch
# their processes with XLA's default CPU settings, as users compile. A flag
# set in XLA_FLAGS wins: `XLA_FLAGS="--xla_cpu_use_fusion_emitters=true
# --xla_cpu_max_isa=AVX512 --xla_backend_optimization_level=3"` runs the suite
# with XLA's defaults. The ISA names are x86's: on other machines the suite
# compiles with XLA's defaults. A setting the installed XLA no longer knows
# (jax 0.12 dropped the fusion emitters' flag) is left out: see xla_flags.py.
COMPILER_FLAGS: dict[str, str] = {}
if platform.machine().lower() in ("x86_64", "amd64"):
  COMPILER_FLAGS = {
    "xla_cpu_use_fusion_emitters": "false",
    "xla_backend_optimization_level": "0",
    "xla_cpu_parallel_codegen_split_count": "1",
    "xla_cpu_max_isa": "AVX",
  }
_FLAGS = os.environ.get("XLA_FLAGS", "")
# Only the settings this XLA knows (it aborts on an unknown flag), tried in a
# fresh process; the test processes inherit XLA_FLAGS and try nothing again.
_MISSING = {k: v for k, v in COMPILER_FLAGS.items() if f"--{k}=" not in _FLAGS}
for _name, _value in xla_flags.known(_MISSING).items():
  _FLAGS += f" --{_name}={_value}"
os.environ["XLA_FLAGS"] = f"{_FLAGS} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
# JAX runs on the CPU even where the TPU compiler (the `tpu` extra) is
# installed: tests/test_tpu_compile.py compiles for a TPU topology without a
# TPU, and nothing else looks for one.
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

# Silent rank broadcasting hides bugs in tree arithmetic: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")

# Tests that share an expensive result computed once per process (a module
# fixture, a docs page run once and cached), by the start of their node id:
# each group runs in one process, so that the result is computed once.
GROUPS = {
  # The module fixture launches every scenario on two processes.
  "tests/test_multiprocess.py::": "multiprocess",
  # The tests that read what a page's blocks computed (test_docs.run_page).
  "tests/test_docs.py::test_every_python_block_runs[docs/tutorial.md]": "docs/tutorial.md",
  "tests/test_docs.py::test_tutorial_": "docs/tutorial.md",
  "tests/test_docs.py::test_every_python_block_runs[docs/getting_started.md]": "getting_started",
  "tests/test_docs.py::test_getting_started_": "getting_started",
  "tests/test_docs.py::test_every_python_block_runs[docs/large_models.md]": "large_models",
  "tests/test_docs.py::test_large_models_": "large_models",
  "tests/test_docs.py::test_every_python_block_runs[docs/migration.md]": "migration",
  "tests/test_docs.py::test_migration_": "migration",
  "tests/test_docs.py::test_every_python_block_runs[docs/index.md]": "index",
  "tests/test_docs.py::test_landing_page_example_trains": "index",
  # One synchronous run of the language-model example (a module fixture).
  "tests/test_lm_example.py::test_sync_learns": "lm_sync",
  "tests/test_lm_example.py::test_one_worker_with_a_plain_outer_step": "lm_sync",
}

# The slowest tests and groups (about 20 s of CPU or more each), started
# first: a long one started last keeps one process busy while the other idles.
FIRST = (
  "tests/test_lm_example.py::",
  "multiprocess",
  "docs/tutorial.md",
  "tests/test_examples.py::",
  "getting_started",
  "lm_sync",
)


def group_of(nodeid):
  """The group a test runs in (its node id, for a test that shares nothing)."""
  for start, group in GROUPS.items():
    if nodeid.startswith(start):
      return group
  return nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """``--dist loadgroup`` with the groups above.

  pytest-xdist's own loadgroup reads ``xdist_group`` marks by appending the
  group to the test's node id, which pytest 9.2 no longer lets it change:
  every test ran alone, and a group's shared fixture ran in both processes.
  This scheduler groups by node id instead, and starts the slow ones first.
  """
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class Scheduler(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      return group_of(nodeid)

    def _assign_work_unit(self, node):
      if not ranked:  # Before the first unit is sent: the slow ones first.
        ranked.append(True)
        order = sorted(self.workqueue, key=rank)
        self.workqueue = type(self.workqueue)((scope, self.workqueue[scope]) for scope in order)
      super()._assign_work_unit(node)

  def rank(scope):
    for i, start in enumerate(FIRST):
      if scope.startswith(start):
        return i
    return len(FIRST)

  ranked = []
  return Scheduler(config, log)


_STATS: collections.Counter = collections.Counter()
_PER_TEST: dict = {}  # Node id: [CPU seconds of this process, compilations].
_COMPILE = "/jax/core/compile/backend_compile_duration"
if os.environ.get("OPTAX_DIST_COMPILE_STATS"):

  def _count(event, duration, **kwargs):
    _STATS[event] += 1
    _STATS[event + " (s)"] += duration

  jax.monitoring.register_event_duration_secs_listener(_count)

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    cpu, compiles = time.process_time(), _STATS[_COMPILE]
    yield
    _PER_TEST[item.nodeid] = [time.process_time() - cpu, _STATS[_COMPILE] - compiles]


def pytest_sessionfinish(session):
  """With ``OPTAX_DIST_COMPILE_STATS=1``, prints the compilations; set to a
  path, also writes each test's CPU seconds and compilations there as JSON
  (one file per process: PATH.gw0.json, ...; PATH.json without xdist)."""
  if not _STATS:
    return
  print("\ncompile stats:", {k: round(v, 1) for k, v in sorted(_STATS.items())})
  path = os.environ["OPTAX_DIST_COMPILE_STATS"]
  if path != "1":
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    with open(f"{path}.{worker}.json" if worker else f"{path}.json", "w") as f:
      json.dump(_PER_TEST, f, indent=0)
