"""XLA CPU's library options against LeNet's client layouts: client updates per second of the
per-client loop and of ``map_patch/5`` (100 clients, 2 local steps) with each ``XLA_FLAGS``
setting, each setting in a fresh process (the flags are read when JAX starts), the settings
interleaved over ``--rounds`` rounds (ABCD ABCD ...), medians; the ratio to no flags beside.

    python benchmarks/xla_cpu_flags.py [--rounds 2] [--json FILE]

Each process runs :func:`mtfl_jax.experiments.bench_layouts.bench_layouts` on one point
(3 interleaved repeats inside it).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("", "--xla_cpu_use_xnnpack=true", "--xla_cpu_experimental_xnn_fusion_type=dot",
            "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce", "--xla_cpu_use_onednn=true")
LAYOUTS = ("loop", "map_patch/5")
CHILD = """
import json, sys
from mtfl_jax.experiments.bench_layouts import bench_layouts
out = bench_layouts(points=[("mnist_lenet", 100, {layouts!r})], steps=2, repeats=3, log=lambda m: None)
print("RESULT " + json.dumps({{p["layout"]: p["client_updates_per_s"] for p in out["points"]}}))
"""


def run_setting(flags: str) -> dict:
  env = {**os.environ, "XLA_FLAGS": flags}
  root = str(Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  out = subprocess.run([sys.executable, "-c", CHILD.format(layouts=LAYOUTS)], env=env, capture_output=True,
                       text=True, timeout=900)
  line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
  if out.returncode or line is None:
    raise RuntimeError(f"XLA_FLAGS={flags!r}: exited {out.returncode}:\n{out.stderr[-1500:]}")
  return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the settings (default 2)")
  ap.add_argument("--json", help="write the result here")
  args = ap.parse_args(argv)
  from mtfl_jax.device import device_name
  load = os.getloadavg()
  runs = {s: [] for s in SETTINGS}
  t0 = time.perf_counter()
  for r in range(args.rounds):
    for s in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
      runs[s].append(run_setting(s))
      print(f"  round {r + 1}: {s or '(no flags)'}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[s][-1].items()),
            flush=True)
  med = {s: {lay: statistics.median(x[lay] for x in runs[s]) for lay in LAYOUTS} for s in SETTINGS}
  print(f"\nmnist_lenet, 100 clients, 2 local steps; client updates per second, medians of {args.rounds} processes")
  print(f"{'XLA_FLAGS':<58}" + "".join(f"{lay:>14}{'x none':>8}" for lay in LAYOUTS))
  for s in SETTINGS:
    print(f"{s or '(none)':<58}" + "".join(f"{med[s][lay]:>14.1f}{med[s][lay] / med[''][lay]:>8.2f}" for lay in LAYOUTS))
  print(f"device: {device_name()}; load average {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
  if args.json:
    Path(args.json).write_text(json.dumps({
        "benchmark": "xla_cpu_flags", "device": device_name(), "task": "mnist_lenet", "clients": 100, "steps": 2,
        "rounds": args.rounds, "load_average_start": load, "load_average_end": os.getloadavg(),
        "wall_s": round(time.perf_counter() - t0, 1), "runs": runs, "median": med,
        "ratio_vs_no_flags": {s: {lay: med[s][lay] / med[""][lay] for lay in LAYOUTS} for s in SETTINGS}}, indent=1))
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
