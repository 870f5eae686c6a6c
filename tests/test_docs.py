"""The documentation: its code runs, and the API reference covers the package.

Every Python block of the README and of the pages under ``docs/`` (with the
files they include) runs here, as written. The blocks of a page run in order
in one namespace, so a page reads as one script, and each page runs once per
test session; the tests below check what its blocks computed and printed.

A block that cannot run as written (a signature, a TensorFlow 1.x program, a
step that needs several processes, the body of a loop) is a *fragment*, and
says so visibly: its first line is a comment that starts with ``# Fragment``
and gives the reason, e.g. ``# Fragment: needs 4 processes.`` Fragments are
shown, not run. Any other block that fails to run fails
``test_every_python_block_runs``, and a Python block fenced other than
```` ```python ```` fails ``test_python_blocks_use_one_fence``. When the
paragraph right after a block starts with "It prints `...`", the block must
print exactly that (whitespace aside).
"""

import ast
import contextlib
import functools
import importlib.util
import inspect
import io
import pathlib
import re
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FRAGMENT = "# Fragment"
# A fenced block: its fence, info string and text (fences start a line).
FENCE = re.compile(r"^(`{3,}|~{3,})([^\n]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
INCLUDE = re.compile(r"^```\{include\}\s+(\S+)", re.M)
PRINTS = re.compile(r"\AIt prints `([^`]+)`")


def page_paths():
  """The README and every docs page, relative to the repository root."""
  pages = [pathlib.Path("README.md")]
  pages += sorted(
    path.relative_to(ROOT) for path in DOCS.rglob("*.md") if "_build" not in path.parts
  )
  return [str(page) for page in pages]


def page_sources(page):
  """``(path, text)`` of a page and of the files it includes (``{include}``)."""
  path = ROOT / page
  text = path.read_text()
  included = [(path.parent / name).resolve() for name in INCLUDE.findall(text)]
  return [(path, text)] + [(other, other.read_text()) for other in included]


class Block(types.SimpleNamespace):
  """A fenced block: ``info``, ``code``, ``path`` and ``line`` (of its code), ``after``."""


def fenced_blocks(page):
  """Every fenced block of a page, with the paragraph that follows it."""
  blocks = []
  for path, text in page_sources(page):
    for match in FENCE.finditer(text):
      rest = text[match.end() :].lstrip("\n")
      blocks.append(
        Block(
          info=match.group(2).strip(),
          code=match.group(3),
          path=path,
          line=text.count("\n", 0, match.start(3)) + 1,
          after=rest.split("\n\n")[0],
        )
      )
  return blocks


def python_blocks(page):
  return [block for block in fenced_blocks(page) if block.info == "python"]


def is_fragment(block):
  return block.code.startswith(FRAGMENT)


def runnable_blocks(page):
  """The Python blocks of a page that run: every one but the fragments."""
  return [block for block in python_blocks(page) if not is_fragment(block)]


@functools.cache
def run_page(page):
  """Runs a page's blocks in order in one namespace (once per session).

  Returns, for each block, a copy of the namespace after it and what it printed.
  """
  assert jax.device_count() == 8
  namespace: dict = {"__name__": f"docs_{page}"}
  runs = []
  for block in runnable_blocks(page):
    out = io.StringIO()
    # Line numbers in tracebacks are the page's own.
    code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
    with contextlib.redirect_stdout(out):
      exec(code, namespace)
    runs.append(types.SimpleNamespace(namespace=dict(namespace), out=out.getvalue()))
  return runs


def run_block(page, index):
  """The namespace after a page's runnable block ``index`` (the blocks before it ran too)."""
  runs = run_page(page)
  assert len(runs) > index, f"{page} has {len(runs)} runnable blocks"
  return runs[index].namespace


def printed(page, index):
  return run_page(page)[index].out


@pytest.mark.parametrize("page", page_paths())
def test_every_python_block_runs(page):
  runs = run_page(page)
  blocks = fenced_blocks(page)
  runnable = [
    i for i, block in enumerate(blocks) if block.info == "python" and not is_fragment(block)
  ]
  assert len(runs) == len(runnable)
  for i, run in zip(runnable, runs, strict=True):
    block = blocks[i]
    where = f"{block.path}:{block.line}"
    claim = PRINTS.match(block.after)
    if claim:
      expected, got = (" ".join(s.split()) for s in (claim.group(1), run.out))
      assert got == expected, f"{where}: the text says it prints {expected!r}"
    elif block.after.strip() == "It prints:":
      shown = blocks[i + 1]
      assert shown.info == "text", f"{where}: show the output in a text block"
      assert_same_output(run.out, shown.code, where)


def assert_same_output(got, shown, where):
  """The same lines and words; numbers equal to 1% (float rounding may change)."""
  got_lines, shown_lines = got.strip().splitlines(), shown.strip().splitlines()
  assert len(got_lines) == len(shown_lines), f"{where}: it prints {got!r}"
  for got_line, shown_line in zip(got_lines, shown_lines, strict=True):
    got_words, shown_words = got_line.split(), shown_line.split()
    assert len(got_words) == len(shown_words), f"{where}: it prints {got_line!r}"
    for a, b in zip(got_words, shown_words, strict=True):
      if re.fullmatch(r"-?\d+\.\d+", b):
        assert float(a) == pytest.approx(float(b), rel=0.01), f"{where}: it prints {got_line!r}"
      else:
        assert a == b, f"{where}: it prints {got_line!r}"


@pytest.mark.parametrize("page", page_paths())
def test_fragments_say_why(page):
  for block in python_blocks(page):
    if is_fragment(block):
      first = block.code.split("\n", 1)[0]
      assert re.match(r"# Fragment: \S", first), f"{block.path}:{block.line}: {first!r}"


@pytest.mark.parametrize("page", page_paths())
def test_python_blocks_use_one_fence(page):
  infos = {block.info for block in fenced_blocks(page)}
  odd = {
    i for i in infos if re.match(r"(\{code(-block|-cell)?\}\s*)?(py|python3|ipython|pycon)\b", i)
  }
  assert not odd, f"{page}: fence Python blocks as ```python (runnable or # Fragment), not {odd}"


def test_fragment_convention_is_enforced(tmp_path, monkeypatch):
  page = tmp_path / "page.md"
  page.write_text(
    "Intro.\n\n```python\nx = 1\nprint(x + 1)\n```\n\nIt prints `2`.\n\n"
    "```python\n# Fragment: a signature.\nf(a, *, b)\n```\n\n"
    "```python\ny = undefined_name\n```\n"
  )
  monkeypatch.setitem(globals(), "ROOT", tmp_path)
  assert [b.line for b in python_blocks("page.md")] == [4, 11, 16]
  assert [b.code.split()[0] for b in runnable_blocks("page.md")] == ["x", "y"]
  with pytest.raises(NameError, match="undefined_name"):
    run_page("page.md")
  (tmp_path / "page.md").write_text(page.read_text().replace("y = undefined_name", "y = 3"))
  runs = run_page("page.md")
  assert [run.out for run in runs] == ["2\n", ""]
  assert runs[1].namespace["x"] == 1  # The blocks of a page share one namespace.


def test_landing_page_example_trains():
  ns = run_block("docs/index.md", 0)
  assert float(ns["loss"].mean()) < 1e-2, ns["loss"]
  assert int(ns["syncs"]) == 20  # 100 steps, a sync every 5.
  # The last step was a sync: every worker holds the averaged params.
  w = np.asarray(ns["w"])
  np.testing.assert_array_equal(w, np.broadcast_to(w[:1], w.shape))
  np.testing.assert_allclose(w[0], [1.0, -2.0, 3.0], atol=0.05)
  assert "after 20 syncs" in printed("docs/index.md", 0)


def shell_blocks(page):
  """The lines of every ``bash`` block of a docs page."""
  blocks = re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", (DOCS / page).read_text(), re.S | re.M)
  return [block.splitlines() for block in blocks]


def readme_commands(marker):
  """The commands of the README block after ``<!-- marker -->``, split at ``&&``."""
  text = (ROOT / "README.md").read_text()
  match = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
  assert match, f"README.md has no {marker} block"
  return [command.strip() for command in match.group(1).split("&&")]


@pytest.mark.parametrize("marker", ["demo-command", "test-command"])
def test_getting_started_gives_the_readme_commands(marker):
  lines = {line.strip() for block in shell_blocks("getting_started.md") for line in block}
  missing = [command for command in readme_commands(marker) if command not in lines]
  assert not missing, f"getting_started.md lacks the README's {missing}"


@pytest.mark.parametrize("page", ["index.md", "getting_started.md"])
def test_shell_commands_are_short_and_one_per_line(page):
  blocks = shell_blocks(page)
  assert blocks, f"{page} shows no commands"
  for line in (line for block in blocks for line in block):
    assert "&&" not in line and ";" not in line, f"{page}: one command per line: {line!r}"
    assert len(line) <= 70, f"{page}: a command this long is cut off on narrow screens: {line!r}"


def test_landing_page_installs_from_a_clone():
  commands = [line.strip() for block in shell_blocks("index.md") for line in block]
  assert commands[0].startswith("git clone ")
  assert "pip install -e ." in commands
  # The same install as the README's commands, without the extras.
  assert any(c.startswith("pip install -e ") for c in readme_commands("test-command"))


def test_landing_page_toctrees_are_hidden():
  toctrees = re.findall(r"^```\{toctree\}\n(.*?)^```", (DOCS / "index.md").read_text(), re.S | re.M)
  assert toctrees
  assert all(":hidden:" in options for options in toctrees)


def markdown_tables(page):
  """``(header cells, text before, text after)`` for each table of a page."""
  paragraphs = re.split(r"\n\s*\n", (DOCS / page).read_text())
  tables = []
  for index, paragraph in enumerate(paragraphs):
    lines = paragraph.strip().splitlines()
    if len(lines) >= 2 and lines[0].startswith("|") and re.match(r"^\|[\s|:-]+\|$", lines[1]):
      header = [cell.strip().strip("`") for cell in lines[0].strip("|").split("|")]
      before = paragraphs[index - 1] if index else ""
      after = paragraphs[index + 1] if index + 1 < len(paragraphs) else ""
      tables.append((header, before, after))
  return tables


@pytest.mark.parametrize("page", ["index.md", "getting_started.md"])
def test_every_table_explains_its_columns(page):
  for header, before, after in markdown_tables(page):
    text = " ".join((before, after)).replace("\n", " ")
    unexplained = [column for column in header if column.lower() not in text.lower()]
    assert not unexplained, f"{page}: no sentence next to the table explains {unexplained}"


def test_getting_started_tower_loop_trains():
  ns = run_block("docs/getting_started.md", 0)
  losses = ns["losses"]
  assert len(losses) == 100
  assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])
  assert int(optax_dist.global_step(ns["opt_state"])) == 100
  assert "after 100 steps" in printed("docs/getting_started.md", 0)


