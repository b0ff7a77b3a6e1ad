"""Co-scheduling must not change the maths: every backend ends a round with the parameters
of the sequential round (same seeds, same batches)."""
import math
import os
import signal
import time

import jax
import numpy as np
import pytest

import mtfl_jax as mt
from mtfl_jax.backends import Job, open_backend
from mtfl_jax.backends.base import check_shares, slice_schedule
from mtfl_jax.backends.processes import WorkerError, cpu_placement

JOBS = [Job("digits_mlp", 40, seed=1), Job("mnist_lenet", 6, seed=2)]

# Three tasks (dense, conv, conv-transpose), uneven shares, several slices, given params.
EQ_JOBS = [Job("digits_mlp", 24, seed=1), Job("mnist_lenet", 5, seed=2), Job("shapes_unet", 3, seed=3)]
EQ_SHARES = {"digits_mlp": 0.15, "mnist_lenet": 0.6, "shapes_unet": 1.0}
SLICE_S = 0.002  # forces a slice every step or few: rows of the schedule, not one big slice


def _given_params():
  """Start params unlike any job's seeded init (seed 99), so a backend that ignores them fails."""
  return {j.name: mt.init_state(j.task, 99).params for j in EQ_JOBS}


@pytest.fixture(scope="module")
def reference_params():
  """A second implementation of a round: a plain loop of the jitted step over each job's
  batches, from the given params."""
  from mtfl_jax.backends.base import Feed
  out = {}
  for job, p in zip(EQ_JOBS, _given_params().values()):
    step, feed = jax.jit(mt.make_train_step(job.task)), Feed(job)
    state = mt.init_state(job.task, job.seed, p)
    for i in range(job.steps):
      state, _ = step(state, feed.batch(i))
    out[job.name] = jax.device_get(state.params)
  return out


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.mark.parametrize("backend", ["sequential", "threads", "fused", "processes"])
def test_round_from_given_params_equals_the_reference_loop(backend, reference_params):
  kwargs = {"slice_s": SLICE_S} if backend in ("threads", "fused") else {}
  with open_backend(backend, EQ_JOBS, **kwargs) as r:
    if backend in ("threads", "fused"):
      rows = slice_schedule(EQ_JOBS, EQ_SHARES, r.solo_step_s, SLICE_S)
      assert len(rows) >= 3 and len(set(rows)) >= 2, rows  # several, uneven slices
    res = r.run(EQ_SHARES, params=_given_params(), return_params=True)
    seeded = r.run(EQ_SHARES, return_params=True).params
    if backend == "processes" and len(os.sched_getaffinity(0)) >= 2:  # XLA's default: a pool thread per core
      assert r.solo_threads["shapes_unet"]["busy_threads"] >= 2, r.solo_threads
  assert res.makespan_s == pytest.approx(max(res.finish_times_s.values()))
  names = [j.name for j in EQ_JOBS]
  if backend == "sequential":  # one after another: each task starts when the previous one finished
    assert res.start_s(names[0]) < np.nanmin(res.step_times_s[names[0]])
    for a, b in zip(names, names[1:]):
      assert res.finish_times_s[a] <= res.start_s(b) <= np.nanmin(res.step_times_s[b])
  else:  # co-run: every task starts at the common start
    assert res.start_times_s is None and all(res.start_s(n) == 0.0 for n in names)
  for name, ref in reference_params.items():
    # bitwise on XLA CPU: the same compiled step on the same batches from the same params
    # (fused on CPU runs without stream annotations; with them, see test_streams.py)
    assert _max_diff(ref, res.params[name]) == 0.0, (backend, name)
    assert _max_diff(ref, seeded[name]) > 0, (backend, name)  # the params did matter


def test_one_compute_thread_per_worker_keeps_the_maths_and_runs_one_by_one(reference_params):
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("a cap of one compute thread is visible with two cores or more")
  with open_backend("processes", EQ_JOBS, compute_threads=1) as r:
    threads = r.solo_threads
    res = r.run(EQ_SHARES, params=_given_params(), return_params=True)
    seq = r.run_sequential(params=_given_params(), return_params=True)
  # the convolution task, whose step XLA splits over every pool thread, works on one thread
  assert threads["shapes_unet"]["busy_threads"] == 1, threads
  for name, ref in reference_params.items():
    # the same maths to float rounding: one thread sums a convolution's partial results in
    # another order than the reference's pool of two (bitwise between the capped runs)
    assert _max_diff(ref, res.params[name]) < 1e-6 and _max_diff(res.params[name], seq.params[name]) == 0.0, name
  names = [j.name for j in EQ_JOBS]
  for a, b in zip(names, names[1:]):  # one after another, in job order
    assert np.nanmin(seq.step_times_s[b]) >= seq.start_s(b) == seq.finish_times_s[a]
  assert seq.start_s(names[0]) == 0.0
  assert seq.makespan_s == seq.finish_times_s[names[-1]] == max(seq.finish_times_s.values())
  for bad in (0, len(os.sched_getaffinity(0)) + 1, 1.5):
    with pytest.raises(ValueError, match="compute_threads must be an integer"):
      open_backend("processes", EQ_JOBS, compute_threads=bad)


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


@pytest.mark.parametrize("fault,match", [(signal.SIGKILL, "died \\(exit code -9\\)"),
                                         (signal.SIGSTOP, "did not answer")])
def test_failed_worker_is_named_and_reaped(fault, match):
  # a worker killed (as the OOM killer would) or stopped (a hang) from outside: no test hook
  jobs = [Job("digits_mlp", 5), Job("mnist_lenet", 3)]
  r = open_backend("processes", jobs, timeout_s=8)
  pids = [p.pid for p in r.procs.values()]
  os.kill(r.procs["digits_mlp"].pid, fault)
  t0 = time.perf_counter()
  with pytest.raises(WorkerError, match=f"worker for task 'digits_mlp' {match}"):
    r.run()
  assert time.perf_counter() - t0 < 30
  assert not _children()
  for pid in pids:
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
  with pytest.raises(RuntimeError, match="closed"):
    r.run()
