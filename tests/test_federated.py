import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtfl_jax as mt
import optax

from mtfl_jax.clock import MixCorrections, client_compute_time, mix_key
from mtfl_jax.federated import (POLICIES, ClientWork, FedConfig, NonFiniteUpdate, accumulation_norm, aggregate,
                                build_federation, client_seed, fednova_norm_kind, init_server,
                                run_clients, run_federated)
from mtfl_jax.train import batch_indices
from mtfl_jax.vresource import VRModel

MLP_MODEL = VRModel({"digits_mlp": 2e-4}, {"digits_mlp": 1.0}, {})


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


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_accumulation_norm_is_what_the_client_optimizer_accumulates(rho):
  # a constant unit gradient for tau steps moves x by -lr * ||a||_1: measured with optax itself
  for tau in (1, 2, 7, 36):
    tx = optax.sgd(0.1, momentum=rho or None)
    x = jnp.zeros(())
    st = tx.init(x)
    for _ in range(tau):
      u, st = tx.update(jnp.ones(()), st, x)
      x = optax.apply_updates(x, u)
    assert accumulation_norm(tau, rho) == pytest.approx(-float(x) / 0.1, rel=1e-5)
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
  # magnitude: as if every client had stepped the weighted mean accumulation norm
  np.testing.assert_allclose(nova, lr * (p @ [accumulation_norm(t, rho) for t in taus]) * target, rtol=1e-5)
  old = np.asarray(aggregate(deltas, n, taus)["w"])  # the former step-count normalisation
  assert cos(old, target) < 0.99
  # equal step counts: FedNova is FedAvg
  same = {"w": jnp.asarray(np.stack([_momentum_sgd_delta(g[c], lr, rho, 5) for c in range(3)]))}
  np.testing.assert_allclose(aggregate(same, n, [accumulation_norm(5, rho)] * 3)["w"], aggregate(same, n)["w"],
                             rtol=1e-6)


def test_fednova_falls_back_to_step_counts_for_other_optimizers_and_says_so():
  class AdamTask:
    name, momentum = "adam_task", None
  with pytest.warns(UserWarning, match="not \\(momentum\\) SGD"):
    rho, note = fednova_norm_kind(AdamTask())
  assert rho is None and "fallback" in note
  assert fednova_norm_kind(mt.get_task("digits_mlp"))[0] == mt.get_task("digits_mlp").momentum


def test_one_client_one_step_is_plain_sgd():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=1, clients_per_round=1, rounds=1,
                  local_epochs=1 / 45, alpha=None, simulator="loop", seed=5)
  fed = build_federation(cfg)
  assert fed.workloads(0) == {"digits_mlp": 1}
  res = run_federated(cfg, MLP_MODEL, progress=False, fed=fed)
  task = mt.get_task("digits_mlp")
  ds = mt.load_dataset(task.dataset)
  ids = batch_indices(fed.shards["digits_mlp"][0], task.batch_size, 1, client_seed(5, 0, 0, 0))[0]
  params = mt.init_state(task, 5).params
  grads = jax.grad(lambda p: mt.train._loss_and_metrics(task, p, {"image": ds.x_train[ids], "label": ds.y_train[ids]})[0])(params)
  expected = jax.tree.map(lambda p, g: p - task.learning_rate * g, params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), res.state.params["digits_mlp"], expected)


def test_a_round_is_the_weighted_average_of_client_updates():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=3, clients_per_round=3, rounds=1, alpha=1.0,
                  simulator="loop", server_lr=0.5, seed=1)
  fed = build_federation(cfg)
  res = run_federated(cfg, MLP_MODEL, progress=False, fed=fed)
  start = init_server(cfg).params["digits_mlp"]
  task, ds = mt.get_task("digits_mlp"), fed.datasets["digits_mlp"]
  works = [ClientWork(c, fed.shards["digits_mlp"][c], fed.workloads(c)["digits_mlp"], client_seed(1, 0, 0, c))
           for c in range(3)]
  res_ = run_clients(task, ds, start, works, "loop")
  assert res_.clients == [0, 1, 2]
  n = [len(fed.shards["digits_mlp"][c]) for c in range(3)]
  expected = jax.tree.map(lambda p, d: p + 0.5 * sum(ni * d[i] for i, ni in enumerate(n)) / sum(n), start, res_.deltas)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), res.state.params["digits_mlp"], expected)


