"""The federated run: a loop over rounds on the virtual clock, plus callbacks.

:func:`run_federated` resolves everything once (the federation and its tasks, the clock,
each task's algorithm and client executor), then drives rounds: synchronous ones (sample,
plan, fail, :func:`~mtfl_jax.federated.round.round_step`) or, for an asynchronous policy
(``fedbuff``), server steps of buffered asynchronous aggregation (:func:`fedbuff_steps`), on
the same clock. Checkpoints, evaluation, progress and metrics are callbacks
(:mod:`~mtfl_jax.federated.callbacks`).

Example::

    result = run_federated(FedConfig(tasks=("digits_mlp",), rounds=20), workdir="runs/a")
    result.history[-1]["accuracy"]["digits_mlp"]
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import time
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtfl_jax.clock import Clock, MixCorrections, inputs_from_json, inputs_json
from mtfl_jax.federated.algorithms import ServerState, check_server_optimizer, make_algorithm, server_optimizer
from mtfl_jax.federated.callbacks import Callback, Checkpoint, Evaluate, Progress
from mtfl_jax.federated.client import ClientWork, client_seed
from mtfl_jax.federated.config import FedConfig
from mtfl_jax.federated.executors import make_executor
from mtfl_jax.federated.federation import Federation, build_federation
from mtfl_jax.federated.executors import Aggregate
from mtfl_jax.federated.plan import check_plan, client_plan
from mtfl_jax.federated.round import TaskRuntime, apply_failures, round_step, run_clients, sample_clients
from mtfl_jax.fleet import dropout_draw
from mtfl_jax.files import check_writable, read_json, reading
from mtfl_jax.train import init_variables
from mtfl_jax.vresource import VRModel


@dataclasses.dataclass
class FedResult:
  """A run's end: the config, the final server state (``state.models[task]``: params, server
  optimizer state, model_state), the per-round history, the evaluations on the virtual-time
  grid (``eval_every_s``), the simulator's wall time and which executor ran each task."""
  cfg: FedConfig
  state: ServerState
  history: list
  wall_s: float
  executors: dict
  evaluations: list = dataclasses.field(default_factory=list)

  @property
  def virtual_time_s(self) -> float:
    return self.history[-1]["virtual_time_s"] if self.history else 0.0

  @property
  def work_s(self) -> float:
    """Training work done: local steps weighted by their task's solo step time ``s_i``
    (``VRModel.solo_step_s``), summed over tasks and aggregated clients."""
    return sum(h["work_s"] for h in self.history)

  @property
  def work_beyond_nominal_s(self) -> float:
    """The part of :attr:`work_s` beyond the clients' nominal epochs (never a gain)."""
    return sum(h.get("work_beyond_nominal_s", 0.0) for h in self.history)

  @property
  def fl_throughput(self) -> float:
    """FL throughput, a diagnostic: training work (solo-seconds, :attr:`work_s`) per virtual second."""
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


@dataclasses.dataclass
class Run:
  """What callbacks see: the config, federation, clock and per-task runtimes, the server
  state, the history rows and evaluations so far, the virtual time, and ``log``."""
  cfg: FedConfig
  fed: Federation
  clock: Clock
  runtimes: list
  state: ServerState
  history: list
  evaluations: list
  log: callable
  t_start: float
  virtual_time_s: float = 0.0
  stopped_by_budget: bool = False
  asynchronous: dict | None = None  # fedbuff: the server steps applied per task
  versions: dict = dataclasses.field(default_factory=dict)  # fedbuff: task -> {version: model}
  ended: str | None = None  # why the run ended before its rounds (budget, nobody online, ...)

  def async_state(self):
    return self.asynchronous

  def old_versions(self) -> dict:
    """fedbuff: the task versions older than the current one that pending updates started from."""
    if not self.asynchronous:
      return {}
    cur = self.asynchronous["steps"]
    return {t: {v: m for v, m in vs.items() if v != cur[t]} for t, vs in self.versions.items()}

  def result(self) -> FedResult:
    return FedResult(self.cfg, self.state, self.history, time.perf_counter() - self.t_start,
                     {rt.name: rt.executor.name for rt in self.runtimes}, self.evaluations)


