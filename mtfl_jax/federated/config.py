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

from mtfl_jax.federated.callbacks import MAX_GRID_EVALUATIONS
from mtfl_jax.federated.executors import EXECUTORS
from mtfl_jax.federated.plan import AGGREGATORS, POLICIES
from mtfl_jax.fleet import BANDWIDTH_SIGMA, SPEED_SIGMA, Availability, Fleet
from mtfl_jax.tasks import Task, get_task, parse_task_names, task_names

ALGORITHMS = ("fedavg", "scaffold")
PARTITIONS = ("skew", "natural")
# The settings that tune some of the built-in policies: given with another built-in policy,
# which would ignore them, they are refused (a policy of your own may read any setting).
POLICY_SETTINGS = {"deadline_quantile": ("deadline", "full"), "max_work_scale": ("full",), "extend": ("full",),
                   "overselect": ("overselect",), "buffer_size": ("fedbuff",), "concurrency": ("fedbuff",),
                   "staleness_exponent": ("fedbuff",), "max_staleness": ("fedbuff",)}
BUILTIN_POLICIES = tuple(POLICIES)  # imported before any user policy can be registered
# A lognormal sigma of 10 already spreads devices (or shards) over a factor of about 1e17;
# larger ones overflow to infinite speeds or sizes.
MAX_SIGMA = 10.0
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
    skew ``alpha``, or with ``alpha=None`` lognormal quantity skew ``quantity_sigma``, which
    label skew leaves unused; "natural": each dataset's own client ids,
    ``Dataset.from_arrays(..., client_ids=...)``, with no skew of ours: ``alpha`` is unused),
    ``presence``;
  * local training: ``local_epochs``, ``prox_mu`` (FedProx's proximal term; None: FedAvg),
    ``algorithm`` ("fedavg", or "scaffold": control variates, Karimireddy et al., 2020);
  * server: ``server_optimizer`` (an optax factory by name, e.g. "sgd" with ``server_kwargs``
    ``{"momentum": 0.9}`` is FedAvgM, "adam" FedAdam, "yogi" FedYogi, "adagrad" FedAdagrad;
    or an optax transformation), ``server_lr``, ``aggregator`` (None: the policy's);
  * policy: ``policy``, ``deadline_quantile``, ``max_work_scale`` and ``extend`` (``full``),
    ``overselect`` (``overselect``), ``buffer_size``, ``concurrency``, ``staleness_exponent``,
    ``max_staleness`` (``fedbuff``); given with a built-in policy that does not use them, they
    are refused;
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
    if not isinstance(self.tasks, (str, Task, tuple, list)):
      raise ValueError(f"bad federated config: tasks must be task names and Task values (a tuple or list, or one "
                       f"name), e.g. tasks=('digits_mlp', my_task); got {type(self.tasks).__name__} {self.tasks!r}")
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
    if self.server_kwargs is not None and not isinstance(self.server_kwargs, Mapping):
      raise ValueError(f"bad federated config: server_kwargs must be a dict of the server optimizer's keyword "
                       f"arguments, e.g. {{'momentum': 0.9}}; got {self.server_kwargs!r}")
    object.__setattr__(self, "server_kwargs", dict(self.server_kwargs or {}))
    for f in dataclasses.fields(self):  # numpy numbers as Python's: they go into config.json as numbers
      v = getattr(self, f.name)
      if isinstance(v, np.generic):
        object.__setattr__(self, f.name, v.item())
      elif f.name == "presence" and isinstance(v, Mapping):
        object.__setattr__(self, f.name, {k: x.item() if isinstance(x, np.generic) else x for k, x in v.items()})
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
  if isinstance(cfg.presence, Mapping):
    if set(cfg.presence) != set(cfg.tasks):
      bad(f"presence gives probabilities for {sorted(map(str, cfg.presence))} but the tasks are {list(cfg.tasks)}: "
          f"give one per task, e.g. {dict.fromkeys(cfg.tasks, 0.5)}, or one number for all")
    for t, v in cfg.presence.items():
      if (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v)
          or not 0 < v <= 1):
        bad(f"presence of task '{t}' must be a finite number > 0 and <= 1, got {v!r}")
  else:
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
  for name in ("speed_sigma", "bandwidth_sigma", "quantity_sigma"):
    if getattr(cfg, name) > MAX_SIGMA:
      bad(f"{name}={getattr(cfg, name)!r} is too large: a lognormal sigma must be <= {MAX_SIGMA:g} (10 already spreads "
          "values over a factor of about 1e17)")
  if cfg.algorithm == "scaffold":
    for t in cfg.task_defs:
      if t.learning_rate is None:
        bad(f"algorithm 'scaffold' needs tasks trained by (momentum) SGD, Task(learning_rate=..., momentum=...); "
            f"task '{t.name}' has an optimizer of its own: use algorithm 'fedavg' (--algorithm fedavg) or give the "
            "task a learning_rate instead of an optimizer")
  if cfg.eval_every_s is not None and cfg.time_budget_s is not None:
    n = cfg.time_budget_s / cfg.eval_every_s
    if n > MAX_GRID_EVALUATIONS:
      bad(f"eval_every_s={cfg.eval_every_s!r} puts {n:.3g} evaluations on the grid up to time_budget_s="
          f"{cfg.time_budget_s!r} (at most {MAX_GRID_EVALUATIONS:,}); give eval_every_s >= "
          f"{cfg.time_budget_s / MAX_GRID_EVALUATIONS:.3g}")
  _check_unused(cfg, bad)
  _check_trace_files(cfg, bad)


def _check_unused(cfg: FedConfig, bad) -> None:
  """Settings given (other than their defaults) that this config would silently ignore."""
  defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}

  def unused(name, why):
    if getattr(cfg, name) != defaults[name]:
      bad(f"{name}={getattr(cfg, name)!r} {why}")
  if cfg.policy in BUILTIN_POLICIES:
    for name, users in POLICY_SETTINGS.items():
      if cfg.policy not in users:
        unused(name, f"is used only by policy {' and '.join(map(repr, users))}, and the policy is {cfg.policy!r}: "
               f"leave it out, or set policy (--policy {users[0]})")
  if POLICIES[cfg.policy].asynchronous:
    unused("client_timeout_s", f"applies to synchronous rounds, and policy {cfg.policy!r} has none: leave it out")
    m = cfg.concurrency or cfg.clients_per_round
    k = cfg.buffer_size or max(1, cfg.clients_per_round // 2)
    if k > m:
      bad(f"buffer_size={k}{' (the default: half of clients_per_round)' if cfg.buffer_size is None else ''} is more "
          f"than the clients that train at once, concurrency={m}"
          f"{' (the default: clients_per_round)' if cfg.concurrency is None else ''}: a server step would wait for "
          f"clients' second updates; give buffer_size <= {m}, or a concurrency up to num_clients ({cfg.num_clients})")
  if cfg.partition == "natural":
    for name in ("presence", "quantity_sigma"):
      unused(name, "does not apply to partition='natural', where each client holds its own data: leave it out")
  if cfg.trace is not None:
    unused("speed_sigma", f"is the lognormal fleet's, and trace={str(cfg.trace)!r} gives the devices' speeds: leave it "
           "out (or trace=None)")
    if cfg.trace != "venn":
      unused("bandwidth_sigma", f"is the lognormal fleet's, and the fleet trace {str(cfg.trace)!r} gives the "
             "bandwidths: leave it out (or trace=None)")
  if cfg.availability != "diurnal":
    for name in ("online_fraction", "availability_period_s"):
      unused(name, f"is used only by availability='diurnal' (--availability diurnal), and availability is "
             f"{None if cfg.availability is None else str(cfg.availability)!r}: leave it out")


def _check_trace_files(cfg: FedConfig, bad) -> None:
  """A fleet or availability trace given as a file is read now (it must describe every client)."""
  for name, named, what, read in (
      ("trace", "venn", "a JSON fleet trace", Fleet.from_trace),
      ("availability", "diurnal", "a JSON trace of online windows", Availability.from_trace)):
    v = getattr(cfg, name)
    if v is None or v == named:
      continue
    if str(v) == "" or not Path(v).exists():
      bad(f"{name} {str(v)!r} is neither {named!r} nor an existing file: give {name}={named!r} (--{name} {named}) or "
          f"the path of {what}")
    read(Path(v), cfg.num_clients)
