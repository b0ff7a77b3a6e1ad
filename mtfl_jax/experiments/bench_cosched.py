"""The co-scheduling benchmark: every plan measured in interleaved, paired repeats, in two regimes.

Regimes (:class:`~mtfl_jax.experiments.scenarios.Regime`), side by side on the same jobs:

* (a) ``a_every_core``: each task's worker may use every core (XLA CPU's default thread pool).
  One convolution task alone keeps both cores of a laptop busy: little idle capacity to share.
* (b) ``b_one_core``: each worker has one compute thread (started on one core, then given every
  core) and there are more tasks than cores. A task alone leaves a core idle, as a GPU kernel too
  small for the device leaves SMs idle: the paper's regime, and the one a GPU is closer to.

Per scenario and regime, on one open runner (compilation and worker start-up are ``setup_s``,
outside every makespan):

1. the model is calibrated from one equal-share co-run (after a warm-up), giving the plans
   ``equal``, ``partitioned`` and ``competitive``;
2. the search: ``search_repeats`` rounds, each running ``sequential`` and every distinct candidate
   of ``auto`` (:func:`~mtfl_jax.cosched.candidate_shares`) and ``grid_best``
   (:func:`~mtfl_jax.cosched.share_grid`) once, in an order rotated by one per round; each
   search keeps its candidate with the lowest median makespan;
3. the fresh repeats: ``repeats`` rounds, each running ``sequential`` and the five plans once in a
   rotated order. Searched plans are measured here again, on repeats the search never saw: the
   search's own number is biased up (the best of noisy draws), and both are reported.

Every ratio is a median over repeats with a 95% paired bootstrap interval
(:mod:`mtfl_jax.stats`): speedup = sequential / plan makespan of the same repeat; competitive
against equal = equal / competitive, "faster" only where the interval excludes 1
(:func:`~mtfl_jax.stats.verdict`); capacity ``C = sum r_i`` from each repeat's equal run; the
model's error ``predicted / measured - 1`` per fresh repeat. The JSON keeps every round's raw
makespans and finish times, so each median and interval can be recomputed.

Example::

    out = bench_cosched(mode="tiny")
    arm = out["scenarios"][0]["regimes"]["b_one_core"]
    arm["speedup_vs_sequential"]["competitive"]   # {"median", "ci95", "per_unit", ...}
    arm["competitive_vs_equal"]["verdict"]
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mtfl_jax import stats
from mtfl_jax.backends import Job, open_backend
from mtfl_jax.calibration import calibrate, solo_step_times
from mtfl_jax.cosched import Plan, Search, candidate_shares, check_memory, make_plan, rotated, share_grid
from mtfl_jax.experiments.paper import PAPER
from mtfl_jax.experiments.scenarios import (CPU_REGIMES, GPU_REGIME_NOTE, Regime, Scenario, cosched_scenario)
from mtfl_jax.device import device_name
from mtfl_jax.files import write_json
from mtfl_jax.vresource import measured_rates

MODEL_PLANS = ("equal", "partitioned", "competitive")
SEARCHED = ("auto", "grid_best")
CONCURRENT = MODEL_PLANS + SEARCHED
POLICY_ORDER = ("sequential",) + CONCURRENT
VERDICT_WORDS = ("competitive faster than equal", "competitive slower than equal")


@dataclasses.dataclass(frozen=True)
class CoschedConfig:
  """One mode of the benchmark: what runs, and how often."""
  scenarios: tuple[Scenario, ...]
  regimes: tuple[Regime, ...] = CPU_REGIMES
  total_s: float = 0.7  # solo work per round (each scenario's split of it), measured in-process
  repeats: int = 9  # fresh interleaved repeats: every plan once each
  search_repeats: int = 2  # rounds of the searches (auto, grid_best), apart from the fresh ones
  grid: tuple[float, ...] = (0.5, 1.0)  # share levels of grid_best
  grid_max: int = 9
  probe: bool = False  # also measure what caps a worker at one compute thread (probe_compute_threads)


def config(mode: str) -> CoschedConfig:
  """``quick`` (about 3 minutes on a quiet 2-core CPU), ``full`` (about 20), ``tiny`` (tests)."""
  if mode == "quick":
    return CoschedConfig((cosched_scenario("medium"),))
  if mode == "full":
    return CoschedConfig((cosched_scenario("medium"), cosched_scenario("heavy")), total_s=1.5, repeats=15,
                         search_repeats=3, grid=(0.25, 0.5, 1.0), probe=True)
  if mode == "tiny":
    return CoschedConfig((Scenario("tiny", ("digits_mlp", "mnist_lenet"), (1.0, 3.0)),), total_s=0.12, repeats=3,
                         search_repeats=1, grid=(0.5, 1.0), grid_max=4)
  raise ValueError(f"unknown mode {mode!r}; valid: quick, full, tiny")


def grid_levels_within(levels: Sequence[float], free_tasks: int, max_size: int) -> tuple[float, ...]:
  """``levels`` without its smallest values until ``len(levels) ** free_tasks <= max_size``
  (1.0 always stays)."""
  levels = sorted(set(levels) | {1.0})
  while len(levels) > 1 and len(levels) ** free_tasks > max_size:
    levels = levels[1:]
  return tuple(levels)


def _r(x: float, n: int = 5) -> float:
  return round(float(x), n)


def _distinct(cands: dict[str, dict[str, dict[str, float]]]) -> tuple[dict[str, dict], dict[str, str]]:
  """The distinct share vectors of several searches' candidates (keyed by the first label that
  names each) and, for every label, the key it is measured under."""
  unique, key_of, seen = {}, {}, {}
  for c in cands.values():
    for label, shares in c.items():
      sig = tuple(sorted((n, round(v, 9)) for n, v in shares.items()))
      if sig not in seen:
        seen[sig] = label
        unique[label] = dict(shares)
      key_of[label] = seen[sig]
  return unique, key_of


def _baseline(runner, jobs, stack) -> Callable:
  """The sequential baseline of a regime: the processes runner's own one-by-one run (each task
  keeps its limits), else the ``sequential`` backend in this process."""
  if hasattr(runner, "run_sequential"):
    return runner.run_sequential
  return stack.enter_context(open_backend("sequential", jobs)).run


def run_regime(sc: Scenario, regime: Regime, workloads: dict[str, int], cfg: CoschedConfig, log=print) -> dict:
  """One scenario in one regime: calibration, the searches, the fresh repeats, their statistics."""
  jobs = [Job(t, workloads[t], seed=i) for i, t in enumerate(sc.tasks)]
  levels = grid_levels_within(cfg.grid, len(jobs) - 1, cfg.grid_max)
  t0 = time.perf_counter()
  with contextlib.ExitStack() as stack:  # the runner stays open: it compiles (or spawns) once
    runner = stack.enter_context(open_backend(regime.backend, jobs, **regime.runner_kwargs()))
    baseline = _baseline(runner, jobs, stack)
    setup_s = time.perf_counter() - t0
    baseline()  # warm-up: first calls fill dispatch caches
    model = calibrate(runner, warmup=True)
    plans = {p: make_plan(p, jobs, model, runner) for p in ("sequential",) + MODEL_PLANS}
    log(f"  [{sc.name} | {regime.name}] set-up {setup_s:.0f}s; model C = {model.capacity:.2f}")

    # the searches: rounds of sequential + every distinct candidate, rotated
    cands = {"auto": candidate_shares(workloads, model),
             "grid_best": share_grid(workloads, model, levels=levels, max_size=cfg.grid_max)}
    unique, key_of = _distinct(cands)
    t1 = time.perf_counter()
    search_rounds = []
    for k in range(cfg.search_repeats):
      order = rotated(["sequential"] + list(unique), k)
      row = {lab: _r((baseline() if lab == "sequential" else runner.run(unique[lab])).makespan_s) for lab in order}
      search_rounds.append({"order": order, "makespan_s": row})
    search_s = time.perf_counter() - t1
    found = {}
    for p, c in cands.items():
      found[p] = Search.from_runs(c, {lab: [rd["makespan_s"][key_of[lab]] for rd in search_rounds] for lab in c})
      plans[p] = Plan(p, runner.name, found[p].shares, model.predict(workloads, found[p].shares).makespan_s,
                      found[p].median_s)
    log(f"  [{sc.name} | {regime.name}] search ({cfg.search_repeats} rounds, {len(unique)} vectors, "
        f"{search_s:.0f}s): auto picked {found['auto'].best}, grid_best {found['grid_best'].best}")

    # the fresh repeats: every plan once per round, rotated
    fresh = []
    for k in range(cfg.repeats):
      order = rotated(POLICY_ORDER, k)
      res = {p: (baseline() if p == "sequential" else runner.run(plans[p].shares)) for p in order}
      fresh.append({"order": order,
                    "makespan_s": {p: _r(res[p].makespan_s) for p in POLICY_ORDER},
                    "finish_s": {p: {t: _r(v) for t, v in res[p].finish_times_s.items()} for p in POLICY_ORDER},
                    "equal_rates": {t: _r(v) for t, v in measured_rates(res["equal"], runner.solo_step_s).items()}})
    solo = dict(runner.solo_step_s)
    solo_threads = dict(getattr(runner, "solo_threads", {}))
  out = {"regime": regime.name, "label": regime.label, "backend": regime.backend,
         "compute_threads": regime.compute_threads, "setup_s": _r(setup_s, 2), "search_s": _r(search_s, 1),
         "wall_s": _r(time.perf_counter() - t0, 1), "solo_step_s": {t: _r(v, 7) for t, v in solo.items()},
         "solo_work_s": {t: _r(workloads[t] * solo[t], 4) for t in sc.tasks}, "solo_threads": solo_threads,
         "grid_levels": list(levels), "model": model.to_json(), "capacity_model": _r(model.capacity, 4),
         "plans": {p: {"shares": {t: _r(v, 4) for t, v in pl.shares.items()},
                       "predicted_makespan_s": None if pl.predicted_makespan_s is None else _r(pl.predicted_makespan_s)}
                   for p, pl in plans.items()},
         "search": {"repeats": cfg.search_repeats, "vectors": {k: {t: _r(v, 4) for t, v in s.items()}
                                                                for k, s in unique.items()},
                    "measured_as": key_of, "rounds": search_rounds,
                    **{p: {"picked": found[p].best, "candidates": list(cands[p])} for p in SEARCHED}},
         "fresh": {"repeats": cfg.repeats, "rounds": fresh}}
  return out | summarize_regime(out)


def summarize_regime(arm: dict) -> dict:
  """Every median and interval of one scenario-regime from its raw rounds (the JSON's
  ``fresh.rounds`` and ``search.rounds``): what :func:`run_regime` reports, recomputable."""
  rounds = arm["fresh"]["rounds"]
  ms = {p: [rd["makespan_s"][p] for rd in rounds] for p in POLICY_ORDER}
  out = {"makespan_s": {p: stats.summarize(v) for p, v in ms.items()},
         "speedup_vs_sequential": {p: stats.paired_ratio(ms["sequential"], ms[p]) for p in CONCURRENT},
         "capacity": stats.summarize([sum(rd["equal_rates"].values()) for rd in rounds])}
  cve = stats.paired_ratio(ms["equal"], ms["competitive"])
  out["competitive_vs_equal"] = cve | {"verdict": stats.verdict(cve, *VERDICT_WORDS)}
  out["prediction_error"] = {p: stats.summarize([pl["predicted_makespan_s"] / m - 1 for m in ms[p]])
                             for p, pl in arm["plans"].items() if pl["predicted_makespan_s"] is not None}
  tasks = list(rounds[0]["finish_s"]["sequential"])
  out["finish_times_s"] = {p: {t: stats.summarize([rd["finish_s"][p][t] for rd in rounds]) for t in tasks}
                           for p in POLICY_ORDER}
  srounds, key_of = arm["search"]["rounds"], arm["search"]["measured_as"]
  out["searched"] = {}
  for p in SEARCHED:
    picked = arm["search"][p]["picked"]
    seq = [rd["makespan_s"]["sequential"] for rd in srounds]
    own = [rd["makespan_s"][key_of[picked]] for rd in srounds]
    out["searched"][p] = {"picked": picked, "search_speedup": stats.paired_ratio(seq, own),
                          "fresh_speedup": out["speedup_vs_sequential"][p],
                          "search_median_s": stats.summarize(own)["median"],
                          "fresh_median_s": out["makespan_s"][p]["median"]}
  return out


def bench_cosched(mode: str = "quick", json_path: str | Path | None = None, log=print, **overrides) -> dict:
  """Runs every scenario in every regime of ``mode``'s :class:`CoschedConfig` (fields given in
  ``overrides`` replace the mode's; None keeps it); returns (and writes to ``json_path``) the
  benchmark's JSON."""
  cfg = dataclasses.replace(config(mode), **{k: v for k, v in overrides.items() if v is not None})
  if cfg.repeats < 1 or cfg.search_repeats < 1:
    raise ValueError(f"need repeats >= 1 and search_repeats >= 1, got {cfg.repeats} and {cfg.search_repeats}")
  t0 = time.perf_counter()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  log(f"co-scheduling benchmark on {device_name()} ({mode}; {cfg.total_s:.2f} s of solo work per round, "
      f"{cfg.repeats} fresh interleaved repeats, {cfg.search_repeats} search rounds; regimes "
      + ", ".join(r.name for r in cfg.regimes) + ")")
  out = {"device": device_name(), "mode": mode, "cores": cores, "total_solo_work_s": cfg.total_s,
         "repeats": cfg.repeats, "search_repeats": cfg.search_repeats, "grid": list(cfg.grid),
         "paper": {"training_speedup": PAPER["training_speedup"]},
         "regimes": {r.name: {"label": r.label, "backend": r.backend, "compute_threads": r.compute_threads}
                     for r in cfg.regimes},
         "gpu_regime": GPU_REGIME_NOTE, "scenarios": []}
  if cfg.probe:
    out["probe"] = probe_compute_threads(log=log)
  for sc in cfg.scenarios:
    solo = solo_step_times(sc.tasks)  # in this process, every core: the same jobs in every regime
    wl = sc.workloads(solo, cfg.total_s)
    check_memory([Job(t, wl[t]) for t in sc.tasks])
    doc = {"name": sc.name, "tasks": list(sc.tasks), "work": list(sc.work), "workloads": wl,
           "solo_step_s_in_process": {t: _r(v, 7) for t, v in solo.items()}, "regimes": {}}
    for regime in cfg.regimes:
      doc["regimes"][regime.name] = run_regime(sc, regime, wl, cfg, log)
    out["scenarios"].append(doc)
  out["wall_s"] = _r(time.perf_counter() - t0, 1)
  log(cosched_table(out))
  if json_path:
    write_json(json_path, out)
  return out


