"""The scale benchmark: client updates per wall second of the batched client executor
(:class:`~mtfl_jax.federated.executors.BatchedExecutor`, ``simulator="sharded"``) over devices
and processes.

A *client update* is one client's local training for a round: one local epoch on its
Dirichlet(0.5) shard of the task's training set (``ceil(n_c / batch)`` steps), every client of
the federation sampled in every round. Each (task, clients, devices, processes) *point* runs in
its own Python process (its own processes, for a multi-process point, joined by
``jax.distributed``; CPU collectives over gloo), so the device count is set before JAX starts and
the peak memory (``ru_maxrss``, the whole process: Python, JAX, the dataset, the compiled
programs) belongs to that point alone. A point runs one first round (which compiles) and
``rounds`` steady rounds; ``client_updates_per_s`` is ``clients * rounds / (wall time of the
steady rounds)``. The global model is updated between rounds (FedAvg, server learning rate 1),
and every round draws new client seeds, as a federated run does.

Layout: before any point runs, the batched layout of every (task, clients) is chosen once by
measurement, in a process of its own on one device (:func:`choose_point`): the choice
``simulator="auto"`` keeps in the calibration store for that round size, else measured now by
:func:`~mtfl_jax.federated.executors.choose_layout` and stored. Every batched point of that
(task, clients) runs it (``layouts`` in the JSON, with each candidate's measured seconds).

Correctness: the aggregate delta ``sum_c p_c delta_c`` (``p_c = n_c / sum n``) of the first
round of every point is compared with the single-device reference, computed once per
(task, clients) in the 1-device, 1-process point of the first repeat by the plain per-client
executor (:class:`~mtfl_jax.federated.executors.LoopExecutor`), weighted the same way.
``max_abs_diff`` is the largest absolute difference over all parameters; ``rel_diff`` divides
it by the largest absolute entry of the reference delta; ``ulp_rel`` is one float32 step of the
largest initial parameter on that same scale (a delta is a difference of parameters, so a
layout that rounds differently, e.g. a convolution computed as patches and a matmul, lands
about one such step away).

Data: a federation of ``C`` clients needs every client to hold a sample. digits has 1,438
training samples, too few for 1,000 Dirichlet(0.5) clients, so the training set is repeated
``ceil(C / 100)`` times (1,000 clients: 10 copies) before partitioning: at 100 clients the
shards are exactly those of ``build_federation(FedConfig(num_clients=100, alpha=0.5))``, and at
1,000 clients the mean shard is the same size.

Repeats are interleaved (every point of a repeat runs before any point of the next, the
order of the device/process configurations reversed on odd repeats), so drift of a shared
machine hits every configuration alike; tables report medians over repeats.

Example::

    out = bench_scale(quick=True)
    out["speedup"]["digits_mlp"]      # {"2_devices_vs_1": ..., "2_processes_vs_1": ...} at 100 clients

Run a single point by hand (what the benchmark does per point)::

    python -m mtfl_jax.experiments.bench_scale --point '{"task": "digits_mlp", "clients": 100,
        "devices": 2, "processes": 1, "rounds": 3, "out": "/tmp/p.json"}'
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

SEED = 0
ALPHA = 0.5
SHARD_CLIENTS = 100  # the training set is repeated ceil(clients / SHARD_CLIENTS) times
TARGETS = {"speedup_2x": 1.6, "mlp_1000_round_s": 10.0, "rel_diff": 1e-5, "abs_diff": 1e-5,
           "memory_ratio_1000_vs_100": 2.0, "lenet_batched_vs_loop": 4.0, "lenet_mfu": 0.30}


def _modes(quick: bool, cores: int) -> dict:
  """What quick and full run (configs: (devices in all, processes))."""
  if quick:
    configs = [(1, 1), (2, 1), (2, 2)]
    work = [("digits_mlp", 100), ("digits_mlp", 1000), ("mnist_lenet", 100)]
    rounds = {("digits_mlp", 100): 8, ("digits_mlp", 1000): 3, ("mnist_lenet", 100): 3}
    repeats = 2
  else:
    configs = [(d, 1) for d in range(1, max(2, cores) + 1)] + [(2, 2)] + ([(4, 2)] if cores >= 4 else [])
    work = [("digits_mlp", 100), ("digits_mlp", 1000), ("mnist_lenet", 100), ("mnist_lenet", 1000)]
    rounds = {("digits_mlp", 100): 30, ("digits_mlp", 1000): 10, ("mnist_lenet", 100): 10, ("mnist_lenet", 1000): 3}
    repeats = 3
  return {"configs": configs, "work": work, "rounds": rounds, "repeats": repeats}


def quick_skips(cores: int) -> str:
  full = _modes(False, cores)
  return (f"quick runs {_modes(True, cores)['repeats']} repeats of fewer steady rounds (full: "
          f"{full['repeats']} repeats, {', '.join(f'{t} x{c}: {r}' for (t, c), r in full['rounds'].items())} rounds), "
          "and skips mnist_lenet at 1,000 clients"
          + (f" and 3..{cores} devices" if cores > 2 else "")
          + (" and 2 processes of 2 devices" if cores >= 4 else ""))


# --------------------------------------------------------------------------- one point (in its own process)
def scale_federation(task, clients: int, seed: int = SEED):
  """``(dataset, shards)``: the task's training set repeated ``ceil(clients / 100)`` times and
  its Dirichlet(0.5) partition over ``clients`` clients (the partition seed of
  :func:`~mtfl_jax.federated.federation.build_federation` for a one-task federation)."""
  import dataclasses

  from mtfl_jax.partition import skewed_partition
  ds = task.load_data(allow_synthetic=False)
  rep = max(1, math.ceil(clients / SHARD_CLIENTS))
  if rep > 1:
    ds = dataclasses.replace(ds, x_train=np.concatenate([ds.x_train] * rep), y_train=np.concatenate([ds.y_train] * rep))
  shards = skewed_partition(ds.y_train, clients, alpha=ALPHA, seed=seed + 101)
  return ds, shards, rep


def _peak_rss_mb() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def choose_point(spec: dict) -> dict:
  """The batched layout of ``spec["task"]`` at ``spec["clients"]`` clients on this machine, in
  this process on one device: the one kept in the calibration store for that round size (what
  ``simulator="auto"`` uses), else measured now by
  :func:`~mtfl_jax.federated.executors.choose_layout` and kept there. Writes, and returns,
  ``{"key", "source", "choice", "inner", "per_device"}``: the fastest batched layout measured
  (the runner-up when the per-client loop measured faster)."""
  from mtfl_jax import distributed
  distributed.use_cpu_devices(1)
  from mtfl_jax.federated.client import fedavg_program
  from mtfl_jax.federated.executors import best_batched, layout_key, stored_or_measured_layout
  from mtfl_jax.federated.federation import FedTask
  from mtfl_jax.tasks import get_task
  task = get_task(spec["task"])
  clients = int(spec["clients"])
  ds, shards, _ = scale_federation(task, clients, int(spec.get("seed", SEED)))
  ft, program = FedTask(task, 0, ds, tuple(shards), 0.0), fedavg_program(task)
  choice, source = stored_or_measured_layout(ft, program, clients)
  inner, per_device = best_batched(choice)
  res = {"key": layout_key(ft, program, clients)[0], "source": source, "choice": choice,
         "inner": inner, "per_device": per_device}
  outp = Path(spec["out"])
  outp.with_name(f"{outp.stem}.p0.json").write_text(json.dumps(res))
  return res


def step_costs(task_name: str) -> dict:
  """FLOPs and bytes of one plain train step of the task (XLA's cost analysis): the work a
  client step does, whatever layout runs it (MFU counts these, not a layout's extra work)."""
  import jax

  from mtfl_jax.profiling import xla_costs
  from mtfl_jax.tasks import get_task
  from mtfl_jax.train import init_state, make_train_step, synthetic_batches
  task = get_task(task_name)
  batch = jax.tree.map(lambda b: b[0], synthetic_batches(task, 1))
  compiled = jax.jit(make_train_step(task)).lower(init_state(task, 0), batch).compile()
  c = xla_costs(compiled)
  return {"flops": c["flops"], "bytes": c["bytes"]}


def run_point(spec: dict) -> dict:
  """Runs one point in this process (see the module docstring) and writes its JSON (and, on
  process 0, the first round's aggregate delta) next to ``spec["out"]``."""
  from mtfl_jax import distributed
  processes, pid = int(spec.get("processes", 1)), int(spec.get("process_id", 0))
  devices = int(spec["devices"])
  if devices % processes:
    raise ValueError(f"{devices} devices do not split over {processes} processes")
  distributed.use_cpu_devices(devices // processes)
  distributed.initialize(spec.get("coordinator"), processes, pid, timeout_s=int(spec.get("join_timeout", 120)))
  import jax

  from mtfl_jax.federated.client import ClientWork, client_seed, fedavg_program
  from mtfl_jax.federated.executors import BatchedExecutor, LoopExecutor, client_mesh
  from mtfl_jax.federated.federation import FedTask
  from mtfl_jax.tasks import get_task
  from mtfl_jax.train import init_variables, workload_steps

  xla_compiles = [0]
  try:
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    def on_event(event, _secs, **_kw):
      if event == BACKEND_COMPILE_EVENT:
        xla_compiles[0] += 1
    jax.monitoring.register_event_duration_secs_listener(on_event)
  except (ImportError, AttributeError):  # another JAX: the XLA count is then not measured
    xla_compiles[0] = None

  task = get_task(spec["task"])
  clients, rounds, seed = int(spec["clients"]), int(spec["rounds"]), int(spec.get("seed", SEED))
  ds, shards, rep = scale_federation(task, clients, seed)
  steps = [workload_steps(len(s), task.batch_size, 1.0) for s in shards]
  n = np.array([len(s) for s in shards], np.float64)
  p = (n / n.sum()).astype(np.float32)
  params0, state0 = jax.jit(lambda: init_variables(task, seed))()  # one compile, not one per eager init op
  params = jax.tree.map(np.asarray, params0)
  model_state = jax.tree.map(np.asarray, state0)
  ft = FedTask(task, 0, ds, tuple(shards), 0.0)
  program = fedavg_program(task)
  if spec.get("executor", "batched") == "loop":  # the reference: one client after another
    sim = LoopExecutor(ft, program)
  else:  # the layout the parent chose by measurement (choose_point), else the executor's default
    sim = BatchedExecutor(ft, program, client_mesh(devices), inner=spec.get("inner"),
                          per_device=spec.get("per_device"), clients_hint=clients)
  weights = {"delta": p, "model_state": p}

  def works(rnd):
    return [ClientWork(c, shards[c], steps[c], client_seed(seed, rnd, 0, c)) for c in range(clients)]

  times, delta0 = [], None
  xla_start = xla_compiles[0]
  for rnd in range(1 + rounds):
    t0 = time.perf_counter()
    out = sim.run({"params": params, "model_state": model_state}, works(rnd), weights)
    times.append(time.perf_counter() - t0)
    if rnd == 0:
      delta0, xla_first = out.sums["delta"], xla_compiles[0]
    params = jax.tree.map(lambda a, d: (a + d).astype(a.dtype), params, out.sums["delta"])  # FedAvg, server lr 1
    if jax.tree.leaves(model_state):
      model_state = jax.tree.map(lambda s, ref: s.astype(ref.dtype), out.sums["model_state"], model_state)
  rss = _peak_rss_mb()  # before the reference below, which holds every client's delta at once
  steady = sum(times[1:])
  res = {"task": task.name, "clients": clients, "devices": devices, "devices_per_process": devices // processes,
         "processes": processes, "process_id": pid, "inner": getattr(sim, "inner", None),
         "chunk_per_device": sim.chunk_size(clients) if hasattr(sim, "chunk_size") else 1,
         "local_steps": int(sum(steps)), "data_repeat": rep, "train_samples": int(len(ds.y_train)),
         "rounds_steady": rounds, "first_round_s": round(times[0], 4),
         "round_s": round(steady / rounds, 4) if rounds else None,
         "client_updates_per_s": round(clients * rounds / steady, 2) if rounds else None,
         "executor": sim.name, "compiles_first_round": None if xla_first is None else xla_first - xla_start,
         "compiles_after_first_round": None if xla_first is None else xla_compiles[0] - xla_first,
         "peak_rss_mb": round(rss, 1), "platform": jax.devices()[0].platform,
         "param_ulp": float(np.spacing(np.float32(max(float(np.max(np.abs(a))) for a in jax.tree.leaves(params0)))))}
  outp = Path(spec["out"])
  if pid == 0:
    np.savez(outp.with_suffix(".delta.npz"), *jax.tree.leaves(delta0))
    if spec.get("reference"):
      ref = LoopExecutor(ft, program).run({"params": params0, "model_state": state0}, works(0), weights)
      np.savez(outp.with_suffix(".ref.npz"), *[np.asarray(a) for a in jax.tree.leaves(ref.sums["delta"])])
  outp.with_name(f"{outp.stem}.p{pid}.json").write_text(json.dumps(res))
  return res


# --------------------------------------------------------------------------- the parent
def _child_env() -> dict:
  from mtfl_jax.distributed import child_environ
  env = child_environ()
  root = str(Path(__file__).resolve().parents[2])  # this checkout's mtfl_jax, whatever is installed
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def launch_point(spec: dict, timeout_s: float = 1800) -> dict:
  """Runs ``spec`` in fresh processes (``python -m mtfl_jax.experiments.bench_scale --point``;
  ``processes`` of them joined over ``jax.distributed``) and returns process 0's JSON, with
  ``peak_rss_mb_per_process``; a failed point raises ``RuntimeError`` with its output's end."""
  from mtfl_jax.distributed import core_share, free_port, stop_processes
  processes = int(spec.get("processes", 1))
  if processes > 1:
    spec = {**spec, "coordinator": f"127.0.0.1:{free_port()}"}
  env, procs, logs = _child_env(), [], []
  out = Path(spec["out"])
  try:
    for i in range(processes):
      log = open(out.with_name(f"{out.stem}.p{i}.log"), "w+")
      logs.append(log)
      cmd = [sys.executable, "-m", "mtfl_jax.experiments.bench_scale", "--point",
             json.dumps({**spec, "process_id": i, "parent_pid": os.getpid()})]
      cores = core_share(i, processes) if processes > 1 else None  # as distributed.launch_local does
      penv = {**env, "MTFL_CPU_CORES": ",".join(map(str, cores))} if cores else env
      procs.append(subprocess.Popen(cmd, env=penv, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    while True:
      codes = [p.poll() for p in procs]
      if any(c not in (None, 0) for c in codes) or all(c is not None for c in codes):
        break
      if time.monotonic() > deadline:
        break
      time.sleep(0.1)
    failed = [i for i, p in enumerate(procs) if p.poll() != 0]
    if failed:
      stop_processes(procs)
      i = failed[0]
      logs[i].seek(0)
      tail = "".join(logs[i].readlines()[-15:]).strip()
      how = "timed out" if procs[i].returncode is None or procs[i].returncode < 0 else f"exited {procs[i].returncode}"
      raise RuntimeError(f"scale point {json.dumps({k: spec[k] for k in ('task', 'clients', 'devices', 'processes')})}: "
                         f"process {i} {how}:\n{tail}")
  finally:
    stop_processes(procs)
    for log in logs:
      log.close()
  res = [json.loads(out.with_name(f"{out.stem}.p{i}.json").read_text()) for i in range(processes)]
  return {**res[0], "peak_rss_mb_per_process": [r.get("peak_rss_mb") for r in res]}


def _diff(delta_npz: Path, ref_npz: Path) -> tuple[float, float, float]:
  """``(max_abs_diff, rel_diff, max |reference|)`` of two saved parameter trees."""
  a, b = np.load(delta_npz), np.load(ref_npz)
  keys = sorted(a.files, key=lambda k: int(k.split("_")[1]))
  if sorted(b.files) != sorted(a.files) or any(a[k].shape != b[k].shape for k in keys):
    raise RuntimeError(f"{delta_npz} and {ref_npz} hold different parameter trees")
  abs_ = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in keys)
  scale = max(float(np.max(np.abs(b[k]))) for k in keys)
  return abs_, abs_ / scale if scale > 0 else abs_, scale


def _median(xs):
  xs = [x for x in xs if x is not None]
  return float(np.median(xs)) if xs else None


def _choose_layouts(layouts, tmp, work, seed, log, point_timeout_s) -> None:
  """The batched layout of every (task, clients), chosen by measurement once per machine
  (:func:`choose_point`, in a process of its own before any point runs) into ``layouts``."""
  for t, c in work:
    spec = {"task": t, "clients": c, "devices": 1, "processes": 1, "seed": seed, "choose": True,
            "out": str(tmp / f"{t}_{c}_layout.json")}
    try:
      res = launch_point(spec, point_timeout_s)
    except RuntimeError as e:
      log(f"  layout of {t} at {c} clients not chosen, the executor's default runs: {e}")
      layouts[f"{t}/{c}"] = {"error": str(e), "inner": None, "per_device": None}
      continue
    res.pop("peak_rss_mb_per_process", None)
    layouts[f"{t}/{c}"] = res
    secs = ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in res["choice"].get("seconds", {}).items())
    log(f"  layout of {t} at {c} clients ({res['source']}{': ' + secs if secs else ''}): batched points run "
        f"{res['inner']}" + (f"/{res['per_device']}" if res["per_device"] else ""))


def _run_points(points, tmp, configs, work, repeats, rounds_of, seed, log, point_timeout_s, layouts=None) -> None:
  """Every point of every repeat (interleaved), then each one's diff from its reference. On
  one device in one process, the per-client loop executor runs beside the batched layout, at
  the same task and client count; the batched points run ``layouts[f"{task}/{clients}"]``."""
  layouts = layouts or {}
  for r in range(repeats):
    order = [(d, pr, ex) for d, pr in configs for ex in (("loop", "batched") if (d, pr) == (1, 1) else ("batched",))]
    order = order if r % 2 == 0 else order[::-1]
    for t, c in work:
      for d, pr, ex in order:
        stem = f"{t}_{c}_d{d}_p{pr}_{ex}_r{r}"
        spec = {"task": t, "clients": c, "devices": d, "processes": pr, "rounds": rounds_of(t, c), "seed": seed,
                "executor": ex, "out": str(tmp / f"{stem}.json"),
                "reference": r == 0 and (d, pr) == (1, 1) and ex == "loop"}
        if ex == "batched":
          lay = layouts.get(f"{t}/{c}", {})
          spec.update(inner=lay.get("inner"), per_device=lay.get("per_device"))
        try:
          res = launch_point(spec, point_timeout_s)
        except RuntimeError as e:
          log(f"  FAILED {stem}: {e}")
          points.append({"task": t, "clients": c, "devices": d, "processes": pr, "executor": ex, "repeat": r,
                         "error": str(e)})
          continue
        res["repeat"], res["executor_kind"] = r, ex
        res["_delta"] = str(tmp / f"{stem}.delta.npz")
        points.append(res)
        log(f"  [{r}] {t:<12} {c:>5} clients, {d} device(s), {pr} process(es), {res['executor']}: "
            f"{res['client_updates_per_s']:>9.1f} updates/s, round {res['round_s']:.3f}s, first {res['first_round_s']:.1f}s, "
            f"{res['compiles_after_first_round']} compiles after the first round, peak {res['peak_rss_mb']:.0f} MB")
  for pt in points:  # correctness: against the single-device reference of its (task, clients)
    if "error" in pt:
      continue
    ref, delta = tmp / f"{pt['task']}_{pt['clients']}_d1_p1_loop_r0.ref.npz", Path(pt.pop("_delta"))
    pt["max_abs_diff"], pt["rel_diff"], scale = (_diff(delta, ref) if ref.exists() and delta.exists()
                                                 else (None, None, None))
    # one float32 step (ulp) of the largest parameter, on the reference delta's scale
    pt["ulp_rel"] = pt["param_ulp"] / scale if scale else None


def bench_scale(quick: bool = True, json_path: str | Path | None = None, *, configs: Sequence | None = None,
                work: Sequence | None = None, rounds: int | dict | None = None, repeats: int | None = None,
                seed: int = SEED, log=print, point_timeout_s: float = 1800) -> dict:
  """Runs every point (module docstring), prints the table, speedups, seconds per round of
  1,000 MLP clients and memory ratios, and returns (and writes to ``json_path``) the JSON.
  ``configs`` ((devices, processes) pairs), ``work`` ((task, clients) pairs), ``rounds``
  (steady rounds: one count, or per (task, clients)) and ``repeats`` override the mode's."""
  from mtfl_jax.device import device_name
  from mtfl_jax.files import write_json
  cores = len(os.sched_getaffinity(0))
  mode = _modes(quick, cores)
  configs = [tuple(c) for c in (configs or mode["configs"])]
  work = [tuple(w) for w in (work or mode["work"])]
  repeats = int(repeats or mode["repeats"])
  if (1, 1) not in configs:
    raise ValueError("the configs must include (1 device, 1 process): it computes the reference")

  def rounds_of(t, c):
    n = rounds if isinstance(rounds, int) else (rounds or {}).get((t, c), mode["rounds"].get((t, c), 3))
    if n < 1:
      raise ValueError(f"steady rounds must be >= 1 (the first round, which compiles, is not timed), got {n}")
    return n

  t_start = time.perf_counter()
  os.environ.setdefault("TFDS_DISABLE_GCS", "1")
  dev = device_name()
  load = os.getloadavg()
  log(f"scale benchmark on {dev} ({'quick' if quick else 'full'}; {repeats} interleaved repeats; "
      f"load average {load[0]:.1f} at start)")
  points, layouts, tmp = [], {}, Path(tempfile.mkdtemp(prefix="mtfl_scale_"))
  try:
    _choose_layouts(layouts, tmp, work, seed, log, point_timeout_s)
    _run_points(points, tmp, configs, work, repeats, rounds_of, seed, log, point_timeout_s, layouts)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  # model FLOP utilisation of every point: one plain train step's FLOPs (XLA's cost analysis)
  # times the steps per round, per wall second, over this machine's matmul peak (measured
  # here, after the points); arithmetic intensity: the step's FLOPs per byte moved
  from mtfl_jax.device import device_peak_flops
  peak = device_peak_flops()
  costs = {t: step_costs(t) for t in {w[0] for w in work}}
  for pt in points:
    if "error" in pt or not pt.get("round_s"):
      continue
    c = costs[pt["task"]]
    pt["flops_per_step"], pt["intensity_flop_per_byte"] = c["flops"], round(c["flops"] / max(c["bytes"], 1.0), 3)
    pt["achieved_flops"] = c["flops"] * pt["local_steps"] / pt["round_s"]
    pt["mfu"] = round(pt["achieved_flops"] / peak, 4)

  out = {"device": dev, "cores": cores, "mode": "quick" if quick else "full", "repeats": repeats, "seed": seed,
         "peak_flops": peak, "mfu": "achieved FLOP/s (one plain train step's XLA FLOPs x local steps per round / steady "
                                    "round seconds) over peak_flops (a measured fp32 matmul); layouts that compute "
                                    "more (patched convolutions) are credited with the plain step's FLOPs only",
         "load_average_start": [round(x, 2) for x in load], "load_average_end": [round(x, 2) for x in os.getloadavg()],
         "quick_skips": quick_skips(cores) if quick else None,
         "client_update": "one client's local training in a round: 1 local epoch (ceil(n_c / batch) steps) on its "
                          f"Dirichlet({ALPHA}) shard; all clients sampled every round",
         "client_updates_per_s": "clients x steady rounds / wall seconds of the steady rounds (the first round, "
                                 "which compiles, excluded)",
         "data": f"the training set is repeated ceil(clients / {SHARD_CLIENTS}) times before partitioning "
                 "(data_repeat), so every client of 1,000 holds a sample; at 100 clients the shards are "
                 "build_federation's",
         "reference": "max_abs_diff / rel_diff: the first round's aggregate delta against the single-device "
                      "per-client loop executor computed in the 1-device, "
                      "1-process point of repeat 0; rel_diff = max_abs_diff / max |reference|",
         "peak_rss": "resource.getrusage maxrss of the point's process (whole process: Python, JAX, data, "
                     "programs), read after the timed rounds and before the reference; per process for 2 processes",
         "layouts": layouts,
         "layout_choice": "per (task, clients): the batched layout kept in the calibration store for that round "
                          "size (as simulator='auto' keeps it), else measured before the points by choose_layout "
                          "(each candidate on the real clients, 3 local steps, median of 3 interleaved runs) and "
                          "stored; when the per-client loop measured faster, the fastest batched candidate runs",
         "points": points}
  out["summary"] = summarize(points)
  out["speedup"], out["mlp_1000_round_s"], out["memory_ratio_1000_vs_100"] = derived(out["summary"])
  out["targets"] = targets(out)
  out["wall_s"] = round(time.perf_counter() - t_start, 1)
  log(scale_table(out))
  if json_path:
    write_json(json_path, out)
    log(f"wrote {json_path}")
  return out


def summarize(points: list) -> list:
  """Per (task, clients, devices, processes, executor): medians over repeats, and each
  repeat's value."""
  groups: dict = {}
  for pt in points:
    key = (pt["task"], pt["clients"], pt["devices"], pt["processes"], pt.get("executor_kind", pt.get("executor")))
    groups.setdefault(key, []).append(pt)
  rows = []
  for (t, c, d, pr, ex), pts in groups.items():
    ok = [p for p in pts if "error" not in p]
    row = {"task": t, "clients": c, "devices": d, "processes": pr, "executor_kind": ex,
           "executor": next((p.get("executor") for p in ok), ex), "runs": len(ok), "failed": len(pts) - len(ok)}
    if ok:
      row.update({
          "mfu": _median([p.get("mfu") for p in ok]),
          "intensity_flop_per_byte": ok[0].get("intensity_flop_per_byte"),
          "client_updates_per_s": _median([p["client_updates_per_s"] for p in ok]),
          "client_updates_per_s_each": [p["client_updates_per_s"] for p in ok],
          "round_s": _median([p["round_s"] for p in ok]),
          "first_round_s": _median([p["first_round_s"] for p in ok]),
          "compiles_after_first_round": (None if any(p["compiles_after_first_round"] is None for p in ok)
                                         else max(p["compiles_after_first_round"] for p in ok)),
          "peak_rss_mb": _median([p["peak_rss_mb"] for p in ok]),
          "max_abs_diff": max((p["max_abs_diff"] for p in ok if p.get("max_abs_diff") is not None), default=None),
          "rel_diff": max((p["rel_diff"] for p in ok if p.get("rel_diff") is not None), default=None),
          "ulp_rel": max((p["ulp_rel"] for p in ok if p.get("ulp_rel") is not None), default=None)})
    rows.append(row)
  return rows


def _row(summary, t, c, d, pr, ex="batched"):
  return next((r for r in summary if (r["task"], r["clients"], r["devices"], r["processes"]) == (t, c, d, pr)
               and r.get("executor_kind", "batched") == ex and r.get("client_updates_per_s")), None)


def derived(summary: list) -> tuple[dict, dict, dict]:
  """Speedups at 100 clients (2 devices / 1, 2 processes / 1, and every other config / 1),
  seconds per round of 1,000 MLP clients, and peak memory 1,000 / 100 clients."""
  speed, mlp, mem = {}, {}, {}
  for t in sorted({r["task"] for r in summary}):
    base = _row(summary, t, 100, 1, 1)
    if base:
      s = {}
      for r in summary:
        if ((r["task"], r["clients"]) == (t, 100) and r.get("client_updates_per_s")
                and (r["devices"], r["processes"]) != (1, 1) and r.get("executor_kind", "batched") == "batched"):
          name = {(2, 1): "2_devices_vs_1", (2, 2): "2_processes_vs_1"}.get(
              (r["devices"], r["processes"]), f"{r['devices']}_devices_{r['processes']}_processes_vs_1")
          s[name] = round(r["client_updates_per_s"] / base["client_updates_per_s"], 3)
      loop = _row(summary, t, 100, 1, 1, "loop")
      if loop:
        s["batched_vs_loop"] = round(base["client_updates_per_s"] / loop["client_updates_per_s"], 3)
      speed[t] = s
    for r in summary:
      if (r["task"] != t or r["clients"] != 1000 or not r.get("peak_rss_mb")
              or r.get("executor_kind", "batched") != "batched"):
        continue
      key = f"{r['devices']}d_{r['processes']}p"
      if t == "digits_mlp":
        mlp[key] = r["round_s"]
      small = _row(summary, t, 100, r["devices"], r["processes"])
      if small:
        mem.setdefault(t, {})[key] = round(r["peak_rss_mb"] / small["peak_rss_mb"], 3)
  return speed, mlp, mem


def targets(out: dict) -> dict:
  """The issue's targets, each with the measured values and whether it is met."""
  res = {}
  for t, s in out["speedup"].items():
    vals = {k: s[k] for k in ("2_devices_vs_1", "2_processes_vs_1") if k in s}
    res[f"speedup_{t}_100"] = {"target": f">= {TARGETS['speedup_2x']}x (2 devices or 2 processes vs 1)",
                               "measured": vals, "met": bool(vals) and max(vals.values()) >= TARGETS["speedup_2x"]}
  if out["mlp_1000_round_s"]:
    res["mlp_1000_round_s"] = {"target": f"< {TARGETS['mlp_1000_round_s']} s per round", "measured": out["mlp_1000_round_s"],
                               "met": all(v < TARGETS["mlp_1000_round_s"] for v in out["mlp_1000_round_s"].values())}
  rel = [r["rel_diff"] for r in out["summary"] if r.get("rel_diff") is not None]
  ulp = [r["ulp_rel"] for r in out["summary"] if r.get("ulp_rel") is not None]
  res["aggregate_equal"] = {"target": f"rel_diff <= {TARGETS['rel_diff']:g} against single-device",
                            "measured": max(rel) if rel else None,
                            "met": bool(rel) and max(rel) <= TARGETS["rel_diff"],
                            "float32_step": max(ulp) if ulp else None,
                            "float32_step_means": "one float32 step (ulp) of the largest initial parameter over "
                                                  "max |reference delta|: a delta is a difference of parameters, "
                                                  "so a computation that is not bit-identical cannot be held "
                                                  "much below this relative difference"}
  absd = [r["max_abs_diff"] for r in out["summary"] if r.get("max_abs_diff") is not None]
  res["aggregate_abs"] = {"target": f"max_abs_diff <= {TARGETS['abs_diff']:g} against the per-client loop",
                          "measured": max(absd) if absd else None,
                          "met": bool(absd) and max(absd) <= TARGETS["abs_diff"]}
  mem = {f"{t}_{k}": v for t, m in out["memory_ratio_1000_vs_100"].items() for k, v in m.items()}
  if mem:
    res["memory_1000_vs_100"] = {"target": f"<= {TARGETS['memory_ratio_1000_vs_100']}x", "measured": mem,
                                 "met": all(v <= TARGETS["memory_ratio_1000_vs_100"] for v in mem.values())}
  lenet = out["speedup"].get("mnist_lenet", {})
  if "batched_vs_loop" in lenet:
    res["lenet_batched_vs_loop"] = {"target": f">= {TARGETS['lenet_batched_vs_loop']}x the per-client loop at 100 "
                                              "clients, one device", "measured": lenet["batched_vs_loop"],
                                    "met": lenet["batched_vs_loop"] >= TARGETS["lenet_batched_vs_loop"]}
  best = max((r["mfu"] for r in out["summary"] if r["task"] == "mnist_lenet" and r.get("mfu")), default=None)
  if best is not None:
    res["lenet_mfu"] = {"target": f">= {TARGETS['lenet_mfu']:.0%} of the matmul peak", "measured": best,
                        "met": best >= TARGETS["lenet_mfu"]}
  comp = [r["compiles_after_first_round"] for r in out["summary"] if r.get("compiles_after_first_round") is not None]
  res["no_recompiles"] = {"target": "0 programs built after the first round", "measured": max(comp, default=None),
                          "met": bool(comp) and max(comp) == 0}
  return res


def scale_table(out: dict) -> str:
  hdr = (f"{'task':<12}{'clients':>8}{'dev':>5}{'proc':>5} {'executor':<22}{'updates/s':>11}{'MFU':>7}{'round s':>9}"
         f"{'first s':>9}{'compiles':>9}{'peak MB':>9}{'max|diff|':>11}{'rel diff':>10}")
  rows = [hdr]
  for r in out["summary"]:
    if not r.get("runs"):
      rows.append(f"{r['task']:<12}{r['clients']:>8}{r['devices']:>5}{r['processes']:>5}   FAILED")
      continue
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"
    rows.append(f"{r['task']:<12}{r['clients']:>8}{r['devices']:>5}{r['processes']:>5} {str(r.get('executor')):<22}"
                f"{r['client_updates_per_s']:>11.1f}{f(r.get('mfu'), '>7.1%')}{r['round_s']:>9.3f}"
                f"{r['first_round_s']:>9.2f}"
                f"{f(r['compiles_after_first_round'], '>9')}{r['peak_rss_mb']:>9.0f}{f(r['max_abs_diff'], '>11.2e')}"
                f"{f(r['rel_diff'], '>10.2e')}")
  rows.append("medians over repeats; updates/s: client updates per wall second, steady rounds; MFU: a plain train "
              f"step's FLOPs at that rate over the measured matmul peak ({out['peak_flops'] / 1e9:.0f} GFLOP/s); "
              "compiles: programs XLA compiled after the first round")
  for tc, lay in out.get("layouts", {}).items():
    if lay.get("inner"):
      rows.append(f"{tc}: batched layout {lay['inner']}" + (f"/{lay['per_device']}" if lay["per_device"] else "")
                  + f" ({lay['source']}; simulator='auto' runs {lay['choice']['inner']}"
                  + (f"/{lay['choice']['per_device']}" if lay["choice"].get("per_device") else "") + ")")
  for t, s in out["speedup"].items():
    rows.append(f"{t} at 100 clients: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}x" for k, v in s.items()))
  if out["mlp_1000_round_s"]:
    rows.append("digits_mlp, 1,000 clients: " + ", ".join(f"{k} {v:.2f} s/round" for k, v in out["mlp_1000_round_s"].items()))
  for t, m in out["memory_ratio_1000_vs_100"].items():
    rows.append(f"{t} peak memory 1,000 / 100 clients: " + ", ".join(f"{k} {v:.2f}x" for k, v in m.items()))
  for k, v in out["targets"].items():
    rows.append(f"target {k}: {v['target']}: measured {v['measured']} -> {'met' if v['met'] else 'NOT met'}"
                + (f" (one float32 step of the largest parameter over max |reference delta|: "
                   f"{v['float32_step']:.2e})" if v.get("float32_step") else ""))
  if out.get("quick_skips"):
    rows.append(f"quick mode: {out['quick_skips']}")
  rows.append(f"device: {out['device']}; load average {out['load_average_start'][0]:.1f} at start, "
              f"{out['load_average_end'][0]:.1f} at end")
  return "\n".join(rows)


def _main(argv=None) -> int:
  import argparse
  ap = argparse.ArgumentParser(prog="python -m mtfl_jax.experiments.bench_scale",
                               description="one point of the scale benchmark (python -m mtfl_jax bench scale runs them all)")
  ap.add_argument("--point", required=True, help="the point as JSON: task, clients, devices, processes, rounds, out, ...")
  args = ap.parse_args(argv)
  spec = json.loads(args.point)
  if spec.get("parent_pid"):  # a point dies with the benchmark, even one killed outright (SIGKILL)
    from mtfl_jax.distributed import die_with_parent
    die_with_parent(int(spec["parent_pid"]))
  os.environ.setdefault("TFDS_DISABLE_GCS", "1")
  (choose_point if spec.get("choose") else run_point)(spec)
  return 0


if __name__ == "__main__":
  sys.exit(_main())
