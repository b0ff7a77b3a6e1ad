"""The federated evidence: time to accuracy at convergence, over seeds, against the strongest baselines.

For every scenario (a task mix on a fleet of devices):

1. **Calibration seeds** (never evaluation seeds) fix everything that is chosen: ``none`` runs
   ``calibration_rounds`` rounds on each; a task's *plateau* is the mean of its last
   ``PLATEAU_EVALS`` evaluations, its *target* ``TARGET_FRACTION`` of the plateau (averaged
   over the calibration seeds), and the *horizon* ``T`` (every evaluation run's virtual-time
   budget) the longest calibration run. Then, on the same seeds and horizon, the baselines'
   knobs are tuned and ``full``'s default variant is chosen, each by the best median
   task-set time to accuracy: ``deadline``'s quantile, ``fedbuff``'s buffer size, ``full``'s
   extension and aggregator. Nothing is chosen after an evaluation seed ran.
2. **Evaluation seeds** (partition, fleet, sampling and init all follow the seed) run every
   policy to the horizon, evaluated on one grid of virtual time (``GRID`` points, the same for
   every policy). A task's *time to accuracy* (TTA) is the first grid time at which the mean
   of its last 3 evaluations is at or above its target (a crossing that holds); the task
   set's is the latest of its tasks' (None: some task never got there).
3. **Statistics**, paired over seeds (:mod:`mtfl_jax.stats`): per policy the median speedup
   over ``none`` and over the best baseline (chosen on the calibration seeds) with 95%
   bootstrap intervals, "faster" only where the interval excludes 1; the plateau accuracy per
   task (mean of the last ``PLATEAU_EVALS`` evaluations) with intervals; work beyond the
   clients' nominal epochs on its own line; FL throughput as a diagnostic.

Every run is kept (``runs/<scenario>/<variant>/seed<k>.json.gz``: history rows and the
evaluation grid) as soon as it finishes, so an interrupted recording resumes where it stopped,
and a reviewer can recompute every number of ``evidence.json`` from the rows. Runs go to
``workers`` processes, each pinned to its own core.

Example::

    doc = run_evidence(config("quick"), out="results/evidence")
    doc["scenarios"][0]["policies"]["full"]["ratio_vs_none"]   # {"median", "ci95", ...}
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from mtfl_jax import stats
from mtfl_jax.files import write_json

TARGET_FRACTION = 0.95  # a task's target: this fraction of its plateau under none (calibration seeds)
PLATEAU_EVALS = 5  # evaluations averaged into a plateau (the last ones of a run)
HOLD = 3  # a crossing counts when the mean of the last HOLD evaluations is at or above the target


@dataclasses.dataclass(frozen=True)
class Scenario:
  """A federation under test: tasks, clients, data skew and the fleet's heterogeneity."""
  name: str
  tasks: tuple
  num_clients: int = 20
  clients_per_round: int = 10
  alpha: float = 0.5
  presence: float = 1.0
  quantity_sigma: float = 0.0
  speed_sigma: float = 0.5
  bandwidth_sigma: float = 0.5
  trace: str | None = None  # "venn": the Venn device table
  local_epochs: float = 1.0
  calibration_rounds: int = 80
  heterogeneity: str = ""  # its label in the heterogeneity figure
  tune: bool = True  # tune the baselines and choose full's variant here (else: the first scenario's choices)
  ablations: bool = False  # run every full variant side by side

  def fed_fields(self) -> dict:
    return {k: getattr(self, k) for k in ("tasks", "num_clients", "clients_per_round", "alpha", "presence",
                                          "quantity_sigma", "speed_sigma", "bandwidth_sigma", "trace", "local_epochs")}


@dataclasses.dataclass(frozen=True)
class Variant:
  """A policy configuration: a name, the policy, FedConfig overrides, and its role."""
  name: str
  policy: str
  overrides: tuple = ()  # (field, value) pairs
  role: str = "baseline"  # baseline | full

  def fields(self) -> dict:
    return dict(self.overrides)


