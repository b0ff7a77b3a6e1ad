"""Command line: ``python -m mtfl_jax {profile,download,bench,reproduce} ...``.

Errors the user can act on end in one ``error: ...`` line and exit code 2; Ctrl-C ends in one
``interrupted: ...`` line saying what was kept and how to resume, and exit code 130.
"""
from __future__ import annotations

import argparse
import errno
import signal
import sys
from pathlib import Path


def _profile(args):
  from mtfl_jax.profiling import default_profile_path, load_profiles, profile_table, profile_tasks, save_profiles
  from mtfl_jax.results import check_writable, write_json
  from mtfl_jax.tasks import get_tasks
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
  from mtfl_jax.results import check_writable
  if args.json:
    check_writable(args.json, "--json")
  if args.which == "cosched":
    from mtfl_jax.experiments.bench_cosched import bench_cosched
    bench_cosched(quick=not args.full, json_path=args.json)
  else:
    from mtfl_jax.calibration import store_path
    from mtfl_jax.experiments.bench_federated import bench_federated
    check_writable(store_path(), "calibration store")
    bench_federated(quick=not args.full, json_path=args.json)


def _reproduce(args):
  from mtfl_jax.experiments.reproduce import reproduce
  from mtfl_jax.results import check_writable
  check_writable(args.out, "--out", directory=True)
  reproduce(out=args.out, quick=not args.full, from_recorded=args.from_recorded, seed=args.seed)


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


def _redeliver_swallowed_ctrl_c(unraisable, _previous=sys.unraisablehook):
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
  _previous(unraisable)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m mtfl_jax", description=__doc__)
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
  be.add_argument("which", choices=["cosched", "federated"])
  mode = be.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="a few minutes on a laptop (default)")
  mode.add_argument("--full", action="store_true", help="longer rounds and repeats")
  be.add_argument("--json", help="write the results here")
  be.set_defaults(fn=_bench)

  re_ = sub.add_parser("reproduce", help="reproduce the paper's six figures")
  mode = re_.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="about 10 minutes on a 2-core CPU (default)")
  mode.add_argument("--full", action="store_true", help="for a GPU and longer runs")
  re_.add_argument("--out", default="results")
  re_.add_argument("--from-recorded", help="redraw from recorded JSON (a results dir or a data/ dir)")
  re_.add_argument("--seed", type=int, default=0)
  re_.set_defaults(fn=_reproduce)

  args = p.parse_args(argv)
  hook, sys.unraisablehook = sys.unraisablehook, _redeliver_swallowed_ctrl_c
  try:
    args.fn(args)
  except KeyboardInterrupt:
    # A second Ctrl-C while the message is printed and the interpreter shuts down would end
    # the process by SIGINT instead of the documented exit code 130.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"\n{_interrupted(args)}", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 - sorted below: user errors in one line, bugs re-raised
    if isinstance(e, _user_errors()) or (isinstance(e, OSError) and e.errno in _DISK_ERRNOS):
      print(f"error: {e}", file=sys.stderr)
      return 2
    raise
  finally:
    sys.unraisablehook = hook
  return 0


if __name__ == "__main__":
  sys.exit(main())
