"""What a run computes is pinned: the small runs of ``engine_reference_runs`` must give the
parameters, model_state and history recorded in ``tests/data/engine_reference.*`` (made by
``tests/data/make_engine_reference.py`` before the engine was restructured)."""
import json
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from engine_reference_runs import RUNS, run_case

REF = Path(__file__).parent / "data" / "engine_reference"
# the history fields that say what a round did (times, who ran, how much, what it scored)
FIELDS = ("round", "sampled", "round_time_s", "deadline_s", "client_time_s", "workloads", "work_s", "samples",
          "virtual_time_s", "accuracy")


@pytest.fixture(scope="module")
def reference():
  return np.load(REF.with_suffix(".npz")), json.loads(REF.with_suffix(".json").read_text())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_run_computes_what_it_computed_before(reference, name):
  arrays, docs = reference
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = run_case(name)
  got = {}
  for t, m in res.state.models.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path({"params": m.params, "model_state": m.model_state})[0]:
      got[f"{name}/{t}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  want = {k: arrays[k] for k in arrays.files if k.startswith(name + "/")}
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
  ref_hist = docs[name]
  assert len(res.history) == len(ref_hist)
  for h, r in zip(res.history, ref_hist):
    for f in FIELDS:
      a, b = json.loads(json.dumps(h.get(f), default=float)), r.get(f)
      if isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9), (name, f)
      else:
        assert a == b, (name, f)
