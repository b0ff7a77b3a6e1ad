"""The experiments' scenarios: task mixes for the co-scheduling benchmark (:class:`Scenario`),
the ways a device is shared in it (:class:`Regime`), and federations for the federated one
(:class:`FedScenario`).

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


def cosched_scenario(name: str) -> Scenario:
  return next(s for s in COSCHED_SCENARIOS if s.name == name)


@dataclasses.dataclass(frozen=True)
class Regime:
  """How each task may use the device while co-scheduled: a backend, and on the ``processes``
  backend a cap on each task's compute threads (None: every core, XLA's default)."""
  name: str
  backend: str
  compute_threads: int | None
  label: str

  def runner_kwargs(self) -> dict:
    return {} if self.compute_threads is None else {"compute_threads": self.compute_threads}


# (a) Today's CPU: one convolution task alone keeps every core busy, so there is little idle
# capacity for a second task to use. (b) The paper's: a task cannot fill the device alone (one
# compute thread, as a GPU kernel too small for the SMs), and there are more tasks than cores;
# equal shares then leave a core idle once the light tasks finish. A GPU is closer to (b).
REGIME_EVERY_CORE = Regime("a_every_core", "processes", None, "(a) each task may use every core")
REGIME_ONE_CORE = Regime("b_one_core", "processes", 1, "(b) one compute thread per task (the paper's regime)")
CPU_REGIMES = (REGIME_EVERY_CORE, REGIME_ONE_CORE)
GPU_REGIME_NOTE = ("a GPU running small kernels is closer to regime (b): one task's kernels leave SMs idle, "
                   "as one compute thread leaves a core idle here")


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
