"""Calibration of the virtual-resource model a federated run's clock uses.

A minimal stand-in holding the code that lived in ``mtfl_jax.federated``; the calibration
service (a JSON store keyed by device, backend and task mix) replaces it.

Example::

    model = calibrate_mix(("digits_mlp", "mnist_lenet"))
"""
from __future__ import annotations

from typing import Sequence

from mtfl_jax.tasks import get_task
from mtfl_jax.vresource import VRModel

_MIX_MODELS: dict = {}


def calibrate_mix(tasks: Sequence, backend: str = "processes", solo_work_s: float = 1.0) -> VRModel:
  """Fits (once per process and task mix) the virtual-resource model used by the clock: one
  equal-share co-run of the tasks (names or Task values) on ``backend``, each with
  ``solo_work_s`` of solo work. The model is keyed by task names."""
  from mtfl_jax.backends import Job, open_backend
  from mtfl_jax.bench_cosched import solo_step_times
  key = (tuple(tasks), backend)
  if key not in _MIX_MODELS:
    solo = solo_step_times(tasks)
    jobs = [Job(t, max(2, int(solo_work_s / solo[get_task(t).name])), seed=i) for i, t in enumerate(tasks)]
    if len(jobs) == 1:
      name = jobs[0].name
      _MIX_MODELS[key] = VRModel(solo, {name: 1.0}, {name: 1.0})
    else:
      with open_backend(backend, jobs) as r:
        r.run(None)  # warm-up
        _MIX_MODELS[key] = VRModel.fit(r.solo_step_s, r.run(None))
  return _MIX_MODELS[key]
