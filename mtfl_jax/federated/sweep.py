"""Seed sweeps: one config over several seeds, summarised with medians and 95% bootstrap intervals.

A seed decides the partition, the fleet, the sampling and every init, so a claim about a
policy holds only if it holds over seeds. :func:`run_seeds` runs a config once per seed (in
worker processes pinned to their own cores when the tasks are registered by name and more
than one core is free; else one after another here), keeps each run in ``workdir/seed<k>/``
(resumable as any run), and :func:`summarize_seeds` gives every number of the runs' ends
(final metric per task, virtual time, rounds, work, FL throughput, work beyond nominal) as
``{median, ci95, n, values}``; :func:`mtfl_jax.plotting.accuracy_bands` draws the curves as
bands over seeds.

Example::

    sweep = run_seeds(FedConfig(tasks=("digits_mlp",), rounds=20), seeds=range(5), workdir="runs/s")
    sweep["summary"]["final_accuracy"]["digits_mlp"]    # {"median": ..., "ci95": [lo, hi], ...}
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from mtfl_jax import stats
from mtfl_jax.federated.config import FedConfig


def parse_seeds(text: str) -> list[int]:
  """``"0-4"``, ``"1,3,7"`` or ``"0-2,9"`` as a list of seeds; a ``ValueError`` names a bad part."""
  out = []
  for part in str(text).split(","):
    part = part.strip()
    if not part:
      continue
    try:
      if "-" in part:
        lo, hi = (int(x) for x in part.split("-", 1))
        if hi < lo:
          raise ValueError
        out.extend(range(lo, hi + 1))
      else:
        out.append(int(part))
    except ValueError:
      raise ValueError(f"--seeds: {part!r} is not a seed or a range like 0-4 (give e.g. --seeds 0-4 or "
                       "--seeds 1,3,7)") from None
  if not out or len(set(out)) != len(out) or min(out) < 0 or max(out) > 2**32 - 1:
    raise ValueError(f"--seeds must name distinct seeds between 0 and 2**32 - 1, got {text!r}")
  if len(out) > 1000:
    raise ValueError(f"--seeds names {len(out)} seeds; at most 1000 in one sweep")
  return out


def run_summary(res) -> dict:
  """The end of one run, as numbers."""
  return {"final_accuracy": res.final_accuracy(), "virtual_time_s": res.virtual_time_s, "rounds": len(res.history),
          "work_s": res.work_s, "work_beyond_nominal_s": res.work_beyond_nominal_s,
          "fl_throughput": res.fl_throughput, "wall_s": res.wall_s}


def _run_one(cfg_json: dict, seed: int, workdir: str | None, model_json: dict | None, imports: Sequence[str]) -> dict:
  import importlib

  from mtfl_jax.clock import inputs_from_json
  for m in imports:  # the modules that register the config's own tasks
    importlib.import_module(m)
  from mtfl_jax.federated.run import run_federated
  model, corrections = inputs_from_json(model_json) if model_json else (None, None)
  cfg = FedConfig(**{**cfg_json, "seed": seed})
  res = run_federated(cfg, model, workdir=workdir, progress=False, corrections=corrections)
  return {"seed": seed, **run_summary(res), "history": res.history, "evaluations": res.evaluations}


def _stop_workers(pool: ProcessPoolExecutor) -> None:
  procs = list((getattr(pool, "_processes", None) or {}).values())  # Python >= 3.14: pool.terminate_workers()
  pool.shutdown(wait=False, cancel_futures=True)
  for p in procs:
    p.terminate()
  for p in procs:
    p.join(10)
    if p.is_alive():
      p.kill()
      p.join()


def _start_worker(cores, counter, parent: int):
  """A worker's start: it ends with the sweep (even one killed outright), leaves Ctrl-C to the
  sweep (which stops the workers), and is pinned to a core of its own."""
  import signal

  from mtfl_jax.distributed import die_with_parent
  die_with_parent(parent)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  with counter.get_lock():
    i = counter.value
    counter.value += 1
  os.sched_setaffinity(0, {cores[i % len(cores)]})


def summarize_seeds(runs: Sequence[dict]) -> dict:
  """Median and 95% bootstrap interval over seeds of every number of :func:`run_summary`."""
  tasks = sorted({t for r in runs for t in r["final_accuracy"]})
  out = {"final_accuracy": {t: stats.summarize([r["final_accuracy"].get(t) for r in runs]) for t in tasks}}
  for k in ("virtual_time_s", "rounds", "work_s", "work_beyond_nominal_s", "fl_throughput"):
    out[k] = stats.summarize([r[k] for r in runs])
  return out


def run_seeds(cfg: FedConfig, seeds: Sequence[int], workdir: str | Path | None = None, model=None,
              corrections=None, workers: int | None = None, imports: Sequence[str] = (), log=print) -> dict:
  """Runs ``cfg`` once per seed (see the module docstring); returns ``{"config", "seeds",
  "runs", "summary"}``. ``workers``: processes (default: one per free core, at most one per
  seed). Worker processes find tasks by name: they run the built-in tasks, and tasks that the
  modules in ``imports`` register when imported; a sweep of other tasks (say, defined in your
  script or notebook) runs here, one seed after another."""
  from mtfl_jax.clock import inputs_json
  from mtfl_jax.tasks import ALL_TASKS
  seeds = list(seeds)
  if (not seeds or len(set(seeds)) != len(seeds)
      or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= 2**32 - 1 for s in seeds)):
    raise ValueError(f"run_seeds: seeds must be distinct integers between 0 and 2**32 - 1 (at least one), got "
                     f"{seeds!r}; e.g. seeds=range(5)")
  if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
    raise ValueError(f"run_seeds: workers must be an integer >= 1 (processes) or None (one per free core), got "
                     f"{workers!r}")
  portable = bool(imports) or all(name in ALL_TASKS for name in cfg.tasks)
  cores = sorted(os.sched_getaffinity(0))
  workers = workers or min(len(cores), len(seeds))
  if not portable or not isinstance(cfg.server_optimizer, str):
    workers = 1
  model_json = None if model is None else inputs_json(model, corrections)
  cfg_json = cfg.to_json()
  dirs = [None if workdir is None else str(Path(workdir) / f"seed{s}") for s in seeds]
  log(f"sweep: {len(seeds)} seed(s) of {', '.join(cfg.tasks)} ({cfg.policy}) in {workers} process(es)")
  if workers == 1:
    from mtfl_jax.federated.run import run_federated
    runs = []
    for s, d in zip(seeds, dirs):
      res = run_federated(dataclasses.replace(cfg, seed=s), model, workdir=d, progress=False, corrections=corrections)
      runs.append({"seed": s, **run_summary(res), "history": res.history, "evaluations": res.evaluations})
      log(f"  seed {s}: {run_summary(res)['final_accuracy']}")
  else:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                               initargs=(cores, ctx.Value("i", 0), os.getpid()))
    try:
      futs = [pool.submit(_run_one, cfg_json, s, d, model_json, tuple(imports)) for s, d in zip(seeds, dirs)]
      runs = []
      for s, f in zip(seeds, futs):
        runs.append(f.result())
        log(f"  seed {s}: {runs[-1]['final_accuracy']}")
    except BaseException:  # a failed seed, Ctrl-C or SIGTERM: the other seeds' workers are stopped, not awaited
      _stop_workers(pool)
      raise
    pool.shutdown()
  return {"config": cfg_json, "seeds": seeds, "runs": runs, "summary": summarize_seeds(runs)}