def test_getting_started_per_worker_loop_trains():
  ns = run_block("docs/getting_started.md", 1)
  losses = ns["losses"]
  assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])
  assert int(ns["syncs"]) == 25
  # Every worker holds the same center.
  centers = optax_dist.center_params(ns["opt_state"])
  np.testing.assert_array_equal(centers["w"], np.broadcast_to(centers["w"][:1], centers["w"].shape))
  np.testing.assert_array_equal(ns["center"]["w"], centers["w"][0])


def test_getting_started_static_flags_compile_one_program_per_kind_of_call():
  ns = run_block("docs/getting_started.md", 2)
  # 36 calls: 4 warm-up calls, then an outer step on calls 12, 20, 28, 36.
  assert int(ns["syncs"]) == 4
  assert optax_dist.call_count(jax.tree.map(lambda a: a[0], ns["opt_state"])) == 36
  assert ns["train_step"]._cache_size() == 3
  assert float(ns["loss"]) < 0.05
  # The iterator goes on from the state's count: calls 37 to 45.
  assert [next(ns["flags"]) for _ in range(9)] == [False] * 7 + [True, False]
  # A fresh iterator from a new state: the schedule from call 1.
  fresh = optax_dist.sync_flags(ns["tx"].init({"w": np.zeros((16, 1), np.float32)}))
  assert [next(fresh) for _ in range(13)] == ["warmup"] * 4 + [False] * 7 + [True, False]


