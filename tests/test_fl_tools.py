"""The everyday tools of FL research, each against a reference: server optimizers (optax by
hand), FedProx (closed form on a quadratic; mu = 0 is FedAvg bitwise), SCAFFOLD (no client
drift on heterogeneous quadratics, where FedAvg's fixed point is biased, in closed form),
natural partitions, availability and dropout, metrics writers."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtfl_jax as mt
from mtfl_jax.federated import (ClientWork, FedConfig, build_federation, client_seed, fedavg_program, run_federated)
from mtfl_jax.federated.executors import LoopExecutor
from mtfl_jax.train import init_variables
from mtfl_jax.vresource import VRModel


# --------------------------------------------------------------------------- a quadratic task
class Scalar(nn.Module):
  """One parameter w; a sample x = (a, b) gives the "logits" (w - b, a): its loss a (w - b)^2 / 2."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.zeros, ())
    return jnp.stack([w - x[:, 1], x[:, 0]], axis=-1)


def quad_loss(logits, labels):
  return jnp.mean(0.5 * logits[:, 1] * logits[:, 0] ** 2)


def quadratic_task(name, a, b, n=4, lr=0.1):
  """Client c holds n copies of the sample (a[c], b[c]) (a natural partition): its loss is
  a_c (w - b_c)^2 / 2 exactly, whatever the batch."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  x = np.repeat(np.stack([a, b], 1), n, axis=0)
  ids = np.repeat(np.arange(len(a)), n)
  ds = mt.Dataset.from_arrays(name, x, np.zeros(len(x), np.int64), x[:2], np.zeros(2, np.int64), client_ids=ids)
  return mt.Task(name, Scalar(), ds, learning_rate=lr, momentum=0.0, batch_size=n, loss_fn=quad_loss)


QUAD_MODEL = lambda name: VRModel({name: 1e-4}, {name: 1.0}, {})  # noqa: E731


def test_fedprox_client_update_is_the_closed_form_on_a_quadratic():
  a, b, mu, lr, k, w0 = 2.0, 3.0, 0.5, 0.1, 7, 1.25
  task = quadratic_task("quad_prox", [a], [b])
  cfg = FedConfig(tasks=(task,), num_clients=1, clients_per_round=1, partition="natural")
  ft = build_federation(cfg).tasks[0]
  bc = {"params": {"w": jnp.float32(w0)}, "model_state": {}}
  work = [ClientWork(0, ft.shards[0], k, 0)]
  got = LoopExecutor(ft, fedavg_program(task, mu)).run(bc, work, {"delta": np.ones(1), "model_state": np.ones(1)})
  # w_{j+1} = w_j - lr (a (w_j - b) + mu (w_j - w0)): w* = (a b + mu w0) / (a + mu), and
  # w_k = w* + (1 - lr (a + mu))^k (w0 - w*)
  star = (a * b + mu * w0) / (a + mu)
  want = star + (1 - lr * (a + mu)) ** k * (w0 - star)
  assert float(got.sums["delta"]["w"]) == pytest.approx(want - w0, rel=1e-5)
  plain = LoopExecutor(ft, fedavg_program(task)).run(bc, work, {"delta": np.ones(1), "model_state": np.ones(1)})
  assert float(plain.sums["delta"]["w"]) == pytest.approx(b + (1 - lr * a) ** k * (w0 - b) - w0, rel=1e-5)


def test_fedprox_with_mu_zero_is_fedavg_bitwise():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=4, clients_per_round=3, rounds=2, simulator="loop", seed=2)
  model = VRModel({"digits_mlp": 2e-4}, {"digits_mlp": 1.0}, {})
  avg = run_federated(cfg, model, progress=False)
  prox = run_federated(dataclasses.replace(cfg, prox_mu=0.0), model, progress=False)
  jax.tree.map(np.testing.assert_array_equal, prox.state.params, avg.state.params)
  far = run_federated(dataclasses.replace(cfg, prox_mu=10.0), model, progress=False)  # and mu does act
  assert not np.allclose(jax.tree.leaves(far.state.params)[0], jax.tree.leaves(avg.state.params)[0])


def test_fedadam_is_optax_adam_on_the_averaged_pseudo_gradient():
  cfg = FedConfig(tasks=("digits_mlp",), num_clients=3, clients_per_round=3, rounds=2, simulator="loop", seed=3,
                  server_optimizer="adam", server_lr=0.01, server_kwargs={"b1": 0.9, "b2": 0.99, "eps": 1e-3})
  model = VRModel({"digits_mlp": 2e-4}, {"digits_mlp": 1.0}, {})
  res = run_federated(cfg, model, progress=False)
  # by hand: each round, every client's own delta from the current model (one client per
  # executor call), their sample-weighted mean, and optax.adam applied to its negation
  fed = build_federation(cfg)
  ft = fed.tasks[0]
  ex = LoopExecutor(ft, fedavg_program(ft.task))
  params = init_variables(ft.task, 3)[0]
  tx = optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-3)
  opt = tx.init(params)
  n = np.array([len(ft.shards[c]) for c in range(3)], np.float64)
  for rnd in range(2):
    works = [ClientWork(c, ft.shards[c], fed.workloads(c)["digits_mlp"], client_seed(3, rnd, 0, c)) for c in range(3)]
    deltas = [ex.run({"params": params, "model_state": {}}, [w], {"delta": np.ones(1), "model_state": np.ones(1)})
              .sums["delta"] for w in works]
    mean = jax.tree.map(lambda *d: sum(ni * np.asarray(di, np.float64) for ni, di in zip(n, d)) / n.sum(), *deltas)
    upd, opt = tx.update(jax.tree.map(lambda m: -jnp.asarray(m, jnp.float32), mean), opt, params)
    params = optax.apply_updates(params, upd)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), res.state.params["digits_mlp"],
               params)
  # an optax transformation directly, and FedAvgM by name, run too
  direct = run_federated(cfg, model, progress=False, server_optimizer=tx)
  jax.tree.map(np.testing.assert_array_equal, direct.state.params, res.state.params)
  assert direct.cfg.to_json()["server_optimizer"] == "custom"
  avgm = dataclasses.replace(cfg, server_optimizer="sgd", server_lr=1.0, server_kwargs={"momentum": 0.9})
  assert np.isfinite(run_federated(avgm, model, progress=False).final_accuracy()["digits_mlp"])


def test_scaffold_removes_the_client_drift_that_biases_fedavg():
  """Heterogeneous quadratics a_c (w - b_c)^2 / 2, every client every round, K local SGD steps:
  the global optimum is w* = sum a_c b_c / sum a_c. FedAvg converges to its own fixed point
  sum (1 - q_c) b_c / sum (1 - q_c), q_c = (1 - lr a_c)^K (closed form), not w*; SCAFFOLD to w*."""
  a, b, lr, k = np.array([1.0, 4.0, 0.5]), np.array([2.0, -1.0, 5.0]), 0.1, 5
  task = quadratic_task("quad_drift", a, b, lr=lr)
  base = FedConfig(tasks=(task,), num_clients=3, clients_per_round=3, rounds=60, partition="natural",
                   local_epochs=k, simulator="loop", eval_every=60)
  model = QUAD_MODEL("quad_drift")
  w_star = float(a @ b / a.sum())
  q = (1 - lr * a) ** k
  w_avg = float((1 - q) @ b / (1 - q).sum())
  assert abs(w_avg - w_star) > 0.3  # the drift is large enough to see
  avg = float(run_federated(base, model, progress=False).state.params["quad_drift"]["w"])
  scf = run_federated(dataclasses.replace(base, algorithm="scaffold"), model, progress=False)
  assert avg == pytest.approx(w_avg, abs=1e-4)
  assert float(scf.state.params["quad_drift"]["w"]) == pytest.approx(w_star, abs=1e-4)
  # the server's control variate is the mean of the clients' gradients at the optimum: 0
  assert abs(float(scf.state.models["quad_drift"].extra["control"]["w"])) < 1e-3


def test_scaffold_client_states_survive_a_resume(tmp_path):
  a, b = np.array([1.0, 4.0, 0.5]), np.array([2.0, -1.0, 5.0])
  task = quadratic_task("quad_resume", a, b)
  cfg = FedConfig(tasks=(task,), num_clients=3, clients_per_round=2, rounds=6, partition="natural", local_epochs=3,
                  simulator="loop", algorithm="scaffold", seed=1)
  model = QUAD_MODEL("quad_resume")
  ref = run_federated(cfg, model, progress=False)
  run_federated(dataclasses.replace(cfg, rounds=3), model, workdir=tmp_path, progress=False)
  res = run_federated(cfg, model, workdir=tmp_path, progress=False)
  jax.tree.map(np.testing.assert_array_equal, res.state.models, ref.state.models)


def test_natural_partition_gives_each_client_its_own_samples():
  task = quadratic_task("quad_nat", [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0], n=3)
  fed = build_federation(FedConfig(tasks=(task,), num_clients=4, clients_per_round=2, partition="natural"))
  for c in range(4):
    assert fed.tasks[0].shards[c].tolist() == [3 * c, 3 * c + 1, 3 * c + 2]
  with pytest.raises(ValueError, match="num_clients=5 must be the number of clients in your data"):
    build_federation(FedConfig(tasks=(task,), num_clients=5, clients_per_round=2, partition="natural"))
  with pytest.raises(ValueError, match="has no client ids"):
    build_federation(FedConfig(tasks=("digits_mlp",), num_clients=4, clients_per_round=2, partition="natural"))
  with pytest.raises(ValueError, match="missing \\[1\\]"):
    mt.Dataset.from_arrays("gaps", np.zeros((3, 2)), np.zeros(3, int), client_ids=[0, 2, 2])


TWO = VRModel({"digits_mlp": 2e-4, "mnist_lenet": 4e-3}, {"digits_mlp": 0.6, "mnist_lenet": 0.9}, {})
AV_CFG = FedConfig(tasks=("digits_mlp",), num_clients=8, clients_per_round=4, rounds=4, simulator="loop", seed=5)


@pytest.mark.parametrize("policy", ["none", "deadline", "overselect", "full"])
def test_every_policy_handles_dropouts_and_says_how_many(policy):
  cfg = dataclasses.replace(AV_CFG, policy=policy, dropout=0.4)
  res = run_federated(cfg, TWO, progress=False)
  drops = [f for h in res.history for f in h["failures"] if f["kind"] == "dropout"]
  assert drops  # seeded: some clients left mid-round
  for h in res.history:
    left = {f["client"] for f in h["failures"]}
    assert not left & {int(c) for c in h["idle_s"]}  # nobody who left is aggregated
    rng = np.random.default_rng([cfg.seed, h["round"], 1])
    fate = rng.random(cfg.num_clients) < 0.4  # the draw apply_failures makes (mtfl_jax.fleet.dropout_draw)
    other = {f["client"] for f in h["failures"] if f["kind"] not in ("dropout", "over-selected")}  # the policy's
    assert {f["client"] for f in h["failures"] if f["kind"] == "dropout"} == {
        c for c in h["sampled"] if fate[c] and c not in other}
  assert np.isfinite(res.final_accuracy()["digits_mlp"])


def test_sampling_picks_only_online_clients_and_offline_clients_drop_out(tmp_path):
  # clients 0-3 online for the first 0.05 virtual s only, 4-7 always
  import json
  windows = [[[0.0, 0.05]]] * 4 + [[[0.0, "Infinity"]]] * 4
  (tmp_path / "av.json").write_text(json.dumps(windows).replace('"Infinity"', "Infinity"))
  cfg = dataclasses.replace(AV_CFG, availability=str(tmp_path / "av.json"), rounds=3)
  res = run_federated(cfg, TWO, progress=False)
  t = 0.0
  for h in res.history:
    if t >= 0.05:
      assert all(c >= 4 for c in h["sampled"]), h["sampled"]  # only the always-online clients
    for f in h["failures"]:
      assert f["kind"] == "dropout" and f["client"] < 4  # went offline mid-round
    t = h["virtual_time_s"]


def test_fedbuff_applies_buffers_of_k_updates_with_recorded_staleness():
  cfg = dataclasses.replace(AV_CFG, policy="fedbuff", buffer_size=2, concurrency=4, rounds=6)
  res = run_federated(cfg, TWO, progress=False)
  assert len(res.history) == 6
  times = [h["virtual_time_s"] for h in res.history]
  assert times == sorted(times)
  for h in res.history:
    assert len(h["updates"]) == 2 and len(h["staleness"]) == 2 and min(h["staleness"]) >= 0
  assert max(s for h in res.history for s in h["staleness"]) > 0  # some updates were stale


def test_metrics_writer_streams_csv_and_tensorboard_that_tensorboard_reads(tmp_path):
  from mtfl_jax.federated import MetricsWriter
  cfg = dataclasses.replace(AV_CFG, rounds=3)
  run_federated(cfg, TWO, progress=False, callbacks=[MetricsWriter(tmp_path)])
  import csv
  rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
  assert [int(float(r["round"])) for r in rows] == [0, 1, 2] and "accuracy/digits_mlp" in rows[0]
  pytest.importorskip("tensorboardX")
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  got = acc.Scalars("accuracy/digits_mlp")
  assert [e.step for e in got] == [0, 1, 2]
  assert [e.value for e in got] == pytest.approx([float(r["accuracy/digits_mlp"]) for r in rows])


def test_fedbuff_keeps_every_task_version_a_pending_update_started_from():
  # Two tasks held by every client: one arrival fills one task's buffer while it still has to
  # enter the other task's. The versions a server step frees (older than the schedule's
  # ``oldest``) must never be one that a later server step's update started from.
  from mtfl_jax.clock import Clock
  from mtfl_jax.federated.run import fedbuff_schedule
  tasks = (quadratic_task("quad_a", np.linspace(1, 2, 8), np.arange(8)),
           quadratic_task("quad_b", np.linspace(2, 1, 8), np.arange(8)))
  model = VRModel({"quad_a": 1e-3, "quad_b": 3e-3}, {"quad_a": 0.5, "quad_b": 0.8}, {})
  for seed in range(3):
    cfg = FedConfig(tasks=tasks, num_clients=8, clients_per_round=6, partition="natural", policy="fedbuff",
                    buffer_size=3, speed_sigma=0.8, seed=seed)
    fed = build_federation(cfg)
    clock = Clock(model, fed.fleet.speed, fed.fleet.bandwidth, fed.model_bytes)
    live = {t.name: {0} for t in tasks}
    current = {t.name: 0 for t in tasks}
    for step, (task, _, arrivals, _, oldest) in enumerate(fedbuff_schedule(cfg, fed, clock)):
      assert all(a.base[task] in live[task] for a in arrivals), (seed, step, task)
      current[task] += 1
      live[task].add(current[task])
      for name in live:  # what the run frees after applying the step
        live[name] = {v for v in live[name] if v >= oldest[name] or v == current[name]}
      if step == 60:
        break
