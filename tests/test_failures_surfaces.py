"""Bad input at the package's user-facing surfaces ends in one clear line, before any work.

Each case names the value, what is valid and a fix the user can make (a flag or an argument
that exists); CLI cases run ``main([...])`` in-process, signals in a subprocess.
"""
import numpy as np
import optax
import pytest

from mtfl_jax import models
from mtfl_jax.data import Dataset
from mtfl_jax.tasks import Task, get_tasks, parse_task_names
from mtfl_jax.train import evaluate, init_params

RNG = np.random.default_rng(0)
X = RNG.random((60, 4)).astype(np.float32)
Y3 = RNG.integers(0, 3, 60)
Y10 = RNG.integers(0, 10, 60)


def _task(y_train, y_test=None, classes=3, **kw):
  data = Dataset.from_arrays("mine", X, y_train, *((X[:10], y_test) if y_test is not None else ()))
  return Task("t", models.MLP((8,), classes), data, **{"learning_rate": 0.1, **kw})


# --------------------------------------------------------------------------- labels
def test_one_hot_labels_are_named_with_the_argmax_fix():
  oh = np.eye(3)[Y3]
  with pytest.raises(ValueError) as e:
    _task(oh, oh[:10])
  assert str(e.value) == (
      "task 't': dataset 'mine' holds one-hot labels (y_train of shape (60, 3): rows of 0/1 that sum to 1), "
      "but a classification task takes one class id per sample; pass the class ids y.argmax(-1): "
      "Dataset.from_arrays('mine', x_train, y_train.argmax(-1), x_test, y_test.argmax(-1))")
  # the fix it names works
  assert _task(oh.argmax(-1), oh[:10].argmax(-1)).num_classes == 3


def test_multi_hot_labels_keep_the_shape_message():
  mh = (RNG.random((60, 3)) < 0.5).astype(int)  # rows that do not sum to 1: not one-hot
  mh[:, 0] = 1
  with pytest.raises(ValueError, match=r"labels of shape \(3,\) with 2 classes.*nn.Dense\(2\)"):
    _task(mh)


def test_labels_from_one_say_so_and_suggest_y_minus_1():
  with pytest.raises(ValueError) as e:
    _task(Y10 + 1, Y10[:10] + 1, classes=10)
  assert str(e.value) == (
      "task 't': the labels of dataset 'mine' start at 1 (the smallest label is 1, not 0), so they need 11 "
      "classes, and the model outputs 10 logits; class ids count from 0: pass y - 1, "
      "Dataset.from_arrays('mine', x_train, y_train - 1, x_test, y_test - 1) (or make the model's last layer "
      "nn.Dense(11))")
  assert _task(Y10 + 1 - 1, Y10[:10], classes=10).num_classes == 10


def test_labels_from_zero_that_need_a_wider_model_keep_the_layer_message():
  with pytest.raises(ValueError, match=r"10 classes: .*change its last layer \(e.g. nn.Dense\(10\)\)$"):
    _task(Y10, classes=8)


# --------------------------------------------------------------------------- arrays
def test_images_of_different_sizes_name_the_array_and_the_first_odd_sample():
  imgs = [np.zeros((28, 28)) for _ in range(5)]
  imgs[3] = np.zeros((30, 28))
  with pytest.raises(ValueError) as e:
    Dataset.from_arrays("scans", imgs, [0] * 5)
  assert str(e.value) == (
      "dataset 'scans': the samples of x_train differ in shape: x_train[3] has shape (30, 28) but x_train[0] "
      "has (28, 28); resize or pad every sample to one shape (e.g. crop or resize images) before "
      "Dataset.from_arrays")
  good = [np.zeros((28, 28))] * 5
  with pytest.raises(ValueError, match=r"x_test\[3\] has shape \(30, 28\) but x_test\[0\] has \(28, 28\)"):
    Dataset.from_arrays("scans", good, [0] * 5, imgs, [0] * 5)


