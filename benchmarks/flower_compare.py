"""Flower's simulation engine (Ray) against mtfl_jax's federated simulator, same workload (issue 11).

    python benchmarks/flower_compare.py [--quick] [--rounds R] [--repeats N] [--simulator auto]
                                        [--flower-python .venv-flower/bin/python] [--json FILE]

The workload, on both sides: tasks ``digits_mlp`` and ``mnist_lenet``, Dirichlet label skew
alpha 0.5 over N clients (mtfl_jax's own partition, so both sides train on identical shards),
every client holding both tasks; K clients sampled per round (the same clients on both sides:
mtfl_jax's per-round sample), each training every task from the global model for one local
epoch, ``ceil(len(shard) / batch_size)`` steps of the task's optimizer on the same batches
in the same order; FedAvg; no evaluation during the rounds. Settings: 10 of 20 and 50 of 100.

Each side runs in a fresh subprocess of its own (neither pays the other's compiles), the
sides interleaved (Flower, mtfl_jax, Flower, mtfl_jax, ...) for every setting, then one more
mtfl_jax run that calibrates its virtual-resource model at start-up as ``run_federated`` does
by default (the timed mtfl_jax runs pass the stored model; see ``--calibration``).

Reported per side: the round time (median and mean over every repeat's rounds but its
first), the first round, and start-up: from the subprocess's launch to the end of its first
round (imports, data, partition, Ray or calibration, compiles and that round). The ratio is
Flower / mtfl_jax. ``--json`` writes every round's time, the versions and the machine.

Flower side: ``flwr.simulation.run_simulation`` on the Ray backend with a ``ServerApp`` running
a FedAvg (message API) subclass that times rounds (``configure_train`` to the end of
``aggregate_train``) and a ``ClientApp`` whose train function runs in Ray actors, one CPU each;
a JAX in an actor pins itself to a core of its own (XLA_FLAGS' intra-op settings do not limit
JAX 0.10's CPU thread pool; ``--flower-pin none`` leaves them unpinned). See benchmarks/FLOWER.md.

The child modes (``--side flower|mtfl``) are this script's own plumbing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASKS = ("digits_mlp", "mnist_lenet")
ALPHA = 0.5
SEED = 0
SETTINGS = ((20, 10), (100, 50))
DEFAULT_FLOWER_PYTHON = REPO / ".venv-flower" / "bin" / "python"
INSTALL_HINT = ("python3.11 -m venv .venv-flower && .venv-flower/bin/pip install -r "
                "benchmarks/requirements-flower.txt && .venv-flower/bin/pip install -e .")


def _fed_config(n: int, k: int, **kw):
  from mtfl_jax.federated import FedConfig
  return FedConfig(tasks=TASKS, num_clients=n, clients_per_round=k, alpha=ALPHA, seed=SEED, **kw)


def _launch_time() -> float:
  return float(os.environ.get("FLOWER_COMPARE_T_LAUNCH", time.time()))


# ============================================================================ mtfl_jax side
def _stored_model(tasks):
  """The mix's virtual-resource model from the calibration store (this machine's, else the
  checkout's data/profiles one); None when neither holds it."""
  from mtfl_jax import calibration
  paths = [calibration.store_path(), REPO / "data" / "profiles" / calibration.store_path().name]
  for p in paths:
    if p.exists():
      model = calibration.load_model(tasks, "processes", p)
      if model is not None:
        return model, str(p)
  return None, None


