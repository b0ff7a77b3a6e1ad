"""The simulated federation a config builds once: real datasets, per-client shards, the fleet.

Everything here is frozen data, built and checked before any training: a run starts from
it and never looks a task up by name again.

Example::

    fed = build_federation(FedConfig(tasks=("digits_mlp",), num_clients=10, alpha=0.5))
    fed.workloads(3)        # {'digits_mlp': local steps of client 3 in a round}
    fed.tasks[0].shards[3]  # the sample ids client 3 holds
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from mtfl_jax.backends.base import MAX_JOB_STEPS
from mtfl_jax.data import Dataset
from mtfl_jax.federated.config import FedConfig
from mtfl_jax.fleet import Availability, Fleet
from mtfl_jax.partition import assign_tasks, skewed_partition
from mtfl_jax.tasks import Task
from mtfl_jax.train import init_variables, workload_steps


@dataclasses.dataclass(frozen=True, eq=False)
class FedTask:
  """One task of a federation: the Task value, its position (seeds derive from it), its
  dataset in memory, each client's sample ids (empty: the client does not hold the task) and
  the bytes a client downloads and uploads (params and model_state)."""
  task: Task
  index: int
  data: Dataset
  shards: tuple
  model_bytes: float

  @property
  def name(self) -> str:
    return self.task.name

  @property
  def batch_size(self) -> int:
    return self.task.batch_size

  @property
  def holders(self) -> np.ndarray:
    """The clients holding this task."""
    return np.flatnonzero([len(s) > 0 for s in self.shards])


# The settings that decide the federation itself (shards and devices).
FEDERATION_FIELDS = ("tasks", "num_clients", "partition", "alpha", "quantity_sigma", "presence", "seed", "speed_sigma",
                     "bandwidth_sigma", "trace", "availability", "online_fraction", "availability_period_s")


@dataclasses.dataclass(frozen=True, eq=False)
class Federation:
  """What a config builds once: its tasks (:class:`FedTask`), and the fleet of devices
  (speed, bandwidth, availability; :class:`~mtfl_jax.fleet.Fleet`)."""
  cfg: FedConfig
  tasks: tuple
  fleet: Fleet

  def with_config(self, cfg: FedConfig) -> "Federation":
    """This federation under another config of the same federation (tasks, clients, partition,
    fleet and seed equal; policy, rounds, training settings may differ): a comparison of
    policies trains on the same shards and devices."""
    diff = [k for k in FEDERATION_FIELDS if getattr(cfg, k) != getattr(self.cfg, k)]
    if diff or cfg.task_defs != self.cfg.task_defs:
      raise ValueError(f"this federation was built for another federation config ({', '.join(diff) or 'tasks'} "
                       "differ); build one for this config with build_federation(cfg)")
    return dataclasses.replace(self, cfg=cfg)

  @property
  def model_bytes(self) -> dict[str, float]:
    return {ft.name: ft.model_bytes for ft in self.tasks}

  def workloads(self, client: int, epochs: float | Mapping[str, float] | None = None) -> dict[str, int]:
    """Local steps of each task on ``client`` for ``epochs`` (default: the config's)."""
    out = {}
    for ft in self.tasks:
      e = self.cfg.local_epochs if epochs is None else (epochs[ft.name] if isinstance(epochs, Mapping) else epochs)
      out[ft.name] = workload_steps(len(ft.shards[client]), ft.batch_size, e)
    return out


def _bad(msg: str):
  return ValueError(f"bad federated config: {msg}")


def _check_data(cfg: FedConfig, datasets: Mapping[str, Dataset]) -> None:
  """Before any partition or training: every task can be evaluated and split over the clients."""
  for t, ds in datasets.items():
    try:
      ds.require_test_split(f"task '{t}' is evaluated in a federated run")
    except ValueError as e:
      raise _bad(str(e)) from None
  if cfg.partition == "natural":
    ids = {t: getattr(ds, "client_ids", None) for t, ds in datasets.items()}
    for t, v in ids.items():
      if v is None:
        raise _bad(f"partition='natural' but task '{t}'s dataset '{datasets[t].name}' has no client ids; give them as "
                   f"Dataset.from_arrays(..., client_ids=ids), one per training sample")
    held = max(int(np.max(v)) + 1 for v in ids.values())
    if cfg.num_clients > held:  # checked before any split: a huge num_clients would allocate per client
      raise _bad(f"partition='natural': num_clients={cfg.num_clients} must be the number of clients in your data, "
                 f"{held} (its client ids run 0..{held - 1}; clients {held}.. would hold no sample): use num_clients "
                 f"(--clients) = {held}")
    return
  sizes = {t: len(ds.y_train) for t, ds in datasets.items()}
  if cfg.num_clients > sum(sizes.values()):
    raise _bad(f"num_clients={cfg.num_clients} but the tasks hold {sum(sizes.values())} training samples in all "
               f"({', '.join(f'{t}: {n}' for t, n in sizes.items())}); every client needs a sample: use "
               f"num_clients (--clients) <= {max(sizes.values())}")


def _natural_shards(cfg: FedConfig, ft_name: str, ds: Dataset) -> list[np.ndarray]:
  ids = np.asarray(ds.client_ids)  # present: checked by _check_data
  if int(ids.max()) >= cfg.num_clients:
    raise _bad(f"partition='natural': task '{ft_name}'s data has client ids up to {int(ids.max())} but num_clients="
               f"{cfg.num_clients}; use num_clients (--clients) = the number of clients in your data")
  order = np.argsort(ids, kind="stable")
  cuts = np.searchsorted(ids[order], np.arange(1, cfg.num_clients))
  return [np.sort(s) for s in np.split(order, cuts)]


def _fleet(cfg: FedConfig) -> Fleet:
  if cfg.trace == "venn":
    fleet = Fleet.from_venn(cfg.num_clients, cfg.seed, bandwidth_sigma=cfg.bandwidth_sigma)
  elif cfg.trace is not None:
    fleet = Fleet.from_trace(cfg.trace, cfg.num_clients)
  else:
    fleet = Fleet.lognormal(cfg.num_clients, cfg.seed, cfg.speed_sigma, bandwidth_sigma=cfg.bandwidth_sigma)
  if cfg.availability is None:
    return fleet
  if cfg.availability == "diurnal":
    av = Availability.diurnal(cfg.num_clients, cfg.seed, cfg.availability_period_s, cfg.online_fraction)
  else:
    av = Availability.from_trace(Path(cfg.availability), cfg.num_clients)
  return fleet.with_availability(av)


def model_bytes(task: Task) -> float:
  """Bytes of a task's params and model_state (shapes only: nothing is computed)."""
  shapes = jax.eval_shape(lambda: init_variables(task, 0))
  return float(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes)))


