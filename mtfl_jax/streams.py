"""The one place that knows how to put part of an XLA program on its own GPU stream.

``jax.experimental.compute_on("gpu_stream:N")`` annotates the ops it wraps with
``_xla_stream_annotation = "N"``; XLA's GPU backend then schedules them on stream N. Its
import path and argument have moved between JAX releases, so everything else asks here.
On CPU the annotation lowers but XLA runs the ops on its one stream.
"""
from __future__ import annotations

import contextlib

try:  # jax >= 0.4.31
  from jax.experimental.compute_on import compute_on as _compute_on
except ImportError:  # pragma: no cover - older or newer layouts
  try:
    from jax._src.compute_on import compute_on as _compute_on
  except ImportError:
    _compute_on = None

STREAM_ANNOTATION = "_xla_stream_annotation"


def streams_available() -> bool:
  return _compute_on is not None


def on_stream(index: int | None):
  """Context manager placing the ops traced inside it on GPU stream ``index`` (1-based);
  ``None`` (or a JAX without compute_on) places nothing."""
  if index is None:
    return contextlib.nullcontext()
  if _compute_on is None:
    raise RuntimeError("this JAX has no compute_on; use the 'threads' or 'processes' backend")
  if index < 1:
    raise ValueError(f"stream index must be >= 1 (stream 0 is the default stream), got {index}")
  return _compute_on(f"gpu_stream:{index}")