def run_mtfl(args) -> dict:
  t_launch = _launch_time()
  t_main = time.time()
  if args.devices:
    from mtfl_jax.distributed import use_cpu_devices
    use_cpu_devices(args.devices)  # before JAX starts
  import jax
  from mtfl_jax.federated import Callback, ClientExecutor, make_executor, register_executor, run_federated
  from mtfl_jax.device import device_name

  events = []

  class Timed(ClientExecutor):
    """The configured executor, recording when each task's clients finished training."""

    def __init__(self, fed_task, program, inner="auto", **options):
      self.inner = make_executor(inner, fed_task, program, **options)

    @property
    def name(self):
      return self.inner.name

    def run(self, *a, **kw):
      out = self.inner.run(*a, **kw)
      events.append(("task_done", None, time.time()))
      return out

  class Rounds(Callback):
    def before_round(self, run, rnd, round_time_s):
      events.append(("round_start", rnd, time.time()))

    def after_round(self, run, row):
      events.append(("round_end", row["round"], time.time()))

  register_executor("timed", Timed)
  cfg = _fed_config(args.clients, args.per_round, rounds=args.rounds, policy="none",
                    eval_every=args.rounds, simulator="timed")
  options = {"inner": args.simulator, **({"devices": args.devices} if args.simulator == "sharded" else {})}
  model, calibration = None, "measured at start-up by run_federated (calibrate_mix)"
  if args.calibration == "stored":
    model, where = _stored_model(cfg.tasks)
    calibration = f"stored ({where})" if model is not None else "measured at start-up (no stored model found)"
  res = run_federated(cfg, model=model, progress=False, callbacks=[Rounds()], executor_options=options)
  t_done = time.time()
  rounds = []
  for r in range(len(res.history)):
    start = next(t for ev, rr, t in events if ev == "round_start" and rr == r)
    end = next(t for ev, rr, t in events if ev == "round_end" and rr == r)
    trained = max(t for ev, _, t in events if ev == "task_done" and start <= t <= end)  # before any evaluation
    h = res.history[r]
    rounds.append({"round": r + 1, "start": start, "end": trained, "round_end_event": end,
                   "round_s": trained - start, "clients": h["sampled"],
                   "steps": sum(sum(w.values()) for w in h["workloads"].values())})
  return {"side": "mtfl_jax", "clients": args.clients, "per_round": args.per_round, "simulator": args.simulator,
          "devices": len(jax.devices()),
          "modes": dict(res.executors), "calibration": calibration, "t_launch": t_launch, "t_main": t_main,
          "t_first_round_end": rounds[0]["end"], "t_done": t_done, "rounds": rounds,
          "accuracy_end": res.final_accuracy(), "device": device_name(), "jax": jax.__version__}


# ============================================================================ Flower side
# Per Ray actor process: the federation (data and shards), the jitted train steps, the core.
_ACTOR: dict = {}


