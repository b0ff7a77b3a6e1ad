"""Search policies (auto, grid_best) against fake runners whose makespan is a known function
of the shares: the tests assert the winner without timing noise."""
import itertools

import pytest

from mtfl_jax.backends import Job, RunResult, Runner
from mtfl_jax.cosched import (PLAN_POLICIES, Search, blend, candidate_shares, compare_plans, make_plan, plan_shares,
                              rotated, scaled_jobs, search_plan, share_grid)
from mtfl_jax.vresource import VRModel

JOBS = [Job("digits_mlp", 40), Job("mnist_lenet", 10), Job("shapes_unet", 4)]
WL = {"digits_mlp": 40, "mnist_lenet": 10, "shapes_unet": 4}
# solo work 0.4, 1.0, 2.0 s; demands as a fitted model would hold them
MODEL = VRModel({"digits_mlp": 0.01, "mnist_lenet": 0.1, "shapes_unet": 0.5},
                {"digits_mlp": 0.3, "mnist_lenet": 0.7, "shapes_unet": 0.9}, {})


class FakeRunner(Runner):
  """A runner whose makespan is ``cost(shares)``; it records every call."""
  name = "fake"

  def __init__(self, jobs, cost):
    super().__init__(jobs)
    self.cost, self.calls = cost, []

  def run(self, shares=None, params=None, return_params=False):
    self.calls.append(dict(shares))
    t = float(self.cost(shares))
    return RunResult(self.name, dict(shares), t, {n: t for n in shares}, {}, 0.0)


def _distance_cost(target):
  """Makespan 10 s plus the squared distance of the shares from ``target``."""
  return lambda s: 10.0 + sum((s[n] - target[n]) ** 2 for n in target)


def test_auto_picks_the_cheapest_candidate_computed_another_way():
  cands = candidate_shares(WL, MODEL)
  target = {"digits_mlp": 0.5, "mnist_lenet": 0.5, "shapes_unet": 1.0}
  cost = _distance_cost(target)
  # brute force over the candidates, written independently of search_plan
  expected = sorted(cands, key=lambda k: sum((cands[k][n] - target[n]) ** 2 for n in target))[0]
  runner = FakeRunner(JOBS, cost)
  plan = make_plan("auto", JOBS, MODEL, runner)
  assert plan.policy == "auto" and plan.backend == "fake"
  assert plan.shares == cands[expected]
  assert plan.searched[expected] == pytest.approx(cost(cands[expected]))
  assert len(runner.calls) == len(cands)  # each measured once
  assert plan.predicted_makespan_s == pytest.approx(MODEL.predict(WL, plan.shares).makespan_s)


def test_candidates_are_competitive_equal_partitioned_and_blends():
  cands = candidate_shares(WL, MODEL, blends=(0.5,))
  comp, eq = plan_shares("competitive", WL, MODEL), plan_shares("equal", WL, MODEL)
  assert list(cands) == ["competitive", "blend0.50", "equal", "partitioned"]
  assert cands["competitive"] == comp and cands["equal"] == eq
  # competitive = solo work x demand, largest 1: 0.4*0.3, 1.0*0.7, 2.0*0.9 over 1.8
  assert comp == pytest.approx({"digits_mlp": 0.12 / 1.8, "mnist_lenet": 0.7 / 1.8, "shapes_unet": 1.0})
  half = {n: (comp[n] + 1.0) / 2 for n in comp}
  assert cands["blend0.50"] == pytest.approx({n: v / max(half.values()) for n, v in half.items()})
  assert sum(cands["partitioned"].values()) == pytest.approx(1.0)
  assert blend({"a": 0.2, "b": 1.0}, {"a": 1.0, "b": 0.6}, 1.0) == pytest.approx({"a": 1.0, "b": 0.6})


def test_grid_best_is_the_grid_argmin():
  target = {"digits_mlp": 0.3, "mnist_lenet": 0.6, "shapes_unet": 1.0}
  cost = _distance_cost(target)
  plan = make_plan("grid_best", JOBS, MODEL, FakeRunner(JOBS, cost))
  # brute force: every (a, b) in levels^2 with the heaviest (shapes_unet) at 1
  pts = [{"digits_mlp": a, "mnist_lenet": b, "shapes_unet": 1.0} for a, b in itertools.product((0.25, 0.5, 1.0), repeat=2)]
  best = min(pts, key=cost)
  assert best == {"digits_mlp": 0.25, "mnist_lenet": 0.5, "shapes_unet": 1.0}
  assert plan.shares == best and len(plan.searched) == 9


def test_grid_shape_order_and_cap():
  g = share_grid(WL, MODEL, levels=(0.5, 1.0))
  assert len(g) == 4 and all(s["shapes_unet"] == 1.0 for s in g.values())
  assert list(g.values())[0] == {"digits_mlp": 1.0, "mnist_lenet": 1.0, "shapes_unet": 1.0}  # equal first
  with pytest.raises(ValueError, match="past max_size=8"):
    share_grid(WL, MODEL, levels=(0.25, 0.5, 1.0), max_size=8)


def test_ties_go_to_the_first_listed_candidate():
  flat = FakeRunner(JOBS, lambda s: 5.0)
  assert make_plan("auto", JOBS, MODEL, flat).shares == candidate_shares(WL, MODEL)["competitive"]
  assert make_plan("grid_best", JOBS, MODEL, flat).shares == {n: 1.0 for n in WL}
  s = search_plan(lambda sh: 1.0, {"b": {"x": 1.0}, "a": {"x": 0.5}})
  assert s.best == "b"


