"""The virtual clock of a simulated federation.

Each client's round time is its co-scheduled makespan for its own per-task workloads (the
virtual-resource model fitted from a co-run measured on this machine, see
:mod:`mtfl_jax.vresource`), divided by the client's device speed, plus the time to download
and upload every model it trains (bytes / bandwidth). A synchronous round lasts as long as
its slowest participating client; the others idle for the difference.

Device heterogeneity, in one place (not tuned to any result):

* speed ~ lognormal(0, ``SPEED_SIGMA``) relative to this machine, ``SPEED_SIGMA = 0.5``: the
  middle 90% of clients lie within 0.44x-2.3x. Measured mobile fleets are more spread out
  (FedScale's device traces, Lai et al. 2022, span over 10x), so this is a moderate setting;
  pass a trace for your own fleet.
* bandwidth ~ lognormal(log(``BANDWIDTH_MEDIAN``), ``BANDWIDTH_SIGMA``) bytes/s, median
  20 Mbit/s, sigma 0.5 (again moderate).

The intra-device part is modelled (:class:`~mtfl_jax.vresource.VRModel`) and checked against
measurement: :func:`measure_corrections` co-runs a few representative workload mixes
(:func:`representative_mixes`, bucketed by :func:`mix_key`) under equal and competitive
shares, and :func:`client_compute_time` scales the model's makespan by measured / predicted
for clients whose mix was measured (the clock follows the measurement there).

A trace is a JSON list of ``{"speed": x, "bandwidth_bps": y}``, one per client (bits/s).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from mtfl_jax.vresource import VRModel

SPEED_SIGMA = 0.5
BANDWIDTH_MEDIAN = 20e6 / 8  # bytes/s (20 Mbit/s)
BANDWIDTH_SIGMA = 0.5


@dataclasses.dataclass(frozen=True)
class Fleet:
  """Per-client device speed (relative to this machine) and bandwidth (bytes/s)."""
  speed: np.ndarray
  bandwidth: np.ndarray

  @classmethod
  def lognormal(cls, num_clients: int, seed: int, speed_sigma: float = SPEED_SIGMA,
                bandwidth_median: float = BANDWIDTH_MEDIAN, bandwidth_sigma: float = BANDWIDTH_SIGMA) -> "Fleet":
    rng = np.random.default_rng([seed, 7919])
    return cls(rng.lognormal(0.0, speed_sigma, num_clients),
               rng.lognormal(math.log(bandwidth_median), bandwidth_sigma, num_clients))

  @classmethod
  def from_trace(cls, path: str | Path, num_clients: int) -> "Fleet":
    """The first ``num_clients`` rows of a JSON trace ``[{"speed": x, "bandwidth_bps": y}, ...]``;
    every row is checked, and an error names the row, field and value."""
    from mtfl_jax.results import BadFileError, read_json
    form = 'a JSON list of {"speed": x, "bandwidth_bps": y} (x > 0 relative to this machine, y bits/s > 0), one per client'
    rows = read_json(path, what="fleet trace", remedy=f"a trace is {form}")

    def bad(msg):
      raise BadFileError(f"fleet trace {path}: {msg}; a trace is {form}")
    if not isinstance(rows, list):
      bad(f"holds a JSON {type(rows).__name__}, not a list")
    if len(rows) < num_clients:
      bad(f"describes {len(rows)} clients, the federation has {num_clients}")
    vals = {"speed": [], "bandwidth_bps": []}
    for i, r in enumerate(rows):
      if not isinstance(r, dict):
        bad(f"row {i} is {r!r}, not an object")
      for f in vals:
        if f not in r:
          bad(f"row {i} has no field '{f}' (it has {', '.join(map(repr, r)) or 'none'})")
        v = r[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
          bad(f"row {i}, field '{f}': {v!r} is not a number")
        if not (math.isfinite(v) and v > 0):
          bad(f"row {i}, field '{f}': {v!r} must be a finite number > 0")
        vals[f].append(float(v))
    return cls(np.array(vals["speed"][:num_clients]), np.array(vals["bandwidth_bps"][:num_clients]) / 8)


# How a client's device is shared among its tasks: a rule name -> ``(model, workloads) ->
# per-task shares``. A federated policy names its rule (``FedPolicy.shares``); measured
# corrections are keyed by the same names.
SHARE_RULES = {
    "equal": lambda model, workloads: {t: 1.0 for t in workloads},
    "competitive": lambda model, workloads: model.competitive_shares(workloads),
}


def mix_key(workloads: Mapping[str, int], solo_step_s: Mapping[str, float], levels: int = 4) -> str:
  """The bucket of a workload mix: per task, 0 when absent, else which of ``levels`` equal
  bins its fraction of the client's solo work ``W_i s_i`` falls in. Clients in one bucket
  share one measured correction (scaling all of a client's work keeps its bucket)."""
  work = {t: w * solo_step_s[t] for t, w in workloads.items() if w > 0}
  total = sum(work.values())
  parts = [str(0 if t not in work else 1 + min(levels - 1, int(levels * work[t] / total)))
           for t in sorted(workloads)]
  return ".".join(f"{t}:{p}" for t, p in zip(sorted(workloads), parts))


@dataclasses.dataclass(frozen=True)
class MixCorrections:
  """Measured co-runs of representative workload mixes against the model's makespan.

  ``factors[mix_key][shares]`` is measured / predicted makespan (each over its own sequential
  time ``sum_i W_i s_i``) of that bucket's representative mix under ``"equal"`` or ``"competitive"`` shares; :func:`client_compute_time`
  multiplies the model's makespan by it, so the clock follows the measurement where one exists
  and the model elsewhere. ``detail`` holds the measured runs (workloads, seconds) per bucket."""
  factors: dict
  backend: str = "threads"
  detail: dict = dataclasses.field(default_factory=dict)

  def factor(self, workloads: Mapping[str, int], solo_step_s: Mapping[str, float], shares: str) -> float | None:
    f = self.factors.get(mix_key(workloads, solo_step_s), {})
    return f.get(shares)

  def to_json(self) -> dict:
    return {"factors": self.factors, "backend": self.backend, "detail": self.detail}

  @classmethod
  def from_json(cls, d: Mapping) -> "MixCorrections":
    return cls(dict(d["factors"]), d.get("backend", "threads"), dict(d.get("detail", {})))


def client_compute_time(model: VRModel, workloads: Mapping[str, int], shares: str, speed: float,
                        corrections: MixCorrections | None = None, with_source: bool = False):
  """Seconds for one client to run its per-task workloads co-scheduled under ``shares`` (a
  :data:`SHARE_RULES` name: ``"equal"``, or ``"competitive"``: virtual-resource weighted),
  divided by its device ``speed``. The model's makespan is multiplied by the measured
  correction of the client's mix where ``corrections`` has one; ``with_source`` also returns
  whether it did (True: measured, False: modelled)."""
  if shares not in SHARE_RULES:
    raise ValueError(f"unknown shares {shares!r}; valid: {', '.join(SHARE_RULES)}")
  wl = {t: w for t, w in workloads.items() if w > 0}
  if not wl:
    return (0.0, False) if with_source else 0.0
  alloc = SHARE_RULES[shares](model, wl)
  t = model.predict(wl, alloc).makespan_s / speed
  f = corrections.factor(workloads, model.solo_step_s, shares) if corrections is not None and len(wl) > 1 else None
  if f is not None:
    t *= f
  return (t, f is not None) if with_source else t


def representative_mixes(workload_vectors, solo_step_s: Mapping[str, float], total_s: float = 0.6,
                         max_mixes: int = 4) -> dict[str, dict[str, int]]:
  """The ``max_mixes`` most frequent buckets (:func:`mix_key`) of multi-task clients among
  ``workload_vectors``, each as the bucket's mean solo-work fractions scaled to ``total_s``
  seconds of solo work (at least 2 steps per task present)."""
  groups: dict = {}
  for wl in workload_vectors:
    if sum(1 for w in wl.values() if w > 0) < 2:
      continue  # a single task has nothing to share the device with
    work = {t: w * solo_step_s[t] for t, w in wl.items()}
    total = sum(work.values())
    groups.setdefault(mix_key(wl, solo_step_s), []).append({t: v / total for t, v in work.items()})
  top = sorted(groups, key=lambda k: (-len(groups[k]), k))[:max_mixes]
  out = {}
  for k in top:
    frac = {t: float(np.mean([g[t] for g in groups[k]])) for t in groups[k][0]}
    out[k] = {t: (max(2, int(round(f * total_s / solo_step_s[t]))) if f > 0 else 0) for t, f in frac.items()}
  return out


def measure_corrections(model: VRModel, mixes: Mapping[str, Mapping[str, int]], backend: str = "threads",
                        repeats: int = 3, log=print) -> MixCorrections:
  """Runs each mix on ``backend`` under equal and competitive shares (after one warm-up run;
  ``repeats`` interleaved runs of each, their median kept: single runs of a short co-run
  differed by up to 1.8x on a loaded 2-core CPU) and compares the measured makespans with the
  model's prediction for the same workloads."""
  from mtfl_jax.backends import Job, open_backend
  factors, detail = {}, {}
  for key, wl in mixes.items():
    wl = {t: int(w) for t, w in wl.items() if w > 0}
    jobs = [Job(t, w, seed=i) for i, (t, w) in enumerate(sorted(wl.items()))]
    alloc = {k: rule(model, wl) for k, rule in SHARE_RULES.items()}
    with open_backend(backend, jobs) as r:
      r.run(alloc["equal"])  # warm-up: first calls fill dispatch caches
      runs = {k: [] for k in alloc}
      for _ in range(repeats):  # interleaved, so that drift hits both policies alike
        for k, a in alloc.items():
          runs[k].append(r.run(a).makespan_s)
      meas = {k: float(np.median(v)) for k, v in runs.items()}
      solo_meas = sum(w * r.solo_step_s[t] for t, w in wl.items())
    pred = {k: model.predict(wl, a).makespan_s for k, a in alloc.items()}
    solo_pred = sum(w * model.solo_step_s[t] for t, w in wl.items())
    # Compared relative to each side's own sequential time: the correction is the sharing
    # efficiency the model got wrong, not a drift of the solo step times since calibration.
    factors[key] = {k: round((meas[k] / solo_meas) / (pred[k] / solo_pred), 4) for k in alloc}
    detail[key] = {"workloads": wl, "measured_makespan_s": {k: round(v, 4) for k, v in meas.items()},
                   "measured_runs_s": {k: [round(x, 4) for x in v] for k, v in runs.items()},
                   "predicted_makespan_s": {k: round(v, 4) for k, v in pred.items()},
                   "sequential_s": {"measured": round(solo_meas, 4), "predicted": round(solo_pred, 4)},
                   "model_error": {k: round(1 / factors[key][k] - 1, 4) for k in alloc},
                   "competitive_vs_equal_measured": round(meas["equal"] / meas["competitive"], 4),
                   "competitive_vs_equal_predicted": round(pred["equal"] / pred["competitive"], 4)}
    log(f"    mix {key}: measured equal/competitive {meas['equal']:.3f}/{meas['competitive']:.3f}s, "
        f"model {pred['equal']:.3f}/{pred['competitive']:.3f}s")
  return MixCorrections(factors, backend, detail)


def transfer_time(model_bytes: Mapping[str, float], tasks, bandwidth: float) -> float:
  """Download plus upload of each trained model."""
  return sum(2 * model_bytes[t] for t in tasks) / bandwidth
