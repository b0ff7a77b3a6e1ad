"""Tasks: a learning problem as a value the user builds (model, data, optimizer, loss and
metrics, rng streams and mutable collections), and a registry of them by name.

The four built-in tasks of the standard mix (per-step workloads ~1000x apart, as the paper's
self-driving mix of classification, detection and segmentation) are built with the same
public constructor and registered like any other.

A :class:`Task` is frozen and hashed by identity: it is a static argument of ``jax.jit`` and
a cache key, and two different tasks never share a cache entry, whatever their names.

Example::

    ds = Dataset.from_arrays("blobs", x_train, y_train, x_test, y_test)
    task = Task("blobs_mlp", models.MLP((32,), 3), ds, optimizer=optax.adam(1e-3))
    register_task(task)                          # now Job("blobs_mlp", 10) works too
    get_task("digits_mlp").replace(batch_size=64)
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtfl_jax import models
from mtfl_jax.data import Dataset, DatasetSpec, dataset_spec, load_dataset

KINDS = ("classification", "segmentation")
MAX_BATCH_BYTES = 2**30  # one batch's float32 inputs at most (Task.batch_size is bounded by it)


def _real(v) -> bool:
  """A finite real number (not a bool, a string or NaN)."""
  return (not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
          and math.isfinite(v))


# --------------------------------------------------------------------------- loss and metrics
def cross_entropy(logits, labels):
  """Mean softmax cross-entropy over integer labels (per sample, or per pixel)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class Metrics(NamedTuple):
  """Evaluation metrics as sums over batches, then a summary (so padded batches and mIoU
  over a whole test set come out exact).

  ``counts(logits, labels, mask) -> {name: array}`` sums over one batch, with ``mask`` of
  ``labels``' shape 1 on real samples and 0 on padding; ``summarize(totals) -> {name: float}``
  turns the summed counts (numpy) into the reported metrics.
  """
  counts: Callable[[Any, Any, Any], dict]
  summarize: Callable[[dict], dict]


def _loss_sum(loss_fn, logits, labels, mask):
  if loss_fn is None:  # the built-ins' exact formula: per-element cross-entropy
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask).sum()
  # A user loss returns a scalar mean: evaluate it per sample so padding can be masked out.
  per_sample = jax.vmap(lambda lg, lb: loss_fn(lg[None], lb[None]))(logits, labels)
  return (per_sample.reshape((-1,) + (1,) * (mask.ndim - 1)) * mask).sum()


def classification_metrics(loss_fn: Callable | None = None) -> Metrics:
  """Accuracy and mean loss (``loss_fn``, default cross-entropy).

  Example::

      Task(..., metrics=classification_metrics(my_loss), loss_fn=my_loss)
  """
  def counts(logits, labels, mask):
    return {"loss": _loss_sum(loss_fn, logits, labels, mask),
            "correct": ((jnp.argmax(logits, -1) == labels) * mask).sum(), "count": mask.sum()}

  def summarize(t):
    return {"accuracy": float(t["correct"] / t["count"]), "loss": float(t["loss"] / t["count"])}

  return Metrics(counts, summarize)


def segmentation_metrics(loss_fn: Callable | None = None) -> Metrics:
  """Pixel accuracy, mean per-pixel loss and mIoU over the classes present in labels or
  predictions (classes are the logits' last axis).

  Example::

      Task(..., kind="segmentation", metrics=segmentation_metrics())
  """
  base = classification_metrics(loss_fn)

  def counts(logits, labels, mask):
    out = base.counts(logits, labels, mask)
    k = logits.shape[-1]
    cls = jnp.arange(k)
    p, t, m = jnp.argmax(logits, -1)[..., None] == cls, labels[..., None] == cls, mask[..., None] > 0
    out["intersection"] = (p & t & m).reshape(-1, k).sum(0)
    out["union"] = ((p | t) & m).reshape(-1, k).sum(0)
    return out

  def summarize(t):
    present = t["union"] > 0
    return {**base.summarize(t), "miou": float((t["intersection"][present] / t["union"][present]).mean())}

  return Metrics(counts, summarize)


