"""Sphinx configuration for the optax_dist documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))
# The examples in docstrings use simulated devices; request them before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import optax_dist

project = "optax_dist"
copyright = "2026, the optax_dist authors"
release = version = optax_dist.__version__
extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.doctest",
  "sphinx.ext.intersphinx",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
  "sphinx_copybutton",
  "myst_parser",
  "api_types",
  "coverage_check",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
templates_path = ["_templates"]
exclude_patterns = ["_build", "_ext", "_inventories", "_templates"]

# The API reference: one page per public name (docs/_templates/autosummary/class.rst
# lays out the classes), its members in source order.
autosummary_generate = True
autodoc_member_order = "bysource"
# The signatures show names and defaults; the types, as the source writes them
# (`optax.Params`, not the union it stands for), go to the parameter and
# attribute lists (docs/_ext/api_types.py).
autodoc_typehints = "none"
api_types_package = "optax_dist"
napoleon_google_docstring = True
napoleon_use_ivar = True
napoleon_attr_annotations = False

# Links to the other projects' docs. Their inventories are shipped in
# _inventories/ (see write_inventories.py there), so the build needs no network.
intersphinx_mapping = {
  "jax": ("https://docs.jax.dev/en/latest/", "_inventories/jax.inv"),
  "optax": ("https://optax.readthedocs.io/en/latest/", "_inventories/optax.inv"),
  "flax": ("https://flax.readthedocs.io/en/latest/", "_inventories/flax.inv"),
  "orbax": ("https://orbax.readthedocs.io/en/latest/", "_inventories/orbax.inv"),
}

html_theme = "furo"
html_title = f"optax_dist {release}"
# The copy button leaves out the prompts of docstring examples and their output.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
# Headings become link targets, so pages can link to each other's sections.
myst_heading_anchors = 3
# Fail the build when a name in optax_dist.__all__ is missing from api.rst.
coverage_check_module = "optax_dist"
coverage_check_api_file = "api.rst"
