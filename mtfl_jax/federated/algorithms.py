"""Federated algorithms: what the server sends, how it weights what comes back, how it applies it.

A :class:`FedAlgorithm` (as fedjax's) pairs the client side (a
:class:`~mtfl_jax.federated.client.ClientProgram`) with the server side: ``init`` (a task's
global model), ``broadcast`` (what clients start from), ``weights`` (each client's weight in
each weighted sum the executor returns) and ``apply`` (an
:class:`~mtfl_jax.federated.executors.Aggregate` to a new global model).

Aggregators of the model delta (``weights``):

* ``fedavg``: ``p_c = n_c / sum n`` (McMahan et al., 2017);
* ``fednova``: ``p_c / a_c * sum_c' p_c' a_c'`` with ``a_c`` the client's
  :func:`accumulation_norm` (Wang et al., 2020): unequal local work does not bias the aggregate;
* ``fednova_nominal``: ``p_c * a(nominal_c) / a(steps_c)``: each normalised delta brought to
  its own client's nominal work (its local epochs), so a client whose work the coordinator did
  not change contributes exactly as in FedAvg.

The server optimizer is any optax transformation applied to the negated aggregate delta
(``optax.sgd(1.0)`` is plain averaging; FedAvgM, FedAdam, FedYogi, FedAdagrad are
``sgd(momentum=...)``, ``adam``, ``yogi``, ``adagrad``: Reddi et al., 2021). A model's mutable
collections (e.g. BatchNorm statistics) are not gradients: the new global model_state is the
sample-weighted mean of the clients' final ones. SCAFFOLD's server control variate moves by
``sum_c (c_i+ - c_i) / N`` (N: the clients holding the task).

Example::

    algo = make_algorithm(task, "fedavg", optax.adam(1e-2))      # FedAdam
    st = algo.init(params, model_state)
    agg = executor.run(algo.broadcast(st), works, algo.weights(samples, steps, steps))
    st = algo.apply(st, agg)
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtfl_jax.federated.client import ClientProgram, fedavg_program, scaffold_program


class ModelServerState(flax.struct.PyTreeNode):
  """One task's global model on the server: params, the server optimizer's state, the model's
  mutable collections (empty for models without any) and the algorithm's own server state
  (SCAFFOLD: ``{"control": c}``; else empty)."""
  params: Any
  opt_state: Any
  model_state: Any = flax.struct.field(default_factory=dict)
  extra: Any = flax.struct.field(default_factory=dict)


class ServerState(flax.struct.PyTreeNode):
  """The server's state between rounds: the round index and each task's global model."""
  round: jax.Array
  models: dict  # task -> ModelServerState

  @property
  def params(self) -> dict:
    return {t: m.params for t, m in self.models.items()}

  @property
  def model_state(self) -> dict:
    return {t: m.model_state for t, m in self.models.items()}


def accumulation_norm(steps: int, momentum: float = 0.0) -> float:
  """l1 norm of a client's accumulation vector ``a`` (Wang et al. 2020, FedNova): its update
  after ``steps`` local steps is ``-lr * sum_k a_k g_k``. Plain SGD: ``a_k = 1``, the norm is
  ``steps``. Heavy-ball momentum ``rho`` (optax.sgd: ``v = rho v + g; x -= lr v``): gradient k
  is applied ``sum_{j<steps-k} rho^j`` times, so the norm is
  ``[steps - rho (1 - rho^steps) / (1 - rho)] / (1 - rho)``."""
  tau, rho = float(steps), float(momentum or 0.0)
  if rho == 0.0:
    return tau
  return (tau - rho * (1.0 - rho ** tau) / (1.0 - rho)) / (1.0 - rho)


def fednova_momentum(task) -> tuple[float, str]:
  """The momentum FedNova normalises with for ``task`` and a note for the history.

  ``task.momentum`` is a float for (momentum) SGD; None means the client optimizer is not
  SGD, for which no closed-form accumulation vector is known here: the step count is used
  (with a warning) and the history says so."""
  rho = getattr(task, "momentum", None)
  if rho is None:
    warnings.warn(f"task '{task.name}': client optimizer is not (momentum) SGD; FedNova falls back to "
                  "normalising by step counts", stacklevel=3)
    return 0.0, "steps (client optimizer not SGD: fallback)"
  return float(rho), f"accumulation norm, momentum {float(rho):g}" if rho else "steps (plain SGD)"


def client_weights(samples, norms=None, target_norms=None) -> jax.Array:
  """Each client's weight in the aggregate delta: ``p_c = n_c / sum n`` (FedAvg); with
  ``norms``, ``p_c / norm_c * sum_c' p_c' norm_c'`` (FedNova); with ``target_norms`` too,
  ``p_c * target_c / norm_c``."""
  p = jnp.asarray(samples, jnp.float32)
  p = p / p.sum()
  if norms is not None:
    a = jnp.asarray(norms, jnp.float32)
    p = p / a * (jnp.asarray(target_norms, jnp.float32) if target_norms is not None else jnp.sum(p * a))
  return p


def aggregate(deltas, samples, norms=None, target_norms=None):
  """Weighted average of stacked deltas (leading axis: clients) with :func:`client_weights`."""
  p = client_weights(samples, norms, target_norms)
  return jax.tree.map(lambda d: jnp.tensordot(p, d, axes=1), deltas)


def delta_weights(aggregator: str, momentum: float) -> Callable:
  """``weights(samples, steps, nominal) -> p`` of an aggregator (see the module docstring)."""
  norms = lambda steps: [accumulation_norm(s, momentum) for s in steps]  # noqa: E731
  if aggregator == "fedavg":
    return lambda samples, steps, nominal: client_weights(samples)
  if aggregator == "fednova":
    return lambda samples, steps, nominal: client_weights(samples, norms(steps))
  if aggregator == "fednova_nominal":
    return lambda samples, steps, nominal: client_weights(samples, norms(steps), norms(nominal))
  raise ValueError(f"unknown aggregator {aggregator!r}; valid: fedavg, fednova, fednova_nominal")


class FedAlgorithm(NamedTuple):
  """A federated algorithm for one task (see the module docstring).

  ``init(params, model_state) -> ModelServerState``; ``broadcast(state) -> pytree``;
  ``weights(samples, steps, nominal, staleness=None) -> {output: vector}``;
  ``apply(state, aggregate) -> state``; ``program``: the client side; ``note``: what the
  history should say about the aggregation (None: nothing)."""
  init: Callable
  broadcast: Callable
  weights: Callable
  apply: Callable
  program: ClientProgram
  note: str | None = None


def staleness_weights(staleness: Sequence[int], exponent: float) -> np.ndarray:
  """FedBuff's down-weighting of stale updates: ``(1 + s)^-exponent`` (Nguyen et al., 2022)."""
  return (1.0 + np.asarray(staleness, np.float64)) ** -float(exponent)


