"""The six figures, each drawn from its JSON (so recorded runs can be redrawn anywhere).

The paper's numbers come from the JSON's ``paper`` field (written by the experiments), not
from here. No matplotlib backend is chosen here, so figures show inline in Jupyter; code that
only saves files (``reproduce``) picks a non-interactive one itself.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

POLICY_COLORS = {"sequential": "#888888", "equal": "#e69f00", "partitioned": "#56b4e9",
                 "competitive": "#009e73", "auto": "#cc79a7", "grid_best": "#0072b2", "none": "#888888",
                 "deadline": "#d55e00", "intra": "#56b4e9", "full": "#009e73", "overselect": "#cc79a7",
                 "fedbuff": "#8c564b"}
# Line style and marker per federated policy: curves that coincide (intra trains as none does)
# stay distinguishable.
POLICY_STYLES = {"none": ("-", "o"), "intra": ("--", "s"), "deadline": ("-", "^"), "overselect": ("-.", "v"),
                 "fedbuff": (":", "D"), "full": ("-", "P")}
FED_POLICIES = ("none", "deadline", "intra", "full")
BUSY_COLOR = "#0072b2"  # a client's busy time (idle is light grey)


def _title(fig, text: str, device: str, note: str | None):
  fig.suptitle(f"{text}\nmeasured on {device}" + (f"\n{note}" if note else ""), fontsize=10)
  if fig.subplotpars.top > _title_top(fig):  # laid out already: make room for the title's lines
    fig.subplots_adjust(top=_title_top(fig))


def _title_top(fig) -> float:
  """The top of the axes' area (figure fraction) that leaves the suptitle's lines clear of the
  axes' own titles."""
  lines = fig.get_suptitle().count("\n") + 1 if fig.get_suptitle() else 0
  return 1.0 - (lines * 14 + 22 * bool(lines)) / (72 * fig.get_figheight())


def _num(v: float) -> str:
  """A bar's value label: three significant digits, no exponent for everyday magnitudes."""
  if abs(v) >= 100:
    return f"{v:,.0f}"
  return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _labelled_bars(a, names, values, color, ylabel: str):
  """Bars on a linear axis with each value written on its bar, so that a bar too small to see
  still reads (a log axis would make a 1.7x difference look like 10x)."""
  bars = a.bar(names, values, color=color)
  a.bar_label(bars, labels=[_num(v) for v in values], fontsize=8, padding=2)
  a.set_ylim(0, 1.15 * max(values, default=1.0) or 1.0)
  a.set_ylabel(ylabel)


def _profile_panels(ax, rows, rotation: int):
  """Step time, FLOPs per step and % of the matmul peak of profile JSON rows, on three
  linear axes with the values written on the bars (fig. 1 and :func:`profile_bars`)."""
  names = [p["task"] for p in rows]
  _labelled_bars(ax[0], names, [p["step_time_s"] * 1e3 for p in rows], "#0072b2", "step time (ms)")
  _labelled_bars(ax[1], names, [p["flops_per_step"] / 1e6 for p in rows], "#d55e00", "MFLOP per step")
  _labelled_bars(ax[2], names, [100 * p["peak_fraction"] for p in rows], "#009e73",
                 "% of measured matmul peak\n(achieved FLOP/s, not busy time)")
  for a in ax:
    a.tick_params(axis="x", rotation=rotation)


def fig1_workloads(d: dict, note: str | None = None):
  """Per-task step time, FLOPs and share of the device peak; per-client workload skew."""
  prof = d["profiles"]
  fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
  _profile_panels(ax[:3], prof, rotation=30)
  w = np.array(d["client_solo_work_s"])  # [clients, tasks]
  im = ax[3].imshow(w.T, aspect="auto", cmap="viridis")
  ax[3].set_yticks(range(len(d["partition_tasks"])), d["partition_tasks"])
  ax[3].set_xlabel("client")
  ax[3].set_title("solo seconds of local work per round", fontsize=9)
  fig.colorbar(im, ax=ax[3])
  _title(fig, "Fig. 1: workload imbalance", d['device'], note)
  fig.tight_layout()
  return fig


COSCHED_POLICIES = ("sequential", "equal", "partitioned", "competitive", "auto", "grid_best")
CONCURRENT_POLICIES = COSCHED_POLICIES[1:]


def _med_err(summaries) -> tuple[list[float], list[list[float]]]:
  """Medians and (below, above) error-bar lengths of :mod:`mtfl_jax.stats` summaries."""
  med = [float(s["median"]) if s["median"] is not None else np.nan for s in summaries]
  lo = [m - float(s["ci95"][0]) if s["ci95"][0] is not None else 0.0 for m, s in zip(med, summaries)]
  hi = [float(s["ci95"][1]) - m if s["ci95"][1] is not None else 0.0 for m, s in zip(med, summaries)]
  return med, [lo, hi]


def _ci_text(s: dict, fmt: str = ".2f") -> str:
  return f"{float(s['median']):{fmt}} [{float(s['ci95'][0]):{fmt}}, {float(s['ci95'][1]):{fmt}}]"


def _legend_outside(fig, axes, right: float = 0.8):
  """One legend for the figure, to the right of every axis (never over the data)."""
  handles, labels = {}, {}
  for a in np.ravel(axes):
    for h, lab in zip(*a.get_legend_handles_labels()):
      if lab not in labels:
        handles[lab], labels[lab] = h, lab
  fig.tight_layout(rect=(0, 0, right, 1))
  fig.legend(list(handles.values()), list(labels), loc="center left", bbox_to_anchor=(right, 0.5), fontsize=8,
             frameon=False)


def _regimes(d: dict) -> list[str]:
  return list(d.get("regimes") or {})


def fig2_sharing(d: dict, note: str | None = None):
  """Speedup over sequential of every plan (median over fresh, paired repeats; error bars: 95%
  bootstrap intervals), one panel per regime; triangles: the searched plans' numbers in their
  own search (biased up: the best of noisy draws); each panel's title has C = sum r_i."""
  if not all("regimes" in s for s in d["scenarios"]):
    return _fig2_legacy(d, note)
  sc, regimes = d["scenarios"], _regimes(d)
  fig, ax = plt.subplots(1, len(regimes), figsize=(5.6 * len(regimes) + 2.4, 4.4), sharey=True, squeeze=False)
  x = np.arange(len(sc))
  width = 0.8 / len(CONCURRENT_POLICIES)
  for a, rg in zip(ax[0], regimes):
    arms = [s["regimes"][rg] for s in sc]
    for k, p in enumerate(CONCURRENT_POLICIES):
      off = x + (k - (len(CONCURRENT_POLICIES) - 1) / 2) * width
      med, err = _med_err([arm["speedup_vs_sequential"][p] for arm in arms])
      a.bar(off, med, width, yerr=err, capsize=2, label=p, color=POLICY_COLORS[p], ecolor="k")
      if p in ("auto", "grid_best"):
        a.plot(off, [float(arm["searched"][p]["search_speedup"]["median"]) for arm in arms], "v", mfc="none",
               mec="k", ms=6, label="auto, grid_best:\ntheir search's number")
    a.axhline(1.0, c="k", lw=0.8, label="sequential")
    paper = d.get("paper", {}).get("training_speedup")
    if paper is not None:
      a.axhline(paper, ls="--", c="k", lw=1, label=f"paper: {paper:g}x (GPU)")
    a.set_xticks(x, [s["name"] for s in sc])
    caps = "; ".join(f"{s['name']} {_ci_text(arm['capacity'])}" for s, arm in zip(sc, arms))
    a.set_title(f"{d['regimes'][rg]['label']}\non {d['regimes'][rg]['backend']}; C = sum r_i: {caps}", fontsize=8)
  ax[0][0].set_ylabel("speedup vs sequential\n(median, 95% bootstrap interval)")
  _title(fig, f"Fig. 2: sharing strategies, {d['repeats']} fresh interleaved paired repeats per plan\n"
              f"({d.get('gpu_regime', '')})", d["device"], note)
  _legend_outside(fig, ax, right=0.78)
  return fig


