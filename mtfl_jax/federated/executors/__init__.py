"""Client executors: how a task's clients are run (see :mod:`.base` for the interface).

``FedConfig.simulator`` names one: ``loop`` (:class:`LoopExecutor`, the reference), ``vmap``
(:class:`BatchedExecutor` on one device), ``sharded`` (:class:`BatchedExecutor` over
``FedConfig.devices`` devices, all processes included, in the batched layout measured fastest),
``auto`` (:class:`AutoExecutor`: the
fastest of the per-client loop and the batched layouts, measured once per machine and task
and kept in the calibration store), or one you registered with :func:`register_executor`.
"""
from __future__ import annotations

import time

import jax

from mtfl_jax.train import has_convolution

from mtfl_jax.federated.executors.base import (EXECUTORS, Aggregate, ClientExecutor, all_finite, check_weights,
                                               output_names, register_executor)
from mtfl_jax.federated.executors.batched import BatchedExecutor, client_mesh
from mtfl_jax.federated.executors.loop import LoopExecutor


def layout_candidates(task, platform: str, clients: int) -> list[tuple[str, int | None]]:
  """The layouts ``auto`` measures for a task: ``("loop", None)`` is the per-client loop
  executor; the others are :class:`BatchedExecutor` ``(inner, clients per chunk)``. On a CPU a
  task with convolutions tries patched convolutions (which batch) beside unbatched ones; a
  dense task tries vmap and lax.map chunks; accelerators batch with vmap."""
  k = max(1, min(64, clients))
  if platform != "cpu":
    return [("loop", None), ("vmap", k), ("vmap_patch", k)] if has_convolution(task) else [("loop", None), ("vmap", k)]
  if has_convolution(task):
    return [("loop", None), ("unrolled", 2), ("map_patch", min(k, 25)), ("map_patch", min(k, 5)), ("vmap_patch", 2)]
  return [("loop", None), ("vmap", k), ("map", k)]


def choose_layout(fed_task, program, clients: int, repeats: int = 3, steps: int = 3, log=None) -> dict:
  """Measures :func:`layout_candidates` on ``clients`` real clients of ``fed_task`` (``steps``
  local steps each; each compiled and run once first; ``repeats`` interleaved runs, median) and
  returns ``{"inner", "per_device", "seconds": {layout: s}}`` of the fastest."""
  import jax.numpy as jnp
  import numpy as np

  from mtfl_jax.federated.client import ClientWork
  from mtfl_jax.train import init_variables
  platform = jax.devices()[0].platform
  holders = [c for c in range(len(fed_task.shards)) if len(fed_task.shards[c])][:max(1, clients)]
  works = [ClientWork(c, fed_task.shards[c], steps, 1000 + c) for c in holders]
  params, model_state = init_variables(fed_task.task, 0)
  bc = {"params": params, "model_state": model_state}
  if program.stateful:
    bc["control"] = jax.tree.map(jnp.zeros_like, params)
  n = np.ones(len(works), np.float32) / len(works)
  weights = {k: n for k in output_names(program, bc, program.new_client_state(bc) if program.stateful else None)}
  states = [jax.tree.map(np.asarray, program.new_client_state(bc))] * len(works) if program.stateful else None
  cands = layout_candidates(fed_task.task, platform, len(works))
  exes = {}
  for inner, k in cands:
    name = inner if k is None else f"{inner}/{k}"
    exes[name] = (LoopExecutor(fed_task, program) if inner == "loop" else
                  BatchedExecutor(fed_task, program, client_mesh(1), inner=inner, per_device=k))
    jax.block_until_ready(exes[name].run(bc, works, weights, states).sums)  # compiles
  times = {name: [] for name in exes}
  for _ in range(repeats):
    for name, ex in exes.items():
      t0 = time.perf_counter()
      jax.block_until_ready(ex.run(bc, works, weights, states).sums)
      times[name].append(time.perf_counter() - t0)
  med = {name: float(np.median(t)) for name, t in times.items()}
  best = min(med, key=med.get)
  for ex in exes.values():
    ex.close()
  inner, _, k = best.partition("/")
  if log:
    log(f"  client layout of {fed_task.name}: " + ", ".join(f"{n} {1e3 * v:.1f} ms" for n, v in med.items())
        + f" -> {best}")
  return {"inner": inner, "per_device": int(k) if k else None, "seconds": {k_: round(v, 5) for k_, v in med.items()},
          "clients": len(works), "steps": steps}


