"""Callbacks of the run loop (as pfl-research's): each does one job, can be tested alone and
replaced. A callback receives the :class:`~mtfl_jax.federated.run.Run` (config, federation,
clock, server state, history) at the run's start and end, before each round (with its plan)
and after it (with its history row; returning True stops the run).

The built-ins: :class:`Checkpoint` (orbax; resume, unreadable checkpoints set aside),
:class:`Evaluate` (test metrics every ``eval_every`` rounds, or on a grid of virtual time),
:class:`Progress` (a progress bar), :class:`MetricsWriter` (CSV, TensorBoard, Weights &
Biases) and :class:`Outputs` (``history.json`` and figures at the end).

Example (a callback of your own: stop once digits reaches 95%)::

    class StopAt(Callback):
      def after_round(self, run, row):
        return row.get("accuracy", {}).get("digits_mlp", 0) >= 0.95

    run_federated(cfg, callbacks=[StopAt()])
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtfl_jax.files import read_json, write_json
from mtfl_jax.train import evaluate


class Callback:
  """Hooks of the run loop; every one is optional."""

  def on_run_start(self, run) -> None:
    pass

  def before_round(self, run, rnd: int, round_time_s: float) -> None:
    """Before round (or asynchronous server step) ``rnd`` runs; it will last ``round_time_s``."""

  def after_round(self, run, row: dict) -> bool | None:
    """After a round, with its history row; True stops the run."""

  def on_run_end(self, run) -> None:
    pass


# --------------------------------------------------------------------------- evaluation
def evaluate_tasks(run, state) -> dict:
  """Every task's test metric (mIoU for segmentation, else accuracy) of ``state``."""
  out = {}
  for rt in run.runtimes:
    ds, glob = rt.fed_task.data, state.models[rt.name]
    m = evaluate(rt.fed_task.task, glob.params, ds.x_test, ds.y_test, model_state=glob.model_state)
    out[rt.name] = round(m["miou"] if "miou" in m else m["accuracy"], 6)
  return out


# Evaluations on the virtual-time grid (``eval_every_s``) a run may hold.
MAX_GRID_EVALUATIONS = 100_000


class Evaluate(Callback):
  """Test metrics of the global models: in the history row every ``every`` rounds (and after
  the last), and with ``every_s``, on a grid of virtual time: at each ``g = every_s, 2
  every_s, ...`` the model that holds at ``g`` (the one after the last round that ended at or
  before ``g``) is evaluated, into ``run.evaluations``; the grid is the same whatever the
  policy, so curves and times to accuracy compare."""

  def __init__(self, every: int = 1, every_s: float | None = None):
    self.every, self.every_s = every, every_s

  def check_grid(self, run, end_s: float) -> None:
    """Refuses a grid that would hold more than ``MAX_GRID_EVALUATIONS`` evaluations by virtual
    second ``end_s`` (checked before each round trains, and before the run starts)."""
    if not self.every_s:
      return
    n = math.floor(end_s / self.every_s + 1e-9)
    if n > MAX_GRID_EVALUATIONS:
      raise ValueError(f"bad federated config: eval_every_s={self.every_s!r} would put {n:,} evaluations on the "
                       f"grid by virtual second {end_s:.6g}, where round {len(run.history)} ends (at most "
                       f"{MAX_GRID_EVALUATIONS:,}); give eval_every_s >= {end_s / MAX_GRID_EVALUATIONS:.3g}, or "
                       "eval_every (rounds) instead")

  def _grid_until(self, run, end_s: float, inclusive: bool):
    if not self.every_s:
      return
    self.check_grid(run, end_s)
    done = len(run.evaluations)
    metrics = None  # every grid point up to end_s holds the same model: evaluated once
    while True:
      g = (done + 1) * self.every_s
      if g > end_s + 1e-9 or (not inclusive and g >= end_s - 1e-12):
        return
      metrics = evaluate_tasks(run, run.state) if metrics is None else metrics
      run.evaluations.append({"virtual_time_s": round(g, 9), "rounds": len(run.history), "metrics": dict(metrics)})
      done += 1

  def before_round(self, run, rnd, round_time_s):
    self._grid_until(run, run.virtual_time_s + round_time_s, inclusive=False)

  def after_round(self, run, row):
    last = run.cfg.rounds == row["round"] + 1
    if self.every and ((row["round"] + 1) % self.every == 0 or last):
      row["accuracy"] = evaluate_tasks(run, run.state)

  def on_run_end(self, run):
    if run.history and "accuracy" not in run.history[-1] and run.stopped_by_budget:
      run.history[-1]["accuracy"] = evaluate_tasks(run, run.state)
    end = run.cfg.time_budget_s if run.cfg.time_budget_s is not None else run.virtual_time_s
    self._grid_until(run, end, inclusive=True)


