"""Bring your own task: a user's flax model (Dropout and BatchNorm) on numpy arrays with an
optax optimizer runs through every public entry point and every backend, and bad input
fails early with the task's name."""
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtfl_jax as mt
from mtfl_jax.backends import Job, open_backend
from mtfl_jax.backends.processes import WorkerError

REPO = Path(__file__).resolve().parents[1]


class DropBN(nn.Module):
  """A user's model with both kinds of extra state: an rng stream and a mutable collection."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(self.num_classes)(x)


class TinySeg(nn.Module):
  num_classes: int = 2
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.num_classes, (3, 3), (self.stride, self.stride))(x)


def blobs(n=240, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = np.array([[0, 0], [3, 3], [0, 4]], np.float32)[y] + rng.normal(size=(n, 2)).astype(np.float32)
  return x.reshape(n, 2, 1, 1), y


def make_task(name="user_dropbn", **kw):
  x, y = blobs()
  data = mt.Dataset.from_arrays("blobs", x[:200], y[:200], x[200:], y[200:])
  kw = {"optimizer": optax.adam(1e-2), "batch_size": 16, "rngs": ("dropout",),
        "mutable": ("batch_stats",), "train_kwargs": {"train": True},
        "eval_kwargs": {"train": False}, **kw}
  return mt.Task(name, kw.pop("model", DropBN()), kw.pop("data", data), **kw)


TASK = make_task()


# --------------------------------------------------------------------------- the pieces
def test_shapes_and_classes_come_from_the_arrays():
  assert TASK.input_shape == (2, 1, 1) and TASK.label_shape == () and TASK.num_classes == 3
  assert TASK.dataset == "blobs" and TASK.momentum is None and TASK.learning_rate is None


def test_batchnorm_state_and_dropout_stream_are_carried_by_the_state():
  state = mt.init_state(TASK, 0)
  assert set(state.model_state) == {"batch_stats"}
  step = jax.jit(mt.make_train_step(TASK))
  batch = jax.tree.map(lambda b: b[0], mt.sample_batches(TASK.data.x_train, TASK.data.y_train,
                                                         np.arange(200), 16, 1, seed=0))
  a, ma = step(state, batch)
  b, mb = step(state, batch)
  assert float(ma["loss"]) == float(mb["loss"])  # pure: same state, same dropout mask
  c, mc = step(state.replace(step=state.step + 1), batch)
  assert float(ma["loss"]) != float(mc["loss"])  # the key is folded with the step count
  moved = jax.tree.map(lambda u, v: float(jnp.abs(u - v).max()), a.model_state, state.model_state)
  assert min(jax.tree.leaves(moved)) > 0  # running statistics updated in training


def test_training_learns_and_evaluation_uses_the_running_statistics():
  state = mt.init_state(TASK, 0)
  local = mt.make_local_update(TASK, 60, mode="scan")
  batches = mt.sample_batches(TASK.data.x_train, TASK.data.y_train, np.arange(200), 16, 60, seed=0)
  state, _ = local(state, batches)
  trained = mt.evaluate(TASK, state)  # the test split and the state's batch_stats
  assert trained == mt.evaluate(TASK, state)  # deterministic: no dropout in evaluation
  assert trained["accuracy"] > 0.8 and set(trained) == {"accuracy", "loss"}
  assert mt.evaluate(TASK, state.params, model_state=state.model_state) == trained


def test_profile_of_a_user_task():
  prof = mt.profile_task(TASK, warmup=1, repeats=3)
  # Dense 2*16+16, BatchNorm scale+bias 32, Dense 16*3+3
  assert prof.task == "user_dropbn" and prof.param_count == 48 + 32 + 51
  assert prof.flops_per_step > 0 and prof.data == "blobs"


def test_user_loss_and_segmentation_defaults():
  rng = np.random.default_rng(0)
  x, y = rng.random((20, 4, 4, 1), np.float32), rng.integers(0, 2, (20, 4, 4))
  seg = mt.Task("user_seg", TinySeg(), mt.Dataset.from_arrays("seg", x[:16], y[:16], x[16:], y[16:]),
                kind="segmentation", learning_rate=0.1)
  assert seg.momentum == 0.0 and seg.label_shape == (4, 4)
  m = mt.evaluate(seg, mt.init_state(seg, 0))
  assert set(m) == {"accuracy", "loss", "miou"} and 0 <= m["miou"] <= 1
  # a user loss: evaluation reports it, masked per sample (padding does not count)
  sq = lambda logits, labels: jnp.mean(jnp.square(logits - jax.nn.one_hot(labels, logits.shape[-1])))
  mine = make_task("user_sq", loss_fn=sq)
  state = mt.init_state(mine, 0)
  logits = mine.model.apply({"params": state.params, **state.model_state}, mine.data.x_test, train=False)
  want = float(sq(logits, mine.data.y_test))
  assert mt.evaluate(mine, state, batch_size=16)["loss"] == pytest.approx(want, rel=1e-5)


def test_tasks_are_distinct_cache_keys():
  twin = make_task()  # same name and fields, another task
  assert twin != TASK and len({TASK: 1, twin: 2}) == 2
  assert mt.get_task(TASK) is TASK


# --------------------------------------------------------------------------- every backend
JOBS = [Job(TASK, 5, seed=1), Job("digits_mlp", 4, seed=2)]


@pytest.fixture(scope="module")
def sequential_params():
  with open_backend("sequential", JOBS) as r:
    return r.run(return_params=True).params


@pytest.mark.parametrize("backend,kw", [("sequential", {}), ("threads", {"slice_s": 1e-6}),
                                        ("fused", {"slice_s": 1e-6}), ("processes", {})])
def test_every_backend_runs_a_user_task_like_sequential(backend, kw, sequential_params):
  # slice_s=1e-6: one step per task per slice, so the tasks interleave over several slices
  with open_backend(backend, JOBS, **kw) as r:
    res = r.run({TASK.name: 1.0, "digits_mlp": 0.5}, return_params=True)
  # the sequential steps replayed by hand: the backends add nothing to the maths
  if backend == "sequential":
    state = mt.init_state(TASK, 1)
    feed = mt.backends.base.Feed(JOBS[0])
    step = jax.jit(mt.make_train_step(TASK))
    for i in range(5):
      state, _ = step(state, feed.batch(i))
    jax.tree.map(np.testing.assert_array_equal, res.params[TASK.name], jax.device_get(state.params))
  for name in (TASK.name, "digits_mlp"):
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), sequential_params[name], res.params[name])
    assert max(jax.tree.leaves(diff)) == 0.0, (backend, name)


def test_a_worker_exception_reaches_the_parent_with_its_text():
  parent = os.getpid()

  def loss(logits, labels):  # fine when checked in the parent, raises in the worker
    if os.getpid() != parent:
      raise RuntimeError("boom in the worker")
    return mt.cross_entropy(logits, labels)

  task = make_task("user_boom", loss_fn=loss)
  with pytest.raises(WorkerError, match="worker for task 'user_boom' raised .*RuntimeError: boom in the worker"):
    open_backend("processes", [Job(task, 2)], start_timeout_s=120)


def test_a_task_that_cannot_travel_fails_before_any_worker_starts():
  lock = threading.Lock()

  def loss(logits, labels):
    with lock:
      return mt.cross_entropy(logits, labels)

  with pytest.raises(ValueError, match="task 'user_lock' cannot be sent to a worker process"):
    open_backend("processes", [Job(make_task("user_lock", loss_fn=loss), 2)])


# --------------------------------------------------------------------------- registry
def test_registry():
  task = make_task("user_registered")
  assert mt.register_task(task) is task and mt.register_task(task) is task  # same task: fine
  assert mt.get_task("user_registered") is task and "user_registered" in mt.task_names()
  assert Job("user_registered", 2).task is task
  with pytest.raises(ValueError, match="different task is already registered as 'user_registered'"):
    mt.register_task(make_task("user_registered"))
  with pytest.raises(ValueError, match="already registered as 'digits_mlp'"):
    mt.register_task(mt.get_task("digits_mlp").replace(batch_size=8))
  with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: digits_mlp.*user_registered"):
    mt.get_task("nope")
  with pytest.raises(TypeError, match="takes a Task"):
    mt.register_task("digits_mlp")


# --------------------------------------------------------------------------- bad input
def _seg_data(label_hw=(4, 4)):
  rng = np.random.default_rng(0)
  return mt.Dataset.from_arrays("seg", rng.random((8, 4, 4, 1)), rng.integers(0, 2, (8, *label_hw)))


@pytest.mark.parametrize("build,match", [
    (lambda: make_task("user_bad", model=DropBN(num_classes=2)),
     r"task 'user_bad': in training the model outputs \(2, 2\).*3 classes.*nn.Dense\(3\)"),
    (lambda: mt.Task("user_bad", TinySeg(stride=2), _seg_data(), kind="segmentation", learning_rate=0.1),
     r"task 'user_bad'.*outputs \(2, 2, 2, 2\).*labels of shape \(4, 4\).*\(batch, 4, 4, >= 2\)"),
    (lambda: make_task("user_bad", rngs=()), r"task 'user_bad': the model fails.*dropout.*rngs="),
    (lambda: make_task("user_bad", optimizer="adam"), "task 'user_bad': optimizer must be an optax"),
    (lambda: make_task("user_bad", optimizer=None), "task 'user_bad': give an optimizer"),
    (lambda: make_task("user_bad", loss_fn=lambda lg, lb: lg), "task 'user_bad': loss_fn.*must return a scalar"),
    (lambda: make_task("user_bad", kind="regression"), "task 'user_bad': kind must be one of"),
    (lambda: make_task("user_bad", batch_size=0), "task 'user_bad': batch_size must be a positive"),
    (lambda: make_task("user_bad", model=lambda x: x), "task 'user_bad': model must be a flax.linen Module"),
    (lambda: make_task("user_bad", data=np.zeros((4, 2))), "task 'user_bad': data must be a Dataset"),
    (lambda: mt.Task("user_bad", DropBN(), "imagenet", learning_rate=0.1), "unknown dataset 'imagenet'"),
])
def test_bad_task(build, match):
  with pytest.raises(ValueError, match=match):
    build()


@pytest.mark.parametrize("arrays,match", [
    ((np.zeros((10, 2)), np.zeros(9, int)), "x_train has 10 samples but y_train has 9"),
    ((np.zeros((4, 2)), np.zeros(4, int), np.zeros((3, 2)), np.zeros(2, int)), "x_test has 3 samples but y_test has 2"),
    ((np.array([[0.0, np.nan]]), np.zeros(1, int)), "x_train holds non-finite values"),
    ((np.array([[0.0, np.inf]] * 2), np.zeros(2, int), np.zeros((1, 2)), np.zeros(1, int)), "non-finite"),
    ((np.zeros((0, 2)), np.zeros(0, int)), "the training split is empty"),
    ((np.zeros((2, 2)), np.array([0.5, 1.0])), "y_train must hold integer class ids"),
    ((np.zeros((2, 2)), np.array([0, -1])), "labels must be >= 0"),
    ((np.zeros((2, 2)), np.zeros(2, int), np.zeros((1, 3)), np.zeros(1, int)), "test samples have shapes"),
])
def test_bad_arrays(arrays, match):
  with pytest.raises(ValueError, match=f"dataset 'mine': {match}" if not match.startswith("non") else match):
    mt.Dataset.from_arrays("mine", *arrays)


def test_a_dataset_built_directly_is_checked_by_the_task():
  x = np.zeros((4, 2, 1, 1), np.float32)
  x[0, 0] = np.nan
  ds = mt.Dataset("raw", x, np.zeros(4, np.int32), x[:0], np.zeros(0, np.int32), 3)
  with pytest.raises(ValueError, match="dataset 'raw': x_train holds non-finite"):
    make_task("user_raw", data=ds)
  with pytest.raises(ValueError, match="num_classes=2 but labels go up to 2"):
    mt.Dataset.from_arrays("mine", np.zeros((3, 1)), np.arange(3), num_classes=2)


# --------------------------------------------------------------------------- scripts
def _run_script(code: str, tmp_path: Path) -> str:
  script = tmp_path / "user_script.py"
  script.write_text(code)
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=500)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def test_the_readmes_your_own_task_script_runs_as_written(tmp_path):
  """The script the README's "Your own task" links to, docs/your_own_task.md (a model class at
  top level, no main guard, the processes backend, then a federated run that calibrates its
  own clock for the user's task)."""
  readme = (REPO / "README.md").read_text()
  assert "docs/your_own_task.md" in readme.split("## Your own task", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "your_own_task.md").read_text(), re.S)
  assert blocks and "__main__" not in blocks[0] and '"processes"' in blocks[0]
  out = _run_script(blocks[0], tmp_path)
  assert out.count("blobs_net: 259 params") == 1  # printed once: the workers did not re-run the script
  assert "makespan" in out
  acc = float(re.search(r"test metrics: .*'accuracy': ([0-9.]+)", out).group(1))
  assert acc > 0.8
  fed = re.search(r"federated accuracy: \{'blobs_net': ([0-9.]+), 'digits_mlp': ([0-9.]+)\}", out)
  assert fed, out[-2000:]
  assert float(fed.group(1)) > 0.5  # three rounds on blobs: well above chance (1/3)
  assert (tmp_path / "runs" / "blobs" / "checkpoints").is_dir()
