"""The language-model example: its corpus split, its bytes accounting, and short runs that learn."""

import contextlib
import importlib.util
import io
import pathlib
import re
import sysconfig

import numpy as np
import pytest

import optax_dist

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"

RING = 2 * 7 / 8  # What a ring all-reduce over 8 workers sends, per byte reduced.
# A tiny model: width 16, one block, 2 heads, 16 bytes of context.
TINY = ["--width", "16", "--depth", "1", "--heads", "2", "--context", "16"]
TINY += ["--batch-size", "16", "--eval-windows", "16", "--steps", "8", "--eval-every", "4"]
TINY += ["--no-progress"]
WIDTH, CONTEXT = 16, 16
# Its params: byte embeddings (tied to the output), positions, one block (two
# layer norms, the query-key-value and output projections without biases, an
# MLP of width 4 x 16) and the final layer norm.
BLOCK = 2 * 2 * WIDTH + 4 * WIDTH * WIDTH + (WIDTH * 4 * WIDTH + 4 * WIDTH)
BLOCK += 4 * WIDTH * WIDTH + WIDTH
NUM_PARAMS = 256 * WIDTH + CONTEXT * WIDTH + BLOCK + 2 * WIDTH
PARAMS_BYTES = 4 * NUM_PARAMS
LOSS_BYTES = 4  # The loss, all-reduced on every step.


def load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def train_lm():
  return load("train_lm")


def count_traces(train_lm, monkeypatch):
  """Counts the traces of the example's loss: one per compiled program that calls it."""
  count = []
  loss_fn = train_lm.loss_fn

  def counted(params, batch, *, model):
    count.append(1)
    return loss_fn(params, batch, model=model)

  monkeypatch.setattr(train_lm, "loss_fn", counted)
  return count


@pytest.fixture
def traces(train_lm, monkeypatch):
  return count_traces(train_lm, monkeypatch)


@pytest.fixture(scope="module")
def sync_run(train_lm, tmp_path_factory):
  """One synchronous run of the tiny model, read by two tests (tests/conftest.py
  runs them in one process): its result, what it printed, the loss's traces
  and its plot."""
  plot = tmp_path_factory.mktemp("sync") / "lm.png"
  out = io.StringIO()
  with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out):
    traces = count_traces(train_lm, monkeypatch)
    result = train_lm.main([*TINY, "--algorithm", "sync", "--plot", str(plot)])
  return result, out.getvalue(), len(traces), plot


def test_corpus_split_is_deterministic_and_disjoint(train_lm):
  train, val = train_lm.corpus_files()
  assert (train, val) == train_lm.corpus_files()
  assert train and val and len(val) < len(train)
  assert not set(train) & set(val)
  assert train == sorted(train) and val == sorted(val)
  # Every top-level source file of the standard library, each in one part.
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  assert set(train) | set(val) == {p for p in stdlib.glob("*.py") if p.is_file()}
  assert all("site-packages" not in p.parts for p in train + val)
  # Another seed, another split of the same files.
  train_1, val_1 = train_lm.corpus_files(seed=1)
  assert val_1 != val and set(train_1) | set(val_1) == set(train) | set(val)
  data = train_lm.load_bytes(val)
  assert data.dtype == np.uint8
  assert len(data) == sum(p.stat().st_size for p in val) + len(val) - 1


def test_corpus_split_depends_on_names_only(train_lm, tmp_path):
  for i in range(40):
    (tmp_path / f"module_{i}.py").write_text(f"x = {i}\n")
  (tmp_path / "notes.txt").write_text("not source")
  (tmp_path / "package").mkdir()
  (tmp_path / "package" / "inner.py").write_text("y = 1\n")
  train, val = train_lm.corpus_files(root=tmp_path, val_fraction=0.25)
  names = sorted(p.name for p in train + val)
  assert names == sorted(f"module_{i}.py" for i in range(40))
  # sha256 of "0/<name>": a fixed split, whatever the machine.
  assert 0 < len(val) < 20
  assert (train, val) == train_lm.corpus_files(root=tmp_path, val_fraction=0.25)
  with pytest.raises(ValueError, match="both must be non-empty"):
    train_lm.corpus_files(root=tmp_path, val_fraction=0.0)