FULL_VARIANTS = tuple(Variant(f"full[{'ext' if ext else 'noext'},{agg}]", "full",
                              (("extend", ext), ("aggregator", agg)), "full")
                      for ext in (True, False) for agg in ("fednova_nominal", "fednova", "fedavg"))


@dataclasses.dataclass(frozen=True)
class EvidenceConfig:
  mode: str
  scenarios: tuple
  sweep: tuple  # heterogeneity sweep scenarios (fewer policies)
  seeds: tuple
  calibration_seeds: tuple
  deadline_quantiles: tuple = (0.5, 0.7, 0.9)
  buffer_fractions: tuple = (0.2, 0.5, 1.0)  # fedbuff buffer sizes, as fractions of clients_per_round
  grid: int = 40
  workers: int = 2
  ablations: bool = True  # every full variant where a scenario asks for them
  clock_backend: str = "processes"  # where each mix's virtual-resource model is calibrated (first use)
  full_candidates: tuple = tuple(v.name for v in FULL_VARIANTS)  # the full variants tuning chooses among


MIX2 = ("digits_mlp", "mnist_lenet")
MIX3 = ("digits_mlp", "mnist_lenet", "shapes_unet")


def config(mode: str) -> EvidenceConfig:
  if mode == "full":
    main = (Scenario("mlp+cnn", MIX2, heterogeneity="lognormal 0.5", ablations=True),
            Scenario("mlp+cnn venn", MIX2, trace="venn", heterogeneity="Venn devices"),
            # the U-Net's steps cost ~9x LeNet's on a CPU: a smaller federation keeps it affordable
            Scenario("mlp+cnn+unet", MIX3, num_clients=10, clients_per_round=5, presence=0.7,
                     heterogeneity="lognormal 0.5", tune=False, calibration_rounds=50))
    sweep = tuple(Scenario(f"mlp+cnn sigma {s:g}", MIX2, speed_sigma=s, bandwidth_sigma=s, tune=False,
                           heterogeneity=f"lognormal {s:g}") for s in (0.25, 1.0))
    return EvidenceConfig("full", main, sweep, seeds=(0, 1, 2, 3, 4), calibration_seeds=(1000, 1001))
  if mode == "quick":  # a smoke run of every code path: not evidence
    main = (Scenario("mlp+cnn", MIX2, num_clients=10, clients_per_round=5, calibration_rounds=25,
                     heterogeneity="lognormal 0.5"),)  # no ablations: a smoke run
    return EvidenceConfig("quick", main, (), seeds=(0, 1), calibration_seeds=(1000,), deadline_quantiles=(0.5,),
                          buffer_fractions=(0.5,), grid=20, ablations=False,
                          full_candidates=("full[ext,fednova_nominal]", "full[noext,fednova_nominal]"))
  if mode == "gpu":  # the GPU recording's reduced evidence, on the GPU's own clock (a few minutes there)
    main = (Scenario("mlp+cnn+unet", MIX3, presence=0.7, calibration_rounds=40, heterogeneity="lognormal 0.5"),)
    return EvidenceConfig("gpu", main, (), seeds=(0, 1, 2), calibration_seeds=(1000,), deadline_quantiles=(0.5, 0.8),
                          buffer_fractions=(0.5,), grid=30, workers=1, ablations=False)
  if mode == "tiny":  # tests: seconds
    main = (Scenario("tiny", ("digits_mlp",), num_clients=6, clients_per_round=3, calibration_rounds=6,
                     heterogeneity="lognormal 0.5", ablations=True),)
    sweep = (Scenario("tiny sigma 1", ("digits_mlp",), num_clients=6, clients_per_round=3, calibration_rounds=6,
                      speed_sigma=1.0, bandwidth_sigma=1.0, heterogeneity="lognormal 1", tune=False),)
    return EvidenceConfig("tiny", main, sweep, seeds=(0, 1), calibration_seeds=(1000,), deadline_quantiles=(0.5, 0.8),
                          buffer_fractions=(0.5, 1.0), grid=8, workers=1, ablations=True)
  raise ValueError(f"unknown evidence mode {mode!r}; valid: quick, full, gpu, tiny")


