"""Execution backends: ways to run several tasks' local steps on one device.

Every module in this package that defines a :class:`Runner` subclass decorated with
``@register`` becomes available by name; adding a backend is adding one file.

Example::

    with open_backend("threads", [Job("digits_mlp", 50), Job("mnist_lenet", 20)]) as runner:
      result = runner.run({"digits_mlp": 0.2, "mnist_lenet": 1.0})
      result.makespan_s, result.finish_times_s
"""
from __future__ import annotations

import importlib
import pkgutil

from mtfl_jax.backends.base import BACKENDS, Job, RunResult, Runner, register

for _m in pkgutil.iter_modules(__path__):
  if _m.name != "base":
    importlib.import_module(f"{__name__}.{_m.name}")


def backend_names() -> tuple[str, ...]:
  return tuple(BACKENDS)


def open_backend(name: str, jobs, **kwargs) -> Runner:
  """Opens backend ``name`` on ``jobs`` (compiles, or starts its workers)."""
  if name not in BACKENDS:
    raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
  import inspect
  takes = [p for p in inspect.signature(BACKENDS[name].__init__).parameters if p not in ("self", "jobs")
           and not p.startswith("_")]
  unknown = sorted(k for k in kwargs if k not in takes and not k.startswith("_"))
  if unknown:
    raise ValueError(f"backend {name!r} takes no option {', '.join(unknown)}; its options: "
                     f"{', '.join(takes) or 'none'}")
  return BACKENDS[name](jobs, **kwargs)


__all__ = ["BACKENDS", "Job", "RunResult", "Runner", "backend_names", "open_backend", "register"]
