import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtfl_jax as mt
from mtfl_jax.clock import MixCorrections, client_compute_time, mix_key, transfer_time
from mtfl_jax.federated import (POLICIES, ClientExecutor, ClientWork, FedConfig, NonFiniteUpdate, accumulation_norm,
                                aggregate, build_federation, client_seed, fedavg_program, make_algorithm,
                                register_executor, run_federated)
from mtfl_jax.federated.algorithms import fednova_momentum
from mtfl_jax.federated.executors import Aggregate, LoopExecutor
from mtfl_jax.federated.plan import task_scales
from mtfl_jax.train import batch_indices, init_variables, loss_and_metrics
from mtfl_jax.vresource import VRModel

MLP_MODEL = VRModel({"digits_mlp": 2e-4}, {"digits_mlp": 1.0}, {})


def replace(cfg, **kw):
  return dataclasses.replace(cfg, **kw)


def client_deltas(fed, t, params, works, model_state=None):
  """Each client's own delta, one client per executor call (weight 1): a reference that does
  not go through the weighted sum being tested."""
  ft = next(x for x in fed.tasks if x.name == t)
  ex = LoopExecutor(ft, fedavg_program(ft.task))
  bc = {"params": params, "model_state": {} if model_state is None else model_state}
  return [ex.run(bc, [w], {"delta": np.ones(1), "model_state": np.ones(1)}).sums for w in works]


def test_fedavg_by_hand():
  deltas = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [-4.0, 0.0]])}  # three clients, stacked
  n = [1, 3, 4]
  # (1*[1,2] + 3*[3,4] + 4*[-4,0]) / 8 = [-6, 14] / 8
  np.testing.assert_allclose(aggregate(deltas, n)["w"], [-0.75, 1.75])


def _momentum_sgd_delta(g, lr, rho, steps):
  """Client update of heavy-ball SGD (optax.sgd's rule) on the linear loss g.x, by a loop."""
  x, v = np.zeros_like(g), np.zeros_like(g)
  for _ in range(steps):
    v = rho * v + g
    x = x - lr * v
  return x


def _optax_norm(tau, rho):
  """A client's accumulation norm measured with optax itself: a unit gradient for tau steps."""
  tx = optax.sgd(0.1, momentum=rho or None)
  x = jnp.zeros(())
  st = tx.init(x)
  for _ in range(tau):
    u, st = tx.update(jnp.ones(()), st, x)
    x = optax.apply_updates(x, u)
  return -float(x) / 0.1


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_accumulation_norm_is_what_the_client_optimizer_accumulates(rho):
  for tau in (1, 2, 7, 36):
    assert accumulation_norm(tau, rho) == pytest.approx(_optax_norm(tau, rho), rel=1e-5)
  # the over-weighting the step-count normalisation gave a 36-step client against a 1-step one
  assert accumulation_norm(36, 0.9) / 36 == pytest.approx(7.56, abs=0.01)


def test_fednova_under_momentum_is_unbiased_and_step_counts_are_not():
  # Clients with linear losses g_c.x and different local step counts, momentum 0.9: each
  # delta is -lr * ||a_c|| * g_c, so an unbiased aggregate points along sum_c p_c g_c (the
  # global objective's gradient) whatever the step counts.
  rng = np.random.default_rng(0)
  g = rng.normal(size=(3, 4))
  n, taus, lr, rho = np.array([2.0, 5.0, 3.0]), [1, 36, 7], 0.01, 0.9
  deltas = {"w": jnp.asarray(np.stack([_momentum_sgd_delta(g[c], lr, rho, taus[c]) for c in range(3)]))}
  p = n / n.sum()
  target = -(p @ g)
  cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  nova = np.asarray(aggregate(deltas, n, [accumulation_norm(t, rho) for t in taus])["w"])
  assert cos(nova, target) == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(nova, lr * (p @ [accumulation_norm(t, rho) for t in taus]) * target, rtol=1e-5)
  old = np.asarray(aggregate(deltas, n, taus)["w"])  # the former step-count normalisation
  assert cos(old, target) < 0.99
  same = {"w": jnp.asarray(np.stack([_momentum_sgd_delta(g[c], lr, rho, 5) for c in range(3)]))}
  np.testing.assert_allclose(aggregate(same, n, [accumulation_norm(5, rho)] * 3)["w"], aggregate(same, n)["w"],
                             rtol=1e-6)


