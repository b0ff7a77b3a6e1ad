"""A GPU recording in one call: the paper's experiments sized for a large GPU, the GPU-only
measurements, pass/fail targets, and one tarball (``scripts/gpu_record.sh`` runs it there).

What it measures, in order, each skipped when the time budget left is below its estimate:

* ``cosched``, ``workloads``, ``vresource``, ``evidence``: :data:`reproduce.EXPERIMENTS` (the evidence
  reduced to one scenario and 3 seeds, on the GPU's own clock)
  under :func:`config` ("gpu"), the paper-like mix of the four built-in tasks at their own
  batch sizes (small kernels that leave a large GPU idle), rounds of seconds;
* ``gpu_sharing``: fig. 2 extended: equal-share co-runs of the mix on ``fused`` with and
  without per-task streams (does XLA's stream annotation overlap tasks?), ``threads``, and
  ``processes`` with and without CUDA MPS, against ``sequential`` measured before and after;
* ``trace_overlap``: the fraction of kernel time in which two tasks' kernels run at once, from
  ``jax.profiler`` traces of co-runs (:mod:`mtfl_jax.trace_overlap`);
* ``scale``: :func:`~mtfl_jax.experiments.bench_scale.bench_scale` on one device and process
  (the MLP and LeNet at 100 and 1,000 clients per round: client updates per second, compiles
  after the first round, the aggregate against the single-device loop);
* then :func:`targets` (the paper's training speedup, the model within 15%, the simulator >= 20x the
  CPU's) and :func:`flops_table` (achieved FLOP/s against nominal peaks) are computed from the
  JSON, pass or fail, never asserted.

Results go to ``OUT/results`` (``raw/*.json``, figures and ``REPORT.md`` when the four paper
experiments finished, ``gpu_record.json``, ``GPU_REPORT.md``); ``--tar`` packs ``OUT``.
On a CPU, ``--dry-run`` runs every step on a tiny configuration.

Example::

    python -m mtfl_jax.experiments.gpu_record --out /tmp/rec --budget-s 420 --tar /tmp/gpu_record.tar.gz
    python -m mtfl_jax.experiments.gpu_record --dry-run --out /tmp/rec --tar /tmp/rec.tar.gz
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path

import jax

from mtfl_jax.experiments import reproduce
from mtfl_jax.experiments.paper import TRAINING_SPEEDUP
from mtfl_jax.experiments.scenarios import PAPER_MIX, Regime, Scenario
from mtfl_jax.files import write_json

# Nominal dense peaks (FLOP/s) by device kind. Source: NVIDIA H200 Tensor Core GPU datasheet
# (nvidia.com/en-us/data-center/h200, SXM): FP32 67 TFLOPS; TF32 989 and BF16 1,979 TFLOPS
# "with sparsity", so half of those dense. The H100 SXM datasheet gives the same numbers.
# XLA runs float32 matmuls and convolutions as TF32 on Hopper by default.
NOMINAL_PEAKS = {
    "H200": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12,
             "source": "NVIDIA H200 datasheet (SXM), dense = half the 'with sparsity' tensor figures"},
    "H100": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12,
             "source": "NVIDIA H100 datasheet (SXM), dense = half the 'with sparsity' tensor figures"},
}
TARGETS = {"speedup_vs_sequential": TRAINING_SPEEDUP, "prediction_error": 0.15, "simulator_vs_cpu": 20.0}
CPU_REFERENCE = "benchmarks/recorded/scale_quick_cpu_amd_epyc_2_cores.json"
ORDER = ("cosched", "gpu_sharing", "workloads", "vresource", "evidence", "trace_overlap", "scale")


# Both share the whole GPU (regime (a) of the co-scheduling benchmark): processes under MPS
# (dropped when no MPS daemon runs), and one thread per task.
GPU_REGIMES = (Regime("a_processes", "processes", None, "(a) every task may use the whole GPU (MPS)"),
               Regime("a_threads", "threads", None, "(a) every task may use the whole GPU (one thread each)"))


@dataclasses.dataclass(frozen=True)
class GpuConfig:
  """A recording's configuration: the paper's experiments plus the GPU-only measurements."""
  repro: reproduce.ReproConfig
  sharing_tasks: tuple = PAPER_MIX
  sharing_work: tuple = (1.0, 2.0, 4.0, 8.0)  # relative solo work, as the scenarios have
  sharing_total_s: float = 2.0  # solo work per round
  sharing_repeats: int = 2
  fused_slice_s: float = 0.005  # short slices: few unrolled conv steps per compiled program
  trace_tasks: tuple = ("digits_mlp", "mnist_lenet", "shapes_unet")
  trace_s: float = 0.2  # solo work per task in a traced co-run
  estimate_s: tuple = ()  # (experiment, seconds) it is expected to need; skipped below that
  # the scale benchmark (bench_scale) on this machine's first device: (task, clients) pairs, steady rounds
  scale_work: tuple = (("digits_mlp", 100), ("digits_mlp", 1000), ("mnist_lenet", 100), ("mnist_lenet", 1000))
  scale_rounds: int = 3


def config(mode: str = "gpu") -> GpuConfig:
  """``gpu``: sized for an H200 (about 7 minutes with compiles); ``dry``: every code path on a
  CPU in about a minute."""
  if mode == "gpu":
    repro = dataclasses.replace(
        reproduce.config("quick"), mode="gpu", profile_tasks=PAPER_MIX, profile_repeats=30,
        cosched_scenarios=(Scenario("paper_mix", PAPER_MIX, (1.0, 2.0, 4.0, 8.0)),), cosched_regimes=GPU_REGIMES,
        cosched_total_s=1.0, repeats=9, cosched_search_repeats=2,
        vr_tasks=("mnist_lenet", "shapes_unet"), vr_grid=(0.25, 1.0), evidence_mode="gpu")
    return GpuConfig(repro, estimate_s=(("cosched", 180), ("gpu_sharing", 90), ("workloads", 40),
                                        ("vresource", 50), ("evidence", 150), ("trace_overlap", 30),
                                        ("scale", 90)))
  if mode == "dry":
    pair = ("digits_mlp", "mnist_lenet")
    repro = dataclasses.replace(
        reproduce.config("tiny"), mode="gpu-dry", profile_tasks=pair, profile_repeats=2,
        cosched_scenarios=(Scenario("paper_mix", pair, (1.0, 2.0)),), cosched_total_s=0.2,
        cosched_regimes=GPU_REGIMES[1:], repeats=2, vr_tasks=pair, vr_grid=(0.5, 1.0), evidence_mode="tiny")
    return GpuConfig(repro, sharing_tasks=pair, sharing_work=(1.0, 2.0), sharing_total_s=0.2,
                     sharing_repeats=1, fused_slice_s=0.01, trace_tasks=pair, trace_s=0.05,
                     scale_work=(("digits_mlp", 8),), scale_rounds=1)
  raise ValueError(f"unknown mode {mode!r}; valid: gpu, dry")


# --------------------------------------------------------------------------- environment
def _version(name: str) -> str | None:
  from importlib import metadata
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def nvidia_smi() -> dict:
  """GPU name, driver, memory and clocks from ``nvidia-smi`` (or why there are none)."""
  q = "name,driver_version,memory.total,clocks.max.sm,compute_mode"
  try:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=20)
  except (OSError, subprocess.TimeoutExpired) as e:
    return {"available": False, "reason": f"{type(e).__name__}: {e}"}
  if out.returncode:
    return {"available": False, "reason": out.stderr.strip()[-300:]}
  return {"available": True, "gpus": [dict(zip(q.split(","), (v.strip() for v in line.split(","))))
                                      for line in out.stdout.strip().splitlines()]}


def mps_running() -> bool:
  from mtfl_jax.backends.processes import mps_daemon_running
  return jax.default_backend() == "gpu" and mps_daemon_running()


def env_info() -> dict:
  """Versions, devices and the settings a recording ran under."""
  dev = jax.devices()[0]
  keys = ("XLA_", "JAX_", "CUDA_", "TF_CPP", "MTFL_")
  return {
      "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
      "jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
      "device_kind": getattr(dev, "device_kind", dev.platform),
      "packages": {n: _version(n) for n in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt",
                                            "jax-cuda12-plugin", "flax", "optax", "numpy",
                                            "tensorflow-datasets", "array-record", "mlxtend")},
      "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(keys)},
      "nvidia_smi": nvidia_smi(), "mps_daemon_running": mps_running(),
  }


# --------------------------------------------------------------------------- GPU-only experiments
def _median(xs):
  return float(statistics.median(xs))


def _mix_jobs(tasks, work, total_s):
  from mtfl_jax.backends import Job
  from mtfl_jax.calibration import solo_step_times
  solo = solo_step_times(tasks)
  wl = Scenario("mix", tuple(tasks), tuple(work)).workloads(solo, total_s)
  return [Job(t, wl[t], seed=i) for i, t in enumerate(tasks)], wl, solo


def sharing_variants(gc: GpuConfig, mps: bool) -> list[tuple[str, str, dict, dict]]:
  """(label, backend, open_backend kwargs, environment while it opens) of the fig. 2 extension;
  one place that knows the runners' keyword arguments. While an MPS daemon runs, every CUDA
  client joins it: the workers without MPS get a pipe folder with no daemon in it."""
  out = [("fused_streams", "fused", {"slice_s": gc.fused_slice_s, "use_streams": True}, {}),
         ("fused_no_streams", "fused", {"slice_s": gc.fused_slice_s, "use_streams": False}, {}),
         ("threads", "threads", {}, {})]
  if mps:
    out.append(("processes_mps", "processes", {"use_mps": True}, {}))
  no_daemon = {"CUDA_MPS_PIPE_DIRECTORY": tempfile.mkdtemp(prefix="no_mps_")} if mps else {}
  out.append(("processes_no_mps", "processes", {"use_mps": False}, no_daemon))
  return out


@contextlib.contextmanager
def _environ(changes: dict):
  saved = {k: os.environ.get(k) for k in changes}
  os.environ.update(changes)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def exp_gpu_sharing(gc: GpuConfig, mps: bool, log=print) -> dict:
  """Equal-share co-runs of the mix on every variant, ``sequential`` before and after."""
  from mtfl_jax.backends import open_backend
  from mtfl_jax.vresource import measured_rates
  jobs, wl, solo = _mix_jobs(gc.sharing_tasks, gc.sharing_work, gc.sharing_total_s)
  out = {"device": reproduce.device_name(), "tasks": list(gc.sharing_tasks), "workloads": wl,
         "solo_step_s": {k: round(v, 6) for k, v in solo.items()}, "policy": "equal shares",
         "mps": mps, "variants": {}}
  with open_backend("sequential", jobs) as seq:
    seq.run()  # warm-up
    seq_s = [seq.run().makespan_s]
    for label, backend, kw, env in sharing_variants(gc, mps):
      t0 = time.perf_counter()
      try:
        with _environ(env), open_backend(backend, jobs, **kw) as r:
          r.run(None)  # warm-up (and, for fused, the compile of its programs)
          runs = [r.run(None) for _ in range(gc.sharing_repeats)]
          rates = measured_rates(runs[-1], r.solo_step_s)
        ms = [x.makespan_s for x in runs]
        out["variants"][label] = {"backend": backend, "kwargs": kw, "env": env, "makespan_s": [round(m, 4) for m in ms],
                                  "capacity": round(sum(rates.values()), 3),
                                  "virtual_resource": {k: round(v, 3) for k, v in rates.items()},
                                  "open_and_warm_s": round(time.perf_counter() - t0 - sum(ms), 2)}
        log(f"  [gpu_sharing] {label}: {_median(ms):.3f}s, C={sum(rates.values()):.2f}")
      except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
        out["variants"][label] = {"backend": backend, "kwargs": kw, "error": f"{type(e).__name__}: {e}"}
        log(f"  [gpu_sharing] {label} failed: {type(e).__name__}: {e}")
    seq_s.append(seq.run().makespan_s)
  out["sequential_s"] = [round(s, 4) for s in seq_s]
  ref = _median(seq_s)
  for v in out["variants"].values():
    if "makespan_s" in v:
      v["speedup_vs_sequential"] = round(ref / _median(v["makespan_s"]), 3)
  fs, fn = out["variants"].get("fused_streams", {}), out["variants"].get("fused_no_streams", {})
  out["streams_gain"] = (round(_median(fn["makespan_s"]) / _median(fs["makespan_s"]), 3)
                         if "makespan_s" in fs and "makespan_s" in fn else None)
  return out


def _named(fn, name: str):
  """``fn`` under ``name``, so that jit calls its XLA module ``jit_<name>``."""
  def f(*args):
    return fn(*args)
  f.__name__ = f.__qualname__ = name
  return f


@contextlib.contextmanager
def _traced(root: Path, name: str):
  """A ``jax.profiler`` trace (perfetto JSON, no Python tracer) into ``root/name``."""
  d = root / name
  opts = jax.profiler.ProfileOptions()
  opts.python_tracer_level = 0
  with jax.profiler.trace(str(d), create_perfetto_trace=True, profiler_options=opts):
    yield d


def exp_trace_overlap(gc: GpuConfig, log=print, keep_dir: Path | None = None) -> dict:
  """Kernel overlap of two co-runs under the profiler: one thread per task (each task its
  own XLA module), and one fused program per call with and without per-task streams."""
  from mtfl_jax.backends import Job
  from mtfl_jax.backends.base import Feed, initial_state, time_solo
  from mtfl_jax.backends.fused import make_fused_slice
  from mtfl_jax.train import UNROLL_MAX, has_convolution, make_train_step
  from mtfl_jax.trace_overlap import measure_overlap
  on_gpu = jax.default_backend() == "gpu"
  jobs = [Job(t, 64, seed=i) for i, t in enumerate(gc.trace_tasks)]
  feeds = {j.name: Feed(j) for j in jobs}
  steps = {j.name: jax.jit(_named(make_train_step(j.task), f"train_{j.name}")) for j in jobs}
  solo = {j.name: time_solo(steps[j.name], initial_state(j, None), feeds[j.name], j.steps, 0.02) for j in jobs}
  n = {j.name: max(3, min(j.steps, int(gc.trace_s / solo[j.name]))) for j in jobs}
  out = {"device": reproduce.device_name(), "tasks": list(gc.trace_tasks), "solo_step_s": solo,
         "steps": n, "runs": {}}
  tmp = Path(tempfile.mkdtemp(prefix="mtfl_traces_"))

  def one(label, body, bys):
    try:
      with _traced(tmp, label) as d:
        body()
      out["runs"][label] = {by: measure_overlap(d, by, host_fallback=not on_gpu) for by in bys}
      for by, m in out["runs"][label].items():
        log(f"  [trace_overlap] {label} by {by}: " + (f"{m['overlap_fraction']:.3f}" if m["measurable"]
                                                       else f"not measurable ({m['reason']})"))
    except Exception as e:  # noqa: BLE001 - a profiler that cannot start is a finding, not a crash
      out["runs"][label] = {"error": f"{type(e).__name__}: {e}"}
      log(f"  [trace_overlap] {label} failed: {type(e).__name__}: {e}")

  def threads_body():
    states = {j.name: initial_state(j, None) for j in jobs}
    def work(j):
      s = states[j.name]
      for i in range(n[j.name]):
        s, _ = steps[j.name](s, feeds[j.name].batch(i))
      jax.block_until_ready(s)
    ts = [threading.Thread(target=work, args=(j,), name=f"mtfl-trace-{j.name}") for j in jobs]
    for t in ts:
      t.start()
    for t in ts:
      t.join()

  one("threads", threads_body, ("module", "stream") if on_gpu else ("module",))
  counts = tuple(max(1, min(UNROLL_MAX if has_convolution(j.task) else 64, round(gc.fused_slice_s / solo[j.name])))
                 for j in jobs)
  out["fused_counts"] = dict(zip([j.name for j in jobs], counts))
  for label, streams in (("fused_streams", True), ("fused_no_streams", False)):
    try:
      fn = jax.jit(make_fused_slice([j.task for j in jobs], counts, streams))
      states = tuple(initial_state(j, None) for j in jobs)
      batches = tuple(feeds[j.name].batches(0, k) for j, k in zip(jobs, counts))
      jax.block_until_ready(fn(states, batches))  # compile outside the trace
      calls = max(2, int(gc.trace_s / max(sum(c * solo[j.name] for j, c in zip(jobs, counts)), 1e-6)))

      def fused_body(fn=fn, states=states, batches=batches, calls=calls):
        s = states
        for _ in range(calls):
          s = fn(s, batches)
        jax.block_until_ready(s)
      one(label, fused_body, ("stream",))
    except Exception as e:  # noqa: BLE001
      out["runs"][label] = {"error": f"{type(e).__name__}: {e}"}
  if keep_dir is not None:  # small traces come back with the recording
    keep_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp.glob("*/plugins/profile/*/perfetto_trace.json.gz"):
      if f.stat().st_size < 2_000_000:
        (keep_dir / f"{f.parents[3].name}.perfetto_trace.json.gz").write_bytes(f.read_bytes())
  return out


# --------------------------------------------------------------------------- numbers from the JSON
def nominal_peaks(device_kind: str) -> dict | None:
  for key, peaks in NOMINAL_PEAKS.items():
    if key in (device_kind or ""):
      return peaks
  return None


def flops_table(raw: dict, device_kind: str) -> dict:
  """Achieved FLOP/s of each task solo and of the paper mix's co-runs, against the measured
  matmul peak and the device's nominal peaks."""
  wl = raw.get("workloads")
  if not wl:
    return {"available": False, "reason": "the workloads experiment did not run"}
  peaks = nominal_peaks(device_kind)
  flops = {p["task"]: p["flops_per_step"] for p in wl["profiles"]}

  def row(achieved, measured_peak):
    r = {"achieved_flops": achieved, "of_measured_matmul_peak": achieved / measured_peak}
    for k in ("fp32", "tf32", "bf16"):
      if peaks:
        r[f"of_nominal_{k}"] = achieved / peaks[k]
    return r
  measured = wl["profiles"][0]["peak_flops"]
  out = {"available": True, "measured_matmul_peak_flops": measured, "nominal_peaks": peaks,
         "solo": {p["task"]: row(p["achieved_flops"], measured) for p in wl["profiles"]}, "corun": {}}
  for s in (raw.get("cosched") or {}).get("scenarios", []):
    if all(t in flops for t in s["tasks"]):
      total = sum(s["workloads"][t] * flops[t] for t in s["tasks"])
      for rg, arm in s.get("regimes", {}).items():  # medians over the fresh repeats
        out["corun"][f"{s['name']} {rg}"] = {p: row(total / m["median"], measured)
                                             for p, m in arm["makespan_s"].items()}
  return out