@pytest.mark.parametrize("call, match", [
    (lambda: Dataset.from_arrays("", X, Y3), "a dataset's name must be a non-empty string, got ''"),
    (lambda: Dataset.from_arrays(None, X, Y3), "a dataset's name must be a non-empty string, got None"),
    (lambda: Dataset.from_arrays("c", X + 1j, Y3), "dataset 'c': x_train must hold real numbers, got dtype complex"),
    (lambda: Dataset.from_arrays("c", X, Y3 * 10**10),
     r"found 20000000000 \(ids, not class numbers\?\); map them to 0..K-1"),
    (lambda: Dataset.from_arrays("c", X, Y3, num_classes=True), r"num_classes=True but .* give an integer num_classes >= 3"),
    (lambda: Dataset.from_arrays("c", X, Y3, num_classes=2.0), "num_classes=2.0 but labels go up to 2"),
    (lambda: Dataset.from_arrays("c", X, [[0, 1]] * 30 + [[0]] * 30),
     r"samples of y_train differ in shape: y_train\[30\] has shape \(1,\) but y_train\[0\] has \(2,\)"),
])
def test_bad_from_arrays_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_no_test_split_says_how_to_give_one():
  t = _task(Y3)
  with pytest.raises(ValueError) as e:
    evaluate(t, init_params(t, 0))
  assert str(e.value) == ("dataset 'mine' has no test split, and task 't' is evaluated on it; build the dataset "
                          "with one: Dataset.from_arrays('mine', x_train, y_train, x_test, y_test)")
  assert "x_test, y_test" in Dataset.from_arrays.__doc__ and "pass x and y" not in Dataset.from_arrays.__doc__


# --------------------------------------------------------------------------- Task arguments
@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=True), "batch_size must be a positive integer, got True"),
    (dict(batch_size=10**9), r"batch_size 1000000000: one batch of inputs of shape \(4,\) would take 14.9 GiB; "
                             r"give batch_size <= 67108864"),
    (dict(learning_rate=float("inf")), "a finite, positive learning_rate for SGD, got learning_rate=inf"),
    (dict(learning_rate=True), "learning_rate=True"),
    (dict(momentum=1.5), r"momentum must be a number in \[0, 1\) .* got 1.5"),
    (dict(momentum="0.9"), r"momentum must be a number in \[0, 1\) .* got '0.9'"),
    (dict(optimizer=optax.adam(1e-3), momentum=float("nan")), "momentum must be a number in"),
    (dict(rngs=5), r"rngs must be a tuple of names \(strings\) other than 'params', e.g. \('dropout',\), got 5"),
    (dict(mutable=("params",)), "mutable must be a tuple of names"),
    (dict(train_kwargs="ab"), r"train_kwargs must be a dict of keyword arguments .* got 'ab'"),
    (dict(eval_kwargs={1: 2}), "eval_kwargs must be a dict of keyword arguments"),
    (dict(alt_datasets=("nope",)), "alt_datasets: unknown dataset 'nope'; valid: mnist"),
])
def test_bad_task_arguments(kw, match):
  with pytest.raises(ValueError, match="task 't': .*" + match):
    _task(Y3, **kw)


@pytest.mark.parametrize("name", ["a,b", " a", "a "])
def test_task_names_cannot_break_task_lists(name):
  with pytest.raises(ValueError, match=f"a task's name may not hold ',' nor start or end with a space, got {name!r}"):
    Task(name, models.MLP((8,), 3), "mtfl_digits", learning_rate=0.1)


def test_a_huge_batch_of_a_named_dataset_fails_before_loading_it():
  with pytest.raises(ValueError, match=r"batch_size 10000000000: .* \(32, 32, 3\) .* give batch_size <= 87381"):
    Task("t", models.MLP((8,), 10), "cifar10", learning_rate=0.1, batch_size=10**10)


# --------------------------------------------------------------------------- task lists
def test_task_lists_are_parsed_in_one_place():
  assert parse_task_names(" digits_mlp , mnist_lenet,,") == ("digits_mlp", "mnist_lenet")
  assert [t.name for t in get_tasks("digits_mlp, mnist_lenet")] == ["digits_mlp", "mnist_lenet"]
  with pytest.raises(ValueError, match="no task named; valid tasks: digits_mlp"):
    get_tasks(" , ")
