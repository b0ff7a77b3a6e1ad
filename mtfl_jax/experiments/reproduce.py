"""``python -m mtfl_jax reproduce``: the paper's six experiments, figures and a report.

Experiments write their JSON under ``OUT/raw/`` when they finish; a rerun reuses every
finished experiment (same mode) and recomputes only the rest, so an interrupted run loses
nothing. Figures are drawn from the JSON: ``--from-recorded`` redraws them from a recorded
run (for example a GPU run kept under ``data/recorded/``) without measuring anything.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

from mtfl_jax.experiments.paper import PAPER, fl_gain_text, speedup_text
from mtfl_jax.device import device_name, device_slug
from mtfl_jax.files import check_writable, read_json, reading, write_json


@dataclasses.dataclass(frozen=True)
class ReproConfig:
  mode: str
  profile_tasks: tuple = ("digits_mlp", "mnist_lenet", "cifar_resnet", "shapes_unet")
  profile_repeats: int = 20
  # the co-scheduling benchmark: its mode (bench_cosched.config), and fields that replace the
  # mode's where not None
  cosched_mode: str = "quick"
  cosched_scenarios: tuple | None = None
  cosched_regimes: tuple | None = None  # scenarios.Regime values
  cosched_total_s: float | None = None  # solo work per round
  repeats: int | None = None  # fresh interleaved co-scheduling repeats (medians and intervals)
  cosched_search_repeats: int | None = None
  vr_tasks: tuple = ("digits_mlp", "mnist_lenet", "shapes_unet")
  vr_grid: tuple = (0.2, 0.5, 1.0)
  evidence_mode: str | None = None  # mtfl_jax.experiments.evidence.config's mode (None: this mode)
  clock_backend: str = "processes"  # where the federated clock's model is calibrated
  evidence_dir: str = "results/raw/evidence"  # where its runs are kept (set by reproduce)


def config(mode: str) -> ReproConfig:
  if mode == "quick":
    return ReproConfig("quick")
  if mode == "full":
    return ReproConfig("full", profile_repeats=50, cosched_mode="full", vr_grid=(0.1, 0.25, 0.5, 0.75, 1.0))
  if mode == "tiny":  # for tests: every code path, seconds of measurement
    return ReproConfig("tiny", profile_tasks=("digits_mlp", "mnist_lenet"), profile_repeats=3, cosched_mode="tiny",
                       vr_tasks=("digits_mlp", "mnist_lenet"), vr_grid=(0.3, 1.0))
  raise ValueError(f"unknown mode {mode!r}; valid: quick, full, tiny")


# --------------------------------------------------------------------------- experiments
def exp_workloads(cfg: ReproConfig, seed: int, log) -> dict:
  from mtfl_jax.federated import FedConfig, build_federation
  from mtfl_jax.profiling import profile_tasks
  from mtfl_jax.tasks import OFFLINE_TASKS
  profs = profile_tasks(cfg.profile_tasks, repeats=cfg.profile_repeats)
  part_tasks = tuple(t for t in cfg.profile_tasks if t in OFFLINE_TASKS)
  fed = build_federation(FedConfig(tasks=part_tasks, num_clients=10, clients_per_round=10, alpha=0.5,
                                   presence=0.7, seed=seed))
  step = {p.task: p.step_time_s for p in profs}
  w = [[fed.workloads(c)[t] for t in part_tasks] for c in range(10)]
  solo = [[w[c][i] * step[t] for i, t in enumerate(part_tasks)] for c in range(10)]
  for p in profs:
    log(f"  {p.task}: {p.step_time_s * 1e3:.2f} ms/step, {p.flops_per_step / 1e6:.1f} MFLOP, "
        f"{100 * p.peak_fraction:.1f}% of peak ({p.data})")
  return {"device": device_name(), "profiles": [p.to_json() for p in profs], "partition_tasks": list(part_tasks),
          "client_workload_steps": w, "client_solo_work_s": solo, "alpha": 0.5, "presence": 0.7, "seed": seed}


def exp_cosched(cfg: ReproConfig, seed: int, log) -> dict:
  from mtfl_jax.experiments.bench_cosched import bench_cosched
  return bench_cosched(cfg.cosched_mode, scenarios=cfg.cosched_scenarios, regimes=cfg.cosched_regimes,
                       total_s=cfg.cosched_total_s, repeats=cfg.repeats, search_repeats=cfg.cosched_search_repeats,
                       log=log)


def exp_vresource(cfg: ReproConfig, seed: int, log) -> dict:
  from mtfl_jax.experiments.bench_cosched import measure_vr_curves
  return measure_vr_curves(cfg.vr_tasks, cfg.vr_grid, log=log)


def exp_evidence(cfg: ReproConfig, seed: int, log) -> dict:
  """The federated evidence (time to accuracy over seeds; :mod:`mtfl_jax.experiments.evidence`):
  its seeds are fixed sets (evaluation and calibration), whatever ``seed``; its runs are kept
  under ``raw/evidence/`` so that an interrupted recording resumes run by run."""
  from mtfl_jax.experiments import evidence
  ec = dataclasses.replace(evidence.config(cfg.evidence_mode or cfg.mode), clock_backend=cfg.clock_backend)
  return evidence.run_evidence(ec, Path(cfg.evidence_dir), log=log)


EXPERIMENTS = {"workloads": exp_workloads, "cosched": exp_cosched, "vresource": exp_vresource,
               "evidence": exp_evidence}
FIGURE_SOURCES = {"fig1_workloads": "workloads", "fig2_sharing": "cosched", "fig3_vresource": "vresource",
                  "fig4_intra": "cosched", "fig5_time_to_accuracy": "evidence", "fig6_accuracy": "evidence"}
# A recording made before the evidence experiment holds federated.json (FL throughput at an
# equal budget, one seed) instead: it still redraws, and its report says what it is.
LEGACY = {"evidence": "federated"}


# --------------------------------------------------------------------------- report
def _spread(values) -> str:
  return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else "1 run"


def _ci(summary: dict, fmt: str = ".2f", unit: str = "") -> str:
  from mtfl_jax.experiments.bench_cosched import interval_text
  return interval_text(summary, fmt, unit)


def _short(cs: dict, rg: str) -> str:
  """A regime's short name in the report: the "(a)" / "(b)" of its label, else its key."""
  label = cs["regimes"][rg]["label"]
  return label.split(" ")[0] if label.startswith("(") else rg