def layout_key(fed_task, program, clients_hint=None) -> tuple[str, int]:
  """``(key, clients)``: where the layout of ``fed_task``'s clients on this device is kept in the
  calibration store, and the round size it is measured at (rounds of similar size share a
  choice: ``clients_hint`` rounded up to a power of two)."""
  from mtfl_jax.device import device_name
  clients = 1 << max(0, int(clients_hint or 8) - 1).bit_length()
  return (f"{fed_task.name}|{device_name()}|clients={clients}" + ("|stateful" if program.stateful else ""),
          clients)


def stored_or_measured_layout(fed_task, program, clients_hint=None, store: bool = True, log=None) -> tuple[dict, str]:
  """The layout choice for ``fed_task`` on this device (:func:`layout_key`): the one in the
  calibration store, else measured now (:func:`choose_layout`) and kept there. Returns the
  choice and where it came from (``"stored"`` or ``"measured"``)."""
  from mtfl_jax.calibration import load_layout, save_layout
  key, clients = layout_key(fed_task, program, clients_hint)
  choice = load_layout(key) if store else None
  if choice is not None:
    return choice, "stored"
  choice = choose_layout(fed_task, program, clients, log=log)
  if store:
    try:
      save_layout(key, choice)
    except OSError:  # a read-only store: the choice holds for this run only
      pass
  return choice, "measured"


def best_batched(choice: dict) -> tuple[str, int | None]:
  """``(inner, per_device)`` of the fastest *batched* layout a :func:`choose_layout` choice
  measured (the choice itself when a batched layout won; the runner-up when the loop did;
  ``(None, None)``, the executor's default, when no batched layout was measured)."""
  secs = {k: v for k, v in choice.get("seconds", {}).items() if k != "loop"}
  if choice["inner"] != "loop":
    return choice["inner"], choice["per_device"]
  if not secs:
    return None, None
  inner, _, k = min(secs, key=secs.get).partition("/")
  return inner, int(k) if k else None


class AutoExecutor(ClientExecutor):
  """The fastest layout for this task on this device, chosen by measurement once per machine,
  task and round size (:func:`choose_layout`) and kept in the calibration store
  (:func:`mtfl_jax.calibration.load_layout`), so later runs measure nothing: the per-client
  loop or a batched layout. The choice is in ``choice``."""

  def __init__(self, fed_task, program, clients_hint=None, store: bool = True, **options):
    choice, _ = stored_or_measured_layout(fed_task, program, clients_hint, store)
    clients = layout_key(fed_task, program, clients_hint)[1]
    self.choice = choice["inner"] if choice["per_device"] is None else f"{choice['inner']}/{choice['per_device']}"
    self.inner = (LoopExecutor(fed_task, program) if choice["inner"] == "loop" else
                  BatchedExecutor(fed_task, program, client_mesh(1), inner=choice["inner"],
                                  per_device=choice["per_device"], clients_hint=clients))

  @property
  def name(self) -> str:
    return f"auto ({self.choice})"

  def run(self, broadcast, works, weights, client_states=None) -> Aggregate:
    return self.inner.run(broadcast, works, weights, client_states)

  def close(self) -> None:
    self.inner.close()


def _vmap(fed_task, program, clients_hint=None, **options):
  return BatchedExecutor(fed_task, program, client_mesh(1), inner="vmap", clients_hint=clients_hint)


def _sharded(fed_task, program, devices=None, clients_hint=None, **options):
  """:class:`BatchedExecutor` over ``devices``; unless ``inner`` or ``per_device`` is given, in
  the batched layout measured fastest for this task and round size
  (:func:`stored_or_measured_layout`, as ``auto`` does; measured on one device, run on all).
  In a run of several processes nothing is measured (each process would measure on its own,
  and all must compile the same programs): every process runs process 0's stored choice, or
  the executor's default when it has none."""
  if options.get("inner") is None and options.get("per_device") is None:
    if jax.process_count() == 1:
      choice = stored_or_measured_layout(fed_task, program, clients_hint)[0]
    else:
      from mtfl_jax.calibration import load_layout
      from mtfl_jax.distributed import broadcast_json, is_main_process
      choice = broadcast_json(load_layout(layout_key(fed_task, program, clients_hint)[0]) if is_main_process()
                              else None)
    if choice is not None:
      inner, k = best_batched(choice)
      options = {**options, "inner": inner, "per_device": k}
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


__all__ = ["Aggregate", "AutoExecutor", "best_batched", "choose_layout", "layout_candidates", "layout_key",
           "stored_or_measured_layout", "BatchedExecutor", "ClientExecutor", "EXECUTORS", "LoopExecutor",
           "all_finite", "check_weights", "client_mesh", "make_executor", "output_names", "register_executor"]