def _sim_rate(scale: dict | None, task: str, clients: int = 100) -> float | None:
  """Client updates per second of ``task`` at ``clients`` clients on one device, one process,
  batched executor (the scale benchmark's summary row; the per-client loop's row beside it is
  the reference, not the simulator's rate)."""
  for r in (scale or {}).get("summary", []):
    if (r.get("task"), r.get("clients"), r.get("devices"), r.get("processes")) == (task, clients, 1, 1) \
        and r.get("executor_kind", "batched") == "batched":
      return r.get("client_updates_per_s")
  return None


def targets(raw: dict, cpu_federated: dict | None) -> list[dict]:
  """The recording's targets, each pass/fail with its number (``pass`` None: not measured)."""
  out = []
  cs = next(iter((raw.get("cosched") or {}).get("scenarios", [])), None)
  arms = list((cs or {}).get("regimes", {}).values())
  cands = {}
  for arm in arms:  # medians over fresh repeats; auto re-measured on repeats its search did not use
    for p in ("competitive", "auto"):
      cands[f"cosched {p} on {arm['backend']}"] = arm["speedup_vs_sequential"][p]["median"]
  for label, v in ((raw.get("gpu_sharing") or {}).get("variants") or {}).items():
    if "speedup_vs_sequential" in v:
      cands[f"gpu_sharing equal shares on {label}"] = v["speedup_vs_sequential"]
  best = max(cands, key=cands.get) if cands else None
  out.append({"target": "competitive (or the measured-best plan) vs sequential on the paper-like mix",
              "threshold": f">= {TARGETS['speedup_vs_sequential']}x",
              "value": cands.get(best), "plan": best, "candidates": cands,
              "pass": None if best is None else cands[best] >= TARGETS["speedup_vs_sequential"]})
  err = arms[0]["prediction_error"]["competitive"]["median"] if arms else None
  out.append({"target": "the model's makespan prediction (competitive plan, median over fresh repeats)",
              "threshold": "within 15%",
              "value": err, "pass": None if err is None else abs(err) <= TARGETS["prediction_error"]})
  gpu, cpu = _sim_rate(raw.get("scale"), "mnist_lenet"), _sim_rate(cpu_federated, "mnist_lenet")
  ratio = gpu / cpu if gpu and cpu else None
  out.append({"target": "federated simulator client updates/s, CNN task (mnist_lenet), vs the recorded CPU",
              "threshold": f">= {TARGETS['simulator_vs_cpu']:.0f}x", "value": ratio,
              "gpu_updates_per_s": gpu, "cpu_updates_per_s": cpu,
              "pass": None if ratio is None else ratio >= TARGETS["simulator_vs_cpu"],
              **({} if ratio else {"why_missing": "no mnist_lenet simulator number "
                                   + ("here" if cpu else "in the CPU reference" if gpu else "here nor in the CPU reference")})})
  return out


