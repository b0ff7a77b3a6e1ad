"""The co-scheduling benchmark: policies and backends measured side by side in one run.

Each scenario is a task mix with a given imbalance of solo work ``W_i * s_i`` across its
tasks. Per scenario and concurrent backend: calibrate the model (one equal-share co-run),
plan ``equal``, ``partitioned`` and ``competitive`` from it, and search ``auto`` (the model's
candidates, measured) and ``grid_best`` (a small grid of shares, measured). Then every plan
and the sequential baseline are re-measured in ``repeats`` interleaved rounds (each round
runs every policy on every backend once, so drift hits all alike) and reported as the
median and spread (min, max). Makespans exclude compilation and worker start-up
(``setup_s``).

Example::

    out = bench_cosched(quick=True)
    s = out["scenarios"][0]
    s["makespan_s"]            # medians on the best backend: {"sequential": ..., "auto": ...}
    s["spread"]["threads"]     # {"equal": [min, max], ...}
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mtfl_jax.backends import Job, open_backend
from mtfl_jax.calibration import calibrate, solo_step_times
from mtfl_jax.cosched import check_memory, make_plan
from mtfl_jax.experiments.paper import PAPER
from mtfl_jax.experiments.scenarios import COSCHED_SCENARIOS, Scenario
from mtfl_jax.profiling import device_name
from mtfl_jax.results import write_json
from mtfl_jax.vresource import measured_rates

CONCURRENT = ("equal", "partitioned", "competitive", "auto", "grid_best")
POLICY_ORDER = ("sequential",) + CONCURRENT

def _round(x, n=4):
  return {k: round(float(v), n) for k, v in x.items()}


def grid_levels_within(levels: Sequence[float], free_tasks: int, max_size: int) -> tuple[float, ...]:
  """``levels`` without its smallest values until ``len(levels) ** free_tasks <= max_size``
  (1.0 always stays)."""
  levels = sorted(set(levels) | {1.0})
  while len(levels) > 1 and len(levels) ** free_tasks > max_size:
    levels = levels[1:]
  return tuple(levels)


def _median_run(runs):
  """The run whose makespan is the median (lower middle for an even count)."""
  order = sorted(runs, key=lambda r: r.makespan_s)
  return order[(len(order) - 1) // 2]


def run_scenario(sc: Scenario, total_s: float, backends: Sequence[str], repeats: int = 3,
                 grid: Sequence[float] = (0.25, 0.5, 1.0), grid_max: int = 9, search_repeats: int = 1,
                 log=print) -> dict:
  solo = solo_step_times(sc.tasks)
  wl = sc.workloads(solo, total_s)
  jobs = [Job(t, wl[t], seed=i) for i, t in enumerate(sc.tasks)]
  check_memory(jobs)
  levels = grid_levels_within(grid, len(jobs) - 1, grid_max)
  out = {"name": sc.name, "tasks": list(sc.tasks), "workloads": wl, "solo_step_s": _round(solo, 6),
         "solo_work_s": _round({t: wl[t] * solo[t] for t in sc.tasks}, 3), "repeats": repeats,
         "grid_levels": list(levels), "setup_s": {}, "search_s": {}}
  with contextlib.ExitStack() as stack:  # runners stay open: each compiles (or spawns) once
    seq = stack.enter_context(open_backend("sequential", jobs))
    out["setup_s"]["sequential"] = round(seq.setup_s, 2)
    seq.run()  # warm-up: first calls populate dispatch caches
    runners, models, plans = {}, {}, {}
    for b in backends:
      r = runners[b] = stack.enter_context(open_backend(b, jobs))
      m = models[b] = calibrate(r, warmup=True)  # the equal-share co-run
      t0 = time.perf_counter()
      plans[b] = {p: make_plan(p, jobs, m, r) for p in ("equal", "partitioned", "competitive")}
      plans[b]["auto"] = make_plan("auto", jobs, m, r, repeats=search_repeats)
      plans[b]["grid_best"] = make_plan("grid_best", jobs, m, r, repeats=search_repeats, levels=levels,
                                        max_size=grid_max)
      out["search_s"][b] = round(time.perf_counter() - t0, 1)
      out["setup_s"][b] = round(r.setup_s, 2)
      log(f"  [{sc.name}] {b}: C={m.capacity:.2f}; auto picked {_label(plans[b]['auto'])}, "
          f"grid_best {_label(plans[b]['grid_best'])} (search {out['search_s'][b]:.0f}s)")
    runs = {"sequential": []} | {(b, p): [] for b in backends for p in CONCURRENT}
    for _ in range(repeats):  # interleaved: every policy on every backend once per repeat
      runs["sequential"].append(seq.run())
      for b in backends:
        for p in CONCURRENT:
          runs[(b, p)].append(runners[b].run(plans[b][p].shares))

  med = {k: float(np.median([r.makespan_s for r in v])) for k, v in runs.items()}
  rng = {k: [min(r.makespan_s for r in v), max(r.makespan_s for r in v)] for k, v in runs.items()}
  by_b = {b: {"sequential": med["sequential"]} | {p: med[(b, p)] for p in CONCURRENT} for b in backends}
  best = min(backends, key=lambda b: (min(by_b[b][p] for p in CONCURRENT), backends.index(b)))
  pb, mb = plans[best], models[best]
  out["backend"] = best
  out["makespan_s"] = _round(by_b[best])
  out["makespan_by_backend"] = {b: _round(v) for b, v in by_b.items()}
  out["spread"] = {b: {"sequential": [round(x, 4) for x in rng["sequential"]]}
                   | {p: [round(x, 4) for x in rng[(b, p)]] for p in CONCURRENT} for b in backends}
  gb = by_b[best]["grid_best"]
  out["vs_grid_best"] = _round({p: v / gb for p, v in by_b[best].items()}, 3)
  med_runs = {"sequential": _median_run(runs["sequential"])} | {p: _median_run(runs[(best, p)]) for p in CONCURRENT}
  out["finish_times_s"] = {k: _round(v.finish_times_s) for k, v in med_runs.items()}
  out["shares"] = {b: {p: _round(pl.shares) for p, pl in plans[b].items()} for b in backends}
  out["auto_choice"] = {b: _label(plans[b]["auto"]) for b in backends}
  out["searched_s"] = {b: {p: _round(plans[b][p].searched) for p in ("auto", "grid_best")} for b in backends}
  pred = {p: pb[p].predicted_makespan_s for p in ("equal", "competitive", "auto", "grid_best")}
  out["predicted_makespan_s"] = _round(pred)
  out["prediction_error"] = round(pred["competitive"] / by_b[best]["competitive"] - 1, 4)
  out["prediction_errors"] = _round({p: v / by_b[best][p] - 1 for p, v in pred.items()})
  out["capacity"] = {b: round(m.capacity, 3) for b, m in models.items()}
  out["virtual_resource"] = _round(mb.fitted_rates, 3)
  out["backends_competitive"] = {b: round(by_b[b]["competitive"], 4) for b in backends}
  ratios = [s.makespan_s / c.makespan_s for s, c in zip(runs["sequential"], runs[(best, "competitive")])]
  out["speedup_vs_sequential"] = round(by_b[best]["sequential"] / by_b[best]["competitive"], 3)
  out["speedup_vs_sequential_spread"] = [round(min(ratios), 3), round(max(ratios), 3)]
  eq_ratios = [e.makespan_s / c.makespan_s for e, c in zip(runs[(best, "equal")], runs[(best, "competitive")])]
  out["speedup_vs_equal"] = round(by_b[best]["equal"] / by_b[best]["competitive"], 3)
  out["speedup_vs_equal_spread"] = [round(min(eq_ratios), 3), round(max(eq_ratios), 3)]
  out["step_times_s"] = {k: {t: np.asarray(med_runs[k].step_times_s[t]).round(4).tolist() for t in sc.tasks}
                         for k in ("equal", "competitive")}
  return out


def _label(plan) -> str:
  """Which candidate a search plan picked: its name, if it was named, else its shares."""
  s = plan.searched or {}
  best = min(s, key=s.get) if s else None
  return best or ",".join(f"{v:.2g}" for v in plan.shares.values())


def bench_cosched(quick: bool = True, scenarios: Sequence[Scenario] = COSCHED_SCENARIOS,
                  backends: Sequence[str] = ("processes", "threads", "fused"), repeats: int | None = None,
                  total_s: float | None = None, grid: Sequence[float] = (0.25, 0.5, 1.0),
                  grid_max: int | None = None, json_path: str | Path | None = None, log=print) -> dict:
  """Runs every scenario; returns (and writes to ``json_path``) the benchmark's JSON."""
  total_s = total_s or (1.0 if quick else 8.0)
  repeats = repeats or (3 if quick else 5)
  grid_max = grid_max or (9 if quick else 27)
  backends = tuple(backends)
  t0 = time.perf_counter()
  log(f"co-scheduling benchmark on {device_name()} ({'quick' if quick else 'full'}; "
      f"{total_s:.1f} s of solo work per round, {repeats} interleaved repeats)")
  out = {"device": device_name(), "mode": "quick" if quick else "full", "total_solo_work_s": total_s,
         "repeats": repeats, "paper": {"training_speedup": PAPER["training_speedup"]},
         "scenarios": [run_scenario(sc, total_s, backends, repeats, grid, grid_max, log=log) for sc in scenarios]}
  out["wall_s"] = round(time.perf_counter() - t0, 1)
  log(cosched_table(out))
  if json_path:
    write_json(json_path, out)
  return out


