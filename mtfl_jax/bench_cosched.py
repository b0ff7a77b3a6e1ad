"""The co-scheduling benchmark: policies and backends measured side by side in one run.

Each scenario is a task mix with a given imbalance of solo work ``W_i * s_i`` across its
tasks. Per scenario: the sequential baseline; every concurrent backend calibrated (one
equal-share co-run) and run under ``competitive`` and ``equal``; then, on the fastest
backend, ``partitioned`` too. Makespans exclude compilation and worker start-up (reported as
``setup_s``). Ratios come from runs made minutes apart on the same machine; ``repeats > 1``
reruns the sequential and competitive rounds and reports the spread of their ratio.

Example::

    out = bench_cosched(quick=True)
    out["scenarios"][0]["makespan_s"]   # {"sequential": ..., "equal": ..., ...}
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mtfl_jax.backends import Job, open_backend
from mtfl_jax.cosched import calibrate, check_memory, make_plan
from mtfl_jax.profiling import device_name
from mtfl_jax.results import write_json

PAPER_TRAINING_SPEEDUP = 2.1  # Yu et al. 2022: competitive sharing vs sequential


@dataclasses.dataclass(frozen=True)
class Scenario:
  """A task mix and the share of the round's solo work each task has."""
  name: str
  tasks: tuple[str, ...]
  work: tuple[float, ...]  # relative solo work W_i * s_i

  def workloads(self, solo_step_s, total_s: float) -> dict[str, int]:
    unit = total_s / sum(self.work)
    return {t: max(2, int(round(w * unit / solo_step_s[t]))) for t, w in zip(self.tasks, self.work)}


# A tiny dispatch-bound classifier, a small CNN and a segmentation net (the paper's
# self-driving mix, scaled to a laptop), with ever larger imbalance of their solo work.
SCENARIOS = (
    Scenario("light", ("digits_mlp", "mnist_lenet", "shapes_unet"), (1.0, 1.0, 1.0)),
    Scenario("medium", ("digits_mlp", "mnist_lenet", "shapes_unet"), (1.0, 2.0, 4.0)),
    Scenario("heavy", ("digits_mlp", "mnist_lenet", "shapes_unet", "cifar_resnet"), (1.0, 1.0, 2.0, 12.0)),
)


def solo_step_times(tasks: Sequence[str]) -> dict[str, float]:
  """Solo step times of ``tasks``, measured with the sequential backend."""
  with open_backend("sequential", [Job(t, 8) for t in tasks]) as r:
    return dict(r.solo_step_s)


def _round(x, n=4):
  return {k: round(float(v), n) for k, v in x.items()}


def run_scenario(sc: Scenario, total_s: float, backends: Sequence[str], repeats: int = 1,
                 log=print) -> dict:
  solo = solo_step_times(sc.tasks)
  wl = sc.workloads(solo, total_s)
  jobs = [Job(t, wl[t], seed=i) for i, t in enumerate(sc.tasks)]
  check_memory(jobs)
  out = {"name": sc.name, "tasks": list(sc.tasks), "workloads": wl, "solo_step_s": _round(solo, 6),
         "solo_work_s": _round({t: wl[t] * solo[t] for t in sc.tasks}, 3),
         "setup_s": {}, "backends_competitive": {}, "backends_equal": {}}
  with contextlib.ExitStack() as stack:  # runners stay open: each compiles (or spawns) once
    seq = stack.enter_context(open_backend("sequential", jobs))
    out["setup_s"]["sequential"] = round(seq.setup_s, 2)
    seq.run()  # warm-up: first calls populate dispatch caches
    seq_runs = [seq.run()]
    log(f"  [{sc.name}] sequential {seq_runs[0].makespan_s:.2f}s")
    per_backend = {}
    for b in backends:
      r = stack.enter_context(open_backend(b, jobs))
      r.run(None)  # warm-up
      model = calibrate(r)  # the equal-share co-run
      plan = make_plan("competitive", jobs, model, b)
      comp = r.run(plan.shares)
      per_backend[b] = dict(runner=r, model=model, equal=r.run(None), comp=[comp], plan=plan)
      log(f"  [{sc.name}] {b}: equal {per_backend[b]['equal'].makespan_s:.2f}s, competitive "
          f"{comp.makespan_s:.2f}s (predicted {plan.predicted_makespan_s:.2f}s, C={model.capacity:.2f})")
      out["backends_competitive"][b] = round(comp.makespan_s, 4)
      out["backends_equal"][b] = round(per_backend[b]["equal"].makespan_s, 4)
      out["setup_s"][b] = round(r.setup_s + comp.setup_s, 2)
    best = min(per_backend, key=lambda b: per_backend[b]["comp"][0].makespan_s)
    pb = per_backend[best]
    part = make_plan("partitioned", jobs, pb["model"], best)
    part_run = pb["runner"].run(part.shares)
    for _ in range(repeats - 1):  # alternate, so that drift hits both sides of the ratio
      seq_runs.append(seq.run())
      pb["comp"].append(pb["runner"].run(pb["plan"].shares))

  runs = {"sequential": seq_runs[0], "equal": pb["equal"], "partitioned": part_run,
          "competitive": pb["comp"][0]}
  out["backend"] = best
  out["makespan_s"] = {k: round(v.makespan_s, 4) for k, v in runs.items()}
  out["finish_times_s"] = {k: _round(v.finish_times_s) for k, v in runs.items()}
  out["shares"] = {"partitioned": _round(part.shares), "competitive": _round(pb["plan"].shares)}
  eq_pred = pb["model"].predict(wl, {t: 1.0 for t in sc.tasks}).makespan_s
  out["predicted_makespan_s"] = {"competitive": round(pb["plan"].predicted_makespan_s, 4),
                                 "equal": round(eq_pred, 4)}
  out["prediction_error"] = round(pb["plan"].predicted_makespan_s / runs["competitive"].makespan_s - 1, 4)
  out["capacity"] = {b: round(v["model"].capacity, 3) for b, v in per_backend.items()}
  out["virtual_resource"] = _round(pb["model"].fitted_rates, 3)
  ratios = [s.makespan_s / c.makespan_s for s, c in zip(seq_runs, pb["comp"])]
  out["speedup_vs_sequential"] = round(ratios[0], 3)
  out["speedup_vs_sequential_spread"] = [round(min(ratios), 3), round(max(ratios), 3)]
  out["speedup_vs_equal"] = round(pb["equal"].makespan_s / runs["competitive"].makespan_s, 3)
  out["step_times_s"] = {k: {t: np.asarray(v.step_times_s[t]).round(4).tolist() for t in sc.tasks}
                         for k, v in (("equal", pb["equal"]), ("competitive", runs["competitive"]))}
  return out