def _most_imbalanced(cs: dict) -> dict:
  return max(cs["scenarios"], key=lambda s: max(s["work"]) / min(s["work"]))


def _cosched_rows(cs: dict) -> tuple[dict, str, dict]:
  """fig2's and fig4's rows, and fig3's makespan-error text, from the co-scheduling benchmark's
  medians and 95% intervals (fresh, paired repeats; searched plans re-measured)."""
  if not all("regimes" in s for s in cs["scenarios"]):
    return _legacy_cosched_rows(cs)
  arms = [(s, rg, arm) for s in cs["scenarios"] for rg, arm in s["regimes"].items()]
  n = f"{cs['repeats']} fresh interleaved paired repeats per plan"
  fig2 = {"figure": "fig2_sharing",
          "headline": "training speedup vs sequential per regime, median [95% interval]; searched plans re-measured on "
                      "fresh repeats ('search': their number in their own search rounds, biased up)",
          "ours": "; ".join(
              f"{s['name']} {_short(cs, rg)}: competitive {_ci(a['speedup_vs_sequential']['competitive'], unit='x')}, "
              + ", ".join(f"{p} {_ci(a['searched'][p]['fresh_speedup'], unit='x')} (search "
                          f"{float(a['searched'][p]['search_speedup']['median']):.2f}x)" for p in ("auto", "grid_best"))
              + f"; C = sum r_i {_ci(a['capacity'])}" for s, rg, a in arms),
          "paper": speedup_text(), "device": cs["device"],
          "spread": f"95% bootstrap intervals; {n}; searches on {cs['search_repeats']} rounds of their own",
          "note": "regimes: " + "; ".join(f"{v['label']} on {v['backend']}" for v in cs["regimes"].values())
                  + f". {cs['gpu_regime'][0].upper() + cs['gpu_regime'][1:]}. "
                  + (_probe_text(cs["probe"]) + ". " if cs.get("probe") else "")
                  + f"Paper's {speedup_text()} was on a GPU."}
  err = "; makespan error (competitive, predicted / measured - 1) " + ", ".join(
      f"{s['name']} {_short(cs, rg)} {_ci(a['prediction_error']['competitive'], '+.0%')}" for s, rg, a in arms)
  heavy = _most_imbalanced(cs)
  fin = lambda a, p: ", ".join(f"{t} {a['finish_times_s'][p][t]['median']:.2f}s" for t in heavy["tasks"])  # noqa: E731
  fig4 = {"figure": "fig4_intra",
          "headline": f"competitive vs equal shares, most imbalanced mix ({heavy['name']}): equal / competitive "
                      "makespan, median [95% interval]",
          "ours": "; ".join(f"{_short(cs, rg)} {_ci(a['competitive_vs_equal'])}: {a['competitive_vs_equal']['verdict']}"
                            for rg, a in heavy["regimes"].items()),
          "paper": "weighted > equal (no number)", "device": cs["device"], "spread": f"95% paired bootstrap; {n}",
          "note": "; ".join(f"{_short(cs, rg)} median finish times equal: {fin(a, 'equal')}; competitive: "
                            f"{fin(a, 'competitive')}; model predicted competitive "
                            f"{a['plans']['competitive']['predicted_makespan_s']:.2f}s (error "
                            f"{_ci(a['prediction_error']['competitive'], '+.0%')})"
                            for rg, a in heavy["regimes"].items())}
  return fig2, err, fig4


