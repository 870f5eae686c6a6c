"""A byte-level language model trained on 8 simulated CPU devices.

A small decoder-only transformer (Flax linen: pre-norm blocks, causal
self-attention, learned positions, embeddings tied to the output layer)
learns to predict the next byte (a vocabulary of 256) of real text that every
machine has offline: the source of the Python standard library of the
interpreter that runs it, the ``*.py`` files at the top of its ``stdlib``
folder (no tests, no ``site-packages``; nothing is downloaded). Files go to
training or validation by a hash of their name (:func:`corpus_files`), so no
file is in both.

The global batch is split over 8 workers by ``optax_dist.data_parallel_step``.
AdamW is the inner optimizer of every algorithm; ``--algorithm`` decides how
the workers talk:

* ``sync``: ``tower``, the gradients all-reduced every step;
* ``easgd``: ``elastic_average``, an elastic pull toward a center every
  ``--period`` steps;
* ``agn``: accumulated gradient normalization, a commit to the center every
  ``--period`` steps;
* ``model_average``: local SGD, the params averaged every ``--period`` steps;
* ``diloco``: DiLoCo, an outer Nesterov step on the workers' mean change every
  ``--period`` steps; ``--fragments F`` syncs one of ``F`` fragments of the
  model every ``period / F`` steps (streaming DiLoCo), ``--comm-dtype``
  chooses the format of the pseudo-gradient on the wire.

``--workers M`` (a divisor of 8, for the periodic algorithms) makes each worker
a group of ``8 / M`` devices that all-reduce their gradients every step
(``tower`` inside), the periodic transform running across the ``M`` groups on
a ``(M, 8 / M)`` mesh; the global batch stays the same, split over all 8
devices. With ``--workers 1`` DiLoCo is Lookahead with an outer Nesterov step.

``--warmup K`` makes the first ``K`` steps of a periodic algorithm synchronous
(post-local SGD). DiLoCo's outer optimizer defaults to the paper's Nesterov
SGD (learning rate 0.7, momentum 0.9), chosen for runs of many outer steps;
with the few outer steps of a short run here, a lower momentum
(``--outer-momentum 0.5``) reaches a lower validation loss.

The validation loss, in nats per byte, is measured on the model a checkpoint
would export (the center, for the periodic algorithms); the bytes each worker
sends are read from the compiled step (``optax_dist.communication_report``).
A plot shows the validation loss against the steps and against the bytes
sent. The last line printed is ``validation loss: X``.

    python examples/train_lm.py --algorithm sync
    python examples/train_lm.py --algorithm diloco --period 20 --fragments 4
    python examples/train_lm.py --algorithm diloco --workers 2 --period 32 --steps 3200
    python examples/train_lm.py --algorithm model_average --period 10 --warmup 40

Other programs call :func:`train` with a :class:`Config`; it returns the
validation-loss curve, the bytes sent and the timing::

    result = train_lm.train(train_lm.Config(algorithm="diloco", period=40, steps=800))
"""

import argparse
import dataclasses
import functools
import hashlib
import os
import pathlib
import sysconfig
import time

NUM_DEVICES = 8
# Simulated devices must be requested before JAX starts.
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={NUM_DEVICES}"]
).strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import optax_dist  # noqa: E402

AXIS = "workers"
# With fewer than 8 workers, each worker is a group of devices: the devices of a
# group average their gradients every step (``tower`` over GROUP), the periodic
# transform runs across the groups (REPLICAS).
REPLICAS, GROUP = "replicas", "group"
ALGORITHMS = ("sync", "easgd", "agn", "model_average", "diloco")
COMM_DTYPES = {
  "none": None,
  "bfloat16": jnp.bfloat16,
  "int8": jnp.int8,
  "int4": jnp.int4,
  "int2": jnp.int2,
}
INNERS = ("adamw", "muon")
VOCAB = 256  # Bytes.
# Silent rank broadcasting hides shape bugs: make it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


# The corpus.


