"""A Sphinx extension that shows the package's type annotations as written.

Annotations such as ``optax.Params`` or ``optax.OptState`` are aliases of a long
union; evaluated, as autodoc reads them, they print as the whole union, and
classes print under private module paths. This extension reads each
annotation from the source instead, and adds it to the docstring's fields:
``:type name:`` for each parameter, ``:rtype:`` for the return value, and
``:vartype name:`` for each field of a class that its ``Attributes:`` section
documents (napoleon turns that section into ``:ivar:`` fields). Names reached
through the package's private modules become public ones:
``_schedule.SyncSchedule`` reads ``SyncSchedule`` and links to its page, and a
private alias such as ``_collectives.AxisName`` is replaced by its definition.

In ``conf.py``::

  extensions = [..., "sphinx.ext.napoleon", "api_types"]
  autodoc_typehints = "none"  # The signatures show names and defaults only.
  napoleon_use_ivar = True  # ``Attributes:`` becomes one list of fields.
  napoleon_attr_annotations = False  # The field types come from here.
  api_types_package = "optax_dist"

The field list of a class is titled "Attributes", like the docstring section it
comes from. A type that names an alias documented as data (``optax.Params``)
links through intersphinx even though Sphinx looks types up as classes.

The work is done by plain functions (:func:`source_annotations`,
:func:`public_annotation`, :func:`add_type_fields`) so that tests can call them
without running Sphinx.
"""

import ast
import functools
import importlib
import inspect
import re
import sys
import textwrap
from typing import Any

# A field of a docstring after napoleon: ``:param name:``, ``:ivar name:``, ...
_FIELD = re.compile(r"^:(?P<kind>param|type|ivar|vartype|returns?|rtype)(?: (?P<name>[^:]+))?:")


def source_annotations(obj: Any) -> dict[str, str]:
  """The annotations of a function or of a class's fields, as the source writes them.

  For a function: one entry per annotated parameter (``*args`` and
  ``**kwargs`` keep their stars) and ``"return"`` for the return annotation.
  For a class: one entry per annotated field of the class body (a
  ``NamedTuple`` or a dataclass). Empty when the source cannot be read.
  """
  try:
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(obj)))
    tree = ast.parse(source)
  except (OSError, TypeError, SyntaxError):
    return {}
  node = tree.body[0] if tree.body else None
  annotations: dict[str, str] = {}
  if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
    arguments = node.args
    named = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    for arg in named:
      if arg.annotation is not None:
        annotations[arg.arg] = ast.unparse(arg.annotation)
    if arguments.vararg is not None and arguments.vararg.annotation is not None:
      annotations[f"*{arguments.vararg.arg}"] = ast.unparse(arguments.vararg.annotation)
    if arguments.kwarg is not None and arguments.kwarg.annotation is not None:
      annotations[f"**{arguments.kwarg.arg}"] = ast.unparse(arguments.kwarg.annotation)
    if node.returns is not None:
      annotations["return"] = ast.unparse(node.returns)
  elif isinstance(node, ast.ClassDef):
    for statement in node.body:
      if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        text = ast.unparse(statement.annotation)
        if not text.startswith(("ClassVar", "typing.ClassVar")):
          annotations[statement.target.id] = text
  return annotations


