"""Co-scheduling policies: turning workloads and virtual-resource estimates into a plan.

Policies (shares are fractions of the device per task):

* ``sequential``: the ``sequential`` backend, one task after another;
* ``equal``: naive concurrency: every task gets the same share (all 1: nobody is limited);
* ``partitioned``: shares sized to each task's workload that sum to 1 (strict partitions);
* ``competitive``: virtual-resource-weighted shares, largest 1 (so they oversubscribe the
  device), planned so that all tasks finish together;
* ``auto``: the model proposes a few share vectors (:func:`candidate_shares`: competitive,
  equal, partitioned and blends of competitive and equal); measured co-runs decide
  (:func:`search_plan`). The model may be wrong; a measurement of its own proposals is not;
* ``grid_best``: the same search over a small grid of shares (:func:`share_grid`), the
  empirical optimum that ``auto`` is judged against.

``auto`` and ``grid_best`` need something to measure with: a :class:`Runner` (its ``run``),
or any ``measure(shares) -> makespan_s``; pass a runner opened on a scaled-down job set
(:func:`scaled_jobs`) to probe with a fraction of the work.

Example::

    jobs = [Job("digits_mlp", 4000), Job("mnist_lenet", 300), Job("shapes_unet", 40)]
    with open_backend("processes", jobs) as runner:
      model = calibrate(runner)
      plan = make_plan("auto", jobs, model, runner)     # measures its candidates on runner
      result = runner.run(plan.shares)
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from mtfl_jax.backends import Job, RunResult, Runner, backend_names, open_backend
from mtfl_jax.backends.base import check_jobs
from mtfl_jax.calibration import calibrate  # re-exported: run_round and choose_backend fit with it
from mtfl_jax.vresource import VRModel

MODEL_POLICIES = ("sequential", "equal", "partitioned", "competitive")  # need no measurement
SEARCH_POLICIES = ("auto", "grid_best")  # decided by measured co-runs
PLAN_POLICIES = MODEL_POLICIES + SEARCH_POLICIES

Shares = dict[str, float]
Measure = Callable[[Mapping[str, float]], float]  # shares -> measured makespan (s)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A policy's shares on a backend; ``searched`` holds the median measured makespan of
  every candidate a search policy tried."""
  policy: str
  backend: str
  shares: dict[str, float]
  predicted_makespan_s: float | None = None
  searched: dict[str, float] | None = None


def workloads_of(jobs: Sequence[Job]) -> dict[str, int]:
  return {j.name: int(j.steps) for j in jobs}


def plan_shares(policy: str, workloads: Mapping[str, int], model: VRModel) -> dict[str, float]:
  """Shares of a policy the model decides alone (:data:`MODEL_POLICIES`)."""
  if policy not in PLAN_POLICIES:
    raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(PLAN_POLICIES)}")
  if policy in SEARCH_POLICIES:
    raise ValueError(f"policy {policy!r} is decided by measurement: use make_plan(..., runner) "
                     "or search_plan")
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


def blend(a: Mapping[str, float], b: Mapping[str, float], t: float) -> Shares:
  """``(1 - t) * a + t * b``, rescaled so the largest share is 1 (shares are relative)."""
  mix = {n: (1 - t) * a[n] + t * b[n] for n in a}
  top = max(mix.values())
  return {n: v / top for n, v in mix.items()}


def candidate_shares(workloads: Mapping[str, int], model: VRModel,
                     blends: Sequence[float] = (1 / 3, 2 / 3)) -> dict[str, Shares]:
  """The share vectors ``auto`` measures, in order of preference on ties: competitive, its
  blends towards equal (``t`` of the way), equal, partitioned."""
  comp = plan_shares("competitive", workloads, model)
  eq = plan_shares("equal", workloads, model)
  out = {"competitive": comp}
  out.update({f"blend{t:.2f}": blend(comp, eq, t) for t in blends})
  out["equal"] = eq
  out["partitioned"] = plan_shares("partitioned", workloads, model)
  return out


def share_grid(workloads: Mapping[str, int], model: VRModel, levels: Sequence[float] = (0.25, 0.5, 1.0),
               max_size: int = 27) -> dict[str, Shares]:
  """Every share vector with each task's share in ``levels`` and the task with the most solo
  work fixed at 1; ordered from the most even (all 1, i.e. equal) down, so that ties go to
  the simpler plan. Raises ``ValueError`` past ``max_size`` points."""
  work = model.solo_work(workloads)
  top = max(work, key=lambda n: (work[n], n))
  free = [n for n in workloads if n != top]
  size = len(levels) ** len(free)
  if size > max_size:
    raise ValueError(f"a grid of {len(levels)} levels over {len(free)} tasks has {size} points, past "
                     f"max_size={max_size}; pass fewer levels or a larger max_size")
  levels = sorted({float(v) for v in levels}, reverse=True)
  out = {}
  for combo in itertools.product(levels, repeat=len(free)):
    shares = {n: 1.0 for n in workloads}
    shares.update(zip(free, combo))
    out["grid(" + ",".join(f"{shares[n]:g}" for n in workloads) + ")"] = shares
  return out


