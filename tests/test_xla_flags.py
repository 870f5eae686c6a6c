"""The suite's XLA compiler settings: only those the installed XLA accepts are set."""

import os
import pathlib
import subprocess
import sys

import conftest
import xla_flags


def test_an_unknown_flag_is_left_out_and_the_known_ones_kept():
  planted = {**conftest.COMPILER_FLAGS, "xla_no_such_flag_for_the_test": "1"}
  kept = xla_flags.known(planted)
  assert "xla_no_such_flag_for_the_test" not in kept
  assert set(kept) <= set(conftest.COMPILER_FLAGS)
  assert kept or not conftest.COMPILER_FLAGS  # Not everything dropped with the planted flag.
  # The test processes run with exactly the kept settings (so XLA started with
  # them: this process is one).
  flags = os.environ["XLA_FLAGS"]
  assert all(f"--{name}={value}" in flags for name, value in kept.items())
  assert all(f"--{name}=" not in flags for name in set(conftest.COMPILER_FLAGS) - set(kept))


def test_the_suite_starts_with_a_planted_unknown_flag(tmp_path):
  # The test configuration with an extra flag this XLA does not know: its
  # processes start and run a test, where the raw flag would abort them.
  source = pathlib.Path(conftest.__file__).read_text()
  marker = "COMPILER_FLAGS: dict[str, str] = {}\n"
  assert marker in source
  planted = source.replace(
    marker, marker + 'COMPILER_FLAGS["xla_no_such_flag_for_the_test"] = "1"\n'
  )
  (tmp_path / "conftest.py").write_text(planted)
  (tmp_path / "test_one.py").write_text(
    "import jax\n\ndef test_devices():\n  assert jax.device_count() == 8\n"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_XDIST_WORKER")}
  env["PYTHONPATH"] = os.path.dirname(xla_flags.__file__)
  run = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", str(tmp_path)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert run.returncode == 0, run.stdout + run.stderr
  assert "1 passed" in run.stdout