def _probe_text(probe: dict) -> str:
  return (f"Busy threads of {probe['task']} alone in a worker: " + ", ".join(
      f"{k.replace('_', ' ')} {v['solo_threads']['busy_threads']}" for k, v in probe["variants"].items()))


# ---- recordings made before the regimes and intervals (kept so that they still redraw)
def _ratio(s: dict, num: str, den: str) -> float:
  return s["makespan_s"][num] / s["makespan_s"][den]


def _legacy_cosched_rows(cs: dict) -> tuple[dict, str, dict]:
  heavy = max(cs["scenarios"], key=lambda s: max(s["solo_work_s"].values()) / min(s["solo_work_s"].values()))
  fig2 = {"figure": "fig2_sharing", "headline": "training speedup vs sequential (median makespans), best backend",
          "ours": "; ".join(f"{s['name']} ({s['backend']}): " + ", ".join(
              f"{p} {_ratio(s, 'sequential', p):.2f}x" for p in ("competitive", "auto", "grid_best")
              if p in s["makespan_s"]) for s in cs["scenarios"]),
          "paper": speedup_text(), "device": cs["device"],
          "spread": "; ".join(f"{s['name']} competitive {_spread(s['speedup_vs_sequential_spread'])}"
                              for s in cs["scenarios"]) + f" ({cs.get('repeats', 1)} interleaved repeats)",
          "note": _sharing_note(cs)}
  err = "; makespan error " + ", ".join(f"{s['name']} {100 * s['prediction_error']:+.0f}%" for s in cs["scenarios"])
  fig4 = {"figure": "fig4_intra",
          "headline": "competitive vs equal shares, most imbalanced mix (equal / competitive makespan)",
          "ours": f"{heavy['speedup_vs_equal']:.2f}x ({heavy['name']}, {heavy['backend']})",
          "paper": "weighted > equal (no number)", "device": cs["device"],
          "spread": _spread(heavy.get("speedup_vs_equal_spread", [heavy["speedup_vs_equal"]])),
          "note": _intra_note(heavy)}
  return fig2, err, fig4


def _sharing_note(cs: dict) -> str:
  """fig2's note, from the measured medians: capacity, and how each plan fares against the
  grid's best and against equal."""
  parts = []
  for s in cs["scenarios"]:
    b = s["backend"]
    sp = s.get("spread", {}).get(b, {})
    if "auto" not in s["makespan_s"]:  # a recording from before auto / grid_best
      parts.append(f"{s['name']} on {b}: capacity C = {s['capacity'][b]:.2f}; competitive / equal "
                   f"{_ratio(s, 'competitive', 'equal'):.2f}")
      continue
    rng = lambda p: f" (spread {sp[p][0]:.2f}-{sp[p][1]:.2f}s)" if p in sp else ""  # noqa: E731
    parts.append(f"{s['name']} on {b}: capacity C = {s['capacity'][b]:.2f}; medians sequential "
                 f"{s['makespan_s']['sequential']:.2f}s{rng('sequential')}, equal {s['makespan_s']['equal']:.2f}s"
                 f"{rng('equal')}, competitive {s['makespan_s']['competitive']:.2f}s{rng('competitive')}, auto "
                 f"{s['makespan_s']['auto']:.2f}s, grid_best {s['makespan_s']['grid_best']:.2f}s; auto / grid_best "
                 f"{s['vs_grid_best']['auto']:.2f}, competitive / equal {_ratio(s, 'competitive', 'equal'):.2f}")
  return ". ".join(parts) + f". Paper's {speedup_text()} was on a GPU."