# --------------------------------------------------------------------------- the recording
@contextlib.contextmanager
def compile_cache(path: Path):
  """JAX's persistent compilation cache in ``path`` (unless one is set) while the recording
  runs: every runner and worker process compiles the same train steps, so all but the first
  compile of each are cache hits. The previous settings come back afterwards."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    yield
    return
  env = {"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}  # for the worker processes
  conf = {"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": 0.0,
          "jax_persistent_cache_min_entry_size_bytes": 0}
  old_conf = {k: getattr(jax.config, k) for k in conf}
  os.environ.update(env)
  for k, v in conf.items():
    jax.config.update(k, v)
  try:
    yield
  finally:
    for k in env:
      os.environ.pop(k, None)
    for k, v in old_conf.items():
      jax.config.update(k, v)


def _status_path(res: Path) -> Path:
  return res / "gpu_record.json"


def record(out: str | Path, mode: str = "gpu", budget_s: float | None = None, seed: int = 0,
           cpu_reference: str | Path | None = None, only: tuple | None = None, log=print) -> dict:
  """Runs the experiments (``only`` these, if given) into ``out/results`` within ``budget_s``
  (from now), then :func:`finish`. Finished experiments in ``raw/`` (same mode and seed) are
  reused."""
  gc = config(mode)
  if mode == "gpu" and jax.default_backend() != "gpu":  # JAX falls back to the CPU silently
    raise RuntimeError(f"mode 'gpu' but JAX runs on '{jax.default_backend()}' (no usable GPU); "
                       "on a CPU use --dry-run")
  t0 = time.perf_counter()
  res = Path(out) / "results"
  raw_dir = res / "raw"
  raw_dir.mkdir(parents=True, exist_ok=True)
  os.environ.setdefault("MTFL_PROFILE_DIR", str(res / "profiles"))  # calibrations stay in the recording
  mps = mps_running()
  repro = gc.repro
  if jax.default_backend() == "gpu" and not mps:
    repro = dataclasses.replace(repro, cosched_regimes=tuple(r for r in repro.cosched_regimes
                                                             if r.backend != "processes"))
  status = {"mode": mode, "seed": seed, "device": reproduce.device_name(), "budget_s": budget_s,
            "env": env_info(), "config": {"repro": dataclasses.asdict(repro),
                                          **{k: v for k, v in dataclasses.asdict(gc).items() if k != "repro"}},
            "experiments": {}}
  log(f"gpu_record ({mode}) on {status['device']}; MPS daemon running: {mps}; budget "
      + (f"{budget_s:.0f}s" if budget_s else "none"))
  unknown = set(only or ()) - set(ORDER)
  if unknown:
    raise ValueError(f"unknown experiment(s) {sorted(unknown)}; valid: {', '.join(ORDER)}")
  with compile_cache(Path(out) / "jax_cache"):
    _run_all(gc, repro, mps, seed, res, raw_dir, status, only, budget_s, t0, log)
  status["elapsed_s"] = round(time.perf_counter() - t0, 1)
  write_json(_status_path(res), status)
  return finish(out, cpu_reference, log)


def _run_all(gc, repro, mps, seed, res, raw_dir, status, only, budget_s, t0, log) -> None:
  est = dict(gc.estimate_s)
  for name in ORDER:
    if only is not None and name not in only:
      status["experiments"][name] = {"status": "skipped", "reason": "not selected (--only)"}
      continue
    path = raw_dir / f"{name}.json"
    if path.exists():
      doc = json.loads(path.read_text())
      if doc.get("repro_mode") == repro.mode and doc.get("seed") == seed:
        status["experiments"][name] = {"status": "reused"}
        continue
      raise FileExistsError(f"{path} holds a '{doc.get('repro_mode')}' run with seed {doc.get('seed')}; "
                            "use another --out (nothing was overwritten)")
    left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
    if left is not None and left < est.get(name, 0.0):
      status["experiments"][name] = {"status": "skipped", "reason": f"{left:.0f}s of the budget left; "
                                     f"it needs about {est.get(name, 0.0):.0f}s"}
      log(f"[{name}] skipped: {status['experiments'][name]['reason']}")
      continue
    log(f"[{name}]")
    status["experiments"][name] = {"status": "running"}
    write_json(_status_path(res), status)  # a kill leaves the settings and how far it got
    t1 = time.perf_counter()
    try:
      doc = _run_experiment(name, gc, repro, mps, seed, res, log)
      doc["repro_mode"], doc["seed"] = repro.mode, seed
      write_json(path, doc)
      status["experiments"][name] = {"status": "done", "seconds": round(time.perf_counter() - t1, 1)}
    except Exception as e:  # noqa: BLE001 - record it and go on with the next experiment
      status["experiments"][name] = {"status": "failed", "seconds": round(time.perf_counter() - t1, 1),
                                     "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-3000:]}
      log(f"[{name}] failed: {type(e).__name__}: {e}")
    status["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write_json(_status_path(res), status)  # progress survives a kill


def _run_experiment(name, gc, repro, mps, seed, res, log) -> dict:
  # Without MPS the GPU's 'processes' ignores shares: the curves and the clock's model come from
  # 'threads'. The dry run takes that path too (it spawns fewer workers).
  no_mps = not mps and (jax.default_backend() == "gpu" or repro.mode == "gpu-dry")
  if name == "gpu_sharing":
    return exp_gpu_sharing(gc, mps, log)
  if name == "trace_overlap":
    return exp_trace_overlap(gc, log, keep_dir=res / "traces")
  if name == "scale":  # one device, one process: the simulator's client updates per second there
    from mtfl_jax.experiments.bench_scale import bench_scale
    return bench_scale(quick=True, configs=[(1, 1)], work=gc.scale_work, rounds=gc.scale_rounds, repeats=1, log=log)
  if name == "vresource" and no_mps:
    from mtfl_jax.experiments.bench_cosched import measure_vr_curves
    return {**measure_vr_curves(repro.vr_tasks, repro.vr_grid, backend="threads", log=log),
            "note": "no MPS daemon: curves measured on 'threads'"}
  if name == "evidence" and no_mps:  # the clock's co-run model too, stored under 'threads'
    repro = dataclasses.replace(repro, clock_backend="threads")
  return reproduce.EXPERIMENTS[name](repro, seed, log)


def finish(out: str | Path, cpu_reference: str | Path | None = None, log=print) -> dict:
  """From whatever ``out/results/raw`` holds: figures and REPORT.md (when the four paper
  experiments are there), targets, FLOP/s, ``gpu_record.json`` and ``GPU_REPORT.md``. Measures
  nothing: also the step after a recording was stopped by its time limit."""
  res = Path(out) / "results"
  raw_dir = res / "raw"
  sp = _status_path(res)
  status = json.loads(sp.read_text()) if sp.exists() else {"experiments": {}}
  raw = {p.stem: json.loads(p.read_text()) for p in sorted(raw_dir.glob("*.json"))} if raw_dir.is_dir() else {}
  for name in ORDER:
    st = status["experiments"].setdefault(name, {"status": "done" if name in raw else "not run"})
    if name not in raw and st["status"] in ("done", "reused", "running", "not run"):
      st.update(status="not run", reason="stopped while it ran (time limit?)" if st["status"] == "running"
                else "no result: stopped (time limit?) before it started")
  if all(n in raw for n in reproduce.EXPERIMENTS):
    try:
      reproduce.reproduce(res, from_recorded=raw_dir, log=lambda m: None)
      status["figures"] = "drawn"
    except Exception as e:  # noqa: BLE001
      status["figures"] = f"failed: {type(e).__name__}: {e}"
  else:
    status["figures"] = "not drawn: missing " + ", ".join(n for n in reproduce.EXPERIMENTS if n not in raw)
  ref = Path(cpu_reference) if cpu_reference else _default_cpu_reference()
  cpu_fed = json.loads(ref.read_text()) if ref and ref.exists() else None
  kind = (status.get("env") or {}).get("device_kind", "")
  status["cpu_reference"] = str(ref) if cpu_fed else None
  status["targets"] = targets(raw, cpu_fed)
  status["flops"] = flops_table(raw, kind)
  write_json(sp, status)
  report = write_gpu_report(res, status, raw)
  log(report.read_text())
  return status


def _default_cpu_reference() -> Path:
  return Path(__file__).resolve().parents[2] / CPU_REFERENCE


def _fmt(v, spec=".2f"):
  return "n/a" if v is None else format(v, spec)


def write_gpu_report(res: Path, status: dict, raw: dict) -> Path:
  env = status.get("env") or {}
  smi = (env.get("nvidia_smi") or {}).get("gpus") or [{}]
  lines = ["# GPU recording", "",
           f"Device **{status.get('device', '?')}** ({smi[0].get('name', 'no nvidia-smi')}, driver "
           f"{smi[0].get('driver_version', 'n/a')}); JAX {(env.get('packages') or {}).get('jax')}; "
           f"MPS daemon running: {env.get('mps_daemon_running')} (script: "
           f"{(env.get('env') or {}).get('MTFL_MPS_STATUS', 'not run by the script')}); mode `{status.get('mode')}`; "
           f"{status.get('elapsed_s', '?')} s of a {status.get('budget_s') or 'unlimited'} s budget.", "",
           "| experiment | status | seconds | note |", "| --- | --- | --- | --- |"]
  for n in ORDER:
    st = status["experiments"].get(n, {})
    lines.append(f"| {n} | {st.get('status')} | {st.get('seconds', '')} | {st.get('reason') or st.get('error') or ''} |")
  lines += ["", "## Targets (recorded, not asserted)", "", "| target | threshold | value | pass |", "| --- | --- | --- | --- |"]
  for t in status["targets"]:
    extra = f" ({t['plan']})" if t.get("plan") else ""
    lines.append(f"| {t['target']} | {t['threshold']} | {_fmt(t['value'], '.3f')}{extra} | "
                 f"{'-' if t['pass'] is None else 'PASS' if t['pass'] else 'FAIL'} |")
  sh = raw.get("gpu_sharing")
  if sh:
    lines += ["", "## Sharing mechanisms (equal shares, vs sequential "
              f"{_fmt(_median(sh['sequential_s']), '.3f')} s)", "",
              "| variant | makespan s | speedup | capacity C |", "| --- | --- | --- | --- |"]
    for label, v in sh["variants"].items():
      if "error" in v:
        lines.append(f"| {label} | failed: {v['error'][:120]} | | |")
      else:
        lines.append(f"| {label} | {_median(v['makespan_s']):.3f} | {v['speedup_vs_sequential']:.2f}x | {v['capacity']:.2f} |")
    lines.append(f"\nPer-task streams in one fused program: {_fmt(sh.get('streams_gain'))}x over one stream.")
  tr = raw.get("trace_overlap")
  if tr:
    lines += ["", "## Kernel overlap from profiler traces", ""]
    for label, by_m in tr["runs"].items():
      if "error" in by_m:
        lines.append(f"- {label}: failed ({by_m['error'][:200]})")
        continue
      for by, m in by_m.items():
        val = f"{m['overlap_fraction']:.3f}" if m["measurable"] else f"not measurable: {m['reason']}"
        lines.append(f"- {label}, grouped by {by}: {val} ({m.get('source')})")
  fl = status.get("flops") or {}
  if fl.get("available"):
    lines += ["", "## FLOP/s", "", f"Measured matmul peak {fl['measured_matmul_peak_flops'] / 1e12:.2f} TFLOP/s; "
              + (f"nominal fp32 {fl['nominal_peaks']['fp32'] / 1e12:.0f}, tf32 {fl['nominal_peaks']['tf32'] / 1e12:.0f}, "
                 f"bf16 {fl['nominal_peaks']['bf16'] / 1e12:.0f} TFLOP/s ({fl['nominal_peaks']['source']})"
                 if fl["nominal_peaks"] else "no nominal peak known for this device"), ""]
    for t, r in fl["solo"].items():
      lines.append(f"- {t} solo: {r['achieved_flops'] / 1e9:.1f} GFLOP/s, {100 * r['of_measured_matmul_peak']:.2f}% of the measured peak")
    for s, pols in fl["corun"].items():
      lines.append(f"- {s} co-run: " + ", ".join(f"{p} {r['achieved_flops'] / 1e9:.1f} GFLOP/s" for p, r in pols.items()))
  fig = status.get("figures")
  lines += ["", "Figures and the paper experiments' report: REPORT.md." if fig == "drawn" else f"Figures: {fig}."]
  path = res / "GPU_REPORT.md"
  path.write_text("\n".join(lines) + "\n")
  return path


def pack(src: str | Path, tar_path: str | Path) -> Path:
  """``src`` as one gzipped tarball whose members start with ``gpu_record/``."""
  tar_path = Path(tar_path)
  tar_path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(tar_path, "w:gz") as tf:
    tf.add(str(src), arcname="gpu_record", filter=lambda m: None if "/jax_cache" in m.name else m)
  return tar_path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m mtfl_jax.experiments.gpu_record", description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="recording folder (results go to OUT/results)")
  p.add_argument("--dry-run", action="store_true", help="the tiny configuration, for a CPU")
  p.add_argument("--budget-s", type=float, help="skip experiments that would start past this many seconds")
  p.add_argument("--finish", action="store_true", help="only redo the report from what OUT holds")
  p.add_argument("--tar", help="pack OUT into this .tar.gz at the end")
  p.add_argument("--cpu-reference", help=f"the CPU's scale benchmark JSON (default {CPU_REFERENCE})")
  p.add_argument("--only", help=f"comma-separated experiments to run (default all: {','.join(ORDER)})")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.finish:
    finish(args.out, args.cpu_reference)
  else:
    only = tuple(n.strip() for n in args.only.split(",") if n.strip()) if args.only else None
    record(args.out, "dry" if args.dry_run else "gpu", args.budget_s, args.seed, args.cpu_reference, only)
  if args.tar:
    print(f"packed {pack(args.out, args.tar)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
