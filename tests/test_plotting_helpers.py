"""The notebooks' plotting helpers draw from plain values (no measurement needed)."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mtfl_jax import plotting  # noqa: E402
from mtfl_jax.backends import RunResult  # noqa: E402


def _run(shares):
  steps = {"a": np.array([0.1, 0.2, 0.3]), "b": np.array([0.5, 1.0])}
  return RunResult("threads", shares, 1.0, {"a": 0.3, "b": 1.0}, steps, 0.0)


def test_profile_and_op_bars():
  prof = [{"task": t, "device": "cpu: test", "step_time_s": s, "flops_per_step": f, "peak_fraction": 0.1}
          for t, s, f in (("a", 1e-4, 1e6), ("b", 1e-2, 1e8))]
  assert isinstance(plotting.profile_bars(prof), Figure)
  ops = [{"layer": "Dense_0", "op": "dot_general", "pass": "forward", "flops": 2e6},
         {"layer": "Conv_0", "op": "conv_general_dilated", "pass": "backward", "flops": 1e6}]
  assert isinstance(plotting.op_bars(ops), Figure)


def test_corun_timeline_one_and_many():
  assert isinstance(plotting.corun_timeline(_run({"a": 1, "b": 1})), Figure)
  fig = plotting.corun_timeline({"equal": _run({"a": 1, "b": 1}), "competitive": _run({"a": .3, "b": 1})})
  assert len(fig.axes[0].get_yticks()) == 4  # two plans x two tasks


def test_rates_parity():
  fig = plotting.rates_parity({"equal": ({"a": .5, "b": .6}, {"a": .45, "b": .7}),
                               "a=0.25": ({"a": .2, "b": .9}, {"a": .25, "b": .8})})
  assert isinstance(fig, Figure)


def test_accuracy_vs_time_and_round_bars():
  h = [{"round": 0, "virtual_time_s": 1.0, "accuracy": {"a": 0.5}},
       {"round": 1, "virtual_time_s": 2.0, "accuracy": {"a": 0.7}}]
  fig = plotting.accuracy_vs_time({"none": h, "full": h}, budget_s=2.0)
  assert len(fig.axes) == 1
  row = {"round": 0, "round_time_s": 3.0, "client_time_s": {"0": 1.0, "1": 3.0, "2": 5.0},
         "idle_s": {"0": 2.0, "1": 0.0}}  # client 2 dropped
  fig = plotting.client_round_bars({"none": row, "deadline": row})
  assert len(fig.axes) == 2


def test_ratio_bars():
  fig = plotting.ratio_bars({"threads": {"equal": 1.1, "competitive": 1.2}, "processes": {"equal": 1.0}},
                            "throughput / sequential")
  assert len(fig.axes[0].patches) == 4  # a missing bar is drawn as NaN height
