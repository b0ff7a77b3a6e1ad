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


def client_compute_time(model: VRModel, workloads: Mapping[str, int], policy: str, speed: float) -> float:
  """Seconds for one client to run its per-task workloads co-scheduled under ``policy``
  (``none``: equal shares; ``intra``/``full``: virtual-resource-weighted shares)."""
  wl = {t: w for t, w in workloads.items() if w > 0}
  if not wl:
    return 0.0
  shares = {t: 1.0 for t in wl} if policy == "none" else model.competitive_shares(wl)
  return model.predict(wl, shares).makespan_s / speed


def transfer_time(model_bytes: Mapping[str, float], tasks, bandwidth: float) -> float:
  """Download plus upload of each trained model."""
  return sum(2 * model_bytes[t] for t in tasks) / bandwidth
