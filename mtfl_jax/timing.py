"""Timing a call on the device: run it once to compile, then time it.

JAX dispatches asynchronously, so a call is timed until its result is ready
(``jax.block_until_ready``); the first call compiles and is left out.

Example::

    f = jax.jit(lambda x: x @ x)
    best = min(time_calls(lambda: f(a), repeats=5))
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax


def time_calls(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> list[float]:
  """Seconds of each of ``repeats`` calls of ``fn()`` (until its result is ready), after
  ``warmup`` untimed calls (the first compiles)."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
  for _ in range(warmup):
    jax.block_until_ready(fn())
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out
