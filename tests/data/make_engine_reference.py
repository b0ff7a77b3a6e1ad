"""Records what today's engine computes for a few small runs (final parameters, model_state
and history), so that a refactor of the federated engine can be checked to change nothing.

Run from the repository root: ``python tests/data/make_engine_reference.py`` (writes
``tests/data/engine_reference.npz`` and ``.json``). Re-record only on purpose, when what a
run computes is meant to change, and say so in the commit.
"""
import json
import sys
import warnings
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_reference_runs import RUNS, run_case  # noqa: E402

OUT = Path(__file__).with_name("engine_reference")


def main():
  arrays, docs = {}, {}
  for name in RUNS:
    res = run_case(name)
    for t, m in res.state.models.items():
      for path, leaf in jax.tree_util.tree_flatten_with_path({"params": m.params, "model_state": m.model_state})[0]:
        arrays[f"{name}/{t}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    docs[name] = res.history
    print(name, "done", res.final_accuracy())
  np.savez(OUT.with_suffix(".npz"), **arrays)
  OUT.with_suffix(".json").write_text(json.dumps(docs, indent=1, default=float))


if __name__ == "__main__":
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    main()