def test_search_takes_the_median_of_interleaved_repeats():
  # rounds x,y / y,x / x,y: "x" gets 1.0, 1.5, 1.0 and "y" 1.5, 9.0, 1.5: medians 1.0 vs 1.5
  seq = iter([1.0, 1.5, 9.0, 1.5, 1.0, 1.5])
  order = []

  def measure(shares):
    order.append(shares["t"])
    return next(seq)

  s = search_plan(measure, {"x": {"t": 0.0}, "y": {"t": 1.0}}, repeats=3)
  assert order == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # interleaved, rotated: not x, x, x, y, y, y
  assert s.runs_s == {"x": [1.0, 1.5, 1.0], "y": [1.5, 9.0, 1.5]}
  assert s.median_s == {"x": 1.0, "y": 1.5} and s.best == "x"


def test_search_policies_need_a_measure_and_probe_is_used():
  with pytest.raises(ValueError, match="measures its candidates"):
    make_plan("auto", JOBS, MODEL, "threads")
  with pytest.raises(ValueError, match="decided by measurement"):
    plan_shares("grid_best", WL, MODEL)
  probe = FakeRunner(scaled_jobs(JOBS, 0.25), lambda s: 1.0 + s["digits_mlp"])
  plan = make_plan("grid_best", JOBS, MODEL, "threads", probe=probe)
  assert plan.backend == "threads" and plan.shares["digits_mlp"] == 0.25
  assert [j.steps for j in probe.jobs] == [10, 2, 2]  # 40, 10, 4 scaled by 1/4 (at least 2)
  assert set(PLAN_POLICIES) >= {"auto", "grid_best", "competitive", "equal", "partitioned", "sequential"}


def test_rotated_rounds_put_every_item_in_every_position():
  items = ["s", "a", "b", "c"]
  rounds = [rotated(items, k) for k in range(8)]
  assert rounds[1] == ["a", "b", "c", "s"] and rounds[4] == items and rotated(items, -1) == ["c", "s", "a", "b"]
  for pos in range(4):  # 8 rounds of 4 items: each item twice in each position
    assert sorted(r[pos] for r in rounds) == sorted(items * 2)


def test_search_decision_from_runs_by_brute_force():
  cands = {"p": {"x": 1.0}, "q": {"x": 0.5}, "r": {"x": 0.25}}
  runs = {"p": [3.0, 1.0, 2.0], "q": [2.0, 2.0, 9.0], "r": [1.0, 5.0, 2.0]}  # medians 2, 2, 2: a three-way tie
  assert Search.from_runs(cands, runs).best == "p"
  runs["r"] = [1.0, 5.0, 1.9]
  s = Search.from_runs(cands, runs)
  assert (s.best, s.shares, s.median_s) == ("r", {"x": 0.25}, {"p": 2.0, "q": 2.0, "r": 1.9})
  with pytest.raises(ValueError, match="every candidate"):
    Search.from_runs(cands, {"p": [1.0], "q": [], "r": [1.0]})


class FakeSequentialRunner(FakeRunner):
  """A fake runner with its own sequential baseline (as the processes runner has)."""

  def __init__(self, jobs, cost, sequential_s):
    super().__init__(jobs, cost)
    self.sequential_s = sequential_s

  def run_sequential(self, params=None, return_params=False):
    self.calls.append("sequential")
    t = self.sequential_s.pop(0)
    return RunResult(self.name, {}, t, {}, {}, 0.0)


def test_compare_plans_interleaves_and_pairs_by_round():
  equal = {n: 1.0 for n in WL}
  comp = plan_shares("competitive", WL, MODEL)
  # makespans: equal 10 + ..., competitive 10 (the target); sequential drifts from 30 to 34 s
  runner = FakeSequentialRunner(JOBS, _distance_cost(comp), [30.0, 31.0, 34.0])
  cmp = compare_plans(runner, {"sequential": None, "equal": equal, "competitive": comp}, repeats=3)
  # round k runs every plan once, rotated by k
  assert runner.calls == ["sequential", equal, comp, equal, comp, "sequential", comp, "sequential", equal]
  assert cmp.makespans("sequential") == [30.0, 31.0, 34.0] and cmp.makespans("competitive") == [10.0] * 3
  speedup = cmp.ratio("sequential", "competitive")  # paired by round: 3.0, 3.1, 3.4
  assert speedup["median"] == pytest.approx(3.1) and speedup["per_unit"] == pytest.approx([3.0, 3.1, 3.4])
  assert speedup["ci95"][0] >= 3.0 and speedup["verdict"] == "faster"
  assert cmp.median_s("sequential") == 31.0 and cmp.median_run("sequential").makespan_s == 31.0
  with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
    compare_plans(runner, {"equal": equal}, repeats=0)


def test_compare_plans_opens_a_sequential_runner_when_the_backend_has_none():
  jobs = [Job("digits_mlp", 3)]
  runner = FakeRunner(jobs, lambda s: 1.0)
  cmp = compare_plans(runner, {"sequential": None, "equal": {"digits_mlp": 1.0}}, repeats=2)
  assert [r.backend for r in cmp.runs["sequential"]] == ["sequential"] * 2
  assert all(r.makespan_s > 0 for r in cmp.runs["sequential"]) and cmp.makespans("equal") == [1.0, 1.0]