def bench_cosched(quick: bool = True, scenarios: Sequence[Scenario] = SCENARIOS,
                  backends: Sequence[str] = ("processes", "threads", "fused"), repeats: int | None = None,
                  total_s: float | None = None, json_path: str | Path | None = None, log=print) -> dict:
  """Runs every scenario; returns (and writes to ``json_path``) the benchmark's JSON."""
  total_s = total_s or (2.0 if quick else 8.0)
  repeats = repeats or (1 if quick else 3)
  t0 = time.perf_counter()
  log(f"co-scheduling benchmark on {device_name()} ({'quick' if quick else 'full'}; "
      f"{total_s:.0f} s of solo work per round)")
  out = {"device": device_name(), "mode": "quick" if quick else "full", "total_solo_work_s": total_s,
         "repeats": repeats, "paper": {"training_speedup": PAPER_TRAINING_SPEEDUP},
         "scenarios": [run_scenario(sc, total_s, backends, repeats, log) for sc in scenarios]}
  out["wall_s"] = round(time.perf_counter() - t0, 1)
  log(cosched_table(out))
  if json_path:
    write_json(json_path, out)
  return out


def cosched_table(out: dict) -> str:
  pols = ("sequential", "equal", "partitioned", "competitive")
  rows = [f"{'scenario':<9}{'backend':<11}" + "".join(f"{p:>13}" for p in pols)
          + f"{'predicted':>11}{'err':>7}{'vs seq':>8}{'vs equal':>9}"]
  for s in out["scenarios"]:
    rows.append(f"{s['name']:<9}{s['backend']:<11}" + "".join(f"{s['makespan_s'][p]:>12.2f}s" for p in pols)
                + f"{s['predicted_makespan_s']['competitive']:>10.2f}s{100 * s['prediction_error']:>6.0f}%"
                + f"{s['speedup_vs_sequential']:>7.2f}x{s['speedup_vs_equal']:>8.2f}x")
  for s in out["scenarios"]:
    rows.append(f"{s['name']}: competitive per backend " +
                ", ".join(f"{b} {v:.2f}s" for b, v in s["backends_competitive"].items()))
  rows.append(f"device: {out['device']}")
  return "\n".join(rows)


def measure_vr_curves(tasks: Sequence[str], grid: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0),
                      backend: str = "processes", solo_work_s: float = 0.6, log=print) -> dict:
  """Each task's virtual resource against its share (the others at 1.0), measured co-run on
  ``backend`` and predicted by the model fitted from the equal-share co-run."""
  solo = solo_step_times(tasks)
  jobs = [Job(t, max(2, int(solo_work_s / solo[t])), seed=i) for i, t in enumerate(tasks)]
  from mtfl_jax.vresource import VRModel, measured_rates
  curves = {}
  with open_backend(backend, jobs) as r:
    r.run(None)  # warm-up
    model = VRModel.fit(r.solo_step_s, r.run(None))
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
