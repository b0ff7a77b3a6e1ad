"""Scale-out: the sharded client simulator on several CPU devices, and ``federate`` in one and in
several processes (jax.distributed).

A process's JAX device count is fixed when JAX starts, so everything that needs more than one
device runs in a subprocess: a helper script (a string here) that calls
``mtfl_jax.distributed.use_cpu_devices`` first thing and prints its measurements as JSON, or the
command line itself. The expensive runs are module fixtures shared by several tests.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mtfl_jax.__main__ import main

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5  # max abs difference, relative to the largest magnitude of the reference


def _env():
  return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _python(script: str, timeout: int = 300) -> dict:
  """Runs ``script`` in a fresh interpreter; its last stdout line is JSON."""
  r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                     timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


# =========================================================================== on 3 CPU devices
# The batched executor against the single-device loop executor on meshes of 1, 2 and 3 of the 3
# devices (5 clients: 3 devices pad), and run_federated with simulator="sharded" on 2 devices
# against simulator="loop" (counting compilations per round).
ON_DEVICES = r'''
from mtfl_jax import distributed
distributed.use_cpu_devices(3)  # first thing: a process's device count is fixed when JAX starts

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import optax
from jax import monitoring

import mtfl_jax as mt
from mtfl_jax.federated import (Callback, ClientWork, FedConfig, FedTask, accumulation_norm, build_federation,
                                client_seed, fedavg_program, make_algorithm, run_federated)
from mtfl_jax.federated.executors import BatchedExecutor, LoopExecutor, client_mesh
from mtfl_jax.train import init_variables
from mtfl_jax.vresource import VRModel

backend_compiles = []
monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: backend_compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def rel_err(got, want):
  # max |got - want| over all leaves, relative to max |want|
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want) > 0
  num = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in zip(got, want))
  return num / max(max(float(np.max(np.abs(np.asarray(b, np.float64)))) for b in want), 1e-30)


def one_by_one(ft, bc, works):
  # the reference: every client alone in the loop executor (weight 1), combined by hand in float64
  ex = LoopExecutor(ft, fedavg_program(ft.task))
  return [ex.run(bc, [w], {"delta": np.ones(1), "model_state": np.ones(1)}).sums for w in works]


def weighted(per, key, w):
  return jax.tree.map(lambda *a: sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, a)), *[x[key] for x in per])


def poisoned(ft, client):
  # the same task with one more training sample of huge values, which only ``client`` trains
  # on: its update overflows to inf/NaN in the real program (no test hook in the package)
  ds = ft.data
  x = np.concatenate([ds.x_train, np.full((1,) + ds.x_train.shape[1:], 3e38, np.float32)])
  y = np.concatenate([ds.y_train, ds.y_train[:1]])
  bad = mt.Dataset(ds.name + "_poisoned", x, y, ds.x_test, ds.y_test, ds.num_classes)
  shards = list(ft.shards)
  shards[client] = np.array([len(x) - 1])
  return FedTask(ft.task, ft.index, bad, tuple(shards), ft.model_bytes)


def compare(ft, bc, works, devices, per_device=None):
  task = ft.task
  n, steps = [len(w.indices) for w in works], [w.steps for w in works]
  nominal = [s + 2 * (i % 2) for i, s in enumerate(steps)]  # the coordinator cut some clients' work
  per = one_by_one(ft, bc, works)
  sim = BatchedExecutor(ft, fedavg_program(task), client_mesh(devices), per_device=per_device)
  out = {"devices": sim.devices, "inner": sim.inner, "k": sim.chunk_size(len(works)), "per_device": per_device}
  w = make_algorithm(task, "fedavg").weights(n, steps, nominal)
  got = sim.run(bc, works, w)
  p = np.asarray(n, np.float64) / sum(n)
  out["fedavg"] = rel_err(got.sums["delta"], weighted(per, "delta", p))
  out["clients"] = list(got.clients)
  if jax.tree.leaves(bc["model_state"]):
    out["model_state"] = rel_err(got.sums["model_state"], weighted(per, "model_state", p))
    out["model_state_moved"] = rel_err(got.sums["model_state"], bc["model_state"])
  rho = task.momentum or 0.0
  wn = make_algorithm(task, "fednova_nominal").weights(n, steps, nominal)
  got = sim.run(bc, works, wn)
  a = np.array([accumulation_norm(s, rho) for s in steps])
  a_nom = np.array([accumulation_norm(s, rho) for s in nominal])
  out["fednova"] = rel_err(got.sums["delta"], weighted(per, "delta", p * a_nom / a))
  out["fednova_vs_fedavg"] = rel_err(got.sums["delta"], weighted(per, "delta", p))  # the weights matter
  bad = poisoned(ft, works[2].client)
  got = BatchedExecutor(bad, fedavg_program(task), client_mesh(devices), per_device=per_device).run(
      bc, [dataclasses.replace(wk, indices=bad.shards[wk.client]) for wk in works], w)
  out["finite"] = {str(c): bool(v) for c, v in zip(got.clients, got.finite)}
  out["poisoned"] = works[2].client
  out["delta_finite"] = bool(all(np.isfinite(x).all() for x in jax.tree.leaves(got.sums["delta"])))
  return out


def works_of(cfg, ft, steps):
  return [ClientWork(c, ft.shards[c], s, client_seed(cfg.seed, 0, 0, c)) for c, s in enumerate(steps)]


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16, use_bias=False)(x.reshape((x.shape[0], -1)))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


rng = np.random.default_rng(0)
y = rng.integers(0, 3, 400)
x = (3 * np.eye(3, 4, dtype=np.float32)[y] + rng.normal(size=(400, 4))).astype(np.float32)
BN = mt.Task("scale_bn", BNNet(), mt.Dataset.from_arrays("scale_blobs", x[:300], y[:300], x[300:], y[300:]),
             learning_rate=0.05, momentum=0.9, batch_size=16, rngs=("dropout",), mutable=("batch_stats",),
             train_kwargs={"train": True}, eval_kwargs={"train": False})

res = {"devices": len(jax.devices()), "cases": [], "federated": {}}
# mnist_lenet on 2 devices runs in the federated "none" comparison below
for t, steps, meshes in (("digits_mlp", [3, 5, 1, 7, 4], (1, 2, 3)), ("mnist_lenet", [2, 3, 1, 2, 3], (1, 3)),
                         (BN, [3, 1, 4, 2, 3], (3,))):
  cfg = FedConfig(tasks=(t,), num_clients=5, clients_per_round=5, alpha=1.0, seed=4)
  fed = build_federation(cfg)
  ft = fed.tasks[0]
  params, model_state = init_variables(ft.task, cfg.seed)
  bc = {"params": params, "model_state": model_state}
  works = works_of(cfg, ft, steps)
  for d in meshes:
    res["cases"].append({"task": ft.name, **compare(ft, bc, works, d)})
  if ft.name in ("digits_mlp", "mnist_lenet"):  # streamed in chunks of one client per device, the last one padded
    res["cases"].append({"task": ft.name, **compare(ft, bc, works, 2 if ft.name == "digits_mlp" else 3, 1)})

MODEL = VRModel({"digits_mlp": 2e-4, "mnist_lenet": 4e-3}, {"digits_mlp": 0.4, "mnist_lenet": 0.8},
                {"digits_mlp": 1.0, "mnist_lenet": 1.0})
FLAT = lambda models: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(models)}


class Record(Callback):
  # after each round: XLA compilations so far, and each task executor's mesh and chunk size
  def __init__(self):
    self.after, self.mesh = {}, {}

  def after_round(self, run, row):
    self.after[row["round"]] = {"backend_compiles": len(backend_compiles)}
    self.mesh = {rt.name: [getattr(rt.executor, "devices", 1), getattr(rt.executor, "k", None)]
                 for rt in run.runtimes}


for policy, cfg in (
    ("none", FedConfig(tasks=("digits_mlp", "mnist_lenet"), num_clients=5, clients_per_round=4, rounds=2,
                       local_epochs=0.25, alpha=1.0, seed=3, policy="none")),
    # full, with deadline_quantile 1: no client is dropped (6 clients every round: the same chunk
    # shape), and every client's work is scaled: largest workloads 16, 12, 16, 18 steps
    ("full", FedConfig(tasks=("digits_mlp",), num_clients=12, clients_per_round=6, rounds=4, local_epochs=1.5,
                       alpha=0.5, quantity_sigma=1.0, deadline_quantile=1.0, seed=1, policy="full"))):
  runs = {}
  for sim in ("loop", "sharded"):
    c = dataclasses.replace(cfg, simulator=sim, devices=2 if sim == "sharded" else None)
    rec = Record()
    r = run_federated(c, MODEL, progress=False, callbacks=[rec])
    runs[sim] = {"params": FLAT(r.state.models), "history": r.history, "after": rec.after, "mesh": rec.mesh}
  loop, shd = runs["loop"], runs["sharded"]
  start = FLAT({ft.name: make_algorithm(ft.task).init(*init_variables(ft.task, cfg.seed + ft.index))
                for ft in build_federation(cfg).tasks})
  strip = lambda h: [{k: v for k, v in row.items() if k != "accuracy"} for row in h]
  assert loop["params"].keys() == shd["params"].keys() == start.keys()
  res["federated"][policy] = {
      "rel_err": {k: rel_err(shd["params"][k], v) for k, v in loop["params"].items()},
      "moved": {k: float(np.max(np.abs(v - start[k]))) for k, v in loop["params"].items() if ".params" in k},
      "same_history": strip(loop["history"]) == strip(shd["history"]),
      "accuracy": [[h.get("accuracy") for h in runs[s]["history"]] for s in ("loop", "sharded")],
      "largest_workload": [{t: max(w[t] for w in h["workloads"].values()) for t in cfg.tasks}
                           for h in shd["history"]],
      "failures": [h["failures"] for h in shd["history"]],
      "after": shd["after"], "mesh": shd["mesh"]}
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def on_devices():
  return _python(ON_DEVICES)


def test_sharded_aggregate_equals_the_loop_simulator_on_1_2_3_devices(on_devices):
  assert on_devices["devices"] == 3
  cases = {(c["task"], c["devices"], c["per_device"]): c for c in on_devices["cases"]}
  assert {(t, d) for t, d, _ in cases} == {("digits_mlp", 1), ("digits_mlp", 2), ("digits_mlp", 3),
                                           ("mnist_lenet", 1), ("mnist_lenet", 3), ("scale_bn", 3)}
  for key, c in cases.items():
    assert c["inner"] == ("unrolled" if key[0] == "mnist_lenet" else "vmap"), key
    assert c["fedavg"] < TOL and c["fednova"] < TOL, (key, c["fedavg"], c["fednova"])
    assert c["fednova_vs_fedavg"] > 100 * TOL, key  # FedNova's weights are not FedAvg's: both were checked
    assert c["clients"] == [0, 1, 2, 3, 4], key  # in the order given, not the sorted chunk order
  # padding and streaming happened: 5 clients in chunks of devices x k
  assert cases[("digits_mlp", 3, None)]["k"] == 2  # one chunk of 6, one slot padded
  assert cases[("digits_mlp", 2, 1)]["k"] == 1  # three chunks of 2, the last one padded
  assert cases[("mnist_lenet", 3, None)]["k"] == 2  # one chunk of 6, one slot padded
  assert cases[("mnist_lenet", 3, 1)]["k"] == 1  # chunks of 3 and 2 (+1 padded)


def test_sharded_model_state_is_the_sample_weighted_mean(on_devices):
  (c,) = [c for c in on_devices["cases"] if c["task"] == "scale_bn"]
  assert c["model_state"] < TOL
  assert c["model_state_moved"] > 1e-3  # the BatchNorm statistics did change


def test_sharded_finite_flag_names_the_poisoned_client(on_devices):
  for c in on_devices["cases"]:
    assert c["finite"] == {str(i): i != c["poisoned"] for i in range(5)}, (c["task"], c["devices"])
    assert not c["delta_finite"]  # the poisoned delta reached the sum: the flag is what names it


@pytest.mark.parametrize("policy", ["none", "full"])
def test_run_federated_sharded_on_2_devices_equals_loop(on_devices, policy):
  f = on_devices["federated"][policy]
  assert all(d == 2 for d, _ in f["mesh"].values())
  worst = max(f["rel_err"], key=f["rel_err"].get)
  assert f["rel_err"][worst] < TOL, (worst, f["rel_err"][worst])
  assert min(f["moved"].values()) > 1e-3  # every parameter trained
  assert f["same_history"]  # the same clients, workloads and clock
  assert f["accuracy"][0] == f["accuracy"][1]
  if policy == "full":  # the workloads did vary (the next test depends on it)
    assert len({max(w.values()) for w in f["largest_workload"]}) > 1
  else:
    assert set(f["mesh"]) == {"digits_mlp", "mnist_lenet"}


def test_the_chunk_shape_is_the_same_every_round(on_devices):
  f = on_devices["federated"]["full"]
  assert f["failures"] == [[]] * 4 and f["mesh"]["digits_mlp"] == [2, 4]  # same chunk shape every round


def test_rounds_within_a_step_bucket_compile_nothing(on_devices):
  # JAX's own count: rounds 1 and 2 (largest workloads 12 and 16 steps, round 0's bucket of 16)
  f = on_devices["federated"]["full"]
  assert [w["digits_mlp"] for w in f["largest_workload"][:3]] == [16, 12, 16]
  compiled = [f["after"][str(r)]["backend_compiles"] for r in range(3)]
  assert compiled[0] > 0 and compiled[2] == compiled[0], compiled


def test_no_compilation_after_the_first_round(on_devices):
  # round 3's largest client needs more than one 16-step window of batch indices: the step
  # program's inputs keep their shape (the indices go to the devices window by window)
  f = on_devices["federated"]["full"]
  assert f["largest_workload"][3]["digits_mlp"] > 16
  compiled = [f["after"][str(r)]["backend_compiles"] for r in range(4)]
  assert compiled[3] == compiled[0], compiled


# =========================================================================== the command line
FLAGS = ["--tasks", "digits_mlp", "--clients", "6", "--seed", "0", "--policy", "none"]


def _federate(workdir, *args, timeout=240):
  return subprocess.run([sys.executable, "-m", "mtfl_jax", "federate", "--workdir", str(workdir), *FLAGS, *args],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _checkpoint(workdir: Path, step: int):
  """(params by path, history) of a workdir's checkpoint of ``step``."""
  import orbax.checkpoint as ocp
  opts = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager((workdir / "checkpoints").resolve(), options=opts) as mgr:
    r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), history=ocp.args.JsonRestore()))
  params = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(r.state["models"])}
  return params, list(r.history)