# --------------------------------------------------------------------------- progress
class Progress(Callback):
  """A tqdm progress bar of the rounds (process 0 only)."""

  def on_run_start(self, run):
    from tqdm.auto import tqdm
    self.bar = tqdm(total=run.cfg.rounds, initial=len(run.history), desc=f"FL {run.cfg.policy}", leave=False)

  def after_round(self, run, row):
    self.bar.update(1)
    self.bar.set_postfix(t=f"{run.virtual_time_s:.1f}",
                         **{t[:10]: f"{a:.3f}" for t, a in row.get("accuracy", {}).items()})

  def on_run_end(self, run):
    self.bar.close()


# --------------------------------------------------------------------------- metrics writers
def row_scalars(row: dict) -> dict[str, float]:
  """A history row's numbers, flattened (``accuracy/digits_mlp``, ``work_by_task_s/...``)."""
  out = {}
  for k, v in row.items():
    if isinstance(v, bool) or v is None:
      continue
    if isinstance(v, (int, float)):
      out[k] = float(v)
    elif isinstance(v, dict) and k in ("accuracy", "work_by_task_s"):
      out.update({f"{k}/{t}": float(x) for t, x in v.items() if isinstance(x, (int, float))})
  out["clients_aggregated"] = float(len(row.get("idle_s", {})))
  out["clients_dropped"] = float(len(row.get("failures", [])))
  return out


class MetricsWriter(Callback):
  """Streams each round's numbers (:func:`row_scalars`) to ``log_dir``: ``metrics.csv`` always,
  TensorBoard event files when ``tensorboardX`` is installed (``tensorboard=True``), and a
  Weights & Biases run when ``wandb`` is installed and ``wandb_project`` is given. The step is
  the round; ``virtual_time_s`` is one of the columns."""

  def __init__(self, log_dir, tensorboard: bool = True, wandb_project: str | None = None):
    self.dir = Path(log_dir)
    self.tensorboard, self.wandb_project = tensorboard, wandb_project
    self._csv = self._tb = self._wandb = None
    self._fields: list | None = None

  def on_run_start(self, run):
    if jax.process_index() != 0:
      return
    from mtfl_jax.files import check_writable
    check_writable(self.dir, "MetricsWriter log_dir", directory=True)  # before the run writes its own files
    if self.tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        run.log("mtfl_jax: tensorboardX is not installed; metrics go to metrics.csv only (pip install tensorboardX)")
      else:
        self._tb = SummaryWriter(str(self.dir))
    if self.wandb_project:
      try:
        import wandb
      except ImportError:
        run.log("mtfl_jax: wandb is not installed; no Weights & Biases run (pip install wandb)")
      else:
        self._wandb = wandb.init(project=self.wandb_project, config=run.cfg.to_json(), dir=str(self.dir))

  def after_round(self, run, row):
    if jax.process_index() != 0:
      return
    vals = {"virtual_time_s": float(row.get("virtual_time_s", run.virtual_time_s)), **row_scalars(row)}
    path = self.dir / "metrics.csv"
    if self._fields is None:
      self._fields = list(vals)
      if path.exists():  # a resumed run appends under the header it wrote
        with open(path) as f:
          self._fields = next(csv.reader(f), self._fields)
      else:
        with open(path, "w", newline="") as f:
          csv.writer(f).writerow(self._fields)
    for k in vals:
      if k not in self._fields:
        self._fields.append(k)  # a new metric (a first evaluation) gets a column at the end
        self._rewrite_header(path)
    with open(path, "a", newline="") as f:
      csv.writer(f).writerow([vals.get(k, "") for k in self._fields])
    if self._tb is not None:
      for k, v in vals.items():
        self._tb.add_scalar(k, v, row["round"])
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(vals, step=row["round"])

  def _rewrite_header(self, path: Path):
    rows = list(csv.reader(open(path)))
    rows[0] = self._fields
    with open(path, "w", newline="") as f:
      csv.writer(f).writerows(rows)

  def on_run_end(self, run):
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


