"""Round policies: what a round's plan is, as values a user can add to :data:`POLICIES`.

A :class:`FedPolicy` says which shares each client's device uses (``"equal"``, or
``"competitive"``: virtual-resource weighted, see :data:`mtfl_jax.clock.SHARE_RULES`), an
optional coordination step that may change the clients' workloads or drop clients against a
round deadline, and whether the aggregate is FedNova-normalised (needed when local work
differs across clients). The built-ins:

* ``none``: equal shares on every client's device, fixed local epochs;
* ``intra``: virtual-resource-weighted shares on each client (same training as ``none``:
  only the clock changes);
* ``deadline``: the straggler mitigation of deployed FL: equal shares, fixed local epochs,
  and the clients that miss the round deadline (the ``deadline_quantile`` of the sampled
  clients' ``none`` round times, ``np.quantile`` with linear interpolation) are dropped: their
  work neither counts nor enters the aggregate, and the round lasts until the deadline;
* ``full``: ``intra`` plus inter-device coordination (:func:`scale_work_to_deadline`),
  aggregated with FedNova.

Example (a policy of your own: equal shares, half the local epochs)::

    def half_epochs(fed, model, plan, clock):
      for c, p in plan.items():
        p["workloads"] = fed.workloads(c, fed.cfg.local_epochs / 2)
        p["compute_s"], p["measured"] = clock(p["workloads"], c)
      return None                      # no round deadline

    POLICIES["half"] = FedPolicy("half", "equal", half_epochs)
    run_federated(FedConfig(..., policy="half"))
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from mtfl_jax.clock import SHARE_RULES, client_compute_time, transfer_time
from mtfl_jax.federated.federation import Federation
from mtfl_jax.vresource import VRModel


def _client_times(plan: dict) -> list:
  return [p["compute_s"] + p["transfer_s"] for p in plan.values()]


def drop_late_clients(fed: Federation, model: VRModel, plan: dict, clock) -> float:
  """``deadline``: clients whose round time exceeds the ``deadline_quantile`` of the sampled
  clients' round times are dropped; the round lasts until the deadline."""
  deadline = float(np.quantile(_client_times(plan), fed.cfg.deadline_quantile))
  for p in plan.values():
    if p["compute_s"] + p["transfer_s"] > deadline:
      p["dropped"] = True
  return deadline


def task_scales(work_s: Mapping[str, float], scale: float, lo: float, hi: float) -> dict[str, float]:
  """Per-task factors on a client's local work that scale its total solo work
  ``sum_i f_i s_i`` (``f_i``: task i's fraction of the client's solo work ``W_i s_i``) by
  ``scale`` while changing each task's local epochs as little as possible: minimising
  ``sum_i (s_i - 1)^2`` under that constraint gives ``s_i = 1 + (scale - 1) f_i / sum_j f_j^2``
  (Lagrange). Time lives in the heavy task, so that is where work is cut or added; a light
  task that costs the client almost nothing keeps its epochs (cutting it would buy no time
  and cost accuracy). Each factor is clipped to ``[lo, hi]``."""
  total = sum(work_s.values())
  f = {t: w / total for t, w in work_s.items()}
  norm = sum(v * v for v in f.values())
  return {t: float(np.clip(1.0 + (scale - 1.0) * v / norm, lo, hi)) for t, v in f.items()}