# --------------------------------------------------------------------------- one run (a worker)
_WORKER: dict = {}


def _init_worker(cores: list, counter) -> None:
  """Pins each worker process to its own core before JAX starts (one compute thread each)."""
  with counter.get_lock():
    i = counter.value
    counter.value += 1
  if cores:
    os.sched_setaffinity(0, {cores[i % len(cores)]})


def run_one(spec: dict) -> dict:
  """Runs one federated run of ``spec`` and writes it (gzip JSON) to ``spec["path"]``."""
  from mtfl_jax.clock import inputs_from_json
  from mtfl_jax.federated import FedConfig, run_federated
  path = Path(spec["path"])
  if path.exists():
    return {"path": str(path), "reused": True}
  model, corrections = inputs_from_json(spec["clock"])
  cfg = FedConfig(**spec["config"])
  t0 = time.perf_counter()
  res = run_federated(cfg, model, progress=False, corrections=corrections)
  keep = ("round", "task", "virtual_time_s", "round_time_s", "sampled", "failures", "workloads", "work_s",
          "work_beyond_nominal_s", "samples", "staleness", "updates", "deadline_s", "accuracy")
  doc = {"spec": {k: v for k, v in spec.items() if k not in ("path", "clock")}, "wall_s": time.perf_counter() - t0,
         "executors": res.executors, "evaluations": res.evaluations,
         "history": [{k: h[k] for k in keep if k in h} for h in res.history]}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  with gzip.open(tmp, "wt") as f:
    json.dump(doc, f, default=float)
  tmp.rename(path)
  return {"path": str(path), "reused": False, "wall_s": doc["wall_s"]}


def read_run(path: str | Path) -> dict:
  with gzip.open(path, "rt") as f:
    return json.load(f)


# --------------------------------------------------------------------------- metrics
def time_to_target(evaluations: Sequence[dict], task: str, target: float, hold: int = HOLD) -> float | None:
  """First grid time at which the mean of ``task``'s last ``hold`` evaluations is >= ``target``."""
  vals = []
  for e in evaluations:
    vals.append(e["metrics"][task])
    if len(vals) >= hold and float(np.mean(vals[-hold:])) >= target:
      return float(e["virtual_time_s"])
  return None


def set_time(ttas: dict) -> float | None:
  """The task set's time to accuracy: when the last of its tasks got there (None: one never did)."""
  return None if any(v is None for v in ttas.values()) else max(ttas.values())


def plateau(evaluations: Sequence[dict], task: str, n: int = PLATEAU_EVALS) -> float:
  return float(np.mean([e["metrics"][task] for e in evaluations[-n:]]))


def run_metrics(doc: dict, targets: dict) -> dict:
  ev = doc["evaluations"]
  tta = {t: time_to_target(ev, t, v) for t, v in targets.items()}
  h = doc["history"]
  vt = max((e["virtual_time_s"] for e in ev), default=0.0)
  work = sum(r["work_s"] for r in h)
  return {"tta": tta, "tta_set": set_time(tta), "plateau": {t: plateau(ev, t) for t in targets},
          "work_s": work, "work_beyond_nominal_s": sum(r.get("work_beyond_nominal_s", 0.0) for r in h),
          "rounds": len(h), "fl_throughput": work / vt if vt else None, "wall_s": doc["wall_s"],
          "dropped": sum(len(r.get("failures", [])) for r in h)}