@dataclasses.dataclass(frozen=True)
class Search:
  """Outcome of :func:`search_plan`: the winner and every candidate's measurements."""
  best: str
  shares: Shares
  median_s: dict[str, float]
  runs_s: dict[str, list[float]]

  @classmethod
  def from_runs(cls, candidates: Mapping[str, Mapping[str, float]], runs_s: Mapping[str, Sequence[float]]) -> "Search":
    """The search's decision from measured makespans of every candidate: the lowest median; a
    tie goes to the candidate listed first in ``candidates``."""
    if set(runs_s) != set(candidates) or not all(len(v) for v in runs_s.values()):
      raise ValueError(f"need at least one measurement of every candidate; candidates {sorted(candidates)}, "
                       f"measured {sorted(k for k, v in runs_s.items() if len(v))}")
    names = list(candidates)
    median = {k: float(np.median(runs_s[k])) for k in names}
    best = min(names, key=lambda k: (median[k], names.index(k)))
    return cls(best, dict(candidates[best]), median, {k: [float(x) for x in runs_s[k]] for k in names})


def rotated(items: Sequence, k: int) -> list:
  """``items`` rotated left by ``k``: round ``k`` of an interleaved measurement, so that every
  item takes every position equally often across rounds (drift and warm-up hit all alike)."""
  items = list(items)
  k %= max(1, len(items))
  return items[k:] + items[:k]


