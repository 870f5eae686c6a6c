"""Several processes joined by jax.distributed (2 processes x 2 CPU devices, gloo).

The processes run ``tests/mp_worker.py``. One launch runs every algorithm, the
non-finite skip wrapper, the agreement checks and an uninterrupted checkpointed
training; the test compares them with the same code run here, in one process
on 4 of its 8 devices. Further launches, through ``python -m optax_dist.launch``,
kill a process and check the restart and the failure report.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import mp_worker
import numpy as np
import pytest

import optax_dist
from optax_dist import launch

WORKER = pathlib.Path(__file__).with_name("mp_worker.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
WAIT_S = 180  # Bound on one launch; a normal one takes seconds.


def _base_env():
  env = dict(os.environ)
  # Not the 8 devices of conftest.py: 2 per process. And XLA's default CPU
  # compiler, not conftest's faster-compiling settings: the two-process tests
  # check the static flags against the in-graph program bit for bit, as users
  # compile them.
  flags = re.sub(
    r"--xla_(force_host_platform_device_count|cpu_\w+|backend_optimization_level)=\S*",
    "",
    env.get("XLA_FLAGS", ""),
  )
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
  env["OPTAX_DIST_TIMEOUT"] = "30"
  for name in ("OPTAX_DIST_COORDINATOR", "OPTAX_DIST_PROCESS_ID", "OPTAX_DIST_RESTART"):
    env.pop(name, None)
  return env


def _kill_group(proc):
  if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


def run_processes(args, logs):
  """Starts the worker as 2 processes joined directly; returns their exit codes and stderr."""
  port = launch.free_port()
  procs, files = [], []
  try:
    for i in range(NUM_PROCESSES):
      env = _base_env()
      env["OPTAX_DIST_COORDINATOR"] = f"127.0.0.1:{port}"
      env["OPTAX_DIST_NUM_PROCESSES"] = str(NUM_PROCESSES)
      env["OPTAX_DIST_PROCESS_ID"] = str(i)
      env["OPTAX_DIST_DEVICES_PER_PROCESS"] = str(DEVICES_PER_PROCESS)
      log = open(logs / f"process_{i}.log", "w+")  # Closed below.
      files.append(log)
      procs.append(
        subprocess.Popen(
          [sys.executable, str(WORKER), *map(str, args)],
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )
    deadline = time.monotonic() + WAIT_S
    codes = [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
  finally:
    for proc in procs:
      _kill_group(proc)
    for log in files:
      log.close()
  outputs = [(logs / f"process_{i}.log").read_text() for i in range(NUM_PROCESSES)]
  return codes, outputs


def run_launcher(launcher_args, worker_args, logs):
  """``python -m optax_dist.launch ... mp_worker.py ...``; its exit code and stderr."""
  log_path = logs / "launcher.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "optax_dist.launch",
        "--num-processes",
        str(NUM_PROCESSES),
        "--devices-per-process",
        str(DEVICES_PER_PROCESS),
        *launcher_args,
        str(WORKER),
        *map(str, worker_args),
      ],
      env=_base_env(),
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,  # The launcher and its children: one group to kill.
    )
    try:
      code = proc.wait(timeout=WAIT_S)
    finally:
      _kill_group(proc)
  return code, log_path.read_text()


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("all")
  codes, outputs = run_processes(["all", out, out / "checkpoints"], out)
  assert codes == [0, 0], outputs
  results = [np.load(out / f"all_{i}.npz") for i in range(NUM_PROCESSES)]
  trains = [np.load(out / f"train_{i}.npz") for i in range(NUM_PROCESSES)]
  return results, trains


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return mp_worker.mesh()


def _assert_leaves(result, name, params, state, **tolerance):
  for kind, tree in (("params", params), ("state", state)):
    leaves = jax.tree.leaves(tree)
    assert len([k for k in result.files if k.startswith(f"{name}/{kind}/")]) == len(leaves)
    for i, leaf in enumerate(leaves):
      got = result[f"{name}/{kind}/{i}"]
      if tolerance:
        np.testing.assert_allclose(got, leaf, **tolerance, err_msg=f"{name}/{kind}/{i}")
      else:
        np.testing.assert_array_equal(got, leaf, err_msg=f"{name}/{kind}/{i}")


def test_both_processes_read_the_same_results(all_run):
  (first, second), _ = all_run
  assert sorted(first.files) == sorted(second.files)
  for key in first.files:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


@pytest.mark.parametrize("name", sorted(mp_worker.algorithms()))
def test_every_algorithm_matches_one_process(all_run, mesh, name):
  (result, _), _ = all_run
  x, y = mp_worker.data(mp_worker.STEPS)
  params, state = mp_worker.run_algorithm(mp_worker.algorithms()[name], mesh, x, y)
  _assert_leaves(result, name, params, state, rtol=1e-6, atol=1e-6)
  # The run went through at least two syncs and moved the params.
  assert int(optax_dist.global_step(state)[0]) >= 2
  assert not np.allclose(params["w"], mp_worker.initial_params()["w"])


@pytest.mark.parametrize("name", sorted(set(mp_worker.algorithms()) - {"tower"}))
def test_static_flags_give_the_in_graph_results_on_two_processes(all_run, name):
  # The flags of the schedule, passed by the loop on each process: the same
  # results as the program deciding from its counter, bit for bit.
  (result, _), _ = all_run
  in_graph = [k for k in result.files if k.startswith(f"{name}/")]
  assert in_graph
  for key in in_graph:
    np.testing.assert_array_equal(result[f"static/{key}"], result[key], err_msg=key)


def test_fsdp_replicas_across_processes_match_one_process(all_run):
  # The replicas' axis across the 2 processes, "fsdp" inside each: the same
  # as the same mesh on 4 devices of one process.
  (result, _), _ = all_run
  params, state = mp_worker.fsdp_run(mp_worker.fsdp_mesh())
  _assert_leaves(result, "fsdp", params, state, rtol=1e-6, atol=1e-6)
  assert int(optax_dist.global_step(state)[0]) == mp_worker.STEPS // 2


def test_nan_on_one_worker_of_one_process_skips_the_step_everywhere(all_run, mesh):
  (result, _), _ = all_run
  tx = mp_worker.nonfinite_transform()
  params, state = mp_worker.run_algorithm(tx, mesh, *mp_worker.nonfinite_data())
  _assert_leaves(result, "nonfinite", params, state, rtol=1e-6, atol=1e-6)
  # Every worker skipped step 3 (a sync step): 6 steps applied, 3 syncs, same counters.
  np.testing.assert_array_equal(state.total_notfinite, [1] * mp_worker.N)
  np.testing.assert_array_equal(state.inner_state.sync.calls, [mp_worker.STEPS - 1] * mp_worker.N)
  np.testing.assert_array_equal(state.inner_state.sync.num_syncs, [3] * mp_worker.N)
  assert np.isfinite(params["w"]).all() and np.isfinite(state.inner_state.center["w"]).all()
  # Exactly the run without that step.
  x, y = mp_worker.data(mp_worker.STEPS)
  ref_params, ref_state = mp_worker.run_algorithm(
    tx, mesh, np.delete(x, 3, axis=0), np.delete(y, 3, axis=0)
  )
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, ref_state.inner_state)


def test_a_nan_worker_on_one_process_recovers_at_the_next_sync(all_run, mesh):
  # No guard: worker 3 (process 1) goes NaN on a local step; the sync on
  # call 3 averages the other three, worker 3 restarts on the center, and
  # two processes give what one process gives.
  (result, _), _ = all_run
  params, state = mp_worker.recovery_run(mesh)
  _assert_leaves(result, "recovery", params, state, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(state.sync.num_dropped, [0, 0, 0, 1])
  np.testing.assert_array_equal(state.sync.num_skipped_syncs, [0] * mp_worker.N)
  np.testing.assert_array_equal(state.sync.num_syncs, [mp_worker.STEPS // 3] * mp_worker.N)
  assert np.isfinite(params["w"]).all() and np.isfinite(state.center["w"]).all()


def test_disagreement_raises_the_same_error_on_every_process(all_run):
  (first, second), _ = all_run
  for key in ("agree/period", "agree/multisteps", "agree/params"):
    assert str(first[key]) == str(second[key])
  multisteps = str(first["agree/multisteps"])
  assert "every_k_schedule = 3 (process 0: 2)" in multisteps, multisteps
  period = str(first["agree/period"])
  assert "process 1 (workers 2, 3) differs from process 0" in period
  assert "settings.engine.phases.sync.period = 4 (process 0: 3)" in period
  params = str(first["agree/params"])
  assert "params['w'] on workers 2, 3 (process 1) differ from worker 0's" in params
  assert "params['b'] on workers 2, 3 (process 1)" in params
  assert "settings" not in params.split("\n")[1]


def test_disagreeing_processes_both_exit_with_the_error(tmp_path):
  codes, outputs = run_processes(["disagree", tmp_path], tmp_path)
  assert all(code != 0 for code in codes), codes
  for output in outputs:
    assert "ValueError: check_agreement: the 4 workers on axis ('workers',) disagree" in output
    assert "settings.engine.phases.sync.period = 4 (process 0: 3)" in output


def test_crash_and_resume_is_bit_identical(all_run, tmp_path):
  _, (uninterrupted, _) = all_run
  code, output = run_launcher(
    ["--max-restarts", "1"], ["train", tmp_path, tmp_path / "checkpoints", "--kill-at", 6], tmp_path
  )
  assert code == 0, output
  assert re.search(
    r"optax_dist\.launch: process 1 \(pid \d+\) was killed by signal SIGKILL; stopped the "
    r"others, restarting all 2 processes \(restart 1 of 1\)\.",
    output,
  ), output
  for i in range(NUM_PROCESSES):
    resumed = np.load(tmp_path / f"train_{i}.npz")
    # The second run started from the checkpoint of step 4 (the kill came at step 6).
    assert int(resumed["restart"]) == 1 and int(resumed["start"]) == 4
    assert int(uninterrupted["start"]) == 0
    np.testing.assert_array_equal(resumed["step"], [mp_worker.TRAIN_STEPS] * mp_worker.N)
    np.testing.assert_array_equal(resumed["num_syncs"], [mp_worker.TRAIN_STEPS // 3] * mp_worker.N)
    keys = [k for k in uninterrupted.files if k.startswith("train/")]
    assert len(keys) > 5
    for key in keys:
      np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)


def test_dead_process_without_restart_fails_with_a_clear_message(tmp_path):
  code, output = run_launcher(
    ["--max-restarts", "0"], ["train", tmp_path, tmp_path / "checkpoints", "--kill-at", 0], tmp_path
  )
  assert code == 128 + signal.SIGKILL, output
  assert re.search(
    r"optax_dist\.launch: process 1 \(pid \d+\) was killed by signal SIGKILL; no restart "
    r"left \(--max-restarts 0\), giving up\.",
    output,
  ), output
  assert not (tmp_path / "train_0.npz").exists()


def test_launcher_sets_the_environment(tmp_path):
  script = tmp_path / "env.py"
  script.write_text(
    "import os, sys\n"
    "keys = ['OPTAX_DIST_COORDINATOR', 'OPTAX_DIST_NUM_PROCESSES', 'OPTAX_DIST_PROCESS_ID',\n"
    "        'OPTAX_DIST_DEVICES_PER_PROCESS', 'OPTAX_DIST_RESTART', 'XLA_FLAGS']\n"
    "with open(os.path.join(sys.argv[1], os.environ['OPTAX_DIST_PROCESS_ID']), 'w') as f:\n"
    "  f.write(' '.join(os.environ[k] for k in keys))\n"
  )
  port = launch.free_port()
  command = [sys.executable, "-m", "optax_dist.launch", "--num-processes", "2"]
  command += ["--devices-per-process", "3", "--port", str(port), str(script), str(tmp_path)]
  env = _base_env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  assert subprocess.run(command, env=env, check=False, timeout=WAIT_S).returncode == 0
  for i in range(NUM_PROCESSES):
    words = (tmp_path / str(i)).read_text().split()
    flags = "--xla_force_host_platform_device_count=3"
    assert words == [f"127.0.0.1:{port}", "2", str(i), "3", "0", flags]


def test_launcher_keeps_memory_where_asked_and_the_environment_wins(monkeypatch):
  # The environment each process gets (the launcher's own test above runs it end to end).
  keys = ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
  for key in keys:
    monkeypatch.delenv(key, raising=False)
  for flags, extra, expected in [
    ([], {}, [None, None, None]),
    (["--keep-memory"], {}, ["1", str(4 << 30), str(64 << 30)]),
    (["--keep-memory"], {"MALLOC_ARENA_MAX": "4"}, ["4", str(4 << 30), str(64 << 30)]),
  ]:
    for key, value in extra.items():
      monkeypatch.setenv(key, value)
    args = launch._parser().parse_args(["--num-processes", "2", *flags, "train.py"])
    env = launch._environment(args, 1234, 1, 0)
    assert [env.get(k) for k in keys] == expected
    assert env["OPTAX_DIST_PROCESS_ID"] == "1"