def _intra_note(s: dict) -> str:
  """fig4's note: the measured per-task finish times under equal and competitive shares."""
  ft = s["finish_times_s"]
  fin = lambda p: ", ".join(f"{t} {v:.2f}s" for t, v in ft[p].items())  # noqa: E731
  return (f"finish times (median run) equal: {fin('equal')}; competitive: {fin('competitive')}; "
          f"competitive / equal makespan {_ratio(s, 'competitive', 'equal'):.2f} "
          f"(per-repeat equal/competitive {_spread(s.get('speedup_vs_equal_spread', [s['speedup_vs_equal']]))}); "
          f"model predicted competitive {s['predicted_makespan_s']['competitive']:.2f}s "
          f"({100 * s['prediction_error']:+.0f}% vs measured)")


def _fed_throughput_note(fd: dict) -> str:
  """What the fig5 numbers come from, computed from the run's own measurements."""
  parts = []
  for s in fd["scenarios"]:
    g, idle = s["gain"], s["idle_fraction"]
    corr = s.get("clock", {}).get("corrections", {}).get("detail", {})
    err = [abs(v) for m in corr.values() for v in m["model_error"].values()]
    cve = [(m["competitive_vs_equal_measured"], m["competitive_vs_equal_predicted"]) for m in corr.values()]
    parts.append(
        f"{s['name']}: full/deadline {g['vs_deadline']:.2f}x, deadline/none {g['deadline']:.2f}x; idle share of "
        f"client time none {100 * idle['none']:.0f}% -> full {100 * idle['full']:.0f}%; "
        + (f"model's makespan error on {len(corr)} measured mix(es) up to {100 * max(err):.0f}%, measured "
           f"equal/competitive makespan " + ", ".join(f"{m:.2f} (model {p:.2f})" for m, p in cve)
           + f"; clock on measured mixes for {100 * s['clock_measured_fraction']['full']:.0f}% of full's client-rounds"
           if corr else "no measured mix: intra part modelled only"))
  return ("work = steps x solo step time; intra part from the clock (model, corrected by measured co-runs), "
          "inter part from lognormal device speeds (modelled, not tuned). " + "; ".join(parts))


def _sooner(none_s: float, full_s: float) -> str:
  """How much sooner full reached the target than none (or how much later: never "0.87x sooner")."""
  if full_s <= none_s:
    return f"{none_s / full_s:.2f}x sooner"
  return f"{full_s / none_s:.2f}x later"


def _fed_accuracy_note(fd: dict) -> str:
  parts = []
  for s in fd["scenarios"]:
    tt, r = s["time_to_target_s"], s["rounds_run"]
    per = []
    for t in s["tasks"]:
      a, b = tt["none"][t], tt["full"][t]
      per.append(f"{t} " + (_sooner(a, b) if a and b else "full never reached it" if a else
                            f"none never reached it, full at {b:.1f}s" if b else "neither reached it"))
    parts.append(f"{s['name']} (budget {s['time_budget_s']:.1f}s; rounds none {r['none']}, deadline "
                 f"{r['deadline']}, full {r['full']}): " + ", ".join(per))
  return "time to 90% of none's accuracy at the budget, full vs none: " + "; ".join(parts)


