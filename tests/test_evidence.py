"""The federated evidence: its metrics against hand-made curves, and a tiny recording whose
every number is recomputed from the runs it kept (and which resumes without running again)."""
import dataclasses
import glob
import math

import numpy as np
import pytest

from mtfl_jax import stats
from mtfl_jax.experiments import evidence as ev


def _evals(values, dt=1.0, task="a"):
  return [{"virtual_time_s": dt * (i + 1), "metrics": {task: v}} for i, v in enumerate(values)]


def test_time_to_accuracy_counts_a_crossing_only_when_it_holds():
  # a single spike to the target does not count; the mean of the last 3 must reach it
  curve = _evals([0.1, 0.9, 0.2, 0.5, 0.8, 0.85, 0.9, 0.95])
  assert ev.time_to_target(curve, "a", 0.8) == 7.0  # (0.8 + 0.85 + 0.9) / 3 = 0.85 at t = 7
  assert ev.time_to_target(curve, "a", 0.84) == 7.0
  assert ev.time_to_target(curve, "a", 0.91) is None  # the best three average (0.85 + 0.9 + 0.95) / 3 = 0.9
  assert ev.time_to_target(_evals([0.95, 0.95]), "a", 0.5) is None  # fewer than 3 evaluations
  assert ev.set_time({"a": 3.0, "b": 7.0}) == 7.0 and ev.set_time({"a": 3.0, "b": None}) is None
  assert ev.plateau(curve, "a", 2) == pytest.approx((0.9 + 0.95) / 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = tmp_path_factory.mktemp("evidence")
  ec = dataclasses.replace(ev.config("tiny"), grid=6)
  doc = ev.run_evidence(ec, out, log=lambda m: None)
  return ec, out, doc


def test_the_json_holds_what_a_referee_checks(tiny):
  ec, out, doc = tiny
  assert doc["seeds"] == [0, 1] and doc["calibration_seeds"] == [1000]
  assert not set(doc["seeds"]) & set(doc["calibration_seeds"])
  main = doc["scenarios"][0]
  assert set(main["policies"]) >= {"none", "intra", "deadline", "overselect", "fedbuff", "full"}
  assert {p for p in main["policies"] if p.startswith("full[")} | {main["tuned"]["full"]["chosen"]} == \
      {v.name for v in ev.FULL_VARIANTS}  # every ablation, the chosen one under the name "full"
  for p, v in main["policies"].items():
    for key in ("ratio_vs_none", "ratio_vs_best_baseline"):
      assert set(v[key]) >= {"median", "ci95", "per_unit"}, (p, key)
    assert set(v["plateau"]) == set(main["targets"])
    assert "median" in v["work_beyond_nominal_s"]
  assert main["best_baseline"] in ev.BASELINES
  sweep_tuned = dict(doc["sweep"][0]["tuned"])
  assert sweep_tuned.pop("from") == main["name"] and sweep_tuned == main["tuned"]  # the sweep reuses the main choices
  assert doc["complete"]


def test_every_number_recomputes_from_the_kept_runs(tiny):
  ec, out, doc = tiny
  main = doc["scenarios"][0]
  targets = main["targets"]
  for p, v in main["policies"].items():
    docs = [ev.read_run(out / r) for r in v["runs"]]
    sets = []
    for d in docs:  # the time to accuracy, from the evaluation grid by hand
      tta = {}
      for t, target in targets.items():
        vals = [e["metrics"][t] for e in d["evaluations"]]
        hits = [i for i in range(2, len(vals)) if np.mean(vals[i - 2:i + 1]) >= target]
        tta[t] = d["evaluations"][hits[0]]["virtual_time_s"] if hits else None
      sets.append(None if None in tta.values() else max(tta.values()))
      assert sum(r.get("work_beyond_nominal_s", 0.0) for r in d["history"]) == pytest.approx(
          ev.run_metrics(d, targets)["work_beyond_nominal_s"])
    assert v["tta_set_s"] == pytest.approx(sets) if None not in sets else v["tta_set_s"] == sets
    none = main["policies"]["none"]["tta_set_s"]
    assert v["ratio_vs_none"] == stats.paired_ratio(none, sets), p
    # every run of a policy ran to the horizon on the same grid
    for d in docs:
      grid = [e["virtual_time_s"] for e in d["evaluations"]]
      assert grid == pytest.approx([main["grid_s"] * (i + 1) for i in range(len(grid))])
      assert grid[-1] <= main["horizon_s"] + 1e-9


def test_targets_come_from_the_calibration_seeds_only(tiny):
  ec, out, doc = tiny
  main = doc["scenarios"][0]
  for r in main["calibration"]["runs"]:
    d = ev.read_run(out / r)
    assert d["spec"]["seed"] in ec.calibration_seeds and d["spec"]["config"]["policy"] == "none"
  t = next(iter(main["targets"]))
  assert main["targets"][t] == pytest.approx(ev.TARGET_FRACTION * main["calibration"]["plateau"][t], abs=1e-6)
  for cands in (main["tuned"]["deadline"]["candidates"], main["tuned"]["full"]["candidates"]):
    assert all(len(c["tta_set_per_seed"]) == len(ec.calibration_seeds) for c in cands.values())


def test_a_rerun_resumes_from_the_kept_runs(tiny):
  ec, out, doc = tiny
  files = sorted(glob.glob(str(out / "runs" / "**" / "*.json.gz"), recursive=True))
  logs = []
  again = ev.run_evidence(ec, out, log=logs.append)
  assert not [m for m in logs if "run(s) to do" in m]  # nothing ran again
  assert sorted(glob.glob(str(out / "runs" / "**" / "*.json.gz"), recursive=True)) == files
  strip = lambda d: {k: v for k, v in d.items() if k != "wall_s"}  # noqa: E731
  assert strip(again) == strip(doc)
  assert math.isfinite(doc["wall_s"])
  # the whole recording's compute time, whatever the sessions: every run's own wall time, summed
  assert doc["runs_wall_s"]["runs"] == len(files)
  assert doc["runs_wall_s"]["wall_s"] == pytest.approx(sum(ev.read_run(f)["wall_s"] for f in files), abs=0.1)


def test_a_partial_recording_says_so_in_the_report(tiny):
  from mtfl_jax.experiments.reproduce import _evidence_rows
  _, _, doc = tiny
  assert "partial" not in _evidence_rows(doc)[0]["note"]
  part = {**doc, "complete": False, "sweep": []}
  note = _evidence_rows(part)[0]["note"]
  assert f"only the scenarios {doc['scenarios'][0]['name']}" in note and "no heterogeneity sweep" in note