def corpus_files(seed=0, val_fraction=0.1, root=None):
  """The corpus split by file: ``(train_paths, val_paths)``, each sorted.

  The corpus is the ``*.py`` files directly in ``root`` (by default the
  standard library folder of the running interpreter, which holds neither
  tests nor ``site-packages``). A file goes to validation when a hash of
  ``seed`` and its name falls below ``val_fraction``: the split depends on
  the names only, not on the order of the listing or on the machine.

  Raises:
    ValueError: if either part would be empty.
  """
  root = pathlib.Path(root if root is not None else sysconfig.get_paths()["stdlib"])
  train, val = [], []
  for path in sorted(root.glob("*.py")):
    if not path.is_file():
      continue
    digest = hashlib.sha256(f"{seed}/{path.name}".encode()).digest()
    (val if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else train).append(path)
  if not train or not val:
    raise ValueError(
      f"{root} gives {len(train)} training and {len(val)} validation files with "
      f"val_fraction={val_fraction}: both must be non-empty."
    )
  return train, val


def load_bytes(paths):
  """The files' bytes, concatenated in order (a newline between files), as uint8."""
  return np.frombuffer(b"\n".join(pathlib.Path(p).read_bytes() for p in paths), np.uint8)


def validation_windows(data, count, length):
  """``count`` windows of ``length`` bytes at evenly spaced offsets: a fixed batch."""
  if len(data) < length:
    raise ValueError(f"{len(data)} validation bytes cannot fill a window of {length}.")
  starts = np.linspace(0, len(data) - length, count).astype(np.int64)
  return data[starts[:, None] + np.arange(length)[None, :]]


# The model.