def test_vmap_and_loop_simulators_agree():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=6, clients_per_round=4, rounds=2, alpha=0.5, seed=2)
  a = run_federated(dataclasses_replace(cfg, simulator="loop"), MLP_MODEL, progress=False)
  b = run_federated(dataclasses_replace(cfg, simulator="vmap"), MLP_MODEL, progress=False)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a.state.params, b.state.params)
  assert a.history[-1]["round_time_s"] == b.history[-1]["round_time_s"]


def dataclasses_replace(cfg, **kw):
  import dataclasses
  return dataclasses.replace(cfg, **kw)


def test_digits_fedavg_reaches_90_percent():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=10, clients_per_round=10, rounds=40, local_epochs=1.0,
                  alpha=0.5, seed=0)
  res = run_federated(cfg, MLP_MODEL, progress=False)
  assert res.final_accuracy()["digits_mlp"] >= 0.90


TWO = VRModel({"digits_mlp": 2e-4, "mnist_lenet": 4e-3}, {"digits_mlp": 0.6, "mnist_lenet": 0.9}, {})
TWO_CFG = FedConfig(tasks=("digits_mlp", "mnist_lenet"), num_clients=8, clients_per_round=6, rounds=3,
                    local_epochs=0.5, alpha=1.0, simulator="loop", seed=4)


@pytest.fixture(scope="module")
def policy_runs():
  return {p: run_federated(dataclasses_replace(TWO_CFG, policy=p), TWO, progress=False) for p in POLICIES}


def test_work_is_steps_times_solo_step_time_of_the_aggregated_clients(policy_runs):
  for p, r in policy_runs.items():
    work = 0.0
    for h in r.history:
      gone = {f["client"] for f in h["failures"]}
      rows = sum(n * TWO.solo_step_s[t] for c, wl in h["workloads"].items() if int(c) not in gone
                 for t, n in wl.items())
      assert h["work_s"] == pytest.approx(rows, rel=1e-9), p
      work += rows
    # one lenet step is worth 20 mlp steps: throughput is not the sample count
    assert r.fl_throughput == pytest.approx(work / r.virtual_time_s, rel=1e-9)
    assert r.samples_per_s * 1e-6 < r.fl_throughput


def test_policies_change_the_clock_not_the_training(policy_runs):
  none, intra = policy_runs["none"], policy_runs["intra"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), none.state.params, intra.state.params)
  assert intra.virtual_time_s <= none.virtual_time_s
  idle = lambda r: np.mean([v for h in r.history for v in h["idle_s"].values()])
  assert idle(policy_runs["full"]) < idle(intra)


def test_deadline_drops_the_clients_slower_than_the_quantile_and_waits_for_the_deadline(policy_runs):
  r = policy_runs["deadline"]
  fed = build_federation(r.cfg)
  for h in r.history:
    times = {c: client_compute_time(TWO, fed.workloads(c), "equal", fed.fleet.speed[c])
             + mt.clock.transfer_time(fed.model_bytes, [t for t, w in fed.workloads(c).items() if w],
                                      fed.fleet.bandwidth[c]) for c in h["sampled"]}
    ordered = sorted(times.values())  # median of 6 sampled clients: mean of the 3rd and 4th
    deadline = (ordered[2] + ordered[3]) / 2
    assert h["round_time_s"] == pytest.approx(deadline)
    assert sorted(f["client"] for f in h["failures"]) == sorted(c for c, t in times.items() if t > deadline)
    assert len(h["idle_s"]) == 3


def test_deadline_aggregates_only_the_clients_that_made_it():
  cfg = dataclasses_replace(TWO_CFG, policy="deadline", rounds=1)
  r = run_federated(cfg, TWO, progress=False)
  kept = [int(c) for c in r.history[0]["idle_s"]]
  fed = build_federation(cfg)
  start = init_server(cfg).params["digits_mlp"]
  works = [ClientWork(c, fed.shards["digits_mlp"][c], fed.workloads(c)["digits_mlp"], client_seed(4, 0, 0, c))
           for c in kept]
  res = run_clients(mt.get_task("digits_mlp"), fed.datasets["digits_mlp"], start, works, "loop")
  n = [len(fed.shards["digits_mlp"][c]) for c in kept]
  expected = jax.tree.map(lambda p, d: p + sum(ni * d[i] for i, ni in enumerate(n)) / sum(n), start, res.deltas)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), r.state.params["digits_mlp"],
               expected)