# --------------------------------------------------------------------------- the recording
class Recorder:
  """Runs specs in a pool of pinned worker processes (or here, for one worker), reusing every
  run already on disk."""

  def __init__(self, out: Path, workers: int, log=print):
    self.out, self.workers, self.log = out, workers, log
    self.pool = None
    if workers > 1:
      import multiprocessing as mp
      ctx = mp.get_context("spawn")
      cores = sorted(os.sched_getaffinity(0))
      self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                      initargs=(cores, ctx.Value("i", 0)))

  def run(self, specs: list[dict]) -> list[dict]:
    todo = [s for s in specs if not Path(s["path"]).exists()]
    if todo:
      self.log(f"  {len(todo)} run(s) to do, {len(specs) - len(todo)} on disk")
    t0 = time.perf_counter()
    if self.pool is None:
      for i, s in enumerate(todo):
        run_one(s)
        self.log(f"    {i + 1}/{len(todo)} {Path(s['path']).relative_to(self.out)} ({time.perf_counter() - t0:.0f}s)")
    else:
      futs = [self.pool.submit(run_one, s) for s in todo]
      for i, (s, f) in enumerate(zip(todo, futs)):
        f.result()
        self.log(f"    {i + 1}/{len(todo)} {Path(s['path']).relative_to(self.out)} ({time.perf_counter() - t0:.0f}s)")
    return [read_run(s["path"]) for s in specs]

  def close(self):
    if self.pool is not None:
      self.pool.shutdown(cancel_futures=True)


def _spec(out: Path, sc: Scenario, variant: Variant, seed: int, clock: dict, budget: float | None,
          grid_s: float | None, rounds: int) -> dict:
  cfg = {**sc.fed_fields(), "tasks": list(sc.tasks), "policy": variant.policy, "seed": seed, "rounds": rounds,
         "time_budget_s": budget, "eval_every_s": grid_s, "eval_every": 10**9 if grid_s else 1,
         "simulator": "auto", **variant.fields()}
  if variant.policy == "fedbuff":
    cfg["rounds"] = 10**6  # server steps per task: the horizon stops it
  slug = variant.name.replace("[", "_").replace("]", "").replace(",", "_").replace("=", "")
  # the file name carries a digest of the run's whole config and clock: a run is reused only
  # for exactly the same run (a changed setting, clock or horizon is a new file)
  digest = hashlib.sha1(json.dumps([cfg, clock], sort_keys=True, default=str).encode()).hexdigest()[:10]
  return {"scenario": sc.name, "variant": variant.name, "seed": seed, "config": cfg, "clock": clock,
          "path": str(out / "runs" / sc.name.replace(" ", "_") / slug / f"seed{seed}-{digest}.json.gz")}


def _calibration_none(rec: Recorder, out: Path, sc: Scenario, ec: EvidenceConfig, clock: dict) -> dict:
  """Targets and horizon from ``none`` on the calibration seeds (evaluated after every round):
  a task's plateau is the mean of its last ``2 * PLATEAU_EVALS`` per-round accuracies."""
  specs = [_spec(out, sc, Variant("none-calibration", "none"), s, clock, None, None, sc.calibration_rounds)
           for s in ec.calibration_seeds]
  docs = rec.run(specs)
  plateaus = {t: [float(np.mean([r["accuracy"][t] for r in d["history"][-2 * PLATEAU_EVALS:]])) for d in docs]
              for t in sc.tasks}
  return {"plateau": {t: round(float(np.mean(v)), 6) for t, v in plateaus.items()},
          "plateau_per_seed": plateaus,
          "targets": {t: round(TARGET_FRACTION * float(np.mean(v)), 6) for t, v in plateaus.items()},
          "horizon_s": max(d["history"][-1]["virtual_time_s"] for d in docs),
          "runs": [str(Path(s["path"]).relative_to(out)) for s in specs]}


def _best(rec: Recorder, out: Path, sc: Scenario, ec: EvidenceConfig, clock: dict, cal: dict,
          candidates: Sequence[Variant]) -> tuple[Variant, dict]:
  """The candidate with the best (lowest) median task-set TTA over the calibration seeds
  (never reached: infinite; ties: the first listed), and every candidate's numbers."""
  grid_s = cal["horizon_s"] / ec.grid
  specs = {v.name: [_spec(out, sc, v, s, clock, cal["horizon_s"], grid_s, 20 * sc.calibration_rounds)
                    for s in ec.calibration_seeds] for v in candidates}
  docs = rec.run([x for v in candidates for x in specs[v.name]])  # all at once: every worker busy
  table, i = {}, 0
  for v in candidates:
    sets = [run_metrics(d, cal["targets"])["tta_set"] for d in docs[i:i + len(ec.calibration_seeds)]]
    i += len(ec.calibration_seeds)
    table[v.name] = {"tta_set": sets, "median": float(np.median([math.inf if x is None else x for x in sets]))}
  best = min(candidates, key=lambda v: table[v.name]["median"])
  return best, {k: {"tta_set_per_seed": t["tta_set"], "median_tta_set_s": stats._finite_or_none(t["median"])}
                for k, t in table.items()}


