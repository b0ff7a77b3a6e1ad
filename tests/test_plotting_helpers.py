"""The notebooks' plotting helpers draw from plain values (no measurement needed)."""
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest  # noqa: E402
import matplotlib.colors  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mtfl_jax import plotting  # noqa: E402
from mtfl_jax.backends import RunResult  # noqa: E402


def _run(shares):
  steps = {"a": np.array([0.1, 0.2, 0.3]), "b": np.array([0.5, 1.0])}
  return RunResult("threads", shares, 1.0, {"a": 0.3, "b": 1.0}, steps, 0.0)


def test_profile_and_op_bars():
  prof = [{"task": t, "device": "cpu: test", "step_time_s": s, "flops_per_step": f, "peak_fraction": 0.1}
          for t, s, f in (("a", 1e-4, 1e6), ("b", 1e-2, 1e8))]
  assert isinstance(plotting.profile_bars(prof), Figure)
  ops = [{"layer": "Dense_0", "op": "dot_general", "pass": "forward", "flops": 2e6},
         {"layer": "Conv_0", "op": "conv_general_dilated", "pass": "backward", "flops": 1e6}]
  assert isinstance(plotting.op_bars(ops), Figure)


def test_corun_timeline_one_and_many():
  assert isinstance(plotting.corun_timeline(_run({"a": 1, "b": 1})), Figure)
  fig = plotting.corun_timeline({"equal": _run({"a": 1, "b": 1}), "competitive": _run({"a": .3, "b": 1})})
  assert len(fig.axes[0].get_yticks()) == 4  # two plans x two tasks


def test_rates_parity():
  fig = plotting.rates_parity({"equal": ({"a": .5, "b": .6}, {"a": .45, "b": .7}),
                               "a=0.25": ({"a": .2, "b": .9}, {"a": .25, "b": .8})})
  assert isinstance(fig, Figure)


def test_accuracy_vs_time_and_round_bars():
  h = [{"round": 0, "virtual_time_s": 1.0, "accuracy": {"a": 0.5}},
       {"round": 1, "virtual_time_s": 2.0, "accuracy": {"a": 0.7}}]
  fig = plotting.accuracy_vs_time({"none": h, "full": h}, budget_s=2.0)
  assert len(fig.axes) == 1
  row = {"round": 0, "round_time_s": 3.0, "client_time_s": {"0": 1.0, "1": 3.0, "2": 5.0},
         "idle_s": {"0": 2.0, "1": 0.0}}  # client 2 dropped
  fig = plotting.client_round_bars({"none": row, "deadline": row})
  assert len(fig.axes) == 2


def test_ratio_bars():
  fig = plotting.ratio_bars({"threads": {"equal": 1.1, "competitive": 1.2}, "processes": {"equal": 1.0}},
                            "throughput / sequential")
  assert len(fig.axes[0].patches) == 4  # a missing bar is drawn as NaN height


def test_profile_bars_are_linear_and_labelled():
  prof = [{"task": t, "device": "cpu: test", "step_time_s": s, "flops_per_step": f, "peak_fraction": 0.1}
          for t, s, f in (("a", 1e-4, 2.8e6), ("b", 1e-2, 4.8e6))]
  fig = plotting.profile_bars(prof)
  for ax in fig.axes:
    assert ax.get_yscale() == "linear"
  # each bar carries its value: a 1.7x difference reads as 1.7x
  assert [t.get_text() for t in fig.axes[1].texts] == ["2.8", "4.8"]


def test_corun_timeline_starts_each_lane_where_its_task_started():
  seq = RunResult("sequential", {"a": 1, "b": 1}, 1.3, {"a": 0.3, "b": 1.3},
                  {"a": np.array([0.1, 0.2, 0.3]), "b": np.array([np.nan, 0.8, np.nan, 1.3])}, 0.0, None,
                  {"a": 0.0, "b": 0.3})
  fig = plotting.corun_timeline({"sequential": seq, "equal": _run({"a": 1, "b": 1})})
  bars = [p for p in fig.axes[0].patches]
  assert [round(b.get_x(), 6) for b in bars] == [0.0, 0.3, 0.0, 0.0]  # b starts when a finished
  assert round(bars[1].get_width(), 6) == 1.0
  # b recorded 2 of its 4 steps: one tick stands for 2 steps
  assert "1 tick = 2 steps" in [t.get_text() for t in fig.axes[0].texts]


