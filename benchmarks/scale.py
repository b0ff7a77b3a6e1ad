"""Scale benchmark: client updates per wall second of the sharded simulator on 1, 2 (and, with
--full, more) devices and 1, 2 processes, for digits_mlp and mnist_lenet at 100 and 1,000
clients per round, with first-round (compile) time, peak memory and the aggregate's
difference from the single-device simulator.

    python benchmarks/scale.py [--full] [--json FILE]

Same as ``python -m mtfl_jax bench scale``: runs
:func:`mtfl_jax.experiments.bench_scale.bench_scale`, each point in its own process(es), and
prints the table, the 2-device and 2-process speedups at 100 clients, the seconds per round
of 1,000 MLP clients, the peak memory ratio 1,000 / 100 clients and whether the issue's
targets are met.
"""
import sys

from mtfl_jax.__main__ import main

if __name__ == "__main__":
  sys.exit(main(["bench", "scale", *sys.argv[1:]]))
