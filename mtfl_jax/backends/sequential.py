"""``sequential``: one jitted step per Python call, one task after another (the baseline,
and what per-client loops in FL simulators do). Shares are ignored: each task has the whole
device while it runs."""
from __future__ import annotations

import jax
import numpy as np

from mtfl_jax.backends.base import (Clock, RunResult, Runner, check_shares, fetch_params, initial_state,
                                    register, run_steps, sync_every)


@register
class SequentialRunner(Runner):
  name = "sequential"

  def __init__(self, jobs):
    super().__init__(jobs)
    self.prepare_in_process()

  def run(self, shares=None, params=None, return_params=False) -> RunResult:
    shares = check_shares(self.jobs, shares)
    states = {j.name: initial_state(j, params) for j in self.jobs}
    jax.block_until_ready(states)
    stamps, starts = {}, {}
    clock = Clock()
    for job in self.jobs:
      starts[job.name] = clock.now()
      t = np.full(job.steps, np.nan)
      states[job.name] = run_steps(self.step[job.name], states[job.name], self.feeds[job.name], 0,
                                   job.steps, sync_every(self.solo_step_s[job.name]), clock, t)
      stamps[job.name] = t
    finish = {n: float(np.nanmax(t)) for n, t in stamps.items()}
    return RunResult(self.name, shares, max(finish.values()), finish, stamps, 0.0,
                     fetch_params(states) if return_params else None, starts)