# --------------------------------------------------------------------------- the task
# Tasks whose model was checked against their data (by identity; tasks are hashed by identity).
_CHECKED: "weakref.WeakSet[Task]" = weakref.WeakSet()


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """One learning problem: a flax model on a dataset, trained by an optax optimizer.

  Args:
    name: unique name (results, shares and profiles are keyed by it).
    model: any ``flax.linen`` module mapping a batch of inputs to logits: ``[B, K]`` for
      classification, ``[B, *label_shape, K]`` for segmentation, ``K >= num_classes``.
    data: a :class:`Dataset` (e.g. ``Dataset.from_arrays(...)``), or the name of a dataset
      :func:`~mtfl_jax.data.load_dataset` knows (loaded on first use).
    optimizer: any optax ``GradientTransformation``; or leave it out and give
      ``learning_rate`` (and ``momentum``) for SGD.
    learning_rate, momentum: SGD's settings. ``momentum`` is 0.0 for plain SGD and None
      when the optimizer is not (momentum) SGD; FedNova reads it.
    batch_size: samples per local step.
    kind: "classification" or "segmentation" (per-pixel classification): picks the
      default ``loss_fn`` (cross-entropy) and ``metrics``.
    loss_fn: ``loss_fn(logits, labels) -> scalar`` to minimise.
    metrics: evaluation :class:`Metrics`; default by ``kind``, with ``loss_fn``'s loss.
    rngs: rng streams the model draws from in training, e.g. ``("dropout",)``; each step
      folds the state's key with its step count, so runs are reproducible.
    mutable: collections training updates, e.g. ``("batch_stats",)`` (kept in
      ``TrainState.model_state`` and used, not updated, in evaluation).
    train_kwargs, eval_kwargs: keyword arguments of the model's ``__call__`` in training
      and in evaluation, e.g. ``{"train": True}`` / ``{"train": False}``.
    alt_datasets: names of same-shaped datasets ``replace(dataset=...)`` may switch to.

  Example::

      task = Task("mine", MyNet(), Dataset.from_arrays("mine", x, y, xt, yt),
                  optimizer=optax.adam(1e-3), rngs=("dropout",), mutable=("batch_stats",),
                  train_kwargs={"train": True}, eval_kwargs={"train": False})
  """
  name: str
  model: nn.Module
  data: Dataset | str
  _: dataclasses.KW_ONLY
  optimizer: optax.GradientTransformation | None = None
  learning_rate: float | None = None
  momentum: float | None = None
  batch_size: int = 32
  kind: str = "classification"
  loss_fn: Callable[[Any, Any], Any] | None = None
  metrics: Metrics | None = None
  rngs: tuple[str, ...] = ()
  mutable: tuple[str, ...] = ()
  train_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  alt_datasets: tuple[str, ...] = ()
  # whether ``optimizer`` was built here from learning_rate/momentum (replace() rebuilds it)
  _sgd: bool = dataclasses.field(default=False, init=False, repr=False)
  # Compiled programs and other derived values of this task (see :meth:`memo`): they live and
  # die with the task, and a replaced task (a new value) starts with none.
  _memo: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  def __post_init__(self):
    def bad(why):
      return ValueError(f"task {self.name!r}: {why}")

    setattr_ = lambda k, v: object.__setattr__(self, k, v)
    if not (isinstance(self.name, str) and self.name):
      raise ValueError(f"a task's name must be a non-empty string, got {self.name!r}")
    if "," in self.name or self.name != self.name.strip():
      # task lists are comma-separated (--tasks a,b; the calibration store's keys)
      raise ValueError(f"a task's name may not hold ',' nor start or end with a space, got {self.name!r}; "
                       f"rename it, e.g. {self.name.strip().replace(',', '_')!r}")
    if not isinstance(self.model, nn.Module):
      raise bad(f"model must be a flax.linen Module instance, got {type(self.model).__name__}")
    if isinstance(self.data, str):
      dataset_spec(self.data)  # an unknown name fails here, with the valid ones
    elif isinstance(self.data, Dataset):
      self.data.check()
    else:
      raise bad(f"data must be a Dataset (Dataset.from_arrays(name, x_train, y_train, x_test, "
                f"y_test)) or a dataset name, got {type(self.data).__name__}")
    if self.momentum is not None and not (_real(self.momentum) and 0 <= self.momentum < 1):
      raise bad(f"momentum must be a number in [0, 1) (0.0: plain SGD; None: not SGD), got {self.momentum!r}")
    if self.optimizer is None:
      if not (_real(self.learning_rate) and self.learning_rate > 0):
        raise bad("give an optimizer (e.g. optimizer=optax.adam(1e-3)) or a finite, positive "
                  f"learning_rate for SGD, got learning_rate={self.learning_rate!r}")
      momentum = float(self.momentum or 0.0)
      setattr_("momentum", momentum)
      setattr_("optimizer", optax.sgd(self.learning_rate, momentum=momentum or None))
      setattr_("_sgd", True)
    elif not (callable(getattr(self.optimizer, "init", None)) and callable(getattr(self.optimizer, "update", None))):
      raise bad(f"optimizer must be an optax GradientTransformation (e.g. optax.adam(1e-3)), "
                f"got {type(self.optimizer).__name__}")
    bs = self.batch_size
    if isinstance(bs, bool) or not (isinstance(bs, (int, np.integer)) and bs > 0):
      raise bad(f"batch_size must be a positive integer, got {self.batch_size!r}")
    # A huge batch would allocate its index and image arrays (or exhaust memory) long after the
    # task was built: bounded here, before any work, by the float32 inputs of one batch.
    sample_bytes = 4 * math.prod(self.spec.input_shape)
    if self.batch_size * sample_bytes > MAX_BATCH_BYTES:
      raise bad(f"batch_size {self.batch_size}: one batch of inputs of shape {self.spec.input_shape} would take "
                f"{self.batch_size * sample_bytes / 2**30:.1f} GiB; give batch_size <= "
                f"{MAX_BATCH_BYTES // sample_bytes} (one batch's inputs within {MAX_BATCH_BYTES // 2**30} GiB)")
    if self.kind not in KINDS:
      raise bad(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
    if self.loss_fn is not None and not callable(self.loss_fn):
      raise bad("loss_fn must be a function loss_fn(logits, labels) -> scalar")
    if self.metrics is not None and not isinstance(self.metrics, Metrics):
      raise bad("metrics must be a Metrics(counts, summarize), e.g. classification_metrics()")
    for field in ("rngs", "mutable", "alt_datasets"):
      v = getattr(self, field)
      try:
        v = (v,) if isinstance(v, str) else tuple(v)
      except TypeError:
        v = None
      if v is None or not all(isinstance(s, str) for s in v) or (field != "alt_datasets" and "params" in v):
        raise bad(f"{field} must be a tuple of names (strings) other than 'params', e.g. ('dropout',), "
                  f"got {getattr(self, field)!r}")
      setattr_(field, v)
    for name in self.alt_datasets:
      try:
        dataset_spec(name)
      except ValueError as e:
        raise bad(f"alt_datasets: {e}") from None
    for field in ("train_kwargs", "eval_kwargs"):
      v = getattr(self, field)
      if not (isinstance(v, Mapping) and all(isinstance(k, str) for k in v)):
        raise bad(f"{field} must be a dict of keyword arguments of the model's __call__, e.g. "
                  f"{{'train': {field == 'train_kwargs'}}}, got {v!r}")
      setattr_(field, dict(v))
    if isinstance(self.data, Dataset):
      self.check()  # arrays at hand: a model that does not fit them fails now, not in a worker

  # -- what the data says
  @property
  def spec(self) -> DatasetSpec:
    return self.data.spec if isinstance(self.data, Dataset) else dataset_spec(self.data)

  @property
  def input_shape(self) -> tuple[int, ...]:
    return self.spec.input_shape

  @property
  def label_shape(self) -> tuple[int, ...]:
    return self.spec.label_shape

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  @property
  def dataset(self) -> str:
    """The dataset's name."""
    return self.data.name if isinstance(self.data, Dataset) else self.data

  def load_data(self, allow_synthetic: bool = False, data_dir=None) -> Dataset:
    """The task's dataset in memory (a named one is loaded, or built, on first use)."""
    if isinstance(self.data, Dataset):
      return self.data
    return load_dataset(self.data, data_dir, allow_synthetic=allow_synthetic)

  # -- resolved defaults
  @property
  def loss(self) -> Callable:
    return self.loss_fn or cross_entropy

  @property
  def eval_metrics(self) -> Metrics:
    if self.metrics is not None:
      return self.metrics
    return (segmentation_metrics if self.kind == "segmentation" else classification_metrics)(self.loss_fn)

  def check(self) -> "Task":
    """Checks, once per task and without running it, that the model maps a batch of the
    data's inputs to logits matching its labels and that the loss is a scalar; raises a
    ``ValueError`` naming the task and what to change."""
    if self in _CHECKED:
      return self
    spec, b = self.spec, 2
    x = jax.ShapeDtypeStruct((b, *spec.input_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((b, *spec.label_shape), jnp.int32)

    def trace(x, y):
      key = jax.random.PRNGKey(0)
      variables = self.model.init({s: key for s in ("params",) + self.rngs}, x, **self.eval_kwargs)
      # the streams of a train step exactly (flax would let a missing one fall back to 'params')
      rngs = {s: key for s in self.rngs} or None
      out = self.model.apply(variables, x, rngs=rngs, mutable=list(self.mutable) or False,
                             **self.train_kwargs)
      logits = out[0] if self.mutable else out
      return logits, self.model.apply(variables, x, **self.eval_kwargs)

    try:
      train_logits, eval_logits = jax.eval_shape(trace, x, y)
    except Exception as e:  # noqa: BLE001 - re-raised with the task and the shapes
      raise ValueError(
          f"task {self.name!r}: the model fails on a batch of shape {x.shape} from dataset "
          f"{self.dataset!r} ({type(e).__name__}: {e}). Check the model against the data's "
          f"input shape, and rngs=/mutable=/train_kwargs=/eval_kwargs= for Dropout or BatchNorm"
      ) from e
    want = (b, *spec.label_shape)
    for mode, lg in (("training", train_logits), ("evaluation", eval_logits)):
      if not (hasattr(lg, "shape") and lg.shape[:-1] == want and lg.shape[-1] >= spec.num_classes):
        got = getattr(lg, "shape", type(lg).__name__)
        raise ValueError(self._label_hint(got) or (
            f"task {self.name!r}: in {mode} the model outputs {got} for inputs {x.shape}, but "
            f"dataset {self.dataset!r} has {self.kind} labels of shape {spec.label_shape} with "
            f"{spec.num_classes} classes: the model must output logits of shape (batch, "
            f"{', '.join(map(str, spec.label_shape)) + ', ' if spec.label_shape else ''}"
            f">= {spec.num_classes}); change its last layer (e.g. nn.Dense({spec.num_classes}))"))
    try:
      loss = jax.eval_shape(self.loss, train_logits, y)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"task {self.name!r}: loss_fn(logits, labels) fails on logits "
                       f"{train_logits.shape} and labels {y.shape}: {type(e).__name__}: {e}") from e
    if getattr(loss, "shape", None) != ():
      raise ValueError(f"task {self.name!r}: loss_fn(logits, labels) must return a scalar, got "
                       f"shape {getattr(loss, 'shape', type(loss).__name__)} (take the mean)")
    _CHECKED.add(self)
    return self

  def memo(self, key, make: Callable[[], Any]) -> Any:
    """``make()``, computed once per task and ``key`` and kept on the task (jitted steps,
    client programs, evaluation functions): a cache that lives as long as the task."""
    if key not in self._memo:
      self._memo[key] = make()
    return self._memo[key]

  def _label_hint(self, logits_shape) -> str | None:
    """Why a model that outputs ``logits_shape`` does not fit this task's labels, when the
    labels themselves look wrong (one-hot rows, or class ids counted from 1): the usual slips
    with arrays of one's own. None when nothing of the kind is seen."""
    if not (isinstance(self.data, Dataset) and self.kind == "classification"):
      return None
    ds, shape = self.data, tuple(logits_shape) if isinstance(logits_shape, tuple) else ()
    call = lambda fix: (f"Dataset.from_arrays({ds.name!r}, x_train, {fix('y_train')}"  # noqa: E731
                        + (f", x_test, {fix('y_test')})" if len(ds.y_test) else ")"))
    ys = [y for y in (ds.y_train, ds.y_test) if len(y)]
    if ds.y_train.ndim == 2 and len(shape) == 2 and ds.y_train.shape[1] >= 2:
      if all(((y == 0) | (y == 1)).all() and (y.sum(-1) == 1).all() for y in ys):
        return (f"task {self.name!r}: dataset {ds.name!r} holds one-hot labels (y_train of shape "
                f"{ds.y_train.shape}: rows of 0/1 that sum to 1), but a classification task takes one "
                f"class id per sample; pass the class ids y.argmax(-1): {call(lambda v: v + '.argmax(-1)')}")
    if ds.y_train.ndim == 1 and len(shape) == 2:
      low = int(min(y.min() for y in ys))
      if low >= 1 and shape[-1] >= ds.num_classes - low:
        return (f"task {self.name!r}: the labels of dataset {ds.name!r} start at {low} (the smallest label is "
                f"{low}, not 0), so they need {ds.num_classes} classes, and the model outputs {shape[-1]} "
                f"logits; class ids count from 0: pass y - {low}, {call(lambda v: f'{v} - {low}')} "
                f"(or make the model's last layer nn.Dense({ds.num_classes}))")
    return None

  def replace(self, **changes: Any) -> "Task":
    """A copy with ``changes`` (a new task: its own caches). ``dataset=`` switches to one of
    ``alt_datasets``; new ``learning_rate``/``momentum`` rebuild an SGD optimizer.

    Example::

        get_task("mnist_lenet").replace(dataset="fashion_mnist", batch_size=64)
    """
    if "dataset" in changes:
      name = changes.pop("dataset")
      if name not in (self.dataset,) + self.alt_datasets:
        raise ValueError(f"task '{self.name}' cannot use dataset '{name}'; "
                         f"valid: {', '.join((self.dataset,) + self.alt_datasets)}")
      if name != self.dataset:
        changes["data"] = name
    if self._sgd and "optimizer" not in changes and {"learning_rate", "momentum"} & set(changes):
      changes["optimizer"] = None
    return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
  """Makes ``task`` available by name (to :func:`get_task`, ``Job("name", ...)``, the CLI).
  Registering the same task again is a no-op; another task under a taken name is an error.

  Example::

      register_task(Task("mine", MyNet(), ds, optimizer=optax.adam(1e-3)))
  """
  if not isinstance(task, Task):
    raise TypeError(f"register_task takes a Task, got {type(task).__name__}")
  held = _REGISTRY.get(task.name)
  if held is not None and held is not task:
    raise ValueError(f"a different task is already registered as {task.name!r}; "
                     "give yours another name (Task(name=...) or task.replace(name=...))")
  _REGISTRY[task.name] = task
  return task


def task_names() -> tuple[str, ...]:
  """Names of the registered tasks, built-ins first."""
  return tuple(_REGISTRY)


def get_task(name: str | Task) -> Task:
  """The task registered as ``name`` (a :class:`Task` passes through); ``ValueError`` lists
  valid names."""
  if isinstance(name, Task):
    return name
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(_REGISTRY)}") from None


def parse_task_names(text: str) -> tuple[str, ...]:
  """The names in a comma-separated task list, as every command reads one (``--tasks``, a
  config file's ``"tasks"``): spaces around names stripped, empty entries dropped.

  Example::

      parse_task_names("digits_mlp, mnist_lenet,")   # ('digits_mlp', 'mnist_lenet')
  """
  return tuple(n.strip() for n in str(text).split(",") if n.strip())


def get_tasks(names: str | Task | list | tuple) -> list[Task]:
  """Tasks from a comma-separated string of names (:func:`parse_task_names`), or a sequence
  of names and tasks."""
  if isinstance(names, str):
    names = parse_task_names(names)
  elif isinstance(names, Task):
    names = [names]
  if not names:
    raise ValueError(f"no task named; valid tasks: {', '.join(_REGISTRY)}")
  tasks = [get_task(n) for n in names]
  if len({t.name for t in tasks}) != len(tasks):
    raise ValueError(f"a task is named twice in {[t.name for t in tasks]}")
  return tasks


# --------------------------------------------------------------------------- built-ins
for _task in (
    Task("digits_mlp", models.MLP((128, 64), 10), "mtfl_digits",
         batch_size=32, learning_rate=0.05, momentum=0.9),
    Task("mnist_lenet", models.LeNet5(10), "mtfl_mnist5k", batch_size=32, learning_rate=0.02,
         momentum=0.9, alt_datasets=("mnist", "fashion_mnist")),
    Task("cifar_resnet", models.ResNet(1, (16, 32, 64), 10), "cifar10",
         batch_size=32, learning_rate=0.05, momentum=0.9),
    Task("shapes_unet", models.UNet((16, 32, 64), 4), "mtfl_shapes", kind="segmentation",
         batch_size=16, learning_rate=0.05, momentum=0.9),
):
  register_task(_task)

ALL_TASKS: tuple[str, ...] = task_names()
# Tasks whose default dataset builds offline: the ones accuracy experiments may use anywhere.
OFFLINE_TASKS: tuple[str, ...] = ("digits_mlp", "mnist_lenet", "shapes_unet")
