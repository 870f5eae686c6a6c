"""Starts the processes of a multi-process JAX job on this machine, and restarts them.

Run a script as N processes joined by ``jax.distributed``::

  python -m optax_dist.launch --num-processes 2 --devices-per-process 2 \\
      train.py --steps 1000

Every process runs ``python train.py --steps 1000`` with these environment
variables, which :func:`optax_dist.initialize_from_env` reads to call
``jax.distributed.initialize`` (gloo collectives on CPU):

* ``OPTAX_DIST_COORDINATOR``: ``127.0.0.1:PORT``, process 0's coordinator
  (``--port``; a free port when not given).
* ``OPTAX_DIST_NUM_PROCESSES``, ``OPTAX_DIST_PROCESS_ID``.
* ``OPTAX_DIST_DEVICES_PER_PROCESS`` (with ``--devices-per-process``): CPU
  devices per process; a ``--xla_force_host_platform_device_count`` in
  ``XLA_FLAGS`` is replaced by it.
* ``OPTAX_DIST_TIMEOUT`` (``--timeout``): seconds to wait for the other
  processes at start-up and the heartbeat timeout.
* ``OPTAX_DIST_RESTART``: 0 on the first run, then the number of restarts.

With ``--keep-memory`` the processes also get glibc's allocator settings in
``KEEP_MEMORY`` (one arena, no ``mmap`` for large blocks, no trimming),
where the environment does not set them already. XLA's CPU runtime
allocates a program's temporaries on every call, and with glibc's defaults
they go back to the kernel after each step and return as fresh pages: a
quantized or top-k sync of 4.2M params took 41K to 49K page faults and
1.5x to 1.8x its CPU time. A process then keeps its peak memory.

Failures. When a process dies (a non-zero exit or a signal) the others are
usually blocked in their next collective and would wait for a timeout. The
launcher polls its children, so it notices the death at once, gives the
others ``--grace-period`` seconds to exit on their own (so that an error every
process raises, such as :func:`optax_dist.check_agreement`'s, is printed by
all of them), then stops them with SIGTERM and, after ``--kill-timeout``
seconds, SIGKILL (a survivor usually needs it: JAX's distributed runtime takes
SIGTERM as a preemption notice, and a process blocked in a collective does not
return to Python). Defaults: 1 s and 2 s, so a job is stopped about 3 s after a
death rather than at the heartbeat timeout. With ``--max-restarts K`` it then starts all processes again
(up to K times, on a fresh port); a script that checkpoints, e.g. with orbax,
resumes from its latest checkpoint, one without checkpoints starts over. When
no restart is left, it prints which process died and how, e.g.::

  optax_dist.launch: process 1 (pid 4242) was killed by signal SIGKILL; no restart left (--max-restarts 0), giving up.

and exits with that process's status: its exit code, or 128 + the signal
number for a signal (137 for SIGKILL), as a shell does. A SIGINT or SIGTERM
sent to the launcher stops all children the same way.

Several machines. This launcher starts processes on one machine (tests, and
trying a job out). On several hosts start one process per host with your
cluster's tools (SLURM, Kubernetes, ssh) and call ``jax.distributed.initialize``
with the coordinator's address, or set the variables above on every host and
call :func:`optax_dist.initialize_from_env`.
"""

import argparse
from collections.abc import Sequence
import os
import re
import signal
import socket
import subprocess
import sys
import time

from optax_dist import _distributed

_PREFIX = "optax_dist.launch:"

# glibc's allocator keeps what it frees: one arena, no mmap, no trimming.
KEEP_MEMORY = {
  "MALLOC_ARENA_MAX": "1",
  "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
  "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
}


