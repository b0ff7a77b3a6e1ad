"""The quick reproduction on a tiny configuration: every figure has its PNG and JSON, the
numbers satisfy the bounds each figure must, reruns reuse finished work, recorded runs redraw."""
import json

import numpy as np
import pytest

from mtfl_jax.experiments.reproduce import FIGURE_SOURCES, reproduce
from mtfl_jax.stats import bootstrap_ci

PLANS = ("sequential", "equal", "partitioned", "competitive", "auto", "grid_best")


def _median_and_ci(values):
  """A reviewer's recomputation: numpy's median, and the bootstrap interval of mtfl_jax.stats
  (tested on its own against the exact bootstrap distribution) of the per-repeat values."""
  return pytest.approx(float(np.median(values)), abs=1e-6), pytest.approx(list(bootstrap_ci(values)), abs=1e-6)


def _check_cosched_arm(arm, repeats, search_repeats):
  """Every reported median and interval of one scenario-regime, recomputed from its raw rounds."""
  fresh, search = arm["fresh"]["rounds"], arm["search"]["rounds"]
  assert len(fresh) == repeats and len(search) == search_repeats
  for k, rd in enumerate(fresh):  # each repeat runs every plan once, the order rotated by one
    assert rd["order"] == list(PLANS[k % 6:] + PLANS[:k % 6])
  ms = {p: [rd["makespan_s"][p] for rd in fresh] for p in PLANS}
  for p in PLANS[1:]:
    med, ci = _median_and_ci([a / b for a, b in zip(ms["sequential"], ms[p])])  # paired per repeat
    assert (arm["speedup_vs_sequential"][p]["median"], arm["speedup_vs_sequential"][p]["ci95"]) == (med, ci), p
    med, ci = _median_and_ci(ms[p])
    assert (arm["makespan_s"][p]["median"], arm["makespan_s"][p]["ci95"]) == (med, ci), p
  cve = arm["competitive_vs_equal"]
  assert (cve["median"], cve["ci95"]) == _median_and_ci([e / c for e, c in zip(ms["equal"], ms["competitive"])])
  lo, hi = cve["ci95"]  # claimed only where the interval excludes 1
  assert cve["verdict"] == ("competitive faster than equal" if lo > 1 else "competitive slower than equal" if hi < 1
                            else "no difference shown")
  cap = [sum(rd["equal_rates"].values()) for rd in fresh]  # C = sum r_i of each repeat's equal run
  assert (arm["capacity"]["median"], arm["capacity"]["ci95"]) == _median_and_ci(cap)
  for p, pe in arm["prediction_error"].items():  # the model against the fresh repeats
    pred = arm["plans"][p]["predicted_makespan_s"]
    assert (pe["median"], pe["ci95"]) == _median_and_ci([pred / m - 1 for m in ms[p]]), p
  assert {"competitive", "equal", "auto", "grid_best", "sequential"} <= set(arm["prediction_error"])
  for p in ("auto", "grid_best"):
    # the search's pick by brute force: lowest median over the search rounds, ties to the first listed
    cands, key = arm["search"][p]["candidates"], arm["search"]["measured_as"]
    med = {c: float(np.median([rd["makespan_s"][key[c]] for rd in search])) for c in cands}
    picked = min(cands, key=lambda c: (med[c], cands.index(c)))
    assert arm["search"][p]["picked"] == arm["searched"][p]["picked"] == picked
    assert arm["plans"][p]["shares"] == arm["search"]["vectors"][key[picked]]
    # reported twice: on the search's own rounds, and on the fresh repeats
    own = [rd["makespan_s"]["sequential"] / rd["makespan_s"][key[picked]] for rd in search]
    sr = arm["searched"][p]["search_speedup"]
    assert (sr["median"], sr["ci95"]) == _median_and_ci(own)
    assert arm["searched"][p]["fresh_speedup"] == arm["speedup_vs_sequential"][p]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("results")
  logs = []
  summary = reproduce(out, mode="tiny", log=logs.append)
  return out, summary, logs


def test_every_figure_has_png_and_json_and_the_report_names_the_device(tiny_run):
  out, summary, _ = tiny_run
  for fig in FIGURE_SOURCES:
    assert (out / f"{fig}.png").stat().st_size > 10_000
    assert json.loads((out / f"{fig}.json").read_text())["device"] == summary["device"]
  report = (out / "REPORT.md").read_text()
  assert summary["device"] in report and "2.1x" in report and "2.16x-2.38x" in report
  assert json.loads((out / "summary.json").read_text())["rows"][0]["figure"] == "fig1_workloads"