class CausalSelfAttention(nn.Module):
  """Multi-head attention of every position to itself and the positions before it.

  The queries, keys and values come from one projection, without biases: few
  params leaves keep the optimizer's per-leaf work (and its compile time) small.
  """

  heads: int

  @nn.compact
  def __call__(self, x):
    batch, length, width = x.shape
    head = width // self.heads
    qkv = nn.Dense(3 * width, use_bias=False)(x).reshape(batch, length, 3, self.heads, head)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head).astype(np.float32)
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal[None, None], scores, jnp.finfo(scores.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return nn.Dense(width, use_bias=False)(out.reshape(batch, length, width))


class Block(nn.Module):
  """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    x = x + CausalSelfAttention(self.heads)(nn.LayerNorm()(x))
    h = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
    return x + nn.Dense(self.width)(nn.gelu(h))


class Transformer(nn.Module):
  """Decoder-only byte model: embeddings and learned positions, blocks, tied output.

  ``width`` must be a multiple of ``heads``.
  """

  width: int
  depth: int
  heads: int
  context: int

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, self.width, embedding_init=nn.initializers.normal(0.02))
    positions = self.param("positions", nn.initializers.normal(0.02), (self.context, self.width))
    x = embed(tokens) + positions[None, : tokens.shape[1]]
    for _ in range(self.depth):
      x = Block(self.width, self.heads)(x)
    return embed.attend(nn.LayerNorm()(x))


def loss_fn(params, batch, *, model):
  """Mean next-byte cross-entropy (nats per byte) of a worker's windows."""
  tokens = batch.astype(jnp.int32)
  logits = model.apply({"params": params}, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


# Training.


@dataclasses.dataclass(frozen=True)
class Config:
  """One training run. The defaults take about a minute on two CPU cores, compilation included."""

  algorithm: str = "diloco"
  workers: int = NUM_DEVICES
  period: int = 20
  steps: int = 400
  fragments: int | None = None
  comm_dtype: str = "none"
  warmup: int = 0
  seed: int = 0
  width: int = 64
  depth: int = 2
  heads: int = 4
  context: int = 64
  batch_size: int = 64
  learning_rate: float = 3e-3
  weight_decay: float = 0.01
  outer_learning_rate: float = 0.7
  outer_momentum: float = 0.9
  error_feedback: bool = False
  moving_rate: float | None = None
  delay: int | None = None
  blend: float | None = None
  topk_fraction: float | None = None
  inner: str = "adamw"
  adam_learning_rate: float | None = None
  eval_every: int = 20
  eval_windows: int = 128

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"unknown algorithm {self.algorithm!r}; one of {ALGORITHMS}")
    if self.comm_dtype not in COMM_DTYPES:
      raise ValueError(f"unknown comm_dtype {self.comm_dtype!r}; one of {tuple(COMM_DTYPES)}")
    if self.algorithm != "diloco" and (
      self.fragments
      or self.comm_dtype != "none"
      or self.error_feedback
      or self.delay
      or self.blend
      or self.topk_fraction
    ):
      raise ValueError(
        "--fragments, --comm-dtype, --error-feedback, --delay, --blend and --topk-fraction "
        "are options of diloco"
      )
    if self.inner not in INNERS:
      raise ValueError(f"unknown inner optimizer {self.inner!r}; one of {INNERS}")
    if self.moving_rate is not None and self.algorithm != "easgd":
      raise ValueError("--moving-rate is an option of easgd")
    if self.algorithm == "sync" and self.warmup:
      raise ValueError("--warmup is an option of the periodic algorithms")
    if self.workers < 1 or NUM_DEVICES % self.workers:
      raise ValueError(f"workers={self.workers} must divide the {NUM_DEVICES} devices")
    if self.algorithm == "sync" and self.workers != NUM_DEVICES:
      raise ValueError("--workers is an option of the periodic algorithms (sync has one model)")
    if self.width % self.heads:
      raise ValueError(f"width={self.width} must divide by heads={self.heads}")
    for name in ("batch_size", "eval_windows"):
      if getattr(self, name) % NUM_DEVICES:
        raise ValueError(f"{name}={getattr(self, name)} must divide by the {NUM_DEVICES} workers")


def worker_axes(config):
  """The mesh's shape and axis names, and the axis (or axes) of the periodic transform.

  With 8 workers every device is a worker: one axis, ``"workers"``. With ``M``
  fewer workers the mesh is ``(M, 8 / M)``, ``("replicas", "group")``: a
  worker is a row of ``8 / M`` devices that all-reduce their gradients every
  step, and the periodic transform runs over ``"replicas"``. The global batch
  is split over all 8 devices either way, so every ``M`` sees the same batch.
  """
  if config.workers == NUM_DEVICES:
    return (NUM_DEVICES,), (AXIS,), AXIS
  return (config.workers, NUM_DEVICES // config.workers), (REPLICAS, GROUP), REPLICAS


def make_optimizer(config, *, group_axis=GROUP):
  """AdamW wrapped by the algorithm.

  AdamW's learning rate rises linearly over the first 5% of the steps, then
  decays to a tenth along a cosine. The schedule counts AdamW's own steps, so
  it runs once over the whole run whatever the algorithm: a sync never resets
  it. With fewer than 8 workers, AdamW runs inside a ``tower`` over the
  devices of a worker (``group_axis``; ``None`` leaves it out, for a worker
  that computes its gradient on its whole share of the batch itself).
  """
  # The schedule's shape times the peak, so that the peak may be a traced value.
  shape = optax.warmup_cosine_decay_schedule(
    0.0,
    1.0,
    warmup_steps=max(1, config.steps // 20),
    decay_steps=max(2, config.steps),
    end_value=0.1,
  )
  peak = config.learning_rate
  learning_rate = lambda count: peak * shape(count)  # noqa: E731
  if config.inner == "muon":
    # Newton-Schulz on the matrices, Adam (at adam_learning_rate) on the rest.
    adam_peak = config.adam_learning_rate
    adam_learning_rate = None if adam_peak is None else (lambda count: adam_peak * shape(count))
    inner = optax.contrib.muon(
      learning_rate,
      weight_decay=config.weight_decay,
      adam_weight_decay=config.weight_decay,
      adam_learning_rate=adam_learning_rate,
    )
  else:
    inner = optax.adamw(learning_rate, weight_decay=config.weight_decay)
  period, warmup = config.period, config.warmup or None
  _, axes, axis = worker_axes(config)
  if config.algorithm == "sync":
    return optax_dist.tower(inner, axis_name=axes if len(axes) > 1 else axis)
  if len(axes) > 1 and group_axis is not None:
    inner = optax_dist.tower(inner, axis_name=group_axis)
  if config.algorithm == "easgd":
    return optax_dist.elastic_average(
      inner,
      axis_name=axis,
      communication_period=period,
      moving_rate=config.moving_rate,
      sync_warmup=warmup,
    )
  if config.algorithm == "agn":
    return optax_dist.agn(inner, axis_name=axis, communication_period=period, sync_warmup=warmup)
  if config.algorithm == "model_average":
    return optax_dist.model_average(
      inner, axis_name=axis, interval_steps=period, sync_warmup=warmup
    )
  # The outer optimizer: Nesterov SGD, by default with DiLoCo's 0.7 and 0.9.
  outer = optax.sgd(config.outer_learning_rate, momentum=config.outer_momentum, nesterov=True)
  return optax_dist.diloco(
    inner,
    axis_name=axis,
    outer=outer,
    sync_period=period,
    comm_dtype=COMM_DTYPES[config.comm_dtype],
    error_feedback=config.error_feedback,
    sync_warmup=warmup,
    fragments=config.fragments,
    topk_fraction=config.topk_fraction,
    delay=config.delay,
    blend=config.blend,
  )


def bytes_per_call(flags, *, every_step_bytes, sync_bytes, warmup_bytes=0, fragments=1):
  """Bytes one worker sends on each call, from the calls' sync flags.

  Every call sends ``every_step_bytes``; a sync call (flag ``True``) adds
  ``sync_bytes``, a fragment's sync (an int flag) ``sync_bytes / fragments``,
  and a warm-up call (flag ``"warmup"``) ``warmup_bytes``.

  Args:
    flags: The flag of each call (``optax_dist.sync_schedule`` of the state
      called with the count of calls made before it); ``False`` for a
      synchronous optimizer.
    every_step_bytes: ``communication_report(step, ...).every_step_bytes``.
    sync_bytes: The bytes of a sync of every fragment.
    warmup_bytes: The bytes a warm-up call adds (the gradients' all-reduce).
    fragments: The number of fragments the model is synced in.

  Returns:
    A float array, one entry per call.
  """
  sent = np.full(len(flags), float(every_step_bytes))
  for i, flag in enumerate(flags):
    if flag == "warmup":
      sent[i] += warmup_bytes
    elif flag is True:
      sent[i] += sync_bytes
    elif flag is not False and flag is not None:  # A fragment's index.
      sent[i] += sync_bytes / fragments
  return sent


def build(config):
  """The run's programs and its bytes on the wire, before any training.

  Returns:
    A dict with ``"model"``, ``"tx"``, ``"params"`` and ``"opt_state"`` (one
    copy per device), the jitted ``"step"`` and ``"evaluate"``, the sync
    ``"flags"`` of every call, ``"num_params"``, and the bytes one worker
    sends (see :func:`train`): ``"every_step_bytes"``, ``"group_bytes"``,
    ``"sync_bytes"``, ``"warmup_bytes"`` and ``"cumulative"`` (after each
    call, from 0).
  """
  n = jax.device_count()
  if n != NUM_DEVICES:
    raise RuntimeError(
      f"expected {NUM_DEVICES} simulated devices, found {n}: was JAX initialized before this module?"
    )
  shape, axes, _ = worker_axes(config)
  mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes))
  axes = axes if len(axes) > 1 else axes[0]  # The batch is split over every device.
  model = Transformer(config.width, config.depth, config.heads, config.context)
  # One compiled program, rather than one per operation of the initializers.
  init = jax.jit(model.init)
  params = init(jax.random.key(config.seed), jnp.zeros((1, config.context), jnp.int32))["params"]
  tx = make_optimizer(config)
  opt_state = tx.init(params)  # Local: no communication.
  periodic = config.algorithm != "sync"
  num_params = sum(p.size for p in jax.tree.leaves(params))
  params_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
  if periodic:
    schedule = optax_dist.sync_schedule(opt_state)
    flags = [schedule(count) for count in range(config.steps)]
  else:
    flags = [False] * config.steps
  # Every worker holds its own copy of the params and state, all identical at
  # the start. (With sync they stay identical: the gradients are all-reduced
  # once per step.)
  params, opt_state = optax_dist.per_worker((params, opt_state), mesh=mesh, axis_name=axes)
  loss = functools.partial(loss_fn, model=model)
  step = optax_dist.data_parallel_step(
    loss, tx, mesh=mesh, axis_name=axes, params_layout="per_worker"
  )
  evaluate = optax_dist.data_parallel_eval_step(
    loss, mesh=mesh, axis_name=axes, params_layout="per_worker"
  )

  # Bytes each worker sends on the wire (ring convention: an all-reduce of B
  # bytes sends 2 (N - 1) / N B, an all-to-all or all-gather that delivers B
  # bytes (N - 1) / N B), read from the compiled step's collectives: those of
  # every call and those of the sync branches. A warm-up call all-reduces the
  # gradients across the workers (float32, shaped like the params), which the
  # report counts with the syncs. With fewer than 8 workers, the all-reduces
  # inside a worker's group of devices stay inside the worker: they are not
  # bytes sent between workers (those of every step are ``"group_bytes"``).
  batch_shape = np.zeros((config.batch_size, config.context + 1), np.uint8)
  report = optax_dist.communication_report(step, params, opt_state, batch_shape)
  in_group = lambda c: len(shape) > 1 and c.workers == shape[1]  # noqa: E731
  every_step_bytes = sum(
    c.wire_bytes for c in report.collectives if c.every_step and not in_group(c)
  )
  group_bytes = sum(c.wire_bytes for c in report.collectives if c.every_step and in_group(c))
  sync_bytes = sum(c.wire_bytes for c in report.collectives if not c.every_step and not in_group(c))
  m = config.workers
  warmup_bytes = 2 * (m - 1) / m * params_bytes if config.warmup and periodic else 0
  sync_bytes -= warmup_bytes
  sent = bytes_per_call(
    flags,
    every_step_bytes=every_step_bytes,
    sync_bytes=sync_bytes,
    warmup_bytes=warmup_bytes,
    fragments=config.fragments or 1,
  )
  cumulative = np.concatenate([[0.0], np.cumsum(sent)])
  return {
    "model": model,
    "tx": tx,
    "params": params,
    "opt_state": opt_state,
    "step": step,
    "evaluate": evaluate,
    "flags": flags,
    "num_params": num_params,
    "every_step_bytes": every_step_bytes,
    "group_bytes": group_bytes,
    "sync_bytes": sync_bytes,
    "warmup_bytes": warmup_bytes,
    "cumulative": cumulative,
  }


def sampler(data, config, rng):
  """A function that draws one global batch: ``batch_size`` random windows of ``data``."""
  window = np.arange(config.context + 1)[None, :]

  def sample():
    starts = rng.integers(0, len(data) - config.context - 1, size=config.batch_size)
    return data[starts[:, None] + window]

  return sample


def train(config=None, *, progress=False):
  """Trains one model; returns its curves, the bytes it sent and its timing.

  Returns:
    A dict with ``"eval_steps"`` (0, every ``eval_every`` steps, and the last
    step), ``"val_loss"`` (nats per byte of the exported model at those steps),
    ``"bytes"`` (bytes each worker had sent by then), ``"train_loss"`` (the
    workers' mean loss at every step), ``"final_val_loss"``, ``"total_bytes"``,
    ``"every_step_bytes"``, ``"group_bytes"`` (bytes sent on every step inside
    a worker's group of devices, not counted in ``"bytes"``), ``"sync_bytes"``,
    ``"warmup_bytes"``, ``"syncs"``
    (syncs completed, or updates for ``sync``), ``"num_params"``, ``"seconds"``
    (``"setup"``: data, model, optimizer and the step's communication report;
    ``"train"``: the training loop, its evaluations and compilations
    included; ``"eval"``: the evaluations; ``"total"``), ``"step_seconds"``
    (wall time of every call, compilations included) and ``"config"``.
  """
  from tqdm import tqdm

  config = Config() if config is None else config
  start = time.perf_counter()
  # The split is fixed: every seed is validated on the same files.
  train_paths, val_paths = corpus_files()
  train_data, val_data = load_bytes(train_paths), load_bytes(val_paths)
  val_batch = validation_windows(val_data, config.eval_windows, config.context + 1)
  built = build(config)
  params, opt_state, step, evaluate = (
    built[k] for k in ("params", "opt_state", "step", "evaluate")
  )
  cumulative, num_params = built["cumulative"], built["num_params"]
  sample = sampler(train_data, config, np.random.default_rng(config.seed))
  setup_seconds = time.perf_counter() - start

  history = {"eval_steps": [], "val_loss": [], "bytes": [], "train_loss": []}
  step_seconds = []
  eval_seconds = 0.0

  def validate(t):
    nonlocal eval_seconds
    begin = time.perf_counter()
    value = float(evaluate(params, opt_state, val_batch)["loss"])
    eval_seconds += time.perf_counter() - begin
    history["eval_steps"].append(t)
    history["val_loss"].append(value)
    history["bytes"].append(float(cumulative[t]))
    return value

  loop_start = time.perf_counter()
  val_loss = validate(0)
  bar = tqdm(range(1, config.steps + 1), desc=config.algorithm, disable=not progress)
  for t in bar:
    batch = sample()
    begin = time.perf_counter()
    # Wait for every step: with simulated CPU devices, collectives dispatched
    # without waiting can stall XLA's CPU rendezvous.
    params, opt_state, metrics = jax.block_until_ready(step(params, opt_state, batch))
    step_seconds.append(time.perf_counter() - begin)
    history["train_loss"].append(float(metrics["loss"]))
    if t % config.eval_every == 0 or t == config.steps:
      val_loss = validate(t)
    bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", val=f"{val_loss:.3f}")
  bar.close()
  end = time.perf_counter()

  # Syncs completed (updates applied, for sync), the same on every worker.
  syncs = int(jnp.ravel(optax_dist.global_step(opt_state))[0])
  return {
    **history,
    "final_val_loss": history["val_loss"][-1],
    "total_bytes": float(cumulative[-1]),
    **{k: built[k] for k in ("every_step_bytes", "group_bytes", "sync_bytes", "warmup_bytes")},
    "syncs": syncs,
    "num_params": num_params,
    "seconds": {
      "setup": setup_seconds,
      "train": end - loop_start,
      "eval": eval_seconds,
      "total": end - start,
    },
    "step_seconds": step_seconds,
    "config": dataclasses.asdict(config),
  }


def plot(path, result, title):
  """Validation loss against steps and against the bytes each worker sent."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_steps, ax_bytes) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  ax_steps.plot(result["eval_steps"], result["val_loss"], marker="o", ms=3)
  ax_steps.set(xlabel="step", ylabel="validation loss (nats per byte)", title=title)
  ax_bytes.plot(np.asarray(result["bytes"]) / 1e6, result["val_loss"], marker="o", ms=3)
  ax_bytes.set(xlabel="MB sent per worker", title="validation loss per byte sent")
  for ax in (ax_steps, ax_bytes):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def parse_args(argv=None):
  defaults = Config()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--algorithm", choices=ALGORITHMS, default=defaults.algorithm)
  parser.add_argument(
    "--workers",
    type=int,
    default=defaults.workers,
    help=f"periodic: workers M, each a group of {NUM_DEVICES} / M devices; the global batch is the same",
  )
  parser.add_argument(
    "--period", type=int, default=defaults.period, help="steps between syncs (periodic)"
  )
  parser.add_argument("--steps", type=int, default=defaults.steps)
  parser.add_argument(
    "--fragments", type=int, default=None, help="diloco: sync the model in F fragments"
  )
  parser.add_argument(
    "--comm-dtype",
    choices=tuple(COMM_DTYPES),
    default=defaults.comm_dtype,
    help="diloco: the pseudo-gradient's format on the wire",
  )
  parser.add_argument(
    "--topk-fraction", type=float, default=None, help="diloco: sparse top-k syncs (SparseLoCo)"
  )
  parser.add_argument(
    "--delay", type=int, default=None, help="diloco: calls from a sync to its outer step"
  )
  parser.add_argument(
    "--blend", type=float, default=None, help="diloco: where a delayed sync lands the workers"
  )
  parser.add_argument(
    "--inner",
    choices=INNERS,
    default=defaults.inner,
    help="the inner optimizer: AdamW, or optax.contrib.muon",
  )
  parser.add_argument(
    "--adam-learning-rate",
    type=float,
    default=None,
    help="muon: the peak learning rate of its Adam on the non-matrix params (default: --learning-rate)",
  )
  parser.add_argument(
    "--warmup", type=int, default=defaults.warmup, help="synchronous steps before the local ones"
  )
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--width", type=int, default=defaults.width, help="model width")
  parser.add_argument("--depth", type=int, default=defaults.depth, help="transformer blocks")
  parser.add_argument("--heads", type=int, default=defaults.heads)
  parser.add_argument("--context", type=int, default=defaults.context, help="bytes per window")
  parser.add_argument(
    "--batch-size", type=int, default=defaults.batch_size, help="global, split over the workers"
  )
  parser.add_argument(
    "--learning-rate", type=float, default=defaults.learning_rate, help="AdamW's peak"
  )
  parser.add_argument(
    "--outer-learning-rate",
    type=float,
    default=defaults.outer_learning_rate,
    help="diloco: the outer Nesterov SGD's learning rate",
  )
  parser.add_argument(
    "--outer-momentum",
    type=float,
    default=defaults.outer_momentum,
    help="diloco: the outer Nesterov SGD's momentum",
  )
  parser.add_argument(
    "--error-feedback",
    action="store_true",
    help="diloco with an 8-bit --comm-dtype: send again what the rounding dropped",
  )
  parser.add_argument(
    "--moving-rate", type=float, default=None, help="easgd: the elastic moving rate"
  )
  parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
  parser.add_argument(
    "--eval-windows", type=int, default=defaults.eval_windows, help="validation windows"
  )
  parser.add_argument("--plot", default="train_lm.png", help="where to save the plot")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  args = parser.parse_args(argv)
  fields = {f.name for f in dataclasses.fields(Config)}
  try:
    config = Config(**{k: v for k, v in vars(args).items() if k in fields})
  except ValueError as e:
    parser.error(str(e))
  return config, args


def main(argv=None):
  config, args = parse_args(argv)
  result = train(config, progress=not args.no_progress)
  seconds = result["seconds"]
  print(
    f"{config.algorithm}: {config.workers} workers on {NUM_DEVICES} devices, {config.steps} steps in {seconds['total']:.1f} s "
    f"({seconds['setup']:.1f} s setup), {result['num_params']} params"
  )
  if result["sync_bytes"]:
    fragments = config.fragments or 1
    what = "sync" if fragments == 1 else f"sync of one of {fragments} fragments"
    detail = (
      f"{result['sync_bytes'] / fragments:.0f} B sent per {what}, {result['syncs']} syncs, "
      f"{result['every_step_bytes']:.0f} B of metrics per step"
    )
    if result["warmup_bytes"]:
      detail += f", {result['warmup_bytes']} B more per warm-up step"
  else:
    detail = f"{result['every_step_bytes']:.0f} B sent per step: gradients and metrics"
  print(f"communicated per worker: {result['total_bytes'] / 1e6:.2f} MB ({detail})")
  plot(args.plot, result, f"{config.algorithm} on {NUM_DEVICES} workers")
  print(f"plot saved to {args.plot}")
  print(f"validation loss: {result['final_val_loss']:.4f}")
  return result


if __name__ == "__main__":
  main()