def test_ratio_bars_with_intervals_and_round_bars_colours():
  fig = plotting.ratio_bars({"(a)": {"equal": 1.1, "competitive": 1.2}}, "speedup",
                            intervals={"(a)": {"equal": (0.9, 1.3), "competitive": (1.1, 1.4)}})
  assert len(fig.axes[0].patches) == 2 and fig.legends  # legend outside the axis
  row = {"round": 0, "round_time_s": 3.0, "client_time_s": {"0": 1.0, "1": 3.0}, "idle_s": {"0": 2.0, "1": 0.0}}
  fig = plotting.client_round_bars({"none": row})
  busy = fig.axes[0].patches[0]
  assert matplotlib.colors.to_hex(busy.get_facecolor()) == plotting.BUSY_COLOR  # not the policy's grey


def _history(acc, dt=1.0):
  return [{"round": k, "virtual_time_s": dt * (k + 1), "accuracy": {"a": v}} for k, v in enumerate(acc)]


def test_policy_curves_mark_identical_curves():
  h = _history([0.2, 0.5, 0.7])
  fig = plotting.policy_curves({"none": {"history": h}, "intra": {"history": h},
                                "full": {"history": _history([0.3, 0.6, 0.8], 0.8)}}, budget_s=3.0)
  labels = fig.legends[0].get_texts()
  assert [t.get_text() for t in labels][:3] == ["none", "intra (= none)", "full"]
  lines = fig.axes[0].get_lines()
  assert lines[0].get_linestyle() != lines[1].get_linestyle()  # drawn distinguishably


def _evidence(tmp_path):
  """A small evidence document in run_evidence's schema, with its runs on disk."""
  import gzip
  import json

  def ratio(m, lo, hi):
    return {"median": m, "ci95": [lo, hi], "n": 3}

  def summary(m):
    return {"median": m, "ci95": [m - 0.01, m + 0.01], "n": 3, "values": [m] * 3}

  def scenario(name, sigma, trace=None):
    pols = {}
    for p, r in (("none", (1.0, 1.0, 1.0)), ("intra", (1.0, 1.0, 1.0)), ("fedbuff", (1.3, 1.1, 1.6)),
                 ("full", (1.5, 1.2, "inf"))):
      paths = []
      for s in range(3):
        rel = f"runs/{name}/{p}/seed{s}.json.gz"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        evs = [{"virtual_time_s": t, "metrics": {"a": min(1.0, 0.2 * t * (1 + 0.1 * s))}} for t in (1, 2, 3, 4)]
        with gzip.open(tmp_path / rel, "wt") as f:
          json.dump({"evaluations": evs, "history": []}, f)
        paths.append(rel)
      pols[p] = {"ratio_vs_none": ratio(*r), "ratio_vs_best_baseline": ratio(*r), "verdict_vs_none": "faster",
                 "verdict_vs_best_baseline": "no difference shown", "plateau_vs_none": {"a": summary(0.0)},
                 "work_beyond_nominal_s": summary(0.0), "runs": paths}
    return {"name": name, "scenario": {"tasks": ["a"], "speed_sigma": sigma, "trace": trace,
                                       "heterogeneity": f"lognormal {sigma}"},
            "targets": {"a": 0.5}, "horizon_s": 4.0, "best_baseline": "fedbuff",
            "tuned": {"fedbuff": {"chosen": "fedbuff[K=2]"}, "full": {"chosen": "full[ext,fednova_nominal]"}},
            "policies": pols}

  doc = {"device": "cpu: test", "mode": "tiny", "seeds": [0, 1, 2], "calibration_seeds": [9],
         "scenarios": [scenario("mix", 0.5)], "sweep": [scenario("mix sigma 1", 1.0), scenario("mix sigma 0.25", 0.25)]}
  (tmp_path / "evidence.json").write_text(json.dumps(doc))
  return doc