def _steps(workdir: Path) -> list:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _close(a: dict, b: dict):
  assert a.keys() == b.keys() and a
  for k in a:
    scale = max(float(np.max(np.abs(b[k]))), 1e-30)
    assert float(np.max(np.abs(a[k] - b[k]))) <= TOL * scale, k


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """``federate --devices 2``: 2 rounds in ``w``, then the same workdir copied to ``resumed``
  and rerun with ``--rounds 3``."""
  root = tmp_path_factory.mktemp("one_process")
  w, resumed = root / "w", root / "resumed"
  first = _federate(w, "--devices", "2", "--rounds", "2")
  assert first.returncode == 0, first.stderr[-3000:]
  shutil.copytree(w, resumed)
  again = _federate(resumed, "--devices", "2", "--rounds", "3")
  assert again.returncode == 0, again.stderr[-3000:]
  return {"w": w, "resumed": resumed, "first": first, "again": again}


def test_federate_writes_history_figures_and_checkpoints(one_process):
  w, out = one_process["w"], one_process["first"]
  assert "simulator sharded on 2 device(s) in 1 process(es)" in out.stdout
  assert "done: 2 round(s)" in out.stdout and "Traceback" not in out.stderr
  doc = json.loads((w / "history.json").read_text())
  assert doc["processes"] == 1 and len(doc["devices"]) == 2 and doc["config"]["simulator"] == "sharded"
  rows, s = doc["history"], doc["summary"]
  assert [r["round"] for r in rows] == [0, 1]
  # every summary number, recomputed from the rows
  assert s["rounds"] == len(rows)
  assert s["virtual_time_s"] == rows[-1]["virtual_time_s"] == pytest.approx(sum(r["round_time_s"] for r in rows))
  assert s["work_s"] == pytest.approx(sum(r["work_s"] for r in rows))
  assert s["fl_throughput"] == pytest.approx(s["work_s"] / s["virtual_time_s"])
  assert s["final_accuracy"] == rows[-1]["accuracy"] and 0 < s["final_accuracy"]["digits_mlp"] <= 1
  idle = [sum(r["idle_s"].values()) / (len(r["idle_s"]) * r["round_time_s"]) for r in rows]
  assert s["mean_idle_fraction"] == pytest.approx(float(np.mean(idle))) and 0 < s["mean_idle_fraction"] < 1
  for fig in ("accuracy.png", "idle.png"):
    data = (w / fig).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, fig
  assert _steps(w) == ["1", "2"]
  params, history = _checkpoint(w, 2)
  assert history == rows  # the checkpoint's history is the one written


