"""The standard task mix: four learning problems whose per-step workloads differ by ~1000x,
as the paper's self-driving mix (classification, detection, segmentation) does.

A :class:`Task` is a frozen, hashable spec, so it can be a static argument of ``jax.jit``.

Example::

    task = get_task("digits_mlp")
    task.model, task.dataset, task.batch_size   # MLP(...), 'mtfl_digits', 32
    task = task.replace(dataset="mnist")        # for mnist_lenet: the catalog MNIST instead
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import optax

from mtfl_jax import models
from mtfl_jax.data import NUM_CLASSES, SHAPES


@dataclasses.dataclass(frozen=True)
class Task:
  """One learning problem: model, dataset, loss kind, SGD settings and batch size."""
  name: str
  model: nn.Module
  dataset: str
  kind: str  # "classification" or "segmentation" (per-pixel classification)
  batch_size: int
  learning_rate: float
  momentum: float = 0.9
  # Datasets with the same shapes that may replace the default one.
  alt_datasets: tuple[str, ...] = ()

  @property
  def input_shape(self) -> tuple[int, ...]:
    return SHAPES[self.dataset][0]

  @property
  def label_shape(self) -> tuple[int, ...]:
    return SHAPES[self.dataset][1]

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES[self.dataset]

  def optimizer(self) -> optax.GradientTransformation:
    return optax.sgd(self.learning_rate, momentum=self.momentum or None)

  def replace(self, **changes: Any) -> "Task":
    if "dataset" in changes and changes["dataset"] not in (self.dataset,) + self.alt_datasets:
      raise ValueError(f"task '{self.name}' cannot use dataset '{changes['dataset']}'; "
                       f"valid: {', '.join((self.dataset,) + self.alt_datasets)}")
    if "batch_size" in changes and not (isinstance(changes["batch_size"], int) and changes["batch_size"] > 0):
      raise ValueError(f"batch_size must be a positive integer, got {changes['batch_size']!r}")
    return dataclasses.replace(self, **changes)


_TASKS = {
    "digits_mlp": Task("digits_mlp", models.MLP((128, 64), 10), "mtfl_digits", "classification",
                       batch_size=32, learning_rate=0.05),
    "mnist_lenet": Task("mnist_lenet", models.LeNet5(10), "mtfl_mnist5k", "classification",
                        batch_size=32, learning_rate=0.02, alt_datasets=("mnist", "fashion_mnist")),
    "cifar_resnet": Task("cifar_resnet", models.ResNet(1, (16, 32, 64), 10), "cifar10", "classification",
                         batch_size=32, learning_rate=0.05),
    "shapes_unet": Task("shapes_unet", models.UNet((16, 32, 64), 4), "mtfl_shapes", "segmentation",
                        batch_size=16, learning_rate=0.05),
}

ALL_TASKS: tuple[str, ...] = tuple(_TASKS)
# Tasks whose default dataset builds offline: the ones accuracy experiments may use anywhere.
OFFLINE_TASKS: tuple[str, ...] = ("digits_mlp", "mnist_lenet", "shapes_unet")


def get_task(name: str | Task) -> Task:
  """The task called ``name`` (a :class:`Task` passes through); ``ValueError`` lists valid names."""
  if isinstance(name, Task):
    return name
  try:
    return _TASKS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(ALL_TASKS)}") from None


def get_tasks(names: str | list[str] | tuple[str, ...]) -> list[Task]:
  """Tasks from a comma-separated string or a sequence of names."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  if not names:
    raise ValueError(f"no task named; valid tasks: {', '.join(ALL_TASKS)}")
  tasks = [get_task(n) for n in names]
  if len({t.name for t in tasks}) != len(tasks):
    raise ValueError(f"a task is named twice in {[t.name for t in tasks]}")
  return tasks
