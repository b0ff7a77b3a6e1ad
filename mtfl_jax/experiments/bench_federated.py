"""The federated benchmark: FL throughput, round time and accuracy under ``none``,
``deadline``, ``intra`` and ``full`` for several multi-task scenarios, and the simulator's
own speed (per-client loop against ``auto``).

Fair comparison: ``none`` runs ``rounds`` rounds; its virtual time is every other policy's
time budget (they stop before the first round that would overrun it, at most
``ROUND_CAP_FACTOR * rounds`` rounds), so accuracy is compared at equal virtual time
(``accuracy_at_budget``), beside the time each policy needs to reach 90% of ``none``'s
accuracy (``time_to_target_s``). FL throughput (``work_throughput``) is training work per
virtual second: a step of task i counts its solo step time ``s_i`` (``VRModel.solo_step_s``);
``samples_per_s`` is the plain sample rate.

The virtual clock's model of each task mix is fitted once per machine from a measured co-run
and kept in ``data/profiles/vr_<device>.json`` (:func:`mtfl_jax.calibration.load_or_calibrate`,
on ``clock_backend``); the same store keeps measured co-runs of the scenarios' most frequent
client workload mixes under equal and competitive shares (:func:`load_or_measure_corrections`),
which the clock uses instead of the model for clients of those mixes. Delete the file to re-measure.

Example::

    out = bench_federated(quick=True)
    out["scenarios"][0]["work_throughput"]   # {"none": ..., "deadline": ..., "intra": ..., "full": ...}
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mtfl_jax.calibration import load_or_calibrate, load_or_measure_corrections
from mtfl_jax.experiments.paper import PAPER, fl_gain_text
from mtfl_jax.experiments.scenarios import FED_SCENARIOS, FedScenario
from mtfl_jax.federated import ClientWork, FedConfig, build_federation, fedavg_program, run_federated
from mtfl_jax.federated.executors import AutoExecutor, LoopExecutor
from mtfl_jax.device import device_name
from mtfl_jax.files import write_json
from mtfl_jax.timing import time_calls
from mtfl_jax.train import init_variables

POLICY_ORDER = ("none", "deadline", "intra", "full")
ROUND_CAP_FACTOR = 4  # faster policies may run up to this many times none's rounds
TARGET_FRACTION = 0.9  # time to target: 90% of none's accuracy at the budget


# --------------------------------------------------------------------------- simulator speed
def bench_simulator(task: str, clients: int = 32, steps: int = 5, repeats: int = 3) -> dict:
  """Steady-state wall time of one round's client work: the per-client loop executor vs
  ``auto``'s choice (decided by measurement first, as a federated run does)."""
  cfg = FedConfig(tasks=(task,), num_clients=clients, clients_per_round=clients, alpha=None)
  fed = build_federation(cfg)
  ft = fed.tasks[0]
  program = fedavg_program(ft.task)
  params, model_state = init_variables(ft.task, 0)
  bc = {"params": params, "model_state": model_state}
  works = [ClientWork(c, ft.shards[c], steps, c) for c in range(clients)]
  n = np.array([len(w.indices) for w in works], np.float32)
  weights = {"delta": n / n.sum(), "model_state": n / n.sum()}
  loop, auto = LoopExecutor(ft, program), AutoExecutor(ft, program, clients_hint=clients)
  t0 = time.perf_counter()
  auto.run(bc, works, weights)
  decide_s = time.perf_counter() - t0
  loop_s, auto_s = (min(time_calls(lambda ex=ex: ex.run(bc, works, weights).sums, repeats)) for ex in (loop, auto))
  return {"task": task, "clients": clients, "local_steps": steps, "auto_mode": auto.choice,
          "loop_s": round(loop_s, 5), "auto_s": round(auto_s, 5), "speedup": round(loop_s / auto_s, 2),
          "auto_decision_s": round(decide_s, 2)}


def time_to_target(curve: list, task: str, target: float) -> float | None:
  """First virtual time at which ``task`` reached ``target`` in a run's curve (None: never)."""
  for point in curve:
    if point.get("accuracy", {}).get(task, -1.0) >= target:
      return point["virtual_time_s"]
  return None


