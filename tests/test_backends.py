"""Co-scheduling must not change the maths: every backend ends a round with the parameters
of the sequential round (same seeds, same batches)."""
import math
import os
import time

import jax
import numpy as np
import pytest

import mtfl_jax as mt
from mtfl_jax.backends import Job, open_backend
from mtfl_jax.backends.base import check_shares, slice_schedule
from mtfl_jax.backends.fused import make_fused_slice
from mtfl_jax.backends.processes import WorkerError, cpu_placement

JOBS = [Job("digits_mlp", 40, seed=1), Job("mnist_lenet", 6, seed=2)]
SHARES = {"digits_mlp": 0.3, "mnist_lenet": 1.0}


@pytest.fixture(scope="module")
def sequential_params():
  with open_backend("sequential", JOBS) as r:
    res = r.run(return_params=True)
  assert res.makespan_s == max(res.finish_times_s.values())
  return res.params


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.mark.parametrize("backend", ["threads", "fused", "processes"])
def test_coscheduled_round_equals_sequential_round(backend, sequential_params):
  with open_backend(backend, JOBS) as r:
    res = r.run(SHARES, return_params=True)
  assert set(res.finish_times_s) == {"digits_mlp", "mnist_lenet"}
  for name in sequential_params:
    # bitwise on XLA CPU: the same compiled step on the same batches
    assert _max_diff(sequential_params[name], res.params[name]) == 0.0, (backend, name)


def test_runs_start_from_given_params():
  start = {"digits_mlp": jax.tree.map(lambda p: p * 0, mt.init_state("digits_mlp", 1).params)}
  with open_backend("threads", JOBS[:1]) as r:
    a = r.run(None, params=start, return_params=True).params["digits_mlp"]
    b = r.run(None, return_params=True).params["digits_mlp"]
  assert _max_diff(a, b) > 0


def test_fused_program_carries_one_stream_annotation_per_task():
  tasks = [mt.get_task("digits_mlp"), mt.get_task("mnist_lenet")]
  states = tuple(mt.init_state(t) for t in tasks)
  batches = tuple(jax.tree.map(lambda a: a[:2], mt.train.synthetic_batches(t, 2)) for t in tasks)
  text = jax.jit(make_fused_slice(tasks, (2, 1), True)).lower(states, batches).as_text()
  assert '_xla_stream_annotation = "1"' in text and '_xla_stream_annotation = "2"' in text
  assert '_xla_stream_annotation = "3"' not in text
  plain = jax.jit(make_fused_slice(tasks, (2, 1), False)).lower(states, batches).as_text()
  assert "_xla_stream_annotation" not in plain


def test_slice_schedule_follows_shares():
  jobs = [Job("digits_mlp", 10), Job("mnist_lenet", 4)]
  rows = slice_schedule(jobs, {"digits_mlp": 1.0, "mnist_lenet": 1.0}, {"digits_mlp": 0.01, "mnist_lenet": 0.02},
                        slice_s=0.04)
  assert rows == [(4, 2), (4, 2), (2, 0)]
  assert sum(r[0] for r in rows) == 10 and sum(r[1] for r in rows) == 4


@pytest.mark.parametrize("bad,match", [
    ({"digits_mlp": -1, "mnist_lenet": 1}, "finite number > 0"),
    ({"digits_mlp": math.nan, "mnist_lenet": 1}, "finite number > 0"),
    ({"digits_mlp": 0.0, "mnist_lenet": 1}, "finite number > 0"),
    ({"digits_mlp": 1, "mnist_lenet": 1, "cifar_resnet": 1}, "no job here"),
    ({"digits_mlp": 1}, "no share given"),
])
def test_bad_shares(bad, match):
  with pytest.raises(ValueError, match=match):
    check_shares(JOBS, bad)


def test_unknown_backend_and_bad_jobs():
  with pytest.raises(ValueError, match="valid backends: fused, processes, sequential, threads"):
    open_backend("mps", JOBS)
  with pytest.raises(ValueError, match="steps must be a positive integer"):
    Job("digits_mlp", 0)
  with pytest.raises(ValueError, match="one job per task"):
    open_backend("sequential", [Job("digits_mlp", 2), Job("digits_mlp", 3)])


def test_cpu_placement():
  # competitive (sum > 1): every core, CFS weight by share (~1.25x per nice step)
  comp = cpu_placement({"a": 1.0, "b": 0.5}, [0, 1])
  assert comp == {"a": ([0, 1], 0), "b": ([0, 1], 3)}
  # partitioned: disjoint cores
  assert cpu_placement({"a": 0.7, "b": 0.3}, [0, 1]) == {"a": ([0], 0), "b": ([1], 0)}
  assert cpu_placement({"a": 0.8, "b": 0.1, "c": 0.1}, [0, 1, 2, 3])["a"][0] == [0, 1]
  # more tasks than cores: bin packing
  three = cpu_placement({"a": 0.5, "b": 0.3, "c": 0.2}, [0, 1])
  assert three["a"] == ([0], 0) and three["b"][0] == three["c"][0] == [1]


def _children():
  import multiprocessing
  return [p for p in multiprocessing.active_children() if p.name.startswith("mtfl-worker")]


@pytest.mark.parametrize("fault,match", [("crash", "died \\(exit code 3\\)"), ("hang", "did not answer")])
def test_failed_worker_is_named_and_reaped(fault, match):
  jobs = [Job("digits_mlp", 5, fault=fault), Job("mnist_lenet", 3)]
  r = open_backend("processes", jobs, timeout_s=8)
  pids = [p.pid for p in r.procs.values()]
  t0 = time.perf_counter()
  with pytest.raises(WorkerError, match=f"worker for task 'digits_mlp' {match}"):
    r.run()
  assert time.perf_counter() - t0 < 30
  assert not _children()
  for pid in pids:
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
  with pytest.raises(RuntimeError, match="closed"):
    r.run()
