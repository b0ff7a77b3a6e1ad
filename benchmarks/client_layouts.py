"""Client layouts benchmark: client updates per second of a per-client loop, vmap, vmap with
patched convolutions, lax.map and unrolled programs, for LeNet at 100 clients and the MLP at
100 and 1,000 clients, with MFU, arithmetic intensity and the aggregate's difference from the
loop; one process, interleaved repeats, medians.

    python benchmarks/client_layouts.py [--quick] [--json FILE]

Runs :func:`mtfl_jax.experiments.bench_layouts.bench_layouts` and prints its table.
"""
import sys

from mtfl_jax.experiments.bench_layouts import main

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