def fig3_vresource(d: dict, note: str | None = None):
  """Each task's virtual resource against its share, measured co-run and predicted."""
  curves = d["curves"]
  fig, ax = plt.subplots(1, len(curves), figsize=(4.2 * len(curves) + 1.9, 3.6), squeeze=False)
  for a, (task, c) in zip(ax[0], curves.items()):
    a.plot(c["share"], c["measured"], "o-", label="measured, co-run")
    a.plot(c["share"], c["predicted"], "s--", label="model")
    a.axhline(1.0, c="k", lw=0.8, ls=":", label="solo")
    a.set_xlabel(f"share of {task} (others at 1.0)")
    a.set_ylabel("virtual resource r")
    a.set_ylim(0, 1.15)
    a.set_title(task, fontsize=9)
  _title(fig, f"Fig. 3: virtual resource vs allocation, mix {'+'.join(curves)}; capacity C = "
              f"{d['capacity']:.2f}, backend {d['backend']}", d['device'], note)
  _legend_outside(fig, ax, right=1 - 1.9 / fig.get_figwidth())
  return fig


def _most_imbalanced(scenarios: list) -> dict:
  def spread(s):
    w = s.get("work") or list(s["solo_work_s"].values())
    return max(w) / min(w)
  return max(scenarios, key=spread)


def fig4_intra(d: dict, note: str | None = None):
  """Per-task finish times under every plan (medians over fresh repeats, error bars: 95%
  bootstrap intervals), black: the makespan, dashed: the model's competitive makespan; one
  panel per regime, the most imbalanced mix. The title gives equal / competitive and whether
  its interval excludes 1."""
  if not all("regimes" in s for s in d["scenarios"]):
    return _fig4_legacy(d, note)
  sc, regimes = _most_imbalanced(d["scenarios"]), _regimes(d)
  tasks, pols = sc["tasks"], CONCURRENT_POLICIES
  height = 0.5 + 0.55 * len(pols) * (1 + len(tasks) / 4)
  fig, ax = plt.subplots(1, len(regimes), figsize=(5.4 * len(regimes) + 2.4, height), sharey=True, squeeze=False)
  h = 0.8 / (len(tasks) + 1)
  for a, rg in zip(ax[0], regimes):
    arm = sc["regimes"][rg]
    for k, p in enumerate(pols):
      for j, t in enumerate(tasks):
        (m,), err = _med_err([arm["finish_times_s"][p][t]])
        a.barh(k + (j - len(tasks) / 2) * h, m, h * 0.9, xerr=[[err[0][0]], [err[1][0]]], capsize=2,
               color=plt.cm.tab10(j), label=t)
      (m,), err = _med_err([arm["makespan_s"][p]])
      a.errorbar([m], [k + len(tasks) / 2 * h], xerr=[[err[0][0]], [err[1][0]]], fmt="s", c="k", ms=4, capsize=3,
                 label="makespan")
    pred = arm["plans"]["competitive"]["predicted_makespan_s"]
    if pred is not None:
      a.axvline(pred, ls="--", c=POLICY_COLORS["competitive"], label="model: competitive makespan")
    cve = arm["competitive_vs_equal"]
    a.set_title(f"{d['regimes'][rg]['label']}\nequal / competitive makespan {_ci_text(cve)}: {cve['verdict']}",
                fontsize=8)
    a.set_xlabel("finish time (s from the common start)")
    a.set_yticks(range(len(pols)), pols)
  _title(fig, f"Fig. 4: intra-device scheduling, scenario '{sc['name']}' ({d['repeats']} fresh repeats)",
         d["device"], note)
  _legend_outside(fig, ax)
  return fig


# --------------------------------------------------------------------------- legacy recordings
def _fig2_legacy(d: dict, note: str | None = None):
  """fig. 2 of a recording made before the regimes and intervals (medians; bars span min-max):
  kept so that such recordings still redraw."""
  sc = d["scenarios"]
  fig, ax = plt.subplots(1, 2, figsize=(14.5, 4))
  pols = [p for p in COSCHED_POLICIES if p in sc[0]["makespan_s"]]
  x = np.arange(len(sc))
  width = 0.8 / len(pols)
  for k, p in enumerate(pols):
    ys = [s["makespan_s"]["sequential"] / s["makespan_s"][p] for s in sc]
    err = None
    if all("spread" in s for s in sc):  # throughput range from the makespan range
      lo = [y - s["makespan_s"]["sequential"] / s["spread"][s["backend"]][p][1] for y, s in zip(ys, sc)]
      hi = [s["makespan_s"]["sequential"] / s["spread"][s["backend"]][p][0] - y for y, s in zip(ys, sc)]
      err = [lo, hi]
    ax[0].bar(x + (k - (len(pols) - 1) / 2) * width, ys, width, yerr=err, capsize=2, label=p,
              color=POLICY_COLORS[p])
  paper = d.get("paper", {}).get("training_speedup")
  if paper is not None:
    ax[0].axhline(paper, ls="--", c="k", lw=1, label=f"paper: {paper:g}x")
  ax[0].set_xticks(x, [f"{s['name']}\n({s['backend']})" for s in sc])
  ax[0].set_ylabel("throughput / sequential (medians)")
  ax[0].set_title(f"policies on the best backend ({d.get('repeats', 1)} interleaved repeats)", fontsize=9)
  by_b = [s.get("makespan_by_backend") or {b: {"competitive": v} for b, v in s["backends_competitive"].items()}
          for s in sc]
  backends = list(by_b[0])
  show = "auto" if "auto" in by_b[0][backends[0]] else "competitive"
  hatches = ["", "//", "..", "xx"]
  for k, b in enumerate(backends):
    ax[1].bar(x + (k - (len(backends) - 1) / 2) * 0.25,
              [s["makespan_s"]["sequential"] / m[b][show] for s, m in zip(sc, by_b)], 0.25, label=f"backend: {b}",
              color="white", edgecolor="k", hatch=hatches[k % len(hatches)])
  ax[1].axhline(1.0, c="k", lw=0.8)
  ax[1].set_xticks(x, [s["name"] for s in sc])
  ax[1].set_ylabel(f"{show} throughput / sequential")
  ax[1].set_title(f"backends under the {show} plan", fontsize=9)
  _title(fig, "Fig. 2: sharing strategies", d['device'], note)
  _legend_outside(fig, ax, right=0.84)
  return fig


