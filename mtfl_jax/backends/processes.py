"""``processes``: one worker process per task, each with its own JAX runtime.

Workers are fresh Python processes running this module's worker loop (never the parent's
``__main__``), and receive their :class:`Job` cloudpickled: a task whose model class is
defined in a script without a main guard, or in a notebook, runs here too.

Shares become the operating system's knobs:

* GPU: ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = 100 * share`` for each worker under a running
  CUDA MPS control daemon (the paper's mechanism). Shares summing to at most 1 partition the
  SMs; summing past 1 oversubscribe them (competitive). The percentage is fixed when a CUDA
  context starts, so new shares restart the workers (reported as set-up, not makespan).
* CPU: shares summing to at most 1 partition the cores (disjoint affinity; tasks that must
  share a core get CFS weights by share); summing past 1, every worker may use every core
  and its CFS weight (nice value; ~1.25x per step) follows its share. Linux keeps affinity
  and nice per thread, so both are applied to every thread of a worker.

``compute_threads=k`` caps each worker at ``k`` compute threads: the worker process starts on
``k`` cores, so XLA CPU sizes its thread pool to them, and is then given every core. The cap
stays, as the pool keeps its size; the ``XLA_FLAGS`` switch ``--xla_cpu_multi_thread_eigen=false``
instead leaves a convolution step on every core (the co-scheduling benchmark's
``probe_compute_threads`` measures both). With one compute thread per task and more tasks than
cores, a task alone cannot fill the device, as a GPU kernel too small for its SMs cannot: the
regime of the paper. ``solo_threads`` says what each worker used: per-thread CPU seconds while
its solo time was measured, and how many threads did real work (the dispatching Python thread
counts too).

:meth:`ProcessesRunner.run_sequential` runs the tasks one after another, each in its worker:
the sequential baseline under the same per-task limits.

Workers that crash or do not answer within ``timeout_s`` are reported by task name (with
the end of their stderr; an exception raised in a worker arrives with its traceback) and all
workers are reaped: no hang, no orphan process.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Mapping

import cloudpickle
import numpy as np

from mtfl_jax.backends.base import RunResult, Runner, check_seconds, check_shares, register, sync_every


class WorkerError(RuntimeError):
  """A worker process crashed, hung or raised; the message names its task."""


# --------------------------------------------------------------------------- worker side
# Workers run this, not multiprocessing's spawn main: spawn re-imports the parent's __main__
# (a user script without an `if __name__ == "__main__":` guard would start the whole script
# again in every worker), while `python -c` imports nothing of the user's. The job arrives
# cloudpickled, so a model class defined in a script or notebook travels by value.
# MTFL_WORKER_START_CORES pins the worker before anything starts a thread (compute_threads).
_START_CORES_ENV = "MTFL_WORKER_START_CORES"
_WORKER_CMD = (f"import os; c = os.environ.pop('{_START_CORES_ENV}', ''); "
               "c and os.sched_setaffinity(0, [int(x) for x in c.split(',')]); "
               "from mtfl_jax.backends.processes import _serve; _serve()")
# For tests of failure handling only: "crash" or "hang" makes the worker fail at its next run.


def _serve():
  """Entry point of a worker process: argv[1] is the file descriptor of its connection."""
  import sys
  _worker_main(mpc.Connection(int(sys.argv[1])))


def thread_cpu_s() -> dict[int, float]:
  """CPU seconds of every thread of this process so far (Linux per-thread CPU clocks; empty
  elsewhere)."""
  out = {}
  try:
    tids = os.listdir("/proc/self/task")
  except OSError:
    return out
  for t in tids:
    try:
      out[int(t)] = time.clock_gettime(((~int(t)) << 3) | 6)  # the thread's CPUCLOCK_SCHED clock id
    except (OSError, ValueError, OverflowError):
      continue
  return out


def busy_threads(before: Mapping[int, float], after: Mapping[int, float], wall_s: float) -> dict:
  """Per-thread CPU seconds between two :func:`thread_cpu_s` snapshots (busiest first) and how
  many threads did real work: at least a quarter of the busiest one's CPU time."""
  d = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
  top = d[0] if d else 0.0
  return {"busy_threads": sum(1 for x in d if top > 0 and x >= 0.25 * top) or None,
          "thread_cpu_s": [round(x, 4) for x in d[:4]], "cpu_s": round(sum(d), 4), "wall_s": round(wall_s, 4)}


