"""Builds the API reference from the docstrings with pdoc: ``make docs`` (HTML in docs/api/).

Every module of the package is imported first, so that a module that does not import fails
the build (pdoc alone would warn and leave its page out). pdoc follows a package's
``__all__`` when it looks for submodules, and ``mtfl_jax.__all__`` lists names, not modules,
so the modules are listed here and handed to pdoc by name.

Usage: python scripts/api_docs.py [--out docs/api]
"""
import argparse
import importlib
import pkgutil
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules(package: str = "mtfl_jax") -> list[str]:
  """The package and every submodule (``__main__`` aside: importing it is running the CLI)."""
  sys.path.insert(0, str(ROOT))
  pkg = importlib.import_module(package)
  names = [package]

  def fail(name):
    raise ImportError(f"cannot walk {name}")
  for m in pkgutil.walk_packages(pkg.__path__, f"{package}.", onerror=fail):
    if m.name.rsplit(".", 1)[-1] == "__main__":
      continue
    importlib.import_module(m.name)  # an import error ends the build here, with its traceback
    names.append(m.name)
  return names


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=str(ROOT / "docs" / "api"))
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  import pdoc
  import pdoc.render
  names = modules()
  pdoc.render.configure(docformat="restructuredtext", footer_text="mtfl_jax API reference",
                        search=True, show_source=False)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pdoc.pdoc(*names, output_directory=Path(args.out))
  broken = [str(w.message) for w in caught
            if str(w.message).startswith(("Error importing", "Error loading", "Couldn't import", "Cannot find spec"))]
  if broken:
    print("error: the API reference is incomplete:\n" + "\n".join(broken), file=sys.stderr)
    return 1
  print(f"API reference: {len(names)} modules in {args.out}/index.html ({time.perf_counter() - t0:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