# --------------------------------------------------------------------------- checkpoints
class CheckpointError(RuntimeError):
  """No checkpoint of a workdir can be read."""


@contextlib.contextmanager
def _interrupts_after():
  """Ctrl-C and SIGTERM wait until the block ends, then act as they would have. A checkpoint save
  takes milliseconds; interrupted inside orbax's event loop or its metadata thread, it leaves a
  traceback at shutdown instead of the one ``interrupted:`` line."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  got, previous = [], {}

  def hold(signum, frame):
    got.append(signum)

  for sig in (signal.SIGINT, signal.SIGTERM):
    previous[sig] = signal.signal(sig, hold)
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    for sig in dict.fromkeys(got):
      handler = previous[sig]
      if callable(handler):
        handler(sig, None)  # raises KeyboardInterrupt (the CLI's handler, or Python's Ctrl-C one)
      elif handler in (signal.SIG_DFL, None):
        os.kill(os.getpid(), sig)


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


# Settings a rerun may change and still resume: more rounds, and where clients run (devices
# change only the float rounding of the aggregate), how often it evaluates and the budget.
RESUMABLE_CHANGES = ("rounds", "devices")


def config_differences(saved: dict, given: dict) -> str:
  """The settings in which ``given`` differs from a workdir's ``saved`` config (JSON dicts),
  as ``"name: saved -> given, ..."``; empty when a rerun with ``given`` resumes that run."""
  keys = sorted((set(saved) | set(given)) - set(RESUMABLE_CHANGES))
  return ", ".join(f"{k}: {saved.get(k)!r} -> {given.get(k)!r}" for k in keys if saved.get(k) != given.get(k))


def _shapes(tree) -> dict:
  return {jax.tree_util.keystr(p): tuple(np.shape(a)) for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _meta_shapes(meta) -> dict:
  """Shapes of a checkpoint's array metadata tree (orbax ``ArrayMetadata`` leaves)."""
  leaves = jax.tree_util.tree_flatten_with_path(meta, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(p): tuple(a.shape) for p, a in leaves if hasattr(a, "shape")}