def tune(rec: Recorder, out: Path, sc: Scenario, ec: EvidenceConfig, clock: dict, cal: dict) -> dict:
  """Everything chosen for ``sc``, on the calibration seeds only."""
  k = sc.clients_per_round
  deadline = [Variant(f"deadline[q={q:g}]", "deadline", (("deadline_quantile", q),)) for q in ec.deadline_quantiles]
  sizes = sorted({max(1, int(round(f * k))) for f in ec.buffer_fractions})
  fedbuff = [Variant(f"fedbuff[K={b}]", "fedbuff", (("buffer_size", b), ("concurrency", k))) for b in sizes]
  fulls = [v for v in FULL_VARIANTS if v.name in ec.full_candidates]
  rec.run([_spec(out, sc, v, s, clock, cal["horizon_s"], cal["horizon_s"] / ec.grid, 20 * sc.calibration_rounds)
           for v in deadline + fedbuff + fulls for s in ec.calibration_seeds])  # all at once
  d_best, d_table = _best(rec, out, sc, ec, clock, cal, deadline)
  f_best, f_table = _best(rec, out, sc, ec, clock, cal, fedbuff)
  full_best, full_table = _best(rec, out, sc, ec, clock, cal, fulls)
  return {"deadline": {"chosen": d_best.name, "overrides": dict(d_best.overrides), "candidates": d_table},
          "fedbuff": {"chosen": f_best.name, "overrides": dict(f_best.overrides), "candidates": f_table},
          "full": {"chosen": full_best.name, "overrides": dict(full_best.overrides), "candidates": full_table},
          "rule": "lowest median task-set time to accuracy over the calibration seeds (never reached = infinite; "
                  "ties: the first listed)"}


def policies_of(tuned: dict, ablations: bool) -> list[Variant]:
  """The variants every evaluation seed runs: the baselines (deadline and fedbuff as tuned),
  ``full`` (its default variant) and, with ``ablations``, every other ``full`` variant."""
  out = [Variant("none", "none"), Variant("intra", "intra"),
         Variant("deadline", "deadline", tuple(tuned["deadline"]["overrides"].items())),
         Variant("overselect", "overselect"),
         Variant("fedbuff", "fedbuff", tuple(tuned["fedbuff"]["overrides"].items())),
         Variant("full", "full", tuple(tuned["full"]["overrides"].items()), "full")]
  if ablations:
    out += [v for v in FULL_VARIANTS if v.name != tuned["full"]["chosen"]]
  return out


BASELINES = ("none", "intra", "deadline", "overselect", "fedbuff")


