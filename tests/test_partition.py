import math

import numpy as np
import pytest

from mtfl_jax.partition import (assign_tasks, dirichlet_partition, partition_labels,
                                quantity_partition)

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 100 per class


def _classes_per_client(shards):
  return np.mean([len(np.unique(LABELS[s])) for s in shards])


def test_dirichlet_partition_is_a_seeded_partition():
  a = dirichlet_partition(LABELS, 10, alpha=0.5, seed=0)
  b = dirichlet_partition(LABELS, 10, alpha=0.5, seed=0)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  allidx = np.concatenate(a)
  assert len(allidx) == 1000 and len(np.unique(allidx)) == 1000  # disjoint and covering
  assert min(len(s) for s in a) >= 1
  assert [len(s) for s in a] != [len(s) for s in dirichlet_partition(LABELS, 10, 0.5, seed=1)]


def test_small_alpha_gives_label_skew():
  skewed = _classes_per_client(dirichlet_partition(LABELS, 10, alpha=0.05, seed=0))
  iid = _classes_per_client(dirichlet_partition(LABELS, 10, alpha=1000.0, seed=0))
  assert iid == 10.0
  assert skewed < 5.0


@pytest.mark.parametrize("alpha", [0, -1.0, math.nan, math.inf])
def test_bad_alpha(alpha):
  with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
    dirichlet_partition(LABELS, 4, alpha=alpha, seed=0)


def test_bad_client_counts():
  with pytest.raises(ValueError, match="num_clients must be a positive integer"):
    dirichlet_partition(LABELS, 0, alpha=1.0, seed=0)
  with pytest.raises(ValueError, match="cannot give 2000 clients"):
    dirichlet_partition(LABELS, 2000, alpha=1.0, seed=0)


def test_quantity_partition_sizes_and_skew():
  shards = quantity_partition(1000, 8, sigma=1.0, seed=0)
  sizes = np.array([len(s) for s in shards])
  assert sizes.sum() == 1000 and sizes.min() >= 1
  assert len(np.unique(np.concatenate(shards))) == 1000
  flat = np.array([len(s) for s in quantity_partition(1000, 8, sigma=0.0, seed=0)])
  assert flat.max() - flat.min() <= 1  # sigma 0: equal sizes up to rounding
  assert sizes.max() / sizes.min() > 3  # sigma 1: strongly skewed


def test_segmentation_masks_partition_by_dominant_class():
  masks = np.zeros((3, 4, 4), int)
  masks[0, :2] = 2
  masks[1, :1] = 1
  masks[1, 1:, :1] = 3  # 3 pixels of class 3 vs 4 of class 1
  assert partition_labels(masks).tolist() == [2, 1, 0]


def test_assign_tasks_covers_every_task_and_client():
  held = assign_tasks(["a", "b", "c"], 20, presence={"a": 1.0, "b": 0.5, "c": 0.05}, seed=0)
  assert held["a"].tolist() == list(range(20))
  assert 1 <= len(held["c"]) < len(held["b"]) < 20
  clients = set(np.concatenate(list(held.values())).tolist())
  assert clients == set(range(20))
  with pytest.raises(ValueError, match="presence of task 'b'"):
    assign_tasks(["a", "b"], 3, presence={"a": 1.0, "b": 0.0}, seed=0)