def _pin_to_one_core(slot_dir: str | None) -> int | None:
  """Pins this process (before its JAX starts) to a core of its own: the i-th actor to claim
  a slot in ``slot_dir`` takes the i-th core (mod the cores it may run on)."""
  if not slot_dir:
    return None
  cores = sorted(os.sched_getaffinity(0))
  i = 0
  while True:
    try:
      os.close(os.open(os.path.join(slot_dir, f"slot{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
      break
    except FileExistsError:
      i += 1
  core = cores[i % len(cores)]
  os.sched_setaffinity(0, {core})
  return core


def _actor_state(n: int, k: int) -> dict:
  if not _ACTOR:
    core = _pin_to_one_core(os.environ.get("FLOWER_COMPARE_PIN_DIR"))
    import jax
    from mtfl_jax.federated.federation import build_federation
    from mtfl_jax.train import make_train_step
    fed = build_federation(_fed_config(n, k))
    _ACTOR.update(fed=fed, steps={ft.name: jax.jit(make_train_step(ft.task)) for ft in fed.tasks})
    log = os.environ.get("FLOWER_COMPARE_ACTOR_LOG")
    if log:
      with open(log, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "core": core, "affinity": sorted(os.sched_getaffinity(0)),
                            "XLA_FLAGS": os.environ.get("XLA_FLAGS"), "t_ready": time.time()}) + "\n")
  return _ACTOR


def flower_train(msg, context):
  """The ClientApp's train function: the client named in the message's config trains both
  tasks for one local epoch (mtfl_jax's steps, batches and batch order) from the global model."""
  import jax
  import numpy as np
  from flax.traverse_util import flatten_dict, unflatten_dict
  from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
  import jax.numpy as jnp
  from mtfl_jax.federated.client import client_keys, client_seed
  from mtfl_jax.train import TrainState, batch_indices

  conf = msg.content["config"]
  n, k, c, rnd = int(conf["num-clients"]), int(conf["per-round"]), int(conf["client-id"]), int(conf["server-round"]) - 1
  actor = _actor_state(n, k)
  fed = actor["fed"]
  glob = unflatten_dict({key: a.numpy() for key, a in msg.content["arrays"].items()}, sep="/")
  out, examples, steps_done = {}, 0, 0
  for ti, t in enumerate(TASKS):
    ft = fed.tasks[ti]
    task, ds, idx = ft.task, ft.data, ft.shards[c]
    params, model_state = glob[t]["params"], glob[t].get("model_state", {})
    steps = fed.workloads(c)[t]
    if steps > 0:
      seed = client_seed(SEED, rnd, ti, c)
      ids = batch_indices(idx, task.batch_size, steps, seed)
      # mtfl_jax's client start: the global model, a fresh optimizer state, the client's key
      state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=task.optimizer.init(params),
                         model_state=model_state, rng=client_keys([seed])[0])
      step = actor["steps"][t]
      for j in range(steps):
        state, _ = step(state, {"image": ds.x_train[ids[j]], "label": ds.y_train[ids[j]]})
      params, model_state = state.params, state.model_state
      examples += len(idx)
      steps_done += steps
    out.update(flatten_dict({t: {"params": params, "model_state": model_state}}, sep="/"))
  arrays = ArrayRecord({key: Array(np.asarray(v)) for key, v in jax.device_get(out).items()})
  metrics = MetricRecord({"num-examples": examples, "steps": steps_done})
  return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _timed_fedavg_class():
  import numpy as np
  from flwr.app import ConfigRecord, Message, MessageType, RecordDict
  from flwr.serverapp.strategy import FedAvg
  from flwr.serverapp.strategy.strategy_utils import sample_nodes

  class TimedFedAvg(FedAvg):
    """FedAvg that samples the clients mtfl_jax samples in the same round (the count is
    FedAvg's own, from ``fraction_train``) and records each round's wall time."""

    def __init__(self, num_clients: int, **kw):
      super().__init__(**kw)
      self.num_clients = num_clients
      self.rounds: list[dict] = []

    def configure_train(self, server_round, arrays, config, grid):
      t0 = time.time()
      size = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
      _, nodes = sample_nodes(grid, self.min_available_nodes, size)  # waits for the nodes
      nodes = sorted(nodes)  # client c of the partition trains on node nodes[c]
      rng = np.random.default_rng([SEED, server_round - 1])  # mtfl_jax's sample of this round
      clients = sorted(rng.choice(self.num_clients, size, replace=False).tolist())
      self.rounds.append({"round": server_round, "start": t0, "clients": clients})
      return [Message(RecordDict({self.arrayrecord_key: arrays,
                                  self.configrecord_key: ConfigRecord({**config, "server-round": server_round,
                                                                       "client-id": c})}),
                      dst_node_id=nodes[c], message_type=MessageType.TRAIN) for c in clients]

    def aggregate_train(self, server_round, replies):
      replies = list(replies)
      out = super().aggregate_train(server_round, replies)
      rec = self.rounds[-1]
      rec["end"] = time.time()
      rec["round_s"] = rec["end"] - rec["start"]
      ok = [m for m in replies if not m.has_error()]
      rec["replies"], rec["errors"] = len(ok), len(replies) - len(ok)
      rec["steps"] = int(sum(m.content["metrics"]["steps"] for m in ok))
      if rec["errors"]:
        raise RuntimeError(f"round {server_round}: {rec['errors']} client(s) failed: "
                           + "; ".join(m.error.reason for m in replies if m.has_error())[:2000])
      return out

  return TimedFedAvg