def build_federation(cfg: FedConfig) -> Federation:
  """Loads the tasks' real datasets (never synthetic: accuracy is measured; a task's own
  arrays or a named dataset, ``Task.load_data``), checks that they can be split over the
  clients and evaluated, and partitions them."""
  datasets = {t.name: t.load_data(allow_synthetic=False) for t in cfg.task_defs}
  _check_data(cfg, datasets)
  holders = (None if cfg.partition == "natural" else assign_tasks(cfg.tasks, cfg.num_clients, cfg.presence, cfg.seed))
  tasks = []
  for i, task in enumerate(cfg.task_defs):
    t, ds = task.name, datasets[task.name]
    if cfg.partition == "natural":
      per_client = _natural_shards(cfg, t, ds)
    else:
      clients = holders[t]
      if len(clients) > len(ds.y_train):
        raise _bad(f"task '{t}' has {len(ds.y_train)} training samples, fewer than the {len(clients)} clients that "
                   f"hold it: use fewer clients (num_clients, --clients) or a lower presence (--presence)")
      try:
        parts = skewed_partition(ds.y_train, len(clients), alpha=cfg.alpha, quantity_sigma=cfg.quantity_sigma,
                                 seed=cfg.seed + 101 * (i + 1))
      except ValueError as e:  # e.g. Dirichlet skew too strong for this many clients
        raise _bad(f"task '{t}' cannot be split over its {len(clients)} clients: {e} (--alpha, --clients)") from None
      per_client = [np.zeros(0, np.int64) for _ in range(cfg.num_clients)]
      for c, idx in zip(clients, parts):
        per_client[c] = idx
    if sum(len(p) for p in per_client) == 0:
      raise _bad(f"task '{t}' has no data on any client")
    most = workload_steps(max(len(p) for p in per_client), task.batch_size, cfg.local_epochs)
    if most > MAX_JOB_STEPS:
      raise _bad(f"local_epochs={cfg.local_epochs:g} gives a client of task '{t}' {most:,} local steps in a round "
                 f"(at most {MAX_JOB_STEPS:,}); use fewer local epochs (--epochs)")
    tasks.append(FedTask(task, i, ds, tuple(per_client), model_bytes(task)))
  if cfg.partition == "natural":
    empty = [c for c in range(cfg.num_clients) if all(len(ft.shards[c]) == 0 for ft in tasks)]
    if empty:
      raise _bad(f"partition='natural': client(s) {empty[:5]} hold no sample of any task; num_clients="
                 f"{cfg.num_clients} must be the number of clients in your data")
  return Federation(cfg, tuple(tasks), _fleet(cfg))
