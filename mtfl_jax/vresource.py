"""Virtual resources: the fraction of a solo device each task effectively gets when sharing.

The model (a demand / weighted water-filling model, fitted from one co-run):

* Task i alone keeps a fraction ``u_i`` of the device busy (its *demand*; a small task that
  spends its time in Python dispatch or in one-core ops has a small demand).
* Tasks co-running with weights ``w`` get device fractions ``g_i = min(u_i, lam * w_i)``,
  ``lam`` chosen so that ``sum g_i = 1`` (or every ``g_i = u_i`` when the demands fit).
* Task i's virtual resource is ``r_i = g_i / u_i``: its co-run rate over its solo rate.

One co-run of all tasks with equal weights measures each ``r_i`` (steps done while all ran,
times the solo step time, over the window); equal-weight water-filling then gives
``u_i = 1 / (n * r_i)`` as a start, refined until the model reproduces every task's finish
time in that run. Capacity ``C = sum r_i``; co-running beats sequential when C > 1.

Workload-weighted ("competitive") shares make every task finish together: with solo work
``T_i = W_i * s_i``, weights ``w_i ∝ T_i * u_i`` give ``r_i ∝ T_i`` and the makespan
``T = max(max_i T_i, sum_i T_i * u_i)``.

Fitting a mix's model from a runner, caching it and storing it per device:
:mod:`mtfl_jax.calibration`.

Example::

    model = VRModel.fit(solo_step_s, equal_run)          # equal_run: a RunResult
    VRModel.from_json(model.to_json()) == model
    shares = model.competitive_shares(workloads)          # {task: share}, max share 1
    model.predict(workloads, shares).makespan_s
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


def water_fill(demand: Mapping[str, float], weights: Mapping[str, float]) -> dict[str, float]:
  """Device fractions ``g_i = min(u_i, lam * w_i)`` with ``sum g = min(1, sum u)``."""
  names = list(demand)
  if sum(demand.values()) <= 1.0:
    return dict(demand)
  g, free, left = {}, 1.0, set(names)
  while left:
    lam = free / sum(weights[n] for n in left)
    capped = [n for n in left if demand[n] <= lam * weights[n]]
    if not capped:
      g.update({n: lam * weights[n] for n in left})
      break
    for n in capped:
      g[n] = demand[n]
      free -= demand[n]
      left.remove(n)
  return g


@dataclasses.dataclass(frozen=True)
class Prediction:
  makespan_s: float
  finish_times_s: dict[str, float]
  start_rates: dict[str, float]  # r_i while every task runs


def measured_rates(run, solo_step_s: Mapping[str, float]) -> dict[str, float]:
  """Each task's virtual resource in a run: over the window in which every task was running,
  steps completed (interpolated between synchronised steps) times solo step time, over the
  window length."""
  window = min(run.finish_times_s.values())
  out = {}
  for name, stamps in run.step_times_s.items():
    stamps = np.asarray(stamps, float)
    idx = np.flatnonzero(np.isfinite(stamps))
    steps = np.interp(window, np.concatenate([[0.0], stamps[idx]]), np.concatenate([[0.0], idx + 1.0]))
    out[name] = float(steps * solo_step_s[name] / window)
  return out


@dataclasses.dataclass(frozen=True)
class VRModel:
  """Solo step times and demands of a task mix on one device (and backend)."""
  solo_step_s: dict[str, float]
  demand: dict[str, float]
  fitted_rates: dict[str, float]

  def to_json(self) -> dict:
    return {"solo_step_s": dict(self.solo_step_s), "demand": dict(self.demand),
            "fitted_rates": dict(self.fitted_rates)}

  @classmethod
  def from_json(cls, doc: Mapping) -> "VRModel":
    """From :meth:`to_json`'s dict (other fields are ignored); the three maps must name the
    same tasks."""
    maps = {k: {str(n): float(v) for n, v in doc[k].items()} for k in ("solo_step_s", "demand", "fitted_rates")}
    named = [m for k, m in maps.items() if m or k != "fitted_rates"]  # fitted rates are a record: may be empty
    if not maps["solo_step_s"] or len({frozenset(m) for m in named}) != 1:
      raise ValueError("a virtual-resource model needs solo_step_s, demand and fitted_rates over the same "
                       f"tasks; got {({k: sorted(m) for k, m in maps.items()})}")
    return cls(**maps)

  @classmethod
  def fit(cls, solo_step_s: Mapping[str, float], equal_run, iterations: int = 60) -> "VRModel":
    """From solo step times and one co-run of all tasks under equal shares.

    Demands start from the rates while every task ran (``u_i = 1 / (n r_i)``) and are then
    refined until the model reproduces the whole run: every task's finish time, including
    the stretch after the first tasks finished (n unknowns, n measurements). A demand above
    1 means a task slows the others by more than the device time it takes (contention).
    """
    r = measured_rates(equal_run, solo_step_s)
    n = len(r)
    demand = {k: 1.0 / (n * float(min(1.0, max(v, 1e-3)))) for k, v in r.items()}
    steps = {k: int(len(v)) for k, v in equal_run.step_times_s.items()}
    finish = equal_run.finish_times_s
    equal = {k: 1.0 for k in steps}
    for _ in range(iterations):
      pred = cls(dict(solo_step_s), demand, r).predict(steps, equal).finish_times_s
      demand = {k: float(np.clip(demand[k] * (finish[k] / pred[k]) ** 0.5, 1e-3, 4.0)) for k in demand}
    return cls(dict(solo_step_s), demand, r)

  @property
  def capacity(self) -> float:
    return self.capacity_of(self.demand, {n: 1.0 for n in self.demand})

  def capacity_of(self, active, weights) -> float:
    return float(sum(self.rates(active, weights).values()))

  def rates(self, active, weights: Mapping[str, float]) -> dict[str, float]:
    """Virtual resources ``r_i`` of the ``active`` tasks under ``weights``."""
    active = list(active)
    g = water_fill({n: self.demand[n] for n in active}, {n: weights[n] for n in active})
    return {n: min(1.0, g[n] / self.demand[n]) for n in active}

  def solo_work(self, workloads: Mapping[str, int]) -> dict[str, float]:
    return {n: workloads[n] * self.solo_step_s[n] for n in workloads}

  def competitive_shares(self, workloads: Mapping[str, int]) -> dict[str, float]:
    """Shares (largest = 1, so they may sum past 1) that make all tasks finish together."""
    w = {n: t * self.demand[n] for n, t in self.solo_work(workloads).items()}
    top = max(w.values())
    return {n: v / top for n, v in w.items()}

  def predict(self, workloads: Mapping[str, int], shares: Mapping[str, float]) -> Prediction:
    """Finish times when the tasks co-run under ``shares``: the rates are recomputed every
    time a task finishes (the survivors share the device)."""
    left = self.solo_work(workloads)  # solo-seconds of work left
    t, finish, start = 0.0, {}, None
    while left:
      r = self.rates(left, shares)
      start = start or r
      dt = min(left[n] / r[n] for n in left)
      t += dt
      for n in list(left):
        left[n] -= r[n] * dt
        if left[n] <= 1e-12 * max(1.0, t):
          finish[n] = t
          del left[n]
    return Prediction(t, finish, start)