def _dotted(node: ast.expr) -> str | None:
  """``a.b.c`` for a chain of attribute accesses on a name, else None."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value)
    return None if base is None else f"{base}.{node.attr}"
  return None


@functools.cache
def _alias_definitions(module_name: str) -> dict[str, ast.expr]:
  """The module-level ``Name = ...`` and ``Name: TypeAlias = ...`` of a module."""
  try:
    tree = ast.parse(inspect.getsource(sys.modules[module_name]))
  except (KeyError, OSError, TypeError, SyntaxError):
    return {}
  definitions: dict[str, ast.expr] = {}
  for statement in tree.body:
    if isinstance(statement, ast.AnnAssign) and statement.value is not None:
      if isinstance(statement.target, ast.Name):
        definitions[statement.target.id] = statement.value
    elif isinstance(statement, ast.Assign) and len(statement.targets) == 1:
      if isinstance(statement.targets[0], ast.Name):
        definitions[statement.targets[0].id] = statement.value
  return definitions


def _public_name(value: Any, package: Any) -> str | None:
  """The name under which ``package`` exports ``value``, if it does."""
  for name in getattr(package, "__all__", ()):
    if getattr(package, name, None) is value:
      return name
  return None


def _resolve(dotted: str, namespace: dict[str, Any]) -> tuple[bool, Any]:
  first, *rest = dotted.split(".")
  if first not in namespace:
    return False, None
  value = namespace[first]
  for attribute in rest:
    if not hasattr(value, attribute):
      return False, None
    value = getattr(value, attribute)
  return True, value


class _Publicize(ast.NodeTransformer):
  """Rewrites the names of an annotation to the names a reader can look up."""

  def __init__(self, module_name: str, package_name: str, depth: int = 0):
    self.module_name = module_name
    self.package_name = package_name
    self.depth = depth

  def _rewrite(self, node: ast.expr) -> ast.expr:
    dotted = _dotted(node)
    module = sys.modules.get(self.module_name)
    package = sys.modules.get(self.package_name)
    if dotted is None or module is None or package is None:
      return self.generic_visit(node)
    found, value = _resolve(dotted, vars(module))
    if not found:
      return node
    public = _public_name(value, package)
    if public is not None:  # Shown as its short name, linked to its page.
      return ast.Name(id=f"~{self.package_name}.{public}")
    parts = dotted.split(".")
    if any(part.startswith("_") for part in parts) and self.depth < 5:
      # A private alias (``_collectives.AxisName``): show its definition.
      owner_found, owner = _resolve(".".join(parts[:-1]), vars(module))
      owner_name = getattr(owner, "__name__", None) if owner_found else self.module_name
      if len(parts) == 1:
        owner_name = self.module_name
      definition = _alias_definitions(owner_name or "").get(parts[-1])
      if definition is not None and owner_name:
        inner = _Publicize(owner_name, self.package_name, self.depth + 1)
        return inner.visit(ast.parse(ast.unparse(definition), mode="eval").body)
    return node

  def visit_Name(self, node: ast.Name) -> ast.expr:
    return self._rewrite(node)

  def visit_Attribute(self, node: ast.Attribute) -> ast.expr:
    return self._rewrite(node)


def public_annotation(text: str, module_name: str, package_name: str) -> str:
  """An annotation of ``module_name``, with public names for the package's own objects.

  ``_schedule.SyncSchedule`` becomes ``~optax_dist.SyncSchedule`` (shown as
  ``SyncSchedule``, linked to its page); a private alias becomes its
  definition; every other name (``optax.Params``, ``jax.Array``, ``int``) is
  kept as written.
  """
  try:
    tree = ast.parse(text, mode="eval")
  except SyntaxError:
    return text
  if isinstance(tree.body, ast.Constant) and isinstance(tree.body.value, str):
    return public_annotation(tree.body.value, module_name, package_name)
  return ast.unparse(_Publicize(module_name, package_name).visit(tree.body))


def _field_name(name: str) -> str:
  """A parameter name as napoleon writes it in a field (``\\*args``)."""
  return name.replace("*", r"\*")


def _block_end(lines: list[str], start: int) -> int:
  """The index after the field that starts at ``lines[start]`` (its indented lines)."""
  end = start + 1
  while end < len(lines) and lines[end].strip() and lines[end][:1].isspace():
    end += 1
  return end


def add_type_fields(lines: list[str], what: str, annotations: dict[str, str]) -> list[str]:
  """The docstring ``lines`` (after napoleon) with the types of ``annotations`` added.

  Functions and methods get ``:type:`` for each parameter and ``:rtype:`` for
  the return value; a parameter the docstring does not describe gets an empty
  ``:param:`` so that its type shows. Classes get ``:vartype:`` for each field
  that an ``:ivar:`` describes. Each type goes right after the field it
  belongs to, in the same field list (a type in another list, e.g. after an
  example, would not be shown with its field). Types already given are kept.
  """
  result = list(lines)
  fields: dict[tuple[str, str], int] = {}  # (kind, name) -> line index
  for index, line in enumerate(result):
    match = _FIELD.match(line)
    if match:
      fields.setdefault((match.group("kind"), (match.group("name") or "").strip()), index)
  insertions: dict[int, list[str]] = {}  # line index -> lines inserted before it

  def insert_after(index: int, new_lines: list[str]) -> None:
    insertions.setdefault(_block_end(result, index), []).extend(new_lines)

  if what == "class":
    for name, annotation in annotations.items():
      if ("ivar", name) in fields and ("vartype", name) not in fields:
        insert_after(fields["ivar", name], [f":vartype {name}: {annotation}"])
  else:
    missing: list[str] = []
    last_param = None
    for name, annotation in annotations.items():
      if name == "return":
        continue
      field = _field_name(name)
      if ("param", field) in fields:
        last_param = fields["param", field]
        if ("type", field) not in fields:
          insert_after(last_param, [f":type {field}: {annotation}"])
      elif ("type", field) not in fields:
        missing += [f":param {field}:", f":type {field}: {annotation}"]
    returns = fields.get(("returns", "")) or fields.get(("return", ""))
    rtype = []
    if "return" in annotations and not any(kind == "rtype" for kind, _ in fields):
      rtype = [f":rtype: {annotations['return']}"]
    if last_param is not None:
      insert_after(last_param, missing)
      missing = []
    if returns is not None:
      insert_after(returns, rtype)
      rtype = []
    tail = missing + rtype
    if tail:
      if result and result[-1].strip():
        result.append("")
      insertions.setdefault(len(result), []).extend(tail)
  for index in sorted(insertions, reverse=True):
    result[index:index] = insertions[index]
  return result


def _on_process_docstring(app, what, name, obj, options, lines) -> None:
  package_name = app.config.api_types_package
  if not package_name or not name.startswith(package_name + "."):
    return
  if what not in ("function", "method", "class"):
    return
  importlib.import_module(package_name)
  module_name = getattr(obj, "__module__", None) or package_name
  annotations = {
    key: public_annotation(text, module_name, package_name)
    for key, text in source_annotations(obj).items()
  }
  if what in ("function", "method"):
    annotations = {key: text for key, text in annotations.items() if key != "self"}
  lines[:] = add_type_fields(lines, what, annotations)


def _on_doctree_read(app, doctree) -> None:
  """Titles a class's field list "Attributes", like the docstring section it comes from."""
  from docutils import nodes
  from sphinx import addnodes

  for desc in doctree.findall(addnodes.desc):
    if desc.get("domain") != "py" or desc.get("objtype") != "class":
      continue
    for content in desc.children:
      if not isinstance(content, addnodes.desc_content):
        continue
      for field_list in content.children:  # Not those of nested objects (methods).
        if not isinstance(field_list, nodes.field_list):
          continue
        for field in field_list.children:
          field_name = field.children[0] if field.children else None
          if isinstance(field_name, nodes.field_name) and field_name.astext() == "Variables":
            field_name.children = [nodes.Text("Attributes")]


def _on_missing_reference(app, env, node, contnode):
  """Looks a type up among data too: aliases such as ``optax.Params`` are data."""
  if node.get("refdomain") != "py" or node.get("reftype") != "class":
    return None
  from sphinx.ext import intersphinx

  retry = node.deepcopy()
  retry["reftype"] = "obj"
  return intersphinx.missing_reference(app, env, retry, contnode)


def setup(app: Any) -> dict[str, Any]:
  app.setup_extension("sphinx.ext.intersphinx")
  app.add_config_value("api_types_package", None, "env")
  # After napoleon (priority 500), which turns the Google sections into fields.
  app.connect("autodoc-process-docstring", _on_process_docstring, priority=600)
  app.connect("doctree-read", _on_doctree_read)
  # After intersphinx's own lookup.
  app.connect("missing-reference", _on_missing_reference, priority=900)
  return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