def test_getting_started_nnx_optimizer_takes_the_flag():
  ns = run_block("docs/getting_started.md", 3)
  _, optimizer = ns["nnx"].merge(ns["graphdef"], ns["state"])
  opt_state = ns["nnx"].as_pure(optimizer.opt_state)
  np.testing.assert_array_equal(optax_dist.global_step(opt_state), [3] * 8)
  assert ns["train_step"]._cache_size() == 2  # A local step and a sync.


def scalar_bytes(shape):
  """The bytes of the scalars in an HLO result type, one-element arrays included.

  E.g. 9 for ``(f32[16]{0}, f32[1]{0}, pred[])``: a sync's count of finite
  workers travels as an ``f32[1]`` beside the values it counts.
  """
  sizes = {"pred": 1, "s8": 1, "u8": 1, "s32": 4, "u32": 4, "f32": 4}
  return sum(sizes[dtype] for dtype in re.findall(r"\b([a-z]+\d*)\[1?\]", shape))


def test_large_models_fsdp_step_syncs_the_local_shard():
  ns = run_block("docs/large_models.md", 0)
  report = ns["report"]
  # A sync all-reduces each device's 16 x 8 shard across the 2 replicas, and
  # the 4 devices of a replica agree that it was finite (an int32 all-reduce).
  # Everything else a sync moves is such scalar flags, as the page says.
  sync = [c for c in report.collectives if not c.every_step]
  assert [(c.kind, c.workers) for c in sync if "f32[16,8]" in c.shape] == [("all-reduce", 2)]
  assert ("all-reduce", 4, "s32[]") in [(c.kind, c.nbytes, c.shape) for c in sync]
  assert report.sync_bytes == 16 * 8 * 4 + sum(scalar_bytes(c.shape) for c in sync)
  center = ns["optax_dist"].center_params(ns["state"])["w"]
  assert center.sharding.spec == ns["P"]("replica", "fsdp")
  np.testing.assert_array_equal(center[0], center[1])  # The replicas share the center.
  assert printed("docs/large_models.md", 0) == f"P('replica', 'fsdp') {report.sync_bytes}\n"