def test_aggregators_weights_against_optax_measured_norms():
  """Each aggregator's weights, derived a second way: accumulation norms measured by running
  optax's momentum SGD on a unit gradient, combined by hand."""
  samples, steps, nominal = [10, 30, 20], [2, 14, 5], [6, 7, 5]
  task = mt.get_task("digits_mlp")  # SGD momentum 0.9
  p = np.array(samples, float) / sum(samples)
  a = np.array([_optax_norm(s, 0.9) for s in steps])
  a_nom = np.array([_optax_norm(s, 0.9) for s in nominal])
  want = {"fedavg": p, "fednova": p / a * (p @ a), "fednova_nominal": p * a_nom / a}
  for name, w in want.items():
    got = make_algorithm(task, name).weights(samples, steps, nominal)
    np.testing.assert_allclose(got["delta"], w, rtol=1e-5)
    np.testing.assert_allclose(got["model_state"], p, rtol=1e-6)  # statistics: always by samples
  # an unchanged client enters fednova_nominal exactly as in FedAvg; a cut one is scaled up
  w = make_algorithm(task, "fednova_nominal").weights(samples, steps, nominal)["delta"]
  assert w[2] == pytest.approx(p[2], rel=1e-6) and w[0] > p[0] and w[1] < p[1]
  # staleness (FedBuff): (1 + s)^-0.5 on top
  st = make_algorithm(task, "fedavg").weights(samples, steps, nominal, staleness=[0, 3, 8])["delta"]
  np.testing.assert_allclose(st, p * np.array([1.0, 0.5, 1 / 3]), rtol=1e-6)


def test_fednova_falls_back_to_step_counts_for_other_optimizers_and_says_so():
  class AdamTask:
    name, momentum = "adam_task", None
  with pytest.warns(UserWarning, match="not \\(momentum\\) SGD"):
    rho, note = fednova_momentum(AdamTask())
  assert rho == 0.0 and "fallback" in note
  assert fednova_momentum(mt.get_task("digits_mlp"))[0] == mt.get_task("digits_mlp").momentum


def test_one_client_one_step_is_plain_sgd():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=1, clients_per_round=1, rounds=1,
                  local_epochs=1 / 45, alpha=None, simulator="loop", seed=5)
  fed = build_federation(cfg)
  assert fed.workloads(0) == {"digits_mlp": 1}
  res = run_federated(cfg, MLP_MODEL, progress=False, fed=fed)
  task = mt.get_task("digits_mlp")
  ds = mt.load_dataset(task.dataset)
  ids = batch_indices(fed.tasks[0].shards[0], task.batch_size, 1, client_seed(5, 0, 0, 0))[0]
  params = init_variables(task, 5)[0]
  grads = jax.grad(lambda p: loss_and_metrics(task, p, {"image": ds.x_train[ids], "label": ds.y_train[ids]})[0])(params)
  expected = jax.tree.map(lambda p, g: p - task.learning_rate * g, params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), res.state.params["digits_mlp"],
               expected)


def test_a_round_is_the_weighted_average_of_client_updates():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=3, clients_per_round=3, rounds=1, alpha=1.0,
                  simulator="loop", server_lr=0.5, seed=1)
  fed = build_federation(cfg)
  res = run_federated(cfg, MLP_MODEL, progress=False, fed=fed)
  start = init_variables(mt.get_task("digits_mlp"), 1)[0]
  works = [ClientWork(c, fed.tasks[0].shards[c], fed.workloads(c)["digits_mlp"], client_seed(1, 0, 0, c))
           for c in range(3)]
  deltas = [d["delta"] for d in client_deltas(fed, "digits_mlp", start, works)]
  n = [len(fed.tasks[0].shards[c]) for c in range(3)]
  expected = jax.tree.map(lambda p, *d: p + 0.5 * sum(ni * di for ni, di in zip(n, d)) / sum(n), start, *deltas)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), res.state.params["digits_mlp"],
               expected)