def test_evidence_figures_and_table(tmp_path, monkeypatch):
  doc = _evidence(tmp_path)
  fig = plotting.tta_ratios(doc)
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_yticklabels()] == ["intra", "fedbuff (K=2)", "full = full[ext,fednova_nominal]"]
  assert ax.get_xscale() == "linear"
  fig = plotting.heterogeneity_sweep(doc)
  # least heterogeneous first: 0.25 (sweep), 0.5 (main), 1 (sweep)
  assert [t.get_text().split("\n")[0] for t in fig.axes[0].get_xticklabels()] == [
      "lognormal 0.25", "lognormal 0.5", "lognormal 1.0"]
  fig = plotting.evidence_accuracy(doc, tmp_path)
  assert fig.axes[0].get_title() == "mix: a" and len(fig.axes[0].collections) == 3  # a band per policy
  table = plotting.evidence_table(doc)
  assert "| full = full[ext,fednova_nominal] | 1.50 [1.20, inf] faster |" in table
  monkeypatch.setenv("MTFL_EVIDENCE", str(tmp_path))
  got, where = plotting.load_evidence()
  assert got == doc and where == tmp_path
  monkeypatch.delenv("MTFL_EVIDENCE")
  assert plotting.load_evidence(start=tmp_path) == (None, None)
  # a recording keeps its evidence beside its runs, under raw/evidence/
  kept = tmp_path / "repo" / "data" / "recorded" / "dev" / "raw" / "evidence"
  kept.mkdir(parents=True)
  (kept / "evidence.json").write_text(json.dumps(doc))
  got, where = plotting.load_evidence(start=tmp_path / "repo")
  assert got == doc and where == kept
  monkeypatch.setenv("MTFL_EVIDENCE", str(tmp_path / "repo" / "data" / "recorded" / "dev"))  # a reproduce --out
  got, where = plotting.load_evidence()
  assert got == doc and where == kept


def test_find_recorded_takes_the_newest_under_data_recorded(tmp_path):
  import os
  for i, dev in enumerate(("old_device", "new_device")):
    p = tmp_path / "data" / "recorded" / dev / "summary.json"
    p.parent.mkdir(parents=True)
    p.write_text("{}")
    os.utime(p, (1000 + i, 1000 + i))
  (tmp_path / "sub").mkdir()
  assert plotting.find_recorded("summary.json", start=tmp_path / "sub").parent.name == "new_device"
  assert plotting.find_recorded("evidence.json", start=tmp_path) is None


def test_fig6_draws_every_scenario():
  # the evidence document's shape: per scenario its tasks, targets, best baseline and, per
  # policy, one evaluation curve [[virtual time, {task: metric}], ...] per seed
  def curves(level):
    return [[[t, {"a": level + 0.1 * t + k * 0.01, "b": level}] for t in (1.0, 2.0, 3.0)] for k in range(3)]
  def scenario(name, tasks):
    return {"name": name, "scenario": {"tasks": tasks}, "targets": {t: 0.5 for t in tasks},
            "best_baseline": "deadline", "curves": {"none": curves(0.3), "deadline": curves(0.4), "full": curves(0.5)}}
  d = {"device": "cpu: test", "seeds": [0, 1, 2], "scenarios": [scenario("one", ["a"]), scenario("two", ["a", "b"])]}
  fig = plotting.fig6_accuracy(d)
  shown = [a for a in fig.axes if a.get_visible() and a.axison]
  assert [a.get_title() for a in shown] == ["one: a", "two: a", "two: b"]
  # none, the best baseline and full, each a median line; the target a dotted line
  labels = [ln.get_label() for ln in shown[0].get_lines()]
  assert labels == ["none", "deadline", "full", "target"]
  med = shown[0].get_lines()[2].get_ydata()  # full's median over seeds at each grid time
  assert list(med) == pytest.approx([0.5 + 0.1 * t + 0.01 for t in (1.0, 2.0, 3.0)])


def test_compact_png_keeps_the_picture_in_fewer_bytes():
  import io

  import matplotlib.pyplot as plt
  from PIL import Image
  fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
  for k in range(6):
    ax.plot(np.sin(np.linspace(0, 6, 200) + k), label=str(k))
  ax.legend()
  full = io.BytesIO()
  fig.savefig(full, format="png", bbox_inches="tight")
  small = plotting.compact_png(fig)
  a, b = Image.open(io.BytesIO(full.getvalue())), Image.open(io.BytesIO(small))
  assert b.mode == "P" and b.size == a.size and len(small) < len(full.getvalue())
  # the palette keeps every pixel close to the original
  diff = np.abs(np.asarray(a.convert("RGB"), float) - np.asarray(b.convert("RGB"), float))
  assert diff.mean() < 2.0


def test_use_compact_png_registers_a_figure_formatter():
  from IPython.core.interactiveshell import InteractiveShell
  from matplotlib.figure import Figure
  shell = InteractiveShell.instance()
  assert plotting.use_compact_png(shell=shell)
  fig = Figure(figsize=(2, 2))
  fig.add_subplot().plot([0, 1])
  png = shell.display_formatter.formatters["image/png"](fig)
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