def test_large_models_gspmd_path():
  ns = run_block("docs/large_models.md", 1)
  report = ns["report"]
  # Nothing on local steps; per sync the 16 params of each replica, the count
  # of finite workers in the same all-reduce (on this path one float per
  # replica, f32[8], since the partitioner shards it over the replicas), and
  # scalar flags (the partitioner's predicate).
  assert report.every_step_bytes == 0
  sync = [c for c in report.collectives if not c.every_step]
  assert [c.kind for c in sync if "f32[16]" in c.shape] == ["all-reduce"]
  assert [c.shape for c in sync if "f32[16]" in c.shape] == ["(f32[16]{0}, f32[8]{0})"]
  assert report.sync_bytes == 16 * 4 + 8 * 4 + sum(scalar_bytes(c.shape) for c in sync)
  assert ns["params"].sharding.spec == ns["P"]("replica")
  assert printed("docs/large_models.md", 1) == f"0 {report.sync_bytes}\n"


def test_large_models_resize_restores_8_workers_as_4():
  ns = run_block("docs/large_models.md", 2)
  params, opt_state = ns["params"], ns["opt_state"]
  four = set(jax.devices()[:4])
  for leaf in jax.tree.leaves((params, opt_state)):
    assert leaf.shape[0] == 4 and leaf.sharding.device_set == four
    assert leaf.sharding.spec == ns["P"]("batch")
  # Every worker restarts at the center (the ones it was saved with).
  np.testing.assert_array_equal(params["w"], np.ones((4, 16, 4)))
  np.testing.assert_array_equal(optax_dist.center_params(opt_state)["w"], np.ones((4, 16, 4)))
  assert optax_dist.call_count(opt_state) == 0


TUTORIAL = "docs/tutorial.md"


def tutorial(code):
  """The tutorial's namespace after its one block that holds ``code``, and what it printed."""
  found = [i for i, block in enumerate(runnable_blocks(TUTORIAL)) if code in block.code]
  assert len(found) == 1, f"{code!r} is in the tutorial's blocks {found}"
  run = run_page(TUTORIAL)[found[0]]
  return run.namespace, run.out


def test_tutorial_code_fits_the_page():
  # Wider lines scroll sideways in the rendered page (the theme shows 88 columns).
  for block in python_blocks(TUTORIAL):
    for number, line in enumerate(block.code.splitlines(), block.line):
      assert len(line) <= 88, f"{block.path}:{number} is {len(line)} columns wide"


def test_tutorial_model_is_nnx_and_the_state_per_worker():
  from flax import nnx

  ns, _ = tutorial("optax_dist.per_worker(")
  assert isinstance(ns["params"], nnx.State)
  for leaf in jax.tree.leaves((ns["params"], ns["opt_state"])):
    assert leaf.shape[0] == 8 and leaf.sharding.spec == ns["P"]("workers")
  tx_code = next(b.code for b in runnable_blocks(TUTORIAL) if "tx = optax_dist.diloco(" in b.code)
  for option in ("sync_warmup=2", "fragments=2", "comm_dtype=jnp.int8"):
    assert option in tx_code


def test_tutorial_logs_the_bytes_the_report_counts():
  ns, _ = tutorial("report = ")
  size = sum(leaf[0].size for leaf in jax.tree.leaves(ns["params"]))
  assert size == 2 * (64 * 64 + 64) + 64 + 1
  # The loss's all-reduce every call; the warm-up's all-reduce of the float32
  # gradients and one scalar; the int8 ring of each fragment (an all_to_all
  # and an all_gather), both fragments padded to the same 8 x 3 blocks.
  assert ns["report"].every_step_wire_bytes == 2 * 7 / 8 * 4
  assert ns["warmup_bytes"] == 2 * 7 / 8 * 4 * (size + 1)
  ring = [c for c in ns["report"].collectives if c.loop in ns["ring"]]
  assert sorted({c.kind for c in ring}) == ["all-gather", "all-to-all"]
  assert len(ns["ring"]) == 2
  fragment = ns["fragment_bytes"]
  assert [ns["branches"][loop] for loop in ns["ring"]] == [fragment, fragment]
  assert fragment < 0.4 * 2 * 7 / 8 * 4 * 4224  # A float32 ring all-reduce of a fragment.

  log = tutorial("for count in range(12):")[1] + tutorial("largest difference")[1]
  lines = re.findall(r"call +(\d+) +loss ([\d.]+) +sent +([\d.]+) kB", log)
  assert [int(call) for call, _, _ in lines] == [1, 4, 8, 12, 16, 20]
  losses = [float(loss) for _, loss, _ in lines]
  assert losses[-1] < 0.5 * losses[0], losses
  # Call 20: 20 calls, 2 warm-up calls, fragment syncs on calls 6, 10, 14, 18.
  final = 20 * ns["report"].every_step_wire_bytes + 2 * ns["warmup_bytes"] + 4 * fragment
  assert float(lines[-1][2]) == pytest.approx(final / 1e3, abs=0.05)
  assert "global_step: 2" in tutorial("for count in range(12):")[1]