def cosched_table(out: dict) -> str:
  """Medians (min-max over the interleaved repeats) per scenario and backend."""
  rows = [f"makespan in s, median (min-max) of {out['repeats']} interleaved repeats; * = best backend",
          f"{'scenario':<9}{'backend':<11}" + "".join(f"{p:>19}" for p in POLICY_ORDER)]
  for s in out["scenarios"]:
    for b, med in s["makespan_by_backend"].items():
      cells = "".join(f"{med[p]:>7.2f} ({s['spread'][b][p][0]:.2f}-{s['spread'][b][p][1]:.2f})" for p in POLICY_ORDER)
      rows.append(f"{s['name']:<9}{b + ('*' if b == s['backend'] else ''):<11}{cells}")
    rows.append(f"{'':<9}{s['backend']}: vs grid_best " + ", ".join(f"{p} {v:.2f}" for p, v in s["vs_grid_best"].items())
                + f"; model predicted competitive {s['predicted_makespan_s']['competitive']:.2f}s "
                f"({100 * s['prediction_error']:+.0f}%); auto picked {s['auto_choice'][s['backend']]}")
  rows.append(f"device: {out['device']}")
  return "\n".join(rows)


def measure_vr_curves(tasks: Sequence[str], grid: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0),
                      backend: str = "processes", solo_work_s: float = 0.6, log=print) -> dict:
  """Each task's virtual resource against its share (the others at 1.0), measured co-run on
  ``backend`` and predicted by the model fitted from the equal-share co-run."""
  solo = solo_step_times(tasks)
  jobs = [Job(t, max(2, int(solo_work_s / solo[t])), seed=i) for i, t in enumerate(tasks)]
  curves = {}
  with open_backend(backend, jobs) as r:
    model = calibrate(r, warmup=True)
    for t in tasks:
      meas, pred = [], []
      for s in grid:
        shares = {u: (s if u == t else 1.0) for u in tasks}
        run = r.run(shares)
        meas.append(round(measured_rates(run, r.solo_step_s)[t], 4))
        pred.append(round(model.rates(tasks, shares)[t], 4))
      curves[t] = {"share": list(grid), "measured": meas, "predicted": pred}
      log(f"  r({t}) measured {meas} predicted {pred}")
  err = float(np.mean([abs(m - p) for c in curves.values() for m, p in zip(c["measured"], c["predicted"])]))
  return {"device": device_name(), "backend": backend, "tasks": list(tasks), "capacity": model.capacity,
          "demand": model.demand, "curves": curves, "mean_abs_error": round(err, 4)}