def summarize_scenario(sc: Scenario, cal: dict, tuned: dict, runs: dict, seeds: Sequence[int], best_baseline: str,
                       out: Path) -> dict:
  """Per policy: TTA of every seed, ratios with intervals, plateaus, extra work, diagnostics."""
  targets = cal["targets"]
  m = {v: [run_metrics(d, targets) for d in docs] for v, docs in runs.items()}
  none_set = [x["tta_set"] for x in m["none"]]
  best_set = [x["tta_set"] for x in m[best_baseline]]
  pol = {}
  for v, ms in m.items():
    sets = [x["tta_set"] for x in ms]
    pol[v] = {
        "tta_set_s": sets,
        "tta_s": {t: [x["tta"][t] for x in ms] for t in sc.tasks},
        "ratio_vs_none": stats.paired_ratio(none_set, sets),
        "ratio_vs_best_baseline": stats.paired_ratio(best_set, sets),
        "ratio_vs_none_per_task": {t: stats.paired_ratio([x["tta"][t] for x in m["none"]], [x["tta"][t] for x in ms])
                                   for t in sc.tasks},
        "plateau": {t: stats.summarize([x["plateau"][t] for x in ms]) for t in sc.tasks},
        "plateau_vs_none": {t: stats.summarize([a["plateau"][t] - b["plateau"][t] for a, b in zip(ms, m["none"])])
                            for t in sc.tasks},
        "work_beyond_nominal_s": stats.summarize([x["work_beyond_nominal_s"] for x in ms]),
        "work_s": stats.summarize([x["work_s"] for x in ms]),
        "fl_throughput": stats.summarize([x["fl_throughput"] for x in ms]),
        "rounds": [x["rounds"] for x in ms], "dropped_updates": [x["dropped"] for x in ms],
        "wall_s": [round(x["wall_s"], 2) for x in ms],
        "runs": [str(Path(d["__path__"]).relative_to(out)) for d in runs[v]]}
    pol[v]["verdict_vs_none"] = stats.verdict(pol[v]["ratio_vs_none"])
    pol[v]["verdict_vs_best_baseline"] = stats.verdict(pol[v]["ratio_vs_best_baseline"])
  reached = {s: all(x is not None for x in m["none"][i]["tta"].values()) for i, s in enumerate(seeds)}
  return {"name": sc.name, "scenario": dataclasses.asdict(sc), "calibration": cal, "tuned": tuned,
          "targets": targets, "horizon_s": cal["horizon_s"], "grid_s": cal["horizon_s"] / len(runs["none"][0]
                                                                                            ["evaluations"]),
          "best_baseline": best_baseline, "none_reached_every_target": reached, "policies": pol,
          # each seed's evaluation grid: (virtual time, {task: metric}) per point, for the bands of fig. 6
          "curves": {v: [[[e["virtual_time_s"], e["metrics"]] for e in d["evaluations"]] for d in docs]
                     for v, docs in runs.items()}}


def run_evidence(ec: EvidenceConfig, out: str | Path = "results/evidence", log=print) -> dict:
  """Records (or resumes) the evidence of ``ec`` into ``out`` and writes ``out/evidence.json``."""
  from mtfl_jax.calibration import load_or_calibrate, load_or_measure_corrections
  from mtfl_jax.clock import inputs_json
  from mtfl_jax.federated import FedConfig, build_federation
  from mtfl_jax.device import device_name
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  rec = Recorder(out, ec.workers, log)
  scenarios, sweep = [], []
  try:
    for group, items in (("main", ec.scenarios), ("sweep", ec.sweep)):
      for sc in items:
        log(f"[evidence] {sc.name} ({group})")
        model, _ = load_or_calibrate(sc.tasks, ec.clock_backend, log=log)
        fed = build_federation(FedConfig(**{**sc.fed_fields(), "tasks": sc.tasks, "seed": ec.calibration_seeds[0]}))
        corrections, _ = load_or_measure_corrections(sc.tasks, model, [fed.workloads(c) for c in
                                                                        range(sc.num_clients)], log=log)
        clock = inputs_json(model, corrections)
        cal = _calibration_none(rec, out, sc, ec, clock)
        log(f"  targets {cal['targets']}, horizon {cal['horizon_s']:.1f} virtual s")
        if sc.tune or not scenarios:
          tuned = tune(rec, out, sc, ec, clock, cal)
        else:  # the first scenario's choices (tuned on the calibration seeds there)
          tuned = {**scenarios[0]["tuned"], "from": scenarios[0]["name"]}
        variants = policies_of(tuned, ec.ablations and sc.ablations)
        grid_s = cal["horizon_s"] / ec.grid
        specs = {v.name: [_spec(out, sc, v, s, clock, cal["horizon_s"], grid_s, 20 * sc.calibration_rounds)
                          for s in ec.seeds] for v in variants}
        docs = rec.run([x for v in variants for x in specs[v.name]])  # all at once: every worker busy
        runs = {}
        for v in variants:
          runs[v.name] = docs[:len(ec.seeds)]
          docs = docs[len(ec.seeds):]
          for d, sp in zip(runs[v.name], specs[v.name]):
            d["__path__"] = sp["path"]
        # the best baseline, chosen on the calibration seeds (not on the results it is compared with)
        best = _best_baseline(rec, out, sc, ec, clock, cal, tuned)
        doc = summarize_scenario(sc, cal, tuned, runs, ec.seeds, best, out)
        (scenarios if group == "main" else sweep).append(doc)
        # what is done so far, readable while the rest records (complete: False)
        write_json(out / "evidence.json", _document(ec, scenarios, sweep, t0, device_name(), complete=False, out=out))
  finally:
    rec.close()
  result = _document(ec, scenarios, sweep, t0, device_name(), complete=True, out=out)
  write_json(out / "evidence.json", result)
  return result


