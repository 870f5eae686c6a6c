"""The README's demo trains: loss falls and workers stay identical."""

import importlib.util
import pathlib

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