def _legacy_federated_rows(fd: dict) -> list[dict]:
  """fig. 5/6 rows of a recording made before the evidence experiment (one seed, FL throughput)."""
  gains = {s["name"]: s["gain"] for s in fd["scenarios"]}
  old = " (an older recording: one seed, work throughput at an equal budget; not evidence)"
  return [
      {"figure": "fig5_time_to_accuracy",
       "headline": "FL throughput (work per virtual second), full vs none; vs deadline" + old,
       "ours": ", ".join(f"{n} {g['total']:.2f}x; {g['vs_deadline']:.2f}x deadline" for n, g in gains.items()),
       "paper": fl_gain_text() + " (FL throughput)", "device": fd["device"], "spread": "one seed",
       "note": _fed_throughput_note(fd)},
      {"figure": "fig6_accuracy", "headline": "accuracy at an equal virtual-time budget, none -> full" + old,
       "ours": "; ".join(f"{s['name']}: " + ", ".join(
           f"{t} {s['accuracy_at_budget']['none'][t]:.3f}->{s['accuracy_at_budget']['full'][t]:.3f}"
           for t in s["tasks"]) for s in fd["scenarios"]),
       "paper": "accuracy kept", "device": fd["device"], "spread": "one seed", "note": _fed_accuracy_note(fd)}]


def _ratio_text(r: dict) -> str:
  f = lambda v: "never" if v is None else ("inf" if v == "inf" else f"{float(v):.2f}")  # noqa: E731
  return f"{f(r['median'])}x [{f(r['ci95'][0])}, {f(r['ci95'][1])}]"


def _evidence_rows(ev: dict) -> list[dict]:
  """fig. 5/6 rows from the evidence: time to accuracy and plateaus, with intervals."""
  n = len(ev["seeds"])
  tta, acc = [], []

  def full_vs(s):
    full = s["policies"]["full"]
    return (f"{s['name']}: full vs none {_ratio_text(full['ratio_vs_none'])} ({full['verdict_vs_none']}), vs best "
            f"baseline {s['best_baseline']} {_ratio_text(full['ratio_vs_best_baseline'])} "
            f"({full['verdict_vs_best_baseline']})")
  for s in ev["scenarios"]:
    pol = s["policies"]
    tta.append(full_vs(s))
    acc.append(f"{s['name']}: " + ", ".join(
        f"{t} {pol['full']['plateau_vs_none'][t]['median']:+.3f} "
        f"[{pol['full']['plateau_vs_none'][t]['ci95'][0]:+.3f}, {pol['full']['plateau_vs_none'][t]['ci95'][1]:+.3f}]"
        for t in s["targets"]))
  others = "; ".join(f"{s['name']}: " + ", ".join(f"{p} {_ratio_text(v['ratio_vs_none'])}"
                                                   for p, v in s["policies"].items() if p not in ("none", "full")
                                                   and "[" not in p) for s in ev["scenarios"])
  smoke = "" if ev["mode"] == "full" else f" A '{ev['mode']}' run: a smoke test of the code paths, not evidence."
  if not ev.get("complete", True):  # a recording stopped part-way: say which scenarios it holds
    smoke += (" A partial recording: only the scenarios " + ", ".join(s["name"] for s in ev["scenarios"])
              + (" and no heterogeneity sweep" if not ev.get("sweep") else "") + " were recorded.")
  return [
      {"figure": "fig5_time_to_accuracy",
       "headline": "time to accuracy of the task set (every task at its target), speedup over none (paired; median "
                   "[95% interval])",
       "ours": "; ".join(tta), "paper": fl_gain_text() + " FL throughput (a different metric; ours is a diagnostic)",
       "device": ev["device"], "spread": f"{n} evaluation seeds, paired; targets from calibration seeds "
                                          f"{ev['calibration_seeds']}",
       "note": "other policies vs none: " + others + "."
               + (" Heterogeneity sweep: " + "; ".join(full_vs(s) for s in ev["sweep"]) + "." if ev.get("sweep") else "")
               + smoke},
      {"figure": "fig6_accuracy", "headline": "plateau accuracy, full minus none (median [95% interval])",
       "ours": "; ".join(acc), "paper": "accuracy kept", "device": ev["device"], "spread": f"{n} seeds",
       "note": "accuracy kept means the interval holds 0." + smoke}]


