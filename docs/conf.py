"""Sphinx configuration for the optax_dist documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))
# The examples in docstrings use simulated devices; request them before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import optax_dist

project = "optax_dist"
release = version = optax_dist.__version__
extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.doctest",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
  "myst_parser",
  "coverage_check",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
autosummary_generate = True
autodoc_typehints = "description"
napoleon_google_docstring = True
html_theme = "furo"
html_title = f"optax_dist {release}"
exclude_patterns = ["_build", "_ext"]
# Headings become link targets, so pages can link to each other's sections.
myst_heading_anchors = 3
# Fail the build when a name in optax_dist.__all__ is missing from api.rst.
coverage_check_module = "optax_dist"
coverage_check_api_file = "api.rst"
