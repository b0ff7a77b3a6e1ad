"""Co-scheduling benchmark: every policy and backend side by side in one run.

    python benchmarks/cosched.py [--full] [--json FILE]

Same as ``python -m mtfl_jax bench cosched``: runs
:func:`mtfl_jax.experiments.bench_cosched.bench_cosched` over the scenarios and regimes of
:mod:`mtfl_jax.experiments.scenarios` (each task on every core; one compute thread per task)
and prints, per scenario and regime, the median and 95% bootstrap interval over fresh,
interleaved, paired repeats of every plan's speedup over sequential, of equal / competitive
(with its verdict), of the capacity C and of the model's error; the searched plans (auto,
grid_best) with their search's own number beside the fresh one. Quick: about 3 minutes on a
quiet 2-core CPU; ``--full``: about 20.
"""
import sys

from mtfl_jax.__main__ import main

if __name__ == "__main__":
  sys.exit(main(["bench", "cosched", *sys.argv[1:]]))
