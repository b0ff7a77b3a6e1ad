"""Pure training and evaluation functions for one task.

Example::

    task = get_task("digits_mlp")
    state = init_state(task, seed=0)
    step = jax.jit(make_train_step(task))
    batches = sample_batches(ds.x_train, ds.y_train, idx, task.batch_size, num_steps=5, seed=0)
    state, metrics = step(state, jax.tree.map(lambda b: b[0], batches))
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtfl_jax.tasks import Task, get_task

Batch = dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  """Everything a task's local training changes: step count, parameters, optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any


def init_params(task: Task, seed: int) -> Any:
  task = get_task(task)
  x = jnp.zeros((1, *task.input_shape), jnp.float32)
  return task.model.init(jax.random.PRNGKey(seed), x)["params"]


def init_state(task: Task, seed: int = 0, params: Any = None) -> TrainState:
  """A fresh train state; ``params`` (e.g. the global model) replaces the seeded init."""
  task = get_task(task)
  params = init_params(task, seed) if params is None else params
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=task.optimizer().init(params))


def param_count(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def _loss_and_metrics(task: Task, params, batch: Batch):
  logits = task.model.apply({"params": params}, batch["image"])
  labels = batch["label"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = (jnp.argmax(logits, -1) == labels).mean()
  return loss, {"loss": loss, "accuracy": accuracy}


def make_train_step(task: Task) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """A pure ``(state, batch) -> (state, metrics)`` SGD step; jit it where you call it."""
  task = get_task(task)
  tx = task.optimizer()

  def train_step(state: TrainState, batch: Batch):
    grads, metrics = jax.grad(functools.partial(_loss_and_metrics, task), has_aux=True)(
        state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), metrics

  return train_step


def _local_update(step_fn, num_steps: int, mode: str):
  def local_update(state: TrainState, batches: Batch):
    if mode == "scan":
      state, metrics = jax.lax.scan(step_fn, state, batches)
    else:
      out = []
      for i in range(num_steps):
        state, m = step_fn(state, jax.tree.map(lambda b: b[i], batches))
        out.append(m)
      metrics = jax.tree.map(lambda *m: jnp.stack(m), *out)
    return state, jax.tree.map(jnp.mean, metrics)
  return local_update


# (task name, batch size, num_steps, platform) -> "unroll" | "scan", measured once per process.
_MODE_CACHE: dict[tuple, str] = {}


def choose_local_mode(task: Task, num_steps: int, repeats: int = 3) -> str:
  """Measures ``num_steps`` unrolled steps against a ``lax.scan`` of them on this device and
  returns the faster ("unroll" or "scan"). Cached per process."""
  task = get_task(task)
  key = (task, num_steps, jax.default_backend())
  if key not in _MODE_CACHE:
    state = init_state(task, 0)
    batches = synthetic_batches(task, num_steps)

    def timed(mode, n):
      fn = jax.jit(_local_update(make_train_step(task), num_steps, mode))
      jax.block_until_ready(fn(state, batches))
      runs = []
      for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state, batches))
        runs.append(time.perf_counter() - t0)
      return min(runs)

    unroll = timed("unroll", repeats)
    scan = timed("scan", 1)
    # one scan run that is already 1.5x slower settles it (a slow scan of a CNN can cost seconds)
    if scan < 1.5 * unroll:
      scan = min(scan, timed("scan", repeats - 1)) if repeats > 1 else scan
    _MODE_CACHE[key] = "scan" if scan < unroll else "unroll"
  return _MODE_CACHE[key]


def make_local_update(task: Task, num_steps: int, mode: str = "auto"):
  """A jitted ``(state, batches) -> (state, mean metrics)`` running ``num_steps`` steps in one
  call; ``batches`` has a leading axis of ``num_steps``. ``mode``: "unroll" (steps inlined in
  one program), "scan" (``lax.scan``), or "auto" (whichever measures faster here)."""
  task = get_task(task)
  if not (isinstance(num_steps, int) and num_steps >= 1):
    raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
  if mode == "auto":
    mode = choose_local_mode(task, num_steps)
  if mode not in ("unroll", "scan"):
    raise ValueError(f"unknown mode {mode!r}; valid: auto, unroll, scan")
  return jax.jit(_local_update(make_train_step(task), num_steps, mode))