def run_flower(args) -> dict:
  t_launch = _launch_time()
  t_main = time.time()
  pin_dir = None
  if args.flower_pin == "core":
    pin_dir = tempfile.mkdtemp(prefix="flower_compare_pin_")
    os.environ["FLOWER_COMPARE_PIN_DIR"] = pin_dir  # Ray's workers inherit the environment
  actor_log = tempfile.mktemp(prefix="flower_compare_actors_", suffix=".jsonl")
  os.environ["FLOWER_COMPARE_ACTOR_LOG"] = actor_log
  import flwr
  import jax
  import ray
  from flax.traverse_util import flatten_dict
  from flwr.app import Array, ArrayRecord, ConfigRecord, Context
  from flwr.clientapp import ClientApp
  from flwr.serverapp import Grid, ServerApp
  from flwr.simulation import run_simulation
  from mtfl_jax.tasks import get_task
  from mtfl_jax.train import init_variables

  # Imported by name, not as __main__: Ray ships the train function by reference, so each actor
  # keeps its data and compiled steps across rounds.
  import flower_compare as me

  n, k, rounds = args.clients, args.per_round, args.rounds
  strategy = me._timed_fedavg_class()(num_clients=n, fraction_train=k / n, fraction_evaluate=0.0,
                                      min_train_nodes=k, min_available_nodes=n)
  client_app = ClientApp()
  client_app.train()(me.flower_train)
  server_app = ServerApp()
  result = {}

  @server_app.main()
  def main(grid: Grid, context: Context) -> None:
    init = {}
    for i, t in enumerate(TASKS):  # mtfl_jax's init_server: seed + i
      params, model_state = init_variables(t, SEED + i)
      init.update(flatten_dict({t: {"params": params, "model_state": model_state}}, sep="/"))
    arrays = ArrayRecord({key: Array(jax.device_get(v)) for key, v in init.items()})
    result["result"] = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds,
                                      train_config=ConfigRecord({"num-clients": n, "per-round": k}))

  backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"num_cpus": len(os.sched_getaffinity(0))}}
  run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n, backend_config=backend_config)
  t_done = time.time()
  if len(strategy.rounds) != rounds or "end" not in strategy.rounds[-1]:
    raise RuntimeError(f"the Flower run stopped after {len(strategy.rounds)} of {rounds} rounds (see its log)")
  # after the timing: the final global models' test accuracy (a check that Flower trained)
  from flax.traverse_util import unflatten_dict
  from mtfl_jax.train import evaluate
  final = unflatten_dict({key: a.numpy() for key, a in result["result"].arrays.items()}, sep="/")
  accuracy = {}
  for t in TASKS:
    ds = get_task(t).load_data(allow_synthetic=False)
    m = evaluate(t, final[t]["params"], ds.x_test, ds.y_test, model_state=final[t].get("model_state", {}))
    accuracy[t] = round(m["accuracy"], 6)
  actors = []
  if os.path.exists(actor_log):
    actors = [json.loads(line) for line in open(actor_log)]
    os.remove(actor_log)
  if pin_dir:
    import shutil
    shutil.rmtree(pin_dir, ignore_errors=True)
  return {"side": "flower", "clients": n, "per_round": k, "t_launch": t_launch, "t_main": t_main,
          "t_first_round_end": strategy.rounds[0]["end"], "t_done": t_done, "rounds": strategy.rounds,
          "accuracy_end": accuracy, "actors": actors, "pin": args.flower_pin, "backend_config": backend_config,
          "flwr": flwr.__version__, "ray": ray.__version__, "jax": jax.__version__}


# ============================================================================ harness
def _median(xs):
  return statistics.median(xs) if xs else float("nan")


def _mean(xs):
  return statistics.fmean(xs) if xs else float("nan")


def summarize(runs: list[dict]) -> dict:
  """Round times pooled over repeats (each repeat's first round left out), first rounds and
  start-ups (median over repeats)."""
  steady = [r["round_s"] for run in runs for r in run["rounds"][1:]]
  first = [run["rounds"][0]["round_s"] for run in runs]
  startup = [run["t_first_round_end"] - run["t_launch"] for run in runs]
  return {"repeats": len(runs), "round_median_s": _median(steady), "round_mean_s": _mean(steady),
          "rounds_timed": len(steady), "first_round_s": _median(first), "startup_s": _median(startup),
          "startup_all_s": startup, "per_repeat_round_median_s": [_median([r["round_s"] for r in run["rounds"][1:]])
                                                                   for run in runs]}


def _child(python: str, side: str, n: int, k: int, args, workdir: Path, tag: str, extra=()) -> dict:
  out = workdir / f"{tag}.json"
  log = workdir / f"{tag}.log"
  cmd = [python, str(Path(__file__).resolve()), "--side", side, "--clients", str(n), "--per-round", str(k),
         "--rounds", str(args.rounds), "--out", str(out), *extra]
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  if args.data_dir:
    env["MTFL_DATA_DIR"] = args.data_dir
  print(f"  {tag:<28}", end="", flush=True)
  env["FLOWER_COMPARE_T_LAUNCH"] = repr(time.time())
  with open(log, "w") as f:
    proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.child_timeout)
  if proc.returncode != 0 or not out.exists():
    tail = log.read_text().splitlines()[-25:]
    print("FAILED")
    raise SystemExit(f"{side} run {tag} failed (exit {proc.returncode}); its log {log} ends:\n  " + "\n  ".join(tail))
  run = json.loads(out.read_text())
  s = [r["round_s"] for r in run["rounds"]]
  print(f"start-up {run['t_first_round_end'] - run['t_launch']:6.1f} s, first round {s[0]:6.2f} s, "
        f"then median {_median(s[1:]):.3f} s; end accuracy "
        + " ".join(f"{v:.3f}" for v in run.get("accuracy_end", {}).values()))
  return run