class Checkpoint(Callback):
  """Keeps a run resumable in ``workdir``: ``config.json`` (the settings), ``clock.json`` (the
  clock's measured inputs), and after every round an orbax checkpoint of the server state,
  the history, the evaluations and the clients' states (the last ``keep``).

  :meth:`open` (called by the run before anything is trained or written) refuses a workdir
  that holds another run (naming the settings that differ), fewer rounds than it has done, or
  a checkpoint of another model for a task (a changed model under the same name), and
  restores the newest readable checkpoint; unreadable newer ones (a crash mid-write, a full
  disk) are moved aside to ``WORKDIR/checkpoints.unreadable/`` once an older one was read. In a
  multi-process run every process reads and process 0 alone writes."""

  def __init__(self, workdir, keep: int = 2):
    self.workdir = Path(workdir)
    self.keep = keep
    self.mgr = None

  # -- before anything runs
  def open(self, cfg, template, log=print) -> dict | None:
    """Checks the workdir against ``cfg`` and returns the newest checkpoint's contents
    (``{"state", "history", "evaluations", "client_states", "clock"}``) or None."""
    cfg_file = self.workdir / "config.json"
    saved = None
    if cfg_file.exists():
      saved = read_json(cfg_file, "the run's config", f"delete it to reuse {self.workdir} (its checkpoints are kept) "
                        "or use another workdir", fields=("tasks",))
      diff = config_differences(saved, cfg.to_json())
      if diff:
        raise ValueError(f"{self.workdir} holds a run with a different config ({diff}); use another workdir "
                         "(nothing there was changed)")
    ckpt = self.workdir / "checkpoints"
    if not ckpt.is_dir() or not any(ckpt.iterdir()):
      return None
    self.mgr = self._manager(create=False)
    restored = self._restore_latest(template, log)
    if restored is None:
      return None
    done = len(restored["history"])
    if done > cfg.rounds:
      raise ValueError(f"{self.workdir} holds a run of {done} finished round(s) but rounds={cfg.rounds} (--rounds "
                       f"{cfg.rounds}); give rounds >= {done} to resume it, or use another workdir (nothing there was "
                       "changed)")
    return restored

  def _manager(self, create: bool):
    import orbax.checkpoint as ocp
    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    opts = ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=False, create=False,
                                        multiprocessing_options=mp, read_only=me != 0)
    root = (self.workdir / "checkpoints").resolve()
    if me == 0 and create:
      root.mkdir(parents=True, exist_ok=True)
    return ocp.CheckpointManager(root, options=opts)

  def _restore_latest(self, template, log) -> dict | None:
    import orbax.checkpoint as ocp
    mgr, skipped = self.mgr, []
    host = jax.tree.map(np.asarray, template)
    for step in sorted(mgr.all_steps(), reverse=True):
      try:  # the saved arrays' shapes (the manager's own item_metadata has no handler to read them)
        reader = ocp.StandardCheckpointHandler()
        try:
          meta = reader.metadata(Path(mgr.directory, str(step), "state"))
        finally:
          reader.close()
        saved_state = getattr(meta, "tree", meta)
      except Exception:  # noqa: BLE001 - unreadable metadata: the restore below says why
        saved_state = None
      if saved_state is not None:
        self._check_models(saved_state, host)
      try:
        with _filtered_stderr():
          extra = mgr.restore(step, args=ocp.args.Composite(history=ocp.args.JsonRestore(),
                                                            run=ocp.args.JsonRestore()))
          cs_template = _client_state_template(extra["run"], template)
          v_template = _versions_template(extra["run"], template)
          items = {"state": ocp.args.StandardRestore(host)}
          if cs_template:
            items["client_states"] = ocp.args.StandardRestore(cs_template)
          if v_template:
            items["versions"] = ocp.args.StandardRestore(v_template)
          restored = mgr.restore(step, args=ocp.args.Composite(**items))
        history = list(extra["history"])
        if len(history) != step:
          raise ValueError(f"its history has {len(history)} rounds, expected {step}")
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the one before
        skipped.append((step, " ".join(f"{type(e).__name__}: {e}".split())[:300]))
        continue
      for bad, why in skipped if jax.process_index() == 0 else ():
        aside = self.workdir / "checkpoints.unreadable" / f"{bad}_{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        Path(mgr.directory, str(bad)).rename(aside)
        log(f"mtfl_jax: skipped the checkpoint of round {bad}, which cannot be read ({why}); moved it to {aside}")
      if skipped:
        mgr.reload()
        log(f"mtfl_jax: resuming from the checkpoint of round {step} in {mgr.directory}")
      run_doc = dict(extra["run"])
      client_states = {}
      for t, per in (restored.get("client_states") or {}).items():
        client_states[t] = {int(c): jax.tree.map(np.asarray, s) for c, s in per.items()}
      versions = {t: {int(v): jax.tree.map(jnp.asarray, m) for v, m in per.items()}
                  for t, per in (restored.get("versions") or {}).items()}
      return {"state": jax.tree.map(jnp.asarray, restored["state"]), "history": history,
              "evaluations": list(run_doc.get("evaluations", [])), "client_states": client_states,
              "async": run_doc.get("async"), "versions": versions}
    if skipped:
      raise CheckpointError(
          f"none of the checkpoints in {mgr.directory} can be read ("
          + "; ".join(f"round {st}: {why}" for st, why in skipped)
          + f"). Move that directory away (or delete it) to start {self.workdir} over from round 0, or use another "
          "workdir")
    return None

  def _check_models(self, saved_meta, host_template) -> None:
    """A changed model under a task's name: its checkpointed parameters have other shapes."""
    for t, model in getattr(host_template, "models", {}).items():
      try:
        saved = saved_meta["models"][t]["params"]
      except (KeyError, TypeError):
        continue
      want, got = _shapes(model.params), _meta_shapes(saved)
      if set(want) != set(got) or any(tuple(want[k]) != tuple(got[k]) for k in want):
        diff = next((f"{k}: {got.get(k)} in the checkpoint, {want.get(k)} now" for k in sorted(set(want) | set(got))
                     if tuple(want.get(k) or ()) != tuple(got.get(k) or ())), "")
        raise ValueError(f"{self.workdir} holds checkpoints of another model for task '{t}' ({diff}): the task's "
                         "model changed under the same name; use another workdir (nothing there was changed)")

  # -- the run
  def on_run_start(self, run):
    if jax.process_index() == 0:
      if not (self.workdir / "clock.json").exists():  # a resumed run keeps the clock it started with
        write_json(self.workdir / "clock.json", run.clock.inputs_json())
      write_json(self.workdir / "config.json", run.cfg.to_json())
    if self.mgr is None:
      self.mgr = self._manager(create=True)

  def after_round(self, run, row):
    if jax.process_index() != 0:
      return
    import orbax.checkpoint as ocp
    items = {"state": ocp.args.StandardSave(jax.tree.map(np.asarray, run.state)),
             "history": ocp.args.JsonSave(run.history),
             "run": ocp.args.JsonSave({"evaluations": run.evaluations, "async": run.async_state(),
                                       "client_states": {rt.name: sorted(int(c) for c in rt.client_states)
                                                         for rt in run.runtimes if rt.client_states},
                                       "versions": {t: sorted(vs) for t, vs in run.old_versions().items() if vs}})}
    cs = {rt.name: {str(c): s for c, s in rt.client_states.items()} for rt in run.runtimes if rt.client_states}
    if cs:
      items["client_states"] = ocp.args.StandardSave(cs)
    old = {t: {str(v): jax.tree.map(np.asarray, m) for v, m in vs.items()} for t, vs in run.old_versions().items()
           if vs}
    if old:
      items["versions"] = ocp.args.StandardSave(old)
    try:
      with _interrupts_after():  # a save finishes first: the round it holds is kept
        self.mgr.save(len(run.history), args=ocp.args.Composite(**items))
        self.mgr.wait_until_finished()
    except BaseException:  # a full disk (or an interrupt raised after the save): an unfinished save's
      import shutil  # temporary folder goes
      for tmp in Path(self.mgr.directory).glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)
      raise

  def on_run_end(self, run):
    if self.mgr is not None:
      self.mgr.close()


