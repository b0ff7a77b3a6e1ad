"""The client-layout benchmark: client updates per second of each way of laying one task's
clients over compiled programs (:mod:`mtfl_jax.client_layouts`), side by side in one process.

A *client update* is one client's local training for a round: ``steps`` local steps of the
task's batch size from the global model (a fresh optimizer state and the client's own rng
key), then its delta. Every layout runs the same clients (the same sample ids and keys) and
the round's aggregate, the mean delta, is compared with the reference's (``max_abs_diff``).

The reference, ``loop``, is what a per-client simulator does: a Python loop over clients and
steps, one jitted train step per call, each batch gathered on the host (numpy) and sent. The
other layouts keep the training set on the device and gather batches there by index; a
layout ``name/k`` runs the clients in chunks of ``k`` (one program call per chunk, the last
padded with masked clients), ``name`` alone in one chunk of all the clients.

Per point: the median wall time over interleaved repeats (every layout of a repeat runs
before any layout of the next, so drift of a shared machine hits them alike), client
updates per second, the speedup over ``loop``, MFU (useful FLOPs: XLA's count of one plain
train step times the steps, over the matmul peak measured in the same repeats) and the
arithmetic intensity XLA reports for the layout's own program (FLOPs / bytes accessed),
with the machine's roofline (peak, a measured memory bandwidth, the ridge between them).

Example::

    out = bench_layouts(quick=True)
    [(p["layout"], p["speedup_vs_loop"]) for p in out["points"] if p["task"] == "mnist_lenet"]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtfl_jax.client_layouts import clients_program
from mtfl_jax.device import device_name
from mtfl_jax.profiling import xla_costs
from mtfl_jax.files import write_json
from mtfl_jax.roofline import measure_bandwidth
from mtfl_jax.tasks import get_task
from mtfl_jax.timing import time_calls
from mtfl_jax.train import TrainState, init_variables, make_train_step

SEED = 0
TARGETS = {"lenet_100_vs_loop": 4.0, "lenet_mfu": 0.30, "mlp_1000_vs_loop": 2.0}


def _modes(quick: bool) -> dict:
  if quick:
    return {"steps": 2, "repeats": 2, "points": [
        ("mnist_lenet", 100, ("loop", "loop_patch", "map_patch/25")),
        ("digits_mlp", 100, ("loop", "vmap/100")),
        ("digits_mlp", 1000, ("loop", "vmap/100"))]}
  return {"steps": 3, "repeats": 3, "points": [
      ("mnist_lenet", 100, ("loop", "loop_dev", "loop_patch", "vmap/10", "vmap_patch/100", "vmap_patch/10",
                            "vmap_patch/2", "map/10", "map_patch/100", "map_patch/25", "map_patch/5",
                            "unrolled/2", "unrolled_patch/2")),
      ("digits_mlp", 100, ("loop", "loop_dev", "vmap/100", "vmap/25", "map/100")),
      ("digits_mlp", 1000, ("loop", "loop_dev", "vmap/1000", "vmap/250", "vmap/100", "vmap/50", "map/1000",
                            "map/100"))]}


def _layout_name(spec: str) -> tuple[str, int | None]:
  """'vmap_patch/10' -> ('vmap_patch', 10); 'loop_dev' is the layout 'loop' (one program per
  client, batches gathered on the device)."""
  name, _, k = spec.partition("/")
  return ("loop" if name == "loop_dev" else name), (int(k) if k else None)


class _Point:
  """One (task, clients) point: its data on the device, the clients' ids and keys, the global
  model, and a runner per layout returning the round's mean delta."""

  def __init__(self, task, clients: int, steps: int):
    self.task, self.clients, self.steps = task, clients, steps
    ds = task.load_data(allow_synthetic=True)
    self.data_source = ds.source
    self.xh, self.yh = np.asarray(ds.x_train), np.asarray(ds.y_train)
    self.x, self.y = jax.device_put(self.xh), jax.device_put(self.yh)
    rng = np.random.default_rng(SEED)
    self.ids = rng.integers(0, len(self.xh), (clients, steps, task.batch_size)).astype(np.int32)
    self.keys = np.asarray(jax.vmap(jax.random.PRNGKey)(np.arange(clients, dtype=np.uint32)))
    self.params, self.model_state = init_variables(task, SEED)
    self.step = make_train_step(task)
    tx = task.optimizer

    def init(gp, ms, key):
      return TrainState(step=jnp.zeros((), jnp.int32), params=gp, opt_state=tx.init(gp), model_state=ms, rng=key)

    self._init_one = jax.jit(init)
    self._init_many = jax.jit(jax.vmap(init, in_axes=(None, None, 0)))
    self._add_one = jax.jit(lambda acc, st, gp: jax.tree.map(lambda a, p, g: a + (p - g), acc, st.params, gp))
    self._add_many = jax.jit(lambda acc, st, gp, w: jax.tree.map(
        lambda a, p, g: a + jnp.tensordot(w, p - g, axes=1), acc, st.params, gp))
    self._step = jax.jit(self.step)
    self.programs: dict = {}
    self.costs: dict = {}

  def _zeros(self):
    return jax.tree.map(jnp.zeros_like, self.params)

  def run_reference(self):
    """The per-client simulator's loop: host batches, one jitted step per call."""
    acc = self._zeros()
    for c in range(self.clients):
      state = self._init_one(self.params, self.model_state, self.keys[c])
      for s in range(self.steps):
        b = self.ids[c, s]
        state, _ = self._step(state, {"image": self.xh[b], "label": self.yh[b]})
      acc = self._add_one(acc, state, self.params)
    return jax.tree.map(lambda a: a / self.clients, acc)

  def run_layout(self, spec: str):
    layout, k = _layout_name(spec)
    k = k or self.clients
    if spec not in self.programs:
      self.programs[spec] = clients_program(self.step, layout)
    program = self.programs[spec]
    acc = self._zeros()
    for c0 in range(0, self.clients, k):
      idx = np.arange(c0, c0 + k) % self.clients  # the last chunk padded with masked repeats
      live = (np.arange(c0, c0 + k) < self.clients)
      mask = np.broadcast_to(live[:, None], (k, self.steps))
      states = self._init_many(self.params, self.model_state, self.keys[idx])
      states = program(states, self.x, self.y, self.ids[idx], mask)
      acc = self._add_many(acc, states, self.params, live.astype(np.float32))
    return jax.tree.map(lambda a: a / self.clients, acc)

  def run(self, spec: str):
    return self.run_reference() if spec == "loop" else self.run_layout(spec)

  def program_costs(self, spec: str) -> dict:
    """XLA's FLOPs and bytes of the program that does the layout's training work (the plain
    step for the reference)."""
    if spec not in self.costs:
      state = jax.eval_shape(lambda: self._init_one(self.params, self.model_state, self.keys[0]))
      if spec == "loop":
        b = self.ids[0, 0]
        compiled = self._step.lower(state, {"image": self.xh[b], "label": self.yh[b]}).compile()
      else:
        layout, k = _layout_name(spec)
        k = k or self.clients
        states = jax.eval_shape(lambda: self._init_many(self.params, self.model_state, self.keys[:k]))
        program = self.programs.get(spec) or clients_program(self.step, layout)
        fn = program.one if hasattr(program, "one") else program
        args = ((state, self.x, self.y, self.ids[0], np.ones(self.steps, bool)) if hasattr(program, "one")
                else (states, self.x, self.y, self.ids[:k], np.ones((k, self.steps), bool)))
        compiled = fn.lower(*args).compile()
      self.costs[spec] = xla_costs(compiled)
    return self.costs[spec]


