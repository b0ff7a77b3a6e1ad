"""Command line: ``python -m mtfl_jax {profile,download,bench,federate,reproduce} ...``.

Errors the user can act on end in one ``error: ...`` line and exit code 2, before any work;
Ctrl-C ends in one ``interrupted: ...`` line saying what was kept and how to resume, and exit
code 130. SIGTERM (``kill PID``, a job scheduler's stop) ends a command as Ctrl-C does (the same
line; exit code 143): the processes it started are stopped and its temporary files removed.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
from pathlib import Path


def _profile(args):
  from mtfl_jax.profiling import check_repeats, default_profile_path, load_profiles, profile_table, profile_tasks, save_profiles
  from mtfl_jax.files import check_writable, write_json
  from mtfl_jax.tasks import get_tasks
  check_repeats(args.repeats, "--repeats")
  tasks = get_tasks(args.tasks)
  if args.json:
    check_writable(args.json, "--json")
  if args.save:
    store = check_writable(default_profile_path(), "--save")
    if store.exists():
      load_profiles(store)  # a corrupt store is reported now, not after profiling
  profiles = profile_tasks(tasks, repeats=args.repeats)
  print(profile_table(profiles))
  if args.json:
    write_json(args.json, {"device": profiles[0].device, "tasks": [p.to_json() for p in profiles]})
    print(f"wrote {args.json}")
  if args.save:
    print(f"saved to {save_profiles(profiles)}")


def _download(args):
  from mtfl_jax.data import download
  print(f"{args.name} is in {download(args.name, args.data_dir)}")


def _bench(args):
  from mtfl_jax.files import check_writable, write_json
  if args.json:
    check_writable(args.json, "--json")
  if args.which == "federated":
    from mtfl_jax.calibration import read_store
    read_store()  # a corrupt calibration store is reported now, not after minutes of measuring
  if args.which == "cosched":
    from mtfl_jax.experiments.bench_cosched import bench_cosched
    bench_cosched("full" if args.full else "quick", json_path=args.json)
  elif args.which == "scale":
    from mtfl_jax.experiments.bench_scale import bench_scale
    bench_scale(quick=not args.full, json_path=args.json)
  else:
    from mtfl_jax.calibration import store_path
    from mtfl_jax.experiments import evidence
    check_writable(store_path(), "calibration store")
    out = Path(args.json).with_suffix("") if args.json else Path("results") / "evidence"
    doc = evidence.run_evidence(evidence.config("full" if args.full else "quick"), out)
    print(evidence.evidence_table(doc))
    if args.json:
      write_json(args.json, doc)


def _import_user_code(args) -> None:
  """``--import MODULE`` (repeatable) and tasks given as ``module:attribute``: the user's modules
  are imported (registering their tasks) before the config names any task."""
  import importlib

  from mtfl_jax.tasks import Task, parse_task_names, register_task

  def load(mod: str, flag: str):
    try:
      return importlib.import_module(mod)
    except ImportError as e:
      missing = getattr(e, "name", None)
      if missing and missing != mod and not mod.startswith(missing + "."):  # found, but what it imports is not
        raise ValueError(f"{flag}: module {mod!r} imports {missing!r}, which cannot be imported ({e}); install it "
                         "or fix the module") from None
      raise ValueError(f"{flag}: cannot import module {mod!r} ({e}); check the module name and that its folder is on "
                       "PYTHONPATH (or run from that folder)") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while it ran: say where, in one line
      import traceback
      where = next((f"{f.filename}:{f.lineno}" for f in reversed(traceback.extract_tb(e.__traceback__))
                    if "importlib" not in f.filename), "")
      if isinstance(e, SyntaxError) and e.filename:
        where = f"{e.filename}:{e.lineno}"
      msg = " ".join(str(e.msg if isinstance(e, SyntaxError) else e).split())[:300]
      raise ValueError(f"{flag}: importing module {mod!r} failed with {type(e).__name__}: {msg}"
                       f"{f' (at {where})' if where else ''}; fix the module") from None
  for mod in args.imports or ():
    load(mod, f"--import {mod}")
  if args.tasks:
    names = []
    for spec in parse_task_names(args.tasks):
      if ":" in spec:
        mod, attr = spec.split(":", 1)
        if not mod.strip() or not attr.strip():
          raise ValueError(f"--tasks {spec}: give a task of your own as module:attribute, e.g. mytasks:my_task (the "
                           "module's Task value my_task)")
        task = getattr(load(mod, f"--tasks {spec}"), attr, None)
        if not isinstance(task, Task):
          raise ValueError(f"--tasks {spec}: {mod}.{attr} is {'missing' if task is None else type(task).__name__}, "
                           "not a mtfl_jax Task")
        register_task(task)
        args.imports = list(args.imports or ()) + [mod]
        spec = task.name
      names.append(spec)
    args.tasks = ",".join(names)


def _federate_config(args):
  """The FedConfig of ``federate``: the --config file's settings, then the flags given."""
  from mtfl_jax.federated import FedConfig
  from mtfl_jax.files import read_json
  _import_user_code(args)
  base = {}
  if args.config:
    base = read_json(args.config, "the run's config file", "give a JSON object of FedConfig fields, e.g. "
                     '{"tasks": ["digits_mlp"], "rounds": 20}')
    if not isinstance(base, dict):
      raise ValueError(f"{args.config}: a config file must hold a JSON object of FedConfig fields")
    unknown = set(base) - (set(FedConfig.__dataclass_fields__) - {"task_defs"})
    if unknown:
      raise ValueError(f"{args.config}: unknown settings {sorted(unknown)}; valid: "
                       f"{', '.join(f for f in FedConfig.__dataclass_fields__ if f != 'task_defs')}")
  flags = {"tasks": args.tasks, "num_clients": args.clients, "clients_per_round": args.clients_per_round,
           "rounds": args.rounds, "policy": args.policy, "alpha": args.alpha, "local_epochs": args.epochs,
           "presence": args.presence, "trace": args.trace, "time_budget_s": args.time_budget, "seed": args.seed,
           "eval_every": args.eval_every, "simulator": args.simulator, "dropout": args.dropout,
           "availability": args.availability, "server_optimizer": args.server_optimizer, "server_lr": args.server_lr,
           "prox_mu": args.prox_mu, "algorithm": args.algorithm, "aggregator": args.aggregator}
  cfg = {**base, **{k: v for k, v in flags.items() if v is not None}}
  if isinstance(cfg.get("tasks"), str):
    from mtfl_jax.tasks import parse_task_names
    cfg["tasks"] = parse_task_names(cfg["tasks"])
  if cfg.get("alpha") == 0:
    cfg["alpha"] = None  # --alpha 0: no label skew
  if cfg.get("partition") == "natural" and args.alpha is not None:
    raise ValueError(f"--alpha {args.alpha:g} does not apply to partition 'natural', where each client holds its own "
                     "data: leave --alpha out")
  # several devices or processes: the sharded simulator; one: the fastest layout, measured once
  several = (args.devices or 1) > 1 or args.processes > 1 or (cfg.get("devices") or 1) > 1
  cfg.setdefault("simulator", "sharded" if several else "auto")
  if args.devices is not None and args.processes == 1:
    cfg["devices"] = args.devices
  if "num_clients" in cfg and "clients_per_round" not in cfg:
    cfg["clients_per_round"] = cfg["num_clients"]
  return FedConfig(**cfg)