def test_tutorial_eval_step_evaluates_the_center():
  ns, out = tutorial("for count in range(12):")
  center = jax.tree.map(lambda c: c[0], optax_dist.center_params(ns["opt_state"]))
  batch = ns["batches"][0]
  expected = float(ns["loss_fn"](center, batch))
  got = float(ns["eval_step"](ns["params"], ns["opt_state"], batch)["loss"])
  assert got == pytest.approx(expected, rel=1e-5)
  assert f"eval loss of the center: {got:.4f}" in out


def test_tutorial_resumes_bit_for_bit_from_the_call_count():
  restored, _ = tutorial("checkpointer.restore(")
  assert optax_dist.call_count(restored["opt_state"]) == 12  # Mid-period.
  for leaf in jax.tree.leaves((restored["params"], restored["opt_state"])):
    assert leaf.shape[0] == 8 and leaf.sharding.spec == restored["P"]("workers")
  ns, out = tutorial("largest difference")
  jax.tree.map(
    np.testing.assert_array_equal,
    (ns["params"], ns["opt_state"]),
    (ns["expected_params"], ns["expected_state"]),
  )
  assert "largest difference: 0.0\n" in out
  # global_step counts fragment syncs: calls 6, 10, 14 and 18.
  np.testing.assert_array_equal(optax_dist.global_step(ns["opt_state"]), [4] * 8)


def test_tutorial_resizes_to_4_workers_on_a_new_mesh():
  ns, _ = tutorial("resize_workers(")
  four = set(jax.devices()[:4])
  for leaf in jax.tree.leaves((ns["params"], ns["opt_state"])):
    assert leaf.shape[0] == 4 and leaf.sharding.device_set == four
  assert optax_dist.call_count(ns["opt_state"]) == 24
  np.testing.assert_array_equal(optax_dist.global_step(ns["opt_state"]), [5] * 4)  # Call 22.


def test_tutorial_swaps_in_every_optimizer():
  ns, _ = tutorial("others = {")
  names = [
    n for n in optax_dist.__all__ if n in ("tower", "elastic_average", "agn", "model_average")
  ]
  assert sorted(ns["others"]) == sorted(names)
  for name, tx in ns["others"].items():
    assert isinstance(tx, optax.GradientTransformationExtraArgs), name


def markdown_anchors(page):
  """The anchors of a page's headings, as MyST writes them (``myst_heading_anchors``)."""
  text = FENCE.sub("", (DOCS / page).read_text())  # Not the comments in code.
  headings = re.findall(r"^#{1,3} (.+)$", text, re.M)
  return {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in headings}


def test_landing_page_optimizer_table_links_each_row_to_its_page_and_the_tutorial():
  text = (DOCS / "index.md").read_text()
  rows = re.findall(r"^\| \[`(\w+)`\]\(([^)]+)\) \|.*\| \[[^]]+\]\(([^)]+)\) \|$", text, re.M)
  assert [name for name, _, _ in rows] == [
    "tower",
    "elastic_average",
    "agn",
    "model_average",
    "diloco",
  ]
  anchors = markdown_anchors("tutorial.md")
  for name, page, tutorial_link in rows:
    assert page == f"algorithms/{name}.md" and (DOCS / page).is_file()
    target, anchor = tutorial_link.split("#")
    assert target == "tutorial.md" and anchor in anchors, tutorial_link
  assert rows[-1][2] == "tutorial.md#the-optimizer"  # DiLoCo is the one it trains.
  code = next(b.code for b in runnable_blocks(TUTORIAL) if "others = {" in b.code)
  assert all(f'"{name}": optax_dist.{name}(' in code for name, _, _ in rows[:-1])


def test_the_readme_and_the_landing_page_link_the_tutorial():
  assert "(docs/tutorial.md)" in (ROOT / "README.md").read_text()
  index = (DOCS / "index.md").read_text()
  assert "[Train a Flax model with DiLoCo](tutorial.md)" in index
  toctree = re.search(r"^```\{toctree\}\n(.*?)^```", index, re.S | re.M).group(1)
  assert "\ntutorial\n" in toctree


# A printed signature: ``name(...)`` in backticks, or a ``# Fragment: the
# signature`` block, for a public function of the package.
INLINE_CALL = re.compile(r"`(?:optax_dist\.)?(\w+)\(([^`]*)\)`")
SIGNATURE_BLOCK = re.compile(
  r"\A# Fragment: the signature\.?\n(?:optax_dist\.)?(\w+)\((.*)\)\s*\Z", re.S
)


def parse_parameters(text):
  """``ast.arguments`` of a printed parameter list, or None if it is not one."""
  try:
    tree = ast.parse(f"def f({text}): pass")
  except SyntaxError:
    return None
  return tree.body[0].args