def _peak_now(n: int = 2048) -> float:
  """The fp32 matmul FLOP/s right now (best of 3): measured in every repeat, beside the
  layouts, so that MFU is against the peak under the same load."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda v: v @ v)
  return 2.0 * n ** 3 / min(time_calls(lambda: f(a), repeats=3))


def bench_layouts(quick: bool = False, points: Sequence | None = None, steps: int | None = None,
                  repeats: int | None = None, log=print) -> dict:
  """Runs the benchmark (see the module docstring); returns the JSON-ready result."""
  mode = _modes(quick)
  points = points or mode["points"]
  steps = steps or mode["steps"]
  repeats = repeats or mode["repeats"]
  t_start = time.perf_counter()
  bandwidths = [measure_bandwidth.__wrapped__(256, 3)]
  peaks: list[float] = []
  runs = []  # (point, specs, times, deltas, compile seconds)
  for task_name, clients, specs in points:
    task = get_task(task_name)
    pt = _Point(task, clients, steps)
    specs = tuple(dict.fromkeys(specs))
    deltas, compile_s = {}, {}
    for spec in specs:  # the first call compiles (and warms up)
      t0 = time.perf_counter()
      deltas[spec] = jax.tree.map(np.asarray, pt.run(spec))
      compile_s[spec] = time.perf_counter() - t0
      log(f"  {task_name} x{clients}: {spec} first call {compile_s[spec]:.1f}s")
    runs.append((pt, specs, {s: [] for s in specs}, deltas, compile_s))
  flops_step = {}
  for r in range(repeats):
    peaks.append(_peak_now())
    for pt, specs, times, _, _ in runs:
      order = specs if r % 2 == 0 else tuple(reversed(specs))
      for spec in order:
        t0 = time.perf_counter()
        jax.block_until_ready(pt.run(spec))
        times[spec].append(time.perf_counter() - t0)
    log(f"repeat {r + 1}/{repeats} done ({time.perf_counter() - t_start:.0f}s)")
  bandwidths.append(measure_bandwidth.__wrapped__(256, 3))
  peak = statistics.median(peaks)
  bandwidth = statistics.median(bandwidths)
  out_points = []
  for pt, specs, times, deltas, compile_s in runs:
    name = pt.task.name
    if name not in flops_step:
      flops_step[name] = pt.program_costs("loop")["flops"]
    useful = flops_step[name] * pt.steps  # per client update
    ref = deltas["loop"]
    t_ref = statistics.median(times["loop"])
    for spec in specs:
      t = statistics.median(times[spec])
      costs = pt.program_costs(spec)
      diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(deltas[spec]), jax.tree.leaves(ref)))
      out_points.append({
          "task": name, "clients": pt.clients, "steps": pt.steps, "batch_size": pt.task.batch_size,
          "layout": spec, "seconds": t, "seconds_all": times[spec], "first_call_s": compile_s[spec],
          "client_updates_per_s": pt.clients / t, "speedup_vs_loop": t_ref / t,
          "useful_flops_per_update": useful, "achieved_flops": useful * pt.clients / t,
          "mfu": useful * pt.clients / t / peak,
          "program_flops": costs["flops"], "program_bytes": costs["bytes"],
          "intensity": costs["flops"] / costs["bytes"] if costs["bytes"] else None,
          "max_abs_diff": diff, "data": pt.data_source})
  return {"device": device_name(), "jax": jax.__version__, "quick": quick, "steps": steps, "repeats": repeats,
          "peak_flops": peak, "peak_flops_all": peaks, "bandwidth": bandwidth, "bandwidth_all": bandwidths,
          "ridge": peak / bandwidth, "targets": TARGETS, "points": out_points, "wall_s": time.perf_counter() - t_start}


def table(out: dict) -> str:
  head = (f"{'task':<12}{'clients':>8} {'layout':<18}{'upd/s':>9}{'x loop':>8}{'GFLOP/s':>9}{'MFU %':>7}"
          f"{'FLOP/B':>8}{'max|dAgg|':>11}{'1st s':>7}")
  rows = [head, "-" * len(head)]
  for p in out["points"]:
    inten = f"{p['intensity']:.2f}" if p["intensity"] else "-"
    rows.append(f"{p['task']:<12}{p['clients']:>8} {p['layout']:<18}{p['client_updates_per_s']:>9.1f}"
                f"{p['speedup_vs_loop']:>8.2f}{p['achieved_flops'] / 1e9:>9.2f}{100 * p['mfu']:>7.1f}{inten:>8}{p['max_abs_diff']:>11.1e}"
                f"{p['first_call_s']:>7.1f}")
  rows.append(f"device: {out['device']}; {out['steps']} local steps per client update, median of "
              f"{out['repeats']} interleaved repeats; matmul peak {out['peak_flops'] / 1e9:.1f} GFLOP/s, "
              f"memory bandwidth {out['bandwidth'] / 1e9:.1f} GB/s (ridge {out['ridge']:.1f} FLOP/B), "
              "both measured in this run")
  return "\n".join(rows)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--quick", action="store_true", help="fewer layouts, 2 local steps, 2 repeats (about a minute)")
  ap.add_argument("--json", help="write the result here")
  ap.add_argument("--repeats", type=int)
  args = ap.parse_args(argv)
  out = bench_layouts(quick=args.quick, repeats=args.repeats)
  print(table(out))
  if args.json:
    write_json(args.json, out)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
