"""The docs' examples run as written: every ```python block of docs/extending.md and
docs/fl_tools.md, in order, each page in a namespace of its own (later blocks use what earlier
ones defined, as a reader would), in a temporary folder. A block whose first line is
``# not run in tests`` (it needs a network or a GPU) is skipped. What the examples register
(tasks, policies, executors) is unregistered afterwards."""
import re
from pathlib import Path

import pytest

from mtfl_jax import tasks as tasks_module
from mtfl_jax.federated import EXECUTORS, POLICIES

DOCS = Path(__file__).resolve().parent.parent / "docs"
SKIP = "# not run in tests"


def python_blocks(page: str) -> list[tuple[int, str]]:
  """The ```python blocks of ``page`` as (line number, code), the skipped ones left out."""
  text = (DOCS / page).read_text()
  out = []
  for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
    code = m.group(1)
    if code.lstrip().startswith(SKIP):
      continue
    out.append((text[:m.start()].count("\n") + 2, code))
  return out


@pytest.fixture
def registries():
  """The registries as they were before the test, restored after it."""
  saved = dict(POLICIES), dict(EXECUTORS), dict(tasks_module._REGISTRY)
  yield
  for live, before in zip((POLICIES, EXECUTORS, tasks_module._REGISTRY), saved):
    live.clear()
    live.update(before)


@pytest.mark.parametrize("page", ["extending.md", "fl_tools.md"])
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch, registries):
  monkeypatch.chdir(tmp_path)  # the examples' workdirs and log folders land here
  blocks = python_blocks(page)
  assert blocks, f"docs/{page} has no python example"
  namespace = {"__name__": f"docs_{page.replace('.', '_')}"}
  for line, code in blocks:
    try:
      exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)
    except Exception as e:  # noqa: BLE001 - name the block that failed
      raise AssertionError(f"the example at docs/{page}, line {line}, failed: {type(e).__name__}: {e}") from e


def test_skipped_blocks_are_only_those_marked():
  """A block is skipped only by its first line; the marker elsewhere is a typo."""
  for page in ("extending.md", "fl_tools.md"):
    text = (DOCS / page).read_text()
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
      code = m.group(1)
      if SKIP in code:
        assert code.lstrip().startswith(SKIP), f"docs/{page}: '{SKIP}' must be a block's first line"


@pytest.mark.parametrize("page", ["README.md", "docs/scale_out.md", "docs/fleets.md", "docs/your_own_task.md"])
def test_the_other_pages_python_blocks_name_only_what_the_package_has(page):
  """Blocks not run here (they train for minutes, start processes or use several devices)
  still parse, and every name they take from the package exists: ``from mtfl_jax... import
  X`` and ``mt.X``."""
  import ast
  import importlib

  import mtfl_jax
  text = (DOCS.parent / page).read_text()
  blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
  assert blocks
  for code in blocks:
    tree = ast.parse(code)
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mtfl_jax"):
        mod = importlib.import_module(node.module)
        for alias in node.names:
          assert hasattr(mod, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
              f"{page}: {node.module} has no {alias.name}"
      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mt":
        assert hasattr(mtfl_jax, node.attr), f"{page}: mtfl_jax has no {node.attr}"