def _check_run_flags(args) -> None:
  """The devices-and-processes flags of ``federate``, alone and together, before anything runs:
  a flag that would be ignored, or that contradicts another, is an error naming both."""
  from mtfl_jax import distributed

  def within(name, lo, hi=None, why=""):
    v = getattr(args, name.replace("-", "_"))
    if v is None:
      return
    if v < lo:
      raise ValueError(f"--{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
      raise ValueError(f"--{name} must be <= {hi}, got {v}{why}")
  within("processes", 1, distributed.MAX_PROCESSES)
  within("process-id", 0)
  within("join-timeout", 1, distributed.MAX_JOIN_TIMEOUT_S,
         " (seconds; a process that stops answering is noticed only after this long)")
  many = " (JAX builds every CPU device when it starts)"
  within("devices", 1, distributed.MAX_CPU_DEVICES, many)
  within("devices-per-process", 1, distributed.MAX_CPU_DEVICES, many)
  n, pid = args.processes, args.process_id
  coordinator = args.coordinator or os.environ.get("MTFL_COORDINATOR")
  if pid is None:
    if args.coordinator:
      raise ValueError("--coordinator is for a process started by hand: give its --process-id too (or leave "
                       "--coordinator out: --processes N alone starts N local processes on a port of its own)")
    if n == 1 and args.devices_per_process is not None:
      raise ValueError("--devices-per-process is for runs of several processes; in one process give --devices")
    cores = distributed.usable_cores()
    if n > cores:
      raise ValueError(f"--processes {n}: each local process needs a core of its own, and this process may use "
                       f"{cores}; give --processes <= {cores}, or start the processes on several hosts by hand "
                       "(--process-id, --coordinator)")
  else:
    if pid >= n:
      raise ValueError(f"--process-id {pid} is not below --processes {n}: process ids run 0..{n - 1}")
    if n > 1:
      if not coordinator:
        raise ValueError(f"process {pid} of {n} needs --coordinator HOST:PORT, the address of process 0 "
                         "(or the environment variable MTFL_COORDINATOR)")
      distributed.check_address(coordinator)
  if args.devices is not None:
    per = args.devices_per_process
    if per is not None and per * n != args.devices:
      raise ValueError(f"--devices {args.devices} and --devices-per-process {per} disagree for --processes {n} "
                       f"({per} x {n} = {per * n}); give one of them")
    if per is None and args.devices % n:
      raise ValueError(f"--devices {args.devices} does not split evenly over --processes {n}; give a multiple of "
                       "the process count (or --devices-per-process)")


def _join(args, cfg) -> bool:
  """Sets up devices and processes before any JAX computation; False: this process only
  launches the local processes (``--processes N`` without ``--process-id``)."""
  from mtfl_jax import distributed
  if args.processes > 1 and args.process_id is None:
    return False
  if args.process_id is not None:
    per = args.devices_per_process
    if per is None and args.devices is not None:
      per = args.devices // args.processes
    if per is not None:  # else JAX's own count (a process started by hand)
      distributed.use_cpu_devices(per)
    distributed.initialize(args.coordinator, args.processes, args.process_id, timeout_s=args.join_timeout)
  elif cfg.devices is not None:  # --devices or the config file's "devices"
    distributed.use_cpu_devices(cfg.devices)
  return True


def _vr_model(cfg, workdir: Path):
  """The run's virtual-resource model from this device's calibration store (measured and
  stored there on first use); None when the workdir already holds the run's clock
  (``clock.json``: a resumed run keeps the clock it started with)."""
  if (workdir / "clock.json").exists():
    return None
  from mtfl_jax.calibration import calibrate_mix, load_or_calibrate, store_path
  try:
    model, where = load_or_calibrate(cfg.task_defs)
  except OSError:  # the store cannot be written: measure without keeping it
    model, where = calibrate_mix(cfg.task_defs), f"measured now ({store_path()} is not writable)"
  print(f"virtual-resource model: {where}", flush=True)
  return model


def _launch(args, cfg) -> int:
  from mtfl_jax import distributed
  from mtfl_jax.clock import inputs_json
  from mtfl_jax.files import write_json
  devices = args.devices if args.devices is not None else cfg.devices
  if args.devices_per_process is None and devices is not None and devices % args.processes:  # the config's
    raise ValueError(f"the config file's \"devices\": {devices} does not split evenly over --processes "
                     f"{args.processes}; give a multiple of the process count (or --devices-per-process)")
  _check_federation(cfg)  # the data and settings, before the clock is calibrated and processes start
  drop = {"--processes", "--devices-per-process", "--devices"}
  keep, skip = [], False
  for a in args.argv:
    if skip:
      skip = False
      continue
    if a in drop:
      skip = True
      continue
    if any(a.startswith(d + "=") for d in drop):
      continue
    keep.append(a)
  per = args.devices_per_process or (devices // args.processes if devices else 1)
  # The clock is resolved here, before the processes are pinned to their cores (pinned, this
  # machine would look like a smaller one and get another calibration): the run's clock.json.
  workdir = Path(args.workdir)
  model = _vr_model(cfg, workdir)
  if model is not None:
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "clock.json", inputs_json(model, None))
  return distributed.launch_local(keep, args.processes, devices_per_process=per, timeout_s=args.join_timeout)


def _federate(args):
  from mtfl_jax.files import check_writable
  _check_run_flags(args)
  cfg = _federate_config(args)
  check_writable(args.workdir, "--workdir", directory=True)
  if args.log_dir:
    if args.seeds is not None:
      raise ValueError("--log-dir streams the metrics of one run; with --seeds leave it out (each seed's run is kept "
                       "in WORKDIR/seed<k>/ and summary.json sums them up)")
    check_writable(args.log_dir, "--log-dir", directory=True)
  if args.seeds is not None:
    return _federate_seeds(args, cfg)
  _check_resumable(cfg, Path(args.workdir))
  if not _join(args, cfg):
    return _launch(args, cfg)
  import jax

  from mtfl_jax.federated import MetricsWriter, Outputs, run_federated
  main = jax.process_index() == 0
  fed = _check_federation(cfg)  # the data and settings, before the clock is calibrated (minutes)
  if main:
    print(f"federate: {', '.join(cfg.tasks)}; {cfg.clients_per_round} of {cfg.num_clients} clients per round, "
          f"{cfg.rounds} round(s), policy {cfg.policy}, simulator {cfg.simulator} on {len(jax.devices())} "
          f"device(s) in {jax.process_count()} process(es); workdir {args.workdir}", flush=True)
  model = _vr_model(cfg, Path(args.workdir)) if main and jax.process_count() == 1 else None
  outputs = Outputs(args.workdir)
  callbacks = [outputs] + ([MetricsWriter(args.log_dir)] if args.log_dir else [])
  res = run_federated(cfg, model=model, workdir=args.workdir, progress=main, callbacks=callbacks, fed=fed)
  if main:
    acc = ", ".join(f"{t} {a:.3f}" for t, a in res.final_accuracy().items())
    print(f"done: {len(res.history)} round(s), {res.virtual_time_s:.1f} virtual s, final accuracy {acc}; "
          f"wrote {', '.join(str(p) for p in outputs.paths.values())}")
  return 0


def _check_federation(cfg, seeds=None):
  """What ``run_federated`` checks first, done before the clock is calibrated: the server
  optimizer, and that the data can be split over the clients and evaluated (for each seed of a
  sweep: the partition is seeded). Returns the federation (of the config's seed)."""
  import dataclasses

  from mtfl_jax.federated import build_federation
  from mtfl_jax.federated.algorithms import check_server_optimizer
  check_server_optimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_kwargs)
  for s in seeds or ():
    build_federation(dataclasses.replace(cfg, seed=s))
  return build_federation(cfg)


