"""Overlap of tasks' device work in a ``jax.profiler`` trace: of the time that any task
computes, the fraction during which two or more compute at once.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes ``perfetto_trace.json.gz``
(Chrome trace-event JSON) beside the ``.xplane.pb`` (which needs tensorboard-plugin-profile to
read); JAX 0.10 and 0.11 both do. :func:`load_trace` reads it and :func:`device_work` picks the
events that are device work, grouped per task:

* GPU: events of a ``/device:GPU:N`` process on its stream rows, grouped by stream
  (``by="stream"``: the fused backend puts each task on its own stream) or by the XLA module
  they run (``by="module"``: each task's step jitted under its own name);
* CPU: XLA's thunk events (they carry ``hlo_module``), grouped by module; CPU has no streams,
  so ``by="stream"`` gives no number there, and says why.

:func:`overlap` merges each group's intervals and sweeps them: ``overlap_fraction`` is the
time with >= 2 groups busy over the time with >= 1 busy. Kernels ``[0, 2]`` of one task and
``[1, 3]`` of another give 1/3 (and each task was overlapped half of its busy time). Fewer
than two groups give ``measurable: False`` with a reason, never a made-up number.

Example::

    with jax.profiler.trace(d, create_perfetto_trace=True):
      ...                                   # a co-run
    measure_overlap(d, by="module")["overlap_fraction"]
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Mapping, Sequence

# Rows of a GPU device process that xprof derives from the kernels (not kernels themselves).
DERIVED_ROWS = ("xla modules", "xla ops", "steps", "launch stats", "framework", "source",
                "tensorflow", "traceme")
DEVICE_PROCESS = re.compile(r"^/device:(GPU|TPU)", re.I)


def find_trace_file(log_dir: str | Path) -> Path | None:
  """The newest trace-event JSON under ``log_dir`` (perfetto's first, then xprof's)."""
  log_dir = Path(log_dir)
  for pattern in ("**/perfetto_trace.json.gz", "**/*.trace.json.gz", "**/*.trace.json"):
    found = sorted(log_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
    if found:
      return found[-1]
  return None


def load_trace(path: str | Path) -> dict:
  """Events (``ph == 'X'``, times in seconds) and the process and thread names of a trace file
  or of the newest trace under a folder."""
  path = Path(path)
  if path.is_dir():
    found = find_trace_file(path)
    if found is None:
      raise FileNotFoundError(f"no trace-event JSON under {path} (ran jax.profiler.trace with "
                              "create_perfetto_trace=True?)")
    path = found
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt") as f:
    doc = json.load(f)
  raw = doc["traceEvents"] if isinstance(doc, dict) else doc
  procs, threads, events = {}, {}, []
  for e in raw:
    ph = e.get("ph")
    if ph == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e.get("args", {}).get("name", "")
    elif ph == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    elif ph == "X" and "ts" in e:
      events.append({"name": e.get("name", ""), "pid": e.get("pid"), "tid": e.get("tid"),
                     "start": float(e["ts"]) * 1e-6, "end": (float(e["ts"]) + float(e.get("dur", 0))) * 1e-6,
                     "args": e.get("args") or {}})
  return {"path": str(path), "events": events, "process_names": procs, "thread_names": threads}


def device_work(trace: dict, by: str = "module",
                host_fallback: bool = True) -> tuple[dict[str, list[tuple[float, float]]], dict]:
  """Intervals of device work per group (``by`` "module" or "stream"), and what was used.
  Without device rows, XLA CPU's thunk events stand in when ``host_fallback`` (a CPU run);
  on a GPU run they would be kernel launches, not kernels, so none are used."""
  if by not in ("module", "stream"):
    raise ValueError(f"by must be 'module' or 'stream', got {by!r}")
  procs, threads = trace["process_names"], trace["thread_names"]
  device_pids = {p for p, n in procs.items() if DEVICE_PROCESS.match(n or "")}
  groups: dict[str, list] = {}
  info = {"by": by, "unattributed_events": 0}
  if device_pids:
    info["source"] = "device streams (" + ", ".join(sorted(procs[p] for p in device_pids)) + ")"
    rows = set()
    for e in trace["events"]:
      if e["pid"] not in device_pids:
        continue
      row = threads.get((e["pid"], e["tid"]), str(e["tid"]))
      if any(d in row.lower() for d in DERIVED_ROWS):
        continue
      rows.add(row)
      key = e["args"].get("hlo_module") if by == "module" else f"{procs[e['pid']]} {row}"
      if key is None:
        info["unattributed_events"] += 1
        continue
      groups.setdefault(str(key), []).append((e["start"], e["end"]))
    info["rows"] = sorted(rows)
  elif not host_fallback:
    info["source"] = "none"
    info["reason"] = ("no device rows in the trace: the profiler recorded no kernels (CUPTI not "
                      "available, or refused, e.g. under MPS)")
    return {}, info
  else:
    info["source"] = "host: XLA CPU thunk events"
    if by == "stream":
      info["reason"] = ("no device process in this trace (CPU): XLA CPU has no streams, so work "
                        "cannot be attributed by stream")
      return {}, info
    for e in trace["events"]:
      mod = e["args"].get("hlo_module")
      if mod is not None and "hlo_op" in e["args"] and not e["name"].startswith("end: "):
        groups.setdefault(str(mod), []).append((e["start"], e["end"]))
  return groups, info


def merge(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
  """Sorted, disjoint union of intervals."""
  out: list[list[float]] = []
  for a, b in sorted((float(a), float(b)) for a, b in intervals if b > a):
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return [(a, b) for a, b in out]


def overlap(groups: Mapping[str, Sequence[tuple[float, float]]]) -> dict:
  """Busy and concurrent time of groups of intervals (seconds)."""
  merged = {g: merge(iv) for g, iv in groups.items()}
  merged = {g: iv for g, iv in merged.items() if iv}
  busy = {g: sum(b - a for a, b in iv) for g, iv in merged.items()}
  out = {"groups": {g: {"busy_s": busy[g], "intervals": len(iv)} for g, iv in merged.items()}}
  if len(merged) < 2:
    return {**out, "measurable": False, "overlap_fraction": None,
            "reason": f"{len(merged)} group(s) of device work in the trace; overlap needs two or more"}
  marks = sorted((t, d, g) for g, iv in merged.items() for a, b in iv for t, d in ((a, 1), (b, -1)))
  active: set = set()
  any_s = conc_s = 0.0
  shared = dict.fromkeys(merged, 0.0)
  last = marks[0][0]
  for t, d, g in marks:
    dt = t - last
    if active:
      any_s += dt
    if len(active) >= 2:
      conc_s += dt
      for a in active:
        shared[a] += dt
    last = t
    if d > 0:
      active.add(g)
    else:
      active.discard(g)
  for g in merged:
    out["groups"][g]["overlapped_fraction"] = shared[g] / busy[g] if busy[g] else 0.0
  return {**out, "measurable": True, "overlap_fraction": conc_s / any_s if any_s else 0.0,
          "busy_s": any_s, "concurrent_s": conc_s, "reason": None}


def measure_overlap(trace_or_dir, by: str = "module", host_fallback: bool = True) -> dict:
  """Loads a trace (a dict from :func:`load_trace`, a file or a folder) and returns the overlap
  of its device work grouped ``by`` module or stream, with where the numbers came from."""
  trace = trace_or_dir if isinstance(trace_or_dir, dict) else load_trace(trace_or_dir)
  groups, info = device_work(trace, by, host_fallback)
  if "reason" in info:
    return {"measurable": False, "overlap_fraction": None, "groups": {}, **info, "trace": trace.get("path")}
  return {**overlap(groups), **info, "trace": trace.get("path")}
