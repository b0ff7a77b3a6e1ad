"""This machine's identity and peak: what every recording and store is labelled with.

Example::

    device_name()        # 'cpu: AMD EPYC 7B13 (2 cores)'
    device_slug()        # 'cpu_amd_epyc_7b13_2_cores': file and folder names
    device_peak_flops()  # measured fp32 matmul FLOP/s (the MFU denominator)
"""
from __future__ import annotations

import functools
import os
import platform
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from mtfl_jax.timing import time_calls


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
  """This machine's CPU model, e.g. 'AMD EPYC 7B13' (from /proc/cpuinfo where there is one)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "cpu"


def device_name() -> str:
  """A readable name of the default device, e.g. 'cpu: AMD EPYC 7B13 (2 cores)'."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"cpu: {cpu_model()} ({len(os.sched_getaffinity(0))} cores)"
  return f"{dev.platform}: {getattr(dev, 'device_kind', str(dev))}"


def device_slug(name: str | None = None) -> str:
  return re.sub(r"[^a-z0-9]+", "_", (name or device_name()).lower()).strip("_")


@functools.lru_cache(maxsize=None)
def device_peak_flops(n: int | None = None, repeats: int = 5) -> float:
  """Measured fp32 FLOP/s of one large square matmul on the default device (cached)."""
  n = n or (2048 if jax.default_backend() == "cpu" else 8192)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2.0 * n ** 3 / min(time_calls(lambda: f(a), repeats=repeats))