def _fig4_legacy(d: dict, note: str | None = None):
  """fig. 4 of a recording made before the regimes and intervals: kept so that it still redraws."""
  sc = max(d["scenarios"], key=lambda s: max(s["solo_work_s"].values()) / min(s["solo_work_s"].values()))
  pols = [p for p in COSCHED_POLICIES if p in sc["finish_times_s"]]
  fig, ax = plt.subplots(figsize=(10, 4.6))
  tasks = sc["tasks"]
  for k, p in enumerate(pols):
    ft = sc["finish_times_s"][p]
    for j, t in enumerate(tasks):
      ax.barh(k + (j - (len(tasks) - 1) / 2) * 0.18, ft[t], 0.16, color=plt.cm.tab10(j), label=t if k == 0 else None)
    ax.plot([sc["makespan_s"][p]] * 2, [k - 0.45, k + 0.45], c="k", lw=2)
  ax.axvline(sc["predicted_makespan_s"]["competitive"], ls="--", c=POLICY_COLORS["competitive"],
             label="predicted makespan (competitive)")
  ax.plot([], [], c="k", lw=2, label="makespan")
  ax.set_yticks(range(len(pols)), pols)
  ax.set_xlabel("finish time (s from the common start; sequential: tasks one after another)")
  _title(fig, f"Fig. 4: intra-device scheduling, scenario '{sc['name']}' on {sc['backend']} "
              f"(equal / competitive makespan {sc['speedup_vs_equal']:.2f})", d['device'], note)
  _legend_outside(fig, ax, right=0.74)
  return fig


EVIDENCE_ORDER = ("none", "intra", "deadline", "overselect", "fedbuff", "full")
POLICY_COLORS.update({"overselect": "#cc79a7", "fedbuff": "#0072b2", "none": "#555555"})


def _policy_order(names) -> list[str]:
  first = [p for p in EVIDENCE_ORDER if p in names]
  return first + sorted(n for n in names if n not in first)


def _as_float(x) -> float:
  return float("inf") if x == "inf" else float("nan") if x is None else float(x)


def fig5_time_to_accuracy(d: dict, note: str | None = None):
  """Per scenario, each policy's speedup in time to accuracy over ``none`` (paired per seed;
  bars: medians, error bars: 95% bootstrap intervals; above 1: sooner), and, beside it, the
  same ratios against the fleet's heterogeneity (the sweep). Reads ``evidence.json``;
  recordings made before it hold FL throughput instead and are drawn as they were."""
  if "scenarios" in d and d["scenarios"] and "work_throughput" in d["scenarios"][0]:
    return _fig5_legacy(d, note)
  main, sweep = d["scenarios"], d.get("sweep", [])
  pols = _policy_order([p for p in main[0]["policies"] if p == "full" or "[" not in p])
  pols = [p for p in pols if p != "none"]
  fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
  x = np.arange(len(main))
  wd = 0.8 / len(pols)
  for k, p in enumerate(pols):
    meds, lo, hi = [], [], []
    for s in main:
      r = s["policies"][p]["ratio_vs_none"]
      m, (a, b) = _as_float(r["median"]), (_as_float(v) for v in r["ci95"])
      meds.append(m)
      lo.append(max(0.0, m - a) if np.isfinite(a) else 0.0)
      hi.append(b - m if np.isfinite(b) else 0.0)
    off = x + (k - (len(pols) - 1) / 2) * wd
    ax[0].bar(off, meds, wd, color=POLICY_COLORS.get(p), label=p)
    ax[0].errorbar(off, meds, yerr=[lo, hi], fmt="none", ecolor="k", lw=0.8, capsize=2)
  ax[0].axhline(1.0, c="k", lw=0.8, ls="--")
  ax[0].set_xticks(x, [s["name"] for s in main], fontsize=8)
  ax[0].set_ylabel("time to accuracy: none / policy\n(above 1: sooner)")
  ax[0].set_title(f"{len(d['seeds'])} evaluation seeds; bars: median, whiskers: 95% bootstrap interval", fontsize=8)
  pts = [s for s in main + sweep if s["scenario"].get("trace") is None and s["scenario"]["tasks"] ==
         main[0]["scenario"]["tasks"]]
  pts = sorted(pts, key=lambda s: s["scenario"]["speed_sigma"])
  venn = [s for s in main + sweep if s["scenario"].get("trace") == "venn"]
  for p in pols:
    xs = [s["scenario"]["speed_sigma"] for s in pts]
    ys = [_as_float(s["policies"][p]["ratio_vs_none"]["median"]) for s in pts if p in s["policies"]]
    if len(ys) == len(xs) and xs:
      ax[1].plot(xs, ys, "o-", color=POLICY_COLORS.get(p), label=p)
    for s in venn:
      if p in s["policies"]:
        ax[1].plot([max(xs or [1.0]) + 0.35], [_as_float(s["policies"][p]["ratio_vs_none"]["median"])], "s",
                   color=POLICY_COLORS.get(p))
  ax[1].axhline(1.0, c="k", lw=0.8, ls="--")
  ax[1].set_xlabel("device speed spread: lognormal sigma (square: the Venn device table)")
  ax[1].set_ylabel("median speedup over none")
  ax[1].set_title("against heterogeneity", fontsize=8)
  _legend_outside(fig, ax, right=0.86)
  _title(fig, "Fig. 5: time to accuracy against none, with intervals", d["device"], note)
  return fig


def fig6_accuracy(d: dict, note: str | None = None):
  """Accuracy against virtual time per task, median over seeds with the 95% interval of the
  median as a band, for none, the best baseline and full, in every main scenario."""
  if "scenarios" in d and d["scenarios"] and "work_throughput" in d["scenarios"][0]:
    return _fig6_legacy(d, note)
  from mtfl_jax.stats import bootstrap_ci
  main = d["scenarios"]
  rows, cols = len(main), max(len(s["scenario"]["tasks"]) for s in main)
  fig, ax = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
  for i, s in enumerate(main):
    show = [p for p in ("none", s["best_baseline"], "full") if p in s.get("curves", {})]
    show = list(dict.fromkeys(show))
    for j, t in enumerate(s["scenario"]["tasks"]):
      a = ax[i][j]
      for p in show:
        runs = s["curves"][p]
        grid = [pt[0] for pt in runs[0]]
        vals = np.array([[pt[1][t] for pt in r[:len(grid)]] for r in runs if len(r) >= len(grid)])
        med = np.median(vals, axis=0)
        a.plot(grid, med, "-", color=POLICY_COLORS.get(p), label=f"{p}")
        if len(vals) > 1:
          band = np.array([bootstrap_ci(vals[:, k], n_boot=2000) for k in range(len(grid))])
          a.fill_between(grid, band[:, 0], band[:, 1], color=POLICY_COLORS.get(p), alpha=0.18, lw=0)
      a.axhline(s["targets"][t], c="k", lw=0.8, ls=":", label="target")
      a.set_title(f"{s['name']}: {t}", fontsize=8)
      a.set_xlabel("virtual time (s)", fontsize=8)
      a.set_ylabel("test mIoU" if "unet" in t else "test accuracy", fontsize=8)
    for j in range(len(s["scenario"]["tasks"]), cols):
      ax[i][j].axis("off")
  _legend_outside(fig, ax.ravel().tolist(), right=0.85)
  _title(fig, f"Fig. 6: accuracy vs virtual time (median over {len(d['seeds'])} seeds, band: 95% interval)",
         d["device"], note)
  return fig


