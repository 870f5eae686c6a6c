"""The documentation: its code runs, and the API reference covers the package."""

import importlib.util
import pathlib
import re
import types

import jax
import numpy as np
import pytest

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


# Every constructor argument, method and class member of the TF1 reference pages
# (and of ModelAverageOptimizer), which the migration guide's section for that
# class must name.
TF1_NAMES = {
  "`tf.train.Optimizer`": (
    "use_locking name compute_gradients apply_gradients minimize get_name get_slot "
    "get_slot_names variables loss var_list gate_gradients aggregation_method "
    "colocate_gradients_with_ops grad_loss grads_and_vars global_step GATE_NONE GATE_OP "
    "GATE_GRAPH"
  ),
  "`TowerOptimizer` and `replicate_model_fn`": (
    "optimizer_or_optimizer_fn apply_gradients compute_gradients get_name get_slot "
    "get_slot_names has_been_used minimize variables COLLECTION_FOR_GRAPH_STATES GATE_NONE "
    "GATE_OP GATE_GRAPH global_step loss_reduction devices SyncReplicasOptimizer"
  ),
  "`ElasticAverageOptimizer`": (
    "opt num_worker ea_custom_getter communication_period moving_rate rho use_locking "
    "synchronous name apply_gradients compute_gradients get_init_op task_index get_name "
    "get_slot get_slot_names make_session_run_hook is_chief minimize swapping_saver var_list "
    "variables BETA GATE_NONE GATE_OP GATE_GRAPH"
  ),
  "`AGNOptimizer`": (
    "optimizer num_worker custom_getter communication_period use_locking name "
    "apply_gradients compute_gradients get_init_op task_index get_name get_slot "
    "get_slot_names make_session_run_hook is_chief minimize variables GATE_NONE GATE_OP "
    "GATE_GRAPH"
  ),
  "`ModelAverageOptimizer`": (
    "opt num_worker is_chief ma_custom_getter interval_steps use_locking name "
    "compute_gradients apply_gradients global_step get_init_op make_session_run_hook "
    "minimize get_slot get_slot_names get_name variables"
  ),
}


def migration_sections():
  text = (DOCS / "migration.md").read_text()
  chunks = re.split(r"^## ", text, flags=re.M)[1:]
  return {chunk.split("\n", 1)[0].strip(): chunk for chunk in chunks}


@pytest.mark.parametrize("section", sorted(TF1_NAMES))
def test_migration_guide_maps_every_tf1_argument_and_method(section):
  body = migration_sections()[section]
  missing = [n for n in TF1_NAMES[section].split() if not re.search(rf"\b{n}\b", body)]
  assert not missing, f"the migration guide's {section} section does not map {missing}"


def test_migration_guide_covers_the_behavioural_differences():
  body = migration_sections()["Behavioural differences"]
  for topic in ("rho", "round_robin", "simultaneous", "global_step", "center_reduction"):
    assert topic in body, topic


def load_coverage_check():
  """docs/_ext/coverage_check.py, the Sphinx extension (it imports Sphinx lazily)."""
  path = DOCS / "_ext" / "coverage_check.py"
  spec = importlib.util.spec_from_file_location("coverage_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_docs_build_runs_the_coverage_check():
  conf = (DOCS / "conf.py").read_text()
  assert '"coverage_check"' in conf
  assert 'coverage_check_module = "optax_dist"' in conf


def test_coverage_check_passes_on_the_api_reference():
  check = load_coverage_check()
  api = (DOCS / "api.rst").read_text()
  assert sorted(check.autosummary_names(api, "optax_dist")) == sorted(optax_dist.__all__)
  assert check.coverage_problems(api, optax_dist) == []
  assert check.check_source(DOCS, "api.rst", "optax_dist") == []


@pytest.mark.parametrize("name", optax_dist.__all__)
def test_coverage_check_fails_when_a_public_name_is_removed(name, tmp_path):
  check = load_coverage_check()
  api = (DOCS / "api.rst").read_text()
  entry = f"\n   {name}\n"
  assert api.count(entry) == 1, f"api.rst should list {name} once"
  removed = api.replace(entry, "\n")
  assert name in check.missing_names(removed, optax_dist.__all__, "optax_dist")
  assert name not in check.missing_names(api, optax_dist.__all__, "optax_dist")
  before = check.coverage_problems(api, optax_dist)
  problems = check.coverage_problems(removed, optax_dist)
  assert [p for p in problems if p not in before] == [
    f"`optax_dist.{name}` is public (in __all__) but not listed in the API reference"
  ]
  # The same through the file the Sphinx hook reads.
  (tmp_path / "api.rst").write_text(removed)
  assert check.check_source(tmp_path, "api.rst", "optax_dist") == problems


def test_coverage_check_reads_only_autosummary_entries():
  check = load_coverage_check()
  text = """\
Title
=====

.. currentmodule:: pkg

.. autosummary::
   :toctree: _autosummary
   :nosignatures:

   alpha
   pkg.beta
   ~pkg.gamma  Some trailing text
   .. a comment

   delta

Prose that mentions epsilon.

   zeta (indented, but not in a directive)

  .. autosummary::

     eta
"""
  assert check.autosummary_names(text, "pkg") == ["alpha", "beta", "gamma", "delta", "eta"]


def test_coverage_check_reports_stale_duplicate_and_undocumented_names():
  check = load_coverage_check()

  def documented():
    """Has a docstring."""

  def bare():
    pass

  pkg = types.ModuleType("pkg")
  pkg.__all__ = ("bare", "documented")
  pkg.bare, pkg.documented = bare, documented
  text = ".. autosummary::\n\n   bare\n   documented\n   documented\n   gone\n"
  assert check.coverage_problems(text, pkg) == [
    "`gone` is listed in the API reference but is not in `pkg.__all__`",
    "`documented` is listed more than once in the API reference",
    "`pkg.bare` has no docstring",
  ]
  assert check.check_source("/nonexistent", "api.rst", "optax_dist") == [
    "the API reference /nonexistent/api.rst does not exist"
  ]
