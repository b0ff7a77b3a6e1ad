"""What a federated run is: :class:`FedConfig` and its checks, in one place.

Example::

    cfg = FedConfig(tasks=("digits_mlp", my_task), num_clients=10, rounds=20, policy="full")
    cfg.tasks            # ('digits_mlp', 'mine'): names, the keys of results and history
    cfg.task_defs        # the Task values, resolved once, in the same order
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import optax

from mtfl_jax.federated.executors import EXECUTORS
from mtfl_jax.federated.plan import AGGREGATORS, POLICIES
from mtfl_jax.fleet import BANDWIDTH_SIGMA, SPEED_SIGMA
from mtfl_jax.tasks import Task, get_task, parse_task_names, task_names

ALGORITHMS = ("fedavg", "scaffold")
PARTITIONS = ("skew", "natural")
# The server optimizers known by name (any optax factory taking learning_rate works too).
SERVER_OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad", "adamw", "rmsprop", "lamb", "lion", "novograd")


@dataclasses.dataclass(frozen=True)
class FedConfig:
  """A federated run's settings (every field is checked when the config is made).

  ``tasks`` takes names of registered tasks and :class:`~mtfl_jax.tasks.Task` values (your
  own); it is kept as a tuple of names (the keys of results, history and ``to_json``) and the
  Task values, resolved once here, travel in ``task_defs``. ``policy`` names an entry of
  :data:`mtfl_jax.federated.POLICIES`.

  Groups of settings:

  * federation: ``num_clients``, ``clients_per_round``, ``partition`` ("skew": Dirichlet label
    skew ``alpha`` (None: none) and lognormal quantity skew ``quantity_sigma``; "natural": each
    dataset's own client ids, ``Dataset.from_arrays(..., client_ids=...)``), ``presence``;
  * local training: ``local_epochs``, ``prox_mu`` (FedProx's proximal term; None: FedAvg),
    ``algorithm`` ("fedavg", or "scaffold": control variates, Karimireddy et al., 2020);
  * server: ``server_optimizer`` (an optax factory by name, e.g. "sgd" with ``server_kwargs``
    ``{"momentum": 0.9}`` is FedAvgM, "adam" FedAdam, "yogi" FedYogi, "adagrad" FedAdagrad;
    or an optax transformation), ``server_lr``, ``aggregator`` (None: the policy's);
  * policy: ``policy``, ``deadline_quantile``, ``max_work_scale`` and ``extend`` (``full``),
    ``overselect`` (``overselect``), ``buffer_size``, ``concurrency``, ``staleness_exponent``,
    ``max_staleness`` (``fedbuff``);
  * devices: ``speed_sigma``, ``bandwidth_sigma`` (lognormal fleet), ``trace`` (a JSON fleet
    trace, or "venn": the Venn device table), ``availability`` (None: always online;
    "diurnal"; or a JSON trace of online windows) with ``online_fraction`` and
    ``availability_period_s``, ``dropout`` (probability a client leaves mid-round),
    ``client_timeout_s``;
  * the run: ``rounds`` (a cap with ``time_budget_s``), ``seed``, ``eval_every`` (rounds) or
    ``eval_every_s`` (a grid in virtual seconds, the same for every policy), ``simulator``
    and ``devices``.
  """
  tasks: tuple = ("digits_mlp",)
  num_clients: int = 10
  clients_per_round: int = 10
  rounds: int = 10
  local_epochs: float = 1.0
  partition: str = "skew"
  alpha: float | None = 0.5  # Dirichlet label skew; None: quantity skew only
  quantity_sigma: float = 0.0
  presence: float = 1.0  # probability that a client holds a task
  policy: str = "none"
  deadline_quantile: float = 0.5
  max_work_scale: float = 2.0
  extend: bool = True  # full: fast clients may run up to max_work_scale times their epochs
  overselect: float = 1.3
  aggregator: str | None = None
  algorithm: str = "fedavg"
  prox_mu: float | None = None  # FedProx's mu (0 included: the proximal term, times 0); None: FedAvg's client
  server_optimizer: Any = "sgd"
  server_lr: float = 1.0
  server_kwargs: Mapping = dataclasses.field(default_factory=dict)
  buffer_size: int | None = None  # fedbuff: updates per server step (None: half of clients_per_round)
  concurrency: int | None = None  # fedbuff: clients training at once (None: clients_per_round)
  staleness_exponent: float = 0.5  # fedbuff: an update s versions old weighs (1 + s)^-exponent
  max_staleness: int | None = None  # fedbuff: older updates are dropped
  seed: int = 0
  eval_every: int = 1
  eval_every_s: float | None = None
  # How clients are simulated: "loop" (one client after another: the reference), "vmap" (a
  # task's clients batched on one device), "auto" (whichever measures faster here), "sharded"
  # (batched over a ``clients`` mesh of ``devices`` devices, all processes of a
  # jax.distributed run included).
  simulator: str = "auto"
  devices: int | None = None  # "sharded": how many devices (None: all)
  speed_sigma: float = SPEED_SIGMA
  bandwidth_sigma: float = BANDWIDTH_SIGMA
  trace: str | None = None
  availability: str | None = None
  online_fraction: float = 0.5
  availability_period_s: float = 86400.0
  dropout: float = 0.0
  client_timeout_s: float | None = None  # virtual seconds; slower clients are dropped
  # Virtual seconds: the run stops before the first round that would end past it (``rounds``
  # is then a cap); None: run ``rounds`` rounds.
  time_budget_s: float | None = None
  # The Task values of ``tasks``, in order. An init field so that ``dataclasses.replace``
  # carries a user's unregistered tasks along (names in ``tasks`` resolve here first).
  task_defs: tuple = dataclasses.field(default=(), repr=False, compare=False)

  def __post_init__(self):
    known = {t.name: t for t in self.task_defs if isinstance(t, Task)}
    raw = (parse_task_names(self.tasks) if isinstance(self.tasks, str)
           else (self.tasks,) if isinstance(self.tasks, Task) else tuple(self.tasks))
    defs = []
    for t in raw:
      if isinstance(t, str):
        t = t.strip()
      if isinstance(t, str) and t in known:
        defs.append(known[t])
      else:
        try:
          defs.append(get_task(t))
        except ValueError:
          raise ValueError(f"bad federated config: unknown task {t!r}; valid: {', '.join(task_names())}, "
                           "or pass your own Task") from None
    object.__setattr__(self, "task_defs", tuple(defs))
    object.__setattr__(self, "tasks", tuple(t.name for t in defs))
    object.__setattr__(self, "server_kwargs", dict(self.server_kwargs or {}))
    check_config(self)

  @property
  def policy_value(self):
    """The :class:`~mtfl_jax.federated.plan.Policy` named by ``policy``."""
    return POLICIES[self.policy]

  @property
  def aggregator_name(self) -> str:
    """``aggregator``, or the policy's own when None."""
    return self.aggregator or POLICIES[self.policy].aggregator

  def to_json(self) -> dict:
    """The settings as JSON (tasks by name; a server optimizer given as a transformation is
    written as "custom")."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "task_defs"}
    if not isinstance(d["server_optimizer"], str):
      d["server_optimizer"] = "custom"
    return json.loads(json.dumps(d, default=str))


def _is_transformation(x) -> bool:
  return callable(getattr(x, "init", None)) and callable(getattr(x, "update", None))


def check_config(cfg: FedConfig) -> None:
  """Raises a ``ValueError`` naming the first bad setting and its valid range."""

  def bad(msg):
    raise ValueError(f"bad federated config: {msg}")

  def integer(name, lo, hi=None, hi_name=None, none_ok=False):
    v = getattr(cfg, name)
    if v is None and none_ok:
      return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
      bad(f"{name} must be " + (f"between {lo} and {hi_name} ({hi}), an integer" if hi is not None
                                else f"an integer >= {lo}") + (" or None" if none_ok else "") + f", got {v!r}")

  def number(name, lo, lo_open=True, hi=None, none_ok=False, extra=""):
    v = getattr(cfg, name)
    if v is None and none_ok:
      return
    rng = (f"> {lo:g}" if lo_open else f">= {lo:g}") + (f" and <= {hi:g}" if hi is not None else "")
    ok = (not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
          and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi))
    if not ok:
      bad(f"{name} must be a finite number {rng}{extra}, got {v!r}")

  def choice(name, valid):
    v = getattr(cfg, name)
    if not isinstance(v, str) or v not in valid:
      bad(f"unknown {name} {v!r}; valid: {', '.join(valid)}")

  if not cfg.tasks:
    bad(f"no tasks; valid: {', '.join(task_names())}, or pass your own Task")
  if len(set(cfg.tasks)) != len(cfg.tasks):
    bad(f"a task is named twice in {cfg.tasks}")
  integer("num_clients", 1)
  integer("clients_per_round", 1, cfg.num_clients if isinstance(cfg.num_clients, int) else None, "num_clients")
  integer("rounds", 1)
  integer("seed", 0, 2**32 - 1, "2**32 - 1")
  integer("eval_every", 1)
  number("eval_every_s", 0, none_ok=True, extra=" (virtual seconds) or None")
  number("local_epochs", 0)
  choice("partition", PARTITIONS)
  if cfg.alpha is not None and not (isinstance(cfg.alpha, (int, float)) and not isinstance(cfg.alpha, bool)
                                    and math.isfinite(cfg.alpha) and cfg.alpha > 0):
    bad(f"Dirichlet alpha must be a finite number > 0 (or None for no label skew), got {cfg.alpha!r}")
  number("quantity_sigma", 0, lo_open=False)
  if not isinstance(cfg.presence, Mapping):  # a per-task mapping is checked by assign_tasks
    number("presence", 0, hi=1)
  choice("policy", tuple(POLICIES))
  number("deadline_quantile", 0, hi=1)
  number("max_work_scale", 1, lo_open=False)
  if not isinstance(cfg.extend, bool):
    bad(f"extend must be True or False, got {cfg.extend!r}")
  number("overselect", 1, lo_open=False)
  if cfg.aggregator is not None:
    choice("aggregator", AGGREGATORS)
  choice("algorithm", ALGORITHMS)
  number("prox_mu", 0, lo_open=False, none_ok=True, extra=" (FedProx; None: none)")
  if cfg.algorithm == "scaffold" and POLICIES[cfg.policy].asynchronous:
    bad(f"algorithm 'scaffold' needs synchronous rounds; policy {cfg.policy!r} is asynchronous")
  so = cfg.server_optimizer
  if isinstance(so, str):
    factory = getattr(optax, so, None)
    if not callable(factory) or so.startswith("_"):
      bad(f"unknown server_optimizer {so!r}; valid: an optax optimizer such as {', '.join(SERVER_OPTIMIZERS)}, "
          "or an optax GradientTransformation")
    try:
      json.dumps(cfg.server_kwargs)
      tx = factory(learning_rate=cfg.server_lr, **cfg.server_kwargs)
    except TypeError as e:
      bad(f"server_optimizer {so!r} does not take server_kwargs {cfg.server_kwargs!r} ({e}); "
          f"see optax.{so}'s arguments")
    if not _is_transformation(tx):
      bad(f"server_optimizer {so!r} is not an optax optimizer (optax.{so}(learning_rate=...) is not a "
          "GradientTransformation)")
  elif not _is_transformation(so):
    bad(f"server_optimizer must be an optax optimizer's name ({', '.join(SERVER_OPTIMIZERS)}) or an optax "
        f"GradientTransformation, got {type(so).__name__}")
  number("server_lr", 0)
  integer("buffer_size", 1, none_ok=True)
  integer("concurrency", 1, cfg.num_clients if isinstance(cfg.num_clients, int) else None, "num_clients",
          none_ok=True)
  number("staleness_exponent", 0, lo_open=False)
  integer("max_staleness", 0, none_ok=True)
  choice("simulator", tuple(EXECUTORS))
  if cfg.devices is not None:
    integer("devices", 1, 1024, "1024")
    if cfg.simulator != "sharded":
      bad(f"devices={cfg.devices} is used only by simulator='sharded' (got simulator={cfg.simulator!r}): "
          "set simulator='sharded' (--simulator sharded) or leave devices out")
  number("speed_sigma", 0, lo_open=False)
  number("bandwidth_sigma", 0, lo_open=False)
  if cfg.trace is not None and not isinstance(cfg.trace, (str, Path)):
    bad(f"trace must be a path to a JSON fleet trace, 'venn', or None, got {cfg.trace!r}")
  if cfg.availability is not None and not isinstance(cfg.availability, (str, Path)):
    bad(f"availability must be None, 'diurnal' or a path to a JSON trace of online windows, got {cfg.availability!r}")
  number("online_fraction", 0, hi=1)
  number("availability_period_s", 0)
  number("dropout", 0, lo_open=False, hi=1)
  if cfg.dropout >= 1:
    bad(f"dropout must be below 1 (the probability that a client leaves mid-round), got {cfg.dropout!r}")
  number("client_timeout_s", 0, none_ok=True, extra=" (virtual seconds) or None")
  number("time_budget_s", 0, none_ok=True, extra=" (or None)")