def _fig5_legacy(d: dict, note: str | None = None):
  """FL throughput (training work per virtual second, a step of task i counting its solo step
  time) of every policy relative to ``none``; dots: the plain sample rate ratio."""
  sc = d["scenarios"]
  pols = [p for p in FED_POLICIES if p in sc[0]["work_throughput"]]
  fig, ax = plt.subplots(figsize=(9, 3.8))
  x = np.arange(len(sc))
  wd = 0.8 / len(pols)
  for k, p in enumerate(pols):
    off = x + (k - (len(pols) - 1) / 2) * wd
    ax.bar(off, [s["work_throughput"][p] / s["work_throughput"]["none"] for s in sc], wd, label=p,
           color=POLICY_COLORS[p])
    ax.plot(off, [s["samples_per_s"][p] / s["samples_per_s"]["none"] for s in sc], "k.",
            label="samples/s ratio" if k == 0 else None)
  paper = d.get("paper", {}).get("fl_throughput_gain")
  if paper is not None:
    lo, hi = paper
    ax.axhspan(lo, hi, color="k", alpha=0.12, label=f"paper: {lo:g}-{hi:g}x")
  ax.set_xticks(x, [s["name"] for s in sc])
  ax.set_ylabel("work per virtual second / none")
  _title(fig, "Fig. 5: FL throughput (training work per virtual second)", d['device'], note)
  _legend_outside(fig, ax)
  return fig


def _fig6_legacy(d: dict, note: str | None = None):
  """fig. 6 of a recording made before the evidence (one seed): accuracy against virtual time
  per task, every policy within the same time budget, one row of panels per scenario."""
  scs = d["scenarios"]
  cols = max(len(s["tasks"]) for s in scs)
  fig, ax = plt.subplots(len(scs), cols, figsize=(3.0 * cols + 2.0, 2.25 * len(scs) + 0.9), squeeze=False)
  for row, sc in zip(ax, scs):
    for a, t in zip(row, sc["tasks"]):
      for p in FED_POLICIES:
        pts = [(c["virtual_time_s"], c["accuracy"][t]) for c in sc["curves"].get(p, []) if t in c.get("accuracy", {})]
        if pts:
          ls, mk = POLICY_STYLES.get(p, ("-", "o"))
          a.plot(*zip(*pts), ls=ls, marker=mk, ms=3, label=p, color=POLICY_COLORS[p])
      if "time_budget_s" in sc:
        a.axvline(sc["time_budget_s"], c="k", lw=0.8, ls="--", label="time budget")
      if "target" in sc:
        a.axhline(sc["target"][t], c="k", lw=0.8, ls=":", label="target (90% of none)")
      a.set_xlabel("virtual time (s)")
      a.set_ylabel("test mIoU" if "unet" in t else "test accuracy")
      a.set_title(f"{sc['name']}: {t}", fontsize=9)
    for a in row[len(sc["tasks"]):]:
      a.set_visible(False)
  _title(fig, "Fig. 6: accuracy vs virtual time at an equal budget, every scenario", d['device'], note)
  _legend_outside(fig, ax, right=0.84)
  return fig


FIGURES = {"fig1_workloads": fig1_workloads, "fig2_sharing": fig2_sharing, "fig3_vresource": fig3_vresource,
           "fig4_intra": fig4_intra, "fig5_time_to_accuracy": fig5_time_to_accuracy, "fig6_accuracy": fig6_accuracy}


def round_timeline(d: dict, note: str | None = None):
  """One round's per-client busy time and idle wait (who waits for whom): none, deadline
  (dropped clients hatched), full."""
  sc = max(d["scenarios"], key=lambda s: len(s["tasks"]))
  pols = [p for p in ("none", "deadline", "full") if p in sc["timeline"]]
  fig, ax = plt.subplots(1, len(pols), figsize=(5.5 * len(pols), 3.6), sharex=True, squeeze=False)
  for a, p in zip(ax[0], pols):
    tl = sc["timeline"][p]
    clients = sorted(tl["client_time_s"], key=int)
    dropped = {str(c) for c in tl.get("dropped", [])}
    busy = [tl["client_time_s"][c] for c in clients]
    a.barh(range(len(clients)), busy, color=BUSY_COLOR, label="busy")
    gone = [i for i, c in enumerate(clients) if c in dropped]
    if gone:
      a.barh(gone, [busy[i] for i in gone], color="white", edgecolor="k", hatch="//", label="dropped (missed deadline)")
    a.barh(range(len(clients)), [max(0.0, tl["round_time_s"] - b) for b in busy], left=busy, color="#dddddd",
           label="idle (waiting)")
    a.axvline(tl["round_time_s"], c="k", lw=1)
    a.set_yticks(range(len(clients)), [f"client {c}" for c in clients])
    a.set_xlabel("virtual seconds in round 0")
    a.set_title(p, fontsize=9)
  ax[0][0].legend(fontsize=8)
  _title(fig, f"Round timeline, scenario '{sc['name']}'", d['device'], note)
  fig.tight_layout()
  return fig


# --------------------------------------------------------------------------- tutorial helpers
# Small figures the notebooks draw from values the public API returns (profiles, RunResults,
# rate dicts, FedResult histories); each returns a matplotlib Figure.


def profile_bars(profiles, title: str = "Solo profiles"):
  """Step time (log), FLOPs per step (log) and share of the matmul peak of
  :class:`~mtfl_jax.profiling.TaskProfile` values (or their JSON dicts)."""
  rows = [p if isinstance(p, dict) else p.to_json() for p in profiles]
  fig, ax = plt.subplots(1, 3, figsize=(11, 3.2))
  _profile_panels(ax, rows, rotation=20)
  fig.suptitle(f"{title} on {rows[0]['device']}" if rows else title, fontsize=10)
  fig.tight_layout()
  return fig


def op_bars(ops, title: str = "Operator breakdown", top: int = 8):
  """FLOPs of the heaviest (layer, op, pass) rows of :func:`~mtfl_jax.profiling.op_breakdown`."""
  ops = list(ops)[:top][::-1]
  fig, ax = plt.subplots(figsize=(7, 0.35 * len(ops) + 1.2))
  colors = ["#d55e00" if o["pass"] == "backward" else "#0072b2" for o in ops]
  ax.barh([f"{o['layer']} {o['op'].split('_')[0]} ({o['pass'][:3]})" for o in ops],
          [o["flops"] / 1e6 for o in ops], color=colors)
  ax.set_xlabel("MFLOP per step (blue: forward, orange: backward)")
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return fig