def _worker_main(conn):
  """Receives its job, compiles, then serves 'solo', 'run' and 'stop' requests."""
  try:
    job = pickle.loads(conn.recv_bytes())  # cloudpickle's output loads with plain pickle
    import jax
    from mtfl_jax.backends.base import Clock, Feed, run_steps, time_solo
    from mtfl_jax.train import init_state, make_train_step

    t0 = time.perf_counter()
    feed = Feed(job)
    step = jax.jit(make_train_step(job.task))
    state, _ = step(init_state(job.task, job.seed), feed.batch(0))
    jax.block_until_ready(state)
    conn.send(("ready", time.perf_counter() - t0))
    while True:
      msg = conn.recv()
      if msg[0] == "stop":
        return
      if msg[0] == "solo":
        before, t0 = thread_cpu_s(), time.perf_counter()
        step_s = time_solo(step, state, feed, job.steps)
        conn.send(("solo", step_s, busy_threads(before, thread_cpu_s(), time.perf_counter() - t0)))
      elif msg[0] == "run":
        _, start_at, params, return_params, every = msg
        state = init_state(job.task, job.seed, params)  # params: this job's own (the parent picked them)
        jax.block_until_ready(state)
        while time.perf_counter() < start_at:
          pass
        stamps = np.full(job.steps, np.nan)
        state = run_steps(step, state, feed, 0, job.steps, every, Clock(start_at), stamps)
        conn.send(("done", stamps, jax.device_get(state.params) if return_params else None))
  except (EOFError, KeyboardInterrupt, BrokenPipeError):
    return
  except BaseException as e:  # noqa: BLE001 - reported to the parent with the task name
    try:
      conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
    except (BrokenPipeError, OSError):
      pass


