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


# Bytes of the 64-32-32-10 MLP's params, the gradients' size, and of the
# metrics all-reduced every step: the loss and the accuracy's total and count.
PARAMS_BYTES = 4 * (64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10)
METRICS_BYTES = 3 * 4
RING = 2 * 7 / 8  # A ring all-reduce over 8 workers sends this much per byte reduced.
COUNT_BYTES = 4  # A sync's count of finite workers, in the same all-reduce.
SHORT = ["--steps", "30", "--period", "4", "--hidden", "32", "--eval-every", "10"]


# sync and diloco, the default pair, are tested together below.
@pytest.mark.parametrize("algorithm", ["easgd", "agn", "model_average"])
def test_train_digits_demo_learns(train_digits, algorithm, tmp_path, capsys):
  plot = tmp_path / "digits.png"
  runs = train_digits.main([*SHORT, "--algorithm", algorithm, "--plot", str(plot)])
  assert list(runs) == [algorithm]
  result = runs[algorithm]
  accuracy = result["history"]["test_accuracy"]
  # Ten classes: chance is 0.1. Thirty steps take every algorithm well past it.
  assert accuracy[-1] > 0.3 and accuracy[-1] > accuracy[0], accuracy
  # Bytes sent on the wire, read from the compiled step: the params (or their
  # differences) once per sync, and the metrics on every step, each through a
  # ring all-reduce over 8 workers (2 * 7 / 8 of its bytes).
  assert (result["every_step_bytes"], result["per_sync_bytes"]) == pytest.approx(
    (RING * METRICS_BYTES, RING * (PARAMS_BYTES + COUNT_BYTES))
  )
  assert result["syncs"] == 30 // 4
  assert result["bytes"] == pytest.approx(
    RING * (30 * METRICS_BYTES + 7 * (PARAMS_BYTES + COUNT_BYTES))
  )
  assert plot.stat().st_size > 0
  out = capsys.readouterr().out
  assert f"{algorithm}: 8 workers, 30 steps" in out and "test accuracy" in out
  assert "summary" not in out  # One algorithm: nothing to compare.


def test_train_digits_demo_compares_sync_and_diloco_by_default(train_digits, tmp_path, capsys):
  plot = tmp_path / "digits.png"
  runs = train_digits.main([*SHORT, "--plot", str(plot)])
  assert list(runs) == ["sync", "diloco"]
  for run in runs.values():
    accuracy = run["history"]["test_accuracy"]
    assert accuracy[-1] > 0.3 and accuracy[-1] > accuracy[0], accuracy
  # Bytes read from the compiled step: sync all-reduces the gradients every
  # step, diloco the pseudo-gradient once per sync; both add the metrics.
  sync, diloco = runs["sync"], runs["diloco"]
  assert (sync["every_step_bytes"], sync["per_sync_bytes"]) == pytest.approx(
    (RING * (PARAMS_BYTES + METRICS_BYTES), 0)
  )
  assert (diloco["every_step_bytes"], diloco["per_sync_bytes"]) == pytest.approx(
    (RING * METRICS_BYTES, RING * (PARAMS_BYTES + COUNT_BYTES))
  )
  assert (sync["syncs"], diloco["syncs"]) == (30, 30 // 4)
  # The bytes each worker had sent by each evaluation (steps 10, 20, 30):
  # sync the gradients on every step, diloco the params on steps 4, 8, ...
  assert sync["history"]["bytes"] == pytest.approx(
    [RING * t * (PARAMS_BYTES + METRICS_BYTES) for t in (10, 20, 30)]
  )
  assert diloco["history"]["bytes"] == pytest.approx(
    [RING * (t * METRICS_BYTES + (t // 4) * (PARAMS_BYTES + COUNT_BYTES)) for t in (10, 20, 30)]
  )
  assert (sync["bytes"], diloco["bytes"]) == (
    sync["history"]["bytes"][-1],
    diloco["history"]["bytes"][-1],
  )
  ratio = sync["bytes"] / diloco["bytes"]
  out = capsys.readouterr().out
  assert "sync: 8 workers, 30 steps" in out and "diloco: 8 workers, 30 steps" in out
  # One summary line per algorithm: its test accuracy and its megabytes.
  sync_line = f"  sync           {sync['test_accuracy']:.4f}"
  diloco_line = f"  diloco         {diloco['test_accuracy']:.4f}"
  assert sync_line in out and diloco_line in out
  assert f"MB, {ratio:.1f}x fewer" in out
  # The final and the best accuracy of both runs; DiLoCo's is its center's.
  for run in runs.values():
    accuracy, steps = run["history"]["test_accuracy"], run["history"]["eval_step"]
    assert run["best_accuracy"] == max(accuracy)
    assert accuracy[steps.index(run["best_step"])] == run["best_accuracy"]
    final, best = run["test_accuracy"], run["best_accuracy"]
    assert f"{final:.4f} final, best {best:.4f} (step {run['best_step']})" in out
  assert "periodic algorithms are evaluated on their center" in out
  assert "test accuracy (center)" in out
  # The run's own saving is the summary's: one figure, in wire bytes.
  assert f"  {ratio:.1f}x fewer bytes than all-reducing the gradients every step" in out
  assert plot.stat().st_size > 0


def test_train_digits_demo_hierarchical(train_digits, tmp_path, capsys):
  argv = [*SHORT, "--algorithm", "sync", "easgd", "--hierarchical"]
  runs = train_digits.main([*argv, "--plot", str(tmp_path / "h.png")])
  for run in runs.values():
    accuracy = run["history"]["test_accuracy"]
    assert accuracy[-1] > 0.3 and accuracy[-1] > accuracy[0], accuracy
  # easgd: every step the gradients within each host of 4 devices (a ring
  # sends 2 * 3 / 4 of them) and the metrics over all 8; per sync the params
  # across the 2 hosts (2 * 1 / 2) with the count of finite hosts, and the 4
  # devices of a host agree that their contribution, then the synced params,
  # are finite (two int32s over 4: 2 * 1.5 * 4 bytes). sync: the gradients
  # over all 8 devices.
  easgd = runs["easgd"]
  assert (easgd["every_step_bytes"], easgd["per_sync_bytes"]) == pytest.approx(
    (1.5 * PARAMS_BYTES + RING * METRICS_BYTES, PARAMS_BYTES + COUNT_BYTES + 2 * 1.5 * 4)
  )
  assert easgd["syncs"] == 30 // 4
  assert (runs["sync"]["every_step_bytes"], runs["sync"]["per_sync_bytes"]) == pytest.approx(
    (RING * (PARAMS_BYTES + METRICS_BYTES), 0)
  )
  out = capsys.readouterr().out
  assert "easgd: 8 workers (2 hosts x 4 devices), 30 steps" in out
  assert "sync: 8 workers (2 hosts x 4 devices), 30 steps" in out
