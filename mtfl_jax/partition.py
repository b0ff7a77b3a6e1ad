"""Seeded federated partitions: Dirichlet label skew, quantity skew, clients with some tasks.

Example::

    shards = dirichlet_partition(labels, num_clients=10, alpha=0.5, seed=0)
    [len(s) for s in shards]   # per-client sample counts; every client holds >= 1 sample
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def _check(num_clients: int, n: int, min_size: int):
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if num_clients * min_size > n:
    raise ValueError(f"cannot give {num_clients} clients at least {min_size} sample(s) each "
                     f"from {n} samples: use fewer clients or a smaller min_size")


def partition_labels(labels: np.ndarray) -> np.ndarray:
  """One label per sample for partitioning: the class itself, or for a segmentation mask its
  most frequent non-background class (0 for an empty mask)."""
  labels = np.asarray(labels)
  if labels.ndim == 1:
    return labels.astype(np.int64)
  flat = labels.reshape(len(labels), -1).astype(np.int64)
  k = int(flat.max()) + 1
  counts = np.stack([(flat == c).sum(1) for c in range(k)], 1)
  counts[:, 0] = 0
  return np.where(counts.max(1) > 0, counts.argmax(1), 0)


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
  """Label skew (Hsu et al., 2019): each class is split over clients by Dir(alpha) weights.

  Small ``alpha`` gives each client few classes; large ``alpha`` approaches IID. Redraws
  until every client holds at least ``min_size`` samples, and says so if it cannot.
  """
  labels = partition_labels(labels)
  _check(num_clients, len(labels), min_size)
  if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
    raise ValueError(f"Dirichlet alpha must be a finite number > 0, got {alpha!r} "
                     "(small values such as 0.1 give strong skew, 100 is nearly IID)")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(max_tries):
    shards = [[] for _ in range(num_clients)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(labels == c))
      cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, float(alpha)))) * len(idx)).astype(int)[:-1]
      for client, part in enumerate(np.split(idx, cuts)):
        shards[client].append(part)
    out = [np.sort(np.concatenate(s)) for s in shards]
    if min(len(s) for s in out) >= min_size:
      return out
  raise ValueError(f"after {max_tries} draws some client still held fewer than {min_size} "
                   f"samples (alpha={alpha}, {num_clients} clients, {len(labels)} samples): "
                   "raise alpha or use fewer clients")


def quantity_partition(n: int, num_clients: int, sigma: float, seed: int,
                       min_size: int = 1) -> list[np.ndarray]:
  """Quantity skew: client sizes proportional to lognormal(0, sigma) draws, labels IID."""
  _check(num_clients, n, min_size)
  if not (math.isfinite(sigma) and sigma >= 0):
    raise ValueError(f"quantity skew sigma must be a finite number >= 0, got {sigma!r}")
  rng = np.random.default_rng(seed)
  weights = rng.lognormal(0.0, sigma, num_clients)
  spare = n - num_clients * min_size
  sizes = min_size + np.floor(weights / weights.sum() * spare).astype(int)
  sizes[np.argsort(-weights)[: n - sizes.sum()]] += 1  # hand out the rounding remainder
  return [np.sort(s) for s in np.split(rng.permutation(n), np.cumsum(sizes)[:-1])]


def skewed_partition(labels: np.ndarray, num_clients: int, *, alpha: float | None = None,
                     quantity_sigma: float = 0.0, seed: int = 0) -> list[np.ndarray]:
  """Label skew when ``alpha`` is given (Dirichlet), else quantity skew with ``quantity_sigma``."""
  if alpha is not None:
    return dirichlet_partition(labels, num_clients, alpha, seed)
  return quantity_partition(len(labels), num_clients, quantity_sigma, seed)


def assign_tasks(task_names: Sequence[str], num_clients: int, presence: float | Mapping[str, float],
                 seed: int) -> dict[str, np.ndarray]:
  """Which clients hold which task: client c holds task t with probability ``presence[t]``;
  every task gets at least one client and every client at least one task.

  Returns task -> sorted array of client ids.
  """
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  p = {t: (presence[t] if isinstance(presence, Mapping) else presence) for t in task_names}
  for t, v in p.items():
    if not (0 < v <= 1):
      raise ValueError(f"presence of task '{t}' must lie in (0, 1], got {v}")
  rng = np.random.default_rng(seed)
  holds = np.stack([rng.random(num_clients) < p[t] for t in task_names])  # [tasks, clients]
  for c in np.flatnonzero(~holds.any(0)):
    holds[rng.integers(len(task_names)), c] = True
  for i in np.flatnonzero(~holds.any(1)):
    holds[i, rng.integers(num_clients)] = True
  return {t: np.flatnonzero(holds[i]) for i, t in enumerate(task_names)}
