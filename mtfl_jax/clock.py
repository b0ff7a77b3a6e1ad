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
import json
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
    rows = json.loads(Path(path).read_text())
    if len(rows) < num_clients:
      raise ValueError(f"trace {path} describes {len(rows)} clients, the federation has {num_clients}")
    speed = np.array([r["speed"] for r in rows[:num_clients]], float)
    bw = np.array([r["bandwidth_bps"] / 8 for r in rows[:num_clients]], float)
    if not (np.all(speed > 0) and np.all(bw > 0)):
      raise ValueError(f"trace {path}: every speed and bandwidth must be > 0")
    return cls(speed, bw)


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
