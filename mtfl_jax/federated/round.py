"""One synchronous round: sample, plan, fail, train, aggregate.

:func:`round_step` is the whole round given its plan: ``(state, plan, runtimes) -> (state,
row)``. Sampling (:func:`sample_clients`, online clients only) and client failures
(:func:`apply_failures`: timeouts, dropout mid-round, going offline) happen before it, on the
plan, so that every policy handles them alike and the history says how many there were.

Example::

    sampled = sample_clients(cfg, policy, rnd, online)
    plan = apply_failures(policy.plan(fed, clock, sampled), cfg, fed.fleet, t0, rnd)
    state, row = round_step(state, plan, runtimes, rnd, cfg.seed)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mtfl_jax.federated.client import ClientWork, client_seed
from mtfl_jax.federated.plan import RoundPlan
from mtfl_jax.fleet import dropout_draw


class NonFiniteUpdate(FloatingPointError):
  """A client's update is NaN or infinite: the run stops (the last checkpoint is kept)."""


@dataclasses.dataclass
class TaskRuntime:
  """What a run holds per task: the task's federation data, its algorithm, the executor of its
  clients, and its clients' states between rounds (stateful algorithms: SCAFFOLD)."""
  fed_task: object
  algorithm: object
  executor: object
  client_states: dict = dataclasses.field(default_factory=dict)

  @property
  def name(self) -> str:
    return self.fed_task.name

  def states_of(self, clients: Sequence[int], broadcast):
    """The clients' states (a fresh one for a client's first round); None for stateless algorithms."""
    prog = self.algorithm.program
    if not prog.stateful:
      return None
    fresh = None
    out = []
    for c in clients:
      if c not in self.client_states:
        if fresh is None:
          import jax
          fresh = jax.tree.map(np.asarray, prog.new_client_state(broadcast))
        out.append(fresh)
      else:
        out.append(self.client_states[c])
    return out


def sample_clients(cfg, policy, rnd: int, online: np.ndarray | None = None) -> list[int]:
  """The clients of round ``rnd`` (seeded by ``(seed, rnd)``): ``policy.sample_size(cfg)`` of
  the clients online at its start (all, without an availability model), sorted."""
  rng = np.random.default_rng([cfg.seed, rnd])
  k = policy.sample_size(cfg)
  if online is None:
    return sorted(rng.choice(cfg.num_clients, k, replace=False).tolist())
  pool = np.flatnonzero(online)
  return sorted(rng.choice(pool, min(k, len(pool)), replace=False).tolist()) if len(pool) else []


def apply_failures(plan: RoundPlan, cfg, fleet, start_s: float, rnd: int) -> RoundPlan:
  """Marks the planned clients that do not report back: slower than ``client_timeout_s``
  (dropped as "timeout"; the server waits the timeout), leaving mid-round with probability
  ``dropout`` or going offline before they finish ("dropout", at the moment they leave).
  Draws are seeded by ``(seed, rnd)`` for every client of the federation, so a client's fate
  does not depend on who else was sampled. An over-selecting policy's waiting list moves up:
  the first ``clients_per_round`` clients that do report are aggregated."""
  rng = np.random.default_rng([cfg.seed, rnd, 1])
  drops = dropout_draw(rng, cfg.dropout, cfg.num_clients) if cfg.dropout > 0 else np.zeros(cfg.num_clients, bool)
  when = rng.random(cfg.num_clients)
  av = fleet.availability
  out = []
  for c in plan.clients:
    if c.dropped not in (None, "over-selected"):
      out.append(c)
      continue
    left = None
    if drops[c.client]:
      left = float(when[c.client]) * c.time_s
    if av is not None:
      off = av.online_until(c.client, start_s) - start_s
      if off < c.time_s:
        left = off if left is None else min(left, off)
    if left is not None:
      out.append(c.replace(dropped="dropout", left_s=max(0.0, float(left))))
    elif cfg.client_timeout_s is not None and c.time_s > cfg.client_timeout_s:
      out.append(c.replace(dropped="timeout"))
    else:
      out.append(c)
  plan = plan.replace(clients=tuple(out), timeout_s=cfg.client_timeout_s)
  if any(c.dropped == "over-selected" for c in plan.clients):
    order = sorted((c for c in plan.clients if c.dropped in (None, "over-selected")), key=lambda c: (c.time_s, c.client))
    keep = {c.client for c in order[:cfg.clients_per_round]}
    plan = plan.replace(clients=tuple(
        c.replace(dropped=None if c.client in keep else "over-selected") if c.dropped in (None, "over-selected") else c
        for c in plan.clients))
  return plan


