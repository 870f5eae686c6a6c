"""A Sphinx extension that fails the build when a public name is undocumented.

Every name in the package's ``__all__`` must be listed in an ``autosummary``
directive of the API reference (``api.rst``), which gives it its own page, and
must have a docstring. Names listed there that are not public are reported as
well, so the reference cannot drift from the package in either direction.

In ``conf.py``::

  extensions = [..., "coverage_check"]
  coverage_check_module = "optax_dist"
  coverage_check_api_file = "api.rst"  # relative to the source directory

The checks are plain functions (:func:`autosummary_names`,
:func:`missing_names`, :func:`coverage_problems`) so that tests can call them
without running Sphinx.
"""

from collections.abc import Iterable
import importlib
import inspect
import pathlib
import re
from typing import Any

_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. autosummary::\s*$")


def autosummary_names(text: str, module: str | None = None) -> list[str]:
  """The entries of every ``.. autosummary::`` directive in an rst text.

  Options (``:toctree: ...``) and comments are skipped; a leading ``~`` and
  the ``module.`` prefix are removed, so ``optax_dist.tower`` and ``tower``
  both read ``tower``.
  """
  names: list[str] = []
  indent: int | None = None  # The directive's indent while inside one.
  for line in text.splitlines():
    match = _DIRECTIVE.match(line)
    if match:
      indent = len(match.group("indent"))
      continue
    if indent is None or not line.strip():
      continue
    if len(line) - len(line.lstrip()) <= indent:
      indent = None  # Dedented: the directive's content has ended.
      continue
    entry = line.strip()
    if entry.startswith((":", "..")):
      continue  # An option or a comment.
    name = entry.split()[0].lstrip("~")
    if module and name.startswith(module + "."):
      name = name[len(module) + 1 :]
    names.append(name)
  return names


def missing_names(api_text: str, public: Iterable[str], module: str | None = None) -> list[str]:
  """The public names that no autosummary directive of ``api_text`` lists."""
  listed = set(autosummary_names(api_text, module))
  return sorted(name for name in public if name not in listed)


def coverage_problems(api_text: str, module: Any) -> list[str]:
  """Everything that keeps the API reference from covering ``module.__all__``.

  Args:
    api_text: The text of the API reference (rst with autosummary directives).
    module: The imported package.

  Returns:
    One message per problem; empty when every public name is listed once,
    has a docstring, and nothing else is listed.
  """
  public = list(module.__all__)
  listed = autosummary_names(api_text, module.__name__)
  problems = [
    f"`{module.__name__}.{name}` is public (in __all__) but not listed in the API reference"
    for name in missing_names(api_text, public, module.__name__)
  ]
  problems += [
    f"`{name}` is listed in the API reference but is not in `{module.__name__}.__all__`"
    for name in sorted(set(listed) - set(public))
  ]
  problems += [
    f"`{name}` is listed more than once in the API reference"
    for name in sorted({n for n in listed if listed.count(n) > 1})
  ]
  problems += [
    f"`{module.__name__}.{name}` has no docstring"
    for name in public
    if hasattr(module, name) and not (inspect.getdoc(getattr(module, name)) or "").strip()
  ]
  return problems


def check_source(srcdir: str | pathlib.Path, api_file: str, module_name: str) -> list[str]:
  """:func:`coverage_problems` for the API file in a documentation source tree."""
  path = pathlib.Path(srcdir) / api_file
  if not path.is_file():
    return [f"the API reference {path} does not exist"]
  return coverage_problems(path.read_text(), importlib.import_module(module_name))


def _on_builder_inited(app: Any) -> None:
  """Reports every problem as a warning located in the API file."""
  from sphinx.util import logging

  module_name = app.config.coverage_check_module
  if not module_name:
    problems = ["set `coverage_check_module` in conf.py"]
  else:
    problems = check_source(app.srcdir, app.config.coverage_check_api_file, module_name)
  logger = logging.getLogger(__name__)
  location = pathlib.PurePosixPath(app.config.coverage_check_api_file).with_suffix("").as_posix()
  for problem in problems:
    logger.warning(f"API reference coverage: {problem}", location=location, type="coverage_check")
  app.env.coverage_check_problems = problems


def _on_build_finished(app: Any, exception: BaseException | None) -> None:
  """Fails the build (exit status 1) on coverage problems, with or without -W."""
  if exception is None and getattr(app.env, "coverage_check_problems", None):
    app.statuscode = 1


def setup(app: Any) -> dict[str, Any]:
  app.add_config_value("coverage_check_module", None, "env")
  app.add_config_value("coverage_check_api_file", "api.rst", "env")
  app.connect("builder-inited", _on_builder_inited)
  app.connect("build-finished", _on_build_finished)
  return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
