"""The one place that knows how to put part of an XLA program on its own GPU stream.

``jax.experimental.compute_on`` with ``"gpu_stream:N"`` annotates the ops it wraps with
``_xla_stream_annotation = "N"``; XLA's GPU backend then schedules them on stream N. Its
form changed across JAX releases: up to 0.10 it is a context manager
(``with compute_on("gpu_stream:1"): ...``); from 0.11 a function transform
(``compute_on(f, compute_type=..., out_memory_spaces=...)``). :func:`on_stream` takes a
function and works with both. On CPU the annotation lowers but XLA runs the ops on its one
stream.
"""
from __future__ import annotations

import inspect
from typing import Callable

try:
  from jax.experimental.compute_on import compute_on as _compute_on
except ImportError:  # pragma: no cover - a JAX without compute_on
  _compute_on = None

STREAM_ANNOTATION = "_xla_stream_annotation"


def _transform_api() -> bool:
  """True when compute_on is the function transform of JAX >= 0.11."""
  return "out_memory_spaces" in inspect.signature(_compute_on).parameters


def _device_memory_space():
  import jax
  space = getattr(getattr(jax, "memory", None), "Space", None)
  if space is not None:
    return space.Device
  from jax._src import core
  return core.MemorySpace.Device


def streams_available() -> bool:
  return _compute_on is not None


def on_stream(fn: Callable, index: int | None) -> Callable:
  """``fn`` with every op it traces placed on GPU stream ``index`` (1-based); ``None``
  returns ``fn`` unchanged."""
  if index is None:
    return fn
  if _compute_on is None:
    raise RuntimeError("this JAX has no compute_on; use the 'threads' or 'processes' backend")
  if index < 1:
    raise ValueError(f"stream index must be >= 1 (stream 0 is the default stream), got {index}")
  compute_type = f"gpu_stream:{index}"
  if _transform_api():
    return _compute_on(fn, compute_type=compute_type, out_memory_spaces=_device_memory_space())

  def wrapped(*args, **kwargs):
    with _compute_on(compute_type):
      return fn(*args, **kwargs)
  return wrapped
