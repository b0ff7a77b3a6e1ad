"""The federated run: rounds on the virtual clock, checkpoints and resume, progress.

A round (:func:`apply_round`) samples clients, plans them under the config's policy
(:func:`~mtfl_jax.federated.policies.plan_round`), runs each task's clients
(:func:`~mtfl_jax.federated.simulator.run_clients`), aggregates them
(:mod:`~mtfl_jax.federated.algorithms`) and advances the clock by its slowest live client.

Reliability: a checkpoint (orbax) after every round holds the server state (every task's
params, server optimizer state and model_state), the round index, the history, and the
clock's inputs (the virtual-resource model and measured corrections), so a rerun with the
same config and workdir resumes from it, with no model passed, and ends with the same
parameters and metrics. A client that raises or times out is dropped from that round's
aggregate (weights renormalised over the rest) and recorded; a task whose clients all failed
keeps its global model. A non-finite update stops the run naming task, round and client; the
last good checkpoint stays.

Example::

    result = run_federated(FedConfig(tasks=("digits_mlp",), rounds=20), workdir="runs/a")
    result.history[-1]["accuracy"]["digits_mlp"]
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtfl_jax.calibration import calibrate_mix
from mtfl_jax.clock import MixCorrections
from mtfl_jax.federated.algorithms import (ClientUpdates, FedAlgorithm, ServerState, fed_avg, fed_nova_nominal,
                                           fednova_norm_kind)
from mtfl_jax.federated.config import FedConfig
from mtfl_jax.federated.federation import Federation, build_federation
from mtfl_jax.federated.policies import POLICIES, FedPolicy, plan_round
from mtfl_jax.federated.simulator import ClientWork, choose_mode, client_seed, run_clients
from mtfl_jax.results import read_json, write_json
from mtfl_jax.train import evaluate, init_variables
from mtfl_jax.vresource import VRModel

FAULTS = ("raise", "timeout", "nan")


class ClientFailure(RuntimeError):
  """A client's work failed (raised); the round goes on without it."""


class NonFiniteUpdate(FloatingPointError):
  """A client's update is NaN or infinite: the run stops (the last checkpoint is kept)."""


def check_faults(faults) -> tuple:
  """``faults`` as a tuple of ``(round, client, kind)``; a ``ValueError`` names a bad one."""
  out = tuple(tuple(f) for f in faults)
  for f in out:
    if len(f) != 3 or f[2] not in FAULTS:
      raise ValueError(f"fault {f!r} must be (round, client, kind) with kind in {FAULTS}")
  return out


# --------------------------------------------------------------------------- server
def server_algorithm(cfg: FedConfig, policy: FedPolicy, task) -> tuple[FedAlgorithm, str | None]:
  """The aggregation of ``task`` under ``policy`` (server SGD at ``cfg.server_lr``) and, for
  FedNova, the history's note on what it normalises by."""
  tx = optax.sgd(cfg.server_lr)
  if not policy.fednova:
    return fed_avg(tx), None
  rho, note = fednova_norm_kind(task)
  return fed_nova_nominal(tx, rho or 0.0), note + ", to each client's nominal work"


def init_server(cfg: FedConfig) -> ServerState:
  """Round 0: every task's seeded init (seed ``cfg.seed + i`` for the i-th task)."""
  models = {}
  for i, t in enumerate(cfg.tasks):
    params, model_state = init_variables(cfg.task(t), cfg.seed + i)
    models[t] = fed_avg(optax.sgd(cfg.server_lr)).init(params, model_state)
  return ServerState(round=jnp.zeros((), jnp.int32), models=models)


def _finite_rows(tree, n: int) -> np.ndarray:
  ok = np.ones(n, bool)
  for leaf in jax.tree.leaves(tree):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      ok &= np.asarray(jnp.all(jnp.isfinite(leaf.reshape(n, -1)), axis=1))
  return ok