def free_port() -> int:
  """A TCP port that is free on 127.0.0.1 right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m optax_dist.launch",
    description="Run a script as N local processes joined by jax.distributed.",
  )
  parser.add_argument("--num-processes", type=int, required=True, help="processes to start")
  parser.add_argument(
    "--devices-per-process", type=int, default=None, help="CPU devices per process"
  )
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  parser.add_argument(
    "--max-restarts", type=int, default=0, help="restarts of the whole job after a failure"
  )
  parser.add_argument(
    "--grace-period",
    type=float,
    default=1.0,
    help="seconds the others may take to exit on their own after one fails",
  )
  parser.add_argument(
    "--kill-timeout", type=float, default=2.0, help="seconds from SIGTERM to SIGKILL"
  )
  parser.add_argument(
    "--timeout", type=int, default=60, help="start-up and heartbeat timeout of jax.distributed"
  )
  parser.add_argument(
    "--keep-memory",
    action="store_true",
    help="glibc keeps freed memory in each process (KEEP_MEMORY; fewer page faults on CPU)",
  )
  parser.add_argument("script", help="the Python script every process runs")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
  return parser


def _describe(returncode: int) -> str:
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = str(-returncode)
    return f"was killed by signal {name}"
  return f"exited with code {returncode}"


def _exit_status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def _environment(args: argparse.Namespace, port: int, process_id: int, restart: int) -> dict:
  env = dict(os.environ)
  env[_distributed.ENV_COORDINATOR] = f"127.0.0.1:{port}"
  env[_distributed.ENV_NUM_PROCESSES] = str(args.num_processes)
  env[_distributed.ENV_PROCESS_ID] = str(process_id)
  env[_distributed.ENV_RESTART] = str(restart)
  env[_distributed.ENV_TIMEOUT] = str(args.timeout)
  if args.keep_memory:
    env = {**KEEP_MEMORY, **env}  # A setting in the environment wins.
  if args.devices_per_process is not None:
    env[_distributed.ENV_DEVICES_PER_PROCESS] = str(args.devices_per_process)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    flags += f" --xla_force_host_platform_device_count={args.devices_per_process}"
    env["XLA_FLAGS"] = flags.strip()
  return env


def _stop(procs: Sequence[subprocess.Popen], kill_timeout: float) -> None:
  """SIGTERM every live process, then SIGKILL those still alive after kill_timeout."""
  for proc in procs:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + kill_timeout
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


class _Interrupted(Exception):
  pass


def _run_once(args: argparse.Namespace, port: int, restart: int) -> tuple[int, int, int] | None:
  """Runs the job once: None if every process succeeded, else (process id, pid, returncode)."""
  command = [sys.executable, args.script, *args.args]
  procs: list[subprocess.Popen] = []
  try:
    for i in range(args.num_processes):
      procs.append(subprocess.Popen(command, env=_environment(args, port, i, restart)))
    failed = None
    while failed is None:
      codes = [proc.poll() for proc in procs]
      if all(code == 0 for code in codes):
        return None
      bad = [(i, procs[i].pid, code) for i, code in enumerate(codes) if code not in (None, 0)]
      if bad:
        # A process killed by a signal is the cause; the others fail after it.
        failed = min(bad, key=lambda item: (item[2] >= 0, item[0]))
      else:
        time.sleep(0.05)
    deadline = time.monotonic() + args.grace_period
    while time.monotonic() < deadline and any(proc.poll() is None for proc in procs):
      time.sleep(0.05)
    return failed
  finally:
    _stop(procs, args.kill_timeout)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the launcher with command-line arguments ``argv``; returns the exit status."""
  args = _parser().parse_args(argv)
  if args.num_processes < 1:
    raise SystemExit(f"{_PREFIX} --num-processes must be >= 1, got {args.num_processes}.")
  if args.max_restarts < 0:
    raise SystemExit(f"{_PREFIX} --max-restarts must be >= 0, got {args.max_restarts}.")

  def interrupt(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)

  signal.signal(signal.SIGTERM, interrupt)
  signal.signal(signal.SIGINT, interrupt)
  try:
    for restart in range(args.max_restarts + 1):
      port = args.port if args.port is not None else free_port()
      failed = _run_once(args, port, restart)
      if failed is None:
        return 0
      process_id, pid, code = failed
      what = f"{_PREFIX} process {process_id} (pid {pid}) {_describe(code)}"
      if restart < args.max_restarts:
        print(
          f"{what}; stopped the others, restarting all {args.num_processes} processes "
          f"(restart {restart + 1} of {args.max_restarts}).",
          file=sys.stderr,
          flush=True,
        )
        continue
      print(
        f"{what}; no restart left (--max-restarts {args.max_restarts}), giving up.",
        file=sys.stderr,
        flush=True,
      )
      return _exit_status(code)
  except _Interrupted as e:
    print(f"{_PREFIX} received {e}; stopped all processes.", file=sys.stderr, flush=True)
    return 130 if str(e) == "SIGINT" else 143
  raise AssertionError("unreachable")


if __name__ == "__main__":
  sys.exit(main())
