"""The one place that knows how to put part of an XLA program on its own GPU stream.

A task's whole part of a fused program must become ONE call annotated for its stream:
XLA's GPU backend then runs that call on stream N (as one async start/done pair), so the
tasks overlap. Annotating the ops one by one (``compute_on``'s context-manager form up to
JAX 0.10) does not give that: XLA ignores the attribute on plain ops or wraps each op in
its own async pair, so no task becomes one stream.

The function transform that emits one ``func.call`` with ``_xla_stream_annotation = "N"``
is ``jax.experimental.compute_on.compute_on2`` on JAX 0.10 and ``compute_on`` itself from
JAX 0.11 (``compute_on(f, compute_type=..., out_memory_spaces=...)``). :func:`on_stream`
picks whichever this JAX has. On CPU the annotated call lowers and runs on XLA's one
stream (so programs and tests behave the same without a GPU).
"""
from __future__ import annotations

import inspect
from typing import Callable

try:
  from jax.experimental import compute_on as _compute_on_module
except ImportError:  # pragma: no cover - a JAX without compute_on
  _compute_on_module = None

STREAM_ANNOTATION = "_xla_stream_annotation"


def _takes_function(fn) -> bool:
  params = inspect.signature(fn).parameters
  return "out_memory_spaces" in params and "compute_type" in params


def _stream_transform():
  """The compute_on function transform of this JAX, or None (only the per-op context
  manager, or nothing)."""
  if _compute_on_module is None:
    return None
  for name in ("compute_on", "compute_on2"):  # JAX >= 0.11, then JAX 0.10
    fn = getattr(_compute_on_module, name, None)
    if fn is not None and _takes_function(fn):
      return fn
  return None


def _device_memory_space():
  import jax
  space = getattr(getattr(jax, "memory", None), "Space", None)
  if space is not None:
    return space.Device
  from jax._src import core
  return core.MemorySpace.Device


def streams_available() -> bool:
  """Whether this JAX can put a function on its own stream as one call."""
  return _stream_transform() is not None


def on_stream(fn: Callable, index: int | None) -> Callable:
  """``fn`` as one call annotated for GPU stream ``index`` (1-based; stream 0 is the
  default stream); ``None`` returns ``fn`` unchanged. ``fn`` takes positional arrays
  (pytrees) and returns device arrays.

  Example::

      part = on_stream(lambda state, batch: run_steps(state, batch), 1)
      state = part(state, batch)   # inside a jitted program
  """
  if index is None:
    return fn
  transform = _stream_transform()
  if transform is None:
    raise RuntimeError("this JAX has no compute_on function transform (JAX >= 0.10 has one); "
                       "use the 'threads' or 'processes' backend")
  if index < 1:
    raise ValueError(f"stream index must be >= 1 (stream 0 is the default stream), got {index}")
  return transform(fn, compute_type=f"gpu_stream:{index}", out_memory_spaces=_device_memory_space())