def search_plan(measure: Measure | Runner, candidates: Mapping[str, Mapping[str, float]],
                repeats: int = 1) -> Search:
  """Measures every candidate share vector ``repeats`` times, one round after another, each
  round in an order rotated by one (:func:`rotated`), and picks the lowest median makespan; a
  tie goes to the candidate listed first.

  ``measure`` is a :class:`Runner` (its ``run(shares).makespan_s``) or any
  ``shares -> seconds``. The winner's median is biased low (the best of noisy draws): measure
  it again on fresh runs before reporting it.

  Example::

      s = search_plan(runner, candidate_shares(workloads, model), repeats=2)
      s.best, s.shares, s.median_s
  """
  if not candidates:
    raise ValueError("no candidate shares to search")
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats!r}")
  if isinstance(measure, Runner):
    runner = measure
    measure = lambda shares: runner.run(shares).makespan_s  # noqa: E731
  runs = {k: [] for k in candidates}
  for r in range(repeats):
    for k in rotated(candidates, r):
      runs[k].append(float(measure(dict(candidates[k]))))
  return Search.from_runs(candidates, runs)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Plans measured in interleaved rounds (:func:`compare_plans`): ``runs[plan]`` holds one
  :class:`RunResult` per round, round ``k`` of every plan measured back to back, so that a
  ratio of two plans is paired by round."""
  runs: dict[str, list]

  def makespans(self, plan: str) -> list[float]:
    return [r.makespan_s for r in self.runs[plan]]

  def median_s(self, plan: str) -> float:
    return float(np.median(self.makespans(plan)))

  def ratio(self, num: str, den: str) -> dict:
    """Median over rounds of ``makespan(num) / makespan(den)`` with its 95% paired bootstrap
    interval (:func:`mtfl_jax.stats.paired_ratio`) and ``verdict``: ``ratio("sequential",
    "competitive")`` is competitive's speedup; ``"faster"`` only where the interval lies above 1."""
    from mtfl_jax import stats
    out = stats.paired_ratio(self.makespans(num), self.makespans(den))
    return out | {"verdict": stats.verdict(out)}

  def median_run(self, plan: str) -> RunResult:
    """The round whose makespan is the (lower) median: a typical run, e.g. for a timeline."""
    runs = sorted(self.runs[plan], key=lambda r: r.makespan_s)
    return runs[(len(runs) - 1) // 2]


def compare_plans(runner: Runner, plans: Mapping[str, Mapping[str, float] | None], repeats: int = 5) -> Comparison:
  """Runs every plan ``repeats`` times, interleaved: round ``k`` runs each plan once, in an
  order rotated by ``k`` (:func:`rotated`), so drift on a shared machine hits every plan alike.
  Shares ``None`` run the runner's sequential baseline: ``runner.run_sequential`` where the
  runner has one (``processes``: each task in its worker, under the same per-task limits), else
  a ``sequential`` runner on the same jobs, opened once here.

  Measure a plan that a search picked (``auto``, ``grid_best``) here again, on rounds the
  search never saw: its number in its own search is the best of several noisy draws, biased
  towards looking fast.

  Example::

      cmp = compare_plans(runner, {"sequential": None, "equal": eq, "competitive": comp}, repeats=5)
      cmp.ratio("sequential", "competitive")      # {"median", "ci95", "verdict", ...}
  """
  if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
    raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
  if not plans:
    raise ValueError("no plans to compare")
  seq_runner = None
  try:
    if any(v is None for v in plans.values()) and not hasattr(runner, "run_sequential"):
      seq_runner = open_backend("sequential", runner.jobs)
      seq_runner.run(None)  # warm-up: its first calls fill dispatch caches
    baseline = getattr(runner, "run_sequential", None) or (lambda: seq_runner.run(None))
    runs: dict[str, list] = {k: [] for k in plans}
    for k in range(repeats):
      for name in rotated(list(plans), k):
        shares = plans[name]
        runs[name].append(baseline() if shares is None else runner.run(dict(shares)))
  finally:
    if seq_runner is not None:
      seq_runner.close()
  return Comparison(runs)


def scaled_jobs(jobs: Sequence[Job], fraction: float, min_steps: int = 2) -> list[Job]:
  """The same jobs with ``fraction`` of their steps (at least ``min_steps``): a cheap probe for
  a search, opened as its own runner."""
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
  return [dataclasses.replace(j, steps=max(min_steps, int(round(j.steps * fraction)))) for j in jobs]


def make_plan(policy: str, jobs: Sequence[Job], model: VRModel, backend: str | Runner,
              probe: Measure | Runner | None = None, repeats: int = 1, **search_kwargs) -> Plan:
  """The plan of ``policy`` for ``jobs`` on ``backend`` (a name, or an open runner);
  ``sequential`` forces its backend.

  ``auto`` and ``grid_best`` measure their candidates with ``probe`` (default: ``backend``
  when it is a runner), ``repeats`` times each; ``search_kwargs`` go to
  :func:`candidate_shares` (auto) or :func:`share_grid` (grid_best).
  """
  jobs = check_jobs(jobs)
  wl = workloads_of(jobs)
  name = backend.name if isinstance(backend, Runner) else backend
  if policy in SEARCH_POLICIES:
    probe = probe if probe is not None else (backend if isinstance(backend, Runner) else None)
    if probe is None:
      raise ValueError(f"policy {policy!r} measures its candidates: pass an open runner as backend, "
                       "or probe=")
    cands = (candidate_shares(wl, model, **search_kwargs) if policy == "auto"
             else share_grid(wl, model, **search_kwargs))
    found = search_plan(probe, cands, repeats)
    return Plan(policy, name, found.shares, model.predict(wl, found.shares).makespan_s, found.median_s)
  shares = plan_shares(policy, wl, model)
  if policy == "sequential":
    return Plan(policy, "sequential", shares, sum(model.solo_work(wl).values()))
  pred = model.predict(wl, shares).makespan_s if policy != "partitioned" else None
  return Plan(policy, name, shares, pred)


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
      plan = make_plan("competitive", jobs, calibrate(runner, warmup=True), name)
      times[name] = runner.run(plan.shares).makespan_s
  return min(times, key=times.get), times


def run_round(jobs: Sequence[Job], policy: str = "competitive", backend: str = "processes",
              return_params: bool = False, **backend_kwargs) -> tuple[RunResult, Plan]:
  """Opens ``backend`` (``"auto"``: the fastest by measurement, :func:`choose_backend`),
  calibrates the model, runs ``jobs`` under ``policy``; returns the measured result and the
  plan (with its predicted makespan)."""
  if backend != "auto" and backend not in backend_names():
    raise ValueError(f"unknown backend {backend!r}; valid backends: auto, {', '.join(backend_names())}")
  if policy not in PLAN_POLICIES:
    raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(PLAN_POLICIES)}")
  check_memory(jobs)
  if policy == "sequential":
    backend = "sequential"
  elif backend == "auto":
    backend, _ = choose_backend(jobs)
  with open_backend(backend, jobs, **backend_kwargs) as runner:
    model = calibrate(runner)
    plan = make_plan(policy, jobs, model, runner)
    return runner.run(plan.shares, return_params=return_params), plan