def init_server(cfg: FedConfig, runtimes: Sequence[TaskRuntime]) -> ServerState:
  """Round 0: every task's seeded init (seed ``cfg.seed + i`` for the i-th task)."""
  models = {}
  for rt in runtimes:
    params, model_state = init_variables(rt.fed_task.task, cfg.seed + rt.fed_task.index)
    models[rt.name] = rt.algorithm.init(params, model_state)
  return ServerState(round=jnp.zeros((), jnp.int32), models=models)


def _measures_layout(cfg: FedConfig, ft, program, per_call: int, opts: dict) -> bool:
  """Whether building this task's executor measures its client layout (nothing stored yet)."""
  from mtfl_jax.calibration import load_layout
  from mtfl_jax.federated.executors import layout_key
  if cfg.simulator == "sharded":
    if jax.process_count() > 1 or opts.get("inner") is not None or opts.get("per_device") is not None:
      return False
  elif cfg.simulator != "auto" or opts.get("store") is False:
    return False
  return load_layout(layout_key(ft, program, per_call)[0]) is None


def make_runtimes(cfg: FedConfig, fed: Federation, server_tx=None, executor_options=None,
                  log=None) -> list[TaskRuntime]:
  """Each task's algorithm (the config's aggregator, server optimizer, FedProx/SCAFFOLD) and
  client executor (``cfg.simulator``), built once for the run. ``log`` hears when ``auto`` or
  ``sharded`` first measures a task's client layout on this machine (it takes a while once)."""
  tx = server_optimizer(server_tx if server_tx is not None else cfg.server_optimizer, cfg.server_lr,
                        cfg.server_kwargs)
  out = []
  for ft in fed.tasks:
    algo = make_algorithm(ft.task, cfg.aggregator_name, tx, cfg.prox_mu, cfg.algorithm == "scaffold",
                          holders=max(1, len(ft.holders)), staleness_exponent=cfg.staleness_exponent)
    # how many clients one executor call usually trains: a round's, or (FedBuff) the few updates
    # of a buffer that started from one model version (a batched chunk pads to its size)
    per_call = 2 if cfg.policy_value.asynchronous else cfg.clients_per_round
    opts = {"clients_hint": per_call, **(executor_options or {})}
    if cfg.simulator == "sharded":
      opts["devices"] = cfg.devices
    if log and _measures_layout(cfg, ft, algo.program, per_call, opts):
      from mtfl_jax.calibration import store_path
      log(f"mtfl_jax: measuring the client layouts of {ft.name} for rounds of about {per_call} clients "
          f"(once on this machine; kept in {store_path().name})")
    out.append(TaskRuntime(ft, algo, make_executor(cfg.simulator, ft, algo.program, **opts)))
  return out


def _clock_inputs(cfg, fed, model, corrections, workdir: Path | None, log) -> tuple[VRModel, MixCorrections | None]:
  """The clock's measured inputs, resolved once: a workdir's ``clock.json`` (a resumed or
  joined run keeps the clock it started with), else those given, else calibrated now on this
  machine (process 0; the others receive its)."""
  saved = workdir / "clock.json" if workdir is not None else None
  if saved is not None and saved.exists():
    remedy = "delete it (and checkpoints/) to start over, or use another workdir"
    doc = read_json(saved, "the run's clock", remedy, fields=("vr_model",))
    with reading(f"the run's clock {saved}", remedy):
      vr, corr = inputs_from_json(doc)
    started = (workdir / "config.json").exists()
    if not started and not set(cfg.tasks) <= set(vr.solo_step_s):  # left by a launch that never started
      saved = None
  if saved is not None and saved.exists():
    if model is not None and inputs_json(model, corrections) != inputs_json(vr, corr):
      warnings.warn("the virtual-resource model or corrections given differ from the ones this run started with; "
                    "it resumes with its own (use another workdir to change them)", stacklevel=3)
    return vr, corr
  if jax.process_count() > 1:
    from mtfl_jax.distributed import broadcast_json
    from mtfl_jax.calibration import calibrate_mix
    mine = None
    if jax.process_index() == 0:
      mine = inputs_json(model or calibrate_mix(cfg.task_defs), corrections)
    return inputs_from_json(broadcast_json(mine))
  if model is None:
    from mtfl_jax.calibration import calibrate_mix
    model = calibrate_mix(cfg.task_defs)
  return model, corrections