def test_bytes_per_call_follows_the_schedule(train_lm):
  schedule = optax_dist.SyncSchedule(period=4, warmup=2, fragments=2)
  flags = [schedule(count) for count in range(8)]
  assert flags == ["warmup", "warmup", False, 0, False, 1, False, 0]
  sent = train_lm.bytes_per_call(
    flags, every_step_bytes=4, sync_bytes=1000, warmup_bytes=300, fragments=2
  )
  np.testing.assert_array_equal(sent, [304, 304, 4, 504, 4, 504, 4, 504])
  sync = train_lm.bytes_per_call([False] * 3, every_step_bytes=10, sync_bytes=0)
  np.testing.assert_array_equal(sync, [10, 10, 10])
  whole = train_lm.bytes_per_call([False, True, False, True], every_step_bytes=0, sync_bytes=8)
  np.testing.assert_array_equal(whole, [0, 8, 0, 8])


def check_learns_and_prints(result, out):
  losses = result["train_loss"]
  assert len(losses) == 8
  # Chance is ln 256 = 5.545 nats per byte; eight steps already fall below it.
  assert abs(losses[0] - np.log(256)) < 0.1, losses
  assert np.mean(losses[-2:]) < losses[0] - 0.1, losses
  assert result["eval_steps"] == [0, 4, 8]
  val = result["val_loss"]
  assert val[-1] < val[0] - 0.1 and val[-1] == result["final_val_loss"], val
  last = out.rstrip("\n").splitlines()[-1]
  assert re.fullmatch(r"validation loss: \d+\.\d{4}", last), last
  assert last == f"validation loss: {result['final_val_loss']:.4f}"


def test_sync_learns(sync_run):
  result, out, traces, plot = sync_run
  check_learns_and_prints(result, out)
  assert plot.stat().st_size > 0
  assert result["num_params"] == NUM_PARAMS
  # The gradients all-reduced on every step, with the loss: a ring all-reduce
  # over 8 workers sends 2 * 7 / 8 of its bytes.
  assert (result["every_step_bytes"], result["sync_bytes"]) == (
    pytest.approx(RING * (PARAMS_BYTES + LOSS_BYTES)),
    0,
  )
  assert result["bytes"] == pytest.approx(
    [t * RING * (PARAMS_BYTES + LOSS_BYTES) for t in (0, 4, 8)]
  )
  assert result["syncs"] == 8
  # At most one trace each for the steps, the communication report (the same
  # program) and the evaluations: not one per step.
  assert traces <= 3, traces


def test_diloco_streams_fragments_after_a_warmup(train_lm, traces, tmp_path, capsys):
  argv = ["--algorithm", "diloco", "--period", "2", "--fragments", "2", "--warmup", "2"]
  result = train_lm.main([*TINY, *argv, "--plot", str(tmp_path / "lm.png")])
  check_learns_and_prints(result, capsys.readouterr().out)
  # Every step all-reduces the loss; a warm-up step also the gradients; each
  # later step one of the two fragments of the pseudo-gradient, half the
  # params' bytes (the fragments are cut to nearly equal bytes).
  assert result["every_step_bytes"] == pytest.approx(RING * LOSS_BYTES)
  # (A sync's all-reduce also carries the count of finite workers: a few
  # float32 scalars in all.)
  assert (result["sync_bytes"], result["warmup_bytes"]) == pytest.approx(
    (RING * PARAMS_BYTES, RING * PARAMS_BYTES), abs=RING * 16
  )
  sync, warmup = result["sync_bytes"], result["warmup_bytes"]
  per_call = [RING * LOSS_BYTES + warmup] * 2 + [RING * LOSS_BYTES + sync / 2] * 6
  expected = [0, sum(per_call[:4]), sum(per_call)]
  assert result["bytes"] == pytest.approx(expected)
  assert result["syncs"] == 6  # One per fragment synced.
  # One program per kind of call (warm-up, each fragment's sync), one that
  # decides inside (for the communication report), one for the evaluations.
  assert len(traces) <= 5, len(traces)