def test_figures_satisfy_their_bounds(tiny_run):
  out, summary, _ = tiny_run
  fig1 = json.loads((out / "fig1_workloads.json").read_text())
  steps = {p["task"]: p["step_time_s"] for p in fig1["profiles"]}
  assert steps["mnist_lenet"] > 5 * steps["digits_mlp"]  # the workloads are imbalanced
  assert all(0 < p["peak_fraction"] < 1 for p in fig1["profiles"])
  cs = json.loads((out / "fig2_sharing.json").read_text())
  for s in cs["scenarios"]:
    assert set(s["regimes"]) == {"a_every_core", "b_one_core"}
    for arm in s["regimes"].values():
      _check_cosched_arm(arm, cs["repeats"], cs["search_repeats"])
  # the report says each regime's verdict, and which regime a GPU is closer to
  rows = {r["figure"]: r for r in summary["rows"]}
  for arm in cs["scenarios"][0]["regimes"].values():
    assert arm["competitive_vs_equal"]["verdict"] in rows["fig4_intra"]["ours"]
  assert "closer to regime (b)" in rows["fig2_sharing"]["note"]
  vr = json.loads((out / "fig3_vresource.json").read_text())
  errs = [abs(m - p) for c in vr["curves"].values() for m, p in zip(c["measured"], c["predicted"])]
  assert vr["mean_abs_error"] == pytest.approx(sum(errs) / len(errs), abs=1e-3)
  for c in vr["curves"].values():
    assert len(c["measured"]) == len(c["predicted"]) == len(c["share"])


def test_time_to_accuracy_figures_recompute_from_their_curves_and_the_report_quotes_them(tiny_run):
  out, summary, _ = tiny_run
  from mtfl_jax import stats
  from mtfl_jax.experiments import evidence as ev
  fd = json.loads((out / "fig5_time_to_accuracy.json").read_text())
  assert json.loads((out / "fig6_accuracy.json").read_text()) == fd  # both drawn from one evidence document
  assert not set(fd["seeds"]) & set(fd["calibration_seeds"])
  for s in fd["scenarios"]:
    assert {"none", "deadline", "overselect", "fedbuff", "full"} <= set(s["policies"])
    none = None
    for p in ["none"] + [q for q in s["policies"] if q != "none"]:
      curves = s["curves"][p]
      assert len(curves) == len(fd["seeds"])
      sets = []
      for curve in curves:  # the time to accuracy, by hand, from the kept evaluation grid
        tta = {}
        for t, target in s["targets"].items():
          vals = [metrics[t] for _, metrics in curve]
          hits = [i for i in range(ev.HOLD - 1, len(vals)) if np.mean(vals[i - ev.HOLD + 1:i + 1]) >= target]
          tta[t] = curve[hits[0]][0] if hits else None
        sets.append(None if None in tta.values() else max(tta.values()))
      assert s["policies"][p]["tta_set_s"] == sets, p
      none = sets if p == "none" else none
      assert s["policies"][p]["ratio_vs_none"] == stats.paired_ratio(none, sets), p
  row = next(r for r in summary["rows"] if r["figure"] == "fig5_time_to_accuracy")
  s = fd["scenarios"][0]
  full = s["policies"]["full"]["ratio_vs_none"]
  assert f"{s['name']}: full vs none " in row["ours"] and full is not None
  med = full["median"]
  assert ("never" if med is None else "inf" if med == "inf" else f"{float(med):.2f}x") in row["ours"]
  assert "smoke test" in row["note"]  # a tiny run never reads as evidence
  row6 = next(r for r in summary["rows"] if r["figure"] == "fig6_accuracy")
  t = next(iter(s["targets"]))
  assert f"{t} {s['policies']['full']['plateau_vs_none'][t]['median']:+.3f}" in row6["ours"]


def test_rerun_reuses_finished_experiments_and_keeps_them(tiny_run):
  out, summary, _ = tiny_run
  before = {p.name: p.read_text() for p in (out / "raw").glob("*.json")}
  logs = []
  again = reproduce(out, mode="tiny", log=logs.append)
  assert sum("reusing" in m for m in logs) == 4
  assert {p.name: p.read_text() for p in (out / "raw").glob("*.json")} == before
  assert again["rows"] == summary["rows"]
  with pytest.raises(FileExistsError, match="nothing was overwritten"):
    reproduce(out, mode="quick", log=lambda m: None)
  assert {p.name: p.read_text() for p in (out / "raw").glob("*.json")} == before


def test_from_recorded_redraws_without_measuring_and_says_so(tiny_run, tmp_path):
  out, _, _ = tiny_run
  summary = reproduce(tmp_path / "redrawn", from_recorded=out, log=lambda m: None)
  assert summary["recorded_from"] == str(out)
  assert "Redrawn from recorded data" in (tmp_path / "redrawn" / "REPORT.md").read_text()
  assert (tmp_path / "redrawn" / "fig6_accuracy.png").exists()
  with pytest.raises(FileNotFoundError, match="lacks recorded experiment"):
    reproduce(tmp_path / "x", from_recorded=tmp_path / "empty", log=lambda m: None)