def summarize(raw: dict) -> dict:
  """Headline numbers of each figure, beside the paper's."""
  wl, cs, vr, fd = raw["workloads"], raw["cosched"], raw["vresource"], raw["evidence"]
  steps = [p["step_time_s"] for p in wl["profiles"]]
  fig2, fig3_err, fig4 = _cosched_rows(cs)
  rows = [
      {"figure": "fig1_workloads", "headline": "step-time spread across tasks (max/min)",
       "ours": f"{max(steps) / min(steps):.0f}x", "paper": "'highly imbalanced' (no number)",
       "device": wl["device"], "spread": "1 run",
       "note": "peak fractions " + ", ".join(f"{p['task']} {100 * p['peak_fraction']:.0f}%" for p in wl["profiles"])},
      fig2,
      {"figure": "fig3_vresource", "headline": "virtual-resource model error",
       "ours": f"mean |r_pred - r_meas| = {vr['mean_abs_error']:.3f}" + fig3_err,
       "paper": "not given", "device": vr["device"],
       "spread": "curves: 1 run" + ("; makespan errors: [95% interval] over the fresh co-scheduling repeats"
                                   if "regimes" in cs else ""),
       "note": f"model: demand water-filling fitted from one equal-share co-run (C = {vr['capacity']:.2f})"},
      fig4,
  ] + (_legacy_federated_rows(fd) if "work_throughput" in fd["scenarios"][0] else _evidence_rows(fd))
  return {"device": device_name(), "paper": PAPER, "rows": rows, "simulator": fd.get("simulator"),
          "modes": {k: v.get("mode") for k, v in raw.items()}}