def scale_work_to_deadline(fed: Federation, model: VRModel, plan: dict, clock) -> float | None:
  """``full``: every client scales its local work to finish by the ``deadline_quantile`` of
  the sampled clients' round times: its total solo work by ``(deadline - transfer) /
  compute``, spread over its tasks by :func:`task_scales` (each task between
  ``1 / max_work_scale`` and ``max_work_scale`` times its epochs). The lower bound is there
  because FedNova extrapolates each client's normalised update to the mean accumulation
  norm: a client cut to a step or two would have its first minibatch gradient multiplied by
  ~100 under momentum 0.9. A client that cannot do even the lower bound by the deadline is
  dropped (as ``deadline`` drops it) and the round then lasts until the deadline; otherwise
  it lasts until the last client finishes."""
  cfg = fed.cfg
  lo, hi = 1.0 / cfg.max_work_scale, cfg.max_work_scale
  deadline = float(np.quantile(_client_times(plan), cfg.deadline_quantile))
  late = False
  for c, p in plan.items():
    if p["compute_s"] <= 0:
      continue
    scale = min(hi, (deadline - p["transfer_s"]) / p["compute_s"])
    if scale < lo:
      p["dropped"] = late = True
      continue
    wl = {t: w for t, w in p["workloads"].items() if w > 0}
    k = task_scales({t: w * model.solo_step_s[t] for t, w in wl.items()}, scale, lo, hi)
    p["nominal_workloads"] = dict(p["workloads"])  # what FedNova normalises back to
    p["workloads"] = {t: (max(1, int(round(w * k[t]))) if w > 0 else 0) for t, w in p["workloads"].items()}
    p["compute_s"], p["measured"] = clock(p["workloads"], c)
  return deadline if late else None


@dataclasses.dataclass(frozen=True)
class FedPolicy:
  """How a round is planned.

  Args:
    name: the key in :data:`POLICIES` (``FedConfig.policy``).
    shares: how each client's device is shared among its tasks: a key of
      :data:`mtfl_jax.clock.SHARE_RULES` (``"equal"``, or ``"competitive"``: virtual-resource
      weighted).
    coordinate: optional ``coordinate(fed, model, plan, clock) -> round deadline | None``;
      it may change ``plan[c]["workloads"]`` (then re-time the client with
      ``plan[c]["compute_s"], plan[c]["measured"] = clock(workloads, c)``) or set
      ``plan[c]["dropped"] = True``. A round with dropped clients lasts until the deadline.
    fednova: aggregate with FedNova (needed when local work differs across clients) rather
      than FedAvg.

  Example::

      POLICIES["lazy"] = FedPolicy("lazy", "competitive")
  """
  name: str
  shares: str
  coordinate: Callable | None = None
  fednova: bool = False

  def __post_init__(self):
    if self.shares not in SHARE_RULES:
      raise ValueError(f"policy {self.name!r}: shares must be one of {', '.join(SHARE_RULES)}, got {self.shares!r}")
    if self.coordinate is not None and not callable(self.coordinate):
      raise ValueError(f"policy {self.name!r}: coordinate must be a function (fed, model, plan, clock) -> deadline")


POLICIES: dict[str, FedPolicy] = {p.name: p for p in (
    FedPolicy("none", "equal"),
    FedPolicy("intra", "competitive"),
    FedPolicy("deadline", "equal", drop_late_clients),
    FedPolicy("full", "competitive", scale_work_to_deadline, fednova=True),
)}
FED_POLICIES = POLICIES.keys()  # a live view: policies added to POLICIES are valid names


def plan_round(fed: Federation, model: VRModel, sampled: Sequence[int], corrections=None) -> tuple[dict, float | None]:
  """Per sampled client: workloads, compute/transfer/round time under the config's policy,
  whether the compute time is corrected by a measured co-run (``measured``) and whether the
  client is ``dropped``; and the round deadline the policy set (None: none set)."""
  cfg = fed.cfg
  policy = POLICIES[cfg.policy]

  def clock(wl, c):
    return client_compute_time(model, wl, policy.shares, fed.fleet.speed[c], corrections, with_source=True)

  plan = {}
  for c in sampled:
    wl = fed.workloads(c)
    tasks = [t for t in cfg.tasks if wl[t] > 0]
    comp, measured = clock(wl, c)
    plan[c] = {"workloads": wl, "transfer_s": transfer_time(fed.model_bytes, tasks, fed.fleet.bandwidth[c]),
               "compute_s": comp, "measured": measured, "dropped": False}
  deadline = policy.coordinate(fed, model, plan, clock) if policy.coordinate else None
  for p in plan.values():
    p["time_s"] = p["compute_s"] + p["transfer_s"]
  return plan, deadline