def runs_wall_time(out: str | Path) -> dict:
  """``{"runs", "wall_s"}``: how many runs the recording under ``out`` holds (calibration and
  tuning runs included) and the sum of their wall times, each timed in the process that ran
  it: the whole recording's compute time, however many sessions it was resumed over."""
  files = sorted(Path(out).glob("runs/**/*.json.gz"))
  return {"runs": len(files), "wall_s": round(sum(read_run(f)["wall_s"] for f in files), 1)}


def _document(ec: EvidenceConfig, scenarios: list, sweep: list, t0: float, device: str, complete: bool,
              out: str | Path | None = None) -> dict:
  return {"device": device, "mode": ec.mode, "complete": complete, "seeds": list(ec.seeds),
          "calibration_seeds": list(ec.calibration_seeds),
          "targets": {s["name"]: s["targets"] for s in scenarios + sweep},
          "definitions": {
              "tta": f"virtual seconds until the mean of a task's last {HOLD} evaluations on the grid is >= its target",
              "tta_set": "the latest of the tasks' TTAs (None: a task never reached its target)",
              "target": f"{TARGET_FRACTION} x the plateau of none on the calibration seeds",
              "plateau": f"mean of a run's last {PLATEAU_EVALS} evaluations (calibration: last "
                         f"{2 * PLATEAU_EVALS} per-round evaluations)",
              "ratio_vs_none": "paired per seed: none's task-set TTA / the policy's (above 1: faster); median "
                               "and 95% bootstrap interval over seeds; 'inf': none never got there, 0: the policy "
                               "never did",
              "ratio_vs_best_baseline": "the same against the baseline with the best median task-set TTA on the "
                                        "calibration seeds",
              "work_beyond_nominal_s": "training work (solo-seconds) beyond the clients' nominal epochs: never a gain",
              "fl_throughput": "work per virtual second: a diagnostic, not a result"},
          "scenarios": scenarios, "sweep": sweep, "wall_s": round(time.perf_counter() - t0, 1),
          "wall_s_means": "this invocation's wall time (a resumed recording counts only its last part); "
                          "runs_wall_s: the sum of every run's own wall time, over all sessions",
          "runs_wall_s": runs_wall_time(out) if out is not None else None}


def _best_baseline(rec: Recorder, out: Path, sc: Scenario, ec: EvidenceConfig, clock: dict, cal: dict,
                   tuned: dict) -> str:
  """The baseline with the best median task-set TTA on the calibration seeds (the tuned
  deadline and fedbuff under their tuning names: those runs are already on disk)."""
  named = {"deadline": tuned["deadline"]["chosen"], "fedbuff": tuned["fedbuff"]["chosen"]}
  baselines = [dataclasses.replace(v, name=named.get(v.name, v.name)) for v in policies_of(tuned, False)
               if v.name in BASELINES]
  best, _ = _best(rec, out, sc, ec, clock, cal, baselines)
  return next(k for k, v in named.items() if v == best.name) if best.name in named.values() else best.name


