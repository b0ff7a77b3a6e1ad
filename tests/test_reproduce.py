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


def test_federated_numbers_recompute_from_their_rows_at_an_equal_time_budget(tiny_run):
  out, summary, _ = tiny_run
  fd = json.loads((out / "fig5_fl_throughput.json").read_text())
  pols = {"none", "deadline", "intra", "full"}
  for s in fd["scenarios"]:
    assert set(s["work_throughput"]) == set(s["accuracy_at_budget"]) == pols
    budget = s["time_budget_s"]
    for p in pols:
      work, times = s["work_per_round_s"][p], s["round_times_s"][p]
      assert len(work) == len(times) == s["rounds_run"][p] >= 1
      # throughput is work (steps x solo step time) over virtual time, as the rows say
      assert s["work_throughput"][p] == pytest.approx(sum(work) / sum(times), rel=1e-3)
      assert sum(times) <= budget * (1 + 1e-6)  # nobody ran past the common budget
      curve = s["curves"][p]
      assert curve[-1]["virtual_time_s"] == pytest.approx(sum(times), rel=1e-6)
      assert s["accuracy_at_budget"][p] == curve[-1]["accuracy"]
      for t in s["tasks"]:  # the first curve point at the target, found independently
        hits = [c["virtual_time_s"] for c in curve if c["accuracy"].get(t, -1) >= s["target"][t]]
        assert s["time_to_target_s"][p][t] == (hits[0] if hits else None)
    assert sum(s["round_times_s"]["none"]) == pytest.approx(budget, rel=1e-3)
    assert s["gain"]["vs_deadline"] == pytest.approx(s["work_throughput"]["full"] / s["work_throughput"]["deadline"],
                                                     rel=1e-2)
    # intra changes the clock, not training: its accuracy after k rounds is none's after k rounds
    k = min(s["rounds_run"]["none"], s["rounds_run"]["intra"])
    assert [c["accuracy"] for c in s["curves"]["intra"][:k]] == [c["accuracy"] for c in s["curves"]["none"][:k]]
    # the clock says which part is modelled and which measured, with the model's error
    assert "modelled" in s["clock"]["inter_device"]
    for m in s["clock"]["corrections"]["detail"].values():
      assert set(m["model_error"]) == {"equal", "competitive"}
    assert 0.0 <= s["clock_measured_fraction"]["full"] <= 1.0
  # the report's explanation carries this run's measured numbers, not a fixed sentence
  row = next(r for r in summary["rows"] if r["figure"] == "fig5_fl_throughput")
  s = fd["scenarios"][0]
  assert f"none {100 * s['idle_fraction']['none']:.0f}% -> full {100 * s['idle_fraction']['full']:.0f}%" in row["note"]
  row6 = next(r for r in summary["rows"] if r["figure"] == "fig6_accuracy")
  assert f"budget {s['time_budget_s']:.1f}s" in row6["note"]


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
