"""``threads``: one host thread per task dispatching its own jitted steps; XLA releases the
GIL while a step runs, so the tasks' steps compete for the device (competitive sharing by
asynchronous dispatch).

Shares become steps per slice (:func:`slice_schedule`): in each slice every unfinished task
runs its ``k_i`` steps in its own thread, and the slice ends when all have.
"""
from __future__ import annotations

import concurrent.futures as cf

import jax
import numpy as np

from mtfl_jax.backends.base import (Clock, RunResult, Runner, check_seconds, check_shares, fetch_params, initial_state,
                                    register, run_steps, slice_schedule, sync_every)


@register
class ThreadsRunner(Runner):
  name = "threads"

  def __init__(self, jobs, slice_s: float = 0.05):
    self.slice_s = check_seconds("slice_s", slice_s, self.name)
    super().__init__(jobs)
    self.prepare_in_process()
    self.pool = cf.ThreadPoolExecutor(len(self.jobs), thread_name_prefix="mtfl-task")

  def _run_part(self, job, state, start, count, clock, stamps):
    return run_steps(self.step[job.name], state, self.feeds[job.name], start, start + count,
                     sync_every(self.solo_step_s[job.name]), clock, stamps)

  def run(self, shares=None, params=None, return_params=False) -> RunResult:
    shares = check_shares(self.jobs, shares)
    schedule = slice_schedule(self.jobs, shares, self.solo_step_s, self.slice_s)
    states = {j.name: initial_state(j, params) for j in self.jobs}
    jax.block_until_ready(states)
    stamps = {j.name: np.full(j.steps, np.nan) for j in self.jobs}
    done = {j.name: 0 for j in self.jobs}
    clock = Clock()
    for row in schedule:
      futures = {}
      for job, k in zip(self.jobs, row):
        if k:
          futures[job.name] = self.pool.submit(self._run_part, job, states[job.name], done[job.name],
                                               k, clock, stamps[job.name])
          done[job.name] += k
      for name, fut in futures.items():
        states[name] = fut.result()
    finish = {n: float(np.nanmax(t)) for n, t in stamps.items()}
    return RunResult(self.name, shares, max(finish.values()), finish, stamps, 0.0,
                     fetch_params(states) if return_params else None)

  def close(self):
    self.pool.shutdown(wait=True)