def _same_round_everywhere(done: int, workdir: Path) -> None:
  if jax.process_count() > 1:  # every process must go on from the same round
    from mtfl_jax.distributed import DistributedError, broadcast_json
    first = broadcast_json(done)
    if done != first:
      raise DistributedError(
          f"process {jax.process_index()} found round {done} in {workdir / 'checkpoints'} but process 0 found "
          f"round {first}: in a multi-process run every process must see the same workdir (a shared "
          "directory across hosts)")


def run_federated(cfg: FedConfig, model: VRModel | None = None, workdir: str | Path | None = None,
                  progress: bool = True, callbacks: Sequence[Callback] = (), fed: Federation | None = None,
                  corrections: MixCorrections | None = None, server_optimizer=None,
                  executor_options: dict | None = None) -> FedResult:
  """Runs ``cfg.rounds`` rounds (with ``cfg.time_budget_s``: until the next round would end
  past the budget, at most ``cfg.rounds``; for ``fedbuff``, server steps per task); with
  ``workdir``, checkpoints every round and resumes from its newest checkpoint.

  ``model`` is the virtual-resource model of the task mix on this machine (default: fitted
  now by :func:`mtfl_jax.calibration.calibrate_mix`; a resumed run uses the one it started
  with). ``corrections`` (:class:`mtfl_jax.clock.MixCorrections`) replace the model's makespan
  by measured co-runs of the clients' workload mixes where they were measured.
  ``server_optimizer``: an optax transformation instead of the config's named one.
  ``callbacks`` run after the built-in evaluation and progress bar and before the checkpoint
  (which so keeps what they add to a round's row).

  Example::

      res = run_federated(FedConfig(tasks=("digits_mlp",), rounds=5), workdir="runs/a")
      res = run_federated(FedConfig(tasks=("digits_mlp",), rounds=8), workdir="runs/a")  # 3 more
  """
  t_start = time.perf_counter()
  main = jax.process_index() == 0  # in a multi-process run, process 0 prints and writes files
  log = print if progress and main else (lambda m: None)
  if server_optimizer is not None:
    cfg = dataclasses.replace(cfg, server_optimizer=server_optimizer)
  # Everything is checked before anything is written: the settings and the workdir, the data,
  # the workdir's run, the clock, and that a first round (or server step) can run at all.
  check_server_optimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_kwargs)
  workdir = None if workdir is None else Path(workdir)
  if workdir is not None and main:
    check_writable(workdir, "workdir", directory=True)
  fed = build_federation(cfg) if fed is None else fed.with_config(cfg)
  runtimes = make_runtimes(cfg, fed, executor_options=executor_options, log=log)
  try:
    state, history, evaluations, async_done, restored_versions = init_server(cfg, runtimes), [], [], None, {}
    builtins: list[Callback] = []
    last: list[Callback] = []  # the checkpoint saves each row after every other callback saw it
    if workdir is not None:
      ckpt = Checkpoint(workdir)
      restored = ckpt.open(cfg, state, log)  # refuses another run before anything is written
      _same_round_everywhere(0 if restored is None else len(restored["history"]), workdir)
      if restored is not None:
        state, history, evaluations = restored["state"], restored["history"], restored["evaluations"]
        async_done, restored_versions = restored["async"], restored["versions"]
        for rt in runtimes:
          rt.client_states.update(restored["client_states"].get(rt.name, {}))
        log(f"mtfl_jax: resuming {workdir} after round {len(history)} of {cfg.rounds}")
      last.append(ckpt)  # it writes the clock (clock.json) and config when the run starts
    vr, corrections = _clock_inputs(cfg, fed, model, corrections, workdir, log)
    missing = set(cfg.tasks) - set(vr.solo_step_s)
    if missing:
      raise ValueError(f"the virtual-resource model knows no task {sorted(missing)}; calibrate it on {cfg.tasks}")
    clock = Clock(vr, fed.fleet.speed, fed.fleet.bandwidth, fed.model_bytes, corrections)
    evaluate = Evaluate(cfg.eval_every, cfg.eval_every_s)
    builtins.append(evaluate)
    if progress and main:
      builtins.append(Progress())
    run = Run(cfg, fed, clock, runtimes, state, history, evaluations, log, t_start,
              history[-1]["virtual_time_s"] if history else 0.0, asynchronous=async_done,
              versions=restored_versions)
    steps = fedbuff_steps(run) if cfg.policy_value.asynchronous else sync_rounds(run)
    first = next(steps, None)  # planned only: nothing has trained or been written yet
    if first is None and not history:
      raise ValueError(f"bad federated config: {run.ended or 'no round can run'}")
    if first is not None:
      evaluate.check_grid(run, run.virtual_time_s + first[1])
    cbs = builtins + list(callbacks) + last
    for cb in cbs:
      cb.on_run_start(run)
    for rnd, round_time, apply in itertools.chain([first], steps) if first is not None else ():
      for cb in cbs:
        cb.before_round(run, rnd, round_time)
      run.state, row = apply()
      run.virtual_time_s += round_time
      row["virtual_time_s"] = run.virtual_time_s
      history.append(row)
      stop = False
      for cb in cbs:
        stop = bool(cb.after_round(run, row)) or stop
      if stop:
        break
    if run.ended and history and not run.stopped_by_budget:
      log(f"mtfl_jax: the run ends: {run.ended}")
    for cb in cbs:
      cb.on_run_end(run)
  finally:
    for rt in runtimes:
      rt.executor.close()
  return run.result()