def test_time_budget_stops_before_the_round_that_would_overrun_it(policy_runs):
  budget = policy_runs["none"].history[1]["virtual_time_s"] * 1.01
  for p in ("none", "full", "deadline"):
    capped = run_federated(dataclasses_replace(TWO_CFG, policy=p, rounds=20, time_budget_s=budget), TWO, progress=False)
    k = len(capped.history)
    assert capped.virtual_time_s <= budget
    longer = run_federated(dataclasses_replace(TWO_CFG, policy=p, rounds=k + 1), TWO, progress=False)
    assert longer.virtual_time_s > budget  # the next round would have ended past the budget
    assert longer.history[k - 1]["virtual_time_s"] == capped.virtual_time_s
    assert "accuracy" in capped.history[-1]


def test_measured_correction_replaces_the_model_for_its_mix_only():
  wl = {"digits_mlp": 50, "mnist_lenet": 10}
  corr = MixCorrections({mix_key(wl, TWO.solo_step_s): {"equal": 1.7}})
  base = client_compute_time(TWO, wl, "equal", 2.0)
  assert client_compute_time(TWO, wl, "equal", 2.0, corr, with_source=True) == (pytest.approx(1.7 * base), True)
  assert client_compute_time(TWO, wl, "competitive", 2.0, corr, with_source=True)[1] is False
  # scaling all of a client's work keeps its mix (full's scaled clients use the same correction)
  assert mix_key({"digits_mlp": 100, "mnist_lenet": 20}, TWO.solo_step_s) == mix_key(wl, TWO.solo_step_s)
  other = {"digits_mlp": 5000, "mnist_lenet": 1}
  assert client_compute_time(TWO, other, "equal", 2.0, corr, with_source=True)[1] is False


def test_failed_clients_are_dropped_and_recorded():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=3, clients_per_round=3, rounds=1, alpha=1.0,
                  simulator="loop", seed=1)
  res = run_federated(cfg, MLP_MODEL, progress=False, faults=((0, 1, "raise"), (0, 2, "timeout")))
  kinds = sorted((f["client"], f["kind"]) for f in res.history[0]["failures"])
  assert kinds == [(1, "raise"), (2, "timeout")]
  # only client 0 is left: the round is its update alone
  ok = run_federated(FedConfig(tasks=("digits_mlp",), num_clients=3, clients_per_round=3, rounds=1, alpha=1.0,
                               simulator="loop", seed=1),
                     MLP_MODEL, progress=False, faults=((0, 1, "raise"), (0, 2, "raise")))
  jax.tree.map(np.testing.assert_array_equal, res.state.params, ok.state.params)
  # every client fails: the global model is kept
  allfail = run_federated(FedConfig(tasks=("digits_mlp",), num_clients=2, clients_per_round=2, rounds=1,
                                    alpha=1.0, simulator="vmap", seed=1),
                          MLP_MODEL, progress=False, faults=((0, 0, "raise"), (0, 1, "raise")))
  jax.tree.map(np.testing.assert_array_equal, allfail.state.params, init_server(allfail.cfg).params)


def test_nan_update_stops_naming_task_round_client_and_keeps_checkpoint(tmp_path):
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=2, clients_per_round=2, rounds=3, alpha=1.0,
                  simulator="loop", seed=1)
  with pytest.raises(NonFiniteUpdate, match="task 'digits_mlp', round 1, client 0"):
    run_federated(cfg, MLP_MODEL, workdir=tmp_path, progress=False, faults=((1, 0, "nan"),))
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
])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    FedConfig(**kw)


def test_task_without_real_data_is_refused(tmp_path, monkeypatch):
  monkeypatch.setenv("MTFL_DATA_DIR", str(tmp_path))
  with pytest.raises(mt.DatasetUnavailableError, match="cifar10"):
    build_federation(FedConfig(tasks=("cifar_resnet",)))


