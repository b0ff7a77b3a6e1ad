"""Round plans and the policies that make them.

A :class:`RoundPlan` is what a synchronous round will do, decided before any client trains:
per sampled client (:class:`ClientPlan`) its local steps per task, the steps its local epochs
would be (``nominal``), its compute and transfer time on the virtual clock, whether a measured
co-run corrected that time, and whether (and why) it is left out of the aggregate. Plans are
frozen values: a policy returns a new one, it never edits one in place.

A :class:`Policy` is a function ``plan(fed, clock, sampled) -> RoundPlan`` with a name, the
number of clients it samples (over-selection samples more than it aggregates) and the
aggregation it is meant for. Adding one is one value in :data:`POLICIES`
(:func:`register_policy`). The built-ins:

* ``none``: equal shares on every client's device, fixed local epochs (waits for the slowest);
* ``intra``: virtual-resource-weighted (``competitive``) shares on each client: the training
  is ``none``'s, only the clock changes;
* ``deadline``: equal shares, fixed epochs, and the clients slower than the
  ``deadline_quantile`` of the sampled clients' round times are dropped (their work is lost);
  the round lasts until the deadline;
* ``overselect``: sample ``ceil(overselect * K)`` clients, aggregate the first ``K`` to finish
  (Bonawitz et al., 2019); the round ends at the K-th arrival;
* ``full``: ``intra`` plus inter-device coordination: every client scales its local work to
  finish by the deadline quantile (:func:`scale_work_to_deadline`; fast clients extend up to
  ``max_work_scale`` times their epochs unless ``extend=False``);
* ``fedbuff``: asynchronous buffered aggregation (Nguyen et al., 2022); it has no rounds, so
  it plans no round: :mod:`~mtfl_jax.federated.run` drives it.

Example (a policy of your own: equal shares, half the local epochs)::

    def half_epochs(fed, clock, sampled):
      return RoundPlan(tuple(client_plan(fed, clock, c, "equal", fed.workloads(c, fed.cfg.local_epochs / 2))
                             for c in sampled), "equal")

    register_policy(Policy("half", half_epochs))
    run_federated(FedConfig(..., policy="half"))
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from mtfl_jax.clock import SHARE_RULES

# Why a sampled client is not in the aggregate.
DROPPED = {"missed deadline": "slower than the round deadline (deadline, full)",
           "over-selected": "not among the first K to finish (overselect)",
           "timeout": "slower than client_timeout_s",
           "dropout": "left mid-round (dropout probability or went offline)"}


@dataclasses.dataclass(frozen=True)
class ClientPlan:
  """One sampled client in a round.

  ``workloads``/``nominal``: local steps per task this round / what its local epochs give;
  ``compute_s``/``transfer_s``: virtual seconds on its device; ``measured``: the compute time
  follows a measured co-run of its mix (else the model); ``dropped``: None when its update is
  aggregated, else a key of :data:`DROPPED`; ``left_s``: for a dropout, when it left.
  """
  client: int
  workloads: Mapping[str, int]
  nominal: Mapping[str, int]
  compute_s: float
  transfer_s: float
  measured: bool = False
  dropped: str | None = None
  left_s: float | None = None

  @property
  def time_s(self) -> float:
    return self.compute_s + self.transfer_s

  def replace(self, **changes) -> "ClientPlan":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  """A synchronous round, planned: its clients, the share rule their devices use, and the
  deadline the policy set (None: none). With ``timeout_s``, the server waited that long for
  clients that timed out."""
  clients: tuple[ClientPlan, ...]
  shares: str
  deadline_s: float | None = None
  timeout_s: float | None = None

  @property
  def live(self) -> tuple[ClientPlan, ...]:
    """The clients whose updates are aggregated."""
    return tuple(c for c in self.clients if c.dropped is None)

  @property
  def round_time_s(self) -> float:
    """When the round ends: the last aggregated client's arrival; at least the deadline when
    the policy dropped someone for missing it (the server waited that long), at least the
    timeout when a client timed out; with no client left, when the last one left."""
    live = [c.time_s for c in self.live]
    t = max(live, default=0.0)
    if not live:
      t = max((c.left_s for c in self.clients if c.left_s is not None), default=0.0)
    if self.deadline_s is not None and any(c.dropped == "missed deadline" for c in self.clients):
      t = max(t, self.deadline_s)
    if self.timeout_s is not None and any(c.dropped == "timeout" for c in self.clients):
      t = max(t, self.timeout_s)
    return t

  def replace(self, **changes) -> "RoundPlan":
    return dataclasses.replace(self, **changes)


def client_plan(fed, clock, client: int, shares: str, workloads: Mapping[str, int] | None = None) -> ClientPlan:
  """``client``'s plan for ``workloads`` (default: its local epochs) under the ``shares`` rule."""
  nominal = fed.workloads(client)
  wl = nominal if workloads is None else dict(workloads)
  compute, measured = clock.compute_s(client, wl, shares)
  return ClientPlan(client, wl, nominal, compute, clock.transfer_s(client, [t for t, w in nominal.items() if w > 0]),
                    measured)