def _client_state_template(run_doc, template) -> dict:
  """The restore template of the clients' states named in a checkpoint's run record: each
  client's state has its task's params' shapes (SCAFFOLD's control variates)."""
  out = {}
  for t, clients in (run_doc.get("client_states") or {}).items():
    params = jax.tree.map(np.asarray, template.models[t].params)
    out[t] = {str(c): params for c in clients}
  return out


def _versions_template(run_doc, template) -> dict:
  """The restore template of the old task versions (fedbuff) named in a checkpoint's run record."""
  return {t: {str(v): jax.tree.map(np.asarray, template.models[t]) for v in vs}
          for t, vs in (run_doc.get("versions") or {}).items()}


# --------------------------------------------------------------------------- outputs
class Outputs(Callback):
  """Writes ``history.json``, ``accuracy.png`` and ``idle.png`` into ``workdir`` at the end
  (process 0; :func:`mtfl_jax.federated.outputs.write_outputs`)."""

  def __init__(self, workdir):
    self.workdir = Path(workdir)
    self.paths: dict = {}

  def on_run_end(self, run):
    if jax.process_index() == 0:
      from mtfl_jax.federated.outputs import write_outputs
      self.paths = write_outputs(run.result(), self.workdir)


def jsonable(x: Any):
  return json.loads(json.dumps(x, default=float))


__all__ = ["Callback", "Checkpoint", "CheckpointError", "Evaluate", "MetricsWriter", "Outputs", "Progress",
           "config_differences", "evaluate_tasks", "row_scalars"]