def client_works(rt: TaskRuntime, plan: RoundPlan, rnd: int, seed: int) -> tuple[list, list, list]:
  """The works of a task's aggregated clients in a round, their sample counts and nominal steps."""
  ft, works, samples, nominal = rt.fed_task, [], [], []
  for cp in plan.live:
    steps = cp.workloads[ft.name]
    if steps <= 0:
      continue
    works.append(ClientWork(cp.client, ft.shards[cp.client], steps, client_seed(seed, rnd, ft.index, cp.client)))
    samples.append(len(ft.shards[cp.client]))
    nominal.append(cp.nominal[ft.name])
  return works, samples, nominal


def run_clients(rt: TaskRuntime, model, works, weights, where: str):
  """Trains a task's clients from the global ``model`` with its executor and returns their
  :class:`~mtfl_jax.federated.executors.Aggregate` (keeping their new states). A non-finite
  update stops the run naming the task, ``where`` (the round) and the client."""
  bc = rt.algorithm.broadcast(model)
  agg = rt.executor.run(bc, works, weights, rt.states_of([w.client for w in works], bc))
  bad = agg.first_bad_client()
  if bad is not None:
    import jax
    if not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(model.params)):
      raise NonFiniteUpdate(f"task '{rt.name}', {where}: the global model is not finite (NaN/inf): the server "
                            "optimizer's step diverged. Lower server_lr (--server-lr) or use another server_optimizer; "
                            "the run stopped and its last good checkpoint is kept.")
    raise NonFiniteUpdate(f"task '{rt.name}', {where}, client {bad}: the local update is not finite (NaN/inf "
                          "loss). Lower the task's learning rate (or prox_mu, --prox-mu, when it is set); the run "
                          "stopped and its last good checkpoint is kept.")
  if agg.client_states is not None:
    rt.client_states.update(zip(agg.clients, agg.client_states))
  return agg


def train_task(rt: TaskRuntime, model, works, samples, nominal, where: str):
  """Trains a task's clients from its global ``model`` and returns the new global model."""
  weights = rt.algorithm.weights(samples, [w.steps for w in works], nominal)
  return rt.algorithm.apply(model, run_clients(rt, model, works, weights, where))


def round_step(state, plan: RoundPlan, runtimes: Sequence[TaskRuntime], rnd: int, seed: int, solo_step_s):
  """One synchronous round of a planned ``plan``: every task's aggregated clients train from
  its global model, the algorithm applies their aggregate. Returns the new server state and
  the round's history row (times, who ran, work done; work beyond the clients' nominal
  epochs on its own line, ``work_beyond_nominal_s``)."""
  models = dict(state.models)
  samples_done, work_by_task, extra_by_task, notes = 0, {}, {}, {}
  for rt in runtimes:
    works, samples, nominal = client_works(rt, plan, rnd, seed)
    if not works:
      continue  # no client of this task reported back: keep its global model
    models[rt.name] = train_task(rt, state.models[rt.name], works, samples, nominal, f"round {rnd}")
    steps = [w.steps for w in works]
    samples_done += sum(steps) * rt.fed_task.batch_size
    work_by_task[rt.name] = sum(steps) * float(solo_step_s[rt.name])
    extra_by_task[rt.name] = sum(max(0, s - n) for s, n in zip(steps, nominal)) * float(solo_step_s[rt.name])
    if rt.algorithm.note is not None:
      notes[rt.name] = rt.algorithm.note
  round_time = plan.round_time_s
  live = {c.client: c.time_s for c in plan.live}
  row = {"round": rnd, "sampled": [c.client for c in plan.clients], "round_time_s": round_time,
         "deadline_s": plan.deadline_s, "client_time_s": {str(c.client): c.time_s for c in plan.clients},
         "idle_s": {str(c): round_time - t for c, t in live.items()},
         "samples": samples_done, "work_s": sum(work_by_task.values()), "work_by_task_s": work_by_task,
         "work_beyond_nominal_s": sum(extra_by_task.values()),
         "clock_measured": {str(c.client): c.measured for c in plan.clients},
         "failures": [{"client": c.client, "task": "*", "kind": c.dropped} for c in plan.clients if c.dropped],
         "workloads": {str(c.client): dict(c.workloads) for c in plan.clients}}
  if notes:
    row["fednova_norm"] = notes
  return state.replace(round=state.round + 1, models=models), row