# --------------------------------------------------------------------------- text
def interval_text(s: dict, fmt: str = ".2f", unit: str = "") -> str:
  """``median [lo, hi]`` of a :mod:`mtfl_jax.stats` summary."""
  m, (lo, hi) = s["median"], s["ci95"]
  if m is None:
    return "n/a"
  f = lambda v: format(stats.as_float(v), fmt) + unit  # noqa: E731
  return f"{f(m)} [{f(lo)}, {f(hi)}]"


def regime_lines(name: str, arm: dict) -> list[str]:
  """A scenario-regime's numbers, as the table and the report say them."""
  sp, se = arm["speedup_vs_sequential"], arm["searched"]
  cve = arm["competitive_vs_equal"]
  pe = arm["prediction_error"]
  return [
      f"{name} | {arm['label']} on {arm['backend']}: capacity C = sum r_i {interval_text(arm['capacity'])} "
      f"(model {arm['capacity_model']:.2f})",
      "  speedup vs sequential: " + ", ".join(f"{p} {interval_text(sp[p], unit='x')}" for p in CONCURRENT),
      "  searched, fresh vs search's own number: " + ", ".join(
          f"{p} ({se[p]['picked']}) {interval_text(se[p]['fresh_speedup'], unit='x')} vs "
          f"{stats.as_float(se[p]['search_speedup']['median']):.2f}x" for p in SEARCHED),
      f"  equal / competitive makespan {interval_text(cve)}: {cve['verdict']}",
      "  model error predicted/measured - 1: " + ", ".join(
          f"{p} {interval_text(pe[p], '+.0%')}" for p in ("competitive", "equal", "sequential") if p in pe)]