def load_study():
  path = EXAMPLES.parent / "benchmarks" / "lm.py"
  spec = importlib.util.spec_from_file_location("lm_study", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_two_workers_of_four_devices(train_lm, tmp_path, capsys):
  argv = ["--algorithm", "diloco", "--workers", "2", "--period", "4"]
  result = train_lm.main([*TINY, *argv, "--plot", str(tmp_path / "lm.png")])
  out = capsys.readouterr().out
  check_learns_and_prints(result, out)
  assert "diloco: 2 workers on 8 devices" in out
  # Inside a worker, its 4 devices all-reduce the gradients on every step (not
  # counted as bytes between workers); every step all-reduces the loss over all
  # 8 devices; a sync all-reduces the pseudo-gradient between the 2 workers: a
  # ring of 2 sends 2 * 1 / 2 of its bytes.
  assert result["group_bytes"] == pytest.approx(2 * 3 / 4 * PARAMS_BYTES)
  assert result["every_step_bytes"] == pytest.approx(RING * LOSS_BYTES)
  # (With it, at most two float32 flags.)
  assert result["sync_bytes"] == pytest.approx(PARAMS_BYTES, abs=8)
  expected = [t * RING * LOSS_BYTES + t // 4 * result["sync_bytes"] for t in (0, 4, 8)]
  assert result["bytes"] == pytest.approx(expected)
  assert result["syncs"] == 2

  # The study's program (the 2 workers an axis of vmap, each computing its
  # gradient on its half of the same global batch) trains the same model.
  study = load_study()
  config = train_lm.Config(**{**result["config"]})
  hyper = {"learning_rate": config.learning_rate, "outer_learning_rate": 0.7}
  (run,) = study.simulate(config, [hyper], [config.seed], config.eval_every)
  np.testing.assert_allclose(run["val_loss"], result["val_loss"], rtol=2e-6)


def test_one_worker_with_a_plain_outer_step_is_data_parallel(train_lm, sync_run, tmp_path, capsys):
  # DiLoCo with one worker and outer SGD (1, 0) moves the center to where the
  # worker went: the center is synchronous training's params, up to rounding.
  # The global batch is the same: the 8 devices of the one worker split it.
  argv = ["--algorithm", "diloco", "--workers", "1", "--period", "2"]
  argv += ["--outer-learning-rate", "1", "--outer-momentum", "0"]
  result = train_lm.main([*TINY, *argv, "--plot", str(tmp_path / "lm.png")])
  check_learns_and_prints(result, capsys.readouterr().out)
  sync = sync_run[0]  # The same model, data and steps, trained synchronously.
  np.testing.assert_allclose(result["val_loss"], sync["val_loss"], rtol=1e-5)
  np.testing.assert_allclose(result["train_loss"], sync["train_loss"], rtol=1e-5)
  # One worker has no peer: nothing is sent between workers; the outer step
  # ran every 2 steps.
  assert result["bytes"] == [0, 0, 0] and result["sync_bytes"] == 0
  assert result["syncs"] == 4


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--workers", "3"], "must divide the 8 devices"),
    (["--algorithm", "sync", "--workers", "2"], "option of the periodic algorithms"),
    (["--algorithm", "model_average", "--delay", "1"], "options of diloco"),
  ],
)
def test_bad_workers_are_refused(train_lm, argv, message, capsys):
  with pytest.raises(SystemExit):
    train_lm.parse_args(argv)
  assert message in capsys.readouterr().err


def test_study_rows_and_grids():
  study = load_study()
  names = [row.name for row in study.ROWS]
  assert names[0] == "DP" and len(set(names)) == len(names)
  for m in (1, 2, 4, 8):
    assert f"DiLoCo M={m} H=32" in names
  config = study.row_config(study.ROWS[names.index("DiLoCo M=8 H=32 warm-up 10%")], 3200, {})
  assert (config.warmup, config.steps, config.workers) == (320, 3200, 8)
  # At least 100 outer steps at H = 32.
  assert study.STEPS // 32 >= 100
  outer = study.trials(study.ROWS[names.index("DiLoCo M=2 H=32")], 0.004)
  assert len(outer) == 8 and {t["outer_learning_rate"] for t in outer} == {0.4, 0.6, 0.8, 1.0}
  assert {t["learning_rate"] for t in outer} == {0.004, 0.002}
  at_m8 = study.trials(study.ROWS[names.index("DiLoCo M=8 H=8")], 0.004, 0.5)
  assert [t["learning_rate"] for t in at_m8] == [0.002] * 4
  diagnostics = {row.name: row for row in study.DIAGNOSTICS}
  low = study.trials(diagnostics["DiLoCo M=1 H=32, outer lr 0.1 or 0.2"], 0.004)
  assert low == [{"learning_rate": 0.004, "outer_learning_rate": lr} for lr in (0.1, 0.2)]
  same = study.trials(diagnostics["DP, batch x4"], 0.004, chosen={"DP": {"learning_rate": 0.005}})
  assert same == [{"learning_rate": 0.005}]
  # The gap is relative to DP's mean loss; fewer bytes is DP's over the row's.
  dp = {"final_mean": 2.0, "bytes": {"cumulative": [0.0, 700.0]}}
  row = {"final_mean": 2.1, "bytes": {"cumulative": [0.0, 7.0]}}
  assert study.gap(row, dp) == pytest.approx(5.0) and study.fewer_bytes(row, dp) == 100
  alone = {"final_mean": 2.0, "bytes": {"cumulative": [0.0, 0.0]}}
  assert study.fewer_bytes(alone, dp) == float("inf")