def _flower_versions(python: str) -> dict | None:
  if not Path(python).exists():
    return None
  code = "import json, flwr, ray, jax; print(json.dumps({'flwr': flwr.__version__, 'ray': ray.__version__, 'jax': jax.__version__}))"
  p = subprocess.run([python, "-c", code], capture_output=True, text=True)
  if p.returncode != 0:
    return None
  return json.loads(p.stdout.strip().splitlines()[-1])


def _machine() -> dict:
  from mtfl_jax.device import cpu_model
  return {"platform": platform.platform(), "cpu": cpu_model(), "nproc": len(os.sched_getaffinity(0)),
          "python": platform.python_version(), "load_avg_at_start": os.getloadavg()}


def _table(results: list[dict]) -> str:
  head = (f"{'setting':<10}{'side':<10}{'round med s':>12}{'round mean s':>13}{'first rnd s':>12}"
          f"{'start-up s':>11}")
  lines = [head, "-" * len(head)]
  for res in results:
    f, m = res["flower"], res["mtfl_jax"]
    setting = f"{res['per_round']}/{res['clients']}"
    for name, s in (("Flower", f), ("mtfl_jax", m)):
      lines.append(f"{setting:<10}{name:<10}{s['round_median_s']:>12.3f}{s['round_mean_s']:>13.3f}"
                   f"{s['first_round_s']:>12.2f}{s['startup_s']:>11.1f}")
    r = res["ratio_flower_over_mtfl"]
    lines.append(f"{setting:<10}{'ratio F/m':<10}{r['round_median']:>11.1f}x{r['round_mean']:>12.1f}x"
                 f"{r['first_round']:>11.1f}x{r['startup']:>10.1f}x")
    if res.get("mtfl_jax_calibrated"):
      c = res["mtfl_jax_calibrated"]
      lines.append(f"{setting:<10}{'(mtfl_jax calibrating at start-up: start-up ' + format(c['startup_s'], '.1f') + ' s, first round ' + format(c['first_round_s'], '.2f') + ' s)'}")
    lines.append("")
  return "\n".join(lines)


