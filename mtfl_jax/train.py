"""Pure training and evaluation functions for one task.

Example::

    task = get_task("digits_mlp")           # or your own Task
    state = init_state(task, seed=0)
    step = jax.jit(make_train_step(task))
    batches = sample_batches(ds.x_train, ds.y_train, idx, task.batch_size, num_steps=5, seed=0)
    state, metrics = step(state, jax.tree.map(lambda b: b[0], batches))
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtfl_jax.tasks import Task, get_task
from mtfl_jax.timing import time_calls

Batch = dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  """Everything a task's local training changes: step count, parameters, optimizer state, the
  model's mutable collections (e.g. ``{"batch_stats": ...}``; empty for the built-ins) and
  the key its rng streams (e.g. Dropout's) are folded from."""
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any = flax.struct.field(default_factory=dict)
  rng: jax.Array | None = None


def init_variables(task: Task | str, seed: int) -> tuple[Any, dict]:
  """A seeded init of ``task``'s model: ``(params, model_state)`` (model_state holds every
  collection but params, e.g. batch_stats)."""
  task = get_task(task).check()
  x = jnp.zeros((1, *task.input_shape), jnp.float32)
  key = jax.random.PRNGKey(seed)
  # the same key for every stream: a model without rngs inits exactly as model.init(key, x)
  variables = task.model.init({s: key for s in ("params",) + task.rngs}, x, **task.eval_kwargs)
  variables = dict(variables)
  return variables.pop("params"), variables


def init_params(task: Task | str, seed: int) -> Any:
  return init_variables(task, seed)[0]


def init_state(task: Task | str, seed: int = 0, params: Any = None, model_state: Any = None) -> TrainState:
  """A fresh train state; ``params`` (e.g. the global model) and ``model_state`` replace the
  seeded init's."""
  task = get_task(task)
  p, s = init_variables(task, seed)
  params = p if params is None else params
  model_state = s if model_state is None else model_state
  # the training rng differs from the init key: dropout masks are not the init's draws
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=task.optimizer.init(params),
                    model_state=model_state, rng=rng)