def nominal_plan(fed, clock, sampled: Sequence[int], shares: str) -> RoundPlan:
  """Every sampled client runs its local epochs under ``shares``."""
  return RoundPlan(tuple(client_plan(fed, clock, c, shares) for c in sampled), shares)


def quantile_deadline(plan: RoundPlan, q: float) -> float:
  """The ``q`` quantile of the clients' round times (``np.quantile``, linear interpolation)."""
  return float(np.quantile([c.time_s for c in plan.clients], q))


# --------------------------------------------------------------------------- built-in policies
def plan_none(fed, clock, sampled) -> RoundPlan:
  return nominal_plan(fed, clock, sampled, "equal")


def plan_intra(fed, clock, sampled) -> RoundPlan:
  return nominal_plan(fed, clock, sampled, "competitive")


def drop_late_clients(plan: RoundPlan, deadline: float) -> RoundPlan:
  """Clients whose round time exceeds ``deadline`` are dropped; the round lasts until it."""
  return plan.replace(clients=tuple(c.replace(dropped="missed deadline") if c.time_s > deadline else c
                                    for c in plan.clients), deadline_s=deadline)


def plan_deadline(fed, clock, sampled) -> RoundPlan:
  plan = nominal_plan(fed, clock, sampled, "equal")
  return drop_late_clients(plan, quantile_deadline(plan, fed.cfg.deadline_quantile))


def first_to_finish(plan: RoundPlan, k: int) -> RoundPlan:
  """Only the first ``k`` clients to arrive are aggregated (ties: the lower client id)."""
  order = sorted(plan.clients, key=lambda c: (c.time_s, c.client))
  late = {c.client for c in order[k:]}
  return plan.replace(clients=tuple(c.replace(dropped="over-selected") if c.client in late else c
                                    for c in plan.clients))


def plan_overselect(fed, clock, sampled) -> RoundPlan:
  return first_to_finish(nominal_plan(fed, clock, sampled, "equal"), fed.cfg.clients_per_round)


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


def scale_work_to_deadline(plan: RoundPlan, fed, clock, deadline: float, lo: float, hi: float) -> RoundPlan:
  """Every client scales its local work to finish by ``deadline``: its total solo work by
  ``(deadline - transfer) / compute``, capped at ``hi``, spread over its tasks by
  :func:`task_scales` (each between ``lo`` and ``hi`` times its epochs). A client that cannot
  do even ``lo`` of its work by the deadline is dropped (as ``deadline`` drops it) and the
  round then lasts until the deadline; otherwise until the last client finishes."""
  solo = clock.model.solo_step_s
  out, late = [], False
  for c in plan.clients:
    if c.compute_s <= 0:
      out.append(c)
      continue
    scale = min(hi, (deadline - c.transfer_s) / c.compute_s)
    if scale < lo:
      out.append(c.replace(dropped="missed deadline"))
      late = True
      continue
    k = task_scales({t: w * solo[t] for t, w in c.workloads.items() if w > 0}, scale, lo, hi)
    wl = {t: (max(1, int(round(w * k[t]))) if w > 0 else 0) for t, w in c.workloads.items()}
    compute, measured = clock.compute_s(c.client, wl, plan.shares)
    out.append(c.replace(workloads=wl, compute_s=compute, measured=measured))
  return plan.replace(clients=tuple(out), deadline_s=deadline if late else None)


def plan_full(fed, clock, sampled) -> RoundPlan:
  cfg = fed.cfg
  plan = nominal_plan(fed, clock, sampled, "competitive")
  # The lower bound: a client cut to a step or two would send a single noisy minibatch step.
  lo, hi = 1.0 / cfg.max_work_scale, (cfg.max_work_scale if cfg.extend else 1.0)
  return scale_work_to_deadline(plan, fed, clock, quantile_deadline(plan, cfg.deadline_quantile), lo, hi)


