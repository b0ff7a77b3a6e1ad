"""mtfl_jax: multi-task federated learning with competitive device sharing, in JAX.

A reimplementation of Yu et al., "Powering Multi-Task Federated Learning with Competitive
GPU Resource Sharing" (WWW 2022 Companion). The data flow is one way:
config -> tasks -> data -> profiles -> virtual resources -> plan -> execution -> federation
-> results -> figures. The experiments (benchmarks, the paper's reproduction, the GPU
recording) live apart, in :mod:`mtfl_jax.experiments`, and the library never imports them.

Example::

    import mtfl_jax as mt
    task = mt.get_task("mnist_lenet")
    prof = mt.profile_task(task)                         # solo profile on this device
    jobs = [mt.Job("digits_mlp", 2000), mt.Job("shapes_unet", 30)]
    result, plan = mt.run_round(jobs, policy="competitive", backend="processes")
    fed = mt.run_federated(mt.FedConfig(tasks=("digits_mlp", "mnist_lenet"), policy="full", rounds=20))

The top level holds the names a user starts with; everything else lives in its submodule
(``mtfl_jax.federated``, ``mtfl_jax.cosched``, ``mtfl_jax.profiling``, ...).

Your own task (docs/your_own_task.md has the whole script)::

    mine = mt.Task("mine", MyNet(), mt.Dataset.from_arrays("mine", x, y, xt, yt),
                   optimizer=optax.adam(1e-3))
    jobs = [mt.Job(mine, 20), mt.Job("digits_mlp", 200)]
"""
# tasks and data
from mtfl_jax.data import Dataset, DatasetUnavailableError, load_dataset
from mtfl_jax.tasks import (Metrics, Task, classification_metrics, cross_entropy, get_task, register_task,
                            segmentation_metrics, task_names)
# training
from mtfl_jax.train import evaluate, init_state, make_local_update, make_train_step, sample_batches
# profiling, virtual resources and co-scheduling on one device
from mtfl_jax.backends import Job, open_backend
from mtfl_jax.calibration import calibrate, load_or_calibrate
from mtfl_jax.cosched import make_plan, run_round, search_plan
from mtfl_jax.device import device_name
from mtfl_jax.profiling import profile_task
from mtfl_jax.vresource import VRModel
# federated
from mtfl_jax.federated import (POLICIES, Callback, ClientExecutor, FedConfig, FedResult, Policy, register_executor,
                                register_policy, run_federated)
from mtfl_jax.federated.sweep import run_seeds

__version__ = "0.1.0"

__all__ = [
    # tasks and data
    "Task", "Dataset", "get_task", "register_task", "task_names", "load_dataset", "Metrics",
    "classification_metrics", "segmentation_metrics", "cross_entropy", "DatasetUnavailableError",
    # training
    "init_state", "make_train_step", "make_local_update", "evaluate", "sample_batches",
    # profiling, virtual resources and co-scheduling
    "profile_task", "device_name", "VRModel", "calibrate", "load_or_calibrate", "Job", "open_backend", "run_round",
    "make_plan", "search_plan",
    # federated
    "FedConfig", "run_federated", "FedResult", "POLICIES", "Policy", "register_policy", "ClientExecutor",
    "register_executor", "Callback", "run_seeds",
]
