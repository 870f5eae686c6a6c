"""Step time over a rate-limited link: sync against the periodic algorithms.

Two JAX processes (one CPU device each, gloo collectives, joined by
``optax_dist.initialize_from_env``) run in two network namespaces joined by a
veth pair whose both ends are rate-limited with ``tc`` (a token bucket,
``tbf``), so every byte of every collective crosses a link of known bandwidth,
and nothing leaves the namespaces. They train an MLP of about 4.2M parameters
(16.8 MB in float32) with Adam, and time per step (median over repetitions
of a window of whole periods):

* ``compute``: a plain local Adam step (no collective), the compute alone;
* ``sync``: ``tower(adam)``, the gradients all-reduced (pmean) on every step;
* each periodic algorithm (``easgd``, ``agn``, ``model_average``, ``diloco``)
  at each period ``p`` with static dispatch (one program per kind of call,
  picked on the host from the transform's schedule, as
  ``optax_dist.data_parallel_step`` does), and at ``p = 16`` also with the
  in-graph decision (one program, ``sync=None``);
* ``diloco_int8``: DiLoCo's pseudo-gradient through the int8 ring (with error
  feedback); at ``p = 1`` every step is a sync step;
* ``diloco_f4``: streaming DiLoCo, one of 4 fragments every 4 steps at
  ``p = 16``: the same bytes per period, a quarter in the heaviest step;
* ``diloco_int4``, ``diloco_int2`` (packed rings, error feedback) and
  ``diloco_topk2_int4`` (top-k 2% with int4 values) at ``p = 1``.

Next to each measured time is the model

    t(p) = t_compute + W / (p * bandwidth)

with W the bytes a worker sends on the wire per period, read from the
compiled programs (``optax_dist.communication_report``, ring convention: an
all-reduce of B bytes sends 2 (N - 1) / N * B, an all-to-all or all-gather
that delivers B bytes (N - 1) / N * B), N = 2 workers. Before the processes
start, a TCP transfer between the namespaces measures what the link really
delivers. TCP's slow start after idle is off in both namespaces, as on a
training cluster's hosts (a sync follows a pause of H - 1 local steps, and
would otherwise restart from TCP's initial congestion window);
``--slow-start-after-idle`` keeps Linux's default.

The workers run with glibc's allocator told to keep the memory it is given
(``optax_dist.launch.KEEP_MEMORY``: one arena, no ``mmap`` for large
blocks, no trimming). XLA's CPU runtime allocates a program's temporaries
on every call; with glibc's defaults they went back to the kernel after
each step and came back as fresh pages, 41K to 49K page faults a DiLoCo sync step at 4.2M params
(``benchmarks/sync_cpu.py``). ``--default-malloc`` keeps glibc's defaults.

``--collectives`` times bare collectives across the link instead (a
float32 all-reduce of the params, and 1 MiB through ``psum``,
``all_to_all``, ``all_gather`` and ``ppermute``): the rate each gets.

Needs root, ``ip`` (iproute2, with network namespaces and veth), ``tc`` and
``unshare``; not run in CI. The namespaces and the veth pair are removed on
exit, also on errors and on SIGINT/SIGTERM; every child runs under a timeout.

    sudo python benchmarks/network.py --rates 100mbit 1gbit
"""

import argparse
import atexit
import contextlib
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
AXIS = "workers"
N = 2  # Processes, one worker each.
SIZES = (1024, 2048, 1024, 10)  # 4,207,626 parameters.
BATCH = 32  # Per worker.
PERIODS = (1, 4, 16)
ALGORITHMS = ("easgd", "agn", "model_average", "diloco")
SUBNET = "10.231.77"  # Private addresses, only inside the namespaces.
PORT = 29517
PROBE_PORT = 29518


# --- the link ------------------------------------------------------------------------------


