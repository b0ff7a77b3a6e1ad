"""Multi-task federated averaging (McMahan et al., 2017) on a virtual clock.

Every task has its own global model. In a round the server samples clients; each sampled
client trains every task it holds for its workload (``epochs * ceil(n / batch)`` local SGD
steps, from the global model, with a fresh optimizer state) and returns its model delta; the
server averages the deltas weighted by sample counts and applies them with an optax
optimizer (plain averaging is server SGD with learning rate 1).

Client work is three pure pieces, so the execution plan is a choice, not a rewrite (as in
fedjax's ``for_each_client``): :func:`client_init`, :func:`make_train_step` (the client
step) and :func:`client_final`. :func:`run_clients` runs them as a per-client loop or as one
``jax.vmap`` over the clients of a task (masked steps for clients with less work), and
``simulator="auto"`` picks whichever measures faster for each task.

Policies (what a round's plan is) are values in :data:`POLICIES` (:class:`FedPolicy`), which
:func:`plan_round` consults; add one by adding an entry:

* ``none``: equal shares on every client's device, fixed local epochs;
* ``intra``: virtual-resource-weighted shares on each client (same training as ``none``:
  only the clock changes);
* ``deadline``: the straggler mitigation of deployed FL: equal shares, fixed local epochs,
  and the clients that miss the round deadline (the ``deadline_quantile`` of the sampled
  clients' ``none`` round times, ``np.quantile`` with linear interpolation) are dropped: their
  work neither counts nor enters the aggregate, and the round lasts until the deadline;
* ``full``: ``intra`` plus inter-device coordination. The server sets a round deadline, the
  ``deadline_quantile`` of the sampled clients' ``intra`` round times, and every client
  scales its local work to finish by it (slow clients do fewer steps, fast ones more,
  between ``1 / max_work_scale`` and ``max_work_scale`` times their epochs; a client that
  cannot do the lower bound in time is dropped, see :func:`scale_work_to_deadline`). Unequal local
  work would bias plain FedAvg towards clients that step more (objective inconsistency,
  Wang et al. 2020), so ``full`` aggregates with FedNova: each delta is divided by the l1
  norm of its client's accumulation vector (:func:`accumulation_norm`; the step count for
  plain SGD, larger for momentum SGD), weighted by samples, and rescaled by the weighted
  mean norm. The weights stay the clients' sample shares: no client counts more for being
  fast.

FL throughput is training *work* per virtual second: a local step of task i counts the
task's solo step time ``s_i`` on this machine (``VRModel.solo_step_s``), so a U-Net step is
worth ~800 MLP steps; each history row records the round's ``work_s`` (solo-seconds of work
done by the clients whose updates were aggregated) and ``samples``. With
``FedConfig.time_budget_s`` a run stops before the first round that would end past the
budget (``rounds`` is then a cap), so policies can be compared at equal virtual time.

Reliability: a checkpoint (orbax) after every round holds the server state, the round index
and the history; a rerun with the same config and workdir resumes from it and ends with the
same parameters and metrics. A client that raises or times out is dropped from that round's
aggregate (weights renormalised over the rest) and recorded; a task whose clients all
failed keeps its global model. A non-finite update stops the run naming task, round and
client; the last good checkpoint stays.

Example::

    cfg = FedConfig(tasks=("digits_mlp",), num_clients=10, rounds=20, alpha=0.5)
    result = run_federated(cfg)
    result.history[-1]["accuracy"]["digits_mlp"]
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtfl_jax.clock import SPEED_SIGMA, Fleet, client_compute_time, transfer_time
from mtfl_jax.data import load_dataset
from mtfl_jax.results import read_json, write_json
from mtfl_jax.partition import assign_tasks, skewed_partition
from mtfl_jax.tasks import ALL_TASKS, get_task
from mtfl_jax.train import TrainState, evaluate, init_params, init_state, make_train_step, workload_steps
from mtfl_jax.vresource import VRModel

SIMULATORS = ("auto", "loop", "vmap")
FAULTS = ("raise", "timeout", "nan")


class ClientFailure(RuntimeError):
  """A client's work failed (raised); the round goes on without it."""


class NonFiniteUpdate(FloatingPointError):
  """A client's update is NaN or infinite: the run stops (the last checkpoint is kept)."""


