"""The public surface: every name imports, is documented, and its examples run."""

import dataclasses
import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
import shlex

import jax
import numpy as np
import optax
import pytest

import optax_dist

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_and_all():
  assert re.fullmatch(r"\d+\.\d+\.\d+", optax_dist.__version__)
  assert sorted(optax_dist.__all__) == sorted(set(optax_dist.__all__))
  for name in optax_dist.__all__:
    assert getattr(optax_dist, name) is not None


def test_implementation_modules_are_private():
  # The one public module is the launcher, run as `python -m optax_dist.launch`.
  names = [m.name for m in pkgutil.iter_modules(optax_dist.__path__) if m.name != "launch"]
  assert names and all(n.startswith("_") for n in names), names


@pytest.mark.parametrize("name", optax_dist.__all__)
def test_public_name_is_documented_with_a_runnable_example(name):
  obj = getattr(optax_dist, name)
  doc = inspect.getdoc(obj) or ""
  assert len(doc.splitlines()[0]) > 10, f"{name} needs a one-line summary"
  if inspect.isclass(obj):
    assert "Attributes:" in doc, f"{name} must document its fields"
    fields = getattr(obj, "_fields", None) or [f.name for f in dataclasses.fields(obj)]
    for field in fields:
      assert f"{field}:" in doc, f"{name} must document {field}"
  else:
    for section in ("Args:", "Returns:", "Examples:"):
      assert section in doc, f"{name} lacks {section}"
    assert ">>> " in doc


@pytest.mark.parametrize(
  "module", sorted(m.name for m in pkgutil.iter_modules(optax_dist.__path__))
)
def test_doctests(module):
  # Run here rather than with --doctest-modules: conftest.py has already set the
  # simulated devices, which doctests would not read.
  mod = importlib.import_module(f"optax_dist.{module}")
  result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0
  public = [
    n
    for n in optax_dist.__all__
    if getattr(getattr(optax_dist, n), "__module__", "") == mod.__name__
  ]
  public_functions = [n for n in public if not inspect.isclass(getattr(optax_dist, n))]
  if public_functions:
    assert result.attempted > 0


def readme_command(label):
  """The command in the README's block after the marker `<!-- label -->`."""
  text = (ROOT / "README.md").read_text()
  match = re.search(rf"<!-- {label} -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
  assert match, f"README.md lacks the {label} block"
  return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text()
  command = readme_command("test-command")
  assert "pytest" in command and "pip install" in command
  assert "test-command" in ci  # .ci/run reads and runs the README block itself.
  assert shlex.split(command)  # Well-formed shell words.


def test_readme_starts_with_the_two_commands():
  text = (ROOT / "README.md").read_text()
  first_blocks = re.findall(r"<!-- (\S+) -->", text)[:2]
  assert first_blocks == ["demo-command", "test-command"]
  assert "examples/" in readme_command("demo-command")


def test_readme_training_loop_runs():
  blocks = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)
  assert len(blocks) == 2
  loop, static_flags = blocks
  # The static-flags fragment (a loop body, not a program): valid Python that
  # names public functions only.
  compile(static_flags, "README.md", "exec")
  names = re.findall(r"optax_dist\.(\w+)", static_flags)
  assert names and all(name in optax_dist.__all__ for name in names), names
  namespace: dict = {}
  exec(compile(loop, "README.md", "exec"), namespace)
  jnp = namespace["jnp"]
  x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
  y = x @ np.linspace(-1, 1, 16, dtype=np.float32)[:, None]
  params, opt_state = namespace["params"], namespace["opt_state"]
  # Reference: plain Adam on the whole batch, one device. With "mean" and equal
  # slices, the tower's gradient is the full-batch gradient of the mean loss.
  ref_tx = optax.adam(1e-3)
  ref_params, ref_state = params, ref_tx.init(params)
  for _ in range(20):
    params, opt_state, loss = namespace["train_step"](
      params, opt_state, jnp.asarray(x), jnp.asarray(y)
    )
    ref_params, ref_state, ref_loss = optax_dist.minimize(
      namespace["loss_fn"], ref_tx, ref_params, ref_state, x, y
    )
    jax.block_until_ready(params)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  np.testing.assert_allclose(params["w"], ref_params["w"], rtol=1e-5, atol=1e-6)
  assert int(optax_dist.global_step(opt_state)) == 20


def test_every_public_name_is_in_the_api_reference():
  api = (ROOT / "docs" / "api.rst").read_text()
  listed = set(re.findall(r"^   (\w+)$", api, re.M))
  assert listed == set(optax_dist.__all__)
