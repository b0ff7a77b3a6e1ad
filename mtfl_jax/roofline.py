"""How close a compiled program runs to this machine's limits: MFU and the roofline.

For a compiled program, XLA's cost analysis gives the FLOPs and the bytes it accesses per
call (:func:`~mtfl_jax.profiling.xla_costs`). With its measured wall time per call:

* achieved FLOP/s = FLOPs / seconds, and **MFU** = achieved / the measured matmul peak
  (:func:`~mtfl_jax.profiling.device_peak_flops`);
* **arithmetic intensity** = FLOPs / bytes. The roofline (Williams et al., 2009) caps a
  program of intensity ``I`` at ``min(peak, I * bandwidth)``; the *ridge* ``peak / bandwidth``
  separates memory-bound programs (left of it) from compute-bound ones. The bandwidth is
  measured here (:func:`measure_bandwidth`: an in-place add of arrays 8x the L3 of the
  machine this was written on, so main memory, not cache).

XLA's bytes count every operand and result of every fused op once, whether it then sits in
cache or not: the intensity is a lower bound of what the caches see, and a small program
whose intermediates stay in cache can run above its roofline bound. It is still the number
that says whether a program can reach a given MFU on this machine at all.

Example::

    compiled = jax.jit(step).lower(state, batch).compile()
    u = utilisation(compiled, seconds=median_time, calls=1)
    u.mfu, u.intensity, u.bound          # e.g. 0.08, 1.5, 'memory'
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from mtfl_jax.device import device_peak_flops
from mtfl_jax.profiling import xla_costs


@functools.lru_cache(maxsize=None)
def measure_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
  """Bytes/s of ``a += b`` over two float32 arrays of ``megabytes`` each (read two, write one:
  3x the array's bytes per call), the best of ``repeats``; cached per process. The sum is
  written in place (a donated buffer): a fresh output would time the kernel's page faults,
  not the memory (8x slower on the 2-core EPYC VM)."""
  n = megabytes * (1 << 20) // 4
  a = jnp.ones((n,), jnp.float32)
  b = jnp.full((n,), 2.0, jnp.float32)
  add = jax.jit(lambda x, y: x + y, donate_argnums=0)
  a = add(a, b).block_until_ready()  # compiles; the donated buffer now exists
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    a = add(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 3.0 * 4 * n / best


@dataclasses.dataclass(frozen=True)
class Roofline:
  """A machine's peak FLOP/s and memory bandwidth (bytes/s)."""
  peak_flops: float
  bandwidth: float

  @property
  def ridge(self) -> float:
    """FLOPs/byte at which a program stops being memory-bound."""
    return self.peak_flops / self.bandwidth

  def attainable(self, intensity: float) -> float:
    """The roofline's cap on FLOP/s for a program of ``intensity`` FLOPs/byte."""
    return min(self.peak_flops, intensity * self.bandwidth)

  def to_json(self) -> dict:
    return {"peak_flops": self.peak_flops, "bandwidth": self.bandwidth, "ridge": self.ridge}


def machine_roofline() -> Roofline:
  """This device's roofline: measured matmul peak and measured memory bandwidth (both cached)."""
  return Roofline(device_peak_flops(), measure_bandwidth())


@dataclasses.dataclass(frozen=True)
class Utilisation:
  """A program's measured use of the machine (per call: ``flops``, ``bytes``, ``seconds``)."""
  flops: float
  bytes: float
  seconds: float
  roofline: Roofline

  @property
  def achieved_flops(self) -> float:
    return self.flops / self.seconds

  @property
  def mfu(self) -> float:
    """Achieved FLOP/s over the measured matmul peak."""
    return self.achieved_flops / self.roofline.peak_flops

  @property
  def intensity(self) -> float:
    """FLOPs per byte XLA says the program accesses."""
    return self.flops / self.bytes if self.bytes else float("inf")

  @property
  def bound(self) -> str:
    """'memory' left of the ridge, else 'compute'."""
    return "memory" if self.intensity < self.roofline.ridge else "compute"

  @property
  def roofline_fraction(self) -> float:
    """Achieved FLOP/s over what the roofline allows at this intensity."""
    return self.achieved_flops / self.roofline.attainable(self.intensity)

  def to_json(self) -> dict:
    return {"flops": self.flops, "bytes": self.bytes, "seconds": self.seconds,
            "achieved_flops": self.achieved_flops, "mfu": self.mfu, "intensity": self.intensity,
            "bound": self.bound, "roofline_fraction": self.roofline_fraction}


def utilisation(compiled, seconds: float, calls: int = 1, roofline: Roofline | None = None,
                costs: dict | None = None) -> Utilisation:
  """The :class:`Utilisation` of ``calls`` calls of ``compiled`` (a ``jax.stages.Compiled``)
  that took ``seconds`` in all; ``costs`` (``{"flops", "bytes"}`` per call) stands in for
  XLA's cost analysis, e.g. the sum over several programs of one layout."""
  if seconds <= 0 or calls < 1:
    raise ValueError(f"need seconds > 0 and calls >= 1, got {seconds}, {calls}")
  c = costs if costs is not None else xla_costs(compiled)
  return Utilisation(flops=c["flops"] * calls, bytes=c["bytes"] * calls, seconds=seconds,
                     roofline=roofline or machine_roofline())