def rate_bits(rate):
  """'100mbit' -> 1e8 bits per second (tc's units: kbit, mbit, gbit)."""
  m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate)
  if not m:
    raise ValueError(f"rate {rate!r}: write it as tc does, e.g. 100mbit or 1gbit")
  return float(m.group(1)) * {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[m.group(2)]


class Link:
  """Two namespaces joined by a rate-limited veth pair; ``close`` removes everything."""

  def __init__(self, rate, slow_start_after_idle=False):
    self.slow_start_after_idle = slow_start_after_idle
    tag = f"{os.getpid() % 100000}"
    self.namespaces = [f"odbench{tag}a", f"odbench{tag}b"]
    self.devices = [f"odv{tag}a", f"odv{tag}b"]
    self.ips = [f"{SUBNET}.1", f"{SUBNET}.2"]
    self.rate = rate
    self.closed = False
    atexit.register(self.close)
    try:
      self._create()
    except BaseException:
      self.close()
      raise

  def _create(self):
    for ns in self.namespaces:
      run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", self.devices[0], "type", "veth", "peer", "name", self.devices[1]])
    bits = rate_bits(self.rate)
    # The bucket holds 5 ms of traffic, and at least two 64 KiB segments (veth
    # passes segmentation-offloaded packets of up to 64 KiB whole).
    burst = max(int(bits / 8 * 0.005), 2 * 65536)
    for ns, dev, ip in zip(self.namespaces, self.devices, self.ips, strict=True):
      run(["ip", "link", "set", dev, "netns", ns])
      run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
      run(["ip", "-n", ns, "link", "set", dev, "up"])
      run(["ip", "-n", ns, "link", "set", "lo", "up"])
      # A sync follows a pause of H - 1 local steps. With slow start after idle
      # (Linux's default), TCP restarts every such sync from its initial
      # congestion window; clusters turn it off for long-lived connections.
      flag = f"net.ipv4.tcp_slow_start_after_idle={int(self.slow_start_after_idle)}"
      run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", flag])
      tbf = ["tbf", "rate", self.rate, "burst", str(burst), "latency", "100ms"]
      run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *tbf])

  def qdisc(self):
    return [
      run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev]).strip()
      for ns, dev in zip(self.namespaces, self.devices, strict=True)
    ]

  def close(self):
    if self.closed:
      return
    self.closed = True
    for ns in self.namespaces:  # Deleting a namespace deletes the veth end in it.
      subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
    # A veth pair not moved yet lives in this namespace.
    subprocess.run(
      ["ip", "link", "del", self.devices[0]], capture_output=True, timeout=30, check=False
    )
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    for ns in self.namespaces:
      if ns in left.stdout:
        print(f"network.py: could not remove namespace {ns}: run `ip netns del {ns}`")

  def command(self, k, argv):
    """argv run in namespace k, with a hostname that resolves to its veth address.

    gloo binds to the address the hostname resolves to; in a fresh UTS
    namespace the hostname is set to the veth IP (nothing outside changes).
    """
    inner = f"hostname {self.ips[k]} && exec " + " ".join(_quote(a) for a in argv)
    return ["ip", "netns", "exec", self.namespaces[k], "unshare", "--uts", "sh", "-c", inner]


def _quote(arg):
  import shlex

  return shlex.quote(str(arg))


def run(argv, timeout=30):
  out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
  if out.returncode:
    raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
  return out.stdout


