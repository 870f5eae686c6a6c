"""The convergence benchmark's bytes formula agrees with the compiled step's collectives."""

import importlib.util
import pathlib

import jax
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def convergence():
  spec = importlib.util.spec_from_file_location("convergence", BENCHMARKS / "convergence.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize(("algorithm", "period"), [("sync", 1), ("diloco", 4)])
def test_bytes_communicated_matches_communication_report(convergence, algorithm, period):
  assert jax.device_count() == 8
  # A narrow MLP: 64 * 16 + 16 + 16 * 10 + 10 = 1210 float32 params, 4840 bytes.
  params = convergence.demo.init_mlp(jax.random.key(0), [64, 16, 10])
  nbytes = convergence.params_bytes(params)
  assert nbytes == 4840
  report = convergence.shard_map_report(algorithm, period, params)
  steps = 3 * period
  from_report = report.every_step_bytes * steps + report.sync_bytes * (steps // period)
  assert convergence.bytes_communicated(algorithm, period, steps, nbytes) == from_report
  # Gradients every step, or the params (and the count of finite workers) every sync.
  assert from_report == 3 * (nbytes if algorithm == "sync" else nbytes + 4)
