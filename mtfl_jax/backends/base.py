"""What every execution backend shares: the unit of work (:class:`Job`), the result of a run
(:class:`RunResult`), data feeding, and the turning of shares into steps per slice."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from mtfl_jax.data import Dataset
from mtfl_jax.tasks import Task, get_task
from mtfl_jax.train import batch_indices, init_state

MAX_JOB_STEPS = 1_000_000


@dataclasses.dataclass(frozen=True)
class Job:
  """One task's work in a round on one device: ``steps`` local optimizer steps from a state
  seeded by ``seed`` (or given params), on batches drawn from ``indices`` of the task's
  training split (all of it when None) in an order seeded by ``seed``. ``task`` is a
  :class:`Task` (yours or a built-in) or a registered name; a model that does not fit its
  data fails here, before any worker starts.
  """
  task: Task
  steps: int
  seed: int = 0
  indices: Any = dataclasses.field(default=None, compare=False, hash=False)
  allow_synthetic: bool = True

  def __post_init__(self):
    object.__setattr__(self, "task", get_task(self.task).check())

    def bad(why):
      return ValueError(f"job for task '{self.task.name}': {why}")
    if isinstance(self.steps, bool) or not (isinstance(self.steps, (int, np.integer)) and self.steps >= 1):
      raise bad(f"steps must be a positive integer, got {self.steps!r}")
    if self.steps > MAX_JOB_STEPS:
      # the batch order of every step is drawn when a backend opens: bounded memory, bounded time
      raise bad(f"steps must be <= {MAX_JOB_STEPS} (one round's local steps), got {self.steps}; "
                "split the work into several rounds")
    if isinstance(self.seed, bool) or not (isinstance(self.seed, (int, np.integer)) and 0 <= self.seed < 2**32):
      raise bad(f"seed must be an integer between 0 and {2**32 - 1}, got {self.seed!r}")
    if self.indices is not None:
      idx = np.asarray(self.indices)
      ints = np.issubdtype(idx.dtype, np.integer)
      if idx.ndim != 1 or not len(idx) or not ints or idx.min() < 0:
        raise bad("indices must be a non-empty 1-D array of sample ids >= 0 into the training split (or None: all "
                  f"of it), got shape {idx.shape}, dtype {idx.dtype}"
                  + (f", smallest {int(idx.min())}" if ints and idx.size else ""))
      data = self.task.data
      if isinstance(data, Dataset) and idx.max() >= len(data.x_train):
        raise bad(f"indices go up to {int(idx.max())} but dataset {data.name!r} has {len(data.x_train)} "
                  "training samples")

  @property
  def name(self) -> str:
    return self.task.name


def check_seconds(name: str, value, backend: str) -> float:
  """A backend option in seconds: a finite number > 0, or a ``ValueError`` naming it."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
     or not (math.isfinite(value) and value > 0):
    raise ValueError(f"backend {backend!r}: {name} must be a finite number of seconds > 0, got {value!r}")
  return float(value)


def check_jobs(jobs: Sequence[Job]) -> list[Job]:
  """``jobs`` as a list, or a ``ValueError``: none, one that is not a :class:`Job`, or a task twice."""
  if isinstance(jobs, (Job, str)) or not hasattr(jobs, "__iter__"):
    got = f"one Job (of task '{jobs.name}')" if isinstance(jobs, Job) else repr(jobs)
    raise ValueError(f"jobs must be a list of Job values, e.g. [Job('digits_mlp', 50)], got {got}")
  jobs = list(jobs)
  if not jobs:
    raise ValueError("no jobs to run")
  odd = [j for j in jobs if not isinstance(j, Job)]
  if odd:
    raise ValueError(f"jobs must be Job values, e.g. Job('digits_mlp', 50), got {odd[0]!r}")
  names = [j.name for j in jobs]
  if len(set(names)) != len(names):
    raise ValueError(f"one job per task on a device; got {names}")
  return jobs


@dataclasses.dataclass
class RunResult:
  """Timings (seconds from the common start) and, if asked for, final params per task."""
  backend: str
  shares: dict[str, float]
  makespan_s: float
  finish_times_s: dict[str, float]
  step_times_s: dict[str, np.ndarray]  # completion time of each step (per slice for 'fused')
  setup_s: float  # compilation / start-up of this run, excluded from the makespan
  params: dict[str, Any] | None = None
  # when each task started (one after another: the previous task's finish); None: every task
  # started at the common start (co-run backends)
  start_times_s: dict[str, float] | None = None

  def start_s(self, task: str) -> float:
    """When ``task`` started, in seconds from the common start."""
    return float((self.start_times_s or {}).get(task, 0.0))


class Feed:
  """A job's batches: the same sequence whatever the backend or slicing."""

  def __init__(self, job: Job):
    ds = job.task.load_data(allow_synthetic=job.allow_synthetic)
    self.x, self.y, self.source = ds.x_train, ds.y_train, ds.source
    idx = np.arange(len(self.x)) if job.indices is None else np.asarray(job.indices)
    self.ids = batch_indices(idx, job.task.batch_size, int(job.steps), job.seed)

  def batch(self, j: int) -> dict:
    ids = self.ids[j]
    return {"image": self.x[ids], "label": self.y[ids]}

  def batches(self, start: int, stop: int) -> dict:
    ids = self.ids[start:stop]
    return {"image": self.x[ids], "label": self.y[ids]}


def initial_state(job: Job, params: Mapping[str, Any] | None):
  p = None if params is None else params.get(job.name)
  return init_state(job.task, job.seed, p)