def test_vmap_and_loop_simulators_agree():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=6, clients_per_round=4, rounds=2, alpha=0.5, seed=2)
  a = run_federated(replace(cfg, simulator="loop"), MLP_MODEL, progress=False)
  b = run_federated(replace(cfg, simulator="vmap"), MLP_MODEL, progress=False)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a.state.params, b.state.params)
  assert a.history[-1]["round_time_s"] == b.history[-1]["round_time_s"]
  assert a.executors == {"digits_mlp": "loop"} and b.executors == {"digits_mlp": "batched-vmap"}


def test_digits_fedavg_reaches_90_percent():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=10, clients_per_round=10, rounds=40, local_epochs=1.0,
                  alpha=0.5, seed=0)
  res = run_federated(cfg, MLP_MODEL, progress=False)
  assert res.final_accuracy()["digits_mlp"] >= 0.90


TWO = VRModel({"digits_mlp": 2e-4, "mnist_lenet": 4e-3}, {"digits_mlp": 0.6, "mnist_lenet": 0.9}, {})
TWO_CFG = FedConfig(tasks=("digits_mlp", "mnist_lenet"), num_clients=8, clients_per_round=6, rounds=3,
                    local_epochs=0.5, alpha=1.0, simulator="loop", seed=4)
SYNC = [p for p, v in POLICIES.items() if not v.asynchronous and p in ("none", "intra", "deadline", "overselect",
                                                                       "full")]


@pytest.fixture(scope="module")
def policy_runs():
  return {p: run_federated(replace(TWO_CFG, policy=p, clients_per_round=5 if p == "overselect" else 6), TWO,
                           progress=False) for p in SYNC}


def test_work_is_steps_times_solo_step_time_of_the_aggregated_clients(policy_runs):
  for p, r in policy_runs.items():
    work, samples, beyond = 0.0, 0, 0.0
    for h in r.history:
      gone = {f["client"] for f in h["failures"]}
      kept = {c: wl for c, wl in h["workloads"].items() if int(c) not in gone}
      rows = sum(n * TWO.solo_step_s[t] for wl in kept.values() for t, n in wl.items())
      assert h["work_s"] == pytest.approx(rows, rel=1e-9), p
      work += rows
      samples += sum(n * mt.get_task(t).batch_size for wl in kept.values() for t, n in wl.items())
      fed = build_federation(r.cfg)
      beyond += sum(max(0, n - fed.workloads(int(c))[t]) * TWO.solo_step_s[t] for c, wl in kept.items()
                    for t, n in wl.items())
    assert r.fl_throughput == pytest.approx(work / r.virtual_time_s, rel=1e-9)
    assert r.samples_per_s == pytest.approx(samples / r.virtual_time_s, rel=1e-9)
    assert r.work_beyond_nominal_s == pytest.approx(beyond, rel=1e-9, abs=1e-12)
    assert (beyond > 0) == (p == "full"), p  # only full extends fast clients' epochs


def test_policies_change_the_clock_not_the_training(policy_runs):
  none, intra = policy_runs["none"], policy_runs["intra"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), none.state.params, intra.state.params)
  assert intra.virtual_time_s <= none.virtual_time_s
  idle = lambda r: np.mean([v for h in r.history for v in h["idle_s"].values()])
  assert idle(policy_runs["full"]) < idle(intra)


def _times(fed, clients, shares="equal"):
  return {c: client_compute_time(TWO, fed.workloads(c), shares, fed.fleet.speed[c])
          + transfer_time(fed.model_bytes, [t for t, w in fed.workloads(c).items() if w], fed.fleet.bandwidth[c])
          for c in clients}


def test_deadline_drops_the_clients_slower_than_the_quantile_and_waits_for_the_deadline(policy_runs):
  r = policy_runs["deadline"]
  fed = build_federation(r.cfg)
  for h in r.history:
    times = _times(fed, h["sampled"])
    ordered = sorted(times.values())  # median of 6 sampled clients: mean of the 3rd and 4th
    deadline = (ordered[2] + ordered[3]) / 2
    assert h["round_time_s"] == pytest.approx(deadline)
    assert sorted(f["client"] for f in h["failures"]) == sorted(c for c, t in times.items() if t > deadline)
    assert len(h["idle_s"]) == 3


