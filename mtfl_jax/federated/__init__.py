"""Multi-task federated learning (McMahan et al., 2017) on a virtual clock.

Every task has its own global model. In a round the server samples clients; each sampled
client trains every task it holds for its workload (``epochs * ceil(n / batch)`` local steps
of the task's optimizer, from the global model, with a fresh optimizer state) and returns its
model delta and final model_state; the server aggregates them per task and applies the
aggregate with an optax server optimizer (plain averaging is server SGD with learning rate 1).

The flow, one module per step:

* :mod:`.config`: :class:`FedConfig`, what a run is (tasks: names or your own Task values);
* :mod:`.federation`: :func:`build_federation`, real datasets partitioned over clients, and
  the fleet (device speeds and bandwidths);
* :mod:`.policies`: :data:`POLICIES` of :class:`FedPolicy` values, how a round is planned
  and clocked (:func:`plan_round`); add your own;
* :mod:`.simulator`: client work (:func:`client_init` / train step / :func:`client_final`)
  run as a per-client loop or one vmap (:func:`run_clients`, :func:`choose_mode`);
* :mod:`.sharded`: the same client work over a ``clients`` mesh of devices (and processes,
  with :mod:`mtfl_jax.distributed`), streamed in chunks, the weighted aggregate reduced on the
  devices (:class:`ShardedClients`, ``FedConfig(simulator="sharded")``);
* :mod:`.algorithms`: server aggregation as ``init``/``apply`` pairs, :func:`fed_avg` and
  :func:`fed_nova` (the ``full`` policy's unequal local work would bias plain FedAvg towards
  clients that step more, Wang et al. 2020; FedNova divides each delta by its client's
  :func:`accumulation_norm`, the step count for plain SGD, larger under momentum);
* :mod:`.driver`: :func:`run_federated`, rounds on the clock, checkpoints and resume;
* :mod:`.outputs`: ``history.json`` and figures in a workdir (:func:`write_outputs`; what
  ``python -m mtfl_jax federate`` writes).

FL throughput is training *work* per virtual second: a local step of task i counts the
task's solo step time ``s_i`` on this machine (``VRModel.solo_step_s``); each history row
records the round's ``work_s`` and ``samples``. With ``FedConfig.time_budget_s`` a run stops
before the first round that would end past the budget, so policies can be compared at equal
virtual time.

Example::

    cfg = FedConfig(tasks=("digits_mlp", my_task), num_clients=10, rounds=20, alpha=0.5)
    result = run_federated(cfg)
    result.history[-1]["accuracy"]["digits_mlp"]
"""
from mtfl_jax.federated.algorithms import (ClientUpdates, FedAlgorithm, ModelServerState, ServerState,
                                           accumulation_norm, aggregate, average_model_state, client_weights, fed_avg,
                                           fed_nova, fed_nova_nominal, fednova_norm_kind)
from mtfl_jax.federated.config import SIMULATORS, FedConfig, check_config
from mtfl_jax.federated.driver import (FAULTS, CheckpointError, ClientFailure, FedResult, NonFiniteUpdate, Restored,
                                       apply_round, calibrate_mix, check_faults, init_server, restore_latest,
                                       run_federated, server_algorithm)
from mtfl_jax.federated.federation import Federation, build_federation
from mtfl_jax.federated.outputs import history_doc, write_outputs
from mtfl_jax.federated.policies import (FED_POLICIES, POLICIES, FedPolicy, drop_late_clients, plan_round,
                                         scale_work_to_deadline, task_scales)
from mtfl_jax.federated.sharded import ShardedClients, ShardedResult, client_mesh
from mtfl_jax.federated.simulator import (ClientResults, ClientWork, choose_mode, client_final, client_init,
                                          client_key, client_seed, run_clients)

__all__ = [
    "accumulation_norm", "aggregate", "apply_round", "average_model_state", "build_federation",
    "calibrate_mix", "check_config", "client_mesh", "client_weights", "history_doc", "ShardedClients",
    "ShardedResult", "write_outputs", "check_faults", "CheckpointError", "choose_mode", "ClientFailure",
    "client_final", "client_init", "client_key", "ClientResults", "client_seed", "ClientUpdates",
    "ClientWork", "drop_late_clients", "FAULTS", "fed_avg", "fed_nova", "FED_POLICIES", "FedAlgorithm",
    "FedConfig", "Federation", "fed_nova_nominal", "fednova_norm_kind", "FedPolicy", "FedResult", "init_server",
    "ModelServerState", "NonFiniteUpdate", "plan_round", "POLICIES", "Restored", "restore_latest",
    "run_clients", "run_federated", "scale_work_to_deadline", "server_algorithm", "ServerState",
    "SIMULATORS", "task_scales",
]
