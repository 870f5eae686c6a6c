"""Several processes: joining them (``initialize_from_env``).

``python -m optax_dist.launch`` starts the processes of a job and tells each
one where the coordinator is through environment variables; a script calls
:func:`initialize_from_env` first thing to join them with
``jax.distributed.initialize``.
"""

import os

import jax

ENV_COORDINATOR = "OPTAX_DIST_COORDINATOR"
ENV_NUM_PROCESSES = "OPTAX_DIST_NUM_PROCESSES"
ENV_PROCESS_ID = "OPTAX_DIST_PROCESS_ID"
ENV_DEVICES_PER_PROCESS = "OPTAX_DIST_DEVICES_PER_PROCESS"
ENV_RESTART = "OPTAX_DIST_RESTART"
ENV_TIMEOUT = "OPTAX_DIST_TIMEOUT"


def _env_int(name: str) -> int:
  value = os.environ[name]
  try:
    return int(value)
  except ValueError:
    raise ValueError(
      f"The environment variable {name} must be an integer, got {value!r}."
    ) from None


def initialize_from_env(*, timeout: int | None = None) -> int:
  """Joins the processes started by ``python -m optax_dist.launch``.

  Reads the coordinator address, the number of processes and this process's
  id from the environment variables the launcher sets, and calls
  ``jax.distributed.initialize`` with them. Call it once, first thing in the
  script, before any other JAX call. On CPU it selects gloo collectives (so
  that collectives cross processes) and, when the launcher was given
  ``--devices-per-process``, that many CPU devices per process.

  The variables (set by the launcher; set them yourself to start the
  processes another way):

  * ``OPTAX_DIST_COORDINATOR``: ``host:port`` of process 0's coordinator.
  * ``OPTAX_DIST_NUM_PROCESSES``, ``OPTAX_DIST_PROCESS_ID``.
  * ``OPTAX_DIST_DEVICES_PER_PROCESS`` (optional): CPU devices per process.
  * ``OPTAX_DIST_TIMEOUT`` (optional, seconds, default 60): how long to wait
    for the other processes at start-up, and the heartbeat timeout after which
    a process that lost a peer gives up.
  * ``OPTAX_DIST_RESTART``: how many times the launcher has restarted the
    job (0 on the first run); not read here, scripts may use it.

  Args:
    timeout: Seconds to wait for the other processes at start-up, also used
      as the heartbeat and shutdown timeouts. ``None`` reads
      ``OPTAX_DIST_TIMEOUT``, or takes 60 s when it is not set.

  Returns:
    This process's index (``jax.process_index()``).

  Raises:
    RuntimeError: if ``OPTAX_DIST_COORDINATOR`` is not set (the script was not
      started by the launcher): run it with ``python -m optax_dist.launch`` or
      call ``jax.distributed.initialize`` yourself.
    ValueError: if a variable is not a valid integer.

  Examples:
    Outside the launcher the variables are missing and nothing is started:

    >>> import optax_dist
    >>> optax_dist.initialize_from_env()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    RuntimeError: initialize_from_env: OPTAX_DIST_COORDINATOR is not set...

    A script run as ``python -m optax_dist.launch --num-processes 2 train.py``
    starts with:

    >>> optax_dist.initialize_from_env()  # doctest: +SKIP
    0
  """
  if ENV_COORDINATOR not in os.environ:
    raise RuntimeError(
      f"initialize_from_env: {ENV_COORDINATOR} is not set, so this process was not "
      "started by the launcher. Run the script with `python -m optax_dist.launch "
      "--num-processes N script.py ...`, or call `jax.distributed.initialize(...)` "
      "yourself."
    )
  coordinator = os.environ[ENV_COORDINATOR]
  num_processes = _env_int(ENV_NUM_PROCESSES)
  process_id = _env_int(ENV_PROCESS_ID)
  if timeout is None:
    timeout = _env_int(ENV_TIMEOUT) if ENV_TIMEOUT in os.environ else 60
  # Both settings only concern the CPU backend and are harmless elsewhere.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if ENV_DEVICES_PER_PROCESS in os.environ:
    jax.config.update("jax_num_cpu_devices", _env_int(ENV_DEVICES_PER_PROCESS))
  jax.distributed.initialize(
    coordinator,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=timeout,
    heartbeat_timeout_seconds=timeout,
    shutdown_timeout_seconds=timeout,
  )
  return jax.process_index()
