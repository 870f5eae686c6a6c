"""Writes the intersphinx inventories of JAX, Optax, Flax and Orbax used by the docs.

The documentation links names such as ``jax.Array`` or ``optax.chain`` to the
docs of those projects. Their own ``objects.inv`` files are not downloaded at
build time (the build must not depend on the network); instead this script
writes small inventories, with Sphinx's own writer, that list the objects the
docs refer to and where each project documents them. ``conf.py`` points
``intersphinx_mapping`` at the files it writes.

Run it from the repository root after adding a name to the tables below::

  python docs/_inventories/write_inventories.py

Each table maps a name to its page (relative to the project's docs URL) and
its object type. An alias (``optax.inject_hyperparams``, documented as
``optax.schedules.inject_hyperparams``) points at the page and anchor of the
name it is documented under.
"""

import pathlib
import sys
from types import SimpleNamespace

HERE = pathlib.Path(__file__).resolve().parent

# name: (page, object type, anchor or None for the name itself)
JAX = {
  "jax.Array": ("_autosummary/jax.Array", "class", None),
  "jax.ShapeDtypeStruct": ("_autosummary/jax.ShapeDtypeStruct", "class", None),
  "jax.block_until_ready": ("_autosummary/jax.block_until_ready", "function", None),
  "jax.device_count": ("_autosummary/jax.device_count", "function", None),
  "jax.device_put": ("_autosummary/jax.device_put", "function", None),
  "jax.devices": ("_autosummary/jax.devices", "function", None),
  "jax.distributed.initialize": ("_autosummary/jax.distributed.initialize", "function", None),
  "jax.eval_shape": ("_autosummary/jax.eval_shape", "function", None),
  "jax.grad": ("_autosummary/jax.grad", "function", None),
  "jax.jit": ("_autosummary/jax.jit", "function", None),
  "jax.lax.all_gather": ("_autosummary/jax.lax.all_gather", "function", None),
  "jax.lax.axis_index": ("_autosummary/jax.lax.axis_index", "function", None),
  "jax.lax.pmean": ("_autosummary/jax.lax.pmean", "function", None),
  "jax.lax.psum": ("_autosummary/jax.lax.psum", "function", None),
  "jax.local_device_count": ("_autosummary/jax.local_device_count", "function", None),
  "jax.make_mesh": ("_autosummary/jax.make_mesh", "function", None),
  "jax.pmap": ("_autosummary/jax.pmap", "function", None),
  "jax.process_count": ("_autosummary/jax.process_count", "function", None),
  "jax.process_index": ("_autosummary/jax.process_index", "function", None),
  "jax.random.key": ("_autosummary/jax.random.key", "function", None),
  "jax.random.normal": ("_autosummary/jax.random.normal", "function", None),
  "jax.random.split": ("_autosummary/jax.random.split", "function", None),
  "jax.shard_map": ("_autosummary/jax.shard_map", "function", None),
  "jax.sharding.Mesh": ("jax.sharding", "class", None),
  "jax.sharding.NamedSharding": ("jax.sharding", "class", None),
  "jax.sharding.PartitionSpec": ("jax.sharding", "class", None),
  "jax.tree.map": ("_autosummary/jax.tree.map", "function", None),
  "jax.tree_util.register_static": ("_autosummary/jax.tree_util.register_static", "function", None),
  "jax.value_and_grad": ("_autosummary/jax.value_and_grad", "function", None),
  "jax.vmap": ("_autosummary/jax.vmap", "function", None),
}

OPTAX = {
  "optax.EmptyState": ("api/generated/optax.EmptyState", "class", None),
  "optax.GradientTransformation": ("api/generated/optax.GradientTransformation", "class", None),
  "optax.GradientTransformationExtraArgs": (
    "api/generated/optax.GradientTransformationExtraArgs",
    "class",
    None,
  ),
  "optax.MultiSteps": ("api/generated/optax.MultiSteps", "class", None),
  "optax.OptState": ("api/generated/optax.OptState", "data", None),
  "optax.Params": ("api/generated/optax.Params", "data", None),
  "optax.Updates": ("api/generated/optax.Updates", "data", None),
  "optax.adam": ("api/generated/optax.adam", "function", None),
  "optax.adamw": ("api/generated/optax.adamw", "function", None),
  "optax.apply_if_finite": ("api/generated/optax.apply_if_finite", "function", None),
  "optax.apply_updates": ("api/generated/optax.apply_updates", "function", None),
  "optax.chain": ("api/generated/optax.chain", "function", None),
  "optax.clip": ("api/generated/optax.clip", "function", None),
  "optax.clip_by_global_norm": ("api/generated/optax.clip_by_global_norm", "function", None),
  "optax.conditionally_mask": ("api/generated/optax.conditionally_mask", "function", None),
  "optax.conditionally_transform": (
    "api/generated/optax.conditionally_transform",
    "function",
    None,
  ),
  "optax.inject_hyperparams": (
    "api/generated/optax.schedules.inject_hyperparams",
    "function",
    "optax.schedules.inject_hyperparams",
  ),
  "optax.masked": ("api/generated/optax.masked", "function", None),
  "optax.multi_transform": ("api/generated/optax.partition", "function", "optax.partition"),
  "optax.partition": ("api/generated/optax.partition", "function", None),
  "optax.schedules.inject_hyperparams": (
    "api/generated/optax.schedules.inject_hyperparams",
    "function",
    None,
  ),
  "optax.sgd": ("api/generated/optax.sgd", "function", None),
  "optax.with_extra_args_support": (
    "api/generated/optax.with_extra_args_support",
    "function",
    None,
  ),
}

FLAX = {
  "flax.nnx.Optimizer": (
    "api_reference/flax.nnx/training/optimizer",
    "class",
    "flax.nnx.optimizer.Optimizer",
  ),
  "flax.nnx.optimizer.Optimizer": ("api_reference/flax.nnx/training/optimizer", "class", None),
  "flax.training.train_state.TrainState": ("api_reference/flax.training", "class", None),
}

ORBAX = {
  "orbax.checkpoint.CheckpointManager": (
    "api_reference/checkpoint.checkpoint_manager",
    "class",
    None,
  ),
  "orbax.checkpoint.StandardCheckpointer": (
    "api_reference/checkpoint.checkpointers",
    "class",
    None,
  ),
}

# file name: (project, version, table)
INVENTORIES = {
  "jax.inv": ("JAX", "latest", JAX),
  "optax.inv": ("Optax", "latest", OPTAX),
  "flax.inv": ("Flax", "latest", FLAX),
  "orbax.inv": ("Orbax", "latest", ORBAX),
}


class _Domain:
  """The Python domain, as ``InventoryFile.dump`` reads it."""

  name = "py"

  def __init__(self, table):
    self._table = table

  def get_objects(self):
    for name, (page, objtype, anchor) in self._table.items():
      yield name, name, objtype, page, anchor or name, 1


def write(path: pathlib.Path, project: str, version: str, table: dict) -> None:
  """Writes one inventory with Sphinx's writer; pages become ``page.html``."""
  from sphinx.util.inventory import InventoryFile

  env = SimpleNamespace(
    config=SimpleNamespace(project=project, version=version),
    domains=SimpleNamespace(sorted=lambda: [_Domain(table)]),
  )
  builder = SimpleNamespace(get_target_uri=lambda page: f"{page}.html")
  InventoryFile.dump(path, env, builder)


def main() -> int:
  for filename, (project, version, table) in INVENTORIES.items():
    write(HERE / filename, project, version, table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
