"""Multi-task federated learning (McMahan et al., 2017) on a virtual clock.

Every task has its own global model. In a round the server samples clients; each sampled
client trains every task it holds for its workload (``epochs * ceil(n / batch)`` local steps
of the task's optimizer, from the global model, with a fresh optimizer state) and sends back
its update; the server aggregates them per task and applies the aggregate with an optax
server optimizer (plain averaging is server SGD with learning rate 1).

The flow, one module per step, one way:

* :mod:`.config`: :class:`FedConfig`, what a run is (tasks: names or your own Task values);
* :mod:`.federation`: :func:`build_federation`, real datasets partitioned over clients and
  the fleet of devices, frozen;
* :mod:`.plan`: :class:`RoundPlan` / :class:`ClientPlan`, and the :data:`POLICIES` that make
  them (``none``, ``intra``, ``deadline``, ``overselect``, ``full``, ``fedbuff``); add yours;
* :mod:`.executors`: how a task's clients run (``loop``, ``vmap``, ``sharded``, ``auto``; add
  yours), all returning one :class:`Aggregate`;
* :mod:`.client` / :mod:`.algorithms`: the client program and the server side (FedAvg,
  FedNova, FedProx, SCAFFOLD; any optax server optimizer);
* :mod:`.round`: one synchronous round; :mod:`.run`: :func:`run_federated`, the loop (and
  FedBuff's asynchronous one) with :mod:`.callbacks` (checkpoints, evaluation, progress,
  metrics writers); :mod:`.outputs`: ``history.json`` and figures.

FL throughput, a diagnostic, is training *work* per virtual second: a local step of task i
counts its solo step time ``s_i`` on this machine; each history row records the round's
``work_s``, ``samples`` and ``work_beyond_nominal_s`` (work beyond the clients' local
epochs, never a gain). With ``FedConfig.time_budget_s`` a run stops before the first round
that would end past the budget.

Example::

    cfg = FedConfig(tasks=("digits_mlp", my_task), num_clients=10, rounds=20, alpha=0.5)
    result = run_federated(cfg)
    result.history[-1]["accuracy"]["digits_mlp"]
"""
from mtfl_jax.federated.algorithms import (FedAlgorithm, ModelServerState, ServerState, accumulation_norm, aggregate,
                                           client_weights, make_algorithm)
from mtfl_jax.federated.callbacks import (Callback, Checkpoint, CheckpointError, Evaluate, MetricsWriter, Outputs,
                                          Progress)
from mtfl_jax.federated.client import ClientProgram, ClientWork, client_seed, fedavg_program, scaffold_program
from mtfl_jax.federated.config import FedConfig
from mtfl_jax.federated.executors import (EXECUTORS, Aggregate, BatchedExecutor, ClientExecutor, LoopExecutor,
                                          client_mesh, make_executor, register_executor)
from mtfl_jax.federated.federation import FedTask, Federation, build_federation
from mtfl_jax.federated.outputs import history_doc, write_outputs
from mtfl_jax.federated.plan import (POLICIES, ClientPlan, Policy, RoundPlan, client_plan, nominal_plan,
                                     register_policy)
from mtfl_jax.federated.round import NonFiniteUpdate
from mtfl_jax.federated.run import FedResult, Run, run_federated

__all__ = [
    # a run
    "FedConfig", "run_federated", "FedResult", "Run", "build_federation", "Federation", "FedTask",
    # policies and plans
    "POLICIES", "Policy", "register_policy", "RoundPlan", "ClientPlan", "client_plan", "nominal_plan",
    # executors
    "EXECUTORS", "ClientExecutor", "register_executor", "make_executor", "Aggregate", "LoopExecutor",
    "BatchedExecutor", "client_mesh",
    # algorithms
    "FedAlgorithm", "make_algorithm", "ModelServerState", "ServerState", "ClientProgram", "ClientWork",
    "client_seed", "fedavg_program", "scaffold_program", "accumulation_norm", "aggregate", "client_weights",
    # callbacks and outputs
    "Callback", "Checkpoint", "CheckpointError", "Evaluate", "MetricsWriter", "Outputs", "Progress",
    "history_doc", "write_outputs", "NonFiniteUpdate",
]
