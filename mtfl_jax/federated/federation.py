"""The simulated federation a config builds once: real datasets, per-client shards, the fleet.

Example::

    fed = build_federation(FedConfig(tasks=("digits_mlp",), num_clients=10, alpha=0.5))
    fed.workloads(3)        # {'digits_mlp': local steps of client 3 in a round}
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np

from mtfl_jax.clock import Fleet
from mtfl_jax.federated.config import FedConfig
from mtfl_jax.partition import assign_tasks, skewed_partition
from mtfl_jax.train import init_variables, workload_steps


@dataclasses.dataclass
class Federation:
  """What a config builds once: datasets, per-client shards per task, the fleet."""
  cfg: FedConfig
  datasets: dict
  shards: dict  # task -> list (per client) of index arrays (empty: client lacks the task)
  fleet: Fleet
  model_bytes: dict  # task -> bytes a client downloads (and uploads): params and model_state
  modes: dict = dataclasses.field(default_factory=dict)  # task -> "loop" | "vmap" (auto's choice)
  sharded: dict = dataclasses.field(default_factory=dict)  # task -> ShardedClients (simulator="sharded")

  def sharded_clients(self, task: str):
    """The :class:`~mtfl_jax.federated.sharded.ShardedClients` of ``task`` over the config's
    ``devices`` (built once: the dataset goes to the devices once, programs compile once)."""
    if task not in self.sharded:
      from mtfl_jax.federated.sharded import ShardedClients, client_mesh
      self.sharded[task] = ShardedClients(self.cfg.task(task), self.datasets[task], client_mesh(self.cfg.devices),
                                          clients_hint=self.cfg.clients_per_round)
    return self.sharded[task]

  def workloads(self, client: int, epochs: float | Mapping[str, float] | None = None) -> dict[str, int]:
    """Local steps of each task on ``client`` for ``epochs`` (default: the config's)."""
    out = {}
    for t in self.cfg.tasks:
      e = self.cfg.local_epochs if epochs is None else (epochs[t] if isinstance(epochs, Mapping) else epochs)
      out[t] = workload_steps(len(self.shards[t][client]), self.cfg.task(t).batch_size, e)
    return out


def build_federation(cfg: FedConfig) -> Federation:
  """Loads the tasks' real datasets (never synthetic: accuracy is measured; a task's own
  arrays or a named dataset, ``Task.load_data``) and partitions them over the clients."""
  datasets = {t: cfg.task(t).load_data(allow_synthetic=False) for t in cfg.tasks}
  holders = assign_tasks(cfg.tasks, cfg.num_clients, cfg.presence, cfg.seed)
  shards = {}
  for i, t in enumerate(cfg.tasks):
    clients = holders[t]
    parts = skewed_partition(datasets[t].y_train, len(clients), alpha=cfg.alpha,
                             quantity_sigma=cfg.quantity_sigma, seed=cfg.seed + 101 * (i + 1))
    per_client = [np.zeros(0, np.int64) for _ in range(cfg.num_clients)]
    for c, idx in zip(clients, parts):
      per_client[c] = idx
    if sum(len(p) for p in per_client) == 0:
      raise ValueError(f"task '{t}' has no data on any client")
    shards[t] = per_client
  fleet = (Fleet.from_trace(cfg.trace, cfg.num_clients) if cfg.trace
           else Fleet.lognormal(cfg.num_clients, cfg.seed, cfg.speed_sigma))
  model_bytes = {t: 4.0 * sum(np.prod(p.shape) for p in jax.tree.leaves(init_variables(cfg.task(t), 0)))
                 for t in cfg.tasks}
  return Federation(cfg, datasets, shards, fleet, model_bytes)