@dataclasses.dataclass(frozen=True)
class FedConfig:
  tasks: tuple[str, ...] = ("digits_mlp",)
  num_clients: int = 10
  clients_per_round: int = 10
  rounds: int = 10
  local_epochs: float = 1.0
  alpha: float | None = 0.5  # Dirichlet label skew; None: quantity skew only
  quantity_sigma: float = 0.0
  presence: float = 1.0  # probability that a client holds a task
  policy: str = "none"
  deadline_quantile: float = 0.5
  max_work_scale: float = 2.0
  server_lr: float = 1.0
  seed: int = 0
  eval_every: int = 1
  simulator: str = "auto"
  speed_sigma: float = SPEED_SIGMA
  trace: str | None = None
  client_timeout_s: float | None = None  # virtual seconds; slower clients are dropped
  faults: tuple = ()  # for testing: ((round, client, "raise" | "timeout" | "nan"), ...)
  # Virtual seconds: the run stops before the first round that would end past it (``rounds``
  # is then a cap); None: run ``rounds`` rounds.
  time_budget_s: float | None = None

  def __post_init__(self):
    object.__setattr__(self, "tasks", tuple(self.tasks))
    object.__setattr__(self, "faults", tuple(tuple(f) for f in self.faults))
    check_config(self)
    if self.time_budget_s is not None and not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
      raise ValueError(f"bad federated config: time_budget_s must be a finite number > 0 (or None), "
                       f"got {self.time_budget_s!r}")

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


def check_config(cfg: FedConfig) -> None:
  def bad(msg):
    raise ValueError(f"bad federated config: {msg}")

  def integer(name, lo, hi=None, hi_name=None):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
      bad(f"{name} must be " + (f"between {lo} and {hi_name} ({hi}), an integer" if hi is not None
                                else f"an integer >= {lo}") + f", got {v!r}")

  def number(name, lo, lo_open=True, hi=None, none_ok=False, extra=""):
    v = getattr(cfg, name)
    if v is None and none_ok:
      return
    rng = (f"> {lo:g}" if lo_open else f">= {lo:g}") + (f" and <= {hi:g}" if hi is not None else "")
    ok = (not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
          and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi))
    if not ok:
      bad(f"{name} must be a finite number {rng}{extra}, got {v!r}")
  if not cfg.tasks:
    bad(f"no tasks; valid: {', '.join(ALL_TASKS)}")
  for t in cfg.tasks:
    get_task(t)
  if len(set(cfg.tasks)) != len(cfg.tasks):
    bad(f"a task is named twice in {cfg.tasks}")
  integer("num_clients", 1)
  integer("clients_per_round", 1, cfg.num_clients if isinstance(cfg.num_clients, int) else None, "num_clients")
  integer("rounds", 1)
  integer("seed", 0)
  integer("eval_every", 1)
  number("local_epochs", 0)
  if cfg.alpha is not None and not (isinstance(cfg.alpha, (int, float)) and not isinstance(cfg.alpha, bool)
                                    and math.isfinite(cfg.alpha) and cfg.alpha > 0):
    bad(f"Dirichlet alpha must be a finite number > 0 (or None for no label skew), got {cfg.alpha!r}")
  number("quantity_sigma", 0, lo_open=False)
  if not isinstance(cfg.presence, Mapping):  # a per-task mapping is checked by assign_tasks
    number("presence", 0, hi=1)
  number("deadline_quantile", 0, hi=1)
  number("max_work_scale", 1, lo_open=False)
  number("server_lr", 0)
  number("speed_sigma", 0, lo_open=False)
  number("client_timeout_s", 0, none_ok=True, extra=" (virtual seconds) or None")
  if cfg.policy not in FED_POLICIES:
    bad(f"unknown policy {cfg.policy!r}; valid: {', '.join(FED_POLICIES)}")
  if cfg.simulator not in SIMULATORS:
    bad(f"unknown simulator {cfg.simulator!r}; valid: {', '.join(SIMULATORS)}")
  if cfg.trace is not None and not isinstance(cfg.trace, (str, Path)):
    bad(f"trace must be a path to a JSON file or None, got {cfg.trace!r}")
  for f in cfg.faults:
    if len(f) != 3 or f[2] not in FAULTS:
      bad(f"fault {f!r} must be (round, client, kind) with kind in {FAULTS}")