class Children:
  """Child processes in their own process groups, killed on exit."""

  def __init__(self):
    self.procs = []
    atexit.register(self.kill)

  def start(self, argv, **kwargs):
    proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
    self.procs.append(proc)
    return proc

  def wait(self, timeout):
    """Waits for all; stops the others as soon as one fails, or all at the deadline."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in self.procs):
      if any(p.poll() for p in self.procs):  # One failed: the others would hang.
        break
      if time.monotonic() > deadline:
        self.kill()
        raise TimeoutError(f"the child processes ran past {timeout} s; stopped")
      time.sleep(0.2)
    procs = list(self.procs)
    self.kill()
    return [p.returncode for p in procs]

  def kill(self):
    """SIGTERM, then SIGKILL after 3 s, to every child still running (its process group)."""
    for proc in self.procs:
      if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, signal.SIGTERM)
    for proc in self.procs:
      try:
        proc.wait(timeout=3)
      except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    self.procs = []


def probe(link, children, seconds=2.0):
  """Bytes per second one TCP stream gets across the link (namespace 0 -> 1)."""
  nbytes = int(rate_bits(link.rate) / 8 * seconds)
  server = children.start(
    link.command(1, [sys.executable, __file__, "--probe-server", link.ips[1]]),
    stdout=subprocess.PIPE,
    text=True,
  )
  time.sleep(0.5)
  client = children.start(
    link.command(0, [sys.executable, __file__, "--probe-client", link.ips[1], str(nbytes)]),
  )
  out, _ = server.communicate(timeout=seconds * 5 + 30)
  client.wait(timeout=30)
  children.procs = []
  return float(out.strip())


def probe_server(ip):
  with socket.create_server((ip, PROBE_PORT)) as srv:
    srv.settimeout(60)
    conn, _ = srv.accept()
    with conn:
      conn.settimeout(60)
      total, start = 0, None
      while chunk := conn.recv(1 << 20):
        start = start or time.perf_counter()
        total += len(chunk)
      print(total / (time.perf_counter() - start))


def probe_client(ip, nbytes):
  for _ in range(50):
    try:
      conn = socket.create_connection((ip, PROBE_PORT), timeout=5)
      break
    except OSError:
      time.sleep(0.2)
  else:
    raise RuntimeError("probe server not reachable")
  with conn:
    block = b"\0" * (1 << 20)
    sent = 0
    while sent < nbytes:
      conn.sendall(block)
      sent += len(block)


def sent_bytes():
  """Bytes this network namespace has transmitted, headers included (all but lo)."""
  root = pathlib.Path("/sys/class/net")
  return sum(
    int((dev / "statistics" / "tx_bytes").read_text()) for dev in root.iterdir() if dev.name != "lo"
  )


# --- one worker process --------------------------------------------------------------------


def worker(out_path, windows, repeats, only=()):
  import jax

  import optax_dist

  optax_dist.initialize_from_env()
  import jax.numpy as jnp
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import numpy as np
  import optax

  assert jax.device_count() == N and jax.local_device_count() == 1, jax.devices()
  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, P(AXIS))

  def stacked(local):
    """A global array with a leading worker axis from this process's copy."""
    return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)[None]), local
    )

  rng = np.random.default_rng(0)
  params = []
  for fan_in, fan_out in itertools.pairwise(SIZES):
    w = (rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
    params.append({"w": w, "b": np.zeros(fan_out, np.float32)})
  num_params = sum(p.size for layer in params for p in layer.values())
  data_rng = np.random.default_rng(1 + jax.process_index())  # Each worker its own batch.
  batch = (
    data_rng.normal(size=(BATCH, SIZES[0])).astype(np.float32),
    data_rng.integers(0, SIZES[-1], size=BATCH).astype(np.int32),
  )

  def loss_fn(params, x, y):
    for layer in params[:-1]:
      x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
    logits = x @ params[-1]["w"] + params[-1]["b"][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def make_tx(name, period):
    adam = optax.adam(1e-4)
    if name == "compute":
      return adam
    if name == "sync":
      return optax_dist.tower(adam, axis_name=AXIS)
    if name == "easgd":
      return optax_dist.elastic_average(adam, axis_name=AXIS, communication_period=period)
    if name == "agn":
      return optax_dist.agn(adam, axis_name=AXIS, communication_period=period)
    if name == "model_average":
      return optax_dist.model_average(adam, axis_name=AXIS, interval_steps=period)
    variant = {
      "diloco": {},
      "diloco_int8": {"comm_dtype": jnp.int8, "error_feedback": True},
      "diloco_f4": {"fragments": 4},
      "diloco_int4": {"comm_dtype": jnp.int4, "error_feedback": True},
      "diloco_int2": {"comm_dtype": jnp.int2, "error_feedback": True},
      "diloco_topk2_int4": {"topk_fraction": 0.02, "comm_dtype": jnp.int4},
      # At p = 2 every other call syncs: the sync call with delay 0 against
      # the reducing call of delay 1 (its all-reduce independent of the
      # gradients; docs/sync_options.md, "Delayed syncs").
      "diloco_delay0": {},
      "diloco_delay1": {"delay": 1},
    }[name]
    return optax_dist.diloco(adam, axis_name=AXIS, sync_period=period, **variant)

  def build(tx, **extra):
    def body(p, s, x, y):
      p, s, x, y = jax.tree.map(lambda a: a[0], (p, s, x, y))
      grads = jax.grad(loss_fn)(p, x, y)
      updates, s = tx.update(grads, s, p, **extra)
      return jax.tree.map(lambda a: a[None], (optax.apply_updates(p, updates), s))

    mapped = jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
    return jax.jit(mapped, donate_argnums=(0, 1))

  # (name, period, dispatch): static dispatch compiles one program per kind of
  # call and picks it on the host from the schedule (data_parallel_step's
  # default); "in_graph" is one program that decides inside (sync=None).
  variants = [("compute", 1, "-"), ("sync", 1, "-")]
  variants += [(a, p, "static") for a in ALGORITHMS for p in PERIODS]
  variants += [(a, 16, "in_graph") for a in ALGORITHMS]
  variants += [("diloco_int8", p, "static") for p in PERIODS]
  variants += [("diloco_f4", 16, "static")]
  # Below 8 bits, at p = 1: every step is a sync step.
  variants += [(a, 1, "static") for a in ("diloco_int4", "diloco_int2", "diloco_topk2_int4")]
  variants += [(a, 2, "static") for a in ("diloco_delay0", "diloco_delay1")]
  if only:  # The baselines stay: the model needs compute, the speedups sync.
    variants = [v for v in variants if v[0] in ("compute", "sync", *only)]
  results = []
  x, y = stacked(batch)
  for name, period, dispatch in variants:
    tx = make_tx(name, period)
    p, s = stacked(params), stacked(tx.init(params))
    if dispatch == "static":
      schedule = optax_dist.sync_schedule(s)
      # (A delay shifts the sync calls by up to H / F - 1 calls.)
      calls = range(2 * period)
      programs = {repr(schedule(i)): build(tx, sync=schedule(i)) for i in calls}
      wire = {
        key: optax_dist.communication_report(f, p, s, x, y).every_step_wire_bytes
        for key, f in programs.items()
      }
      report = {
        "every_step_wire_bytes": min(wire.values()),
        "peak_wire_bytes": max(wire.values()),
        "period_wire_bytes": sum(wire[repr(schedule(i))] for i in calls[-period:]),
      }

      def step(p, s, x, y, count, programs=programs, schedule=schedule):
        return programs[repr(schedule(count))](p, s, x, y)

    else:
      program = build(tx)
      r = optax_dist.communication_report(program, p, s, x, y)
      report = {
        "every_step_wire_bytes": r.every_step_wire_bytes,
        "peak_wire_bytes": r.every_step_wire_bytes + r.peak_sync_wire_bytes,
        "period_wire_bytes": r.every_step_wire_bytes * period + r.sync_wire_bytes,
      }

      def step(p, s, x, y, count, program=program):
        return program(p, s, x, y)

    # Warm-up: compile every program, then one more period so that the
    # first timed step is not special.
    count = 0
    for _ in range(2 * period):
      p, s = jax.block_until_ready(step(p, s, x, y, count))
      count += 1
    # A window of steps is a multiple of the period, so it holds exactly
    # window / period syncs wherever it starts.
    length = period * max(1, -(-windows // period))
    times, means = [], []
    sent = sent_bytes()
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(length):
        t0 = time.perf_counter()
        p, s = jax.block_until_ready(step(p, s, x, y, count))
        count += 1
        times.append(time.perf_counter() - t0)
      means.append((time.perf_counter() - start) / length)
    sent = sent_bytes() - sent
    results.append(
      {
        "name": name,
        "period": period,
        "dispatch": dispatch,
        "window": length,
        "step_s": statistics.median(means),
        "window_means_s": means,
        "median_single_step_s": statistics.median(times),
        "max_single_step_s": max(times),
        "measured_sent_bytes_per_step": sent / (repeats * length),
        **report,
      }
    )
    if jax.process_index() == 0:
      print(
        f"  {name:>13} p={period:<3} {dispatch:>8} {1e3 * results[-1]['step_s']:8.1f} ms/step "
        f"(windows of {length} steps: {', '.join(f'{1e3 * m:.1f}' for m in means)} ms)",
        flush=True,
      )
  if jax.process_index() == 0:
    pathlib.Path(out_path).write_text(
      json.dumps({"num_params": int(num_params), "results": results}, indent=1)
    )


def collectives_worker(out_path, repeats):
  """Times bare collectives between the two processes: what rate each gets from the link."""
  import jax

  import optax_dist

  optax_dist.initialize_from_env()
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import numpy as np

  mesh = jax.make_mesh((N,), (AXIS,), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, P(AXIS))
  params, chunk = sum(a * b + b for a, b in itertools.pairwise(SIZES)), 1 << 20
  # (name, the collective on this worker's row, numbers per worker, dtype, bytes it sends).
  cases = [
    ("psum, float32 params", lambda x: jax.lax.psum(x, AXIS), params, np.float32, 4 * params),
    ("psum, 1 MiB of int32", lambda x: jax.lax.psum(x, AXIS), chunk // 4, np.int32, chunk),
    (
      "all_to_all, 1 MiB to the other worker",
      lambda x: jax.lax.all_to_all(x, AXIS, 1, 1, tiled=True),
      N * chunk,
      np.int8,
      chunk,
    ),
    (
      "all_gather, 1 MiB",
      lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True),
      chunk,
      np.uint8,
      chunk,
    ),
    (
      "ppermute, 1 MiB each way",
      lambda x: jax.lax.ppermute(x, AXIS, [(0, 1), (1, 0)]),
      chunk,
      np.uint8,
      chunk,
    ),
  ]
  rows = []
  for name, collective, numbers, dtype, sent in cases:
    local = np.ones((1, numbers), dtype)
    x = jax.make_array_from_process_local_data(sharding, local)
    fn = jax.jit(jax.shard_map(collective, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS)))
    for _ in range(2):
      jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(x))
      times.append(time.perf_counter() - start)
    median = statistics.median(times)
    rows.append({"name": name, "s": median, "sent_bytes": sent, "bits_per_s": 8 * sent / median})
    print(
      f"  {name:>40}: {1e3 * median:8.1f} ms, {8 * sent / median / 1e6:6.1f} Mbit/s", flush=True
    )
  if jax.process_index() == 0:
    pathlib.Path(out_path).write_text(json.dumps({"results": rows}, indent=1))


def collectives_table(result):
  lines = [
    f"Link {result['rate']} (tbf); one TCP stream measured {result['goodput_bits'] / 1e6:.0f} "
    f"Mbit/s. Each collective alone between the {N} processes, median of its calls; *rate* "
    "is the bytes one worker sends (ring convention) over the time.",
    "",
    "| collective | ms | bytes sent per worker | rate (Mbit/s) | of the TCP stream's |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  for r in result["results"]:
    lines.append(
      f"| {r['name']} | {1e3 * r['s']:.1f} | {r['sent_bytes']:,} | "
      f"{r['bits_per_s'] / 1e6:.1f} | {r['bits_per_s'] / result['goodput_bits']:.2f} |"
    )
  return "\n".join(lines) + "\n"


# --- the driver ----------------------------------------------------------------------------


def measure(
  rate,
  windows,
  repeats,
  timeout,
  children,
  slow_start_after_idle=False,
  only=(),
  malloc=True,
  collectives=False,
):
  link = Link(rate, slow_start_after_idle)
  try:
    print(f"link {rate}: {'; '.join(link.qdisc())}", flush=True)
    goodput = probe(link, children)
    print(f"  TCP goodput across the link: {goodput * 8 / 1e6:.1f} Mbit/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "result.json"
      env = dict(os.environ)
      env.update(
        {
          "JAX_PLATFORMS": "cpu",
          "OPTAX_DIST_COORDINATOR": f"{link.ips[0]}:{PORT}",
          "OPTAX_DIST_NUM_PROCESSES": str(N),
          "OPTAX_DIST_DEVICES_PER_PROCESS": "1",
          "OPTAX_DIST_TIMEOUT": "60",
          "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        }
      )
      env.pop("XLA_FLAGS", None)
      env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
      if malloc:
        from optax_dist import launch

        env.update(launch.KEEP_MEMORY)
      for k in range(N):
        argv = [sys.executable, __file__, "--worker", str(out), "--window", str(windows)]
        argv += ["--repeats", str(repeats), *(["--only", *only] if only else [])]
        argv += ["--collectives"] if collectives else []
        children.start(link.command(k, argv), env={**env, "OPTAX_DIST_PROCESS_ID": str(k)})
      codes = children.wait(timeout)
      if any(codes):
        raise RuntimeError(f"worker processes exited with {codes}")
      measured = json.loads(out.read_text())
  finally:
    children.kill()
    link.close()
  return {
    "rate": rate,
    "rate_bits": rate_bits(rate),
    "goodput_bits": goodput * 8,
    "tcp_slow_start_after_idle": int(slow_start_after_idle),
    "malloc": {k: env[k] for k in sorted(env) if k.startswith("MALLOC_")} or "glibc defaults",
    **measured,
  }


def malloc_text(result):
  """How the workers' allocator ran (results before the setting existed ran with glibc's defaults)."""
  if isinstance(result.get("malloc"), dict):
    return (
      "allocator keeping freed memory ("
      + " ".join(f"{k}={v}" for k, v in result["malloc"].items())
      + ")"
    )
  return "glibc's default allocator settings"


def predict(result):
  """Adds the model's prediction to every row: compute + wire bytes / bandwidth."""
  rows = result["results"]
  compute = next(r for r in rows if r["name"] == "compute")["step_s"]
  for r in rows:
    wire = r["period_wire_bytes"] / r["period"]  # Per step, on average.
    r["predicted_s"] = compute + wire / (result["rate_bits"] / 8)
    r["predicted_goodput_s"] = compute + wire / (result["goodput_bits"] / 8)
  return result


def table(results):
  lines = []
  for result in results:
    rows = result["results"]
    sync = next(r for r in rows if r["name"] == "sync")["step_s"]
    lines += [
      f"Link {result['rate']} (tbf); one TCP stream measured {result['goodput_bits'] / 1e6:.0f} "
      f"Mbit/s; TCP slow start after idle "
      f"{'on' if result.get('tcp_slow_start_after_idle') else 'off'}; "
      f"{malloc_text(result)}. "
      f"{result['num_params']:,} params, {N} processes x 1 CPU device. *Dispatch*: "
      "`static` compiles one program per kind of call and picks it on the host "
      "(data_parallel_step's default), `in_graph` is one program that decides inside. "
      "*Measured* is the median over windows of whole periods; the *model* is compute + "
      "wire bytes per step / bandwidth, at the tc rate and at the measured TCP goodput; "
      "*vs model* is measured / model (goodput); *median* and *max single step* are the "
      "median and slowest single step (a sync step is the slowest); *peak KB* is what one "
      "worker sends in its heaviest step (from the compiled programs); *sent KB per step* is "
      "what the worker's end of the link counted (`tx_bytes`, TCP/IP headers and the "
      "collectives' own messages included) over the timed windows, and *model KB per step* "
      "the compiled programs' wire bytes per step.",
      "",
      "| variant | period | dispatch | measured (ms/step) | model, tc rate | model, goodput "
      "| vs model | median single step (ms) | max single step (ms) | peak KB "
      "| sent KB per step | model KB per step | speedup vs sync |",
      "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
      period = "-" if r["name"] in ("compute", "sync") else str(r["period"])
      lines.append(
        f"| {r['name']} | {period} | {r['dispatch']} | {1e3 * r['step_s']:.1f} "
        f"| {1e3 * r['predicted_s']:.1f} | {1e3 * r['predicted_goodput_s']:.1f} "
        f"| {r['step_s'] / r['predicted_goodput_s']:.3f} "
        f"| {1e3 * r['median_single_step_s']:.1f} | {1e3 * r['max_single_step_s']:.1f} "
        f"| {r['peak_wire_bytes'] / 1e3:,.0f} | {r['measured_sent_bytes_per_step'] / 1e3:,.0f} "
        f"| {r['period_wire_bytes'] / r['period'] / 1e3:,.0f} | {sync / r['step_s']:.2f}x |"
      )
    lines.append("")
  return "\n".join(lines)


# The figure's lines: (variant, period, dispatch, label).
PLOTTED = (
  ("sync", 1, "-", "sync (every step)"),
  ("diloco", 4, "static", "DiLoCo, period 4"),
  ("diloco", 16, "static", "DiLoCo, period 16"),
  ("diloco_int8", 16, "static", "DiLoCo int8, period 16"),
  ("compute", 1, "-", "compute alone"),
)


def plot(results, path):
  """Step time against the link's rate: measured (solid) and the model (dashed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  rates = [r["rate_bits"] / 1e6 for r in results]
  for i, (name, period, dispatch, label) in enumerate(PLOTTED):
    rows = [
      next(
        (
          x
          for x in r["results"]
          if (x["name"], x["period"], x["dispatch"]) == (name, period, dispatch)
        ),
        None,
      )
      for r in results
    ]
    if any(row is None for row in rows):
      continue
    color = plt.get_cmap("tab10")(i)
    ax.plot(rates, [1e3 * row["step_s"] for row in rows], "o-", color=color, label=label)
    ax.plot(rates, [1e3 * row["predicted_s"] for row in rows], "--", color=color, alpha=0.6)
  ax.set(xscale="log", yscale="log", xlabel="link rate (Mbit/s)", ylabel="ms per step (median)")
  ax.set_title("Step time against the link (solid: measured, dashed: the model)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"], help="tc rates")
  parser.add_argument("--window", type=int, default=4, help="steps per timed window (at least)")
  parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant")
  parser.add_argument("--timeout", type=int, default=1500, help="seconds per rate")
  parser.add_argument(
    "--slow-start-after-idle",
    action="store_true",
    help="keep TCP's slow start after idle (Linux's default) on the link's namespaces",
  )
  parser.add_argument(
    "--default-malloc",
    action="store_true",
    help="run the workers with glibc's default allocator settings (see the docstring)",
  )
  parser.add_argument("--only", nargs="+", default=(), help="variants to run (and the baselines)")
  parser.add_argument(
    "--collectives",
    action="store_true",
    help="time bare collectives across the link instead (network_collectives.{json,md})",
  )
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--replot", action="store_true", help="redraw the figure from the JSON")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--probe-server", help=argparse.SUPPRESS)
  parser.add_argument("--probe-client", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker and args.collectives:
    return collectives_worker(args.worker, args.repeats)
  if args.worker:
    return worker(args.worker, args.window, args.repeats, args.only)
  if args.probe_server:
    return probe_server(args.probe_server)
  if args.probe_client:
    return probe_client(args.probe_client[0], int(args.probe_client[1]))
  if args.replot:
    out = pathlib.Path(args.out)
    return plot(json.loads((out / "network.json").read_text())["results"], out / "network.png")

  if os.geteuid() != 0:
    sys.exit("network.py needs root (network namespaces, veth, tc).")
  for tool in ("ip", "tc", "unshare"):
    if shutil.which(tool) is None:
      sys.exit(f"network.py needs `{tool}` on PATH.")
  for rate in args.rates:
    rate_bits(rate)

  # SIGTERM runs the same cleanup as an exception (finally blocks, atexit).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  children = Children()
  info = machine()

  def run(rate, collectives=False):
    return measure(
      rate,
      args.window,
      args.repeats,
      args.timeout,
      children,
      args.slow_start_after_idle,
      args.only,
      not args.default_malloc,
      collectives,
    )

  if args.collectives:
    results = [run(rate, collectives=True) for rate in args.rates]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "network_collectives.json").write_text(
      json.dumps({"machine": info, "results": results}, indent=1) + "\n"
    )
    text = "\n".join(collectives_table(r) for r in results)
    (out / "network_collectives.md").write_text(text)
    print(text)
    return results
  results = []
  for rate in args.rates:
    start = time.perf_counter()
    results.append(predict(run(rate)))
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "network.json").write_text(
    json.dumps({"machine": info, "results": results}, indent=1) + "\n"
  )
  text = table(results)
  (out / "network.md").write_text(text)
  plot(results, out / "network.png")
  print(text)
  print(f"results in {out}")


def machine():
  from importlib import metadata

  cpu = "unknown"
  for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      cpu = line.split(":", 1)[1].strip()
      break
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "kernel": os.uname().release,
    "load_average_at_start": os.getloadavg(),
    "jax": metadata.version("jax"),
    "optax": metadata.version("optax"),
  }


if __name__ == "__main__":
  main()