# --------------------------------------------------------------------------- synchronous rounds
def sync_rounds(run: Run) -> Iterator:
  """Synchronous rounds as ``(round, round_time_s, apply)``: the plan (and so the round's
  virtual time) is known before anything trains; ``apply()`` trains and returns ``(state,
  row)``. Stops at ``cfg.rounds`` or before the first round that would end past the budget."""
  cfg, fed, clock = run.cfg, run.fed, run.clock
  policy = cfg.policy_value
  av = fed.fleet.availability
  for rnd in range(len(run.history), cfg.rounds):
    online = None if av is None else av.online(run.virtual_time_s)
    sampled = sample_clients(cfg, policy, rnd, online)
    plan = check_plan(policy.plan(fed, clock, sampled), sampled, cfg.policy)
    plan = apply_failures(plan, cfg, fed.fleet, run.virtual_time_s, rnd)
    wait = 0.0
    if not sampled:  # nobody online: the round waits for the next client to come online
      wait = min(av.next_online(c, run.virtual_time_s) for c in range(cfg.num_clients)) - run.virtual_time_s
      if not np.isfinite(wait):
        run.ended = (f"no client is online at virtual second {run.virtual_time_s:.6g} or later (availability="
                     f"{str(cfg.availability)!r}), so round {rnd} cannot run; check the availability trace")
        return
    round_time = plan.round_time_s + wait
    if cfg.time_budget_s is not None and run.virtual_time_s + round_time > cfg.time_budget_s + 1e-9:
      run.stopped_by_budget = True
      run.ended = (f"round {rnd} would end at virtual second {run.virtual_time_s + round_time:.6g}, past "
                   f"time_budget_s={cfg.time_budget_s!r}; give time_budget_s >= {run.virtual_time_s + round_time:.6g} "
                   "(--time-budget) for it to run")
      return
    yield rnd, round_time, (lambda plan=plan, rnd=rnd, wait=wait: _apply(run, plan, rnd, wait))


