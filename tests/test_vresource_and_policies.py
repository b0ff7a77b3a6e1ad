import numpy as np
import pytest

import mtfl_jax as mt
from mtfl_jax.backends import Job, RunResult
from mtfl_jax.cosched import check_memory, plan_shares
from mtfl_jax.vresource import VRModel, measured_rates, water_fill


def test_water_fill_hand_cases():
  assert water_fill({"a": 0.3, "b": 0.4}, {"a": 1, "b": 1}) == {"a": 0.3, "b": 0.4}  # demands fit
  g = water_fill({"a": 0.9, "b": 0.9}, {"a": 1, "b": 1})
  assert g == pytest.approx({"a": 0.5, "b": 0.5})
  g = water_fill({"a": 0.2, "b": 0.9, "c": 0.9}, {"a": 1, "b": 1, "c": 1})
  assert g == pytest.approx({"a": 0.2, "b": 0.4, "c": 0.4})  # a is capped at its demand
  g = water_fill({"a": 1.0, "b": 1.0}, {"a": 3, "b": 1})
  assert g == pytest.approx({"a": 0.75, "b": 0.25})


def _run(stamps):
  return RunResult("x", {}, max(np.nanmax(s) for s in stamps.values()),
                   {k: float(np.nanmax(v)) for k, v in stamps.items()}, stamps, 0.0)


def test_measured_rates_interpolate_between_synchronised_steps():
  # a: 4 steps of solo 1 s, synchronised after steps 2 and 4, done at t=8 (rate 0.5)
  # b: 2 steps of solo 1 s, done at t=4 -> window 4 s; b's rate 0.5, a did 2 steps by t=4
  run = _run({"a": np.array([np.nan, 4.0, np.nan, 8.0]), "b": np.array([2.0, 4.0])})
  assert measured_rates(run, {"a": 1.0, "b": 1.0}) == pytest.approx({"a": 0.5, "b": 0.5})


def _model():
  # two tasks at r = 0.5 each under equal shares -> demands 1.0 each (saturating)
  run = _run({"a": np.array([2.0, 4.0]), "b": np.array([2.0, 4.0])})
  return VRModel.fit({"a": 1.0, "b": 1.0}, run)


def test_model_fit_and_prediction_by_hand():
  m = _model()
  assert m.demand == pytest.approx({"a": 1.0, "b": 1.0}) and m.capacity == pytest.approx(1.0)
  # equal shares, work a=2 s, b=6 s: both at 0.5 until t=4 (a done), then b alone at 1.0 for 4 s
  p = m.predict({"a": 2, "b": 6}, {"a": 1.0, "b": 1.0})
  assert p.finish_times_s == pytest.approx({"a": 4.0, "b": 8.0}) and p.makespan_s == pytest.approx(8.0)
  shares = m.competitive_shares({"a": 2, "b": 6})
  assert shares == pytest.approx({"a": 1 / 3, "b": 1.0})
  q = m.predict({"a": 2, "b": 6}, shares)
  assert q.finish_times_s["a"] == pytest.approx(q.finish_times_s["b"]) == pytest.approx(8.0)


def test_competitive_beats_equal_when_the_heavy_task_alone_underuses_the_device():
  # each task keeps 60% of the device busy. Equal shares: both at r = 0.5/0.6 until c is done
  # (t = 2.4, d has done 2 s of its 8), then d runs alone at 60% utilisation for 6 s: 8.4 s.
  # Weighted so both finish together: T = max(max T_i, sum T_i u_i) = max(8, 6) = 8 s.
  m = VRModel({"c": 1.0, "d": 1.0}, {"c": 0.6, "d": 0.6}, {})
  wl = {"c": 2, "d": 8}
  equal = m.predict(wl, {"c": 1.0, "d": 1.0}).makespan_s
  comp = m.predict(wl, m.competitive_shares(wl)).makespan_s
  assert equal == pytest.approx(8.4)
  assert comp == pytest.approx(8.0)  # and sequential takes 10 s


def test_policies_shares():
  m = _model()
  wl = {"a": 2, "b": 6}
  assert plan_shares("equal", wl, m) == {"a": 1.0, "b": 1.0}
  part = plan_shares("partitioned", wl, m)
  assert sum(part.values()) == pytest.approx(1.0) and part["b"] == pytest.approx(0.75)
  comp = plan_shares("competitive", wl, m)
  assert max(comp.values()) == 1.0 and sum(comp.values()) > 1.0
  with pytest.raises(ValueError, match="valid policies: sequential, equal, partitioned, competitive"):
    plan_shares("greedy", wl, m)
  with pytest.raises(ValueError, match="does not know"):
    plan_shares("competitive", {"a": 2, "zzz": 1}, m)


def test_memory_that_does_not_fit_is_refused_clearly():
  jobs = [Job("digits_mlp", 3), Job("mnist_lenet", 3)]
  assert check_memory(jobs) > 0
  with pytest.raises(MemoryError, match="needs .* MiB but the device has 1 MiB free .*digits_mlp"):
    check_memory(jobs, available=2**20)


def test_run_round_measures_and_predicts():
  jobs = [Job("digits_mlp", 60, seed=0), Job("mnist_lenet", 8, seed=1)]
  res, plan = mt.run_round(jobs, policy="competitive", backend="threads")
  assert plan.policy == "competitive" and plan.predicted_makespan_s > 0
  assert res.makespan_s > 0 and set(res.finish_times_s) == {"digits_mlp", "mnist_lenet"}
  with pytest.raises(ValueError, match="unknown policy"):
    mt.run_round(jobs, policy="fastest")
