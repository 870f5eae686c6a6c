"""The XLA flags the installed XLA accepts, checked by starting it.

XLA aborts the process at start-up on a flag it does not know (``Unknown flag
in XLA_FLAGS``), and its flags come and go between releases. So that the
suite's compiler settings never stop it from starting, each is tried in a
fresh process before it is set, instead of guessed from version numbers.
"""

import os
import subprocess
import sys

# Starts XLA's CPU client, which parses XLA_FLAGS.
_PROBE = "import jax; jax.devices('cpu')"


def accepted(flags: dict[str, str]) -> bool:
  """Whether a process with ``flags`` in XLA_FLAGS starts XLA."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = " ".join(f"--{name}={value}" for name, value in flags.items())
  env["JAX_PLATFORMS"] = "cpu"
  run = subprocess.run(
    [sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=120, check=False
  )
  return run.returncode == 0


def known(flags: dict[str, str]) -> dict[str, str]:
  """The flags of ``flags`` that the installed XLA accepts (all at once, else one by one)."""
  if not flags or accepted(flags):
    return dict(flags)
  return {name: value for name, value in flags.items() if accepted({name: value})}
