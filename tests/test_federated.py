import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtfl_jax as mt
from mtfl_jax.federated import (ClientWork, FedConfig, NonFiniteUpdate, aggregate, build_federation,
                                client_seed, init_server, run_clients, run_federated)
from mtfl_jax.train import batch_indices
from mtfl_jax.vresource import VRModel

MLP_MODEL = VRModel({"digits_mlp": 2e-4}, {"digits_mlp": 1.0}, {})


def test_fedavg_by_hand():
  deltas = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [-4.0, 0.0]])}  # three clients, stacked
  n = [1, 3, 4]
  # (1*[1,2] + 3*[3,4] + 4*[-4,0]) / 8 = [-6, 14] / 8
  np.testing.assert_allclose(aggregate(deltas, n)["w"], [-0.75, 1.75])
  # FedNova with steps 1, 3, 2: p = [1/8, 3/8, 4/8], tau_eff = (1 + 9 + 8) / 8 = 2.25
  # sum p d / tau = [1/8 + 3/8 - 1, 2/8 + 4/8 + 0] = [-0.5, 0.75]; times 2.25
  np.testing.assert_allclose(aggregate(deltas, n, [1, 3, 2])["w"], [-1.125, 1.6875])


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


def test_policies_change_the_clock_not_the_training_and_full_removes_waiting():
  model = VRModel({"digits_mlp": 2e-4, "mnist_lenet": 4e-3}, {"digits_mlp": 0.6, "mnist_lenet": 0.9}, {})
  base = FedConfig(tasks=("digits_mlp", "mnist_lenet"), num_clients=8, clients_per_round=8, rounds=2,
                   local_epochs=0.5, alpha=1.0, simulator="loop", seed=4)
  runs = {p: run_federated(dataclasses_replace(base, policy=p), model, progress=False) for p in ("none", "intra", "full")}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), runs["none"].state.params, runs["intra"].state.params)
  assert runs["intra"].virtual_time_s <= runs["none"].virtual_time_s
  idle = lambda r: np.mean([v for h in r.history for v in h["idle_s"].values()])
  assert idle(runs["full"]) < idle(runs["intra"])
  assert runs["full"].fl_throughput > runs["intra"].fl_throughput


def test_failed_clients_are_dropped_and_recorded():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=3, clients_per_round=3, rounds=1, alpha=1.0,
                  simulator="loop", seed=1, faults=((0, 1, "raise"), (0, 2, "timeout")))
  res = run_federated(cfg, MLP_MODEL, progress=False)
  kinds = sorted((f["client"], f["kind"]) for f in res.history[0]["failures"])
  assert kinds == [(1, "raise"), (2, "timeout")]
  # only client 0 is left: the round is its update alone
  ok = run_federated(FedConfig(tasks=("digits_mlp",), num_clients=3, clients_per_round=3, rounds=1, alpha=1.0,
                               simulator="loop", seed=1, faults=((0, 1, "raise"), (0, 2, "raise"))),
                     MLP_MODEL, progress=False)
  jax.tree.map(np.testing.assert_array_equal, res.state.params, ok.state.params)
  # every client fails: the global model is kept
  allfail = run_federated(FedConfig(tasks=("digits_mlp",), num_clients=2, clients_per_round=2, rounds=1,
                                    alpha=1.0, simulator="vmap", seed=1, faults=((0, 0, "raise"), (0, 1, "raise"))),
                          MLP_MODEL, progress=False)
  jax.tree.map(np.testing.assert_array_equal, allfail.state.params, init_server(allfail.cfg).params)


def test_nan_update_stops_naming_task_round_client_and_keeps_checkpoint(tmp_path):
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=2, clients_per_round=2, rounds=3, alpha=1.0,
                  simulator="loop", seed=1, faults=((1, 0, "nan"),))
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
