"""Federating your own task: a user's flax model with Dropout and BatchNorm on numpy arrays,
trained by optax.adam, under every policy and both simulators, killed and resumed; and a
policy of the user's own."""
import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import mtfl_jax as mt
from mtfl_jax.federated import (POLICIES, ClientWork, FedConfig, Policy, RoundPlan, build_federation, client_plan,
                                client_seed, fedavg_program, run_federated)
from mtfl_jax.federated.executors import BatchedExecutor, LoopExecutor, client_mesh
from mtfl_jax.train import init_variables
from mtfl_jax.vresource import VRModel


class DropBN(nn.Module):
  """Both kinds of extra state: a Dropout rng stream and BatchNorm statistics."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    # no bias before BatchNorm: its gradient is rounding noise, which adam would blow up to
    # +-lr steps that differ between the loop and vmap simulators
    x = nn.Dense(32, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x)


def blobs(n, seed):
  """Three well separated Gaussian blobs in 4-d: an easy problem (chance is 1/3)."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  centers = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0]], np.float32)
  return centers[y] + rng.normal(size=(n, 4)).astype(np.float32), y


X, Y = blobs(800, 0)
DATA = mt.Dataset.from_arrays("fed_blobs", X[:600], Y[:600], X[600:], Y[600:])
DROPBN = mt.Task("fed_dropbn", DropBN(), DATA, optimizer=optax.adam(1e-2), batch_size=16,
                 rngs=("dropout",), mutable=("batch_stats",), train_kwargs={"train": True},
                 eval_kwargs={"train": False})
LINEAR = mt.Task("fed_linear", Linear(), DATA, learning_rate=0.05, momentum=0.9, batch_size=16)
MODEL = VRModel({"fed_dropbn": 1e-3, "fed_linear": 2e-4}, {"fed_dropbn": 0.7, "fed_linear": 0.5}, {})
CFG = FedConfig(tasks=(DROPBN, LINEAR), num_clients=6, clients_per_round=4, rounds=2, local_epochs=1.0,
                alpha=1.0, simulator="loop", seed=3)


def run(cfg, **kw):
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "task 'fed_dropbn': client optimizer is not")  # FedNova on adam
    return run_federated(cfg, MODEL, progress=False, **kw)


def test_config_keeps_names_and_the_task_values():
  assert CFG.tasks == ("fed_dropbn", "fed_linear") and CFG.task_defs == (DROPBN, LINEAR)
  assert CFG.to_json()["tasks"] == ["fed_dropbn", "fed_linear"]
  again = dataclasses.replace(CFG, policy="full")  # unregistered tasks travel along
  assert again.task_defs[1] is LINEAR
  fed = build_federation(again)  # resolved once into the federation's tasks
  assert [ft.task for ft in fed.tasks] == [DROPBN, LINEAR]
  with pytest.raises(ValueError, match="unknown task 'fed_linear'"):
    FedConfig(tasks=("fed_linear",))  # a name alone resolves only registered tasks


@pytest.mark.parametrize("policy", ["none", "intra", "deadline", "overselect", "full", "fedbuff"])
def test_every_policy_trains_a_user_task_with_dropout_and_batchnorm(policy):
  res = run(dataclasses.replace(CFG, policy=policy, rounds=3))
  acc = res.final_accuracy()
  assert set(acc) == {"fed_dropbn", "fed_linear"}
  for t, a in acc.items():
    assert np.isfinite(a) and a > 0.6, (policy, t, a)  # chance is 1/3
  start = init_variables(DROPBN, CFG.seed)[1]
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       res.state.model_state["fed_dropbn"], start)
  assert min(jax.tree.leaves(moved)) > 0  # the global BatchNorm statistics were aggregated
  # evaluation uses the server's statistics: the seed-0 init's would give another loss
  st = res.state.models["fed_dropbn"]
  with_stats = mt.evaluate(DROPBN, st.params, model_state=st.model_state)
  assert with_stats["accuracy"] == pytest.approx(acc["fed_dropbn"], abs=1e-6)  # history rounds to 6 places
  assert mt.evaluate(DROPBN, st.params)["loss"] != with_stats["loss"]


def _one_by_one(ex, bc, works):
  """Each client alone (weight 1): its own delta and model_state, not through the weighted sum."""
  one = {"delta": np.ones(1), "model_state": np.ones(1)}
  return [ex.run(bc, [w], one).sums for w in works]


