"""Co-scheduling benchmark: every policy and backend side by side in one run.

    python benchmarks/cosched.py [--full] [--json FILE]

Same as ``python -m mtfl_jax bench cosched``: runs
:func:`mtfl_jax.experiments.bench_cosched.bench_cosched` over the scenarios of
:mod:`mtfl_jax.experiments.scenarios` and prints a table of makespans (medians and spreads of
interleaved repeats) and the ratios measured in this one run: each policy against
``grid_best``, competitive against sequential and against equal, beside the paper's speedup
(:mod:`mtfl_jax.experiments.paper`).
"""
import sys

from mtfl_jax.__main__ import main

if __name__ == "__main__":
  sys.exit(main(["bench", "cosched", *sys.argv[1:]]))
