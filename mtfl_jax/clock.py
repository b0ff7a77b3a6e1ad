"""The virtual clock of a simulated federation: pure functions of a fleet, a model and workloads.

Each client's round time is its co-scheduled makespan for its own per-task workloads (the
virtual-resource model fitted from a co-run measured on this machine, see
:mod:`mtfl_jax.vresource`), divided by the client's device speed, plus the time to download
and upload every model it trains (bytes / bandwidth). A synchronous round lasts as long as
its slowest participating client; the others idle for the difference.

The clients' devices (speed, bandwidth, availability) are :mod:`mtfl_jax.fleet`'s.

The intra-device part is modelled (:class:`~mtfl_jax.vresource.VRModel`) and checked against
measurement: :func:`mtfl_jax.calibration.measure_corrections` co-runs a few representative
workload mixes (bucketed by :func:`mix_key`) under equal and competitive shares, and
:func:`client_compute_time` scales the model's makespan by measured / predicted for clients
whose mix was measured (the clock follows the measurement there). Nothing here measures:
:class:`Clock` is a value, the same on every process and after a resume.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import numpy as np

from mtfl_jax.vresource import VRModel

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


def transfer_time(model_bytes: Mapping[str, float], tasks, bandwidth: float) -> float:
  """Download plus upload of each trained model."""
  return sum(2 * model_bytes[t] for t in tasks) / bandwidth


@dataclasses.dataclass(frozen=True)
class Clock:
  """A federation's virtual clock: the intra-device model of its task mix (with measured
  corrections where there are some), each client's device (``speed``, ``bandwidth`` in
  bytes/s) and each task's model size. Pure: the same inputs give the same times.

  Example::

      clock = Clock(model, fleet.speed, fleet.bandwidth, {"digits_mlp": 4.4e4})
      clock.compute_s(3, {"digits_mlp": 12}, "equal")   # (seconds, measured?)
  """
  model: VRModel
  speed: np.ndarray
  bandwidth: np.ndarray
  model_bytes: Mapping[str, float]
  corrections: MixCorrections | None = None

  def compute_s(self, client: int, workloads: Mapping[str, int], shares: str) -> tuple[float, bool]:
    """Seconds of client ``client`` to run ``workloads`` under the ``shares`` rule, and
    whether a measured co-run corrected the model's number."""
    return client_compute_time(self.model, workloads, shares, float(self.speed[client]), self.corrections,
                               with_source=True)

  def transfer_s(self, client: int, tasks) -> float:
    """Seconds of client ``client`` to download and upload the models of ``tasks``."""
    return transfer_time(self.model_bytes, tasks, float(self.bandwidth[client]))

  def inputs_json(self) -> dict:
    """The measured inputs (virtual-resource model, corrections) as JSON: what a run keeps so
    that a resumed or joined process uses the same clock."""
    return inputs_json(self.model, self.corrections)


def inputs_json(model: VRModel, corrections: MixCorrections | None) -> dict:
  """``{"vr_model", "corrections"}`` as JSON values (floats survive a JSON round trip bit for bit)."""
  return json.loads(json.dumps({"vr_model": model.to_json(),
                                "corrections": None if corrections is None else corrections.to_json()}, default=float))


def inputs_from_json(doc: Mapping) -> tuple[VRModel, MixCorrections | None]:
  """The inverse of :func:`inputs_json`."""
  corr = doc.get("corrections")
  return VRModel.from_json(doc["vr_model"]), None if corr is None else MixCorrections.from_json(corr)
