import time

import jax
import numpy as np
import pytest

import mtfl_jax as mt
from mtfl_jax.backends import BACKENDS, Job, RunResult
from mtfl_jax.backends.sequential import SequentialRunner
from mtfl_jax.calibration import calibrate
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


def _water_fill_by_bisection(demand, weights):
  """A second solver: find lam with sum_i min(u_i, lam w_i) = 1 by bisection."""
  if sum(demand.values()) <= 1:
    return dict(demand)
  lo, hi = 0.0, 1e6
  for _ in range(200):
    lam = (lo + hi) / 2
    lo, hi = (lam, hi) if sum(min(demand[n], lam * weights[n]) for n in demand) < 1 else (lo, lam)
  return {n: min(demand[n], hi * weights[n]) for n in demand}


def test_water_fill_matches_a_bisection_solver():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(2, 6))
    names = [f"t{i}" for i in range(n)]
    demand = dict(zip(names, rng.uniform(0.05, 1.5, n)))
    weights = dict(zip(names, rng.uniform(0.05, 1.0, n)))
    g = water_fill(demand, weights)
    assert g == pytest.approx(_water_fill_by_bisection(demand, weights), abs=1e-9)
    assert sum(g.values()) == pytest.approx(min(1.0, sum(demand.values())))


def test_predict_two_tasks_in_closed_form():
  # u = 0.8 each (1.6 > 1: they contend), shares a 1, b 0.5 -> lam = 1/1.5, neither capped:
  # g = (2/3, 1/3), r = g/u = (5/6, 5/12). a (1 s of work) ends at 1 / (5/6) = 1.2 s, when b has
  # done 1.2 * 5/12 = 0.5 s of its 3; b alone fits (u < 1): r = 1, so it ends at 1.2 + 2.5 = 3.7 s.
  m = VRModel({"a": 0.5, "b": 1.5}, {"a": 0.8, "b": 0.8}, {})
  p = m.predict({"a": 2, "b": 2}, {"a": 1.0, "b": 0.5})
  assert p.start_rates == pytest.approx({"a": 5 / 6, "b": 5 / 12})
  assert p.finish_times_s == pytest.approx({"a": 1.2, "b": 3.7}) and p.makespan_s == pytest.approx(3.7)


def test_competitive_shares_make_everyone_finish_at_the_closed_form_makespan():
  rng = np.random.default_rng(1)
  for _ in range(100):
    n = int(rng.integers(2, 5))
    names = [f"t{i}" for i in range(n)]
    solo = dict(zip(names, rng.uniform(0.001, 0.5, n)))
    wl = dict(zip(names, rng.integers(1, 200, n).tolist()))
    demand = dict(zip(names, rng.uniform(0.2, 1.0, n)))
    m = VRModel(solo, demand, {})
    work = {k: wl[k] * solo[k] for k in names}
    s_total = sum(work[k] * demand[k] for k in names)
    p = m.predict(wl, m.competitive_shares(wl))
    # T = max(max_i T_i, sum_i T_i u_i), from the module's arithmetic
    assert p.makespan_s == pytest.approx(max(max(work.values()), s_total), rel=1e-6)
    if s_total >= max(work.values()):  # nobody capped: all finish together
      assert max(p.finish_times_s.values()) == pytest.approx(min(p.finish_times_s.values()), rel=1e-6)
    # and no other share vector the model knows of beats it
    assert p.makespan_s <= m.predict(wl, {k: 1.0 for k in names}).makespan_s * (1 + 1e-9)


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
  with pytest.raises(ValueError, match="valid policies: sequential, equal, partitioned, competitive, auto, grid_best"):
    plan_shares("greedy", wl, m)
  with pytest.raises(ValueError, match="does not know"):
    plan_shares("competitive", {"a": 2, "zzz": 1}, m)


def test_memory_that_does_not_fit_is_refused_clearly():
  jobs = [Job("digits_mlp", 3), Job("mnist_lenet", 3)]
  assert check_memory(jobs) > 0
  with pytest.raises(MemoryError, match="needs .* MiB but the device has 1 MiB free .*digits_mlp"):
    check_memory(jobs, available=2**20)


