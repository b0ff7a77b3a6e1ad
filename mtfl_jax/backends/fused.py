"""``fused``: one compiled XLA program per slice holding ``k_i`` local steps of every task.

On a GPU each task's whole part of a slice (all its ``k_i`` steps) is one call annotated for
its own XLA stream (:mod:`mtfl_jax.streams`), so XLA can run the tasks concurrently
(competitive sharing inside XLA). With streams the numbers equal the unannotated program's
to float rounding only (XLA fuses a non-inlined call differently). XLA CPU runs
one op at a time per program, so on a CPU this backend shows the cost of fusion, not a gain.

Shares become steps per slice (:func:`slice_schedule`): a task's steps are unrolled or
become a ``lax.scan`` by the rule of :func:`mtfl_jax.train.choose_local_mode` (without
measuring: a slice's programs compile ahead of time and must not time candidates). One
program is compiled ahead of time per distinct row of the schedule (at most a handful) and
cached.
"""
from __future__ import annotations

import functools
import time

import jax
import numpy as np

from mtfl_jax import streams
from mtfl_jax.backends.base import (Clock, RunResult, Runner, check_seconds, check_shares, fetch_params, initial_state,
                                    register, slice_schedule)
from mtfl_jax.train import choose_local_mode, make_train_step


def make_fused_slice(tasks, counts, use_streams: bool):
  """A pure ``(states, batches) -> states`` running ``counts[i]`` steps of ``tasks[i]``; with
  ``use_streams`` task i's steps form one call on GPU stream i+1. ``batches[i]`` is stacked ``[counts[i], ...]``."""
  steps = [make_train_step(t) for t in tasks]

  def run_task(task, step, k, state, b):
    if choose_local_mode(task, k, measure=False) == "scan":
      state, _ = jax.lax.scan(step, state, b)
      return state
    for s in range(k):
      state, _ = step(state, jax.tree.map(lambda a: a[s], b))
    return state

  def fused(states, batches):
    out = []
    for i, (task, step, k, state, b) in enumerate(zip(tasks, steps, counts, states, batches)):
      if k:
        part = functools.partial(run_task, task, step, k)
        state = streams.on_stream(part, i + 1 if use_streams else None)(state, b)
      out.append(state)
    return tuple(out)

  return fused


@register
class FusedRunner(Runner):
  name = "fused"

  def __init__(self, jobs, slice_s: float = 0.05, use_streams: bool | None = None):
    self.slice_s = check_seconds("slice_s", slice_s, self.name)
    super().__init__(jobs)
    self.use_streams = (jax.default_backend() == "gpu") if use_streams is None else use_streams
    self.prepare_in_process()  # the single steps serve only to time each task solo
    self.programs: dict[tuple, object] = {}  # schedule row -> compiled executable

  def _inputs(self, row, done):
    return tuple(self.feeds[j.name].batches(done[j.name], done[j.name] + k) if k else {}
                 for j, k in zip(self.jobs, row))

  def compile(self, schedule) -> float:
    """Compiles every program of ``schedule`` not compiled yet, ahead of timing (the timed
    run calls these executables, so nothing compiles inside the makespan); returns the
    seconds spent."""
    t0 = time.perf_counter()
    states = tuple(initial_state(j, None) for j in self.jobs)
    done = {j.name: 0 for j in self.jobs}
    tasks = [j.task for j in self.jobs]
    for row in dict.fromkeys(schedule):
      if row not in self.programs:
        fn = jax.jit(make_fused_slice(tasks, row, self.use_streams))
        self.programs[row] = fn.lower(states, self._inputs(row, done)).compile()
    return time.perf_counter() - t0

  def run(self, shares=None, params=None, return_params=False) -> RunResult:
    shares = check_shares(self.jobs, shares)
    schedule = slice_schedule(self.jobs, shares, self.solo_step_s, self.slice_s)
    setup = self.compile(schedule)
    states = tuple(initial_state(j, params) for j in self.jobs)
    jax.block_until_ready(states)
    stamps = {j.name: np.full(j.steps, np.nan) for j in self.jobs}
    done = {j.name: 0 for j in self.jobs}
    clock = Clock()
    for row in schedule:
      states = self.programs[row](states, self._inputs(row, done))
      jax.block_until_ready(states)
      now = clock.now()
      for j, k in zip(self.jobs, row):
        if k:
          done[j.name] += k
          stamps[j.name][done[j.name] - 1] = now
    finish = {n: float(np.nanmax(t)) for n, t in stamps.items()}
    final = {j.name: s for j, s in zip(self.jobs, states)}
    return RunResult(self.name, shares, max(finish.values()), finish, stamps, setup,
                     fetch_params(final) if return_params else None)
