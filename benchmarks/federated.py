"""Federated evidence: time to accuracy over seeds, every policy against none and the best
baseline, with 95% bootstrap intervals (quick: a smoke run of every code path; --full: the
recording).

    python benchmarks/federated.py [--full] [--json FILE]

Same as ``python -m mtfl_jax bench federated``: runs
:func:`mtfl_jax.experiments.evidence.run_evidence` and prints its table. Runs are kept beside
the JSON (``FILE`` without its suffix, else ``results/evidence``) so that a rerun resumes.
"""
import sys

from mtfl_jax.__main__ import main

if __name__ == "__main__":
  sys.exit(main(["bench", "federated", *sys.argv[1:]]))