def printed_signatures(page):
  """``(where, function, arguments, full)`` for every signature a page prints.

  ``full`` is a signature block or an inline form with a bare ``*``: it claims
  to give every parameter. An inline form without one (``tower(inner,
  axis_name=..., loss_reduction="mean")``) counts only when its positional
  names are the function's own, so that a call such as ``tower(opt, ...)`` or
  TensorFlow's ``minimize(loss, ...)`` and ``get_slot(*args, **kwargs)`` is
  not read as a claim.
  """
  found = []
  for path, text in page_sources(page):
    for block in (b for b in python_blocks(page) if b.path == path):
      match = SIGNATURE_BLOCK.match(block.code)
      if match:
        found.append((f"{path}:{block.line}", *match.groups(), True))
    prose = FENCE.sub("", text)
    for match in INLINE_CALL.finditer(prose):
      found.append((str(path), *match.groups(), None))
  signatures = []
  for where, name, text, full in found:
    fn = getattr(optax_dist, name, None)
    if name not in optax_dist.__all__ or inspect.isclass(fn) or not callable(fn):
      continue
    args = parse_parameters(text)
    if args is None:
      continue
    if full is None:
      full = bool(args.kwonlyargs) and not args.vararg
      positional = [a.arg for a in args.posonlyargs + args.args]
      own = list(inspect.signature(fn).parameters)[: len(positional)]
      if not full and (not positional or positional != own):
        continue
    signatures.append((where, fn, args, full))
  return signatures


def printed_default(node):
  """The value a printed default stands for; ``...`` for an elided one."""
  if isinstance(node, ast.Attribute):  # e.g. jnp.int8
    return eval(compile(ast.Expression(node), "<default>", "eval"), {"jnp": jnp, "optax": optax})
  return ast.literal_eval(node)


