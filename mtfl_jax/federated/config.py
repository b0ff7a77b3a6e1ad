"""What a federated run is: :class:`FedConfig` and its checks.

Example::

    cfg = FedConfig(tasks=("digits_mlp", my_task), num_clients=10, rounds=20, policy="full")
    cfg.tasks            # ('digits_mlp', 'mine'): names, the keys of results and history
    cfg.task("mine")     # the Task itself
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from mtfl_jax.clock import SPEED_SIGMA
from mtfl_jax.tasks import Task, get_task, task_names

SIMULATORS = ("auto", "loop", "vmap", "sharded")


@dataclasses.dataclass(frozen=True)
class FedConfig:
  """A federated run's settings.

  ``tasks`` takes names of registered tasks and :class:`~mtfl_jax.tasks.Task` values (your
  own); it is kept as a tuple of names (the keys of results, history and ``to_json``), and the
  Task values travel in ``task_defs`` (read them with :meth:`task`). ``policy`` names an
  entry of :data:`mtfl_jax.federated.POLICIES`.
  """
  tasks: tuple = ("digits_mlp",)
  num_clients: int = 10
  clients_per_round: int = 10
  rounds: int = 10
  local_epochs: float = 1.0
  alpha: float | None = 0.5  # Dirichlet label skew; None: quantity skew only
  quantity_sigma: float = 0.0
  presence: float = 1.0  # probability that a client holds a task
  policy: str = "none"
  deadline_quantile: float = 0.5
  max_work_scale: float = 2.0
  server_lr: float = 1.0
  seed: int = 0
  eval_every: int = 1
  # How clients are simulated: "loop" or "vmap" on one device, "auto" (whichever of the two
  # measures faster), "sharded" (over a ``clients`` mesh of ``devices`` devices, all processes
  # of a jax.distributed run included; mtfl_jax.federated.sharded).
  simulator: str = "auto"
  devices: int | None = None  # "sharded": how many devices (None: all)
  speed_sigma: float = SPEED_SIGMA
  trace: str | None = None
  client_timeout_s: float | None = None  # virtual seconds; slower clients are dropped
  # Virtual seconds: the run stops before the first round that would end past it (``rounds``
  # is then a cap); None: run ``rounds`` rounds.
  time_budget_s: float | None = None
  # The Task values of ``tasks``, in order. An init field so that ``dataclasses.replace``
  # carries a user's unregistered tasks along (names in ``tasks`` resolve here first).
  task_defs: tuple = dataclasses.field(default=(), repr=False, compare=False)

  def __post_init__(self):
    known = {t.name: t for t in self.task_defs if isinstance(t, Task)}
    raw = (self.tasks,) if isinstance(self.tasks, (str, Task)) else tuple(self.tasks)
    defs = []
    for t in raw:
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
    check_config(self)

  def task(self, name: str) -> Task:
    """The Task value named ``name`` in this config."""
    for t in self.task_defs:
      if t.name == name:
        return t
    raise KeyError(f"no task {name!r} in this config; it has {', '.join(self.tasks)}")

  def to_json(self) -> dict:
    """The settings as JSON (tasks by name; the Task values are not serialised)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "task_defs"}
    return json.loads(json.dumps(d, default=str))


def check_config(cfg: FedConfig) -> None:
  """Raises a ``ValueError`` naming the first bad setting and its valid range."""
  from mtfl_jax.federated.policies import POLICIES  # policies read configs: import late

  def bad(msg):
    raise ValueError(f"bad federated config: {msg}")

  def integer(name, lo, hi=None, hi_name=None):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (hi is not None and v > hi):
      bad(f"{name} must be " + (f"between {lo} and {hi_name} ({hi}), an integer" if hi is not None
                                else f"an integer >= {lo}") + f", got {v!r}")

  def number(name, lo, lo_open=True, hi=None, none_ok=False, extra=""):
    v = getattr(cfg, name)
    if v is None and none_ok:
      return
    rng = (f"> {lo:g}" if lo_open else f">= {lo:g}") + (f" and <= {hi:g}" if hi is not None else "")
    ok = (not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
          and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi))
    if not ok:
      bad(f"{name} must be a finite number {rng}{extra}, got {v!r}")
  if not cfg.tasks:
    bad(f"no tasks; valid: {', '.join(task_names())}, or pass your own Task")
  if len(set(cfg.tasks)) != len(cfg.tasks):
    bad(f"a task is named twice in {cfg.tasks}")
  integer("num_clients", 1)
  integer("clients_per_round", 1, cfg.num_clients if isinstance(cfg.num_clients, int) else None, "num_clients")
  integer("rounds", 1)
  integer("seed", 0)
  integer("eval_every", 1)
  number("local_epochs", 0)
  if cfg.alpha is not None and not (isinstance(cfg.alpha, (int, float)) and not isinstance(cfg.alpha, bool)
                                    and math.isfinite(cfg.alpha) and cfg.alpha > 0):
    bad(f"Dirichlet alpha must be a finite number > 0 (or None for no label skew), got {cfg.alpha!r}")
  number("quantity_sigma", 0, lo_open=False)
  if not isinstance(cfg.presence, Mapping):  # a per-task mapping is checked by assign_tasks
    number("presence", 0, hi=1)
  number("deadline_quantile", 0, hi=1)
  number("max_work_scale", 1, lo_open=False)
  number("server_lr", 0)
  number("speed_sigma", 0, lo_open=False)
  number("client_timeout_s", 0, none_ok=True, extra=" (virtual seconds) or None")
  number("time_budget_s", 0, none_ok=True, extra=" (or None)")
  if cfg.policy not in POLICIES:
    bad(f"unknown policy {cfg.policy!r}; valid: {', '.join(POLICIES)}")
  if cfg.devices is not None:
    integer("devices", 1)
  if cfg.simulator not in SIMULATORS:
    bad(f"unknown simulator {cfg.simulator!r}; valid: {', '.join(SIMULATORS)}")
  if cfg.trace is not None and not isinstance(cfg.trace, (str, Path)):
    bad(f"trace must be a path to a JSON file or None, got {cfg.trace!r}")
