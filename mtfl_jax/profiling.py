"""Solo profiles of tasks: what each train step costs on the device at hand.

A :class:`TaskProfile` holds the compile time, the median step time (after warm-up, with
``block_until_ready``), FLOPs and bytes from XLA's cost analysis, memory from XLA's memory
analysis, achieved FLOP/s against the device's measured matmul peak, and an operator-level
breakdown: FLOPs of every matmul and convolution of the step's jaxpr (forward and backward),
grouped by layer. (A time-based breakdown needs a profiler trace parser; FLOPs are exact.)

Example::

    prof = profile_task("mnist_lenet")
    prof.step_time_s, prof.flops_per_step, prof.peak_fraction
    save_profiles([prof])            # data/profiles/<device>.json
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Iterable

import jax
import numpy as np

from mtfl_jax.data import default_data_dir
from mtfl_jax.device import device_name, device_peak_flops, device_slug
from mtfl_jax.files import read_json, reading, write_json
from mtfl_jax.tasks import Task, get_task
from mtfl_jax.train import init_state, make_train_step, param_count, sample_batches


# --------------------------------------------------------------------------- cost analysis
def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def xla_costs(compiled) -> dict[str, float]:
  """FLOPs, bytes accessed and memory of a compiled function (XLA's own analyses).

  ``cost_analysis`` returned a list of dicts in older JAX and a dict in newer: both work.
  """
  ca = _first(compiled.cost_analysis()) or {}
  out = {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}
  try:
    ma = compiled.memory_analysis()
    out["memory_bytes"] = float(ma.argument_size_in_bytes + ma.output_size_in_bytes
                                + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend implements memory analysis
    out["memory_bytes"] = float("nan")
  return out


def _eqn_flops(eqn) -> float:
  name = eqn.primitive.name
  out = eqn.outvars[0].aval.shape
  if name == "dot_general":
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * np.prod(out) * np.prod([lhs[d] for d in lc])
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return 2.0 * np.prod(out) * np.prod(rhs) / rhs[out_feature_dim]
  return 0.0


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for item in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


def _layer(name_stack: str) -> tuple[str, str]:
  """'transpose(jvp(LeNet5))/Conv_1' -> ('Conv_1', 'backward')."""
  direction = "backward" if "transpose(" in name_stack else "forward"
  parts = [p for p in name_stack.split("/") if p and "(" not in p]
  return ("/".join(parts) or "(top level)"), direction


def op_breakdown(fn, *args) -> list[dict]:
  """FLOPs of every matmul and convolution in ``fn``'s jaxpr, grouped by (layer, op, pass),
  heaviest first. Multiplies through ``scan`` lengths."""
  totals: dict[tuple, float] = {}

  def walk(jaxpr, mult):
    for eqn in jaxpr.eqns:
      f = _eqn_flops(eqn)
      if f:
        layer, direction = _layer(str(eqn.source_info.name_stack))
        key = (layer, eqn.primitive.name, direction)
        totals[key] = totals.get(key, 0.0) + f * mult
      inner = mult * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else mult
      for sub in _sub_jaxprs(eqn):
        walk(sub, inner)

  walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
  rows = [{"layer": k[0], "op": k[1], "pass": k[2], "flops": float(v)} for k, v in totals.items()]
  return sorted(rows, key=lambda r: -r["flops"])


def _walk_eqns(jaxpr, mult, visit):
  for eqn in jaxpr.eqns:
    visit(eqn, mult)
    inner = mult * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else mult
    for sub in _sub_jaxprs(eqn):
      _walk_eqns(sub, inner, visit)


def _size(shape) -> int:
  return int(np.prod(shape)) if len(shape) else 1


def op_equations(fn, *args) -> list[dict]:
  """Every matmul and convolution of ``fn``'s jaxpr, one row per equation in program order:
  ``layer``, ``op``, ``pass``, ``role``, the ``inputs`` and ``output`` shapes, a convolution's
  ``padding`` and its ``flops`` (as :func:`op_breakdown` counts them: every multiply-add of the
  output, padding zeros included). ``role`` names what a backward equation computes, read off
  its output's size against the same layer's forward equation: ``"weight gradient"`` (the size
  of the forward's second operand, the weights) or ``"input gradient"`` (the size of its first
  operand); forward equations have role ``"forward"``.

  Example::

      rows = op_equations(make_train_step(task), init_state(task), batch)
      [(r["layer"], r["role"], r["flops"]) for r in rows if r["layer"] == "Conv_1"]
  """
  rows = []

  def visit(eqn, mult):
    f = _eqn_flops(eqn)
    if not f:
      return
    layer, direction = _layer(str(eqn.source_info.name_stack))
    row = {"layer": layer, "op": eqn.primitive.name, "pass": direction,
           "inputs": [tuple(v.aval.shape) for v in eqn.invars], "output": tuple(eqn.outvars[0].aval.shape),
           "flops": float(f * mult)}
    if eqn.primitive.name == "conv_general_dilated":
      row["padding"] = tuple(tuple(int(x) for x in p) for p in eqn.params["padding"])
    rows.append(row)

  _walk_eqns(jax.make_jaxpr(fn)(*args).jaxpr, 1, visit)
  forward = {}
  for r in rows:
    if r["pass"] == "forward":
      forward.setdefault((r["layer"], r["op"]), r)
  for r in rows:
    fw = forward.get((r["layer"], r["op"]))
    if r["pass"] == "forward":
      r["role"] = "forward"
    elif fw is not None and _size(r["output"]) == _size(fw["inputs"][1]):
      r["role"] = "weight gradient"
    elif fw is not None and _size(r["output"]) == _size(fw["inputs"][0]):
      r["role"] = "input gradient"
    else:
      r["role"] = "backward"
  return rows


def step_equations(task: str | Task, seed: int = 0) -> list[dict]:
  """:func:`op_equations` of one train step of ``task`` (forward, backward, optimizer update)
  on a batch of its shapes; nothing is computed (the jaxpr depends on shapes only)."""
  from mtfl_jax.train import synthetic_batches
  task = get_task(task).check()
  batch = jax.tree.map(lambda b: b[0], synthetic_batches(task, 1, seed))
  return op_equations(make_train_step(task), init_state(task, seed), batch)


# --------------------------------------------------------------------------- profiles
@dataclasses.dataclass(frozen=True)
class TaskProfile:
  """A task's solo profile on one device (JSON-serialisable)."""
  task: str
  device: str
  batch_size: int
  param_count: int
  compile_s: float
  step_time_s: float
  step_time_spread: float  # (p90 - p10) / median of the timed steps
  flops_per_step: float
  bytes_per_step: float
  memory_bytes: float
  peak_flops: float
  achieved_flops: float
  peak_fraction: float
  data: str  # the dataset the batches came from ("... (synthetic ...)" when synthetic)
  ops: tuple = ()  # op_breakdown rows, heaviest first

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "TaskProfile":
    d = dict(d)
    d["ops"] = tuple(d.get("ops", ()))
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


MAX_REPEATS = 10_000  # timed steps of a profile at most (a long step takes seconds)
_BATCH_POOL = 64  # distinct batches a profile draws; the timed steps cycle over them


def check_repeats(repeats, flag: str = "repeats", warmup: int = 0) -> None:
  """A ``ValueError`` unless ``repeats`` is an integer in ``1..MAX_REPEATS`` (and ``warmup`` >= 0)."""
  if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or not 1 <= repeats <= MAX_REPEATS:
    raise ValueError(f"{flag} must be an integer between 1 and {MAX_REPEATS} (timed steps per task), got {repeats!r}")
  if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or not 0 <= warmup <= MAX_REPEATS:
    raise ValueError(f"warmup must be an integer between 0 and {MAX_REPEATS}, got {warmup!r}")


def profile_task(task: str | Task, *, warmup: int = 3, repeats: int = 20, seed: int = 0,
                 allow_synthetic: bool = True, top_ops: int = 8) -> TaskProfile:
  """Profiles one train step of ``task`` alone on the default device.

  Real batches when the task's dataset is available; otherwise synthetic batches of the real
  shapes (``allow_synthetic``), and the profile's ``data`` field says so. ``task`` is a
  registered name or any :class:`Task`, e.g. one of your own.
  """
  check_repeats(repeats, warmup=warmup)
  task = get_task(task).check()
  ds = task.load_data(allow_synthetic=allow_synthetic)
  step = make_train_step(task)
  state = init_state(task, seed)
  # at most _BATCH_POOL batches on the device, whatever the repeats (a step's time does not
  # depend on which samples it sees); the first _BATCH_POOL steps see the same batches as before
  pool = min(warmup + repeats, _BATCH_POOL)
  batches = sample_batches(ds.x_train, ds.y_train, np.arange(len(ds.x_train)), task.batch_size, pool, seed)
  batches = jax.device_put(batches)
  first = jax.tree.map(lambda b: b[0], batches)

  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(state, first).compile()
  compile_s = time.perf_counter() - t0
  costs = xla_costs(compiled)

  times = []
  for i in range(warmup + repeats):
    batch = jax.tree.map(lambda b: b[i % pool], batches)
    jax.block_until_ready(batch)
    t0 = time.perf_counter()
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  q = np.percentile(times, [10, 90])
  peak = device_peak_flops()
  ops = op_breakdown(step, init_state(task, seed), first)[:top_ops]
  return TaskProfile(
      task=task.name, device=device_name(), batch_size=task.batch_size,
      param_count=param_count(state.params), compile_s=compile_s, step_time_s=med,
      step_time_spread=float((q[1] - q[0]) / med), flops_per_step=costs["flops"],
      bytes_per_step=costs["bytes"], memory_bytes=costs["memory_bytes"], peak_flops=peak,
      achieved_flops=costs["flops"] / med, peak_fraction=costs["flops"] / med / peak,
      data=ds.source, ops=tuple(ops))


def profile_tasks(tasks: Iterable[str | Task], **kwargs) -> list[TaskProfile]:
  return [profile_task(t, **kwargs) for t in tasks]


def profile_dir() -> Path:
  """``$MTFL_PROFILE_DIR``, else ``data/profiles`` beside the data dir."""
  return Path(os.environ.get("MTFL_PROFILE_DIR") or default_data_dir().parent / "profiles")


def default_profile_path(device: str | None = None) -> Path:
  return profile_dir() / f"{device_slug(device)}.json"


def save_profiles(profiles: list[TaskProfile], path: str | os.PathLike | None = None) -> Path:
  """Writes profiles as JSON (default ``data/profiles/<device>.json``), merging with what the
  file already holds for other tasks, so no earlier measurement is lost."""
  path = Path(path or default_profile_path(profiles[0].device if profiles else None))
  existing = {p.task: p for p in load_profiles(path)} if path.exists() else {}
  existing.update({p.task: p for p in profiles})
  doc = {"device": profiles[0].device if profiles else device_name(),
         "profiles": [p.to_json() for p in existing.values()]}
  return write_json(path, doc)


def load_profiles(path: str | os.PathLike) -> list[TaskProfile]:
  path = Path(path)
  remedy = "make one with `python -m mtfl_jax profile --tasks ... --json FILE`"
  doc = read_json(path, "profile file", f"it is not a profile file written by mtfl_jax: delete it and {remedy}",
                  fields=("profiles",), missing=remedy)
  with reading(f"profile file {path} (not a profile file written by mtfl_jax?)", f"delete it and {remedy}"):
    return [TaskProfile.from_json(p) for p in doc["profiles"]]


def profile_table(profiles: list[TaskProfile]) -> str:
  head = f"{'task':<14}{'params':>9}{'step ms':>10}{'MFLOP':>10}{'MB moved':>10}{'mem MB':>9}{'GFLOP/s':>9}{'% peak':>8}  data"
  rows = [head, "-" * len(head)]
  for p in profiles:
    rows.append(f"{p.task:<14}{p.param_count:>9,}{p.step_time_s * 1e3:>10.2f}{p.flops_per_step / 1e6:>10.1f}"
                f"{p.bytes_per_step / 1e6:>10.1f}{p.memory_bytes / 1e6:>9.1f}{p.achieved_flops / 1e9:>9.2f}"
                f"{100 * p.peak_fraction:>8.1f}  {p.data}")
  if profiles:
    rows.append(f"device: {profiles[0].device}; matmul peak {profiles[0].peak_flops / 1e9:.1f} GFLOP/s")
  return "\n".join(rows)
