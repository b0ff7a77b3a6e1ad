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
from mtfl_jax.federated import (POLICIES, ClientWork, FedConfig, FedPolicy, build_federation, client_seed,
                                init_server, run_clients, run_federated)
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
  assert CFG.tasks == ("fed_dropbn", "fed_linear") and CFG.task("fed_dropbn") is DROPBN
  assert CFG.to_json()["tasks"] == ["fed_dropbn", "fed_linear"]
  again = dataclasses.replace(CFG, policy="full")  # unregistered tasks travel along
  assert again.task("fed_linear") is LINEAR
  with pytest.raises(ValueError, match="unknown task 'fed_linear'"):
    FedConfig(tasks=("fed_linear",))  # a name alone resolves only registered tasks


@pytest.mark.parametrize("policy", ["none", "intra", "deadline", "full"])
def test_every_policy_trains_a_user_task_with_dropout_and_batchnorm(policy):
  res = run(dataclasses.replace(CFG, policy=policy))
  acc = res.final_accuracy()
  assert set(acc) == {"fed_dropbn", "fed_linear"}
  for t, a in acc.items():
    assert np.isfinite(a) and a > 0.6, (policy, t, a)  # chance is 1/3
  start = init_server(CFG).model_state["fed_dropbn"]
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       res.state.model_state["fed_dropbn"], start)
  assert min(jax.tree.leaves(moved)) > 0  # the global BatchNorm statistics were aggregated
  # evaluation uses the server's statistics: the seed-0 init's would give another loss
  st = res.state.models["fed_dropbn"]
  with_stats = mt.evaluate(DROPBN, st.params, model_state=st.model_state)
  assert with_stats["accuracy"] == pytest.approx(acc["fed_dropbn"], abs=1e-6)  # history rounds to 6 places
  assert mt.evaluate(DROPBN, st.params)["loss"] != with_stats["loss"]


def test_a_round_averages_params_and_model_state_by_samples_and_simulators_agree():
  cfg = dataclasses.replace(CFG, rounds=1, clients_per_round=6, tasks=(DROPBN,))
  fed = build_federation(cfg)
  res = run(cfg, fed=fed)
  start = init_server(cfg).models["fed_dropbn"]
  works = [ClientWork(c, fed.shards["fed_dropbn"][c], fed.workloads(c)["fed_dropbn"], client_seed(3, 0, 0, c))
           for c in range(6)]
  ds = fed.datasets["fed_dropbn"]
  loop = run_clients(DROPBN, ds, start.params, works, "loop", start.model_state)
  vmap = run_clients(DROPBN, ds, start.params, works, "vmap", start.model_state)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  jax.tree.map(close, loop.deltas, vmap.deltas)  # same dropout masks, same statistics
  jax.tree.map(close, loop.model_states, vmap.model_states)
  # by hand, one client at a time in numpy: weights are the clients' sample counts
  n = np.array([len(w.indices) for w in works], np.float64)
  mean = lambda stacked: sum(n[i] * np.asarray(stacked[i], np.float64) for i in range(6)) / n.sum()
  want_p = jax.tree.map(lambda p, d: np.asarray(p) + mean(d), start.params, loop.deltas)
  want_s = jax.tree.map(mean, loop.model_states)
  got = res.state.models["fed_dropbn"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got.params, want_p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got.model_state, want_s)
  # dropout draws differ between clients: two clients on the same shard do not agree
  twin = [dataclasses.replace(works[0], client=9, seed=works[0].seed + 1)]
  other = run_clients(DROPBN, ds, start.params, twin, "loop", start.model_state)
  assert not np.allclose(jax.tree.leaves(other.deltas)[0][0], jax.tree.leaves(loop.deltas)[0][0])


def test_a_policy_of_your_own(monkeypatch):
  def half_epochs(fed, model, plan, clock):
    for c, p in plan.items():
      p["workloads"] = fed.workloads(c, fed.cfg.local_epochs / 2)
      p["compute_s"], p["measured"] = clock(p["workloads"], c)
    return None

  monkeypatch.setitem(POLICIES, "half", FedPolicy("half", "equal", half_epochs))
  cfg = dataclasses.replace(CFG, policy="half")
  half, none = run(cfg), run(dataclasses.replace(CFG, policy="none"))
  fed = build_federation(cfg)
  for h in half.history:
    assert h["workloads"] == {str(c): fed.workloads(c, 0.5) for c in h["sampled"]}
  assert half.virtual_time_s < none.virtual_time_s
  assert all(a > 0.6 for a in half.final_accuracy().values())
  with pytest.raises(ValueError, match="shares must be one of equal, competitive"):
    FedPolicy("bad", "fastest")


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