def test_overselect_samples_more_and_aggregates_the_first_k_to_finish(policy_runs):
  r = policy_runs["overselect"]  # 5 per round: samples ceil(1.3 * 5) = 7
  fed = build_federation(r.cfg)
  for h in r.history:
    assert len(h["sampled"]) == 7
    times = _times(fed, h["sampled"])
    first = sorted(times, key=lambda c: (times[c], c))[:5]
    assert sorted(int(c) for c in h["idle_s"]) == sorted(first)
    assert h["round_time_s"] == pytest.approx(max(times[c] for c in first))
    assert {f["kind"] for f in h["failures"]} == {"over-selected"} and len(h["failures"]) == 2


def test_deadline_aggregates_only_the_clients_that_made_it():
  cfg = replace(TWO_CFG, policy="deadline", rounds=1)
  r = run_federated(cfg, TWO, progress=False)
  kept = [int(c) for c in r.history[0]["idle_s"]]
  fed = build_federation(cfg)
  start = init_variables(mt.get_task("digits_mlp"), 4)[0]
  works = [ClientWork(c, fed.tasks[0].shards[c], fed.workloads(c)["digits_mlp"], client_seed(4, 0, 0, c))
           for c in kept]
  deltas = [d["delta"] for d in client_deltas(fed, "digits_mlp", start, works)]
  n = [len(fed.tasks[0].shards[c]) for c in kept]
  expected = jax.tree.map(lambda p, *d: p + sum(ni * di for ni, di in zip(n, d)) / sum(n), start, *deltas)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), r.state.params["digits_mlp"],
               expected)


def test_time_budget_stops_before_the_round_that_would_overrun_it(policy_runs):
  budget = policy_runs["none"].history[1]["virtual_time_s"] * 1.01
  for p in ("none", "full", "deadline"):
    capped = run_federated(replace(TWO_CFG, policy=p, rounds=20, time_budget_s=budget), TWO, progress=False)
    k = len(capped.history)
    assert capped.virtual_time_s <= budget
    longer = run_federated(replace(TWO_CFG, policy=p, rounds=k + 1), TWO, progress=False)
    assert longer.virtual_time_s > budget  # the next round would have ended past the budget
    assert longer.history[k - 1]["virtual_time_s"] == capped.virtual_time_s
    assert "accuracy" in capped.history[-1]


def test_evaluation_grid_evaluates_the_model_that_holds_at_each_point():
  cfg = replace(TWO_CFG, rounds=4, eval_every_s=0.05, tasks=("digits_mlp",))
  model = VRModel({"digits_mlp": 2e-4}, {"digits_mlp": 1.0}, {})
  res = run_federated(cfg, model, progress=False)
  ends = [h["virtual_time_s"] for h in res.history]
  grid = [e["virtual_time_s"] for e in res.evaluations]
  assert grid == pytest.approx([0.05 * (i + 1) for i in range(len(grid))]) and grid[-1] <= ends[-1]
  assert len(grid) == int(ends[-1] / 0.05 + 1e-9)
  for e in res.evaluations:  # the model at g is the one after the last round ending at or before g
    done = sum(1 for t in ends if t <= e["virtual_time_s"] + 1e-12)
    assert e["rounds"] == done
    if done:
      assert e["metrics"] == res.history[done - 1]["accuracy"]


def test_measured_correction_replaces_the_model_for_its_mix_only():
  wl = {"digits_mlp": 50, "mnist_lenet": 10}
  corr = MixCorrections({mix_key(wl, TWO.solo_step_s): {"equal": 1.7}})
  base = client_compute_time(TWO, wl, "equal", 2.0)
  assert client_compute_time(TWO, wl, "equal", 2.0, corr, with_source=True) == (pytest.approx(1.7 * base), True)
  assert client_compute_time(TWO, wl, "competitive", 2.0, corr, with_source=True)[1] is False
  assert mix_key({"digits_mlp": 100, "mnist_lenet": 20}, TWO.solo_step_s) == mix_key(wl, TWO.solo_step_s)
  other = {"digits_mlp": 5000, "mnist_lenet": 1}
  assert client_compute_time(TWO, other, "equal", 2.0, corr, with_source=True)[1] is False