def test_workdir_with_another_config_is_not_touched(tmp_path):
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=2, clients_per_round=2, rounds=1, simulator="loop")
  run_federated(cfg, MLP_MODEL, workdir=tmp_path, progress=False)
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(ValueError, match="different config"):
    run_federated(dataclasses_replace(cfg, seed=9), MLP_MODEL, workdir=tmp_path, progress=False)
  assert (tmp_path / "config.json").read_text() == before


def test_sigkill_mid_round_then_resume_equals_uninterrupted(tmp_path):
  script = str(Path(__file__).with_name("fed_run_script.py"))
  run = lambda *a: subprocess.run([sys.executable, script, *a], capture_output=True, text=True, timeout=300)
  ref = run("-", str(tmp_path / "ref.npz"))
  assert ref.returncode == 0, ref.stderr[-2000:]
  killed = run(str(tmp_path / "w"), str(tmp_path / "x.npz"), "2")
  assert killed.returncode == -9  # SIGKILL, after round 2's first task
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
  from mtfl_jax.federated import task_scales
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


def test_resume_uses_the_checkpoints_model_and_corrections(tmp_path, monkeypatch):
  cfg = dataclasses_replace(TWO_CFG, rounds=3, clients_per_round=4)
  fed = build_federation(cfg)
  # a correction for every client's mix, so that a resume without it would change the clock
  corr = MixCorrections({mix_key(fed.workloads(c), TWO.solo_step_s): {"equal": 1.5, "competitive": 1.5}
                         for c in range(cfg.num_clients)})
  ref = run_federated(cfg, TWO, progress=False, corrections=corr)
  plain = run_federated(cfg, TWO, progress=False)
  assert plain.virtual_time_s != ref.virtual_time_s
  run_federated(dataclasses_replace(cfg, rounds=2), TWO, workdir=tmp_path, progress=False, corrections=corr)

  def no_calibration(*a, **k):
    raise AssertionError("a resumed run recalibrated")
  monkeypatch.setattr(mt.federated.driver, "calibrate_mix", no_calibration)
  res = run_federated(cfg, workdir=tmp_path, progress=False)
  assert [h["round"] for h in res.history] == [0, 1, 2]
  assert res.history == ref.history
  jax.tree.map(np.testing.assert_array_equal, res.state.params, ref.state.params)


def test_fed_nova_nominal_equals_fedavg_of_the_clients_nominal_work():
  """Clients with constant gradients g_c run momentum SGD (rho 0.9) for tau_c steps, but their
  epochs asked for nominal_c steps. Normalised to nominal work, the aggregate must equal
  FedAvg of the runs every client would have made with its nominal steps (both computed by
  a direct numpy loop of optax-style momentum SGD), and a client whose work was not changed
  must enter exactly as in FedAvg."""
  import optax
  from mtfl_jax.federated import ClientUpdates, fed_avg, fed_nova_nominal

  def run(g, steps, lr=0.1, rho=0.9):  # optax.sgd(momentum): v = rho v + g; x -= lr v
    x, v = np.zeros_like(g), np.zeros_like(g)
    for _ in range(steps):
      v = rho * v + g
      x = x - lr * v
    return x

  g = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 1.0]], np.float32)
  samples, steps, nominal = [10, 30, 20], [2, 14, 5], [6, 7, 5]
  deltas = {"w": jnp.asarray(np.stack([run(gc, s) for gc, s in zip(g, steps)]))}
  params = {"w": jnp.zeros(2)}
  tx = optax.sgd(1.0)
  algo = fed_nova_nominal(tx, 0.9)
  got = algo.apply(algo.init(params), ClientUpdates(deltas, {}, samples, steps, nominal)).params["w"]
  want_deltas = {"w": jnp.asarray(np.stack([run(gc, s) for gc, s in zip(g, nominal)]))}
  avg = fed_avg(tx)
  want = avg.apply(avg.init(params), ClientUpdates(want_deltas, {}, samples, nominal)).params["w"]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # with no change of work it is FedAvg itself
  same = algo.apply(algo.init(params), ClientUpdates(deltas, {}, samples, steps, steps)).params["w"]
  plain = avg.apply(avg.init(params), ClientUpdates(deltas, {}, samples, steps)).params["w"]
  np.testing.assert_allclose(same, plain, rtol=1e-6)
