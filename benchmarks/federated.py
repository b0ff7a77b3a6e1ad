"""Federated benchmark: FL throughput under none / intra / full, and simulator speed
(per-client loop vs auto), side by side in one run.

    python benchmarks/federated.py [--full] [--json FILE]

Same as ``python -m mtfl_jax bench federated``.
"""
import sys

from mtfl_jax.__main__ import main

if __name__ == "__main__":
  sys.exit(main(["bench", "federated", *sys.argv[1:]]))