def _federate_seeds(args, cfg) -> int:
  """``federate --seeds``: every seed in WORKDIR/seed<k>/, then summary.json and accuracy.png."""
  import dataclasses

  from mtfl_jax.federated.sweep import parse_seeds, run_seeds
  from mtfl_jax.files import write_json
  seeds = parse_seeds(args.seeds)
  if args.processes != 1 or args.process_id is not None:
    raise ValueError("--seeds runs each seed in a process of its own; leave out --processes/--process-id")
  if args.seed is not None:
    raise ValueError("--seed and --seeds: give one of them")
  if cfg.devices is not None:
    given = "--devices" if args.devices is not None else "the config file's \"devices\""
    raise ValueError(f"--seeds runs each seed in a process of its own, on one core and one device: leave out {given}")
  workdir = Path(args.workdir)
  for s in seeds:
    _check_resumable(dataclasses.replace(cfg, seed=s), workdir / f"seed{s}")
  _check_federation(cfg, seeds)
  model = _vr_model(cfg, workdir)
  sweep = run_seeds(cfg, seeds, workdir, model, imports=args.imports or ())
  doc = {k: v for k, v in sweep.items() if k != "runs"}
  doc["runs"] = [{k: v for k, v in r.items() if k not in ("history", "evaluations")} for r in sweep["runs"]]
  write_json(workdir / "summary.json", doc)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from mtfl_jax.plotting import accuracy_bands
  fig = accuracy_bands({cfg.policy: sweep["runs"]})
  fig.savefig(workdir / "accuracy.png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  for t, v in sweep["summary"]["final_accuracy"].items():
    print(f"{t}: final accuracy median {v['median']} (95% CI {v['ci95'][0]}-{v['ci95'][1]}) over {v['n']} seeds")
  print(f"wrote {workdir / 'summary.json'}, {workdir / 'accuracy.png'}")
  return 0


def _check_resumable(cfg, workdir: Path) -> None:
  """Before any work (and before processes are started): a workdir holding another run is a
  one-line error naming the settings that differ."""
  from mtfl_jax.federated.callbacks import config_differences
  from mtfl_jax.files import read_json
  f = workdir / "config.json"
  if f.exists():
    diff = config_differences(read_json(f, "the run's config", "delete it to reuse the workdir"), cfg.to_json())
    if diff:
      raise ValueError(f"{workdir} holds a run with a different config ({diff}); use another workdir "
                       "(nothing there was changed)")


def _reproduce(args):
  from mtfl_jax.experiments.reproduce import reproduce
  if args.from_recorded and (args.full or args.seed is not None):
    raise ValueError(f"--from-recorded redraws what was measured, so {'--full' if args.full else '--seed'} has no "
                     "effect there; leave it out (or drop --from-recorded to measure)")
  reproduce(out=args.out, quick=not args.full, from_recorded=args.from_recorded,
            seed=0 if args.seed is None else args.seed)


def _interrupted(args) -> str:
  """What an interrupted command kept, and how to resume it."""
  if args.cmd == "reproduce":
    from mtfl_jax.experiments.reproduce import EXPERIMENTS
    raw = Path(args.out) / "raw"
    if args.from_recorded:
      return "interrupted: nothing was measured; rerun the same command to redraw"
    done = [n for n in EXPERIMENTS if (raw / f"{n}.json").exists()]
    if done:
      return (f"interrupted: finished experiments kept in {raw} ({', '.join(done)}); "
              "rerun the same command to resume")
    return f"interrupted: no experiment had finished (nothing kept in {raw}); rerun the same command to start again"
  if args.cmd == "bench":
    kept = ""
    if args.which == "federated":
      from mtfl_jax.calibration import store_path
      kept = f"; calibrations measured so far are kept in {store_path()} and not measured again"
    return (f"interrupted: no results written{' to ' + args.json if args.json else ''} (the benchmark writes "
            f"them when it ends){kept}; rerun the same command")
  if args.cmd == "federate":
    where = Path(args.workdir) / ("seed<k>/checkpoints" if args.seeds is not None else "checkpoints")
    return f"interrupted: the checkpoints of finished rounds are kept in {where}; rerun the same command to resume"
  if args.cmd == "download":
    from mtfl_jax.data import default_data_dir
    where = Path(args.data_dir or default_data_dir()) / "downloads"
    return f"interrupted: files fetched so far are kept in {where}; rerun the same command to continue"
  return "interrupted: no profile was written; rerun the same command"


def _user_errors() -> tuple:
  """The exceptions that mean "the user can fix this" (one line, exit 2); anything else is a bug
  and keeps its traceback."""
  from mtfl_jax.backends.processes import WorkerError
  from mtfl_jax.data import DatasetUnavailableError
  from mtfl_jax.federated import CheckpointError, NonFiniteUpdate
  return (ValueError, DatasetUnavailableError, WorkerError, MemoryError, RuntimeError, NonFiniteUpdate,
          CheckpointError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
          IsADirectoryError)


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


_PREVIOUS_HOOK = [sys.unraisablehook]
# Set (to its pid) by the launcher, distributed.launch_local, in the processes it starts: they die
# with it, keep SIGTERM's default action (end at once, even inside a collective), and leave
# reporting the run's end to it.
LAUNCHED_ENV = "MTFL_LAUNCHED"  # distributed.LAUNCHER_ENV (not imported here: it imports JAX)


class _UsageError(Exception):
  """A command line argparse refuses (unknown flag, value of the wrong type, ...)."""


class _Parser(argparse.ArgumentParser):
  """argparse, with the CLI's one-line ``error: ...`` (argparse's own prints the usage first)."""

  def error(self, message):
    raise _UsageError(f"{message} (see {self.prog} --help)")


class _Interrupts:
  """The CLI's SIGINT and SIGTERM handler: ``KeyboardInterrupt`` in the main thread, so every
  ``finally`` and ``with`` runs (child processes stopped, temporary folders removed) and one
  ``interrupted:`` line is printed. SIGTERM (``kill PID``, a scheduler's stop) ends a command
  as Ctrl-C does; a second SIGTERM while that clean-up runs is ignored (a supervisor that
  insists sends SIGKILL), a second Ctrl-C interrupts the clean-up as Python's own handler does.

  An interrupt is hard to lose. Python raises it wherever the main thread happens to be, and
  some places swallow it: a garbage-collector callback (JAX's ``_xla_gc_callback``), or C code
  that clears errors (``PyObject_HasAttr`` in Python < 3.13; C extensions). The run would then
  go on as if nothing was pressed; CI saw it twice. So the first interrupt starts a watchdog
  thread: while the command has not ended, it looks at the main thread every
  :attr:`CHECK_S` seconds, and when the main thread is handling no exception twice in a row
  (a ``KeyboardInterrupt`` that is still unwinding shows in ``except``, ``finally`` and
  ``__exit__``; one turned into another error shows as that error), the interrupt was
  swallowed, and it raises it again in the main thread. (One swallowed while the main thread
  works inside an unrelated ``except`` block is raised again only once that block ends.)"""

  CHECK_S = 0.25

  def __init__(self):
    self.signals: list[int] = []  # what was received, first first
    self.done = threading.Event()  # the command ended (its interrupted: or error: line printed)
    self._again = False  # the next call is the watchdog's re-delivery
    self._watchdog: threading.Thread | None = None

  @property
  def terminated(self) -> bool:
    return signal.SIGTERM in self.signals

  def __call__(self, signum, frame):
    if self._again and self.done.is_set():  # a re-delivery that arrived after the command ended
      self._again = False
      return
    if not self._again and signum == signal.SIGTERM and self.signals:
      return  # a second SIGTERM during the clean-up
    if not self._again:
      self.signals.append(signum)
    self._again = False
    if self._watchdog is None:
      self._watchdog = threading.Thread(target=self._watch, args=(threading.main_thread().ident,),
                                        name="mtfl-interrupt-watchdog", daemon=True)
      self._watchdog.start()
    raise KeyboardInterrupt

  def _watch(self, main_id: int) -> None:
    quiet = 0
    while not self.done.wait(self.CHECK_S):
      quiet = 0 if _handling_an_exception(main_id) else quiet + 1
      if quiet >= 2 and not self.done.is_set():
        self._again, quiet = True, -4  # 6 quiet looks (1.5 s) before another re-delivery
        signal.pthread_kill(main_id, self.signals[0])

  def stop(self) -> None:
    self.done.set()


def _handling_an_exception(thread_id: int) -> bool:
  """Whether a thread is in an ``except``, ``finally`` (unwinding) or ``__exit__`` block; no
  reference to the exception (and its frames) is kept."""
  exc = sys._current_exceptions().get(thread_id)
  return (exc[1] if isinstance(exc, tuple) else exc) is not None  # 3.11: (type, value, tb)


def _ignore(signum, frame):
  """A handler that does nothing (unlike SIG_IGN, not inherited by processes started later)."""


def _redeliver_swallowed_ctrl_c(unraisable):
  """``sys.unraisablehook`` that re-delivers a Ctrl-C Python could not raise.

  A SIGINT that lands while a garbage-collector callback or ``__del__`` runs (JAX has one:
  ``_xla_gc_callback``) raises ``KeyboardInterrupt`` there, where Python only prints "Exception
  ignored in ..." and carries on: the user's Ctrl-C would be lost. This hook hands it back to the
  main thread as a fresh SIGINT instead, sent a moment later from a helper thread (sent from
  here it would be raised inside this hook and be swallowed again; should it land in another
  callback, this hook runs again)."""
  if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
    import threading
    main_id = threading.main_thread().ident
    threading.Timer(0.1, signal.pthread_kill, (main_id, signal.SIGINT)).start()
    return
  _PREVIOUS_HOOK[0](unraisable)


def main(argv=None) -> int:
  p = _Parser(prog="python -m mtfl_jax", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)

  pr = sub.add_parser("profile", help="solo profiles of tasks on this device")
  pr.add_argument("--tasks", default="digits_mlp,mnist_lenet,cifar_resnet,shapes_unet")
  pr.add_argument("--json", help="write the profiles here")
  pr.add_argument("--repeats", type=int, default=20)
  pr.add_argument("--save", action="store_true", help="also merge into data/profiles/<device>.json")
  pr.set_defaults(fn=_profile)

  dl = sub.add_parser("download", help="download a catalog dataset (needs a network) or build an offline one")
  dl.add_argument("name")
  dl.add_argument("--data-dir")
  dl.set_defaults(fn=_download)

  be = sub.add_parser("bench", help="benchmarks: cosched or federated")
  be.add_argument("which", choices=["cosched", "federated", "scale"])
  mode = be.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="a few minutes on a laptop (default)")
  mode.add_argument("--full", action="store_true", help="longer rounds and repeats (cosched: about 20 minutes)")
  be.add_argument("--json", help="write the results here")
  be.set_defaults(fn=_bench)

  re_ = sub.add_parser("reproduce", help="reproduce the paper's six figures")
  mode = re_.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="about 10 minutes on a 2-core CPU (default)")
  mode.add_argument("--full", action="store_true", help="for a GPU and longer runs")
  re_.add_argument("--out", default="results")
  re_.add_argument("--from-recorded", help="redraw from recorded JSON (a results dir or a data/ dir)")
  re_.add_argument("--seed", type=int, help="seed of the measured run (default 0)")
  re_.set_defaults(fn=_reproduce)

  dist = _Parser(add_help=False)
  g = dist.add_argument_group("devices and processes")
  g.add_argument("--devices", type=int, help="devices for the clients mesh (on a CPU: that many CPU devices)")
  g.add_argument("--processes", type=int, default=1, help="processes joined by jax.distributed; "
                 "without --process-id, N local processes are started")
  g.add_argument("--process-id", type=int, help="this process's id, in a run started by hand on several hosts")
  g.add_argument("--coordinator", help="HOST:PORT of process 0 (with --process-id)")
  g.add_argument("--devices-per-process", type=int, help="CPU devices in each process")
  g.add_argument("--join-timeout", type=int, default=60, help="seconds to wait for the other processes")

  fe = sub.add_parser("federate", parents=[dist], help="run your own federated experiment (history, checkpoints, figures)")
  fe.add_argument("--workdir", required=True, help="checkpoints, history.json and figures go here; rerun to resume")
  fe.add_argument("--config", help="JSON file of FedConfig settings (flags given override it)")
  fe.add_argument("--tasks", help="comma-separated task names (default digits_mlp): built-in or registered by an "
                  "--import module, or module:attribute of a Task in your own code")
  fe.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                  help="import this module first (your own tasks register themselves there); repeatable")
  fe.add_argument("--seeds", help="run every seed of a range (0-4) or list (1,3,7) into WORKDIR/seed<k>/ and "
                  "summarise them with medians and 95%% bootstrap intervals (summary.json, accuracy.png)")
  fe.add_argument("--clients", type=int, help="clients in the federation")
  fe.add_argument("--clients-per-round", type=int, help="clients sampled per round (default: all)")
  fe.add_argument("--rounds", type=int)
  fe.add_argument("--policy", help="none, intra, deadline, overselect, full or fedbuff")
  fe.add_argument("--alpha", type=float, help="Dirichlet label skew (0: none)")
  fe.add_argument("--epochs", type=float, help="local epochs per round")
  fe.add_argument("--presence", type=float, help="probability that a client holds a task")
  fe.add_argument("--trace", help="fleet trace JSON (client speeds)")
  fe.add_argument("--time-budget", type=float, help="virtual seconds; stop before a round would end past it")
  fe.add_argument("--seed", type=int)
  fe.add_argument("--eval-every", type=int)
  fe.add_argument("--simulator", help="auto (default on one device: the fastest layout, measured once), sharded "
                  "(default with --devices or --processes), loop or vmap")
  fe.add_argument("--dropout", type=float, help="probability that a client leaves mid-round")
  fe.add_argument("--availability", help="'diurnal', or a JSON trace of each client's online windows")
  fe.add_argument("--server-optimizer", help="an optax optimizer for the server: sgd (default), adam (FedAdam), "
                  "yogi, adagrad, ...")
  fe.add_argument("--server-lr", type=float, help="the server optimizer's learning rate (default 1)")
  fe.add_argument("--prox-mu", type=float, help="FedProx's proximal term mu")
  fe.add_argument("--algorithm", help="fedavg (default) or scaffold")
  fe.add_argument("--aggregator", help="fedavg, fednova or fednova_nominal (default: the policy's)")
  fe.add_argument("--log-dir", help="stream each round's metrics here: metrics.csv, and TensorBoard event files "
                  "when tensorboardX is installed")
  fe.set_defaults(fn=_federate)

  launched = os.environ.get(LAUNCHED_ENV)
  if launched and argv is None:
    from mtfl_jax.distributed import die_with_parent
    die_with_parent(int(launched))
    # A terminal's Ctrl-C reaches every process of its group: the launcher alone reports it and
    # stops this process (SIGTERM), so that one interrupted: line is printed, not one per process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    args = p.parse_args(argv)
  except _UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  args.argv = list(sys.argv[1:] if argv is None else argv)
  hook, sys.unraisablehook = sys.unraisablehook, _redeliver_swallowed_ctrl_c
  _PREVIOUS_HOOK[0] = hook if hook is not _redeliver_swallowed_ctrl_c else sys.__unraisablehook__
  interrupts, on_term = _Interrupts(), False
  if threading.current_thread() is threading.main_thread() and not os.environ.get(LAUNCHED_ENV):
    previous_int, on_term = signal.getsignal(signal.SIGINT), True
    previous_term = signal.signal(signal.SIGTERM, interrupts)
    if previous_int is signal.default_int_handler:  # (not a Ctrl-C ignored from the start: nohup, `cmd &`)
      signal.signal(signal.SIGINT, interrupts)
  try:
    code = args.fn(args)
    if isinstance(code, int) and code:
      return code
  except KeyboardInterrupt:
    # A second Ctrl-C (or SIGTERM) while the message is printed and the interpreter shuts down
    # would end the process by the signal instead of the documented exit code.
    interrupts.stop()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if on_term:
      signal.signal(signal.SIGTERM, _ignore)
    print(f"\n{_interrupted(args)}", file=sys.stderr)
    return 143 if interrupts.terminated else 130
  except Exception as e:  # noqa: BLE001 - sorted below: user errors in one line, bugs re-raised
    if isinstance(e, _user_errors()) or (isinstance(e, OSError) and e.errno in _DISK_ERRNOS):
      print(f"error: {e}", file=sys.stderr)
      return 2
    raise
  finally:
    interrupts.stop()
    sys.unraisablehook = hook
    if on_term and argv is not None:  # called from Python (a test, a notebook): its handlers back
      # (None: a handler not set from Python, which cannot be put back: the default)
      signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_term is None else previous_term)
      signal.signal(signal.SIGINT, signal.default_int_handler if previous_int is None else previous_int)
  return 0


if __name__ == "__main__":
  sys.exit(main())
