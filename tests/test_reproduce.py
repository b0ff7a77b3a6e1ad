"""The quick reproduction on a tiny configuration: every figure has its PNG and JSON, the
numbers satisfy the bounds each figure must, reruns reuse finished work, recorded runs redraw."""
import json

import pytest

from mtfl_jax.experiments.reproduce import FIGURE_SOURCES, reproduce


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
  out, _, _ = tiny_run
  fig1 = json.loads((out / "fig1_workloads.json").read_text())
  steps = {p["task"]: p["step_time_s"] for p in fig1["profiles"]}
  assert steps["mnist_lenet"] > 5 * steps["digits_mlp"]  # the workloads are imbalanced
  assert all(0 < p["peak_fraction"] < 1 for p in fig1["profiles"])
  cs = json.loads((out / "fig2_sharing.json").read_text())
  for s in cs["scenarios"]:
    pols = {"sequential", "equal", "partitioned", "competitive", "auto", "grid_best"}
    assert set(s["makespan_s"]) == pols and s["makespan_s"] == s["makespan_by_backend"][s["backend"]]
    for b, med in s["makespan_by_backend"].items():
      for p, v in med.items():  # a median lies inside its own spread
        lo, hi = s["spread"][b][p]
        assert lo <= v <= hi, (b, p)
    assert s["vs_grid_best"]["grid_best"] == 1.0
    c, pred = s["makespan_s"]["competitive"], s["predicted_makespan_s"]["competitive"]
    # both sides rounded to 4 decimals in the JSON: allow that rounding, carried through pred / c
    assert s["prediction_error"] == pytest.approx(pred / c - 1, abs=1e-4 + 1e-4 * (1 + pred / c) / c)
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
