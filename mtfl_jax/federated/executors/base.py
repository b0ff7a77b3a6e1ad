"""The client-executor interface: one seam, every way of running a task's clients behind it.

An executor is built once per run and task (it owns its compiled programs and caches, freed
with it) from the task's data and its :class:`~mtfl_jax.federated.client.ClientProgram`.
``run(broadcast, works, weights, client_states)`` trains the clients of ``works`` and
returns one :class:`Aggregate`: the weighted sums of the clients' named outputs
(``sum_c weights[name][c] * outputs[name]_c``), a finite flag per client, and the clients'
new states for stateful programs. Every executor returns the same shape, so the round never
asks which one ran (fedjax's ``for_each_client`` backends are the model).

The built-ins (:data:`EXECUTORS`): ``loop`` (one client after another, one jitted step at a
time: the reference), ``batched`` (a task's clients batched into one program per chunk, over
a mesh of one or more devices). Add your own with :func:`register_executor`.

Example (an executor of your own that wraps another and logs)::

    class Logged(ClientExecutor):
      def __init__(self, fed_task, program, **options):
        self.inner = EXECUTORS["loop"](fed_task, program)
      def run(self, broadcast, works, weights, client_states=None):
        print(f"{len(works)} clients")
        return self.inner.run(broadcast, works, weights, client_states)

    register_executor("logged", Logged)
    run_federated(FedConfig(..., simulator="logged"))
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Aggregate(NamedTuple):
  """What an executor returns for one task's clients: ``clients`` (in the order of the works),
  ``sums[name]``: ``sum_c weights[name][c] * outputs[name]_c`` as float32 numpy trees,
  ``finite``: per client, whether all its outputs were finite, and ``client_states``: per
  client its new state (stateful programs; else None)."""
  clients: tuple
  sums: dict
  finite: np.ndarray
  client_states: tuple | None = None

  def first_bad_client(self) -> int | None:
    bad = np.flatnonzero(~np.asarray(self.finite, bool))
    return None if bad.size == 0 else int(self.clients[bad[0]])


class ClientExecutor(abc.ABC):
  """Runs a task's clients; see the module docstring. ``name`` says which layout ran (records)."""
  name: str = "executor"

  @abc.abstractmethod
  def run(self, broadcast, works: Sequence, weights: Mapping[str, np.ndarray],
          client_states: Sequence | None = None) -> Aggregate:
    """Trains ``works`` from ``broadcast`` and returns their :class:`Aggregate`."""

  def close(self) -> None:
    """Frees what the executor holds (compiled programs, device buffers)."""


EXECUTORS: dict[str, Callable[..., ClientExecutor]] = {}


def register_executor(name: str, factory: Callable[..., ClientExecutor]) -> Callable[..., ClientExecutor]:
  """Makes ``factory(fed_task, program, **options) -> ClientExecutor`` available as
  ``FedConfig(simulator=name)``."""
  if not (isinstance(name, str) and name) or not callable(factory):
    raise ValueError("register_executor(name, factory): a non-empty name and a callable factory")
  EXECUTORS[name] = factory
  return factory


def check_weights(program_outputs: Sequence[str], weights: Mapping[str, np.ndarray], n: int) -> dict:
  """The weights as float32 vectors, one per output the program sends, each of length ``n``."""
  if set(weights) != set(program_outputs):
    raise ValueError(f"weights are given for {sorted(weights)} but the clients send {sorted(program_outputs)}")
  out = {k: np.asarray(v, np.float32) for k, v in weights.items()}
  for k, v in out.items():
    if v.shape != (n,):
      raise ValueError(f"weights['{k}'] needs one entry per client ({n}), got shape {v.shape}")
  return out


def all_finite(*trees) -> jax.Array:
  """Whether every inexact leaf of ``trees`` is finite (one boolean; traceable)."""
  ok = jnp.bool_(True)
  for leaf in jax.tree.leaves(trees):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      ok &= jnp.all(jnp.isfinite(leaf))
  return ok


def output_names(program, broadcast, client_state=None) -> tuple:
  """The names of a program's outputs, read off its shapes (nothing is computed)."""
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)

  def go(b, cs, k):
    carry = program.init(b, cs, k)
    return program.final(b, carry)[0]
  return tuple(jax.eval_shape(go, broadcast, client_state, key))


def as_float32(tree) -> Any:
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)