def evidence_table(doc: dict) -> str:
  """The evidence as text: per scenario and policy, the task-set TTA speedup over none and
  over the best baseline (median [95% interval], verdict), and the plateau differences."""
  f = lambda v: "never" if v is None else ("inf" if v == "inf" else f"{float(v):.2f}")  # noqa: E731
  r = lambda x: f"{f(x['median'])} [{f(x['ci95'][0])}, {f(x['ci95'][1])}]"  # noqa: E731
  lines = [f"time to accuracy over {len(doc['seeds'])} evaluation seeds on {doc['device']} ({doc['mode']}"
           + ("" if doc["mode"] == "full" else ": a smoke run, not evidence") + ")"]
  for s in doc["scenarios"] + doc.get("sweep", []):
    lines.append(f"{s['name']}: targets {s['targets']}, horizon {s['horizon_s']:.1f} virtual s, best baseline "
                 f"(calibration seeds) {s['best_baseline']}")
    lines.append(f"  {'policy':<28}{'vs none':>24}{'':>22}{'vs best baseline':>26}")
    for p, v in s["policies"].items():
      lines.append(f"  {p:<28}{r(v['ratio_vs_none']):>24} {v['verdict_vs_none']:<21}"
                   f"{r(v['ratio_vs_best_baseline']):>26} {v['verdict_vs_best_baseline']}")
  return "\n".join(lines)


def evidence_markdown(doc: dict, policies: Sequence[str] = ("none", "intra", "deadline", "overselect", "fedbuff",
                                                            "full"), scenarios: Sequence[str] | None = None) -> str:
  """A markdown table of the evidence: per scenario and policy, the task-set time to accuracy
  (median over seeds, virtual s), the speedup over none and over the best baseline with 95%
  intervals and verdicts, and the plateau difference from none per task."""
  def num(v, fmt=".2f"):
    return "never" if v is None else ("inf" if v == "inf" else format(float(v), fmt))

  def ratio(r):
    return f"{num(r['median'])}x [{num(r['ci95'][0])}, {num(r['ci95'][1])}]"

  rows = ["| scenario | policy | time to accuracy (s) | vs none | vs best baseline | plateau vs none |",
          "| --- | --- | --- | --- | --- | --- |"]
  for s in doc["scenarios"] + doc.get("sweep", []):
    if scenarios is not None and s["name"] not in scenarios:
      continue
    for p in policies:
      if p not in s["policies"]:
        continue
      v = s["policies"][p]
      sets = [x for x in v["tta_set_s"] if x is not None]
      tta = f"{np.median(sets):.1f}" if len(sets) == len(v["tta_set_s"]) else (
          f"{np.median(sets):.1f} ({len(v['tta_set_s']) - len(sets)} never)" if sets else "never")
      vs_none = "—" if p == "none" else f"{ratio(v['ratio_vs_none'])} {v['verdict_vs_none']}"
      vs_best = ("—" if p == s["best_baseline"] else
                 f"{ratio(v['ratio_vs_best_baseline'])} {v['verdict_vs_best_baseline']}")
      plat = "—" if p == "none" else "; ".join(
          f"{t} {num(x['median'], '+.3f')} [{num(x['ci95'][0], '+.3f')}, {num(x['ci95'][1], '+.3f')}]"
          for t, x in v["plateau_vs_none"].items())
      name = f"{p} ({s['best_baseline']} is the best baseline)" if p == s["best_baseline"] else p
      rows.append(f"| {s['name']} | {name} | {tta} | {vs_none} | {vs_best} | {plat} |")
  return "\n".join(rows)


def _main(argv=None) -> int:
  import argparse
  ap = argparse.ArgumentParser(prog="python -m mtfl_jax.experiments.evidence",
                               description="record the federated evidence (resumable), or print an evidence.json "
                                           "as a table")
  ap.add_argument("--mode", default="quick", choices=("quick", "full", "gpu", "tiny"))
  ap.add_argument("--out", help="where the runs and evidence.json go (rerun the same command to resume)")
  ap.add_argument("--markdown", help="print this evidence.json as a markdown table and exit")
  args = ap.parse_args(argv)
  if args.markdown:
    from mtfl_jax.files import read_json
    print(evidence_markdown(read_json(args.markdown, "evidence", "record it with --out DIR", fields=("scenarios",))))
    return 0
  if not args.out:
    ap.error("give --out DIR (or --markdown FILE)")
  doc = run_evidence(config(args.mode), args.out,
                     log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True))
  print(evidence_table(doc))
  return 0


if __name__ == "__main__":
  raise SystemExit(_main())
