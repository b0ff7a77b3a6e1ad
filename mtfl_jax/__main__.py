"""Command line: ``python -m mtfl_jax {profile,download,bench,reproduce} ...``."""
from __future__ import annotations

import argparse
import json
import sys


def _profile(args):
  from mtfl_jax.profiling import profile_table, profile_tasks, save_profiles
  from mtfl_jax.tasks import get_tasks
  tasks = get_tasks(args.tasks)
  profiles = profile_tasks(tasks, repeats=args.repeats)
  print(profile_table(profiles))
  if args.json:
    doc = {"device": profiles[0].device,
           "tasks": [p.to_json() for p in profiles]}
    with open(args.json, "w") as f:
      json.dump(doc, f, indent=1)
    print(f"wrote {args.json}")
  if args.save:
    print(f"saved to {save_profiles(profiles)}")


def _download(args):
  from mtfl_jax.data import download
  print(f"{args.name} is in {download(args.name, args.data_dir)}")


def _bench(args):
  if args.which == "cosched":
    from mtfl_jax.bench_cosched import bench_cosched
    bench_cosched(quick=not args.full, json_path=args.json)
  else:
    from mtfl_jax.bench_federated import bench_federated
    bench_federated(quick=not args.full, json_path=args.json)


def _reproduce(args):
  from mtfl_jax.reproduce import reproduce
  reproduce(out=args.out, quick=not args.full, from_recorded=args.from_recorded, seed=args.seed)


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
  from mtfl_jax.backends.processes import WorkerError
  from mtfl_jax.data import DatasetUnavailableError
  try:
    args.fn(args)
  except (ValueError, DatasetUnavailableError, WorkerError, MemoryError, FileNotFoundError,
          PermissionError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