def test_a_round_averages_params_and_model_state_by_samples_and_simulators_agree():
  cfg = dataclasses.replace(CFG, rounds=1, clients_per_round=6, tasks=(DROPBN,))
  fed = build_federation(cfg)
  res = run(cfg, fed=fed)
  params, model_state = init_variables(DROPBN, cfg.seed)
  bc = {"params": params, "model_state": model_state}
  ft = fed.tasks[0]
  works = [ClientWork(c, ft.shards[c], fed.workloads(c)["fed_dropbn"], client_seed(3, 0, 0, c)) for c in range(6)]
  prog = fedavg_program(DROPBN)
  loop = _one_by_one(LoopExecutor(ft, prog), bc, works)
  vmap = _one_by_one(BatchedExecutor(ft, prog, client_mesh(1), inner="vmap"), bc, works)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  for a, b in zip(loop, vmap):  # same dropout masks, same statistics
    jax.tree.map(close, a, b)
  # by hand, in numpy: weights are the clients' sample counts
  n = np.array([len(w.indices) for w in works], np.float64)
  mean = lambda *per: sum(n[i] * np.asarray(per[i], np.float64) for i in range(6)) / n.sum()
  want_p = jax.tree.map(lambda p, *d: np.asarray(p) + mean(*d), params, *[x["delta"] for x in loop])
  want_s = jax.tree.map(mean, *[x["model_state"] for x in loop])
  got = res.state.models["fed_dropbn"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got.params, want_p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got.model_state, want_s)
  # dropout draws differ between clients: two clients on the same shard do not agree
  twin = [dataclasses.replace(works[0], client=9, seed=works[0].seed + 1)]
  other = _one_by_one(LoopExecutor(ft, prog), bc, twin)[0]
  assert not np.allclose(jax.tree.leaves(other["delta"])[0], jax.tree.leaves(loop[0]["delta"])[0])


def test_a_policy_of_your_own(monkeypatch):
  def half_epochs(fed, clock, sampled):
    return RoundPlan(tuple(client_plan(fed, clock, c, "equal", fed.workloads(c, fed.cfg.local_epochs / 2))
                           for c in sampled), "equal")

  monkeypatch.setitem(POLICIES, "half", Policy("half", half_epochs))
  cfg = dataclasses.replace(CFG, policy="half")
  half, none = run(cfg), run(dataclasses.replace(CFG, policy="none"))
  fed = build_federation(cfg)
  for h in half.history:
    assert h["workloads"] == {str(c): fed.workloads(c, 0.5) for c in h["sampled"]}
  assert half.virtual_time_s < none.virtual_time_s
  assert all(a > 0.6 for a in half.final_accuracy().values())
  with pytest.raises(ValueError, match="aggregator must be one of"):
    Policy("bad", half_epochs, aggregator="median")
  bad = lambda fed, clock, sampled: RoundPlan(tuple(client_plan(fed, clock, c, "equal") for c in sampled[:-1]),
                                              "equal")
  monkeypatch.setitem(POLICIES, "bad", Policy("bad", bad))
  with pytest.raises(ValueError, match="the plan must keep the sampled clients"):
    run(dataclasses.replace(CFG, policy="bad"))


def test_user_task_killed_mid_round_resumes_to_the_same_numbers(tmp_path):
  script = str(Path(__file__).with_name("fed_run_script.py"))
  run_ = lambda *a: subprocess.run([sys.executable, script, *a, "--user"], capture_output=True, text=True,
                                   timeout=300)
  ref = run_("-", str(tmp_path / "ref.npz"))
  assert ref.returncode == 0, ref.stderr[-2000:]
  killed = run_(str(tmp_path / "w"), str(tmp_path / "x.npz"), "1")
  assert killed.returncode == -9  # SIGKILL, after round 1's first task
  resumed = run_(str(tmp_path / "w"), str(tmp_path / "res.npz"))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "res.npz")
  assert set(a.files) == set(b.files) and any("batch_stats" in k for k in a.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])
  ha = json.loads((tmp_path / "ref.npz.json").read_text())
  assert ha == json.loads((tmp_path / "res.npz.json").read_text()) and len(ha) == 3
