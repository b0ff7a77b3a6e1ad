"""The federated benchmark: FL throughput, round time and accuracy under ``none``, ``intra``
and ``full`` for several multi-task scenarios, and the simulator's own speed (per-client
loop against ``auto``).

The virtual clock's model of each task mix is fitted once per machine from a measured co-run
and kept in ``data/profiles/vr_<device>.json`` (:func:`load_or_calibrate`), so that reruns
with the same seed give the same virtual-clock numbers; delete the file to re-measure.

Example::

    out = bench_federated(quick=True)
    out["scenarios"][0]["fl_throughput"]   # {"none": ..., "intra": ..., "full": ...}
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from mtfl_jax.federated import (ClientWork, FedConfig, build_federation, calibrate_mix, choose_mode,
                                init_server, run_clients, run_federated)
from mtfl_jax.profiling import default_profile_path, device_name
from mtfl_jax.results import read_json, write_json
from mtfl_jax.tasks import get_task
from mtfl_jax.vresource import VRModel

PAPER_FL_THROUGHPUT = (2.16, 2.38)  # Yu et al. 2022: full coordination vs none


@dataclasses.dataclass(frozen=True)
class FedScenario:
  name: str
  tasks: tuple[str, ...]
  alpha: float
  speed_sigma: float
  presence: float = 1.0
  quantity_sigma: float = 0.0


SCENARIOS = (
    FedScenario("mlp+cnn", ("digits_mlp", "mnist_lenet"), alpha=0.5, speed_sigma=0.5),
    FedScenario("mlp+cnn+unet", ("digits_mlp", "mnist_lenet", "shapes_unet"), alpha=0.5, speed_sigma=0.5,
                presence=0.7),
    FedScenario("skewed+heterogeneous", ("digits_mlp", "shapes_unet"), alpha=0.1, speed_sigma=1.0,
                quantity_sigma=1.0),
)


# --------------------------------------------------------------------------- the clock's model
def vr_store_path() -> Path:
  p = default_profile_path()
  return p.with_name("vr_" + p.name)


def load_or_calibrate(tasks: Sequence[str], path: str | Path | None = None, log=print) -> tuple[VRModel, str]:
  """The mix's virtual-resource model from ``path`` (default: this device's store), else
  measured now and added to the store. Returns the model and where it came from."""
  path = Path(path or vr_store_path())
  key = ",".join(tasks)
  store = read_json(path, "calibration store", "delete it to re-measure (one co-run per task mix)", fields=("mixes",)) if path.exists() else {"device": device_name(), "mixes": {}}
  if key in store["mixes"]:
    m = store["mixes"][key]
    return VRModel(m["solo_step_s"], m["demand"], m["fitted_rates"]), f"recorded in {path.name}"
  log(f"  calibrating the virtual-resource model of {key} (one co-run on 'processes')")
  model = calibrate_mix(tuple(tasks))
  store["mixes"][key] = dataclasses.asdict(model)
  write_json(path, store)
  return model, f"measured now, stored in {path.name}"


# --------------------------------------------------------------------------- simulator speed
def bench_simulator(task: str, clients: int = 32, steps: int = 5, repeats: int = 3) -> dict:
  """Steady-state wall time of one round's client work: per-client loop vs ``auto``'s choice
  (decided by measurement first, as a federated run does)."""
  cfg = FedConfig(tasks=(task,), num_clients=clients, clients_per_round=clients, alpha=None)
  fed = build_federation(cfg)
  t, ds = get_task(task), fed.datasets[task]
  params = init_server(cfg).params[task]
  works = [ClientWork(c, fed.shards[task][c], steps, c) for c in range(clients)]
  t0 = time.perf_counter()
  mode = choose_mode(t, ds, params, works)
  decide_s = time.perf_counter() - t0

  def timed(m):
    best = float("inf")
    for _ in range(repeats):
      t1 = time.perf_counter()
      jax.block_until_ready(run_clients(t, ds, params, works, m).deltas)
      best = min(best, time.perf_counter() - t1)
    return best

  loop_s = timed("loop")
  auto_s = timed(mode)
  return {"task": task, "clients": clients, "local_steps": steps, "auto_mode": mode,
          "loop_s": round(loop_s, 5), "auto_s": round(auto_s, 5), "speedup": round(loop_s / auto_s, 2),
          "auto_decision_s": round(decide_s, 2)}


# --------------------------------------------------------------------------- scenarios
def run_fed_scenario(sc: FedScenario, rounds: int, num_clients: int, per_round: int, seed: int,
                     log=print) -> dict:
  model, source = load_or_calibrate(sc.tasks, log=log)
  out = {"name": sc.name, "tasks": list(sc.tasks), "alpha": sc.alpha, "speed_sigma": sc.speed_sigma,
         "presence": sc.presence, "quantity_sigma": sc.quantity_sigma, "rounds": rounds,
         "num_clients": num_clients, "clients_per_round": per_round, "vr_model": source,
         "fl_throughput": {}, "round_time_s": {}, "idle_fraction": {}, "accuracy": {},
         "curves": {}, "sim_wall_s": {}}
  fed = None
  for policy in ("none", "intra", "full"):
    cfg = FedConfig(tasks=sc.tasks, num_clients=num_clients, clients_per_round=per_round, rounds=rounds,
                    alpha=sc.alpha, quantity_sigma=sc.quantity_sigma, presence=sc.presence,
                    speed_sigma=sc.speed_sigma, policy=policy, seed=seed)
    fed = fed if fed is not None else build_federation(cfg)
    fed.cfg = cfg
    res = run_federated(cfg, model, progress=False, fed=fed)
    h = res.history
    busy = [h_["round_time_s"] - v for h_ in h for v in h_["idle_s"].values()]
    idle = [v for h_ in h for v in h_["idle_s"].values()]
    out["fl_throughput"][policy] = round(res.fl_throughput, 2)
    out["round_time_s"][policy] = round(float(np.mean([x["round_time_s"] for x in h])), 4)
    out["idle_fraction"][policy] = round(sum(idle) / max(sum(idle) + sum(busy), 1e-12), 4)
    out["accuracy"][policy] = res.final_accuracy()
    out["curves"][policy] = [{"virtual_time_s": x["virtual_time_s"], "accuracy": x.get("accuracy", {})} for x in h]
    out["sim_wall_s"][policy] = round(res.wall_s, 2)
    if policy in ("none", "full"):
      out.setdefault("timeline", {})[policy] = {"round_time_s": h[0]["round_time_s"],
                                                "client_time_s": h[0]["client_time_s"]}
    log(f"  [{sc.name}] {policy}: throughput {res.fl_throughput:,.0f} samples/s (virtual), "
        f"round {out['round_time_s'][policy]:.2f}s, accuracy {res.final_accuracy()}")
  thr = out["fl_throughput"]
  out["gain"] = {"total": round(thr["full"] / thr["none"], 3), "intra": round(thr["intra"] / thr["none"], 3),
                 "inter": round(thr["full"] / thr["intra"], 3)}
  return out


def bench_federated(quick: bool = True, scenarios: Sequence[FedScenario] = SCENARIOS, seed: int = 0,
                    rounds: int | None = None, num_clients: int = 10, per_round: int | None = None,
                    simulator_tasks: Sequence[str] = ("digits_mlp", "mnist_lenet"),
                    json_path: str | Path | None = None, log=print) -> dict:
  rounds = rounds or (6 if quick else 30)
  per_round = per_round or (5 if quick else num_clients)
  t0 = time.perf_counter()
  log(f"federated benchmark on {device_name()} ({'quick' if quick else 'full'}; {rounds} rounds, "
      f"{per_round} of {num_clients} clients per round)")
  out = {"device": device_name(), "mode": "quick" if quick else "full", "seed": seed,
         "paper": {"fl_throughput_gain": list(PAPER_FL_THROUGHPUT)},
         "scenarios": [run_fed_scenario(sc, rounds, num_clients, per_round, seed, log) for sc in scenarios]}
  sims = [bench_simulator(t) for t in simulator_tasks]
  out["simulator"] = {**sims[0], "per_task": sims}
  out["wall_s"] = round(time.perf_counter() - t0, 1)
  log(federated_table(out))
  if json_path:
    write_json(json_path, out)
  return out


def federated_table(out: dict) -> str:
  rows = [f"{'scenario':<22}{'none':>10}{'intra':>10}{'full':>10}{'full/none':>10}{'intra part':>11}{'inter part':>11}"]
  for s in out["scenarios"]:
    t = s["fl_throughput"]
    rows.append(f"{s['name']:<22}{t['none']:>10,.0f}{t['intra']:>10,.0f}{t['full']:>10,.0f}"
                f"{s['gain']['total']:>9.2f}x{s['gain']['intra']:>10.2f}x{s['gain']['inter']:>10.2f}x")
  rows.append("FL throughput: training samples per virtual second; paper: 2.16x-2.38x full over none")
  for s in out["simulator"]["per_task"]:
    rows.append(f"simulator, {s['clients']} clients x {s['local_steps']} steps of {s['task']}: loop "
                f"{s['loop_s'] * 1e3:.1f} ms, auto ({s['auto_mode']}) {s['auto_s'] * 1e3:.1f} ms: {s['speedup']:.1f}x")
  rows.append(f"device: {out['device']}")
  return "\n".join(rows)
