"""Co-scheduling policies: turning workloads and virtual-resource estimates into a plan.

Policies (shares are fractions of the device per task):

* ``sequential``: the ``sequential`` backend, one task after another;
* ``equal``: naive concurrency: every task gets the same share (all 1: nobody is limited);
* ``partitioned``: shares sized to each task's workload that sum to 1 (strict partitions);
* ``competitive``: virtual-resource-weighted shares, largest 1 (so they oversubscribe the
  device), planned so that all tasks finish together.

Example::

    jobs = [Job("digits_mlp", 4000), Job("mnist_lenet", 300), Job("shapes_unet", 40)]
    with open_backend("processes", jobs) as runner:
      model = calibrate(runner)
      plan = make_plan("competitive", jobs, model, runner.name)
      result = runner.run(plan.shares)
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping, Sequence

import jax

from mtfl_jax.backends import Job, RunResult, Runner, backend_names, open_backend
from mtfl_jax.backends.base import check_jobs
from mtfl_jax.vresource import VRModel

POLICIES = ("sequential", "equal", "partitioned", "competitive")


@dataclasses.dataclass(frozen=True)
class Plan:
  policy: str
  backend: str
  shares: dict[str, float]
  predicted_makespan_s: float | None = None


def workloads_of(jobs: Sequence[Job]) -> dict[str, int]:
  return {j.name: int(j.steps) for j in jobs}


def calibrate(runner: Runner) -> VRModel:
  """Fits the virtual-resource model of a runner's task mix from one equal-share co-run."""
  return VRModel.fit(runner.solo_step_s, runner.run(None))


def plan_shares(policy: str, workloads: Mapping[str, int], model: VRModel) -> dict[str, float]:
  if policy not in POLICIES:
    raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICIES)}")
  unknown = set(workloads) - set(model.solo_step_s)
  if unknown:
    raise ValueError(f"workload names task(s) {sorted(unknown)} that the model does not know; "
                     f"known: {sorted(model.solo_step_s)}")
  if policy in ("sequential", "equal"):
    return {n: 1.0 for n in workloads}
  shares = model.competitive_shares(workloads)
  if policy == "partitioned":
    total = sum(shares.values())
    shares = {n: v / total for n, v in shares.items()}
  return shares


def make_plan(policy: str, jobs: Sequence[Job], model: VRModel, backend: str) -> Plan:
  """The plan of ``policy`` for ``jobs`` on ``backend`` (``sequential`` forces its backend)."""
  jobs = check_jobs(jobs)
  wl = workloads_of(jobs)
  shares = plan_shares(policy, wl, model)
  if policy == "sequential":
    return Plan(policy, "sequential", shares, sum(model.solo_work(wl).values()))
  pred = model.predict(wl, shares).makespan_s if policy != "partitioned" else None
  return Plan(policy, backend, shares, pred)


# --------------------------------------------------------------------------- memory
@functools.lru_cache(maxsize=None)
def task_memory_bytes(task) -> float:
  """XLA's memory analysis of one train step of ``task`` (arguments + outputs + temporaries)."""
  from mtfl_jax.profiling import xla_costs
  from mtfl_jax.train import init_state, make_train_step, synthetic_batches
  state = init_state(task, 0)
  batch = jax.tree.map(lambda b: b[0], synthetic_batches(task, 1))
  return xla_costs(jax.jit(make_train_step(task)).lower(state, batch).compile())["memory_bytes"]


def device_memory_bytes() -> float:
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_memory(jobs: Sequence[Job], available: float | None = None) -> float:
  """Raises ``MemoryError`` when the co-running tasks' step memory does not fit the device;
  returns the bytes needed."""
  need = sum(task_memory_bytes(j.task) for j in jobs)
  have = device_memory_bytes() if available is None else available
  if need > have:
    per = ", ".join(f"{j.name}: {task_memory_bytes(j.task) / 2**20:.0f} MiB" for j in jobs)
    raise MemoryError(f"co-running these tasks needs {need / 2**20:.0f} MiB but the device has "
                      f"{have / 2**20:.0f} MiB free ({per}); run fewer tasks at once, use smaller "
                      "batches, or use the 'sequential' policy")
  return need


# --------------------------------------------------------------------------- one call
def choose_backend(jobs: Sequence[Job], candidates: Sequence[str] = ("processes", "threads", "fused"),
                   **backend_kwargs) -> tuple[str, dict[str, float]]:
  """The backend whose competitive plan runs ``jobs`` fastest here, by measurement (each
  opened, calibrated and run once); returns it and every candidate's makespan."""
  times = {}
  for name in candidates:
    with open_backend(name, jobs, **backend_kwargs.get(name, {})) as runner:
      runner.run(None)  # warm-up
      plan = make_plan("competitive", jobs, calibrate(runner), name)
      times[name] = runner.run(plan.shares).makespan_s
  return min(times, key=times.get), times


def run_round(jobs: Sequence[Job], policy: str = "competitive", backend: str = "processes",
              return_params: bool = False, **backend_kwargs) -> tuple[RunResult, Plan]:
  """Opens ``backend`` (``"auto"``: the fastest by measurement, :func:`choose_backend`),
  calibrates the model, runs ``jobs`` under ``policy``; returns the measured result and the
  plan (with its predicted makespan)."""
  if backend != "auto" and backend not in backend_names():
    raise ValueError(f"unknown backend {backend!r}; valid backends: auto, {', '.join(backend_names())}")
  if policy not in POLICIES:
    raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICIES)}")
  check_memory(jobs)
  if policy == "sequential":
    backend = "sequential"
  elif backend == "auto":
    backend, _ = choose_backend(jobs)
  with open_backend(backend, jobs, **backend_kwargs) as runner:
    model = calibrate(runner)
    plan = make_plan(policy, jobs, model, runner.name)
    return runner.run(plan.shares, return_params=return_params), plan
