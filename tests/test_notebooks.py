"""The tutorial notebooks, read without executing them (`pytest --nbval-lax notebooks`
executes them): they use only the public API, teach in prose between code cells, keep the
figures they draw, and stay small enough to read on GitHub."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
PUBLIC = {"mtfl_jax", "mtfl_jax.federated", "mtfl_jax.distributed", "mtfl_jax.vresource", "mtfl_jax.plotting", "mtfl_jax.clock",
          "mtfl_jax.tasks", "mtfl_jax.data", "mtfl_jax.profiling", "mtfl_jax.cosched", "mtfl_jax.backends"}
INTERNAL = re.compile(r"bench_|reproduce|experiments|gpu_record")
# a cell plots when it calls plt.* or a drawing function of mtfl_jax.plotting
PLOTS = re.compile(r"\bplt\.|\bplotting\.(?!evidence_table|load_evidence|find_recorded)\w+\(|\bFIGURES\[|\bdraw\(")


def _cells(path):
  return json.loads(path.read_text())["cells"]


def _src(cell):
  return "".join(cell["source"])


def _imports(code: str) -> list[str]:
  mods = []
  for line in code.splitlines():
    line = line.strip()
    m = re.match(r"from\s+([\w.]+)\s+import\s+(.+)", line)
    if m:
      mods.append(m.group(1))
      mods += [f"{m.group(1)}.{n.strip().split()[0]}" for n in m.group(2).strip("()").split(",")
               if m.group(1) == "mtfl_jax" and n.strip()]
      continue
    m = re.match(r"import\s+(.+)", line)
    if m:
      mods += [n.strip().split()[0] for n in m.group(1).split(",")]
  return mods


def test_there_are_tutorials():
  assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_imports_only_the_public_api(path):
  for cell in _cells(path):
    if cell["cell_type"] != "code":
      continue
    for mod in _imports(_src(cell)):
      if INTERNAL.search(mod):
        pytest.fail(f"{path.name} imports {mod}: notebooks use the public API only")
      if mod.startswith("mtfl_jax"):
        top = ".".join(mod.split(".")[:2])
        assert mod == "mtfl_jax" or top in PUBLIC or mod.rsplit(".", 1)[0] in PUBLIC, f"{path.name}: {mod}"
    assert not INTERNAL.search(" ".join(re.findall(r"mtfl_jax\.\w+", _src(cell)))), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_prose_between_code_cells(path):
  """The rule: the notebook opens with markdown, and no two code cells follow each other."""
  cells = [c for c in _cells(path) if _src(c).strip()]
  assert cells[0]["cell_type"] == "markdown", f"{path.name} must open with prose"
  for a, b in zip(cells, cells[1:]):
    assert not (a["cell_type"] == b["cell_type"] == "code"), (
        f"{path.name}: two code cells in a row without markdown between them:\n{_src(b)[:200]}")


# A cell that draws only from a recording may find none; it then says so, with these words.
NO_FIGURE = "no figure:"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_plotting_cells_keep_their_figure(path):
  for cell in _cells(path):
    if cell["cell_type"] == "code" and PLOTS.search(_src(cell)) and "rcParams" not in _src(cell):
      kinds = {k for o in cell.get("outputs", []) for k in o.get("data", {})}
      said = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("output_type") == "stream")
      assert "image/png" in kinds or NO_FIGURE in said, (
          f"{path.name}: a plotting cell has no saved figure (nor says '{NO_FIGURE} <why>'):\n{_src(cell)[:200]}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_small(path):
  assert path.stat().st_size < 500_000, f"{path.name} is {path.stat().st_size / 1e3:.0f} KB"


def test_import_parser():
  assert _imports("from mtfl_jax import plotting, clock\nimport numpy as np, mtfl_jax as mt") == [
      "mtfl_jax", "mtfl_jax.plotting", "mtfl_jax.clock", "numpy", "mtfl_jax"]
  assert INTERNAL.search("mtfl_jax.bench_cosched") and not INTERNAL.search("mtfl_jax.plotting")
