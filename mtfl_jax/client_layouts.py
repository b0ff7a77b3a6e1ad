"""Client layouts: how a chunk of one task's clients is laid out over compiled programs.

Every layout is a program with one signature, so a client executor swaps layouts without
changing anything else::

    program(states, x, y, ids, mask) -> states
      states: the clients' TrainStates stacked on a leading axis [C, ...]
      x, y:   the task's whole training set, already on the device
      ids:    [C, S, B] sample ids of each client's S local steps (gathered on the device)
      mask:   [C, S] whether client c runs step s (False: the state passes through)

and the same numbers (to float rounding) whichever layout runs. The layouts:

==============  ===========================================================================
``loop``        one compiled program per client (its S steps unrolled), a host loop over
                the clients: C dispatches
``vmap``        one program, ``jax.vmap`` over the clients: a convolution with per-client
                weights becomes a grouped convolution (slow on XLA CPU)
``vmap_patch``  ``vmap`` of the step with its convolutions as patches and matmuls
                (:func:`~mtfl_jax.convpatch.patch_convs`): batched matmuls instead
``unrolled``    one program holding the clients one after another (a Python loop at trace
                time): no batching, one dispatch; XLA may run independent clients side by side
``map``         one program, ``lax.map`` over the clients (a loop inside XLA)
==============  ===========================================================================

Each has a ``_patch`` variant where that makes sense (``loop_patch``, ``unrolled_patch``,
``map_patch``): the per-client program with patched convolutions. Which is fastest depends on
the task, the chunk size and the device: measure it (``benchmarks/client_layouts.py``,
:func:`measure_layouts`) rather than assume it.

Example::

    program = clients_program(make_train_step(task), "vmap_patch")
    states = program(states, x, y, ids, mask)       # then deltas = states.params - global
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from mtfl_jax.convpatch import patch_convs

KINDS = ("loop", "vmap", "unrolled", "map")
LAYOUTS = ("loop", "loop_patch", "vmap", "vmap_patch", "unrolled", "unrolled_patch", "map", "map_patch")


def parse_layout(name: str) -> tuple[str, bool]:
  """``"vmap_patch"`` -> ``("vmap", True)``; a ``ValueError`` lists the valid names."""
  if name not in LAYOUTS:
    raise ValueError(f"unknown client layout {name!r}; valid: {', '.join(LAYOUTS)}")
  kind, _, patch = name.partition("_")
  return kind, bool(patch)


def local_steps(step: Callable) -> Callable:
  """One client's local steps in one program: ``(state, x, y, ids [S, B], mask [S]) -> state``,
  the S steps unrolled (XLA CPU runs unrolled steps fastest), each batch gathered on the
  device from ``x, y`` by index, a masked-off step leaving the state as it was."""
  def run(state, x, y, ids, mask):
    for s in range(ids.shape[0]):
      b = ids[s]
      new, _ = step(state, {"image": x[b], "label": y[b]})
      state = jax.tree.map(lambda a, o: jnp.where(mask[s], a, o), new, state)
    return state
  return run


def clients_program(step: Callable, layout: str = "vmap_patch", donate: bool = False) -> Callable:
  """The program ``(states [C, ...], x, y, ids [C, S, B], mask [C, S]) -> states`` of
  ``layout`` for the train step ``step`` (see the module docstring). ``donate``: the input
  states' buffers may be reused for the output (do not read them after the call)."""
  kind, patch = parse_layout(layout)
  one = local_steps(patch_convs(step) if patch else step)
  donate_argnums = (0,) if donate else ()
  if kind == "vmap":
    return jax.jit(jax.vmap(one, in_axes=(0, None, None, 0, 0)), donate_argnums=donate_argnums)
  if kind == "map":
    def mapped(states, x, y, ids, mask):
      return jax.lax.map(lambda a: one(a[0], x, y, a[1], a[2]), (states, ids, mask))
    return jax.jit(mapped, donate_argnums=donate_argnums)
  if kind == "unrolled":
    def unrolled(states, x, y, ids, mask):
      outs = [one(jax.tree.map(lambda a: a[c], states), x, y, ids[c], mask[c]) for c in range(ids.shape[0])]
      return jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return jax.jit(unrolled, donate_argnums=donate_argnums)
  return _LoopProgram(jax.jit(one))


class _LoopProgram:
  """The ``loop`` layout: one dispatch per client of its own program, each client's state
  taken from the stacked states and put back by one small compiled program each (compiled
  once, whatever the number of clients; the output buffer is updated in place)."""

  def __init__(self, one):
    self.one = one
    self._get = jax.jit(lambda states, c: jax.tree.map(lambda a: a[c], states))
    self._put = jax.jit(lambda states, c, s: jax.tree.map(lambda a, b: a.at[c].set(b), states, s),
                        donate_argnums=0)

  def __call__(self, states, x, y, ids, mask):
    out = jax.tree.map(jnp.copy, states)  # the caller's states stay valid
    for c in range(ids.shape[0]):
      out = self._put(out, c, self.one(self._get(states, c), x, y, ids[c], mask[c]))
    return out


def measure_layouts(step: Callable, states, x, y, ids, mask, layouts: Sequence[str] = LAYOUTS,
                    repeats: int = 3) -> dict[str, float]:
  """Median seconds per call of each layout's program on these arguments, the layouts'
  repeats interleaved (so that a load change on a shared machine hits them alike); each
  program is compiled and run once before timing."""
  programs = {name: clients_program(step, name) for name in layouts}
  for p in programs.values():
    jax.block_until_ready(p(states, x, y, ids, mask))
  times: dict[str, list] = {name: [] for name in programs}
  for _ in range(repeats):
    for name, p in programs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(p(states, x, y, ids, mask))
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def fastest_layout(step: Callable, states, x, y, ids, mask, layouts: Sequence[str] = LAYOUTS,
                   repeats: int = 3) -> str:
  """The layout :func:`measure_layouts` finds fastest for these arguments."""
  times = measure_layouts(step, states, x, y, ids, mask, layouts, repeats)
  return min(times, key=times.get)