def test_timed_out_clients_are_dropped_and_recorded():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=3, clients_per_round=3, rounds=1, alpha=1.0,
                  simulator="loop", seed=1)
  fed = build_federation(cfg)
  times = _times(fed, range(3))
  slowest = max(times, key=times.get)
  limit = max(t for c, t in times.items() if c != slowest) * 1.001
  res = run_federated(replace(cfg, client_timeout_s=limit), MLP_MODEL, progress=False)
  h = res.history[0]
  assert h["failures"] == [{"client": slowest, "task": "*", "kind": "timeout"}]
  assert h["round_time_s"] == pytest.approx(limit)  # the server waited the timeout
  # the round is the others' update alone
  start = init_variables(mt.get_task("digits_mlp"), 1)[0]
  kept = [c for c in range(3) if c != slowest]
  works = [ClientWork(c, fed.tasks[0].shards[c], fed.workloads(c)["digits_mlp"], client_seed(1, 0, 0, c))
           for c in kept]
  deltas = [d["delta"] for d in client_deltas(fed, "digits_mlp", start, works)]
  n = [len(fed.tasks[0].shards[c]) for c in kept]
  expected = jax.tree.map(lambda p, *d: p + sum(ni * di for ni, di in zip(n, d)) / sum(n), start, *deltas)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), res.state.params["digits_mlp"],
               expected)
  # every client times out: the global model is kept
  none = run_federated(replace(cfg, client_timeout_s=min(times.values()) * 0.5), MLP_MODEL, progress=False)
  jax.tree.map(np.testing.assert_array_equal, none.state.params["digits_mlp"], start)


class NaNClient(ClientExecutor):
  """A test's own faulty executor: client 0's update comes back non-finite in round 1."""
  name = "nan_test"

  def __init__(self, fed_task, program, **options):
    self.inner, self.calls = LoopExecutor(fed_task, program), 0

  def run(self, broadcast, works, weights, client_states=None):
    agg = self.inner.run(broadcast, works, weights, client_states)
    self.calls += 1
    if self.calls == 2:
      finite = agg.finite.copy()
      finite[[w.client for w in works].index(0)] = False
      agg = Aggregate(agg.clients, jax.tree.map(lambda a: a * np.nan, agg.sums), finite, agg.client_states)
    return agg


def test_nan_update_stops_naming_task_round_client_and_keeps_checkpoint(tmp_path):
  register_executor("nan_test", NaNClient)
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=2, clients_per_round=2, rounds=3, alpha=1.0,
                  simulator="nan_test", seed=1)
  with pytest.raises(NonFiniteUpdate, match="task 'digits_mlp', round 1, client 0"):
    run_federated(cfg, MLP_MODEL, workdir=tmp_path, progress=False)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("kw,match", [
    (dict(num_clients=0), "num_clients must be an integer >= 1"),
    (dict(alpha=0.0), "alpha must be a finite number > 0"),
    (dict(alpha=-1.0), "alpha must be a finite number > 0"),
    (dict(num_clients=3, clients_per_round=5), "clients_per_round must be between 1 and num_clients"),
    (dict(tasks=()), "no tasks"),
    (dict(tasks=("alexnet",)), "unknown task 'alexnet'"),
    (dict(policy="fast"), "unknown policy 'fast'"),
    (dict(rounds=0), "rounds must be"),
    (dict(time_budget_s=0.0), "time_budget_s must be"),
    (dict(devices=2), "devices=2 is used only by simulator='sharded'"),
    (dict(aggregator="median"), "unknown aggregator 'median'"),
    (dict(server_optimizer="adamx"), "unknown server_optimizer 'adamx'"),
    (dict(server_optimizer="adam", server_kwargs={"momentum": 0.9}), "does not take server_kwargs"),
    (dict(dropout=1.0), "dropout must be below 1"),
    (dict(prox_mu=-0.1), "prox_mu must be a finite number >= 0"),
    (dict(algorithm="fedsgd"), "unknown algorithm 'fedsgd'"),
    (dict(algorithm="scaffold", policy="fedbuff"), "scaffold' needs synchronous rounds"),
])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    FedConfig(**kw)


def test_task_without_real_data_is_refused(tmp_path, monkeypatch):
  monkeypatch.setenv("MTFL_DATA_DIR", str(tmp_path))
  with pytest.raises(mt.DatasetUnavailableError, match="cifar10"):
    build_federation(FedConfig(tasks=("cifar_resnet",)))


