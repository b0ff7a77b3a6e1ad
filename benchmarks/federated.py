"""Federated benchmark: FL throughput under none / deadline / intra / full, and the
simulator's speed (per-client loop vs auto), side by side in one run.

    python benchmarks/federated.py [--full] [--json FILE]

Same as ``python -m mtfl_jax bench federated``: runs
:func:`mtfl_jax.experiments.bench_federated.bench_federated` over the federations of
:mod:`mtfl_jax.experiments.scenarios` and prints each policy's work throughput and the ratios
full/none (split into its intra- and inter-device parts) and full/deadline, beside the
paper's FL throughput gain (:mod:`mtfl_jax.experiments.paper`). The clock's models come from
the calibration store (:mod:`mtfl_jax.calibration`), measured on first use.
"""
import sys

from mtfl_jax.__main__ import main

if __name__ == "__main__":
  sys.exit(main(["bench", "federated", *sys.argv[1:]]))