def test_federate_rerun_resumes_from_its_checkpoint(one_process):
  w, resumed = one_process["w"], one_process["resumed"]
  before = json.loads((w / "history.json").read_text())["history"]
  after = json.loads((resumed / "history.json").read_text())["history"]
  assert [r["round"] for r in after] == [0, 1, 2]
  # rounds 0 and 1 are the checkpoint's, on the checkpoint's clock: a run started over would
  # have calibrated its clock again (other virtual times)
  assert after[:2] == before
  assert _steps(resumed) == ["2", "3"]
  assert "done: 3 round(s)" in one_process["again"].stdout and "resuming" in one_process["again"].stdout


def _children_of(pid: int) -> dict:
  """{pid: argv} of the live child processes of ``pid`` (from /proc)."""
  out = {}
  for d in os.listdir("/proc"):
    if d.isdigit():
      try:
        stat = Path(f"/proc/{d}/stat").read_text()
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
          out[int(d)] = Path(f"/proc/{d}/cmdline").read_text().split("\0")
      except (OSError, ValueError, IndexError):
        pass
  return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker's pid in /proc")
def test_two_processes_equal_one_survive_a_dead_worker_and_resume(one_process, tmp_path):
  w = tmp_path / "w"
  # 1. 2 rounds in 2 processes of one device each: the 1-process, 2-device run's numbers
  two = _federate(w, "--processes", "2", "--rounds", "2")
  assert two.returncode == 0, two.stderr[-3000:]
  assert "simulator sharded on 2 device(s) in 2 process(es)" in two.stdout
  assert two.stdout.count("federate:") == 1 and two.stdout.count("done:") == 1  # process 0 alone prints
  doc = json.loads((w / "history.json").read_text())
  assert doc["processes"] == 2 and len(doc["devices"]) == 2
  ref = json.loads((one_process["w"] / "history.json").read_text())
  assert doc["summary"]["final_accuracy"] == ref["summary"]["final_accuracy"]
  assert [r["workloads"] for r in doc["history"]] == [r["workloads"] for r in ref["history"]]
  # the same clock: the launcher resolves the model before pinning the processes to their cores
  # (pinned, process 0 saw a 1-core machine and calibrated another model)
  assert [r["virtual_time_s"] for r in doc["history"]] == [r["virtual_time_s"] for r in ref["history"]]
  params2, _ = _checkpoint(w, 2)
  _close(params2, _checkpoint(one_process["w"], 2)[0])
  # process 0 alone wrote: one set of steps, nothing half-written
  assert _steps(w) == ["1", "2"] and not (w / "checkpoints.unreadable").exists()

  # 2. the rerun's worker (process 1) dies: the launcher stops process 0 at once and says which died
  p = subprocess.Popen([sys.executable, "-m", "mtfl_jax", "federate", "--workdir", str(w), *FLAGS,
                        "--processes", "2", "--rounds", "3"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  kids = {}
  try:
    for line in p.stdout:  # process 0's output: both processes joined, the run is under way
      if line.startswith("federate:"):
        break
    kids = _children_of(p.pid)
    worker = [pid for pid, argv in kids.items() if argv[argv.index("--process-id") + 1] == "1"]
    assert len(kids) == 2 and len(worker) == 1, kids
    os.kill(worker[0], 9)
    t0 = time.perf_counter()
    _, err = p.communicate(timeout=60)
    stopped_in = time.perf_counter() - t0
  finally:
    if p.poll() is None:  # the test failed: leave no process behind
      for pid in [*kids, p.pid]:
        try:
          os.kill(pid, 9)
        except ProcessLookupError:
          pass
      p.wait()
  assert p.returncode == 2, err[-3000:]
  assert err.strip().splitlines()[-1] == "error: process 1 of 2 was killed by signal 9; the other processes were stopped"
  # no traceback; the launcher's line names the cause last. Before it, process 0 may have said in
  # one line of its own what it saw of the lost peer (gloo: "Connection refused"), and gloo may
  # have logged it; which, depends on the timing (CI saw both).
  errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
  assert "Traceback" not in err and len(errors) <= 2 and errors[-1] == (
    "error: process 1 of 2 was killed by signal 9; the other processes were stopped"), err[-3000:]
  assert stopped_in < 8, stopped_in  # not JAX's heartbeat timeout, nor the launcher's grace period
  assert not _children_of(p.pid) and not [pid for pid in kids if Path(f"/proc/{pid}").exists()]
  assert _steps(w) == ["1", "2"]  # the last checkpoint is intact
  _close(_checkpoint(w, 2)[0], params2)

  # 3. rerun: 2 processes resume from round 2, on the clock the run started with
  res = _federate(w, "--processes", "2", "--rounds", "3")
  assert res.returncode == 0, res.stderr[-3000:]
  rows = json.loads((w / "history.json").read_text())["history"]
  assert [r["round"] for r in rows] == [0, 1, 2] and rows[:2] == doc["history"]
  assert _steps(w) == ["2", "3"]
  _close(_checkpoint(w, 3)[0], _checkpoint(one_process["resumed"], 3)[0])


def _closed_port() -> socket.socket:
  """A bound, never listening socket: connections to its port are refused while it is open."""
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  return s


def test_join_failures_end_in_one_line_within_the_timeout(tmp_path):
  """By hand, without the launcher: an unreachable coordinator, and two processes given different
  --processes (either way round). All five processes run at once (they mostly wait)."""
  closed = _closed_port()
  ports = [_closed_port() for _ in range(2)]
  addr = lambda s: f"127.0.0.1:{s.getsockname()[1]}"
  unreachable, coords = addr(closed), [addr(s) for s in ports]
  for s in ports:
    s.close()  # free for process 0 to bind
  runs = {
      "unreachable": [(2, 1, unreachable)],
      "coordinator expects fewer": [(2, 0, coords[0]), (3, 1, coords[0])],
      "coordinator expects more": [(3, 0, coords[1]), (2, 1, coords[1])],
  }
  procs = {}
  t0 = time.perf_counter()
  try:
    for name, members in runs.items():
      for n, i, coord in members:
        procs[name, i] = subprocess.Popen(
            [sys.executable, "-m", "mtfl_jax", "federate", "--workdir", str(tmp_path / name.replace(" ", "_")),
             *FLAGS, "--rounds", "1", "--processes", str(n), "--process-id", str(i), "--coordinator", coord,
             "--join-timeout", "5"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = {k: p.communicate(timeout=90) for k, p in procs.items()}
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
    closed.close()
  assert time.perf_counter() - t0 < 60  # 5 s join timeouts, interpreters starting side by side
  for (name, i), p in procs.items():
    err = outs[name, i][1].strip()
    assert p.returncode == 2, (name, i, err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith("error: "), (name, i, err[-2000:])
  assert outs["unreachable", 1][1].startswith(
      f"error: process 1 of 2 could not join the run coordinated at {unreachable} within 5s")
  for i in (0, 1):
    assert "were started with different --processes (process 0: 2, process 1: 3)" in outs["coordinator expects fewer", i][1]
    assert "could not join the run" in outs["coordinator expects more", i][1]
    assert "same --processes" in outs["coordinator expects more", i][1]


def test_more_devices_than_jax_sees_is_a_one_line_error(tmp_path, capsys):
  from mtfl_jax.federated import FedConfig, run_federated
  from mtfl_jax.federated.executors import client_mesh
  from mtfl_jax.vresource import VRModel
  have = len(jax.devices())  # this process's backend has started: its device count is fixed
  with pytest.raises(ValueError, match=rf"asked for {have + 1} devices but JAX sees {have} .*"
                     rf"XLA_FLAGS=--xla_force_host_platform_device_count={have + 1}.*--devices N"):
    client_mesh(have + 1)
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=2, clients_per_round=2, rounds=1, simulator="sharded",
                  devices=have + 1)
  with pytest.raises(ValueError, match=f"asked for {have + 1} devices"):
    run_federated(cfg, VRModel({"digits_mlp": 1e-3}, {"digits_mlp": 1.0}, {"digits_mlp": 1.0}), progress=False)
  # the command line in a process whose JAX has started (as here) cannot add devices
  assert main(["federate", "--workdir", str(tmp_path / "w"), "--devices", str(have + 1), *FLAGS]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: JAX already started with {have} CPU device(s), so {have + 1} cannot be set now")
  assert len(err.splitlines()) == 1


@pytest.mark.parametrize("text, match", [
    ('{"tasks": ["digits_mlp"], "roundz": 3}', r"{cfg}: unknown settings \['roundz'\]; valid: tasks, num_clients, "),
    ('{"tasks": ["digits_mlp"], ', r"the run's config file {cfg} is not valid JSON: .*truncated"),
    ('["digits_mlp"]', r"{cfg}: a config file must hold a JSON object of FedConfig fields"),
    ('{"rounds": 0}', r"bad federated config: rounds must be an integer >= 1, got 0"),
])
def test_bad_config_file_is_a_one_line_error_before_any_work(tmp_path, capsys, text, match):
  import re
  cfg = tmp_path / "cfg.json"
  cfg.write_text(text)
  t0 = time.perf_counter()
  assert main(["federate", "--workdir", str(tmp_path / "w"), "--config", str(cfg)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and re.match("error: " + match.format(cfg=re.escape(str(cfg))), err), err
  assert time.perf_counter() - t0 < 5 and not (tmp_path / "w").exists()  # nothing ran, nothing written


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers' pids in /proc")
def test_a_killed_launcher_leaves_no_worker_behind(tmp_path):
  p = subprocess.Popen([sys.executable, "-m", "mtfl_jax", "federate", "--workdir", str(tmp_path / "w"), *FLAGS,
                        "--processes", "2", "--rounds", "1000"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  kids = {}
  try:
    for line in p.stdout:
      if line.startswith("federate:"):
        break
    kids = _children_of(p.pid)
    assert len(kids) == 2, kids
    p.kill()  # SIGKILL: no handler of the launcher runs; the workers must die with it
    p.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and
                                              "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                                              for pid in kids):
      time.sleep(0.2)
    alive = [pid for pid in kids if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
  finally:
    for pid in kids:
      try:
        os.kill(pid, 9)
      except ProcessLookupError:
        pass
  assert not alive, alive


@pytest.mark.parametrize("args, match", [
    (["--processes", "0"], "--processes must be >= 1, got 0"),
    (["--processes", "2", "--join-timeout", "0"], "--join-timeout must be >= 1, got 0"),
    (["--processes", "2", "--devices", "3"], "--devices 3 does not split evenly over --processes 2"),
])
def test_bad_process_flags_are_one_line_errors_before_any_work(tmp_path, capsys, args, match):
  from mtfl_jax.__main__ import main
  assert main(["federate", "--workdir", str(tmp_path / "w"), *FLAGS, *args]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and match in err, err
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_rerun_names_the_settings_that_differ_and_may_change_devices_and_rounds():
  from mtfl_jax.federated.callbacks import config_differences
  saved = {"tasks": ["digits_mlp"], "seed": 0, "rounds": 2, "devices": 2}
  assert config_differences(saved, {**saved, "rounds": 5, "devices": None}) == ""
  assert config_differences(saved, {**saved, "seed": 1}) == "seed: 0 -> 1"


def test_auto_and_sharded_run_the_layout_kept_in_the_calibration_store(monkeypatch, tmp_path):
  """``auto`` runs the stored choice, the loop included; ``sharded`` the fastest *batched*
  layout of that measurement (it cannot run the loop), unless ``inner`` is given; with nothing
  stored the layout is measured once and kept, and the next executor reads it back."""
  from mtfl_jax.calibration import load_layout, save_layout
  from mtfl_jax.federated import FedConfig, build_federation, make_executor
  from mtfl_jax.federated.client import fedavg_program
  from mtfl_jax.federated.executors import layout_key, stored_or_measured_layout
  monkeypatch.setenv("MTFL_PROFILE_DIR", str(tmp_path))
  ft = build_federation(FedConfig(tasks=("digits_mlp",), num_clients=8, clients_per_round=4)).tasks[0]
  program = fedavg_program(ft.task)
  key, clients = layout_key(ft, program, 3)
  assert clients == 4 and key.endswith("|clients=4")  # rounds of 3 and 4 clients share a choice
  save_layout(key, {"inner": "loop", "per_device": None, "seconds": {"loop": 0.1, "vmap/4": 0.3, "map/4": 0.2}})
  assert make_executor("auto", ft, program, clients_hint=4).name == "auto (loop)"
  shd = make_executor("sharded", ft, program, clients_hint=4, devices=1)
  assert (shd.inner, shd.k_max) == ("map", 4)
  assert make_executor("sharded", ft, program, clients_hint=4, devices=1, inner="vmap").inner == "vmap"
  given = make_executor("sharded", ft, program, clients_hint=4, devices=1, per_device=2)  # no half-measured mix
  assert (given.inner, given.k_max) == ("vmap", 2)
  key16 = layout_key(ft, program, 16)[0]
  assert load_layout(key16) is None
  choice, source = stored_or_measured_layout(ft, program, 16)
  assert source == "measured" and load_layout(key16) == choice
  assert set(choice["seconds"]) == {"loop", "vmap/8", "map/8"} and choice["clients"] == 8  # the 8 holders
  assert stored_or_measured_layout(ft, program, 16) == (choice, "stored")


def test_a_run_says_when_it_measures_a_client_layout_and_not_once_kept(monkeypatch, tmp_path, capsys):
  from mtfl_jax.federated import FedConfig, run_federated
  from mtfl_jax.vresource import VRModel
  monkeypatch.setenv("MTFL_PROFILE_DIR", str(tmp_path))
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=4, clients_per_round=3, rounds=1, simulator="auto")
  model = VRModel({"digits_mlp": 1e-3}, {"digits_mlp": 1.0}, {"digits_mlp": 1.0})
  run_federated(cfg, model, progress=True)
  out = capsys.readouterr().out
  assert "mtfl_jax: measuring the client layouts of digits_mlp for rounds of about 3 clients" in out, out
  run_federated(cfg, model, progress=True)
  assert "measuring the client layouts" not in capsys.readouterr().out  # kept: read back, not measured