def signature_problems(fn, args, full):
  """How a printed parameter list differs from ``inspect.signature(fn)``."""
  params = inspect.signature(fn).parameters
  kind = inspect.Parameter
  positional = args.posonlyargs + args.args
  defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
  shown = [
    (a.arg, kind.POSITIONAL_OR_KEYWORD, d) for a, d in zip(positional, defaults, strict=True)
  ]
  if args.vararg:
    shown.append((args.vararg.arg, kind.VAR_POSITIONAL, None))
  shown += [
    (a.arg, kind.KEYWORD_ONLY, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
  ]
  if args.kwarg:
    shown.append((args.kwarg.arg, kind.VAR_KEYWORD, None))
  problems = []
  for name, printed_kind, node in shown:
    if name not in params:
      problems.append(f"{name} is not a parameter")
      continue
    param = params[name]
    if full and printed_kind != param.kind and param.kind != kind.POSITIONAL_ONLY:
      problems.append(f"{name} is {param.kind.description}, printed {printed_kind.description}")
    if node is None:
      if full and param.default is not kind.empty:
        problems.append(f"{name} has the default {param.default!r}, printed none")
      continue
    value = printed_default(node)
    if value is not Ellipsis and value != param.default:
      problems.append(f"{name} defaults to {param.default!r}, printed {value!r}")
  if full:
    names = [name for name, _, _ in shown]
    if names != list(params):
      problems.append(f"printed {names}, the code has {list(params)}")
  return problems


@pytest.mark.parametrize("page", page_paths())
def test_printed_signatures_match_the_code(page):
  # The API reference, generated from the code, is the one place for
  # signatures; any other page that prints one is checked here: every
  # parameter, its kind and its default, against inspect.signature.
  for where, fn, args, full in printed_signatures(page):
    problems = signature_problems(fn, args, full)
    assert not problems, f"{where}: {fn.__name__}: {problems}"


def test_the_algorithm_pages_signatures_are_checked():
  for name in ("tower", "elastic_average", "agn", "model_average", "diloco"):
    page = f"docs/algorithms/{name}.md"
    full = [fn.__name__ for _, fn, _, is_full in printed_signatures(page) if is_full]
    assert name in full, f"{page} prints no checked signature of {name}"


def test_signature_check_finds_a_wrong_default_and_a_missing_keyword():
  tx_args = parse_parameters('inner, *, axis_name, loss_reduction="sum"')
  assert signature_problems(optax_dist.tower, tx_args, True) == [
    "loss_reduction defaults to 'mean', printed 'sum'"
  ]
  diloco = parse_parameters("inner, *, axis_name, outer=None, sync_period=500")
  assert signature_problems(optax_dist.diloco, diloco, True)[-1].startswith("printed [")
  partial = parse_parameters("inner, axis_name=..., sync_period=500, delay=None")
  assert signature_problems(optax_dist.diloco, partial, False) == []
  wrong = parse_parameters("inner, axis_name=..., sync_period=16")
  assert signature_problems(optax_dist.diloco, wrong, False) == [
    "sync_period defaults to 500, printed 16"
  ]


def test_readme_and_benchmarks_stay_short():
  # The README is a landing page and BENCHMARKS.md a report; details and
  # history live in docs/.
  assert len((ROOT / "README.md").read_bytes()) <= 10_000
  assert len((ROOT / "BENCHMARKS.md").read_bytes()) <= 40_000


def test_benchmarks_summary_has_a_row_for_every_benchmark():
  text = (ROOT / "BENCHMARKS.md").read_text()
  summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
  linked = set(re.findall(r"^\| \[[^]]+\]\(#([\w-]+)\)", summary, re.M))
  # Each benchmark's section is named after its script.
  sections = re.findall(r"^## (.+\(benchmarks/\w+\.py\))$", text, re.M)
  anchors = {re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-") for h in sections}
  assert sections and anchors == linked, anchors ^ linked


def test_coming_from_maps_host_offload_and_resize_workers():
  text = (DOCS / "coming_from.md").read_text()
  rows = {row.split("|")[1].strip(): row for row in text.splitlines() if row.startswith("| ")}
  assert "host_offload=True" in rows["`backup_device`, `pin_memory` (outer state on the CPU)"]
  assert "resize_workers" in rows["`Manager` quorum, replicas joining and leaving"]
  assert "not available yet" not in text


def test_the_limits_of_fragments_are_stated():
  section = (DOCS / "algorithms" / "index.md").read_text().split("### Fragments")[1]
  section = section.split("\n## ")[0]
  for claim in (
    "multiple of `F`",
    "whole leaves",
    "at least `F` leaves",
    "`sync=True` syncs every",
  ):
    assert claim in section, claim
  for page in ("diloco.md", "model_average.md"):
    assert "index.md#fragments" in (DOCS / "algorithms" / page).read_text()


def test_sync_true_syncs_every_fragment_as_the_docs_say():
  # docs/algorithms/index.md: `sync=True` syncs every fragment in the same
  # call, and global_step counts fragment syncs.
  tx = optax_dist.diloco(
    optax.sgd(0.1), axis_name="w", outer=optax.sgd(1.0), sync_period=4, fragments=2
  )
  params = {"a": jnp.zeros((2, 3)), "b": jnp.ones((2, 5))}
  grads = {"a": jnp.array([[1.0] * 3, [3.0] * 3]), "b": jnp.array([[2.0] * 5, [0.0] * 5])}

  def step(params, grads):
    updates, state = tx.update(grads, tx.init(params), params, sync=True)
    return optax.apply_updates(params, updates), state

  params, state = jax.jit(jax.vmap(step, axis_name="w"))(params, grads)
  np.testing.assert_array_equal(optax_dist.global_step(state), [2, 2])
  # Both fragments moved to the workers' mean (outer SGD with rate 1).
  np.testing.assert_allclose(params["a"], np.full((2, 3), -0.2), rtol=1e-6)
  np.testing.assert_allclose(params["b"], np.full((2, 5), 0.9), rtol=1e-6)


def test_migration_elastic_average_translation_trains():
  ns = run_block("docs/migration.md", 0)
  losses = ns["losses"]
  assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])
  assert int(ns["syncs"]) == 25  # 100 calls, a sync every 4.
  # The workers started from worker 0's params (get_init_op) and hold one center.
  centers = ns["opt_state"].center["w"]
  np.testing.assert_array_equal(centers, np.broadcast_to(centers[:1], centers.shape))
  np.testing.assert_array_equal(ns["center"]["w"], centers[0])
  assert "25 syncs" in printed("docs/migration.md", 0)


def test_migration_tower_translation_trains():
  ns = run_block("docs/migration.md", 1)
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