class ServerState(flax.struct.PyTreeNode):
  """The server's state between rounds: per-task global params and server optimizer states."""
  round: jax.Array
  params: dict
  opt_state: dict


# --------------------------------------------------------------------------- federation data
@dataclasses.dataclass
class Federation:
  """What a config builds once: datasets, per-client shards per task, the fleet."""
  cfg: FedConfig
  datasets: dict
  shards: dict  # task -> list (per client) of index arrays (empty: client lacks the task)
  fleet: Fleet
  model_bytes: dict
  modes: dict = dataclasses.field(default_factory=dict)  # task -> "loop" | "vmap" (auto's choice)

  def workloads(self, client: int, epochs: float | Mapping[str, float] | None = None) -> dict[str, int]:
    out = {}
    for t in self.cfg.tasks:
      e = self.cfg.local_epochs if epochs is None else (epochs[t] if isinstance(epochs, Mapping) else epochs)
      out[t] = workload_steps(len(self.shards[t][client]), get_task(t).batch_size, e)
    return out


def build_federation(cfg: FedConfig) -> Federation:
  """Loads the tasks' real datasets (never synthetic: accuracy is measured) and partitions them."""
  datasets = {t: load_dataset(get_task(t).dataset, allow_synthetic=False) for t in cfg.tasks}
  holders = assign_tasks(cfg.tasks, cfg.num_clients, cfg.presence, cfg.seed)
  shards = {}
  for i, t in enumerate(cfg.tasks):
    clients = holders[t]
    parts = skewed_partition(datasets[t].y_train, len(clients), alpha=cfg.alpha,
                             quantity_sigma=cfg.quantity_sigma, seed=cfg.seed + 101 * (i + 1))
    per_client = [np.zeros(0, np.int64) for _ in range(cfg.num_clients)]
    for c, idx in zip(clients, parts):
      per_client[c] = idx
    if sum(len(p) for p in per_client) == 0:
      raise ValueError(f"task '{t}' has no data on any client")
    shards[t] = per_client
  fleet = (Fleet.from_trace(cfg.trace, cfg.num_clients) if cfg.trace
           else Fleet.lognormal(cfg.num_clients, cfg.seed, cfg.speed_sigma))
  model_bytes = {t: 4.0 * sum(np.prod(p.shape) for p in jax.tree.leaves(init_params(get_task(t), 0)))
                 for t in cfg.tasks}
  return Federation(cfg, datasets, shards, fleet, model_bytes)


# --------------------------------------------------------------------------- client work
def client_init(task, global_params) -> TrainState:
  """A client's starting state: the global model and a fresh optimizer state."""
  return init_state(task, params=global_params)


def client_final(global_params, state: TrainState):
  """What a client sends back: its model delta."""
  return jax.tree.map(jnp.subtract, state.params, global_params)


