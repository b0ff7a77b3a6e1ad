"""Co-scheduling benchmark: every policy and backend side by side in one run.

    python benchmarks/cosched.py [--full] [--json FILE]

Same as ``python -m mtfl_jax bench cosched``; prints a table of makespans and the ratios
(competitive vs sequential, competitive vs equal) measured in this one run.
"""
import sys

from mtfl_jax.__main__ import main

if __name__ == "__main__":
  sys.exit(main(["bench", "cosched", *sys.argv[1:]]))