def _apply(run: Run, plan, rnd: int, wait: float):
  state, row = round_step(run.state, plan, run.runtimes, rnd, run.cfg.seed, run.clock.model.solo_step_s)
  if wait:
    row["round_time_s"] += wait
    row["waited_for_online_s"] = wait
  return state, row


# --------------------------------------------------------------------------- FedBuff
@dataclasses.dataclass(frozen=True)
class Arrival:
  """One client's update reaching the server: who, when it started and finished, the task
  versions it started from, its planned work, and the seed index of its start."""
  client: int
  start_s: float
  finish_s: float
  base: dict
  workloads: dict
  nominal: dict
  start_index: int
  dropped: bool = False


# Consecutive client updates lost (dropout, offline before finishing) after which a FedBuff
# schedule ends: no server step could come (the chance of this many in a row at dropout 0.99 is 1e-44).
MAX_LOST_UPDATES = 10_000


def fedbuff_schedule(cfg: FedConfig, fed: Federation, clock: Clock,
                     until_s: float | None = None) -> Iterator[tuple[str, float, list, list]]:
  """Buffered asynchronous aggregation (FedBuff, Nguyen et al., 2022) on the virtual clock.

  ``concurrency`` clients train at once, each from the task versions current when it
  started, under equal shares for its local epochs; when one finishes (or leaves: dropout,
  offline) another online idle client starts at once (uniformly drawn, seeded). Each task has
  its own buffer: when ``buffer_size`` updates of a task have arrived, the server applies them
  (a server step) and the task's version goes up by one. Yields server steps in time order as
  ``(task, time, arrivals, staleness, oldest)``, ``oldest``: per task the oldest version a
  pending update started from (older versions can be freed). The schedule depends on the
  clock and seeds only, never on training results, so it is the same whenever it is
  replayed (resume). It ends (returning why, as ``(reason, value)``) past ``until_s``
  (``("budget", t)``), when no client will come online again (``("offline", t)``), or after
  :data:`MAX_LOST_UPDATES` updates in a row were lost (``("lost", t)``)."""
  m = cfg.concurrency or cfg.clients_per_round
  k = cfg.buffer_size or max(1, cfg.clients_per_round // 2)
  av = fed.fleet.availability
  versions = {ft.name: 0 for ft in fed.tasks}
  buffers: dict[str, list] = {ft.name: [] for ft in fed.tasks}
  heap: list = []
  busy: set = set()
  starts = 0

  def start(c: int, t: float):
    nonlocal starts
    cp = client_plan(fed, clock, c, "equal")
    drop_rng = np.random.default_rng([cfg.seed, starts, 2])
    finish, dropped = t + cp.time_s, False
    if cfg.dropout > 0 and dropout_draw(drop_rng, cfg.dropout, 1)[0]:
      finish, dropped = t + drop_rng.random() * cp.time_s, True
    if av is not None:
      off = av.online_until(c, t)
      if off < finish:
        finish, dropped = off, True
    a = Arrival(c, t, finish, dict(versions), dict(cp.workloads), dict(cp.nominal), starts, dropped)
    heapq.heappush(heap, (finish, starts, a))
    busy.add(c)
    starts += 1

  def pick(t: float) -> int | None:
    rng = np.random.default_rng([cfg.seed, starts, 3])
    online = np.ones(cfg.num_clients, bool) if av is None else av.online(t)
    pool = [c for c in np.flatnonzero(online) if c not in busy]
    return int(rng.choice(pool)) if pool else None

  t = 0.0
  for _ in range(m):
    c = pick(t)
    if c is None:
      break
    start(c, t)
  lost = 0
  while heap or av is not None:
    if not heap:  # nobody online: wait for the next client to come online
      nxt = min(av.next_online(c, t) for c in range(cfg.num_clients) if c not in busy)
      if not np.isfinite(nxt):
        return "offline", t
      if until_s is not None and nxt > until_s + 1e-9:
        return "budget", nxt
      t = nxt
      c = pick(t)
      if c is not None:
        start(c, t)
      continue
    t, _, a = heapq.heappop(heap)
    if until_s is not None and t > until_s + 1e-9:  # any server step from now on would come later
      return "budget", t
    busy.discard(a.client)
    lost = lost + 1 if a.dropped else 0
    if lost >= MAX_LOST_UPDATES:
      return "lost", t
    if not a.dropped:
      for j, ft in enumerate(fed.tasks):
        if a.workloads[ft.name] <= 0:
          continue
        buffers[ft.name].append(a)
        if len(buffers[ft.name]) >= k:
          arrivals = buffers[ft.name]
          staleness = [versions[ft.name] - x.base[ft.name] for x in arrivals]
          buffers[ft.name] = []
          versions[ft.name] += 1
          # Pending: updates still training or buffered, and this arrival for the tasks after
          # this one (it joins their buffers next): the versions they started from are kept.
          pending = [(x, None) for _, _, x in heap] + [(x, None) for b in buffers.values() for x in b]
          pending.append((a, {n.name for n in fed.tasks[j + 1:]}))
          oldest = {n: min([x.base[n] for x, only in pending if x.workloads[n] > 0 and (only is None or n in only)],
                           default=v) for n, v in versions.items()}
          yield ft.name, t, arrivals, staleness, oldest
    while len(busy) < m:
      c = pick(t)
      if c is None:
        break
      start(c, t)


def fedbuff_steps(run: Run) -> Iterator:
  """FedBuff's server steps as ``(step, time since the previous step, apply)`` (see
  :func:`fedbuff_schedule`). A resumed run replays the schedule up to the steps it had
  applied; it keeps every task version a pending update started from."""
  cfg, fed = run.cfg, run.fed
  by_name = {rt.name: rt for rt in run.runtimes}
  done = dict((run.asynchronous or {}).get("steps", {ft.name: 0 for ft in fed.tasks}))
  run.asynchronous = {"steps": done}
  versions = {t: {done[t]: run.state.models[t]} for t in done}
  for t, vs in run.versions.items():  # a resumed run: the old versions pending updates started from
    versions[t].update(vs)
  run.versions = versions
  seen = {t: 0 for t in done}
  last_t = run.virtual_time_s
  schedule = fedbuff_schedule(cfg, fed, run.clock, cfg.time_budget_s)
  while True:
    try:
      task, t, arrivals, staleness, oldest = next(schedule)
    except StopIteration as end:
      run.ended = _fedbuff_end(run, *end.value) if end.value else None
      return
    if seen[task] < done[task]:  # replaying what a resumed run had applied
      seen[task] += 1
      continue
    if cfg.time_budget_s is not None and t > cfg.time_budget_s + 1e-9:
      run.stopped_by_budget = True
      return
    if all(done[x] >= cfg.rounds for x in done):
      return
    if done[task] >= cfg.rounds:
      continue
    if any(seen[x] < done[x] for x in done):  # a step the earlier run skipped: its task had reached its rounds
      raise ValueError(f"this FedBuff run cannot go on to rounds={cfg.rounds}: its task '{task}' had finished its "
                       f"{done[task]} server steps while the other tasks went on, so the server steps it skipped then "
                       "were not applied and the model versions they start from were not kept; rerun it with "
                       f"rounds={done[task]}, or use another workdir for a longer run (nothing was changed)")
    seen[task] += 1
    rnd = len(run.history)
    dt, last_t = t - last_t, t
    yield rnd, dt, (lambda task=task, t=t, arrivals=arrivals, staleness=staleness, rnd=rnd, oldest=oldest:
                    _apply_buffer(run, by_name[task], versions, task, t, arrivals, staleness, rnd, oldest))


def _fedbuff_end(run: Run, reason: str, t: float) -> str:
  """Why a FedBuff schedule ended, for the run's log (or its error, when no step ran)."""
  cfg = run.cfg
  if reason == "budget":
    run.stopped_by_budget = True
    if any(run.asynchronous["steps"].values()):
      return f"the time budget (time_budget_s={cfg.time_budget_s!r}) is spent"
    first = next(fedbuff_schedule(cfg, run.fed, run.clock), None)
    at = f"at virtual second {first[1]:.6g}" if first is not None else "within the budget"
    return (f"time_budget_s={cfg.time_budget_s!r} ends before FedBuff's first server step ({at}, once buffer_size "
            f"updates of a task have arrived); give a larger time_budget_s (--time-budget)")
  if reason == "offline":
    return (f"no client is online at virtual second {t:.6g} or later (availability={str(cfg.availability)!r}), so no "
            "more updates can arrive; check the availability trace")
  why = [f"dropout={cfg.dropout!r}"] if cfg.dropout else []
  if cfg.availability is not None:
    why.append(f"clients going offline before they finish: availability={str(cfg.availability)!r}")
  return (f"the last {MAX_LOST_UPDATES:,} client updates were all lost before they arrived ({'; '.join(why)}), so no "
          "server step can come; lower the dropout (--dropout) or give clients longer online windows")


def _apply_buffer(run: Run, rt: TaskRuntime, versions: dict, task: str, t: float, arrivals, staleness, rnd: int,
                  oldest: dict):
  cfg = run.cfg
  keep = [i for i, s in enumerate(staleness) if cfg.max_staleness is None or s <= cfg.max_staleness]
  ft = rt.fed_task
  current = run.state.models[task]
  new = current
  if keep:
    sums_model = None
    samples = [len(ft.shards[arrivals[i].client]) for i in keep]
    steps = [arrivals[i].workloads[task] for i in keep]
    nominal = [arrivals[i].nominal[task] for i in keep]
    w = rt.algorithm.weights(samples, steps, nominal, [staleness[i] for i in keep])
    groups: dict = {}
    for j, i in enumerate(keep):
      groups.setdefault(arrivals[i].base[task], []).append(j)
    for base, idx in sorted(groups.items()):
      works = [ClientWork(arrivals[keep[j]].client, ft.shards[arrivals[keep[j]].client], steps[j],
                          client_seed(cfg.seed, arrivals[keep[j]].start_index, ft.index, arrivals[keep[j]].client))
               for j in idx]
      agg = run_clients(rt, versions[task][base], works, {k: v[idx] for k, v in w.items()},
                        f"server step {rnd} (from version {base})")
      sums_model = agg.sums if sums_model is None else jax.tree.map(np.add, sums_model, agg.sums)
    new = rt.algorithm.apply(current, Aggregate((), sums_model, np.ones(0, bool)))
  done = run.asynchronous["steps"]
  done[task] += 1
  versions[task][done[task]] = new
  for name, vs in versions.items():  # versions no pending update started from are freed
    for v in [v for v in vs if v < oldest[name] and v != done[name]]:
      del vs[v]
  solo = float(run.clock.model.solo_step_s[task])
  used = [arrivals[i] for i in keep]
  row = {"round": rnd, "task": task, "server_step": done[task], "round_time_s": None,
         "updates": [a.client for a in used], "staleness": [int(staleness[i]) for i in keep],
         "dropped_stale": [arrivals[i].client for i in range(len(arrivals)) if i not in keep],
         "samples": sum(a.workloads[task] for a in used) * ft.batch_size,
         "work_s": sum(a.workloads[task] for a in used) * solo,
         "work_by_task_s": {task: sum(a.workloads[task] for a in used) * solo},
         "work_beyond_nominal_s": 0.0, "idle_s": {}, "failures": [], "sampled": [a.client for a in arrivals]}
  row["round_time_s"] = t - (run.virtual_time_s)
  models = dict(run.state.models)
  models[task] = new
  return run.state.replace(round=run.state.round + 1, models=models), row