def corun_timeline(runs, title: str = "Co-run timeline"):
  """Gantt-like view of :class:`~mtfl_jax.backends.RunResult` values (a dict name -> run, or
  one run): per plan, one lane per task from when the task started (``RunResult.start_s``:
  the common start for a co-run, the previous task's finish when they run one after another)
  to its finish, a tick at each step completion the backend recorded (it synchronises every
  k-th step of a light task, so a lane says how many steps one tick stands for), and the
  plan's makespan as a black bar."""
  runs = runs if isinstance(runs, dict) else {getattr(runs, "backend", "run"): runs}
  tasks = sorted({t for r in runs.values() for t in r.finish_times_s})
  fig, ax = plt.subplots(figsize=(10, 1.3 + 0.34 * len(tasks) * len(runs) + 0.3 * len(runs)))
  y, yt, yl = 0.0, [], []
  for name, r in runs.items():
    top = y
    for j, t in enumerate(tasks):
      if t not in r.finish_times_s:
        continue
      start = r.start_s(t) if hasattr(r, "start_s") else 0.0
      ax.barh(y, r.finish_times_s[t] - start, 0.7, left=start, color=plt.cm.tab10(j), alpha=0.35,
              label=t if name == next(iter(runs)) else None)
      every = np.asarray(r.step_times_s.get(t, ()), float)
      st = every[np.isfinite(every)]
      ax.plot(st, np.full(len(st), y), "|", color=plt.cm.tab10(j), ms=7)
      k = len(every) / max(1, len(st))
      ax.text(1.01, y, "1 tick = 1 step" if k <= 1.01 else f"1 tick = {k:.0f} steps", fontsize=7, va="center",
              transform=ax.get_yaxis_transform())
      yt.append(y)
      yl.append(f"{name}: {t}")
      y += 1
    ax.plot([r.makespan_s] * 2, [top - 0.45, y - 0.55], c="k", lw=2.5, label="makespan" if top == 0 else None)
    y += 0.6
  ax.set_yticks(yt, yl, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("seconds from the common start (ticks: recorded step completions)")
  ax.set_title(title, fontsize=10)
  bottom = 0.35 / fig.get_figheight()  # room for the legend below the axis label
  fig.tight_layout(rect=(0, bottom, 0.88, 1))
  fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=len(tasks) + 1, frameon=False)
  return fig


def rates_parity(cases, title: str = "Virtual resources: model vs measurement"):
  """Predicted against measured virtual resources ``r_i``; ``cases`` maps a label (e.g. the
  shares) to ``(predicted, measured)`` dicts task -> r. Left: colour is the task, marker the
  case; on the diagonal the model is exact. Right: the same per case, hatched bars predicted,
  solid measured. The legend sits outside both panels."""
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch
  fig, ax = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.6]})
  tasks = sorted({t for p, _ in cases.values() for t in p})
  marks = "osD^v<>"
  top = 0.0
  for k, (label, (pred, meas)) in enumerate(cases.items()):
    for j, t in enumerate(tasks):
      if t in pred and t in meas:
        ax[0].plot(meas[t], pred[t], marks[k % len(marks)], color=plt.cm.tab10(j), ms=7)
        top = max(top, pred[t], meas[t])
  ax[0].plot([0, top * 1.1], [0, top * 1.1], "k:", lw=1)
  ax[0].set_xlabel("measured r")
  ax[0].set_ylabel("predicted r")
  ax[0].set_title("each point: one task under one case", fontsize=9)
  x = np.arange(len(cases))
  wd = 0.8 / (2 * max(1, len(tasks)))
  for j, t in enumerate(tasks):
    for m, hatch in enumerate(("//", None)):
      vals = [c[m].get(t, np.nan) for c in cases.values()]
      ax[1].bar(x + (2 * j + m - len(tasks) + 0.5) * wd, vals, wd, color=plt.cm.tab10(j), hatch=hatch,
                alpha=0.6 if m == 0 else 1.0)
  ax[1].set_xticks(x, list(cases), fontsize=8)
  ax[1].set_ylabel("virtual resource r")
  handles = ([Patch(color=plt.cm.tab10(j), label=t) for j, t in enumerate(tasks)]
             + [Line2D([], [], ls="", marker=marks[k % len(marks)], color="k", label=f"case: {c}")
                for k, c in enumerate(cases)]
             + [Patch(facecolor="white", edgecolor="k", hatch="//", label="predicted (bars)"),
                Patch(facecolor="k", label="measured (bars)"), Line2D([], [], ls=":", c="k", label="model exact")])
  fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0, 0.8, 1))
  fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.8, 0.5), fontsize=8, frameon=False)
  return fig


def accuracy_vs_time(histories, budget_s: float | None = None, title: str = "Accuracy vs virtual time"):
  """Per task, test accuracy (or mIoU) against virtual time; ``histories`` maps a policy to a
  ``FedResult.history`` (rows with ``virtual_time_s`` and, when evaluated, ``accuracy``)."""
  tasks = sorted({t for h in histories.values() for row in h for t in row.get("accuracy", {})})
  fig, ax = plt.subplots(1, max(1, len(tasks)), figsize=(4.3 * max(1, len(tasks)), 3.4), squeeze=False)
  for a, t in zip(ax[0], tasks):
    for p, h in histories.items():
      pts = [(r["virtual_time_s"], r["accuracy"][t]) for r in h if t in r.get("accuracy", {})]
      if pts:
        ls, mk = POLICY_STYLES.get(p, ("-", "o"))
        a.plot(*zip(*pts), ls=ls, marker=mk, ms=3, label=p, color=POLICY_COLORS.get(p))
    if budget_s is not None:
      a.axvline(budget_s, c="k", lw=0.8, ls="--", label="time budget")
    a.set_xlabel("virtual time (s)")
    a.set_ylabel("test mIoU" if "unet" in t else "test accuracy")
    a.set_title(t, fontsize=9)
  fig.suptitle(title, fontsize=10)
  _legend_outside(fig, ax, right=0.82)
  return fig


def curve_points(run: dict, task: str) -> list[tuple[float, float]]:
  """A run's (virtual time, metric) points of ``task``: its evaluation grid when it has one,
  else the history rows that were evaluated."""
  if run.get("evaluations"):
    return [(e["virtual_time_s"], e["metrics"][task]) for e in run["evaluations"] if task in e["metrics"]]
  return [(r["virtual_time_s"], r["accuracy"][task]) for r in run.get("history", []) if task in r.get("accuracy", {})]


def _bands(a, runs_by_label: dict, t: str, points: int, targets: dict | None) -> None:
  """One task's median-over-seeds curves with their 95% bands on axis ``a`` (see
  :func:`accuracy_bands`)."""
  from mtfl_jax.stats import bootstrap_ci
  for label, runs in runs_by_label.items():
    curves = [c for c in (curve_points(r, t) for r in runs) if c]
    if not curves:
      continue
    end = min(c[-1][0] for c in curves)
    grid = np.linspace(min(c[0][0] for c in curves), end, points)
    vals = np.array([[c[max(0, np.searchsorted([p[0] for p in c], g, side="right") - 1)][1] for g in grid]
                     for c in curves])
    med = np.median(vals, axis=0)
    color = POLICY_COLORS.get(label.split("[")[0])
    a.plot(grid, med, POLICY_STYLES.get(label, ("-", "o"))[0], lw=1.4, color=color,
           label=f"{label} (median of {len(curves)})")
    if len(curves) > 1:
      lo_hi = np.array([bootstrap_ci(vals[:, i], n_boot=2000) for i in range(len(grid))])
      a.fill_between(grid, lo_hi[:, 0], lo_hi[:, 1], color=color, alpha=0.18, lw=0)
  if targets and t in targets:
    a.axhline(targets[t], c="k", lw=0.8, ls=":", label="target")
  a.set_xlabel("virtual time (s)")
  a.set_ylabel("test mIoU" if "unet" in t else "test accuracy")