def cosched_table(out: dict) -> str:
  """Every scenario-regime: medians and 95% intervals over the fresh repeats."""
  rows = [f"medians [95% bootstrap interval] of {out['repeats']} fresh, interleaved, paired repeats "
          f"(searches: {out['search_repeats']} rounds of their own)"]
  for s in out["scenarios"]:
    for name, arm in s["regimes"].items():
      rows += regime_lines(s["name"], arm)
  probe = out.get("probe")
  if probe:
    rows.append("what caps a worker at one compute thread (" + probe["task"] + ", busy threads solo): "
                + ", ".join(f"{k} {v['solo_threads']['busy_threads']}" for k, v in probe["variants"].items()))
  rows.append(f"device: {out['device']} ({out['cores']} cores); {out['gpu_regime']}")
  return "\n".join(rows)


# --------------------------------------------------------------------------- probes
XLA_ONE_THREAD_FLAG = "--xla_cpu_multi_thread_eigen=false"


def probe_compute_threads(task: str = "shapes_unet", steps: int = 8, log=print) -> dict:
  """What limits a worker to one compute thread, measured: the task alone in a ``processes``
  worker with XLA's default pool, with ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``, and
  started on one core then given every core (``compute_threads=1``). Per variant: solo step time
  and the worker's per-thread CPU seconds (threads doing real work: ``busy_threads``)."""
  variants = {"default": {}, "xla_flag": {"worker_env": {"XLA_FLAGS": XLA_ONE_THREAD_FLAG}},
              "start_on_one_core": {"compute_threads": 1}}
  out = {"task": task, "variants": {}}
  for name, kw in variants.items():
    with open_backend("processes", [Job(task, steps)], **kw) as r:
      out["variants"][name] = {"solo_step_s": _r(r.solo_step_s[task], 6), "solo_threads": r.solo_threads[task]}
    log(f"  probe {task} {name}: {1e3 * r.solo_step_s[task]:.1f} ms/step, busy threads "
        f"{out['variants'][name]['solo_threads']['busy_threads']}")
  return out


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