# --------------------------------------------------------------------------- the registry
AGGREGATORS = ("fedavg", "fednova", "fednova_nominal")


@dataclasses.dataclass(frozen=True)
class Policy:
  """How rounds are planned.

  Args:
    name: the key in :data:`POLICIES` (``FedConfig.policy``).
    plan: ``plan(fed, clock, sampled) -> RoundPlan`` (None for an asynchronous policy). It may
      set, per client, ``workloads`` (re-time it with ``clock.compute_s``), ``dropped`` (a key
      of :data:`DROPPED`), and the plan's ``deadline_s``; it must not change ``nominal``,
      ``transfer_s`` or which clients were sampled.
    sample_factor: the policy samples ``ceil(sample_factor * clients_per_round)`` clients
      (``FedConfig.overselect`` for over-selection when None).
    aggregator: the aggregation it is meant for when ``FedConfig.aggregator`` is None: one of
      :data:`AGGREGATORS` (FedNova variants normalise unequal local work).
    asynchronous: no rounds: the run's asynchronous driver runs it (``fedbuff``).
  """
  name: str
  plan: Callable | None = None
  sample_factor: float | None = 1.0
  aggregator: str = "fedavg"
  asynchronous: bool = False

  def __post_init__(self):
    if not (isinstance(self.name, str) and self.name):
      raise ValueError(f"a policy's name must be a non-empty string, got {self.name!r}")
    if self.asynchronous != (self.plan is None):
      raise ValueError(f"policy {self.name!r}: give plan(fed, clock, sampled) -> RoundPlan for a synchronous "
                       "policy, and no plan for an asynchronous one")
    if self.plan is not None and not callable(self.plan):
      raise ValueError(f"policy {self.name!r}: plan must be a function (fed, clock, sampled) -> RoundPlan")
    if self.aggregator not in AGGREGATORS:
      raise ValueError(f"policy {self.name!r}: aggregator must be one of {', '.join(AGGREGATORS)}, "
                       f"got {self.aggregator!r}")

  def sample_size(self, cfg) -> int:
    """How many clients a round samples (at most ``num_clients``)."""
    f = cfg.overselect if self.sample_factor is None else self.sample_factor
    return min(cfg.num_clients, math.ceil(f * cfg.clients_per_round - 1e-9))


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("none", plan_none),
    Policy("intra", plan_intra),
    Policy("deadline", plan_deadline),
    Policy("overselect", plan_overselect, sample_factor=None),
    Policy("full", plan_full, aggregator="fednova_nominal"),
    Policy("fedbuff", asynchronous=True),
)}


def register_policy(policy: Policy) -> Policy:
  """Adds ``policy`` to :data:`POLICIES` (a new name, or the same policy again).

  Example::

      register_policy(Policy("lazy", lambda fed, clock, s: nominal_plan(fed, clock, s, "competitive")))
  """
  if not isinstance(policy, Policy):
    raise TypeError(f"register_policy takes a Policy, got {type(policy).__name__}")
  held = POLICIES.get(policy.name)
  if held is not None and held is not policy:
    raise ValueError(f"a different policy is already registered as {policy.name!r}; give yours another name")
  POLICIES[policy.name] = policy
  return policy


def check_plan(plan: RoundPlan, sampled: Sequence[int], policy: str) -> RoundPlan:
  """A policy's plan must hold exactly the sampled clients, known shares and drop reasons."""
  if not isinstance(plan, RoundPlan):
    raise TypeError(f"policy {policy!r}: plan() must return a RoundPlan, got {type(plan).__name__}")
  if [c.client for c in plan.clients] != list(sampled):
    raise ValueError(f"policy {policy!r}: the plan must keep the sampled clients {list(sampled)} in order, "
                     f"got {[c.client for c in plan.clients]}")
  if plan.shares not in SHARE_RULES:
    raise ValueError(f"policy {policy!r}: shares must be one of {', '.join(SHARE_RULES)}, got {plan.shares!r}")
  for c in plan.clients:
    if c.dropped is not None and c.dropped not in DROPPED:
      raise ValueError(f"policy {policy!r}: client {c.client} dropped as {c.dropped!r}; valid: {', '.join(DROPPED)}")
  return plan