def _run_tasks(runs_by_label: dict) -> list[str]:
  return sorted({t for runs in runs_by_label.values() for r in runs
                 for t in (r.get("evaluations") or [{}])[0].get("metrics", {}) or
                 {k for row in r.get("history", []) for k in row.get("accuracy", {})}})


def accuracy_bands(runs_by_label: dict, points: int = 60, title: str = "Accuracy vs virtual time, over seeds",
                   targets: dict | None = None):
  """Per task, the median over seeds of the metric against virtual time (each run's metric
  holds from one evaluation to the next) with a band: the 95% bootstrap interval of that
  median at every time. ``runs_by_label`` maps a label (a policy) to its runs (dicts with an
  ``evaluations`` grid or evaluated ``history`` rows)."""
  tasks = _run_tasks(runs_by_label)
  fig, ax = plt.subplots(1, max(1, len(tasks)), figsize=(4.4 * max(1, len(tasks)), 3.5), squeeze=False)
  for a, t in zip(ax[0], tasks):
    _bands(a, runs_by_label, t, points, targets)
    a.set_title(t, fontsize=9)
  handles, labels = ax[0][-1].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(labels)))
  fig.suptitle(title + " (bands: 95% bootstrap interval of the median)", fontsize=10)
  fig.tight_layout()
  return fig


def client_round_bars(rows, title: str = "One round: each client's busy and idle time"):
  """Per policy, one ``FedResult.history`` row drawn as bars: each sampled client's busy time
  (``client_time_s``, blue), its wait for the round's end (``idle_s``, light grey), dropped
  clients hatched (the work they did is lost), and the round's length (``round_time_s``, a
  black line). The policy is in each panel's title."""
  height = 0.25 * max(len(r["client_time_s"]) for r in rows.values()) + 1.9
  fig, ax = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), height), sharex=True, squeeze=False)
  for a, (p, r) in zip(ax[0], rows.items()):
    clients = sorted(r["client_time_s"], key=int)
    busy = [r["client_time_s"][c] for c in clients]
    live = [c in r["idle_s"] for c in clients]
    y = np.arange(len(clients))
    a.barh(y, [b if ok else 0 for b, ok in zip(busy, live)], color=BUSY_COLOR, label="busy (update aggregated)")
    gone = [i for i, ok in enumerate(live) if not ok]
    if gone:
      a.barh(gone, [min(busy[i], r["round_time_s"]) for i in gone], color="white", edgecolor="k", hatch="//",
             label="dropped (work lost)")
    a.barh(y, [r["idle_s"].get(c, 0.0) for c in clients], left=[b if ok else 0 for b, ok in zip(busy, live)],
           color="#dddddd", label="idle (waiting for the round's end)")
    a.axvline(r["round_time_s"], c="k", lw=1, label="round ends")
    a.set_yticks(y, [f"client {c}" for c in clients], fontsize=8)
    a.set_xlabel("virtual seconds")
    a.set_title(f"{p}: round {r.get('round', '?')} lasts {r['round_time_s']:.2f} s", fontsize=9)
  fig.suptitle(title, fontsize=10)
  bottom = 0.45 / height
  fig.tight_layout(rect=(0, bottom, 1, 1))
  handles = {}
  for a in ax[0]:
    for h, lab in zip(*a.get_legend_handles_labels()):
      handles.setdefault(lab, h)
  fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8,
             frameon=False)
  return fig


def ratio_bars(values, ylabel: str, title: str = "", ref: float | None = 1.0, ref_label: str = "baseline",
               intervals: dict | None = None):
  """Grouped bars: ``values`` maps a group (a backend, a scenario) to ``{label: ratio}``
  (labels coloured as policies); ``intervals`` (same keys) gives ``(low, high)`` error bars,
  e.g. 95% bootstrap intervals; a dashed line at ``ref``. The legend sits right of the axis."""
  groups = list(values)
  labels = list(dict.fromkeys(k for g in groups for k in values[g]))
  fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * len(labels) * 0.45 + 2) + 2.0, 3.4))
  x = np.arange(len(groups))
  wd = 0.8 / max(1, len(labels))
  for k, lab in enumerate(labels):
    ys = [values[g].get(lab, np.nan) for g in groups]
    err = None
    if intervals:
      ci = [intervals.get(g, {}).get(lab, (y, y)) for g, y in zip(groups, ys)]
      err = [[max(0.0, y - lo) for y, (lo, _) in zip(ys, ci)], [max(0.0, hi - y) for y, (_, hi) in zip(ys, ci)]]
    ax.bar(x + (k - (len(labels) - 1) / 2) * wd, ys, wd, yerr=err, capsize=2, ecolor="k", label=lab,
           color=POLICY_COLORS.get(lab))
  if ref is not None:
    ax.axhline(ref, c="k", lw=0.8, ls="--", label=ref_label)
  ax.set_xticks(x, groups)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  _legend_outside(fig, ax, right=0.78)
  return fig


def _as_run(r) -> dict:
  """A :class:`~mtfl_jax.federated.FedResult` or a run's dict as ``{"evaluations", "history"}``."""
  if isinstance(r, dict):
    return r
  return {"evaluations": list(getattr(r, "evaluations", None) or []), "history": list(r.history)}