def harness(args) -> int:
  flower_python = str(args.flower_python)
  versions = _flower_versions(flower_python)
  if versions is None:
    print(f"Flower is not installed for {flower_python}; install it with: {INSTALL_HINT}", file=sys.stderr)
    return 2
  if args.quick:
    args.rounds = args.rounds or 4
    args.repeats = args.repeats or 1
  args.rounds = args.rounds or 10
  args.repeats = args.repeats or 2
  settings = [tuple(int(x) for x in s.split("/"))[::-1] for s in args.settings.split(",")]  # "K/N" -> (N, K)
  workdir = Path(tempfile.mkdtemp(prefix="flower_compare_"))
  machine = _machine()
  print(f"Flower {versions['flwr']} (Ray {versions['ray']}, JAX {versions['jax']}) vs mtfl_jax "
        f"(simulator={args.simulator}); {args.rounds} rounds, {args.repeats} repeat(s) each, interleaved; "
        f"logs in {workdir}")
  results = []
  for n, k in settings:
    print(f"{k} of {n} clients per round:")
    runs = {"flower": [], "mtfl_jax": []}
    for rep in range(args.repeats):
      runs["flower"].append(_child(flower_python, "flower", n, k, args, workdir, f"flower_{k}of{n}_r{rep}",
                                   ["--flower-pin", args.flower_pin]))
      runs["mtfl_jax"].append(_child(args.mtfl_python, "mtfl", n, k, args, workdir, f"mtfl_{k}of{n}_r{rep}",
                                     ["--simulator", args.simulator, "--calibration", args.calibration,
                                      "--devices", str(args.devices or 0)]))
    calibrated = None
    if args.calibration == "stored" and not args.no_calibrated_run:
      calibrated = _child(args.mtfl_python, "mtfl", n, k, args, workdir, f"mtfl_{k}of{n}_calibrating",
                          ["--simulator", args.simulator, "--calibration", "measure",
                           "--devices", str(args.devices or 0)])
    fs, ms = summarize(runs["flower"]), summarize(runs["mtfl_jax"])
    res = {"clients": n, "per_round": k, "flower": fs, "mtfl_jax": ms,
           "ratio_flower_over_mtfl": {"round_median": fs["round_median_s"] / ms["round_median_s"],
                                      "round_mean": fs["round_mean_s"] / ms["round_mean_s"],
                                      "first_round": fs["first_round_s"] / ms["first_round_s"],
                                      "startup": fs["startup_s"] / ms["startup_s"]},
           "runs": runs}
    if calibrated:
      res["mtfl_jax_calibrated"] = {**summarize([calibrated]), "run": calibrated}
    results.append(res)
  mtfl_dev = results[0]["runs"]["mtfl_jax"][0]
  print()
  print(f"Machine: {mtfl_dev['device']}; {machine['platform']}. Ratio = Flower / mtfl_jax (higher: mtfl_jax faster).")
  print(f"mtfl_jax's virtual-resource model in the timed runs: {mtfl_dev['calibration']}; simulator chose {mtfl_dev['modes']}.")
  print()
  print(_table(results))
  if args.json:
    doc = {"benchmark": "flower_compare", "issue": 11, "tasks": list(TASKS), "alpha": ALPHA, "seed": SEED,
           "local_epochs": 1, "rounds": args.rounds, "repeats": args.repeats, "simulator": args.simulator,
           "devices": args.devices or 1,
           "flower_pin": args.flower_pin, "calibration": args.calibration,
           "versions": {**versions, "jax_mtfl": mtfl_dev["jax"]},
           "machine": {**machine, "device": mtfl_dev["device"], "load_avg_at_end": os.getloadavg()},
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1, default=float))
    print(f"wrote {args.json}")
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--flower-python", default=str(DEFAULT_FLOWER_PYTHON),
                 help="the Python with flwr[simulation] (default: .venv-flower/bin/python)")
  p.add_argument("--mtfl-python", default=sys.executable, help="the Python for mtfl_jax's side (default: this one)")
  p.add_argument("--simulator", default="auto", help="mtfl_jax's FedConfig.simulator (default: auto)")
  p.add_argument("--devices", type=int, default=0,
                 help="CPU devices for mtfl_jax's side (with --simulator sharded; 0: JAX's default, one)")
  p.add_argument("--rounds", type=int, default=None, help="rounds per run (default 10; --quick: 4)")
  p.add_argument("--repeats", type=int, default=None, help="runs of each side per setting (default 2; --quick: 1)")
  p.add_argument("--quick", action="store_true", help="4 rounds, 1 repeat: checks that it works")
  p.add_argument("--settings", default="10/20,50/100", help="K/N pairs, comma-separated (default 10/20,50/100)")
  p.add_argument("--calibration", choices=("stored", "measure"), default="stored",
                 help="mtfl_jax's virtual-resource model in the timed runs: the stored one (default) or "
                      "measured at start-up as run_federated does without a model")
  p.add_argument("--no-calibrated-run", action="store_true",
                 help="skip the extra mtfl_jax run per setting that calibrates at start-up")
  p.add_argument("--flower-pin", choices=("core", "none"), default="core",
                 help="pin each Ray actor's JAX to a core of its own (default) or leave it unpinned")
  p.add_argument("--data-dir", default=None, help="MTFL_DATA_DIR for both sides (default: the environment's)")
  p.add_argument("--child-timeout", type=float, default=1800, help="seconds a side's run may take")
  p.add_argument("--json", default=None, help="write the raw per-round times, versions and machine here")
  # a side's run (this script's plumbing)
  p.add_argument("--side", choices=("flower", "mtfl"), help=argparse.SUPPRESS)
  p.add_argument("--clients", type=int, help=argparse.SUPPRESS)
  p.add_argument("--per-round", type=int, help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.side:
    run = run_flower(args) if args.side == "flower" else run_mtfl(args)
    Path(args.out).write_text(json.dumps(run, indent=1, default=float))
    return 0
  return harness(args)


if __name__ == "__main__":
  sys.exit(main())
