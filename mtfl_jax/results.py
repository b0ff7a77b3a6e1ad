"""Writing results: every JSON the package produces goes through :func:`write_json`, which
replaces a file only once the new one is complete (an interrupted run never leaves half a
result, nor destroys the previous one)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | os.PathLike, doc) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(doc, indent=1, default=float))
  tmp.replace(path)
  return path