class _Worker:
  """A worker process, its connection, an fd that becomes readable when it exits, and its
  stderr (kept in a file: its tail goes into the error when the worker dies)."""

  def __init__(self, job_bytes: bytes, env: dict):
    parent, child = mp.Pipe()
    self.stderr = tempfile.TemporaryFile()
    self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_CMD, str(child.fileno())], env=env,
                                 pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                                 stderr=self.stderr, close_fds=True)
    child.close()
    self.conn = parent
    try:
      self.exit_fd = os.pidfd_open(self.proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: poll instead
      self.exit_fd = None
    try:
      self.conn.send_bytes(job_bytes)
    except (BrokenPipeError, ConnectionResetError):
      pass  # it died at start: the runner reports that, with its stderr, when it waits for it

  @property
  def pid(self) -> int:
    return self.proc.pid

  def stderr_tail(self, chars: int = 2000) -> str:
    try:
      self.stderr.seek(0)
      text = self.stderr.read().decode(errors="replace").strip()
    except (OSError, ValueError):
      return ""
    return text[-chars:]

  def stop(self):
    try:
      self.conn.send(("stop",))
    except (BrokenPipeError, OSError):
      pass
    try:
      self.proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait(timeout=5)
    for close in (self.conn.close, self.stderr.close,
                  (lambda: os.close(self.exit_fd)) if self.exit_fd is not None else (lambda: None)):
      try:
        close()
      except OSError:
        pass


# --------------------------------------------------------------------------- placement
def cpu_placement(shares: Mapping[str, float], cores: list[int]) -> dict[str, tuple[list[int], int]]:
  """(cores, nice) per task for CPU shares: a partition when they sum to at most 1, else
  every core for everyone with CFS weights by share."""
  names = list(shares)
  total = sum(shares.values())
  top = max(shares.values())
  nice = lambda a, ref: int(min(19, max(0, round(math.log(ref / a) / math.log(1.25)))))
  if total > 1 + 1e-9 or len(names) == 1:
    return {n: (list(cores), nice(shares[n], top)) for n in names}
  out = {}
  if len(names) <= len(cores):
    # largest-remainder apportionment of cores, at least one each
    want = {n: shares[n] / total * len(cores) for n in names}
    got = {n: max(1, int(want[n])) for n in names}
    while sum(got.values()) > len(cores):
      got[max((n for n in names if got[n] > 1), key=lambda n: got[n] - want[n])] -= 1
    for n in sorted(names, key=lambda n: want[n] - got[n], reverse=True):
      if sum(got.values()) < len(cores):
        got[n] += 1
    i = 0
    for n in names:
      out[n] = (cores[i:i + got[n]], 0)
      i += got[n]
    return out
  # more tasks than cores: greedy bin packing, CFS weights among the tasks of one core
  load = {c: [] for c in cores}
  for n in sorted(names, key=lambda n: -shares[n]):
    c = min(cores, key=lambda c: sum(shares[m] for m in load[c]))
    load[c].append(n)
  for c, members in load.items():
    ref = max((shares[m] for m in members), default=1.0)
    for m in members:
      out[m] = ([c], nice(shares[m], ref))
  return out


def _threads_of(pid: int) -> list[int]:
  try:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
  except OSError:
    return [pid]


def apply_cpu_placement(pid: int, cores: list[int], nice: int) -> None:
  for tid in _threads_of(pid):
    try:
      os.sched_setaffinity(tid, cores)
      os.setpriority(os.PRIO_PROCESS, tid, nice)
    except ProcessLookupError:
      continue
    except PermissionError:
      raise PermissionError(
          "lowering a worker's nice value needs root or CAP_SYS_NICE; open a new "
          "'processes' runner for each allocation instead of re-running one") from None


def mps_daemon_running() -> bool:
  for comm in Path("/proc").glob("[0-9]*/comm"):
    try:
      if comm.read_text().strip() == "nvidia-cuda-mps-control":
        return True
    except OSError:
      continue
  return False


MPS_HELP = ("the 'processes' backend shares a GPU through CUDA MPS, but no MPS control daemon "
            "runs. Start one with `nvidia-cuda-mps-control -d` (stop it with "
            "`echo quit | nvidia-cuda-mps-control`), or pass use_mps=False (time-sliced "
            "contexts), or use the 'fused' or 'threads' backend.")


# --------------------------------------------------------------------------- runner
@register
class ProcessesRunner(Runner):
  name = "processes"

  def __init__(self, jobs, timeout_s: float = 600.0, start_timeout_s: float = 600.0,
               platform: str | None = None, use_mps: bool = True, compute_threads: int | None = None,
               worker_env: Mapping[str, str] | None = None):
    """``compute_threads``: CPU only, each worker's compute threads (None: XLA's default, one per
    core); ``worker_env``: extra environment of the workers (e.g. ``XLA_FLAGS``)."""
    timeout_s = check_seconds("timeout_s", timeout_s, self.name)
    start_timeout_s = check_seconds("start_timeout_s", start_timeout_s, self.name)
    super().__init__(jobs)
    import jax
    self.platform = platform or jax.default_backend()
    self.timeout_s = timeout_s  # a run or a solo measurement
    self.start_timeout_s = start_timeout_s  # spawning, importing JAX, compiling
    self.use_mps = use_mps and self.platform == "gpu"
    if self.use_mps and not mps_daemon_running():
      raise RuntimeError(MPS_HELP)
    self.cores = sorted(os.sched_getaffinity(0))
    if compute_threads is not None:
      if self.platform == "gpu":
        raise ValueError("compute_threads caps CPU compute threads; on a GPU, shares are MPS percentages")
      if not (isinstance(compute_threads, int) and 1 <= compute_threads <= len(self.cores)):
        raise ValueError(f"compute_threads must be an integer in 1..{len(self.cores)} (this process's "
                         f"cores), got {compute_threads!r}")
    self.compute_threads = compute_threads
    self.worker_env = dict(worker_env or {})
    self.job_bytes = {}
    for job in self.jobs:  # before any worker starts: a job that cannot travel fails here
      try:
        self.job_bytes[job.name] = cloudpickle.dumps(job)
      except Exception as e:  # noqa: BLE001 - re-raised with the task's name
        raise ValueError(f"task '{job.name}' cannot be sent to a worker process ({type(e).__name__}: "
                         f"{e}); make its model, data and functions picklable, or use the "
                         "'threads' or 'fused' backend") from e
    self.workers: dict[str, _Worker] = {}
    self.mps_shares: dict[str, float] | None = None
    self.setup_s = self._start({j.name: 1.0 for j in self.jobs})
    self._place({j.name: 1.0 for j in self.jobs})  # every core: a capped worker keeps its cap
    self.solo_step_s, self.solo_threads = {}, {}
    for job in self.jobs:  # one at a time: solo means alone on the device
      self._send(job.name, ("solo",))
      _, self.solo_step_s[job.name], self.solo_threads[job.name] = self._recv(job.name, "solo")

  # -- worker management
  def _start(self, shares: Mapping[str, float]) -> float:
    t0 = time.perf_counter()
    self.close()
    env = dict(os.environ)
    env.pop(_START_CORES_ENV, None)
    env["JAX_PLATFORMS"] = self.platform if self.platform != "gpu" else "cuda"
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    # the parent's import path, so mtfl_jax and modules the job refers to import the same
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    env.update(self.worker_env)
    try:
      for i, job in enumerate(self.jobs):
        if self.compute_threads:  # start on k cores (spread over the workers), widened in _place
          k = self.compute_threads
          env[_START_CORES_ENV] = ",".join(str(self.cores[(i * k + j) % len(self.cores)]) for j in range(k))
        if self.use_mps:
          env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, min(100, round(100 * shares[job.name]))))
        self.workers[job.name] = _Worker(self.job_bytes[job.name], env)
    except BaseException:
      self.close()  # no worker outlives a failed start
      raise
    deadline = time.perf_counter() + self.start_timeout_s
    for job in self.jobs:
      self._recv(job.name, "ready", deadline)
    self.mps_shares = dict(shares) if self.use_mps else None
    return time.perf_counter() - t0

  @property
  def procs(self) -> dict[str, subprocess.Popen]:
    return {n: w.proc for n, w in self.workers.items()}

  def _fail(self, name: str, why: str, stderr: bool = False):
    tail = self.workers[name].stderr_tail() if stderr and name in self.workers else ""
    self.close()
    raise WorkerError(f"worker for task '{name}' {why}; all workers were stopped"
                      + (f"\n--- the worker's stderr (end) ---\n{tail}" if tail else ""))

  def _send(self, name: str, msg) -> None:
    """Sends ``msg`` to a task's worker; a worker that is gone (killed, crashed) is reported
    as such, with its exit code and stderr, and every worker is stopped."""
    w = self.workers[name]
    try:
      w.conn.send(msg)
    except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
      try:
        w.proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        pass
      self._fail(name, f"died (exit code {w.proc.returncode})", stderr=True)

  def _recv(self, name: str, kind: str, deadline: float | None = None):
    deadline = deadline or time.perf_counter() + self.timeout_s
    w = self.workers[name]
    while True:
      left = deadline - time.perf_counter()
      if left <= 0:
        self._fail(name, f"did not answer '{kind}' in time (hung?)", stderr=True)
      waits = [w.conn] + ([w.exit_fd] if w.exit_fd is not None else [])
      ready = mpc.wait(waits, timeout=min(left, 1.0 if w.exit_fd is not None else 0.2))
      if w.conn in ready:
        try:
          msg = w.conn.recv()
        except (EOFError, ConnectionResetError):  # gone: its exit code is read below
          msg = None
          w.proc.wait(timeout=5)
        if msg is not None and msg[0] == "error":
          self._fail(name, f"raised {msg[1]}\n--- worker traceback ---\n{msg[2]}")
        if msg is not None:
          return msg
      if w.proc.poll() is not None:
        self._fail(name, f"died (exit code {w.proc.returncode})", stderr=True)

  def _place(self, shares: Mapping[str, float]) -> float:
    if self.platform == "gpu":
      if self.use_mps and shares != self.mps_shares:
        return self._start(shares)
      return 0.0
    for name, (cores, nice) in cpu_placement(shares, self.cores).items():
      apply_cpu_placement(self.procs[name].pid, cores, nice)
    return 0.0

  # -- the round
  def run(self, shares=None, params=None, return_params=False) -> RunResult:
    if not self.workers:
      raise RuntimeError("this runner is closed (a worker failed or close() was called); open a new one")
    shares = check_shares(self.jobs, shares)
    setup = self._place(shares)
    start_at = time.perf_counter() + 0.05 + 0.002 * len(self.jobs)
    for job in self.jobs:
      p = None if params is None else params.get(job.name)
      self._send(job.name, ("run", start_at, p, return_params, sync_every(self.solo_step_s[job.name])))
    deadline = time.perf_counter() + self.timeout_s
    stamps, out = {}, {}
    for job in self.jobs:
      _, stamps[job.name], out[job.name] = self._recv(job.name, "run", deadline)
    finish = {n: float(np.nanmax(t)) for n, t in stamps.items()}
    return RunResult(self.name, shares, max(finish.values()), finish, stamps, setup,
                     out if return_params else None)

  def run_sequential(self, params=None, return_params=False) -> RunResult:
    """The tasks one after another, each alone in its own worker with every core (a worker
    capped by ``compute_threads`` stays capped): the sequential baseline of this runner's
    regime. Times count from the first task's start; the gaps between tasks (messages) are
    left out, as they would not exist in one process."""
    if not self.workers:
      raise RuntimeError("this runner is closed (a worker failed or close() was called); open a new one")
    shares = check_shares(self.jobs, None)
    setup = self._place(shares)
    offset, stamps, out, finish, starts = 0.0, {}, {}, {}, {}
    for job in self.jobs:
      starts[job.name] = offset
      p = None if params is None else params.get(job.name)
      start_at = time.perf_counter() + 0.02
      self._send(job.name, ("run", start_at, p, return_params, sync_every(self.solo_step_s[job.name])))
      _, own, out[job.name] = self._recv(job.name, "run")
      stamps[job.name] = np.asarray(own, float) + offset
      finish[job.name] = offset = float(np.nanmax(stamps[job.name]))
    return RunResult(self.name, shares, offset, finish, stamps, setup, out if return_params else None, starts)

  def close(self):
    for w in self.workers.values():
      w.stop()
    self.workers.clear()