def make_algorithm(task, aggregator: str = "fedavg", server_optimizer: optax.GradientTransformation | None = None,
                   prox_mu: float | None = None, scaffold: bool = False, holders: int = 1,
                   staleness_exponent: float = 0.5) -> FedAlgorithm:
  """The algorithm of ``task``: its client program (FedAvg's local SGD, with FedProx's
  ``prox_mu``, or SCAFFOLD's), ``aggregator``'s delta weights, ``server_optimizer`` (default
  ``optax.sgd(1.0)``). ``holders``: how many clients hold the task (SCAFFOLD's ``N``)."""
  tx = server_optimizer if server_optimizer is not None else optax.sgd(1.0)
  program = (scaffold_program if scaffold else fedavg_program)(task, prox_mu)
  note = None
  momentum = 0.0
  if aggregator != "fedavg":
    momentum, note = fednova_momentum(task)
    if aggregator == "fednova_nominal":
      note += ", to each client's nominal work"
  p_of = delta_weights(aggregator, momentum)

  def init(params, model_state=None) -> ModelServerState:
    extra = {"control": jax.tree.map(jnp.zeros_like, params)} if scaffold else {}
    return ModelServerState(params, tx.init(params), {} if model_state is None else model_state, extra)

  def broadcast(state: ModelServerState):
    out = {"params": state.params, "model_state": state.model_state}
    if scaffold:
      out["control"] = state.extra["control"]
    return out

  def weights(samples, steps, nominal, staleness=None) -> dict:
    p = np.asarray(p_of(samples, steps, nominal), np.float32)
    if staleness is not None:
      p = (p * staleness_weights(staleness, staleness_exponent)).astype(np.float32)
    q = np.asarray(client_weights(samples), np.float32)
    out = {"delta": p, "model_state": q}
    if scaffold:
      out["control"] = np.full(len(samples), 1.0 / holders, np.float32)
    return out

  def apply(state: ModelServerState, agg) -> ModelServerState:
    delta = jax.tree.map(jnp.asarray, agg.sums["delta"])
    # the aggregate delta is a descent direction: the server optimizer gets it as a gradient
    upd, opt_state = tx.update(jax.tree.map(jnp.negative, delta), state.opt_state, state.params)
    model_state = state.model_state
    if jax.tree.leaves(state.model_state):
      model_state = jax.tree.map(lambda s, ref: jnp.asarray(s).astype(ref.dtype), agg.sums["model_state"],
                                 state.model_state)
    extra = state.extra
    if scaffold:
      extra = {"control": jax.tree.map(lambda c, d: c + jnp.asarray(d), state.extra["control"], agg.sums["control"])}
    return ModelServerState(optax.apply_updates(state.params, upd), opt_state, model_state, extra)

  return FedAlgorithm(init, broadcast, weights, apply, program, note)


def server_optimizer(name_or_tx, lr: float = 1.0, kwargs=None) -> optax.GradientTransformation:
  """An optax transformation from a name (``optax.<name>(learning_rate=lr, **kwargs)``) or as given."""
  if isinstance(name_or_tx, str):
    return getattr(optax, name_or_tx)(learning_rate=lr, **dict(kwargs or {}))
  return name_or_tx


def check_server_optimizer(name_or_tx, lr: float = 1.0, kwargs=None) -> None:
  """Two server steps on a small model, before a run starts: a server optimizer that fails on
  its settings (``server_kwargs={"b1": "x"}``) or steps to NaN or inf (``server_lr=1e300``, a
  NaN momentum) is a one-line ``ValueError`` naming them, not a failure rounds later."""
  what = (f"server_optimizer {name_or_tx!r} with server_lr={lr!r} and server_kwargs={dict(kwargs or {})!r}"
          if isinstance(name_or_tx, str) else "the server optimizer given (an optax transformation)")
  params = {"w": jnp.zeros((3,), jnp.float32)}
  grads = {"w": jnp.asarray([0.5, -1.0, 1e-3], jnp.float32)}
  try:
    tx = server_optimizer(name_or_tx, lr, kwargs)
    state = tx.init(params)
    for _ in range(2):
      upd, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, upd)
    ok = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  except Exception as e:  # noqa: BLE001 - any failure here is the optimizer's settings
    detail = " ".join(str(e).split())[:300]
    raise ValueError(f"bad federated config: {what} fails on a server step ({type(e).__name__}: {detail}); check "
                     "its arguments (server_kwargs, --server-optimizer)") from None
  if not ok:
    raise ValueError(f"bad federated config: {what} steps the model to NaN or inf on a unit update; lower server_lr "
                     "(--server-lr) or fix server_kwargs")
