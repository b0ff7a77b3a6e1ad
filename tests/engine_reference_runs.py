"""The small runs whose results ``tests/data/engine_reference.*`` pins (see
``tests/data/make_engine_reference.py`` and ``tests/test_engine_reference.py``)."""
import dataclasses

import flax.linen as nn
import numpy as np
import optax

import mtfl_jax as mt
from mtfl_jax.federated import FedConfig, run_federated
from mtfl_jax.vresource import VRModel


class DropBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(32, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


class Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x)


def _blobs(n, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  centers = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0]], np.float32)
  return centers[y] + rng.normal(size=(n, 4)).astype(np.float32), y


X, Y = _blobs(800, 0)
DATA = mt.Dataset.from_arrays("ref_blobs", X[:600], Y[:600], X[600:], Y[600:])
DROPBN = mt.Task("ref_dropbn", DropBN(), DATA, optimizer=optax.adam(1e-2), batch_size=16, rngs=("dropout",),
                 mutable=("batch_stats",), train_kwargs={"train": True}, eval_kwargs={"train": False})
LINEAR = mt.Task("ref_linear", Linear(), DATA, learning_rate=0.05, momentum=0.9, batch_size=16)
USER_MODEL = VRModel({"ref_dropbn": 1e-3, "ref_linear": 2e-4}, {"ref_dropbn": 0.7, "ref_linear": 0.5}, {})
USER = FedConfig(tasks=(DROPBN, LINEAR), num_clients=6, clients_per_round=4, rounds=2, alpha=1.0,
                 simulator="loop", seed=3, quantity_sigma=0.0)
MLP_MODEL = VRModel({"digits_mlp": 2e-4}, {"digits_mlp": 1.0}, {})
MLP = FedConfig(tasks=("digits_mlp",), num_clients=6, clients_per_round=4, rounds=2, alpha=0.5,
                simulator="vmap", seed=1, speed_sigma=1.0)

RUNS = {
    "user_none": (dataclasses.replace(USER, policy="none"), USER_MODEL),
    "user_intra": (dataclasses.replace(USER, policy="intra"), USER_MODEL),
    "user_deadline": (dataclasses.replace(USER, policy="deadline"), USER_MODEL),
    "user_full": (dataclasses.replace(USER, policy="full"), USER_MODEL),
    "user_none_sharded": (dataclasses.replace(USER, policy="none", simulator="sharded"), USER_MODEL),
    "mlp_full_vmap": (dataclasses.replace(MLP, policy="full"), MLP_MODEL),
    "mlp_none_loop": (dataclasses.replace(MLP, policy="none", simulator="loop"), MLP_MODEL),
}


def run_case(name):
  cfg, model = RUNS[name]
  return run_federated(cfg, model, progress=False)