@functools.lru_cache(maxsize=None)
def has_convolution(task: Task) -> bool:
  """Whether a train step of ``task`` contains a convolution (read off its jaxpr)."""
  task = get_task(task)
  batch = jax.tree.map(lambda b: b[0], synthetic_batches(task, 1))
  return "conv_general_dilated" in str(jax.make_jaxpr(make_train_step(task))(init_state(task), batch))


# --------------------------------------------------------------------------- data feeding
def batch_indices(indices: np.ndarray, batch_size: int, num_steps: int, seed: int) -> np.ndarray:
  """``[num_steps, batch_size]`` sample ids: epochs of seeded shuffles of ``indices``, so every
  sample is seen once per epoch and shapes stay static (no recompilation)."""
  indices = np.asarray(indices)
  if len(indices) == 0:
    raise ValueError("cannot draw batches from an empty index set")
  rng = np.random.default_rng(seed)
  need = batch_size * num_steps
  perms = [rng.permutation(indices) for _ in range(-(-need // len(indices)))]
  return np.concatenate(perms)[:need].reshape(num_steps, batch_size)


def sample_batches(x: np.ndarray, y: np.ndarray, indices: np.ndarray, batch_size: int,
                   num_steps: int, seed: int) -> Batch:
  """Stacked batches ``{"image": [num_steps, B, ...], "label": [num_steps, B, ...]}``."""
  ids = batch_indices(indices, batch_size, num_steps, seed)
  return {"image": x[ids], "label": y[ids]}


def synthetic_batches(task: Task, num_steps: int, seed: int = 0) -> Batch:
  """Random batches of the task's real shapes: for timing only."""
  task = get_task(task)
  rng = np.random.default_rng(seed)
  b = task.batch_size
  return {"image": rng.random((num_steps, b, *task.input_shape), np.float32),
          "label": rng.integers(0, task.num_classes, (num_steps, b, *task.label_shape)).astype(np.int32)}


def workload_steps(num_samples: int, batch_size: int, epochs: float) -> int:
  """Local steps of a client's round: ``epochs * ceil(n / batch)`` (0 for a client without data)."""
  if num_samples <= 0:
    return 0
  return max(1, int(round(epochs * -(-num_samples // batch_size))))


# --------------------------------------------------------------------------- evaluation
@functools.lru_cache(maxsize=None)
def _eval_fn(task: Task):
  k = task.num_classes

  @jax.jit
  def counts(params, images, labels, mask):
    logits = task.model.apply({"params": params}, images)
    # mask [B] marks real rows (the last batch is padded to keep one compiled shape)
    m = mask.reshape(mask.shape + (1,) * (labels.ndim - 1)) * jnp.ones_like(labels)
    loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels) * m).sum()
    pred = jnp.argmax(logits, -1)
    out = {"loss": loss, "correct": ((pred == labels) * m).sum(), "count": m.sum()}
    if task.kind == "segmentation":
      cls = jnp.arange(k)
      p, t, mm = pred[..., None] == cls, labels[..., None] == cls, m[..., None] > 0
      out["intersection"] = (p & t & mm).reshape(-1, k).sum(0)
      out["union"] = ((p | t) & mm).reshape(-1, k).sum(0)
    return out
  return counts


def evaluate(task: Task, params: Any, x: np.ndarray, y: np.ndarray, batch_size: int = 250) -> dict:
  """Test metrics: accuracy (pixel accuracy for segmentation), mean loss, and mIoU for segmentation."""
  task = get_task(task)
  fn = _eval_fn(task)
  total: dict | None = None
  for i in range(0, len(x), batch_size):
    xb, yb = x[i:i + batch_size], y[i:i + batch_size]
    n = len(xb)
    mask = np.zeros(batch_size, np.float32)
    mask[:n] = 1
    if n < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
      yb = np.concatenate([yb, np.zeros((batch_size - n, *yb.shape[1:]), yb.dtype)])
    out = fn(params, xb, yb, mask)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  total = jax.tree.map(np.asarray, total)
  result = {"accuracy": float(total["correct"] / total["count"]),
            "loss": float(total["loss"] / total["count"])}
  if task.kind == "segmentation":
    present = total["union"] > 0
    result["miou"] = float((total["intersection"][present] / total["union"][present]).mean())
  return result