def apply_round(fed: Federation, state: ServerState, model: VRModel, rnd: int,
                callback: Callable[[str, int], None] | None = None, corrections=None,
                time_left_s: float | None = None, faults: Sequence = ()) -> tuple[ServerState, dict | None]:
  """One synchronous round: sample, plan, train every task's clients, aggregate, clock.

  With ``time_left_s``, a round that would last longer is not run: returns ``(state, None)``.
  ``faults`` is for testing failure handling: ``((round, client, "raise" | "timeout" |
  "nan"), ...)`` makes that client raise, miss ``client_timeout_s`` or send a NaN update."""
  cfg = fed.cfg
  policy = POLICIES[cfg.policy]
  rng = np.random.default_rng([cfg.seed, rnd])
  sampled = sorted(rng.choice(cfg.num_clients, cfg.clients_per_round, replace=False).tolist())
  plan, deadline = plan_round(fed, model, sampled, corrections)
  fault = {c: k for r, c, k in faults if r == rnd}
  failures, dropped = [], set()
  for c in sampled:
    if plan[c]["dropped"]:
      dropped.add(c)
      failures.append({"client": c, "task": "*", "kind": "missed deadline"})
    elif fault.get(c) == "timeout" or (cfg.client_timeout_s and plan[c]["time_s"] > cfg.client_timeout_s):
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
  models = dict(state.models)
  samples_done, work_by_task, norm_kind = 0, {}, {}
  for ti, t in enumerate(cfg.tasks):
    task, ds, glob = cfg.task(t), fed.datasets[t], state.models[t]
    works = []
    for c in live:
      if plan[c]["workloads"][t] <= 0:
        continue
      if fault.get(c) == "raise":  # a simulated client crash: it never reports back
        err = ClientFailure(f"client {c} raised (injected fault)")
        failures.append({"client": c, "task": t, "kind": "raise", "error": str(err)})
        continue
      works.append(ClientWork(c, fed.shards[t][c], plan[c]["workloads"][t], client_seed(cfg.seed, rnd, ti, c)))
    if not works:
      continue  # no client of this task reported back: keep its global model
    algo, note = server_algorithm(cfg, policy, task)
    if note is not None:
      norm_kind[t] = note
    n = [len(w.indices) for w in works]
    steps = [w.steps for w in works]
    nominal = [plan[w.client].get("nominal_workloads", plan[w.client]["workloads"])[t] for w in works]
    if cfg.simulator == "sharded":  # the weighted reduction runs on the devices
      res = fed.sharded_clients(t).run(glob.params, glob.model_state, works, algo.weights(n, steps, nominal),
                                       np.asarray(n, np.float32) / sum(n),
                                       [fault.get(w.client) == "nan" for w in works])
      finite = np.array([res.finite[c] for c in res.clients])
    else:
      mode = cfg.simulator
      if mode == "auto":
        if t not in fed.modes:
          fed.modes[t] = choose_mode(task, ds, glob.params, works, glob.model_state)
        mode = fed.modes[t]
      res = run_clients(task, ds, glob.params, works, mode, glob.model_state)
      deltas = res.deltas
      nan_rows = [k for k, c in enumerate(res.clients) if fault.get(c) == "nan"]
      if nan_rows:
        deltas = jax.tree.map(lambda d: d.at[np.array(nan_rows)].set(jnp.nan), deltas)
      finite = _finite_rows(deltas, len(res.clients)) & _finite_rows(res.model_states, len(res.clients))
    if not finite.all():
      bad = res.clients[int(np.flatnonzero(~finite)[0])]
      raise NonFiniteUpdate(f"task '{t}', round {rnd}, client {bad}: the local update is not "
                            "finite (NaN/inf loss). Lower the task's learning rate; the run stopped "
                            "and its last good checkpoint is kept.")
    samples_done += sum(steps) * task.batch_size
    work_by_task[t] = sum(steps) * float(model.solo_step_s[t])
    if cfg.simulator == "sharded":
      models[t] = algo.apply_mean(glob, jax.tree.map(jnp.asarray, res.delta),
                                  jax.tree.map(jnp.asarray, res.model_state))
    else:
      models[t] = algo.apply(glob, ClientUpdates(deltas, res.model_states, n, steps, nominal))
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
  return ServerState(round=state.round + 1, models=models), diag


# --------------------------------------------------------------------------- the run
@dataclasses.dataclass
class FedResult:
  """A run's end: the config, the final server state (``state.models[task]``: params,
  server optimizer state, model_state), the per-round history, the simulator's wall time and
  ``auto``'s simulator choice per task."""
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
    ds, glob = fed.datasets[t], state.models[t]
    m = evaluate(fed.cfg.task(t), glob.params, ds.x_test, ds.y_test, model_state=glob.model_state)
    out[t] = round(m["miou"] if "miou" in m else m["accuracy"], 6)
  return out