def param_count(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def step_rngs(task: Task, state: TrainState) -> dict | None:
  """This step's key for each of the task's rng streams: the state's key folded with the step
  count (reproducible, and the same whichever backend runs the step)."""
  if not task.rngs:
    return None
  key = jax.random.fold_in(state.rng, state.step)
  return {s: jax.random.fold_in(key, i) for i, s in enumerate(task.rngs)}


def loss_and_metrics(task: Task, params, batch: Batch, state: TrainState | None = None):
  """``(loss, (metrics, model_state))`` of one batch; ``state`` gives the model's mutable
  collections and the step's rngs (None: a model without either)."""
  model_state = {} if state is None else state.model_state
  variables = {"params": params, **model_state}
  rngs = None if state is None else step_rngs(task, state)
  out = task.model.apply(variables, batch["image"], rngs=rngs,
                         mutable=list(task.mutable) or False, **task.train_kwargs)
  logits, updates = out if task.mutable else (out, {})
  labels = batch["label"]
  loss = task.loss(logits, labels)
  accuracy = (jnp.argmax(logits, -1) == labels).mean()
  return loss, ({"loss": loss, "accuracy": accuracy}, {**model_state, **updates})


def make_train_step(task: Task | str) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """A pure ``(state, batch) -> (state, metrics)`` step of the task's optimizer (updating its
  mutable collections); jit it where you call it."""
  task = get_task(task).check()
  tx = task.optimizer

  def train_step(state: TrainState, batch: Batch):
    grads, (metrics, model_state) = jax.grad(
        functools.partial(loss_and_metrics, task), has_aux=True)(state.params, batch, state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, model_state=model_state), metrics

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


# Steps up to which the rule unrolls whatever the task: compile time grows with every
# unrolled step, but a few unrolled steps compile quickly and XLA CPU runs them fastest.
UNROLL_MAX = 8


def choose_local_mode(task: Task, num_steps: int, repeats: int = 3, measure: bool = True) -> str:
  """How to run ``num_steps`` local steps in one program: "unroll" or "scan".

  With ``measure`` (kept on the task): both are run on this device and the faster wins.
  Without, the rule every caller shares: unroll up to :data:`UNROLL_MAX` steps, and any
  number of steps of a task with convolutions (XLA CPU runs scanned convolution steps 4-25x
  slower than unrolled ones, measured here); scan the rest.
  """
  task = get_task(task)
  if not measure:
    return "unroll" if num_steps <= UNROLL_MAX or has_convolution(task) else "scan"
  return task.memo(("local_mode", num_steps, repeats, jax.default_backend()),
                   lambda: _measure_local_mode(task, num_steps, repeats))


def _measure_local_mode(task: Task, num_steps: int, repeats: int) -> str:
  state = init_state(task, 0)
  batches = synthetic_batches(task, num_steps)

  fns = {m: jax.jit(_local_update(make_train_step(task), num_steps, m)) for m in ("unroll", "scan")}

  def timed(mode, n, warmup=1):  # the first call compiles
    return min(time_calls(lambda: fns[mode](state, batches), repeats=n, warmup=warmup))

  unroll = timed("unroll", repeats)
  scan = timed("scan", 1)
  # one scan run that is already 1.5x slower settles it (a slow scan of a CNN can cost seconds)
  if scan < 1.5 * unroll and repeats > 1:
    scan = min(scan, timed("scan", repeats - 1, warmup=0))
  return "scan" if scan < unroll else "unroll"


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


def has_convolution(task: Task) -> bool:
  """Whether a train step of ``task`` contains a convolution (read off its jaxpr; kept on the task)."""
  task = get_task(task)
  return task.memo("has_convolution", lambda: _has_convolution(task))


def _has_convolution(task: Task) -> bool:
  batch = jax.tree.map(lambda b: b[0], synthetic_batches(task, 1))
  state = jax.eval_shape(lambda: init_state(task))  # shapes only: an eager init compiles each op
  return "conv_general_dilated" in str(jax.make_jaxpr(make_train_step(task))(state, batch))


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
def _eval_fn(task: Task):
  return task.memo("eval_fn", lambda: _make_eval_fn(task))


def _make_eval_fn(task: Task):
  counts = task.eval_metrics.counts

  @jax.jit
  def fn(variables, images, labels, mask):
    logits = task.model.apply(variables, images, **task.eval_kwargs)
    # mask [B] marks real rows (the last batch is padded to keep one compiled shape)
    m = mask.reshape(mask.shape + (1,) * (labels.ndim - 1)) * jnp.ones_like(labels)
    return counts(logits, labels, m)
  return fn


def evaluate(task: Task | str, params: Any, x: np.ndarray | None = None, y: np.ndarray | None = None,
             batch_size: int = 250, model_state: Any = None) -> dict:
  """The task's metrics (default: accuracy and mean loss; pixel accuracy, loss and mIoU for
  segmentation) of ``params`` on ``x, y`` (default: the task's test split).

  ``params`` may be a :class:`TrainState`: its params and model_state are used. Without a
  model_state, a model with mutable collections uses its seed-0 init's (e.g. fresh
  BatchNorm statistics).

  Example::

      evaluate("digits_mlp", state)   # {'accuracy': ..., 'loss': ...}
  """
  task = get_task(task)
  if isinstance(params, TrainState):
    params, model_state = params.params, params.model_state if model_state is None else model_state
  if model_state is None:
    model_state = init_variables(task, 0)[1]
  if x is None or y is None:
    ds = task.load_data().require_test_split(f"task {task.name!r} is evaluated on it")
    x, y = ds.x_test, ds.y_test
  if len(x) == 0:
    raise ValueError(f"task {task.name!r}: nothing to evaluate on (x and y hold no samples)")
  fn = _eval_fn(task)
  variables = {"params": params, **model_state}
  total: dict | None = None
  for i in range(0, len(x), batch_size):
    xb, yb = x[i:i + batch_size], y[i:i + batch_size]
    n = len(xb)
    mask = np.zeros(batch_size, np.float32)
    mask[:n] = 1
    if n < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
      yb = np.concatenate([yb, np.zeros((batch_size - n, *yb.shape[1:]), yb.dtype)])
    out = fn(variables, xb, yb, mask)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  return task.eval_metrics.summarize(jax.tree.map(np.asarray, total))
