"""What one client does in a round, as three pure functions (fedjax's client_init / step / final).

A :class:`ClientProgram` is how a client of one task trains, whatever runs it: ``init``
starts from what the server broadcast (the global model, and for SCAFFOLD its control
variate) and the client's own state, ``step`` is one local step on one batch, and ``final``
says what the client sends back, as named outputs that the server sums with weights
(``"delta"``: the model delta, ``"model_state"``: its final mutable collections, e.g. BatchNorm
statistics, ``"control"``: SCAFFOLD's control-variate change), and its new client state.

The client objective is the task's loss, plus FedProx's proximal term
``mu/2 ||w - w_global||^2`` (Li et al., 2020) when ``prox_mu`` is given; SCAFFOLD (Karimireddy et
al., 2020) corrects every local gradient by ``c - c_i`` (server and client control variates,
option II of the paper: ``c_i+ = c_i - c + (x - y) / (lr * A)``, ``A`` the client optimizer's
accumulation norm: the step count for plain SGD).

Executors (:mod:`~mtfl_jax.federated.executors`) run programs: a per-client loop, or many
clients batched, over one or several devices; :func:`masked` is the one masked step they
share and :func:`work_batch_ids` the one batch-index feed.

Example::

    prog = fedavg_program(task)
    carry = prog.init({"params": p, "model_state": {}}, None, client_key(7))
    carry = prog.step(carry, {"image": x, "label": y})
    outputs, _ = prog.final({"params": p, "model_state": {}}, carry)   # outputs["delta"]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtfl_jax.tasks import Task
from mtfl_jax.train import TrainState, batch_indices, loss_and_metrics


@dataclasses.dataclass(frozen=True)
class ClientWork:
  """One client's work on one task: ``steps`` local steps on batches drawn from ``indices``
  in an order (and with an rng) seeded by ``seed``."""
  client: int
  indices: np.ndarray
  steps: int
  seed: int


def client_seed(seed: int, rnd: int, task_index: int, client: int) -> int:
  """The seed of a client's batches and rng in a round: distinct per (run, round, task, client)."""
  return int(np.random.SeedSequence([seed, rnd, task_index, client]).generate_state(1)[0])


_KEYS = jax.jit(jax.vmap(jax.random.PRNGKey))


def client_keys(seeds) -> np.ndarray:
  """The clients' training keys (their Dropout masks) from their :func:`client_seed`, in one
  dispatch, as numpy."""
  return np.asarray(_KEYS(np.asarray(seeds, np.uint32)))


def work_batch_ids(work: ClientWork, batch_size: int) -> np.ndarray:
  """``[steps, batch_size]`` sample ids of a client's batches (every executor feeds these)."""
  return batch_indices(work.indices, batch_size, work.steps, work.seed)


class ClientCarry(flax.struct.PyTreeNode):
  """A client's training state in a round: the task's train state, the global params it
  started from (FedProx's anchor; None without a proximal term) and its gradient correction
  (SCAFFOLD's ``c - c_i``; None without)."""
  state: TrainState
  anchor: Any = None
  correction: Any = None


class ClientProgram(NamedTuple):
  """How a client of one task trains, as pure functions (jit them where you run them).

  ``init(broadcast, client_state, rng) -> carry``; ``step(carry, batch) -> carry``;
  ``final(broadcast, carry) -> (outputs, client_state)``. ``outputs`` maps names to pytrees
  the server sums with weights; ``client_state`` is what the client keeps until it is
  sampled again (None for stateless programs). ``new_client_state(broadcast)`` is a client's
  state before its first round (None: stateless)."""
  init: Callable
  step: Callable
  final: Callable
  new_client_state: Callable | None = None

  @property
  def stateful(self) -> bool:
    return self.new_client_state is not None


def masked(step: Callable) -> Callable:
  """``step`` that leaves the carry as it was where ``active`` is False (a client whose
  local steps are done, or a padding row of a batch of clients)."""
  def run(carry, batch, active):
    new = step(carry, batch)
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, carry)
  return run