def test_run_round_runs_the_competitive_plan_of_its_own_model(monkeypatch):
  import mtfl_jax.cosched as cs
  from mtfl_jax.backends.base import Feed
  jobs = [Job("digits_mlp", 60, seed=0), Job("mnist_lenet", 8, seed=1)]
  fitted = []  # the model run_round fits (the real calibration, watched)
  monkeypatch.setattr(cs, "calibrate", lambda r, warmup=False: fitted.append(calibrate(r, warmup)) or fitted[-1])
  res, plan = mt.run_round(jobs, policy="competitive", backend="threads", return_params=True)
  (model,) = fitted
  # closed form of the weighted plan (all tasks finish together): shares T_i u_i / max, and
  # T = max(max_i T_i, sum_i T_i u_i), with T_i = W_i s_i; predict() steps through events instead
  work = {j.name: j.steps * model.solo_step_s[j.name] for j in jobs}
  w = {n: work[n] * model.demand[n] for n in work}
  assert plan.shares == pytest.approx({n: v / max(w.values()) for n, v in w.items()})
  assert plan.predicted_makespan_s == pytest.approx(max(max(work.values()), sum(w.values())), rel=1e-9)
  # the result is the run under those shares: times from its own stamps, the sequential maths
  assert res.shares == plan.shares
  assert res.finish_times_s == {n: float(np.nanmax(t)) for n, t in res.step_times_s.items()}
  assert res.makespan_s == max(res.finish_times_s.values())
  for job in jobs:  # a plain loop of the jitted step over the job's batches
    step, feed, state = jax.jit(mt.make_train_step(job.task)), Feed(job), mt.init_state(job.task, job.seed)
    for i in range(job.steps):
      state, _ = step(state, feed.batch(i))
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), jax.device_get(state.params), res.params[job.name])
    assert max(jax.tree.leaves(diff)) == 0.0, job.name
  with pytest.raises(ValueError, match="unknown policy"):
    mt.run_round(jobs, policy="fastest")


def test_fit_reproduces_the_whole_equal_run():
  # a run generated by known demands, observed only at each task's end (sparse stamps)
  truth = VRModel({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0.3, "b": 0.8, "c": 0.9}, {})
  wl = {"a": 2, "b": 6, "c": 8}
  finish = truth.predict(wl, {t: 1.0 for t in wl}).finish_times_s
  stamps = {t: np.r_[np.full(wl[t] - 1, np.nan), finish[t]] for t in wl}
  fitted = VRModel.fit(truth.solo_step_s, _run(stamps))
  again = fitted.predict(wl, {t: 1.0 for t in wl}).finish_times_s
  assert again == pytest.approx(finish, rel=1e-3)
  # and it predicts the weighted plan of the true model
  shares = truth.competitive_shares(wl)
  assert fitted.predict(wl, shares).makespan_s == pytest.approx(truth.predict(wl, shares).makespan_s, rel=0.05)


class _DelayedSequential(SequentialRunner):
  """Test fixture: the real sequential backend, each step delayed by ``DELAY_S`` seconds in
  Python, so its makespan is longer by at least steps x DELAY_S."""
  name = "delayed_sequential"
  DELAY_S = 0.01

  def __init__(self, jobs):
    super().__init__(jobs)
    self.step = {n: self._delayed(f) for n, f in self.step.items()}

  def _delayed(self, f):
    def step(state, batch):
      time.sleep(self.DELAY_S)
      return f(state, batch)
    return step


@pytest.mark.parametrize("order", [("delayed_sequential", "sequential"), ("sequential", "delayed_sequential")])
def test_choose_backend_picks_the_faster_measured_backend(monkeypatch, order):
  monkeypatch.setitem(BACKENDS, _DelayedSequential.name, _DelayedSequential)
  jobs = [Job("digits_mlp", 20), Job("mnist_lenet", 6)]
  best, times = mt.cosched.choose_backend(jobs, candidates=order)
  extra = sum(j.steps for j in jobs) * _DelayedSequential.DELAY_S  # 0.26 s, over a ~0.05 s round
  assert best == "sequential", times
  assert times["delayed_sequential"] - times["sequential"] >= 0.8 * extra, times
  with pytest.raises(ValueError, match="valid backends: auto, "):
    mt.run_round(jobs, backend="gpu")