# --------------------------------------------------------------------------- scenarios
def run_fed_scenario(sc: FedScenario, rounds: int, num_clients: int, per_round: int, seed: int,
                     log=print, clock_backend: str = "processes") -> dict:
  model, source = load_or_calibrate(sc.tasks, clock_backend, log=log)
  out = {"name": sc.name, "tasks": list(sc.tasks), "alpha": sc.alpha, "speed_sigma": sc.speed_sigma,
         "presence": sc.presence, "quantity_sigma": sc.quantity_sigma, "rounds_none": rounds,
         "round_cap": ROUND_CAP_FACTOR * rounds, "num_clients": num_clients, "clients_per_round": per_round,
         "vr_model": source, "solo_step_s": dict(model.solo_step_s),
         "work_unit": "solo-seconds on this machine: a step of task i counts s_i (VRModel.solo_step_s)",
         "work_throughput": {}, "samples_per_s": {}, "rounds_run": {}, "work_per_round_s": {},
         "round_times_s": {}, "round_time_s": {}, "idle_fraction": {}, "accuracy_at_budget": {},
         "curves": {}, "sim_wall_s": {}, "clock_measured_fraction": {}, "fednova_norm": {}}
  fed, budget, corrections = None, None, None
  for policy in POLICY_ORDER:
    cfg = FedConfig(tasks=sc.tasks, num_clients=num_clients, clients_per_round=per_round,
                    rounds=rounds if policy == "none" else ROUND_CAP_FACTOR * rounds, time_budget_s=budget,
                    alpha=sc.alpha, quantity_sigma=sc.quantity_sigma, presence=sc.presence,
                    speed_sigma=sc.speed_sigma, policy=policy, seed=seed)
    if fed is None:
      fed = build_federation(cfg)
      corrections, csource = load_or_measure_corrections(
          sc.tasks, model, [fed.workloads(c) for c in range(num_clients)], log=log)
      out["clock"] = {"intra_device": "modelled (VRModel, fitted from one measured co-run) and, for the clients "
                                      "whose mix was measured, corrected to the measured co-run",
                      "corrections": corrections.to_json(), "corrections_source": csource,
                      "inter_device": "modelled: lognormal device speed and bandwidth (mtfl_jax.clock)"}
    res = run_federated(cfg, model, progress=False, fed=fed, corrections=corrections)
    h = res.history
    if policy == "none":
      budget = res.virtual_time_s
      out["time_budget_s"] = round(budget, 6)  # as precise as the round times it bounds
    busy = [h_["round_time_s"] - v for h_ in h for v in h_["idle_s"].values()]
    idle = [v for h_ in h for v in h_["idle_s"].values()]
    meas = [v for h_ in h for v in h_["clock_measured"].values()]
    out["work_throughput"][policy] = round(res.fl_throughput, 6)
    out["samples_per_s"][policy] = round(res.samples_per_s, 2)
    out["rounds_run"][policy] = len(h)
    out["work_per_round_s"][policy] = [round(x["work_s"], 6) for x in h]
    out["round_times_s"][policy] = [round(x["round_time_s"], 6) for x in h]
    out["round_time_s"][policy] = round(float(np.mean([x["round_time_s"] for x in h])), 4)
    out["idle_fraction"][policy] = round(sum(idle) / max(sum(idle) + sum(busy), 1e-12), 4)
    out["accuracy_at_budget"][policy] = res.final_accuracy()
    out["clock_measured_fraction"][policy] = round(float(np.mean(meas)) if meas else 0.0, 3)
    out["fednova_norm"][policy] = h[0].get("fednova_norm")
    out["curves"][policy] = [{"virtual_time_s": x["virtual_time_s"], "accuracy": x.get("accuracy", {})} for x in h]
    out["sim_wall_s"][policy] = round(res.wall_s, 2)
    if policy in ("none", "deadline", "full"):
      out.setdefault("timeline", {})[policy] = {"round_time_s": h[0]["round_time_s"],
                                                "client_time_s": h[0]["client_time_s"],
                                                "dropped": [f["client"] for f in h[0]["failures"]]}
    log(f"  [{sc.name}] {policy}: {len(h)} rounds, work throughput {res.fl_throughput:.4f} "
        f"({res.samples_per_s:,.0f} samples/s), round {out['round_time_s'][policy]:.2f}s, "
        f"accuracy at budget {res.final_accuracy()}")
  thr = out["work_throughput"]
  out["gain"] = {"total": round(thr["full"] / thr["none"], 3), "intra": round(thr["intra"] / thr["none"], 3),
                 "inter": round(thr["full"] / thr["intra"], 3), "vs_deadline": round(thr["full"] / thr["deadline"], 3),
                 "deadline": round(thr["deadline"] / thr["none"], 3)}
  out["target"] = {t: round(TARGET_FRACTION * out["accuracy_at_budget"]["none"][t], 6) for t in sc.tasks}
  out["time_to_target_s"] = {p: {t: time_to_target(out["curves"][p], t, out["target"][t]) for t in sc.tasks}
                             for p in POLICY_ORDER}
  out["accuracy_vs_none"] = {p: {t: round(out["accuracy_at_budget"][p][t] - out["accuracy_at_budget"]["none"][t], 6)
                                 for t in sc.tasks} for p in POLICY_ORDER}
  return out