def policy_curves(results, budget_s: float | None = None, title: str = "Accuracy vs virtual time",
                  targets: dict | None = None):
  """Per task, the metric against virtual time of one run per policy (``results`` maps a
  policy to a :class:`~mtfl_jax.federated.FedResult` or a run's dict): its evaluation grid
  (``FedConfig.eval_every_s``) when it has one, else its evaluated history rows. Every policy
  has its own colour, line style and marker, and markers are offset along each curve, so that
  curves that coincide stay visible; a policy whose curves equal an earlier policy's on every
  task says so in the legend (``"intra (= none)"``) and is drawn with hollow markers."""
  runs = {p: _as_run(r) for p, r in results.items()}
  tasks = list(dict.fromkeys([t for r in runs.values() for e in (r.get("evaluations") or [])
                              for t in e.get("metrics", {})]
                             + [t for r in runs.values() for row in r.get("history", [])
                                for t in row.get("accuracy", {})]))
  points = {p: {t: curve_points(run, t) for t in tasks} for p, run in runs.items()}
  labels, seen = {}, {}
  for p, pts in points.items():
    key = tuple(tuple((round(x, 9), round(y, 9)) for x, y in pts[t]) for t in tasks)
    labels[p] = p if key not in seen else f"{p} (= {seen[key]})"
    seen.setdefault(key, p)
  fig, ax = plt.subplots(1, max(1, len(tasks)), figsize=(4.4 * max(1, len(tasks)) + 2.4, 3.5), squeeze=False)
  for a, t in zip(ax[0], tasks):
    for k, p in enumerate(runs):
      pts = points[p][t]
      if not pts:
        continue
      ls, mk = POLICY_STYLES.get(p, ("-", "o"))
      step = max(2, len(pts) // 8)
      a.plot(*zip(*pts), ls=ls, marker=mk, ms=4, markevery=(k % step, step), lw=1.3, label=labels[p],
             color=POLICY_COLORS.get(p), mfc="none" if labels[p] != p else None)
    if budget_s is not None:
      a.axvline(budget_s, c="k", lw=0.8, ls="--", label="time budget")
    if targets and t in targets:
      a.axhline(targets[t], c="k", lw=0.8, ls=":", label="target")
    a.set_xlabel("virtual time (s)")
    a.set_ylabel("test mIoU" if "unet" in t else "test accuracy")
    a.set_title(t, fontsize=9)
  fig.suptitle(title, fontsize=10)
  _legend_outside(fig, ax, right=1 - 2.2 / fig.get_figwidth())
  return fig


# --------------------------------------------------------------------------- the federated evidence
# Drawn from ``evidence.json`` (``python -m mtfl_jax reproduce --full``) and its ``runs/``:
# times to accuracy over evaluation seeds with paired 95% bootstrap intervals.


def _val(x) -> float:
  """A number of :mod:`mtfl_jax.stats` JSON as a float (``"inf"`` -> inf, None -> nan)."""
  if x is None:
    return float("nan")
  return float(x)


def _policy_label(sc: dict, name: str) -> str:
  """A policy's label with what was tuned for it on the calibration seeds."""
  tuned = sc.get("tuned", {})
  if name in ("deadline", "fedbuff", "full") and name in tuned:
    chosen = tuned[name]["chosen"]
    return f"{name} = {chosen}" if name == "full" else f"{name} ({chosen.split('[', 1)[-1].rstrip(']')})"
  return name


def _ratio_rows(sc: dict, policies) -> list[tuple[str, float, float, float, str]]:
  rows = []
  for p in policies:
    r = sc["policies"][p]["ratio_vs_none"]
    rows.append((p, _val(r["median"]), _val(r["ci95"][0]), _val(r["ci95"][1]), sc["policies"][p].get("verdict_vs_none", "")))
  return rows


def tta_ratios(doc: dict, note: str | None = None, ablations: bool = True):
  """Time-to-accuracy speedup over ``none`` (none's task-set TTA / the policy's, paired by
  evaluation seed) of every policy in every scenario of an evidence document: the median over
  seeds (dot) and its 95% bootstrap interval (bar). Right of 1 is faster; a verdict
  ("faster", "slower") holds only where the interval excludes 1. A ratio past the axis
  (``"inf"``: none never reached its targets within the horizon, the policy did) is an arrow at
  the edge; 0 means the policy never reached them. ``full``'s ablation variants are hollow."""
  scs = doc["scenarios"]
  names = [[p for p in sc["policies"] if p != "none" and (ablations or not p.startswith("full["))] for sc in scs]
  n = max(len(x) for x in names)
  finite = [v for sc, pols in zip(scs, names) for _, m, lo, hi, _ in _ratio_rows(sc, pols)
            for v in (m, lo, hi) if np.isfinite(v)]
  edge = 1.15 * max(finite + [2.0])
  fig, ax = plt.subplots(1, len(scs), figsize=(5.2 * len(scs) + 1.0, 0.42 * n + 1.9), squeeze=False)
  for a, sc, pols in zip(ax[0], scs, names):
    for i, (p, m, lo, hi, verdict) in enumerate(_ratio_rows(sc, pols)):
      base = p.split("[")[0]
      color = POLICY_COLORS.get(base, "#444444")
      hollow = p.startswith("full[")
      if np.isnan(m):
        a.text(0.02, i, "undefined (no seed reached)", va="center", fontsize=7, transform=a.get_yaxis_transform())
        continue
      lo_c, hi_c, m_c = min(lo, edge), min(hi, edge), min(m, edge)
      a.plot([lo_c, hi_c], [i, i], c=color, lw=2)
      a.plot(m_c, i, ">" if m >= edge else "o", c=color, mfc="white" if hollow else color, ms=7)
      if hi > edge:
        a.annotate("", (edge, i), (edge * 0.93, i), arrowprops={"arrowstyle": "->", "color": color})
      a.text(1.01, i, verdict, va="center", fontsize=7, transform=a.get_yaxis_transform())
    a.axvline(1.0, c="k", lw=0.8, ls="--")
    a.set_xlim(0, edge * 1.02)
    a.set_yticks(range(len(pols)), [_policy_label(sc, p) for p in pols], fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("speedup in time to accuracy vs none\n(none's TTA / policy's; > 1: faster)")
    a.set_title(f"{sc['name']} ({len(doc.get('seeds', []))} seeds)", fontsize=9)
  _title(fig, "Time to accuracy: median over seeds, 95% bootstrap interval", doc["device"], note)
  fig.tight_layout(rect=(0, 0, 0.93, 1))
  return fig


def _sweep_points(doc: dict) -> list[dict]:
  """The scenarios of the heterogeneity sweep's task mix, least heterogeneous first (lognormal
  fleets by their sigma, then device traces)."""
  if not doc.get("sweep"):
    return []
  tasks = doc["sweep"][0]["scenario"]["tasks"]
  pts = [s for s in doc["scenarios"] + doc["sweep"] if s["scenario"]["tasks"] == tasks]
  return sorted(pts, key=lambda s: (s["scenario"].get("trace") is not None, s["scenario"]["speed_sigma"]))


def heterogeneity_sweep(doc: dict, note: str | None = None):
  """Time-to-accuracy speedup over ``none`` (median, 95% bootstrap interval) of every policy
  against the fleet's heterogeneity: the sweep's scenarios and the main scenarios of the same
  task mix, from the least heterogeneous devices to the most (then real device traces)."""
  pts = _sweep_points(doc)
  pols = [p for p in pts[0]["policies"] if p != "none" and all(p in s["policies"] for s in pts)] if pts else []
  fig, a = plt.subplots(figsize=(7.5, 3.6))
  x = np.arange(len(pts))
  wd = 0.7 / max(1, len(pols))
  for k, p in enumerate(pols):
    rows = [_ratio_rows(s, [p])[0] for s in pts]
    off = x + (k - (len(pols) - 1) / 2) * wd
    med = np.array([r[1] for r in rows])
    err = np.array([[max(0.0, r[1] - r[2]) for r in rows], [max(0.0, r[3] - r[1]) for r in rows]])
    ok = np.isfinite(med) & np.all(np.isfinite(err), axis=0)
    ls, mk = POLICY_STYLES.get(p, ("-", "o"))
    a.errorbar(off[ok], med[ok], yerr=err[:, ok], fmt=mk, ls=ls, capsize=3, color=POLICY_COLORS.get(p), label=p)
    for j in np.flatnonzero(~ok):
      a.annotate("inf" if med[j] == np.inf or np.isinf(rows[j][3]) else "n/a", (off[j], 1.0), fontsize=7,
                 ha="center", color=POLICY_COLORS.get(p))
  a.axhline(1.0, c="k", lw=0.8, ls="--", label="none")
  a.set_xticks(x, [f"{s['scenario'].get('heterogeneity') or s['name']}\n({s['name']})" for s in pts], fontsize=8)
  a.set_xlabel("device heterogeneity (speed and bandwidth spread of the fleet)")
  a.set_ylabel("TTA speedup vs none")
  _title(fig, "Speedup vs device heterogeneity (median, 95% bootstrap interval)", doc["device"], note)
  _legend_outside(fig, a, right=0.8)
  return fig


def read_runs(root, paths) -> list[dict]:
  """Recorded runs (gzip JSON: ``history`` rows and the ``evaluations`` grid) at ``paths``
  relative to ``root``, e.g. an evidence policy's ``runs``."""
  import gzip
  import json
  from pathlib import Path
  out = []
  for p in paths:
    with gzip.open(Path(root) / p, "rt") as f:
      out.append(json.load(f))
  return out


def evidence_accuracy(doc: dict, root, scenarios=None, policies=None, points: int = 40, note: str | None = None):
  """Accuracy against virtual time per task (columns) and scenario (rows) of an evidence
  document, read from its ``runs/`` under ``root``: per policy the median over the evaluation
  seeds, with the 95% bootstrap interval of that median as a band (as :func:`accuracy_bands`);
  dotted: each task's target. ``scenarios``: names (default: the main scenarios);
  ``policies``: names (default per scenario: ``none``, its best baseline and ``full``)."""
  scs = [s for s in doc["scenarios"] + doc.get("sweep", [])
         if (s["name"] in scenarios if scenarios else s in doc["scenarios"])]
  cols = max(len(s["scenario"]["tasks"]) for s in scs)
  fig, ax = plt.subplots(len(scs), cols, figsize=(3.3 * cols + 2.4, 2.45 * len(scs) + 0.9), squeeze=False)
  for row, sc in zip(ax, scs):
    pols = policies or list(dict.fromkeys(("none", sc["best_baseline"], "full")))
    runs = {p: read_runs(root, sc["policies"][p]["runs"]) for p in pols if p in sc["policies"]}
    for a, t in zip(row, sc["scenario"]["tasks"]):
      _bands(a, runs, t, points, sc.get("targets"))
      a.set_title(f"{sc['name']}: {t}", fontsize=9)
    for a in row[len(sc["scenario"]["tasks"]):]:
      a.set_visible(False)
  _title(fig, f"Accuracy vs virtual time: median over {len(doc.get('seeds', []))} seeds, band: 95% bootstrap "
              "interval of the median", doc["device"], note)
  _legend_outside(fig, ax, right=1 - 2.3 / fig.get_figwidth())
  return fig


def evidence_table(doc: dict) -> str:
  """A markdown table per scenario: each policy's TTA speedup over ``none`` and over the best
  baseline (median [95% interval], verdict), its plateau accuracy change against ``none``, and
  work beyond the clients' nominal epochs (never a gain)."""

  def ci(s, fmt=".2f"):
    if s.get("median") is None:
      return "undefined"
    m, (lo, hi) = _val(s["median"]), (_val(v) for v in s["ci95"])
    return f"{m:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"

  out = []
  for sc in doc["scenarios"] + doc.get("sweep", []):
    out.append(f"**{sc['name']}** (targets {', '.join(f'{t} {v:.3f}' for t, v in sc['targets'].items())}; "
               f"horizon {sc['horizon_s']:.1f} virtual s; best baseline on the calibration seeds: "
               f"{sc['best_baseline']})\n")
    out.append("| policy | TTA speedup vs none | vs best baseline | plateau change vs none | work beyond nominal (s) |")
    out.append("| --- | --- | --- | --- | --- |")
    for p, v in sc["policies"].items():
      if p == "none":
        continue
      plateau = "; ".join(f"{t} {ci(s, '+.3f')}" for t, s in v["plateau_vs_none"].items())
      out.append(f"| {_policy_label(sc, p)} | {ci(v['ratio_vs_none'])} {v['verdict_vs_none']} | "
                 f"{ci(v['ratio_vs_best_baseline'])} {v['verdict_vs_best_baseline']} | {plateau} | "
                 f"{ci(v['work_beyond_nominal_s'], '.3g')} |")
    out.append("")
  return "\n".join(out)


def find_recorded(filename: str, env: str | None = None, start=None):
  """Where a recording's ``filename`` is: ``$<env>`` when set (the file, or the folder holding
  it), else the newest ``data/recorded/<device>/<filename>`` in the first folder at or above
  ``start`` (default: the working directory) that has ``data/recorded``; None if there is none."""
  import os
  from pathlib import Path
  if env and os.environ.get(env):
    p = Path(os.environ[env])
    p = p / filename if p.is_dir() else p
    return p if p.exists() else None
  here = Path(start or Path.cwd()).resolve()
  for folder in (here, *here.parents):
    rec = folder / "data" / "recorded"
    if rec.is_dir():
      found = sorted(rec.glob(f"*/{filename}"), key=lambda p: p.stat().st_mtime)
      return found[-1] if found else None
  return None


def load_evidence(start=None) -> tuple[dict | None, object]:
  """The federated evidence to draw: ``evidence.json`` of ``$MTFL_EVIDENCE`` (a file, its
  folder, or a ``reproduce --out`` folder holding ``raw/evidence/``), else the newest recording's ``raw/evidence/evidence.json`` (kept beside its runs), else
  a ``data/recorded/<device>/evidence.json`` (see :func:`find_recorded`); and the folder its
  ``runs/`` paths are relative to. ``(None, None)`` when none is recorded."""
  import json
  import os
  if os.environ.get("MTFL_EVIDENCE"):  # a file, an evidence folder, or a reproduce --out folder
    path = (find_recorded("evidence.json", "MTFL_EVIDENCE", start)
            or find_recorded("raw/evidence/evidence.json", "MTFL_EVIDENCE", start))
  else:
    path = find_recorded("raw/evidence/evidence.json", None, start) or find_recorded("evidence.json", None, start)
  if path is None:
    return None, None
  return json.loads(path.read_text()), path.parent


# --------------------------------------------------------------------------- light notebooks
def compact_png(fig, colors: int = 256) -> bytes:
  """``fig`` as a PNG with a palette of at most ``colors`` colours, cropped as Jupyter crops
  (``bbox_inches="tight"``). A plot uses few colours, so it looks the same in a third of the
  bytes or less of a full-colour PNG: committed notebooks stay light to read on GitHub."""
  import io

  from PIL import Image
  raw = io.BytesIO()
  fig.savefig(raw, format="png", bbox_inches="tight")
  out = io.BytesIO()
  Image.open(io.BytesIO(raw.getvalue())).convert("RGB").quantize(colors).save(out, format="png", optimize=True)
  return out.getvalue()


def use_compact_png(colors: int = 256, shell=None) -> bool:
  """Makes IPython show matplotlib figures as :func:`compact_png` (call it after
  ``%matplotlib inline``); False outside IPython."""
  from matplotlib.figure import Figure
  if shell is None:
    try:
      from IPython import get_ipython
    except ImportError:
      return False
    shell = get_ipython()
  if shell is None:
    return False
  shell.display_formatter.formatters["image/png"].for_type(Figure, lambda fig: compact_png(fig, colors))
  return True
