"""The experiments' scenarios: task mixes for the co-scheduling benchmark (:class:`Scenario`)
and federations for the federated one (:class:`FedScenario`).

Example::

    from mtfl_jax.experiments.scenarios import COSCHED_SCENARIOS, Scenario
    Scenario("pair", ("digits_mlp", "mnist_lenet"), (1.0, 3.0)).workloads(solo_step_s, total_s=1.0)
"""
from __future__ import annotations

import dataclasses
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class Scenario:
  """A task mix and the share of the round's solo work each task has."""
  name: str
  tasks: tuple[str, ...]
  work: tuple[float, ...]  # relative solo work W_i * s_i

  def workloads(self, solo_step_s: Mapping[str, float], total_s: float) -> dict[str, int]:
    """Steps per task so that the round holds ``total_s`` of solo work, split as ``work``."""
    unit = total_s / sum(self.work)
    return {t: max(2, int(round(w * unit / solo_step_s[t]))) for t, w in zip(self.tasks, self.work)}


# A tiny dispatch-bound classifier, a small CNN and a segmentation net (the paper's
# self-driving mix, scaled to a laptop), with ever larger imbalance of their solo work.
COSCHED_SCENARIOS = (
    Scenario("light", ("digits_mlp", "mnist_lenet", "shapes_unet"), (1.0, 1.0, 1.0)),
    Scenario("medium", ("digits_mlp", "mnist_lenet", "shapes_unet"), (1.0, 2.0, 4.0)),
    Scenario("heavy", ("digits_mlp", "mnist_lenet", "shapes_unet", "cifar_resnet"), (1.0, 1.0, 2.0, 12.0)),
)


@dataclasses.dataclass(frozen=True)
class FedScenario:
  """A federation: its tasks, label skew (Dirichlet ``alpha``), device speed spread, the
  fraction of clients holding each task, and the spread of their data quantities."""
  name: str
  tasks: tuple[str, ...]
  alpha: float
  speed_sigma: float
  presence: float = 1.0
  quantity_sigma: float = 0.0


FED_SCENARIOS = (
    FedScenario("mlp+cnn", ("digits_mlp", "mnist_lenet"), alpha=0.5, speed_sigma=0.5),
    FedScenario("mlp+cnn+unet", ("digits_mlp", "mnist_lenet", "shapes_unet"), alpha=0.5, speed_sigma=0.5,
                presence=0.7),
    FedScenario("skewed+heterogeneous", ("digits_mlp", "shapes_unet"), alpha=0.1, speed_sigma=1.0,
                quantity_sigma=1.0),
)

# The mix of the four built-in tasks at their own batch sizes (the GPU recording's).
PAPER_MIX = ("digits_mlp", "mnist_lenet", "shapes_unet", "cifar_resnet")