def test_workdir_with_another_config_is_not_touched(tmp_path):
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=2, clients_per_round=2, rounds=2, simulator="loop")
  run_federated(cfg, MLP_MODEL, workdir=tmp_path, progress=False)
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  with pytest.raises(ValueError, match="different config"):
    run_federated(replace(cfg, seed=9), MLP_MODEL, workdir=tmp_path, progress=False)
  with pytest.raises(ValueError, match="holds a run of 2 finished round\\(s\\) but rounds=1"):
    run_federated(replace(cfg, rounds=1), MLP_MODEL, workdir=tmp_path, progress=False)
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_sigkill_mid_round_then_resume_equals_uninterrupted(tmp_path):
  script = str(Path(__file__).with_name("fed_run_script.py"))
  run = lambda *a: subprocess.run([sys.executable, script, *a], capture_output=True, text=True, timeout=300)
  ref = run("-", str(tmp_path / "ref.npz"))
  assert ref.returncode == 0, ref.stderr[-2000:]
  killed = run(str(tmp_path / "w"), str(tmp_path / "x.npz"), "2")
  assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL, after round 2's first task
  assert not (tmp_path / "x.npz").exists()
  resumed = run(str(tmp_path / "w"), str(tmp_path / "res.npz"))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "res.npz")
  assert set(a.files) == set(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])
  ha = json.loads((tmp_path / "ref.npz.json").read_text())
  hb = json.loads((tmp_path / "res.npz.json").read_text())
  assert ha == hb and len(hb) == 4


def test_task_scales_is_the_least_change_that_meets_the_deadline():
  work = {"light": 0.02, "mid": 0.3, "heavy": 2.0}
  f = np.array(list(work.values())) / sum(work.values())
  for scale in (0.6, 1.0, 1.7):
    got = task_scales(work, scale, 0.01, 100.0)
    # second derivation: the minimum-norm solution x of f . x = scale - 1 (numpy's lstsq)
    x = np.linalg.lstsq(f[None, :], np.array([scale - 1.0]), rcond=None)[0]
    np.testing.assert_allclose([got[t] for t in work], 1.0 + x, rtol=1e-9)
    assert abs(sum(fi * got[t] for fi, t in zip(f, work)) - scale) < 1e-9  # total work scaled
  got = task_scales(work, 1.7, 0.5, 2.0)
  assert abs(got["light"] - 1.0) < 0.02 and got["heavy"] > 1.6  # time lives in the heavy task
  assert task_scales({"a": 1.0}, 3.0, 0.5, 2.0) == {"a": 2.0}  # clipped to max_work_scale


def test_full_without_extension_never_exceeds_the_clients_epochs():
  r = run_federated(replace(TWO_CFG, policy="full", extend=False), TWO, progress=False)
  fed = build_federation(r.cfg)
  for h in r.history:
    for c, wl in h["workloads"].items():
      assert all(n <= fed.workloads(int(c))[t] for t, n in wl.items())
  assert r.work_beyond_nominal_s == 0.0


def test_resume_uses_the_runs_own_clock(tmp_path, monkeypatch):
  cfg = replace(TWO_CFG, rounds=3, clients_per_round=4)
  fed = build_federation(cfg)
  # a correction for every client's mix, so that a resume without it would change the clock
  corr = MixCorrections({mix_key(fed.workloads(c), TWO.solo_step_s): {"equal": 1.5, "competitive": 1.5}
                         for c in range(cfg.num_clients)})
  ref = run_federated(cfg, TWO, progress=False, corrections=corr)
  plain = run_federated(cfg, TWO, progress=False)
  assert plain.virtual_time_s != ref.virtual_time_s
  run_federated(replace(cfg, rounds=2), TWO, workdir=tmp_path, progress=False, corrections=corr)

  def no_calibration(*a, **k):
    raise AssertionError("a resumed run recalibrated")
  monkeypatch.setattr(mt.calibration, "calibrate_mix", no_calibration)
  res = run_federated(cfg, workdir=tmp_path, progress=False)
  assert [h["round"] for h in res.history] == [0, 1, 2]
  assert res.history == ref.history
  jax.tree.map(np.testing.assert_array_equal, res.state.params, ref.state.params)