def test_muon_inside_int4_outside_with_a_delayed_sync(train_lm, tmp_path, capsys):
  # MuLoCo's layout (Muon inside, an int4 pseudo-gradient with error feedback)
  # with a sync delayed by one call: it learns, and a sync sends at most the
  # int4 share of the float32 params (half a byte a number, a float32 scale
  # per 64) plus the flags, far below float32's.
  argv = ["--algorithm", "diloco", "--period", "4", "--inner", "muon", "--comm-dtype", "int4"]
  argv += ["--error-feedback", "--delay", "1", "--blend", "0.5", "--learning-rate", "0.02"]
  result = train_lm.main([*TINY, *argv, "--plot", str(tmp_path / "lm.png")])
  check_learns_and_prints(result, capsys.readouterr().out)
  assert result["config"]["inner"] == "muon" and result["config"]["delay"] == 1
  assert 0 < result["sync_bytes"] < PARAMS_BYTES / 4


def test_study_rows_of_later_features():
  study = load_study()
  rows = {row.name: row for row in study.ROWS + study.MOMENTUM_HALF}
  delayed = study.row_config(rows["Delayed sync delay=1 blend=0.5 M=8 H=32"], 3200, {})
  assert (delayed.delay, delayed.blend, delayed.fragments, delayed.period) == (1, 0.5, None, 32)
  muloco = rows["MuLoCo (Muon inner) int4 + error feedback M=8 H=32"]
  config = study.row_config(muloco, 3200, {})
  assert (config.inner, config.comm_dtype, config.error_feedback) == ("muon", "int4", True)
  grid = study.trials(muloco, 0.005)
  # Muon's rates at outer 0.8, then the other outer rates at the middle one:
  # 6 trials, Adam (on the non-matrix params) at DP's rate in all.
  assert [(t["learning_rate"], t["outer_learning_rate"]) for t in grid] == [
    (0.01, 0.8),
    (0.02, 0.8),
    (0.04, 0.8),
    (0.02, 0.4),
    (0.02, 0.6),
    (0.02, 1.0),
  ]
  assert {t["adam_learning_rate"] for t in grid} == {0.005}
  for m in (1, 2, 4, 8):
    half = rows[f"DiLoCo M={m} H=32, outer momentum 0.5"]
    assert study.row_config(half, 3200, {}).outer_momentum == 0.5 and half.seeds is None
    assert [t["outer_learning_rate"] for t in study.trials(half, 0.005)] == [0.5, 1.0]


def load_size_study():
  path = EXAMPLES.parent / "benchmarks" / "lm_sizes.py"
  spec = importlib.util.spec_from_file_location("lm_sizes_study", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_size_study_rows_and_report():
  study = load_size_study()
  params = {
    size: study.num_params(study.row_config(study.DP, 3200, study.model_of(size, study.SIZES)))
    for size in study.SIZES
  }
  assert params == {"34k": 34_432, "69k": 70_080, "166k": 167_744}
  assert params["166k"] >= 4 * params["34k"]
  model = study.model_of("69k", study.SIZES)
  doubled = study.row_config(study.M8X2, 3200, model)
  # Twice the batch for half the steps: the same tokens.
  assert (doubled.steps, doubled.batch_size, doubled.workers) == (1600, 64, 8)
  warm = study.row_config(study.WARM, 3200, model)
  assert (warm.warmup, warm.outer_momentum, warm.period) == (320, 0.9, 32)
  rows = {"DP": {"chosen": {"learning_rate": 0.005}}}
  assert [t["outer_learning_rate"] for t in study.trials(study.M2, rows)] == [0.5, 1.0, 1.5]
  assert all(t["learning_rate"] == 0.005 for t in study.trials(study.M8, rows))
  with pytest.raises(RuntimeError, match="must run first"):
    study.trials(study.M2X2, rows)
  rows["DiLoCo M=2"] = {"chosen": {"learning_rate": 0.005, "outer_learning_rate": 1.0}}
  assert study.trials(study.M2X2, rows) == [rows["DiLoCo M=2"]["chosen"]]
  # The report: the gap to DP at each size, in percent of DP's loss.
  entry = lambda mean: {"final_mean": mean, "final_std": 0.0, "seeds": {}}  # noqa: E731
  results = {
    "config": {"steps": 3200, "seeds": [0, 1, 2]},
    "sizes": {
      "34k": {
        "model": model,
        "num_params": 34_432,
        "rows": {"DP": entry(2.0), "DiLoCo M=2": entry(2.1)},
      },
    },
  }
  text = study.summarize(results)
  assert "| 2 | +5.00% | +0.7% | -0.1% |" in text
  assert "| 34k | 34,432 | 48 x 2 | 2.0000 ± 0.0000 | +5.00% | not run |" in text
