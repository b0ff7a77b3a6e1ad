"""Client work, simulated on one machine (in the spirit of fedjax's ``for_each_client``).

A client's local update is three pure pieces, so how clients are executed is a choice, not a
rewrite: :func:`client_init` (the global model, a fresh optimizer state and the client's rng),
:func:`~mtfl_jax.train.make_train_step` (the client step) and :func:`client_final` (the model
delta and the client's final model_state). :func:`run_clients` runs them as a per-client
loop or as one ``jax.vmap`` over the clients of a task (masked steps for clients with less
work); :func:`choose_mode` picks whichever measures faster. This is where sharding over
several devices will go.

Example::

    works = [ClientWork(c, fed.shards["digits_mlp"][c], steps=5, seed=c) for c in range(4)]
    res = run_clients(task, fed.datasets["digits_mlp"], params, works, "vmap")
    res.deltas      # stacked on a leading client axis
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtfl_jax.train import TrainState, batch_indices, make_train_step


def client_init(task, global_params, model_state=None, rng: jax.Array | None = None) -> TrainState:
  """A client's starting state: the global model (params and model_state), a fresh optimizer
  state, and ``rng`` for the task's rng streams (e.g. Dropout)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=global_params,
                    opt_state=task.optimizer.init(global_params),
                    model_state={} if model_state is None else model_state, rng=rng)


def client_final(global_params, state: TrainState):
  """What a client sends back: ``(model delta, final model_state)``."""
  return jax.tree.map(jnp.subtract, state.params, global_params), state.model_state


def client_seed(seed: int, rnd: int, task_index: int, client: int) -> int:
  """The seed of a client's batches and rng in a round: distinct per (run, round, task, client)."""
  return int(np.random.SeedSequence([seed, rnd, task_index, client]).generate_state(1)[0])


def client_key(seed: int) -> jax.Array:
  """The client's training key (its Dropout masks), from its :func:`client_seed`."""
  return jax.random.PRNGKey(np.uint32(seed))


_KEYS = jax.jit(jax.vmap(jax.random.PRNGKey))


def client_keys(seeds) -> np.ndarray:
  """:func:`client_key` of many seeds at once (one dispatch; the same keys), as numpy."""
  return np.asarray(_KEYS(np.asarray(seeds, np.uint32)))


@dataclasses.dataclass(frozen=True)
class ClientWork:
  """One client's work on one task in a round: ``steps`` local steps on batches drawn from
  ``indices`` in an order (and with an rng) seeded by ``seed``."""
  client: int
  indices: np.ndarray
  steps: int
  seed: int


@dataclasses.dataclass
class ClientResults:
  """The clients that ran (in order), their deltas and final model_states stacked on a
  leading axis (None when no client ran)."""
  clients: list
  deltas: Any
  model_states: Any = None


_STEP_CACHE: dict = {}


def _jitted_step(task):
  if task not in _STEP_CACHE:
    _STEP_CACHE[task] = jax.jit(make_train_step(task))
  return _STEP_CACHE[task]


def _vmapped_update(task, num_steps: int):
  key = (task, "vmap", num_steps)
  if key not in _STEP_CACHE:
    step = make_train_step(task)

    def masked(state, x, y, m):
      new, _ = step(state, {"image": x, "label": y})
      return jax.tree.map(lambda a, b: jnp.where(m, a, b), new, state)

    def one_client(global_params, model_state, rng, images, labels, mask):
      state = client_init(task, global_params, model_state, rng)
      if num_steps <= 8:  # short: unrolled (faster on XLA CPU)
        for i in range(num_steps):
          state = masked(state, images[i], labels[i], mask[i])
      else:
        state, _ = jax.lax.scan(lambda st, xs: (masked(st, *xs), None), state, (images, labels, mask))
      return client_final(global_params, state)

    _STEP_CACHE[key] = jax.jit(jax.vmap(one_client, in_axes=(None, None, 0, 0, 0, 0)))
  return _STEP_CACHE[key]


def _batch_ids(work: ClientWork, batch_size: int) -> np.ndarray:
  return batch_indices(work.indices, batch_size, work.steps, work.seed)


def _stack(trees):
  return jax.tree.map(lambda *d: jnp.stack(d), *trees)


def _loop_clients(task, ds, global_params, model_state, works) -> ClientResults:
  step = _jitted_step(task)
  deltas, states = [], []
  for w in works:
    ids = _batch_ids(w, task.batch_size)
    state = client_init(task, global_params, model_state, client_key(w.seed))
    for j in range(w.steps):
      state, _ = step(state, {"image": ds.x_train[ids[j]], "label": ds.y_train[ids[j]]})
    d, s = client_final(global_params, state)
    deltas.append(d)
    states.append(s)
  if not works:
    return ClientResults([], None, None)
  return ClientResults([w.client for w in works], _stack(deltas), _stack(states))


def _vmap_clients(task, ds, global_params, model_state, works) -> ClientResults:
  if not works:
    return ClientResults([], None, None)
  wmax = max(w.steps for w in works)
  if wmax > 8:  # round up so that few distinct programs are compiled
    wmax = -(-wmax // 8) * 8
  ids = np.zeros((len(works), wmax, task.batch_size), np.int64)
  mask = np.zeros((len(works), wmax), bool)
  for k, w in enumerate(works):
    ids[k, :w.steps] = _batch_ids(w, task.batch_size)
    mask[k, :w.steps] = True
  keys = jnp.stack([client_key(w.seed) for w in works])
  deltas, states = _vmapped_update(task, wmax)(global_params, {} if model_state is None else model_state, keys,
                                               ds.x_train[ids], ds.y_train[ids], mask)
  return ClientResults([w.client for w in works], deltas, states)


def run_clients(task, ds, global_params, works: Sequence[ClientWork], mode: str,
                model_state=None) -> ClientResults:
  """Runs every client's local update for ``task`` from the global ``global_params`` (and
  ``model_state``, e.g. BatchNorm statistics) as a per-client loop or one vmap."""
  if mode == "loop":
    return _loop_clients(task, ds, global_params, model_state, works)
  if mode == "vmap":
    return _vmap_clients(task, ds, global_params, model_state, works)
  raise ValueError(f"unknown simulator mode {mode!r}; valid: loop, vmap")


_MODE_CHOICE: dict = {}


def _time_mode(task, ds, params, model_state, works, mode) -> float:
  jax.block_until_ready(run_clients(task, ds, params, works, mode, model_state).deltas)  # compile
  t0 = time.perf_counter()
  jax.block_until_ready(run_clients(task, ds, params, works, mode, model_state).deltas)
  return time.perf_counter() - t0


def choose_mode(task, ds, global_params, works, model_state=None) -> str:
  """Loop or vmap for these clients, by measurement (cached per task and client count).

  A probe on two clients and two steps first: where vmap loses even there (convolutions on
  XLA CPU become slow grouped convolutions), the loop is chosen without compiling the large
  vmapped program. Otherwise both run on the real clients, each compiled before timing.
  """
  key = (task, len(works), jax.default_backend())
  if key not in _MODE_CHOICE:
    probe = [dataclasses.replace(w, steps=min(2, w.steps)) for w in works[:2]]
    timed = lambda ws, m: _time_mode(task, ds, global_params, model_state, ws, m)
    if timed(probe, "vmap") > timed(probe, "loop"):
      _MODE_CHOICE[key] = "loop"
    else:
      times = {m: timed(list(works), m) for m in ("loop", "vmap")}
      _MODE_CHOICE[key] = min(times, key=times.get)
  return _MODE_CHOICE[key]