def client_seed(seed: int, rnd: int, task_index: int, client: int) -> int:
  return int(np.random.SeedSequence([seed, rnd, task_index, client]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class ClientWork:
  client: int
  indices: np.ndarray
  steps: int
  seed: int
  fault: str | None = None


_STEP_CACHE: dict = {}


def _jitted_step(task):
  if task not in _STEP_CACHE:
    _STEP_CACHE[task] = jax.jit(make_train_step(task))
  return _STEP_CACHE[task]


def _vmapped_update(task, num_steps: int):
  key = (task, "vmap", num_steps)
  if key not in _STEP_CACHE:
    step = make_train_step(task)

    def masked(state, x, y, m):
      new, _ = step(state, {"image": x, "label": y})
      return jax.tree.map(lambda a, b: jnp.where(m, a, b), new, state)

    def one_client(global_params, images, labels, mask):
      state = client_init(task, global_params)
      if num_steps <= 8:  # short: unrolled (faster on XLA CPU)
        for i in range(num_steps):
          state = masked(state, images[i], labels[i], mask[i])
      else:
        state, _ = jax.lax.scan(lambda st, xs: (masked(st, *xs), None), state, (images, labels, mask))
      return client_final(global_params, state)

    _STEP_CACHE[key] = jax.jit(jax.vmap(one_client, in_axes=(None, 0, 0, 0)))
  return _STEP_CACHE[key]


def _batch_ids(work: ClientWork, batch_size: int) -> np.ndarray:
  from mtfl_jax.train import batch_indices
  return batch_indices(work.indices, batch_size, work.steps, work.seed)


@dataclasses.dataclass
class ClientResults:
  """The clients that finished (in order), their deltas stacked on a leading axis, and the
  failures (client -> error)."""
  clients: list
  deltas: Any
  failures: dict


def _injected(w: ClientWork) -> ClientFailure:
  return ClientFailure(f"client {w.client} raised (injected fault)")


def _loop_clients(task, ds, global_params, works) -> ClientResults:
  step = _jitted_step(task)
  done, deltas, failures = [], [], {}
  for w in works:
    try:
      if w.fault == "raise":
        raise _injected(w)
      ids = _batch_ids(w, task.batch_size)
      state = client_init(task, global_params)
      for j in range(w.steps):
        state, _ = step(state, {"image": ds.x_train[ids[j]], "label": ds.y_train[ids[j]]})
      deltas.append(client_final(global_params, state))
      done.append(w.client)
    except ClientFailure as e:
      failures[w.client] = e
  stacked = jax.tree.map(lambda *d: jnp.stack(d), *deltas) if deltas else None
  return ClientResults(done, stacked, failures)


def _vmap_clients(task, ds, global_params, works) -> ClientResults:
  ok = [w for w in works if w.fault != "raise"]
  failures = {w.client: _injected(w) for w in works if w.fault == "raise"}
  if not ok:
    return ClientResults([], None, failures)
  wmax = max(w.steps for w in ok)
  if wmax > 8:  # round up so that few distinct programs are compiled
    wmax = -(-wmax // 8) * 8
  ids = np.zeros((len(ok), wmax, task.batch_size), np.int64)
  mask = np.zeros((len(ok), wmax), bool)
  for k, w in enumerate(ok):
    ids[k, :w.steps] = _batch_ids(w, task.batch_size)
    mask[k, :w.steps] = True
  deltas = _vmapped_update(task, wmax)(global_params, ds.x_train[ids], ds.y_train[ids], mask)
  return ClientResults([w.client for w in ok], deltas, failures)


def run_clients(task, ds, global_params, works: Sequence[ClientWork], mode: str) -> ClientResults:
  """Runs every client's local update for ``task`` as a per-client loop or one vmap."""
  if mode == "loop":
    return _loop_clients(task, ds, global_params, works)
  if mode == "vmap":
    return _vmap_clients(task, ds, global_params, works)
  raise ValueError(f"unknown simulator mode {mode!r}; valid: loop, vmap")


_MODE_CHOICE: dict = {}


def _time_mode(task, ds, params, works, mode) -> float:
  jax.block_until_ready(run_clients(task, ds, params, works, mode).deltas)  # compile
  t0 = time.perf_counter()
  jax.block_until_ready(run_clients(task, ds, params, works, mode).deltas)
  return time.perf_counter() - t0


def choose_mode(task, ds, global_params, works) -> str:
  """Loop or vmap for these clients, by measurement (cached per task and client count).

  A probe on two clients and two steps first: where vmap loses even there (convolutions on
  XLA CPU become slow grouped convolutions), the loop is chosen without compiling the large
  vmapped program. Otherwise both run on the real clients, each compiled before timing.
  """
  key = (task, len(works), jax.default_backend())
  if key not in _MODE_CHOICE:
    probe = [dataclasses.replace(w, steps=min(2, w.steps), fault=None) for w in works[:2]]
    if _time_mode(task, ds, global_params, probe, "vmap") > _time_mode(task, ds, global_params, probe, "loop"):
      _MODE_CHOICE[key] = "loop"
    else:
      full = [dataclasses.replace(w, fault=None) for w in works]
      times = {m: _time_mode(task, ds, global_params, full, m) for m in ("loop", "vmap")}
      _MODE_CHOICE[key] = min(times, key=times.get)
  return _MODE_CHOICE[key]


# --------------------------------------------------------------------------- server
def init_server(cfg: FedConfig) -> ServerState:
  params = {t: init_params(get_task(t), cfg.seed + i) for i, t in enumerate(cfg.tasks)}
  tx = optax.sgd(cfg.server_lr)
  return ServerState(round=jnp.zeros((), jnp.int32), params=params,
                     opt_state={t: tx.init(p) for t, p in params.items()})


def accumulation_norm(steps: int, momentum: float = 0.0) -> float:
  """l1 norm of a client's accumulation vector ``a`` (Wang et al. 2020, FedNova): its update
  after ``steps`` local steps is ``-lr * sum_k a_k g_k``. Plain SGD: ``a_k = 1``, the norm is
  ``steps``. Heavy-ball momentum ``rho`` (optax.sgd: ``v = rho v + g; x -= lr v``): gradient k
  is applied ``sum_{j<steps-k} rho^j`` times, so the norm is
  ``[steps - rho (1 - rho^steps) / (1 - rho)] / (1 - rho)``."""
  tau, rho = float(steps), float(momentum or 0.0)
  if rho == 0.0:
    return tau
  return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)


_WARNED_NORM: set = set()


def fednova_norm_kind(task) -> tuple[float | None, str]:
  """The momentum FedNova normalises with for ``task`` and a note for the history.

  ``task.momentum`` is a float for (momentum) SGD; None means the client optimizer is not
  SGD, for which no closed-form accumulation vector is known here: the step count is used
  (a warning, once per task) and the history says so."""
  rho = getattr(task, "momentum", None)
  if rho is None:
    name = getattr(task, "name", str(task))
    if name not in _WARNED_NORM:
      _WARNED_NORM.add(name)
      warnings.warn(f"task '{name}': client optimizer is not (momentum) SGD; FedNova falls back to "
                    "normalising by step counts", stacklevel=2)
    return None, "steps (client optimizer not SGD: fallback)"
  return float(rho), f"accumulation norm, momentum {float(rho):g}" if rho else "steps (plain SGD)"


def aggregate(deltas, samples, norms=None):
  """Sample-weighted average of stacked deltas (leading axis: clients): FedAvg; with
  ``norms`` (each client's :func:`accumulation_norm`), FedNova's normalised average
  ``(sum_c p_c norm_c) * sum_c p_c delta_c / norm_c``."""
  p = jnp.asarray(samples, jnp.float32)
  p = p / p.sum()
  if norms is not None:
    a = jnp.asarray(norms, jnp.float32)
    p = p / a * jnp.sum(p * a)
  return jax.tree.map(lambda d: jnp.tensordot(p, d, axes=1), deltas)


# --------------------------------------------------------------------------- policies
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
    p["workloads"] = {t: (max(1, int(round(w * k[t]))) if w > 0 else 0) for t, w in p["workloads"].items()}
    p["compute_s"], p["measured"] = clock(p["workloads"], c)
  return deadline if late else None


@dataclasses.dataclass(frozen=True)
class FedPolicy:
  """How a round is planned: the shares each client's device uses (``"equal"`` or
  ``"competitive"``, i.e. virtual-resource weighted), an optional coordination step
  ``coordinate(fed, model, plan, clock) -> round deadline | None`` that may change workloads
  (``clock(workloads, client)`` re-times a client) or mark clients ``dropped``, and whether
  the aggregate is FedNova-normalised (needed when local work differs across clients)."""
  name: str
  shares: str
  coordinate: Callable | None = None
  fednova: bool = False


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


def apply_round(fed: Federation, state: ServerState, model: VRModel, rnd: int,
                callback: Callable[[str, int], None] | None = None, corrections=None,
                time_left_s: float | None = None) -> tuple[ServerState, dict | None]:
  """One synchronous round: sample, plan, train every task's clients, aggregate, clock.

  With ``time_left_s``, a round that would last longer is not run: returns ``(state, None)``."""
  cfg = fed.cfg
  policy = POLICIES[cfg.policy]
  rng = np.random.default_rng([cfg.seed, rnd])
  sampled = sorted(rng.choice(cfg.num_clients, cfg.clients_per_round, replace=False).tolist())
  plan, deadline = plan_round(fed, model, sampled, corrections)
  faults = {(r, c): k for r, c, k in cfg.faults if r == rnd}
  failures, dropped = [], set()
  for c in sampled:
    if plan[c]["dropped"]:
      dropped.add(c)
      failures.append({"client": c, "task": "*", "kind": "missed deadline"})
    elif faults.get((rnd, c)) == "timeout" or (cfg.client_timeout_s and plan[c]["time_s"] > cfg.client_timeout_s):
      dropped.add(c)
      failures.append({"client": c, "task": "*", "kind": "timeout"})
  live = [c for c in sampled if c not in dropped]
  finish = {c: plan[c]["time_s"] for c in live}
  round_time = max(finish.values(), default=0.0)
  if deadline is not None and any(plan[c]["dropped"] for c in sampled):
    round_time = max(round_time, deadline)  # the server waits until the deadline
  if dropped and cfg.client_timeout_s:
    round_time = max(round_time, cfg.client_timeout_s)
  if time_left_s is not None and round_time > time_left_s:
    return state, None
  new_params, new_opt = dict(state.params), dict(state.opt_state)
  samples_done, work_by_task, norm_kind = 0, {}, {}
  tx = optax.sgd(cfg.server_lr)
  for ti, t in enumerate(cfg.tasks):
    task, ds = get_task(t), fed.datasets[t]
    works = [ClientWork(c, fed.shards[t][c], plan[c]["workloads"][t], client_seed(cfg.seed, rnd, ti, c),
                        faults.get((rnd, c)) if faults.get((rnd, c)) == "raise" else None)
             for c in live if plan[c]["workloads"][t] > 0]
    if not works:
      continue
    mode = cfg.simulator
    if mode == "auto":
      if t not in fed.modes:
        fed.modes[t] = choose_mode(task, ds, state.params[t], works)
      mode = fed.modes[t]
    res = run_clients(task, ds, state.params[t], works, mode)
    for c, err in res.failures.items():
      failures.append({"client": c, "task": t, "kind": "raise", "error": str(err)})
    if not res.clients:
      continue  # every client of this task failed: keep its global model
    deltas = res.deltas
    nan_rows = [k for k, c in enumerate(res.clients) if faults.get((rnd, c)) == "nan"]
    if nan_rows:
      deltas = jax.tree.map(lambda d: d.at[np.array(nan_rows)].set(jnp.nan), deltas)
    finite = np.ones(len(res.clients), bool)
    for leaf in jax.tree.leaves(deltas):
      finite &= np.asarray(jnp.all(jnp.isfinite(leaf.reshape(len(res.clients), -1)), axis=1))
    if not finite.all():
      bad = res.clients[int(np.flatnonzero(~finite)[0])]
      raise NonFiniteUpdate(f"task '{t}', round {rnd}, client {bad}: the local update is not "
                            "finite (NaN/inf loss). Lower the task's learning rate; the run stopped "
                            "and its last good checkpoint is kept.")
    by_client = {w.client: w for w in works}
    steps_done = sum(by_client[c].steps for c in res.clients)
    samples_done += steps_done * task.batch_size
    work_by_task[t] = steps_done * float(model.solo_step_s[t])
    n = [len(by_client[c].indices) for c in res.clients]
    norms = None
    if policy.fednova:
      rho, norm_kind[t] = fednova_norm_kind(task)
      norms = [accumulation_norm(by_client[c].steps, rho or 0.0) for c in res.clients]
    delta = aggregate(deltas, n, norms)
    updates, new_opt[t] = tx.update(jax.tree.map(jnp.negative, delta), state.opt_state[t], state.params[t])
    new_params[t] = optax.apply_updates(state.params[t], updates)
    if callback:
      callback("task_done", rnd)
  diag = {"round": rnd, "sampled": sampled, "round_time_s": round_time, "deadline_s": deadline,
          "client_time_s": {str(c): plan[c]["time_s"] for c in sampled},
          "idle_s": {str(c): round_time - finish[c] for c in live},
          "samples": samples_done, "work_s": sum(work_by_task.values()), "work_by_task_s": work_by_task,
          "clock_measured": {str(c): plan[c]["measured"] for c in sampled},
          "failures": failures, "workloads": {str(c): plan[c]["workloads"] for c in sampled}}
  if norm_kind:
    diag["fednova_norm"] = norm_kind
  return ServerState(round=state.round + 1, params=new_params, opt_state=new_opt), diag


# --------------------------------------------------------------------------- the run
@dataclasses.dataclass
class FedResult:
  cfg: FedConfig
  state: ServerState
  history: list  # one dict per round (diagnostics, virtual time, accuracy when evaluated)
  wall_s: float
  modes: dict

  @property
  def virtual_time_s(self) -> float:
    return self.history[-1]["virtual_time_s"] if self.history else 0.0

  @property
  def work_s(self) -> float:
    """Training work done: local steps weighted by their task's solo step time ``s_i``
    (``VRModel.solo_step_s``), summed over tasks and aggregated clients."""
    return sum(h["work_s"] for h in self.history)

  @property
  def fl_throughput(self) -> float:
    """FL throughput: training work (solo-seconds, :attr:`work_s`) per virtual second."""
    return self.work_s / max(self.virtual_time_s, 1e-12)

  @property
  def samples_per_s(self) -> float:
    """Training samples per virtual second (every task's sample counts the same)."""
    return sum(h["samples"] for h in self.history) / max(self.virtual_time_s, 1e-12)

  def final_accuracy(self) -> dict:
    for h in reversed(self.history):
      if "accuracy" in h:
        return h["accuracy"]
    return {}


def _evaluate_all(fed: Federation, state: ServerState) -> dict:
  out = {}
  for t in fed.cfg.tasks:
    ds = fed.datasets[t]
    m = evaluate(get_task(t), state.params[t], ds.x_test, ds.y_test)
    out[t] = round(m["miou"] if "miou" in m else m["accuracy"], 6)
  return out


def _manager(workdir: Path):
  import orbax.checkpoint as ocp
  opts = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
  return ocp.CheckpointManager((workdir / "checkpoints").resolve(), options=opts)


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir can be read."""


@contextlib.contextmanager
def _filtered_stderr():
  """Drops the 'Event loop is closed' tracebacks that orbax's pending reads print after a
  failed restore; anything else written to ``sys.stderr`` goes through."""
  real, buf = sys.stderr, io.StringIO()
  sys.stderr = buf
  try:
    yield
  except Exception:
    time.sleep(0.2)  # let pending reads finish while stderr is held
    raise
  finally:
    sys.stderr = real
    blocks = re.split(r"(?m)^(?=Traceback \(most recent call last\):)", buf.getvalue())
    real.write("".join(b for b in blocks if "Event loop is closed" not in b))


def restore_latest(mgr, template: ServerState, workdir: Path, log=print) -> tuple[ServerState, list] | None:
  """(state, history) from the newest readable checkpoint of ``mgr`` (None: there is none).

  Unreadable newer checkpoints (truncated or corrupt files, say after a crash mid-write or a
  full disk) are moved aside to ``WORKDIR/checkpoints.unreadable/`` (kept, not deleted) once
  an older one has been read; ``log`` says which were skipped and why. If none can be read,
  nothing is moved and :class:`CheckpointError` names the directory and the remedy.
  """
  import orbax.checkpoint as ocp
  host = jax.tree.map(np.asarray, template)
  skipped = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      with _filtered_stderr():
        restored = mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(host), history=ocp.args.JsonRestore()))
      history = list(restored.history)
      if len(history) != step:
        raise ValueError(f"its history has {len(history)} rounds, expected {step}")
    except Exception as e:  # noqa: BLE001 - any failure to read means: try the one before
      skipped.append((step, " ".join(f"{type(e).__name__}: {e}".split())[:300]))
      continue
    for bad, why in skipped:
      aside = workdir / "checkpoints.unreadable" / f"{bad}_{time.strftime('%Y%m%d-%H%M%S')}"
      aside.parent.mkdir(parents=True, exist_ok=True)
      Path(mgr.directory, str(bad)).rename(aside)
      log(f"mtfl_jax: skipped the checkpoint of round {bad}, which cannot be read ({why}); moved it to {aside}")
    if skipped:
      mgr.reload()
      log(f"mtfl_jax: resuming from the checkpoint of round {step} in {mgr.directory}")
    return jax.tree.map(jnp.asarray, restored.state), history
  if skipped:
    raise CheckpointError(
        f"none of the checkpoints in {mgr.directory} can be read ("
        + "; ".join(f"round {st}: {why}" for st, why in skipped)
        + f"). Move that directory away (or delete it) to start {workdir} over from round 0, or use another workdir")
  return None


def run_federated(cfg: FedConfig, model: VRModel | None = None, workdir: str | Path | None = None,
                  progress: bool = True, callback: Callable[[str, int], None] | None = None,
                  fed: Federation | None = None, corrections=None) -> FedResult:
  """Runs ``cfg.rounds`` rounds (with ``cfg.time_budget_s``: until the next round would end
  past the budget, at most ``cfg.rounds``); with ``workdir``, checkpoints every round and resumes.

  ``model`` is the virtual-resource model of the task mix on this machine (by default
  fitted now from a co-run on the ``processes`` backend: :func:`calibrate_mix`).
  ``corrections`` (:class:`mtfl_jax.clock.MixCorrections`) replace the model's makespan by
  measured co-runs of the clients' workload mixes where they were measured.
  ``callback(event, round)`` is called with "round_start", "task_done" and "round_end".
  """
  import orbax.checkpoint as ocp
  t_start = time.perf_counter()
  fed = fed or build_federation(cfg)
  model = model or calibrate_mix(cfg.tasks)
  missing = set(cfg.tasks) - set(model.solo_step_s)
  if missing:
    raise ValueError(f"the virtual-resource model knows no task {sorted(missing)}; calibrate it on {cfg.tasks}")
  state, history = init_server(cfg), []
  mgr = None
  if workdir is not None:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_file = workdir / "config.json"
    same = lambda d: {k: v for k, v in d.items() if k != "rounds"}  # more rounds: the run goes on
    if cfg_file.exists() and same(read_json(cfg_file, "the run's config", f"delete it to reuse {workdir} (its checkpoints are kept) or use another workdir", fields=("tasks",))) != same(cfg.to_json()):
      raise ValueError(f"{workdir} holds a run with a different config; use another workdir "
                       "(nothing there was changed)")
    write_json(cfg_file, cfg.to_json())
    mgr = _manager(workdir)
    restored = restore_latest(mgr, state, workdir, print if progress else (lambda m: None))
    if restored is not None:
      state, history = restored
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.rounds, initial=int(state.round), desc=f"FL {cfg.policy}", leave=False)
  vt = history[-1]["virtual_time_s"] if history else 0.0
  try:
    for rnd in range(int(state.round), cfg.rounds):
      if callback:
        callback("round_start", rnd)
      left = None if cfg.time_budget_s is None else cfg.time_budget_s - vt
      state, diag = apply_round(fed, state, model, rnd, callback, corrections, left)
      if diag is None:  # the next round would end past the time budget
        if history and "accuracy" not in history[-1]:
          history[-1]["accuracy"] = _evaluate_all(fed, state)
        break
      vt += diag["round_time_s"]
      diag["virtual_time_s"] = vt
      if (rnd + 1) % cfg.eval_every == 0 or rnd + 1 == cfg.rounds:
        diag["accuracy"] = _evaluate_all(fed, state)
      history.append(diag)
      if mgr is not None:
        mgr.save(rnd + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(jax.tree.map(np.asarray, state)),
                                                  history=ocp.args.JsonSave(history)))
        mgr.wait_until_finished()
      if callback:
        callback("round_end", rnd)
      if bar is not None:
        bar.update(1)
        bar.set_postfix(round_s=f"{diag['round_time_s']:.2f}",
                        **{t[:10]: f"{a:.3f}" for t, a in diag.get("accuracy", {}).items()})
  finally:
    if bar is not None:
      bar.close()
    if mgr is not None:
      mgr.close()
  return FedResult(cfg, state, history, time.perf_counter() - t_start, dict(fed.modes))


# --------------------------------------------------------------------------- calibration
_MIX_MODELS: dict = {}


def calibrate_mix(tasks: Sequence[str], backend: str = "processes", solo_work_s: float = 1.0) -> VRModel:
  """Fits (once per process and task mix) the virtual-resource model used by the clock: one
  equal-share co-run of the tasks on ``backend``, each with ``solo_work_s`` of solo work."""
  from mtfl_jax.backends import Job, open_backend
  from mtfl_jax.bench_cosched import solo_step_times
  key = (tuple(tasks), backend)
  if key not in _MIX_MODELS:
    solo = solo_step_times(tasks)
    jobs = [Job(t, max(2, int(solo_work_s / solo[t])), seed=i) for i, t in enumerate(tasks)]
    if len(jobs) == 1:
      _MIX_MODELS[key] = VRModel(solo, {tasks[0]: 1.0}, {tasks[0]: 1.0})
    else:
      with open_backend(backend, jobs) as r:
        r.run(None)  # warm-up
        _MIX_MODELS[key] = VRModel.fit(r.solo_step_s, r.run(None))
  return _MIX_MODELS[key]
