"""The library never imports the experiments: every core module's imports, including those
inside functions, are read off its syntax tree."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mtfl_jax"


def _is_experiment(module: str) -> bool:
  parts = module.split(".")
  return module.startswith("mtfl_jax.experiments") or any(p.startswith("bench_") for p in parts)


def experiment_imports(source: str, module: str) -> list[str]:
  """``line: module`` of every import in ``source`` (the text of ``module``, dotted) that
  reaches the experiments: ``mtfl_jax.experiments`` or any ``bench_*``, absolute or relative,
  at top level or inside a function, or through ``importlib.import_module("...")``."""
  package = module.rsplit(".", 1)[0]
  out = []
  for node in ast.walk(ast.parse(source)):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(up + ([base] if base else []))
      names = [base] + [f"{base}.{a.name}" for a in node.names]
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      names = [node.args[0].value]
    out += [f"{node.lineno}: {n}" for n in names if _is_experiment(n)]
  return out


def core_modules() -> list[Path]:
  return [p for p in sorted(PKG.rglob("*.py"))
          if "experiments" not in p.relative_to(PKG).parts and p.name != "__main__.py"]


def test_the_checker_finds_every_kind_of_import():
  src = ("import mtfl_jax.experiments.reproduce\n"
         "def f():\n  from mtfl_jax.experiments import paper\n"
         "def g():\n  from mtfl_jax import bench_cosched\n"
         "from .experiments.scenarios import Scenario\n"
         "import importlib\nimportlib.import_module('mtfl_jax.experiments.gpu_record')\n"
         "import mtfl_jax.backends, numpy\nfrom mtfl_jax.files import read_json\n")
  found = experiment_imports(src, "mtfl_jax.cosched")
  assert sorted({int(f.split(":")[0]) for f in found}) == [1, 3, 5, 6, 8]
  assert not experiment_imports("from mtfl_jax.backends.base import Job\nimport jax.experimental\n",
                                "mtfl_jax.backends.fused")


def test_the_core_is_the_whole_package_but_experiments_and_main():
  names = {p.relative_to(PKG).as_posix() for p in core_modules()}
  assert {"cosched.py", "calibration.py", "plotting.py", "backends/processes.py"} <= names
  assert not any(n.startswith("experiments/") or n == "__main__.py" for n in names)
  assert (PKG / "experiments" / "reproduce.py").exists() and not list(PKG.glob("bench_*.py"))


# Offenders that another branch removes (this list must only shrink).
_BEING_FIXED: dict[str, str] = {}  # core modules known to break the rule, with the reason (none today)


def _cases():
  return [pytest.param(p, marks=pytest.mark.xfail(reason=_BEING_FIXED[k], strict=True)) if k in _BEING_FIXED
          else p for p in core_modules() for k in [p.relative_to(PKG).as_posix()]]


@pytest.mark.parametrize("path", _cases(), ids=lambda p: p.relative_to(PKG).as_posix())
def test_core_never_imports_the_experiments(path):
  module = "mtfl_jax." + ".".join(path.relative_to(PKG).with_suffix("").parts)  # a/__init__: package a
  found = experiment_imports(path.read_text(), module)
  assert not found, f"{path.relative_to(PKG.parent)} imports the experiments: {found}"


# =========================================================================== no import loop
def module_imports(path: Path) -> set[str]:
  """The ``mtfl_jax`` modules ``path`` imports (at top level or in a function), resolved to
  module files of the package (``from a import b`` counts ``a.b`` when b is a module)."""
  module = "mtfl_jax." + ".".join(path.relative_to(PKG).with_suffix("").parts)
  module = module[:-len(".__init__")] if module.endswith(".__init__") else module
  package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
  known = {"mtfl_jax." + ".".join(p.relative_to(PKG).with_suffix("").parts).replace(".__init__", "")
           for p in PKG.rglob("*.py")} | {"mtfl_jax"}
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(up + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out |= {n for n in names if n in known and n != module}
  return out


def import_cycles() -> list[list[str]]:
  """Every cycle of the package's import graph (modules' own imports; a package's
  ``__init__`` importing its submodules is its own edge)."""
  graph = {}
  for p in PKG.rglob("*.py"):
    m = "mtfl_jax." + ".".join(p.relative_to(PKG).with_suffix("").parts)
    m = m[:-len(".__init__")] if m.endswith(".__init__") else m
    graph[m] = {n for n in module_imports(p) if n != "mtfl_jax"}
  cycles, state = [], {}

  def visit(m, stack):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      # a module importing its own package's __init__ (or a parent's) is how Python resolves
      # ``from mtfl_jax.x import y``: not a loop of the code's own making
      if m.startswith(n + "."):
        continue
      if state.get(n) == 1:
        cycles.append(stack[stack.index(n):] + [n])
      elif n not in state:
        visit(n, stack)
    stack.pop()
    state[m] = 2
  for m in sorted(graph):
    if m not in state:
      visit(m, [])
  return cycles


def test_no_import_loop_in_the_package():
  assert import_cycles() == []


def test_the_cycle_finder_finds_a_loop(tmp_path, monkeypatch):
  pkg = tmp_path / "mtfl_jax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from mtfl_jax.b import f\n")
  (pkg / "b.py").write_text("def f():\n  from mtfl_jax import a\n")
  monkeypatch.setattr(__import__(__name__), "PKG", pkg)
  assert import_cycles() == [["mtfl_jax.a", "mtfl_jax.b", "mtfl_jax.a"]]