def _sq_dist(a, b):
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _step(task: Task, prox_mu: float | None) -> Callable:
  tx = task.optimizer

  def step(carry: ClientCarry, batch) -> ClientCarry:
    state = carry.state

    def objective(params, batch, state):
      loss, aux = loss_and_metrics(task, params, batch, state)
      if prox_mu is not None:
        loss = loss + 0.5 * prox_mu * _sq_dist(params, carry.anchor)
      return loss, aux

    grads, (_, model_state) = jax.grad(objective, has_aux=True)(state.params, batch, state)
    if carry.correction is not None:
      grads = jax.tree.map(jnp.add, grads, carry.correction)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return carry.replace(state=state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                             model_state=model_state))
  return step


def _train_state(task: Task, broadcast, rng) -> TrainState:
  params = broadcast["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=task.optimizer.init(params),
                    model_state=broadcast["model_state"], rng=rng)


def fedavg_program(task: Task, prox_mu: float | None = None) -> ClientProgram:
  """Local SGD of the task's optimizer from the global model (FedAvg's client), with
  FedProx's proximal term ``prox_mu/2 ||w - w_global||^2`` when ``prox_mu`` is a number (0
  included: the term is computed, times 0); sends back its model delta and model_state."""
  mu = None if prox_mu is None else float(prox_mu)
  return task.memo(("fedavg_program", mu), lambda: _fedavg_program(task, mu))


def _fedavg_program(task: Task, prox_mu: float | None) -> ClientProgram:
  def init(broadcast, client_state, rng) -> ClientCarry:
    return ClientCarry(_train_state(task, broadcast, rng), None if prox_mu is None else broadcast["params"])

  def final(broadcast, carry: ClientCarry):
    delta = jax.tree.map(jnp.subtract, carry.state.params, broadcast["params"])
    return {"delta": delta, "model_state": carry.state.model_state}, None

  return ClientProgram(init, _step(task, prox_mu), final)


def accumulation_norm_jnp(steps, momentum: float):
  """:func:`~mtfl_jax.federated.algorithms.accumulation_norm` of a traced step count."""
  tau = steps.astype(jnp.float32)
  if not momentum:
    return tau
  rho = jnp.float32(momentum)
  return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)


def scaffold_program(task: Task, prox_mu: float | None = None) -> ClientProgram:
  """SCAFFOLD's client (option II): every local gradient is corrected by ``c - c_i``; it sends
  back its model delta, its model_state and the change of its control variate, and keeps its
  new control variate ``c_i+ = c_i - c + (x - y) / (lr * A)`` (``A``: the accumulation norm of
  its steps under the task's SGD momentum)."""
  if task.learning_rate is None:
    raise ValueError(f"algorithm 'scaffold' needs a task trained by (momentum) SGD, Task(learning_rate=...); "
                     f"task '{task.name}' has another optimizer")
  mu = None if prox_mu is None else float(prox_mu)
  return task.memo(("scaffold_program", mu), lambda: _scaffold_program(task, mu))


def _scaffold_program(task: Task, prox_mu: float | None) -> ClientProgram:
  lr, rho = float(task.learning_rate), float(task.momentum or 0.0)

  def init(broadcast, client_state, rng) -> ClientCarry:
    correction = jax.tree.map(jnp.subtract, broadcast["control"], client_state)
    anchor = None if prox_mu is None else broadcast["params"]
    return ClientCarry(_train_state(task, broadcast, rng), anchor, correction)

  def final(broadcast, carry: ClientCarry):
    x, y = broadcast["params"], carry.state.params
    scale = 1.0 / (lr * jnp.maximum(accumulation_norm_jnp(carry.state.step, rho), 1e-12))
    avg_grad = jax.tree.map(lambda a, b: (a - b) * scale, x, y)  # (x - y) / (lr A)
    new_c = jax.tree.map(jnp.subtract, avg_grad, carry.correction)  # c_i - c + (x - y) / (lr A)
    change = jax.tree.map(jnp.subtract, avg_grad, broadcast["control"])  # c_i+ - c_i
    delta = jax.tree.map(jnp.subtract, y, x)
    return {"delta": delta, "model_state": carry.state.model_state, "control": change}, new_c

  def new_client_state(broadcast):
    return jax.tree.map(jnp.zeros_like, broadcast["params"])

  return ClientProgram(init, _step(task, prox_mu), final, new_client_state)