def write_report(out: Path, summary: dict, header: str) -> Path:
  lines = ["# mtfl_jax: reproduction report", "", header, "",
           "| figure | headline number | ours | paper | measured on | spread over repeats | note |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in summary["rows"]:
    lines.append(f"| [{r['figure']}]({r['figure']}.png) | {r['headline']} | {r['ours']} | {r['paper']} | "
                 f"{r['device']} | {r['spread']} | {r['note']} |")
  sim = summary.get("simulator")
  if sim:
    lines += ["", "Simulator speed (our own wall time, not the virtual clock), per round of client work:"]
    for s in sim["per_task"]:
      lines.append(f"- {s['clients']} clients x {s['local_steps']} steps of {s['task']}: per-client loop "
                   f"{s['loop_s'] * 1e3:.1f} ms, auto ({s['auto_mode']}) {s['auto_s'] * 1e3:.1f} ms: {s['speedup']:.1f}x")
  lines += ["", "Each figure's numbers are in the JSON of the same name. Wall-clock ratios come from runs made "
            "side by side in one process on one machine; virtual-clock and accuracy numbers are deterministic "
            "for a seed."]
  path = out / "REPORT.md"
  path.write_text("\n".join(lines) + "\n")
  return path


# --------------------------------------------------------------------------- the command
MAX_SEED = 2**32 - 1  # numpy's and JAX's seeds both take 32 bits whole


def _finished_experiments(raw_dir: Path, mode: str, seed: int) -> dict:
  """The experiments a rerun into ``raw_dir`` reuses; a ``FileExistsError`` when one of them
  holds another mode or seed (checked for all of them before anything is measured)."""
  done = {}
  for n in EXPERIMENTS:
    path = raw_dir / f"{n}.json"
    if not path.exists():
      continue
    doc = read_json(path, "finished experiment", "delete it to re-measure this experiment (the others are kept)",
                    fields=("device",))
    if doc.get("repro_mode") != mode or doc.get("seed") != seed:
      raise FileExistsError(f"{path} holds a '{doc.get('repro_mode')}' run with seed {doc.get('seed')}; use another "
                            f"--out for mode '{mode}', seed {seed} (nothing was overwritten, nor measured)")
    done[n] = doc
  return done


def recorded_dir(device: str | None = None) -> Path:
  from mtfl_jax.data import default_data_dir
  return default_data_dir().parent / "recorded" / device_slug(device)


def reproduce(out: str | Path = "results", quick: bool = True, mode: str | None = None,
              from_recorded: str | Path | None = None, seed: int = 0, log=print) -> dict:
  """Runs (or redraws) the six experiments into ``out``; returns the summary."""
  from tqdm.auto import tqdm
  if "matplotlib.pyplot" not in sys.modules:  # only files are drawn: no window, no display needed
    import matplotlib
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from mtfl_jax.plotting import FIGURES
  mode = mode or ("quick" if quick else "full")
  cfg = config(mode)  # an unknown mode fails here
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
    raise ValueError(f"seed (--seed) must be an integer between 0 and {MAX_SEED}, got {seed!r}")
  out = check_writable(out, "--out", directory=True)
  raw_dir = out / "raw"
  if not from_recorded:
    finished = _finished_experiments(raw_dir, mode, seed)  # before any work: another run's files refuse
  raw_dir.mkdir(parents=True, exist_ok=True)
  cfg = dataclasses.replace(cfg, evidence_dir=str(raw_dir / "evidence"))
  raw, note = {}, None
  t0 = time.perf_counter()
  if from_recorded:
    src = Path(from_recorded)
    src = src / "raw" if (src / "raw").is_dir() else src
    name = {n: n if (src / f"{n}.json").exists() or n not in LEGACY else LEGACY[n] for n in EXPERIMENTS}
    missing = [n for n in EXPERIMENTS if not (src / f"{name[n]}.json").exists()]
    if missing:
      raise FileNotFoundError(f"{src} lacks recorded experiment(s) {missing}; expected files "
                              + ", ".join(f"{n}.json" for n in EXPERIMENTS)
                              + ("" if src.is_dir() else f" ({src} is a file, not a directory)" if src.exists()
                                 else f" ({src} does not exist)")
                              + f"; recorded runs here: {', '.join(map(str, recordings())) or 'none'}")
    for n in EXPERIMENTS:
      raw[n] = read_json(src / f"{name[n]}.json", "recorded experiment", "re-record it (python -m mtfl_jax reproduce "
                         "--out DIR) or restore it from git (git checkout -- PATH)", fields=("device",))
      if src.resolve() != raw_dir.resolve():
        shutil.copyfile(src / f"{name[n]}.json", raw_dir / f"{name[n]}.json")
    devices = sorted({d["device"] for d in raw.values()})
    note = f"redrawn from recorded data ({src}), measured on {', '.join(devices)}; nothing re-measured"
    header = f"**Redrawn from recorded data** in `{src}` (measured on {', '.join(devices)}); nothing was measured here."
    log(note)
  else:
    header = (f"Measured now on **{device_name()}**, mode `{mode}`, seed {seed}. "
              "Finished experiments found in `raw/` were reused.")
    log(f"reproduce ({mode}) on {device_name()}: measuring {', '.join(EXPERIMENTS)} into {out}")
    bar = tqdm(list(EXPERIMENTS), desc="experiments")
    for n in bar:
      bar.set_postfix_str(n)
      path = raw_dir / f"{n}.json"
      if n in finished:
        log(f"[{n}] reusing {path}")
        raw[n] = finished[n]
        continue
      log(f"[{n}]")
      doc = EXPERIMENTS[n](cfg, seed, lambda m: bar.write(m))
      doc["repro_mode"] = mode
      doc["seed"] = seed
      write_json(path, doc)
      raw[n] = doc
    bar.close()
  remedy = "re-record that experiment, or delete its JSON to re-measure it"
  for fig_name, fn in FIGURES.items():
    doc = raw[FIGURE_SOURCES[fig_name]]
    write_json(out / f"{fig_name}.json", doc)
    with reading(f"experiment {raw_dir / FIGURE_SOURCES[fig_name]}.json (drawing {fig_name})", remedy):
      fig = fn(doc, note)
    fig.savefig(out / f"{fig_name}.png", dpi=110)
    plt.close(fig)
  with reading(f"the experiments in {raw_dir}", remedy):
    summary = summarize(raw)
  summary["recorded_from"] = str(from_recorded) if from_recorded else None
  summary["wall_s"] = round(time.perf_counter() - t0, 1)
  write_json(out / "summary.json", summary)
  report = write_report(out, summary, header)
  log(report.read_text())
  return summary


def recordings() -> list[Path]:
  """Folders of recorded runs under ``data/recorded/`` (GPU ones first), each redrawable."""
  root = recorded_dir().parent
  dirs = [p for p in sorted(root.iterdir()) if (p / "raw").is_dir() or (p / "cosched.json").exists()] if root.is_dir() else []
  return sorted(dirs, key=lambda p: not p.name.startswith(("gpu", "cuda")))