def load_docs_module(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_api_types_reads_annotations_as_written():
  api_types = load_docs_module(DOCS / "_ext" / "api_types.py")
  fields = api_types.source_annotations(optax_dist.ElasticAverageState)
  assert fields["inner_state"] == "optax.OptState"
  assert fields["center"] == "optax.Params"
  assert fields["sync"] == "_schedule.SyncState"
  signature = api_types.source_annotations(optax_dist.minimize)
  assert signature["params"] == "optax.Params"
  assert signature["*args"] == "Any"
  assert signature["return"] == "tuple[optax.Params, optax.OptState, Any]"
  public = api_types.public_annotation
  module = optax_dist.ElasticAverageState.__module__
  assert public(fields["sync"], module, "optax_dist") == "~optax_dist.SyncState"
  assert public("optax.Params | None", module, "optax_dist") == "optax.Params | None"
  # A private alias reads as its definition.
  axis = api_types.source_annotations(optax_dist.tower)["axis_name"]
  assert "_collectives" in axis
  assert "_" not in public(axis, optax_dist.tower.__module__, "optax_dist").replace("_dist", "")


def test_api_types_puts_each_type_next_to_its_field():
  api_types = load_docs_module(DOCS / "_ext" / "api_types.py")
  lines = [
    "Summary.",
    "",
    ":param x: The input,",
    "          on two lines.",
    r":param \*args: More.",
    ":returns: The output.",
    "",
    ".. rubric:: Examples",
    "",
    ">>> f(1)",
  ]
  annotations = {"x": "int", "y": "str", "*args": "Any", "return": "float"}
  assert api_types.add_type_fields(lines, "function", annotations) == [
    "Summary.",
    "",
    ":param x: The input,",
    "          on two lines.",
    ":type x: int",
    r":param \*args: More.",
    r":type \*args: Any",
    ":param y:",
    ":type y: str",
    ":returns: The output.",
    ":rtype: float",
    "",
    ".. rubric:: Examples",
    "",
    ">>> f(1)",
  ]
  fields = [":ivar a: First.", ":ivar b: Second.", "", "More text."]
  assert api_types.add_type_fields(fields, "class", {"a": "int", "b": "str", "c": "bool"}) == [
    ":ivar a: First.",
    ":vartype a: int",
    ":ivar b: Second.",
    ":vartype b: str",
    "",
    "More text.",
  ]


def test_the_docs_build_uses_the_readable_types():
  conf = (DOCS / "conf.py").read_text()
  assert '"api_types"' in conf
  assert 'autodoc_typehints = "none"' in conf
  assert "napoleon_use_ivar = True" in conf
  template = (DOCS / "_templates" / "autosummary" / "class.rst").read_text()
  assert "inherited_members" in template  # tuple's count and index are left out.


def read_inventory(path):
  """``{name: (type, uri)}`` of a Sphinx inventory (version 2)."""
  data = path.read_bytes()
  header = data.split(b"\n", 4)
  assert header[0] == b"# Sphinx inventory version 2", path
  entries = {}
  for line in zlib.decompress(header[4]).decode().splitlines():
    name, objtype, _, uri, _ = re.match(r"(\S+)\s+(\S+)\s+(-?\d+)\s+(\S*)\s+(.*)", line).groups()
    entries[name] = (objtype, uri.replace("$", name) if uri.endswith("$") else uri)
  return entries


def intersphinx_mapping():
  conf = ast.parse((DOCS / "conf.py").read_text())
  for node in conf.body:
    if isinstance(node, ast.Assign) and node.targets[0].id == "intersphinx_mapping":
      return ast.literal_eval(node.value)
  raise AssertionError("conf.py sets no intersphinx_mapping")


def test_intersphinx_uses_the_shipped_inventories():
  mapping = intersphinx_mapping()
  assert set(mapping) == {"jax", "optax", "flax", "orbax"}
  for url, inventory in mapping.values():
    assert url.startswith("https://") and url.endswith("/"), url
    assert (DOCS / inventory).is_file(), f"{inventory} is missing: run write_inventories.py"
  # The shipped files are what the script writes from its tables.
  script = load_docs_module(DOCS / "_inventories" / "write_inventories.py")
  for filename, (_, _, table) in script.INVENTORIES.items():
    entries = read_inventory(DOCS / "_inventories" / filename)
    expected = {
      name: (f"py:{objtype}", f"{page}.html#{anchor or name}")
      for name, (page, objtype, anchor) in table.items()
    }
    assert entries == expected, f"{filename} is stale: run docs/_inventories/write_inventories.py"


EXTERNAL = ("jax.", "optax.", "flax.", "orbax.")


def referenced_external_names():
  """The jax, optax, flax and orbax names the docs link: roles and the API's annotations."""
  role = re.compile(r"[{:](?:func|class|obj|data|meth|attr|mod)[}:]`~?([\w.]+)`")
  texts = [path.read_text() for path in DOCS.rglob("*.md")]
  texts += [path.read_text() for path in DOCS.glob("*.rst")]
  texts += [path.read_text() for path in (ROOT / "optax_dist").glob("*.py")]
  names = {name for text in texts for name in role.findall(text)}
  api_types = load_docs_module(DOCS / "_ext" / "api_types.py")
  objects = [getattr(optax_dist, name) for name in optax_dist.__all__]
  objects += [
    member
    for obj in objects
    if inspect.isclass(obj)
    for name, member in vars(obj).items()
    if inspect.isfunction(member) and (not name.startswith("_") or name == "__call__")
  ]
  for obj in objects:
    for text in api_types.source_annotations(obj).values():
      names.update(re.findall(r"[A-Za-z_][\w.]*", text))
  return sorted(name for name in names if name.startswith(EXTERNAL))


def test_every_external_name_the_docs_link_is_in_an_inventory():
  known = {}
  for _, inventory in intersphinx_mapping().values():
    known.update(read_inventory(DOCS / inventory))
  names = referenced_external_names()
  assert "optax.Params" in names and "jax.Array" in names
  missing = [name for name in names if name not in known]
  assert not missing, f"add {missing} to docs/_inventories/write_inventories.py"
