"""The demos train: the tower demo's loss falls, the digits demo learns with every algorithm."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_train_tower_demo(capsys):
  result = load("train_tower").main(["--steps", "60"])
  assert result["steps"] == 60
  assert result["test_loss"] < result["first_loss"] / 4
  assert result["spread"] == 0.0  # Synchronous training keeps workers bit-identical.
  assert "8 workers, 60 steps" in capsys.readouterr().out


@pytest.fixture(scope="module")
def train_digits():
  return load("train_digits")


@pytest.mark.parametrize("algorithm", ["sync", "easgd", "agn", "model_average", "diloco"])
def test_train_digits_demo_learns(train_digits, algorithm, tmp_path, capsys):
  plot = tmp_path / "digits.png"
  argv = ["--algorithm", algorithm, "--steps", "30", "--period", "4", "--hidden", "32"]
  result = train_digits.main([*argv, "--eval-every", "10", "--plot", str(plot)])
  accuracy = result["history"]["test_accuracy"]
  # Ten classes: chance is 0.1. Thirty steps take every algorithm well past it.
  assert accuracy[-1] > 0.3 and accuracy[-1] > accuracy[0], accuracy
  # Bytes read from the compiled step: sync all-reduces the gradients every
  # step; the others the params (or their differences) once per sync. Both
  # add the metrics: the loss and the accuracy's total and count (3 x 4 B).
  params_bytes = 4 * (64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10)
  if algorithm == "sync":
    assert (result["every_step_bytes"], result["per_sync_bytes"]) == (params_bytes + 12, 0)
    assert result["bytes"] == 30 * (params_bytes + 12)
  else:
    assert (result["every_step_bytes"], result["per_sync_bytes"]) == (12, params_bytes)
    assert result["syncs"] == 30 // 4
    assert result["bytes"] == 30 * 12 + 7 * params_bytes
  assert plot.stat().st_size > 0
  out = capsys.readouterr().out
  assert f"{algorithm}: 8 workers, 30 steps" in out and "test accuracy" in out


def test_train_digits_demo_hierarchical(train_digits, tmp_path, capsys):
  argv = ["--algorithm", "easgd", "--steps", "30", "--period", "4", "--hidden", "32"]
  argv += ["--hierarchical", "--eval-every", "10", "--plot", str(tmp_path / "h.png")]
  result = train_digits.main(argv)
  accuracy = result["history"]["test_accuracy"]
  assert accuracy[-1] > 0.3 and accuracy[-1] > accuracy[0], accuracy
  # Every step the gradients within each host (and the metrics); per sync the
  # params across the hosts.
  params_bytes = 4 * (64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10)
  assert (result["every_step_bytes"], result["per_sync_bytes"]) == (params_bytes + 12, params_bytes)
  assert result["syncs"] == 30 // 4
  assert "8 workers (2 hosts x 4 devices), 30 steps" in capsys.readouterr().out