def check_shares(jobs: Sequence[Job], shares: Mapping[str, float] | None) -> dict[str, float]:
  """Shares per task (fractions of the device; may sum past 1). None means equal shares."""
  names = [j.name for j in jobs]
  if shares is None:
    return {n: 1.0 for n in names}
  unknown = set(shares) - set(names)
  if unknown:
    raise ValueError(f"shares name task(s) {sorted(unknown)} with no job here; jobs: {names}")
  missing = [n for n in names if n not in shares]
  if missing:
    raise ValueError(f"no share given for task(s) {missing}")
  for n, v in shares.items():
    if isinstance(v, bool) or not (isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v) and v > 0):
      raise ValueError(f"share of task '{n}' must be a finite number > 0, got {v!r}")
  return {n: float(shares[n]) for n in names}


def slice_schedule(jobs: Sequence[Job], shares: Mapping[str, float],
                   step_times: Mapping[str, float], slice_s: float = 0.05) -> list[tuple[int, ...]]:
  """Turns shares of device time into steps per slice (time-slicing's knob).

  In a slice of ``slice_s`` seconds task i gets ``k_i = max(1, round(slice_s * share_i / s_i))``
  steps (its share of the slice's time over its solo step time). Returns one tuple of per-job
  step counts per slice; a task that is done gets 0.
  """
  if not slice_s > 0:
    raise ValueError(f"slice_s must be > 0, got {slice_s!r}")
  k = {j.name: max(1, round(slice_s * shares[j.name] / max(step_times[j.name], 1e-9))) for j in jobs}
  left = {j.name: int(j.steps) for j in jobs}
  out = []
  while any(left.values()):
    row = tuple(min(k[j.name], left[j.name]) for j in jobs)
    for j, s in zip(jobs, row):
      left[j.name] -= s
    out.append(row)
  return out


def fetch_params(states: Mapping[str, Any]) -> dict[str, Any]:
  return {n: jax.device_get(s.params) for n, s in states.items()}


class Clock:
  """Wall-clock stamps relative to one start (``time.perf_counter`` is CLOCK_MONOTONIC on
  Linux, so stamps of different processes compare)."""

  def __init__(self, start: float | None = None):
    self.start = time.perf_counter() if start is None else start

  def now(self) -> float:
    return time.perf_counter() - self.start


BACKENDS: dict[str, type["Runner"]] = {}


def register(cls):
  """Class decorator: makes a runner available by its ``name``."""
  BACKENDS[cls.name] = cls
  return cls


class Runner:
  """A backend opened on a fixed set of jobs: ``run(shares)`` executes one round of them.

  Opening compiles (or starts workers); every ``run`` starts each job from its initial state
  (seeded, or ``params``), so runs under different shares are directly comparable. Use as a
  context manager so that workers and threads are always released.
  """
  name = "base"

  def __init__(self, jobs: Sequence[Job]):
    self.jobs = check_jobs(jobs)
    self.solo_step_s: dict[str, float] = {}

  def prepare_in_process(self) -> None:
    """For backends that run in this process: the jobs' batch feeds, one jitted train step
    per task (compiled here), and each task's solo step time."""
    from mtfl_jax.train import make_train_step
    t0 = time.perf_counter()
    self.feeds = {j.name: Feed(j) for j in self.jobs}
    self.step = {j.name: jax.jit(make_train_step(j.task)) for j in self.jobs}
    self.solo_step_s = measure_solo(self.step, self.jobs, self.feeds)
    self.setup_s = time.perf_counter() - t0

  def run(self, shares: Mapping[str, float] | None = None, params: Mapping[str, Any] | None = None,
          return_params: bool = False) -> RunResult:
    raise NotImplementedError

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def sync_every(solo_step_s: float, period_s: float = 0.01) -> int:
  """Steps between two synchronisations: about every ``period_s`` of solo work. JAX dispatches
  asynchronously, so only a synchronised step has a true completion time; syncing every step
  would stall the pipeline of a tiny task."""
  return max(1, int(period_s / max(solo_step_s, 1e-9)))


def run_steps(step, state, feed: "Feed", start: int, stop: int, every: int, clock: "Clock", stamps):
  """Steps ``start..stop-1`` of a job, stamping (and syncing) every ``every`` steps and the last."""
  for i in range(start, stop):
    state, _ = step(state, feed.batch(i))
    if (i + 1) % every == 0 or i == stop - 1:
      jax.block_until_ready(state)
      stamps[i] = clock.now()
  return state


def time_solo(step, state, feed: "Feed", steps: int, min_s: float = 0.05) -> float:
  """Solo seconds per step, pipelined as in a run (one sync at the end), after one warm-up
  call; runs at least ``min_s`` seconds."""
  state, _ = step(state, feed.batch(0))
  jax.block_until_ready(state)
  n, total = 0, 0.0
  while total < min_s or n < 5:
    t0 = time.perf_counter()
    for i in range(max(5, n)):
      state, _ = step(state, feed.batch((n + i) % steps))
    jax.block_until_ready(state)
    total += time.perf_counter() - t0
    n += max(5, n)
  return total / n


def measure_solo(step, jobs: Sequence[Job], feeds: Mapping[str, Feed]) -> dict[str, float]:
  """Solo (pipelined) seconds per step of each job, one job at a time."""
  return {job.name: time_solo(step[job.name], init_state(job.task, job.seed), feeds[job.name], job.steps)
          for job in jobs}
