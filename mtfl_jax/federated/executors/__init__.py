"""Client executors: how a task's clients are run (see :mod:`.base` for the interface).

``FedConfig.simulator`` names one: ``loop`` (:class:`LoopExecutor`, the reference), ``vmap``
(:class:`BatchedExecutor` on one device), ``sharded`` (:class:`BatchedExecutor` over
``FedConfig.devices`` devices, all processes included), ``auto`` (:class:`AutoExecutor`:
``loop`` or ``vmap``, whichever measures faster on the first round's clients), or one you
registered with :func:`register_executor`.
"""
from __future__ import annotations

import time

import jax

from mtfl_jax.federated.executors.base import (EXECUTORS, Aggregate, ClientExecutor, all_finite, check_weights,
                                               output_names, register_executor)
from mtfl_jax.federated.executors.batched import BatchedExecutor, client_mesh
from mtfl_jax.federated.executors.loop import LoopExecutor


class AutoExecutor(ClientExecutor):
  """``loop`` or ``vmap``, chosen by measurement on the first round's clients and kept.

  A probe on two clients and two steps first: where the batched program loses even there
  (convolutions on XLA CPU become slow grouped convolutions), the loop is chosen without
  compiling the large batched program. Otherwise both run the real clients, each compiled
  before it is timed. The choice is in ``choice`` (and the run's records)."""

  def __init__(self, fed_task, program, clients_hint=None, **options):
    self.candidates = {"loop": LoopExecutor(fed_task, program),
                       "vmap": BatchedExecutor(fed_task, program, client_mesh(1), inner="vmap",
                                               clients_hint=clients_hint)}
    self.choice: str | None = None

  @property
  def name(self) -> str:
    return f"auto ({self.choice or 'undecided'})"

  def _timed(self, kind, args) -> float:
    ex = self.candidates[kind]
    jax.block_until_ready(ex.run(*args).sums)  # compiles
    t0 = time.perf_counter()
    jax.block_until_ready(ex.run(*args).sums)
    return time.perf_counter() - t0

  def run(self, broadcast, works, weights, client_states=None) -> Aggregate:
    if self.choice is None and works:
      import dataclasses
      probe = [dataclasses.replace(w, steps=min(2, w.steps)) for w in works[:2]]
      pw = {k: v[:len(probe)] for k, v in weights.items()}
      pcs = None if client_states is None else list(client_states)[:len(probe)]
      if self._timed("vmap", (broadcast, probe, pw, pcs)) > self._timed("loop", (broadcast, probe, pw, pcs)):
        self.choice = "loop"
      else:
        args = (broadcast, works, weights, client_states)
        times = {k: self._timed(k, args) for k in ("loop", "vmap")}
        self.choice = min(times, key=times.get)
      for k in list(self.candidates):
        if k != self.choice:
          self.candidates.pop(k).close()
    return self.candidates[self.choice or "loop"].run(broadcast, works, weights, client_states)

  def close(self) -> None:
    for ex in self.candidates.values():
      ex.close()


def _vmap(fed_task, program, clients_hint=None, **options):
  return BatchedExecutor(fed_task, program, client_mesh(1), inner="vmap", clients_hint=clients_hint)


def _sharded(fed_task, program, devices=None, clients_hint=None, **options):
  return BatchedExecutor(fed_task, program, client_mesh(devices), clients_hint=clients_hint, **options)


register_executor("loop", LoopExecutor)
register_executor("vmap", _vmap)
register_executor("sharded", _sharded)
register_executor("auto", AutoExecutor)


def make_executor(name: str, fed_task, program, **options) -> ClientExecutor:
  """The executor registered as ``name`` for ``fed_task``'s clients running ``program``."""
  if name not in EXECUTORS:
    raise ValueError(f"unknown simulator {name!r}; valid: {', '.join(EXECUTORS)} (register_executor adds one)")
  ex = EXECUTORS[name](fed_task, program, **options)
  if not isinstance(ex, ClientExecutor):
    raise TypeError(f"executor {name!r} returned a {type(ex).__name__}, not a ClientExecutor")
  return ex


__all__ = ["Aggregate", "AutoExecutor", "BatchedExecutor", "ClientExecutor", "EXECUTORS", "LoopExecutor",
           "all_finite", "check_weights", "client_mesh", "make_executor", "output_names", "register_executor"]