def _manager(workdir: Path):
  import orbax.checkpoint as ocp
  # In a multi-process run every process reads the checkpoints and process 0 alone writes
  # them: each process's manager works on its own (no cross-process barriers in orbax).
  me = jax.process_index()
  mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  opts = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=False,
                                      multiprocessing_options=mp, read_only=me != 0)
  root = (workdir / "checkpoints").resolve()
  if me == 0:
    root.mkdir(parents=True, exist_ok=True)
  return ocp.CheckpointManager(root, options=opts)


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


class Restored(NamedTuple):
  """A checkpoint's contents: the server state, the history, and the clock's inputs
  (``{"vr_model": ..., "corrections": ... | None}``)."""
  state: ServerState
  history: list
  clock: dict


def restore_latest(mgr, template: ServerState, workdir: Path, log=print) -> Restored | None:
  """The newest readable checkpoint of ``mgr`` (None: there is none).

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
            state=ocp.args.StandardRestore(host), history=ocp.args.JsonRestore(),
            clock=ocp.args.JsonRestore()))
      history = list(restored.history)
      if len(history) != step:
        raise ValueError(f"its history has {len(history)} rounds, expected {step}")
    except Exception as e:  # noqa: BLE001 - any failure to read means: try the one before
      skipped.append((step, " ".join(f"{type(e).__name__}: {e}".split())[:300]))
      continue
    for bad, why in skipped if jax.process_index() == 0 else ():  # process 0 moves them
      aside = workdir / "checkpoints.unreadable" / f"{bad}_{time.strftime('%Y%m%d-%H%M%S')}"
      aside.parent.mkdir(parents=True, exist_ok=True)
      Path(mgr.directory, str(bad)).rename(aside)
      log(f"mtfl_jax: skipped the checkpoint of round {bad}, which cannot be read ({why}); moved it to {aside}")
    if skipped:
      mgr.reload()
      log(f"mtfl_jax: resuming from the checkpoint of round {step} in {mgr.directory}")
    return Restored(jax.tree.map(jnp.asarray, restored.state), history, dict(restored.clock))
  if skipped:
    raise CheckpointError(
        f"none of the checkpoints in {mgr.directory} can be read ("
        + "; ".join(f"round {st}: {why}" for st, why in skipped)
        + f"). Move that directory away (or delete it) to start {workdir} over from round 0, or use another workdir")
  return None




# Settings a rerun may change and still resume: more rounds, and where clients run (devices
# change only the float rounding of the aggregate).
RESUMABLE_CHANGES = ("rounds", "devices")


def config_differences(saved: dict, given: dict) -> str:
  """The settings in which ``given`` differs from a workdir's ``saved`` config (JSON dicts),
  as ``"name: saved -> given, ..."``; empty when a rerun with ``given`` resumes that run."""
  keys = sorted((set(saved) | set(given)) - set(RESUMABLE_CHANGES))
  return ", ".join(f"{k}: {saved.get(k)!r} -> {given.get(k)!r}" for k in keys if saved.get(k) != given.get(k))


def _clock_json(model: VRModel, corrections: MixCorrections | None) -> dict:
  # through JSON text: floats come back bit-identical, so a resumed clock is the same clock
  return json.loads(json.dumps({"vr_model": dataclasses.asdict(model),
                                "corrections": None if corrections is None else corrections.to_json()},
                               default=float))


def _clock_inputs(saved: dict, model, corrections) -> tuple[VRModel, MixCorrections | None]:
  """The checkpoint's model and corrections; given ones that differ are not used (the run
  goes on with what it started with, so that it ends as an uninterrupted run would)."""
  vr = VRModel(**saved["vr_model"])
  corr = None if saved.get("corrections") is None else MixCorrections.from_json(saved["corrections"])
  given = _clock_json(model or vr, corrections if corrections is not None else corr)
  if given != _clock_json(vr, corr):
    warnings.warn("the virtual-resource model or corrections given differ from the ones this run "
                  "started with; it resumes with its checkpoint's (use another workdir to change them)",
                  stacklevel=3)
  return vr, corr


def run_federated(cfg: FedConfig, model: VRModel | None = None, workdir: str | Path | None = None,
                  progress: bool = True, callback: Callable[[str, int], None] | None = None,
                  fed: Federation | None = None, corrections: MixCorrections | None = None,
                  faults: Sequence = ()) -> FedResult:
  """Runs ``cfg.rounds`` rounds (with ``cfg.time_budget_s``: until the next round would end
  past the budget, at most ``cfg.rounds``); with ``workdir``, checkpoints every round and resumes.

  ``model`` is the virtual-resource model of the task mix on this machine (by default
  fitted now by :func:`mtfl_jax.calibration.calibrate_mix`; a resumed run uses the one its
  checkpoint holds). ``corrections`` (:class:`mtfl_jax.clock.MixCorrections`) replace the
  model's makespan by measured co-runs of the clients' workload mixes where they were
  measured (also kept in the checkpoint). ``callback(event, round)`` is called with
  "round_start", "task_done" and "round_end". ``faults`` is for testing only (see
  :func:`apply_round`).

  Example::

      res = run_federated(FedConfig(tasks=("digits_mlp",), rounds=5), workdir="runs/a")
      res = run_federated(FedConfig(tasks=("digits_mlp",), rounds=8), workdir="runs/a")  # 3 more
  """
  import orbax.checkpoint as ocp
  t_start = time.perf_counter()
  faults = check_faults(faults)
  main = jax.process_index() == 0  # in a multi-process run, process 0 prints and writes files
  log = print if progress and main else (lambda m: None)
  fed = fed or build_federation(cfg)
  state, history = init_server(cfg), []
  mgr = None
  if workdir is not None:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_file = workdir / "config.json"
    if cfg_file.exists():
      diff = config_differences(read_json(cfg_file, "the run's config", f"delete it to reuse {workdir} (its "
                                          "checkpoints are kept) or use another workdir", fields=("tasks",)),
                                cfg.to_json())
      if diff:
        raise ValueError(f"{workdir} holds a run with a different config ({diff}); use another workdir "
                         "(nothing there was changed)")
    if main:
      write_json(cfg_file, cfg.to_json())
    mgr = _manager(workdir)
    restored = restore_latest(mgr, state, workdir, log)
    if jax.process_count() > 1:  # every process must go on from the same round
      from mtfl_jax.distributed import DistributedError, broadcast_json
      mine = 0 if restored is None else len(restored.history)
      first = broadcast_json(mine)
      if mine != first:
        raise DistributedError(
            f"process {jax.process_index()} found round {mine} in {workdir / 'checkpoints'} but process 0 found "
            f"round {first}: in a multi-process run every process must see the same workdir (a shared "
            "directory across hosts)")
    if restored is not None:
      state, history = restored.state, restored.history
      model, corrections = _clock_inputs(restored.clock, model, corrections)
      log(f"mtfl_jax: resuming {workdir} after round {len(history)} of {cfg.rounds}")
  if jax.process_count() == 1:
    model = model or calibrate_mix(cfg.task_defs)
  else:  # one clock for all processes: process 0's (it alone calibrates; the others wait)
    from mtfl_jax.distributed import broadcast_json
    model = VRModel.from_json(broadcast_json((model or calibrate_mix(cfg.task_defs)).to_json() if main else None))
    corr = broadcast_json(None if corrections is None or not main else corrections.to_json())
    corrections = None if corr is None else MixCorrections.from_json(corr)
  missing = set(cfg.tasks) - set(model.solo_step_s)
  if missing:
    raise ValueError(f"the virtual-resource model knows no task {sorted(missing)}; calibrate it on {cfg.tasks}")
  clock = _clock_json(model, corrections)
  bar = None
  if progress and main:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.rounds, initial=int(state.round), desc=f"FL {cfg.policy}", leave=False)
  vt = history[-1]["virtual_time_s"] if history else 0.0
  try:
    for rnd in range(int(state.round), cfg.rounds):
      if callback:
        callback("round_start", rnd)
      left = None if cfg.time_budget_s is None else cfg.time_budget_s - vt
      state, diag = apply_round(fed, state, model, rnd, callback, corrections, left, faults)
      if diag is None:  # the next round would end past the time budget
        if history and "accuracy" not in history[-1]:
          history[-1]["accuracy"] = _evaluate_all(fed, state)
        break
      vt += diag["round_time_s"]
      diag["virtual_time_s"] = vt
      if (rnd + 1) % cfg.eval_every == 0 or rnd + 1 == cfg.rounds:
        diag["accuracy"] = _evaluate_all(fed, state)
      history.append(diag)
      if mgr is not None and main:
        mgr.save(rnd + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(jax.tree.map(np.asarray, state)),
                                                  history=ocp.args.JsonSave(history),
                                                  clock=ocp.args.JsonSave(clock)))
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
