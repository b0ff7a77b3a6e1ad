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

Your own task (README, "Your own task")::

    mine = mt.Task("mine", MyNet(), mt.Dataset.from_arrays("mine", x, y, xt, yt),
                   optimizer=optax.adam(1e-3))
    jobs = [mt.Job(mine, 20), mt.Job("digits_mlp", 200)]
"""
from mtfl_jax.backends import Job, RunResult, backend_names, open_backend
from mtfl_jax.calibration import calibrate, calibrate_mix, load_or_calibrate
from mtfl_jax.cosched import (POLICIES, Plan, candidate_shares, check_memory, choose_backend, make_plan, plan_shares,
                              run_round, scaled_jobs, search_plan, share_grid)
from mtfl_jax.data import Dataset, DatasetSpec, DatasetUnavailableError, dataset_spec, load_dataset
from mtfl_jax.partition import assign_tasks, dirichlet_partition, quantity_partition, skewed_partition
from mtfl_jax.profiling import (TaskProfile, device_name, load_profiles, op_breakdown, profile_task,
                                profile_tasks, save_profiles)
from mtfl_jax.tasks import (ALL_TASKS, OFFLINE_TASKS, Metrics, Task, classification_metrics, cross_entropy,
                            get_task, get_tasks, register_task, segmentation_metrics, task_names)
from mtfl_jax.train import (TrainState, evaluate, init_params, init_state, make_local_update, make_train_step,
                            param_count, sample_batches, workload_steps)
from mtfl_jax.vresource import VRModel

__version__ = "0.1.0"

__all__ = [
    "ALL_TASKS", "OFFLINE_TASKS", "POLICIES", "assign_tasks", "backend_names", "calibrate",
    "calibrate_mix", "candidate_shares", "check_memory", "choose_backend", "classification_metrics", "cross_entropy",
    "Dataset", "dataset_spec", "DatasetSpec", "DatasetUnavailableError", "device_name",
    "dirichlet_partition", "evaluate", "get_task", "get_tasks", "init_params", "init_state", "Job",
    "load_dataset", "load_or_calibrate", "load_profiles", "make_local_update", "make_plan", "make_train_step", "Metrics",
    "op_breakdown", "open_backend", "param_count", "Plan", "plan_shares", "profile_task",
    "profile_tasks", "quantity_partition", "register_task", "run_round", "RunResult",
    "sample_batches", "save_profiles", "scaled_jobs", "search_plan", "segmentation_metrics",
    "share_grid", "skewed_partition", "Task", "task_names", "TaskProfile", "TrainState", "VRModel",
    "workload_steps",
]
