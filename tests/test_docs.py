"""The documentation: its code runs, and the API reference covers the package."""

import pathlib
import re

import jax
import numpy as np

import optax_dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUNNABLE = re.compile(r"^% runnable[^\n]*\n```python\n(.+?)\n```", re.S | re.M)


def runnable_blocks(page):
  """The Python blocks of a docs page marked with a ``% runnable`` comment."""
  return RUNNABLE.findall((DOCS / page).read_text())


def run_block(page, index):
  assert jax.device_count() == 8
  blocks = runnable_blocks(page)
  assert len(blocks) > index, f"{page} has {len(blocks)} runnable blocks"
  namespace: dict = {"__name__": f"docs_{page}"}
  exec(compile(blocks[index], str(DOCS / page), "exec"), namespace)
  return namespace


def test_getting_started_tower_loop_trains(capsys):
  ns = run_block("getting_started.md", 0)
  losses = ns["losses"]
  assert len(losses) == 100
  assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])
  assert int(optax_dist.global_step(ns["opt_state"])) == 100
  assert "after 100 steps" in capsys.readouterr().out


def test_getting_started_per_worker_loop_trains():
  ns = run_block("getting_started.md", 1)
  losses = ns["losses"]
  assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])
  assert int(ns["syncs"]) == 25
  # Every worker holds the same center.
  centers = optax_dist.center_params(ns["opt_state"])
  np.testing.assert_array_equal(centers["w"], np.broadcast_to(centers["w"][:1], centers["w"].shape))
  np.testing.assert_array_equal(ns["center"]["w"], centers["w"][0])


def test_migration_elastic_average_translation_trains(capsys):
  ns = run_block("migration.md", 0)
  losses = ns["losses"]
  assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])
  assert int(ns["syncs"]) == 25  # 100 calls, a sync every 4.
  # The workers started from worker 0's params (get_init_op) and hold one center.
  centers = ns["opt_state"].center["w"]
  np.testing.assert_array_equal(centers, np.broadcast_to(centers[:1], centers.shape))
  np.testing.assert_array_equal(ns["center"]["w"], centers[0])
  assert "25 syncs" in capsys.readouterr().out


def test_migration_tower_translation_trains():
  ns = run_block("migration.md", 1)
  batch = (ns["features"], ns["labels"])
  first_loss = float(ns["loss_fn"]({"w": np.zeros((16, 1), np.float32)}, batch))
  assert float(ns["metrics"]["loss"]) < first_loss / 1000, (first_loss, ns["metrics"])
  # Synchronous replication keeps one copy of the params: the final loss is theirs
  # (the reported loss is the one before the last update, so it is larger).
  assert float(ns["loss_fn"](ns["params"], batch)) <= float(ns["metrics"]["loss"])
  assert int(optax_dist.global_step(ns["opt_state"])) == 100
