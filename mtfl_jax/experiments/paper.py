"""The paper's reported numbers, in one place: every experiment, report and figure that
compares against Yu et al. (WWW 2022 Companion) reads them from here.

Example::

    from mtfl_jax.experiments.paper import PAPER, TRAINING_SPEEDUP
    f"ours 1.4x, paper {TRAINING_SPEEDUP}x"
"""
from __future__ import annotations

TRAINING_SPEEDUP = 2.1  # competitive sharing vs sequential, one device
FL_THROUGHPUT_GAIN = (2.16, 2.38)  # full coordination vs none, across multi-task scenarios

# As written into the experiments' JSON ("paper" field), which the figures read.
PAPER = {"training_speedup": TRAINING_SPEEDUP, "fl_throughput_gain": FL_THROUGHPUT_GAIN}


def speedup_text() -> str:
  return f"{TRAINING_SPEEDUP:g}x"


def fl_gain_text() -> str:
  lo, hi = FL_THROUGHPUT_GAIN
  return f"{lo:g}x-{hi:g}x"