def bench_federated(quick: bool = True, scenarios: Sequence[FedScenario] = FED_SCENARIOS, seed: int = 0,
                    rounds: int | None = None, num_clients: int = 10, per_round: int | None = None,
                    simulator_tasks: Sequence[str] = ("digits_mlp", "mnist_lenet"),
                    json_path: str | Path | None = None, log=print, clock_backend: str = "processes") -> dict:
  """Runs every scenario and the simulator's speed test; returns (and writes to
  ``json_path``) the benchmark's JSON. The clock's model of each mix is calibrated on
  ``clock_backend`` (or read from the store)."""
  rounds = rounds or (6 if quick else 40)
  per_round = per_round or (5 if quick else num_clients)
  t0 = time.perf_counter()
  log(f"federated benchmark on {device_name()} ({'quick' if quick else 'full'}; {rounds} rounds, "
      f"{per_round} of {num_clients} clients per round)")
  out = {"device": device_name(), "mode": "quick" if quick else "full", "seed": seed,
         "paper": {"fl_throughput_gain": list(PAPER["fl_throughput_gain"])}, "clock_backend": clock_backend,
         "scenarios": [run_fed_scenario(sc, rounds, num_clients, per_round, seed, log, clock_backend)
                       for sc in scenarios]}
  sims = [bench_simulator(t) for t in simulator_tasks]
  out["simulator"] = {**sims[0], "per_task": sims}
  out["wall_s"] = round(time.perf_counter() - t0, 1)
  log(federated_table(out))
  if json_path:
    write_json(json_path, out)
  return out


def federated_table(out: dict) -> str:
  pols = POLICY_ORDER
  rows = [f"{'scenario':<22}" + "".join(f"{p:>10}" for p in pols)
          + f"{'full/none':>10}{'intra part':>11}{'inter part':>11}{'full/dl':>9}"]
  for s in out["scenarios"]:
    t, g = s["work_throughput"], s["gain"]
    rows.append(f"{s['name']:<22}" + "".join(f"{t[p]:>10.4f}" for p in pols)
                + f"{g['total']:>9.2f}x{g['intra']:>10.2f}x{g['inter']:>10.2f}x{g['vs_deadline']:>8.2f}x")
  rows.append("FL throughput: training work (solo-seconds, a step of task i counts s_i) per virtual second; "
              f"paper: {fl_gain_text()} full over none")
  for s in out["scenarios"]:
    rows.append(f"{s['name']}: accuracy at an equal virtual-time budget of {s['time_budget_s']:.1f}s: "
                + "; ".join(f"{p} {s['accuracy_at_budget'][p]}" for p in pols))
  for s in out["simulator"]["per_task"]:
    rows.append(f"simulator, {s['clients']} clients x {s['local_steps']} steps of {s['task']}: loop "
                f"{s['loop_s'] * 1e3:.1f} ms, auto ({s['auto_mode']}) {s['auto_s'] * 1e3:.1f} ms: {s['speedup']:.1f}x")
  rows.append(f"device: {out['device']}")
  return "\n".join(rows)
