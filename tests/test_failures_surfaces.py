"""Bad input at the package's user-facing surfaces ends in one clear line, before any work.

Each case names the value, what is valid and a fix the user can make (a flag or an argument
that exists); CLI cases run ``main([...])`` in-process, signals in a subprocess.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optax
import pytest

from mtfl_jax import distributed, models
from mtfl_jax.__main__ import main
from mtfl_jax.data import Dataset
from mtfl_jax.tasks import Task, get_tasks, parse_task_names
from mtfl_jax.train import evaluate, init_params

REPO = Path(__file__).resolve().parents[1]
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
    (lambda: Dataset.from_arrays("c", X, Y3, num_classes=True),
     r"num_classes=True but .* give an integer num_classes >= 3"),
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


def _cli(capsys, *argv) -> str:
  """``main(argv)``'s one-line error (exit code 2)."""
  assert main(list(argv)) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
  return err[len("error: "):]


def test_federate_task_lists_strip_spaces_like_profile(tmp_path, capsys):
  w = str(tmp_path / "w")
  err = _cli(capsys, "federate", "--workdir", w, "--tasks", "digits_mlp, mnist_lenet,", "--rounds", "0")
  assert err == "bad federated config: rounds must be an integer >= 1, got 0"  # the tasks were understood
  cfg = tmp_path / "cfg.json"
  cfg.write_text(json.dumps({"tasks": "digits_mlp , mnist_lenet", "rounds": 0}))
  assert _cli(capsys, "federate", "--workdir", w, "--config", str(cfg)) == err


# --------------------------------------------------------------------------- command lines
@pytest.mark.parametrize("argv, expected", [
    (["bench", "nope"], "argument which: invalid choice: 'nope' (choose from 'cosched', 'federated', 'scale') "
                        "(see python -m mtfl_jax bench --help)"),
    (["profile", "--repeats", "many"], "argument --repeats: invalid int value: 'many' (see python -m mtfl_jax "
                                       "profile --help)"),
    (["federate"], "the following arguments are required: --workdir (see python -m mtfl_jax federate --help)"),
    (["download", "mnist", "--bogus"], "unrecognized arguments: --bogus (see python -m mtfl_jax --help)"),
    (["profile", "--tasks", "digits_mlp", "--repeats", "0"],
     "--repeats must be an integer between 1 and 10000 (timed steps per task), got 0"),
    (["profile", "--tasks", "digits_mlp", "--repeats", str(10**9)],
     "--repeats must be an integer between 1 and 10000 (timed steps per task), got 1000000000"),
    (["profile", "--tasks", " , "], "no task named; valid tasks: digits_mlp, mnist_lenet, cifar_resnet, shapes_unet"),
    (["download", ""], "unknown dataset ''; valid: mnist, fashion_mnist, cifar10, mtfl_digits, mtfl_mnist5k, "
                       "mtfl_shapes"),
])
def test_command_line_mistakes_are_one_line(capsys, argv, expected):
  t0 = time.perf_counter()
  assert _cli(capsys, *argv) == expected
  assert time.perf_counter() - t0 < 5  # refused before any work


def test_a_huge_profile_keeps_a_bounded_batch_pool(monkeypatch):
  from mtfl_jax import profiling
  drawn = []
  real = profiling.sample_batches
  monkeypatch.setattr(profiling, "sample_batches", lambda *a: drawn.append(a[4]) or real(*a))
  monkeypatch.setattr(profiling, "device_peak_flops", lambda: 1e9)  # not what this test is about
  prof = profiling.profile_task(_task(Y3), warmup=0, repeats=70, top_ops=1)
  assert drawn == [64] and prof.step_time_s > 0  # 70 steps cycle over 64 batches


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_reproduce_seed_out_of_range_before_any_work(tmp_path, capsys, seed):
  t0 = time.perf_counter()
  assert _cli(capsys, "reproduce", "--seed", seed, "--out", str(tmp_path / "r")) == (
      f"seed (--seed) must be an integer between 0 and 4294967295, got {seed}")
  assert time.perf_counter() - t0 < 5 and not (tmp_path / "r").exists()


def test_reproduce_into_another_runs_out_refuses_before_measuring(tmp_path, capsys):
  raw = tmp_path / "r" / "raw"
  raw.mkdir(parents=True)
  (raw / "evidence.json").write_text(json.dumps({"device": "d", "repro_mode": "full", "seed": 0}))
  before = (raw / "evidence.json").read_text()
  t0 = time.perf_counter()  # the first experiment (workloads) is not measured first
  assert _cli(capsys, "reproduce", "--out", str(tmp_path / "r")) == (
      f"{raw / 'evidence.json'} holds a 'full' run with seed 0; use another --out for mode 'quick', seed 0 "
      "(nothing was overwritten, nor measured)")
  assert time.perf_counter() - t0 < 5
  assert sorted(p.name for p in raw.iterdir()) == ["evidence.json"] and (raw / "evidence.json").read_text() == before


# --------------------------------------------------------------------------- devices and processes
def _fed(tmp_path, capsys, *flags) -> str:
  return _cli(capsys, "federate", "--workdir", str(tmp_path / "w"), "--tasks", "digits_mlp", *flags)


@pytest.mark.parametrize("flags, expected", [
    (["--processes", "0"], "--processes must be >= 1, got 0"),
    (["--processes", str(distributed.usable_cores() + 1)],
     f"--processes {distributed.usable_cores() + 1}: each local process needs a core of its own, and this process "
     f"may use {distributed.usable_cores()}; give --processes <= {distributed.usable_cores()}, or start the processes "
     "on several hosts by hand (--process-id, --coordinator)"),
    (["--processes", "2", "--process-id", "2", "--coordinator", "h:1"],
     "--process-id 2 is not below --processes 2: process ids run 0..1"),
    (["--processes", "2", "--process-id", "-1"], "--process-id must be >= 0, got -1"),
    (["--processes", "2", "--process-id", "1"],
     "process 1 of 2 needs --coordinator HOST:PORT, the address of process 0 (or the environment variable "
     "MTFL_COORDINATOR)"),
    (["--processes", "2", "--process-id", "1", "--coordinator", "h:99999"],
     "the coordinator address (--coordinator) must be HOST:PORT with a port in 1..65535 (e.g. 10.0.0.1:1234), "
     "got 'h:99999'"),
    (["--coordinator", "h:1"], "--coordinator is for a process started by hand: give its --process-id too (or "
                               "leave --coordinator out: --processes N alone starts N local processes on a port of "
                               "its own)"),
    (["--join-timeout", str(10**9)], "--join-timeout must be <= 3600, got 1000000000 (seconds; a process that stops "
                                     "answering is noticed only after this long)"),
    (["--devices", "0"], "--devices must be >= 1, got 0"),
    (["--devices", str(10**6)], "--devices must be <= 1024, got 1000000 (JAX builds every CPU device when it starts)"),
    (["--devices-per-process", "0", "--processes", "2"], "--devices-per-process must be >= 1, got 0"),
    (["--devices-per-process", "2"], "--devices-per-process is for runs of several processes; in one process give "
                                     "--devices"),
    (["--processes", "2", "--devices", "4", "--devices-per-process", "3"],
     "--devices 4 and --devices-per-process 3 disagree for --processes 2 (3 x 2 = 6); give one of them"),
    (["--processes", "2", "--process-id", "0", "--coordinator", "h:1", "--devices", "3"],
     "--devices 3 does not split evenly over --processes 2; give a multiple of the process count (or "
     "--devices-per-process)"),
])
def test_process_flags_are_checked_together_before_anything_runs(tmp_path, capsys, flags, expected):
  if "--processes" in flags and flags[flags.index("--processes") + 1] == "2" and distributed.usable_cores() < 2:
    pytest.skip("needs 2 cores for a local launch of 2 processes")
  assert _fed(tmp_path, capsys, *flags) == expected
  assert not (tmp_path / "w").exists()


def test_join_failure_messages_name_who_never_joined():
  assert distributed.join_failure(0, 2, "h:7", 5) == (
      "process 0 of 2 (this process, which coordinates the run) could not join the run coordinated at h:7 within 5s: "
      "process 1 never joined. Check that every other process was started with the same --processes 2, "
      "--coordinator h:7 and its own --process-id, that it can reach port 7 of this host by that address (a "
      "firewall?), and that it started within --join-timeout (raise it if the others start later); each process "
      "runs: python -m mtfl_jax federate ... --processes 2 --process-id I --coordinator h:7")
  four = distributed.join_failure(0, 4, "h:7", 5)
  assert "at least one of processes 1..3 (JAX does not say which) never joined" in four
  assert distributed.join_failure(2, 3, "h:7", 5, "Connection refused").startswith(
      "process 2 of 3 could not join the run coordinated at h:7 within 5s: the coordinator does not answer there "
      "(Connection refused). Check that process 0 runs on that host (--process-id 0 --coordinator h:7)")
  assert ": process 0 answers there, but process 1 never joined." in distributed.join_failure(2, 3, "h:7", 5)
  assert ": process 0 answers there, but one of processes 1, 3 never joined." in distributed.join_failure(
      2, 4, "h:7", 5)
  assert "the run did not form. Check that every process was started with the same --processes 2 (process 0 may " \
         "expect more)" in distributed.join_failure(1, 2, "h:7", 5)


@pytest.mark.parametrize("first, code0, failed, named", [
    ({0: 2}, 2, [0], None),  # process 0's user error: its own one line
    ({1: 2}, 2, [1], None),  # every process refused the same input: process 0 says it
    ({1: -9}, -15, [1], 1),  # a killed worker, process 0 stopped before it noticed
    ({1: -9}, 2, [1], 1),  # ... or after it printed its own line about the lost peer (CI saw it)
    ({0: 2, 1: -9}, 2, [0, 1], 1),  # seen in the same poll: the killed one is the cause
    ({1: 1}, 2, [1], 1),  # a worker's crash (a bug, exit code 1)
    ({}, 0, [1], 1),  # a straggler after process 0 finished
])
def test_a_failed_run_names_the_process_that_failed_first(first, code0, failed, named):
  assert distributed.failure_to_name(first, code0, failed) == named


def _env(**extra):
  return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


def test_process_0_started_by_hand_says_process_1_never_joined(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", "mtfl_jax", "federate", "--workdir", str(tmp_path / "w"), "--tasks",
                      "digits_mlp", "--rounds", "1", "--processes", "2", "--process-id", "0", "--coordinator",
                      f"127.0.0.1:{port}", "--join-timeout", "3"], cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=90)
  assert time.perf_counter() - t0 < 45  # the 3 s join timeout and an interpreter start
  assert r.returncode == 2 and r.stderr.strip() == "error: " + distributed.join_failure(0, 2, f"127.0.0.1:{port}", 3)


# --------------------------------------------------------------------------- SIGTERM
def _children_of(pid: int) -> list[int]:
  out = []
  for d in os.listdir("/proc"):
    if d.isdigit():
      try:
        if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
          out.append(int(d))
      except (OSError, ValueError, IndexError):
        pass
  return out


def _alive(pid: int) -> bool:
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def _terminate_when(p: subprocess.Popen, ready, timeout: float = 120, group_ctrl_c: bool = False):
  """Waits until ``ready(children)`` holds, sends SIGTERM (or, with ``group_ctrl_c``, SIGINT to
  the process group, as a terminal's Ctrl-C does), and returns the children seen then and the
  process's stderr; kills everything left should the test fail."""
  kids = []
  try:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
      kids = _children_of(p.pid)
      if ready(kids):
        break
      time.sleep(0.2)
    assert p.poll() is None and ready(kids), p.communicate()[1][-3000:]
    if group_ctrl_c:
      os.killpg(p.pid, signal.SIGINT)
    else:
      p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
  finally:
    for pid in [*kids, p.pid]:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    p.wait()
  return kids, err


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the child processes in /proc")
def test_sigterm_stops_bench_scale_its_point_process_and_removes_its_temp_dir(tmp_path):
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  p = subprocess.Popen([sys.executable, "-m", "mtfl_jax", "bench", "scale"], cwd=REPO, env=_env(TMPDIR=str(tmp)),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  kids, err = _terminate_when(p, lambda kids: bool(kids) and any(tmp.glob("mtfl_scale_*")))
  assert p.returncode == 143, err[-3000:]
  assert err.strip().splitlines()[-1] == ("interrupted: no results written (the benchmark writes them when it "
                                          "ends); rerun the same command")
  assert "Traceback" not in err and "os.fork()" not in err
  assert not [k for k in kids if _alive(k)] and not list(tmp.iterdir())


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or distributed.usable_cores() < 2,
                    reason="finds the child processes in /proc; 2 local processes need 2 cores")
@pytest.mark.parametrize("ctrl_c, code", [(False, 143), (True, 130)])
def test_sigterm_or_ctrl_c_stops_the_federate_launcher_and_its_processes(tmp_path, ctrl_c, code):
  w = tmp_path / "w"
  p = subprocess.Popen([sys.executable, "-m", "mtfl_jax", "federate", "--workdir", str(w), "--tasks", "digits_mlp",
                        "--clients", "4", "--rounds", "1000", "--processes", "2"], cwd=REPO, env=_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  for line in p.stdout:  # process 0's output: both processes joined, the run is under way
    if line.startswith("federate:"):
      break
  kids, err = _terminate_when(p, lambda kids: len(kids) == 2, group_ctrl_c=ctrl_c)
  assert p.returncode == code, err[-3000:]
  assert err.count("interrupted:") == 1 and err.strip().splitlines()[-1] == (
      f"interrupted: the checkpoints of finished rounds are kept in {w / 'checkpoints'}; rerun the same command to "
      "resume")
  assert "Traceback" not in err and "os.fork()" not in err
  assert not [k for k in kids if _alive(k)]


def test_the_launched_marker_is_the_launchers():
  from mtfl_jax import __main__ as cli
  assert cli.LAUNCHED_ENV == distributed.LAUNCHER_ENV


# --------------------------------------------------------------------------- stores and profiles
@pytest.mark.parametrize("mixes, detail", [
    ([], "AttributeError: 'list' object has no attribute 'items'"),
    ({"digits_mlp": 5}, "AttributeError: 'int' object has no attribute 'get'"),  # the key of an older store
    ({"processes|digits_mlp": 5}, "TypeError: 'int' object is not subscriptable"),
    ({"processes|digits_mlp": []}, "TypeError: list indices must be integers or slices, not str"),
])
def test_a_calibration_store_of_the_wrong_shape_names_the_file(tmp_path, mixes, detail):
  from mtfl_jax.calibration import load_model
  from mtfl_jax.files import BadFileError
  store = tmp_path / "vr.json"
  store.write_text(json.dumps({"device": "d", "mixes": mixes}))
  with pytest.raises(BadFileError) as e:
    load_model(["digits_mlp"], path=store)
  assert str(e.value) == (f"calibration store {store}: not the layout this version expects (a field of the wrong "
                          f"type: {detail}; written by another version?); delete it to re-measure (one co-run per "
                          "task mix)")


@pytest.mark.parametrize("profiles", [["x"], 5])
def test_a_profile_file_of_the_wrong_shape_names_the_file(tmp_path, profiles):
  from mtfl_jax.profiling import load_profiles
  from mtfl_jax.files import BadFileError
  f = tmp_path / "dev.json"
  f.write_text(json.dumps({"device": "d", "profiles": profiles}))
  with pytest.raises(BadFileError, match=rf"profile file {f} .*a field of the wrong type: .*; delete it and make "
                                         r"one with `python -m mtfl_jax profile"):
    load_profiles(f)


def test_bench_federated_reads_a_corrupt_store_before_measuring(tmp_path, capsys, monkeypatch):
  from mtfl_jax.calibration import store_path
  monkeypatch.setenv("MTFL_PROFILE_DIR", str(tmp_path))
  store_path().write_text('{"device": "d", "mixes": {')
  before = store_path().read_text()
  t0 = time.perf_counter()
  err = _cli(capsys, "bench", "federated")
  assert err.startswith(f"calibration store {store_path()} is not valid JSON") and time.perf_counter() - t0 < 5
  assert store_path().read_text() == before


# --------------------------------------------------------------------------- co-scheduling
@pytest.mark.parametrize("kw, match", [
    (dict(steps=True), "steps must be a positive integer, got True"),
    (dict(steps=10**12), r"steps must be <= 1000000 \(one round's local steps\), got 1000000000000; split the work"),
    (dict(steps=5, seed=-1), "seed must be an integer between 0 and 4294967295, got -1"),
    (dict(steps=5, indices=[]), r"indices must be a non-empty 1-D array .* got shape \(0,\)"),
    (dict(steps=5, indices=[[1, 2]]), r"got shape \(1, 2\), dtype int64, smallest 1"),
    (dict(steps=5, indices=[3, -1]), r"got shape \(2,\), dtype int64, smallest -1"),
    (dict(steps=5, indices=[0.5]), r"got shape \(1,\), dtype float64$"),
])
def test_bad_job_arguments(kw, match):
  from mtfl_jax.backends import Job
  with pytest.raises(ValueError, match="job for task 'digits_mlp': .*" + match):
    Job("digits_mlp", **kw)


def test_job_indices_past_the_data_of_a_task_of_ones_own():
  from mtfl_jax.backends import Job
  with pytest.raises(ValueError, match="job for task 't': indices go up to 60 but dataset 'mine' has 60 training"):
    Job(_task(Y3), 2, indices=[0, 60])


@pytest.mark.parametrize("call, expected", [
    (lambda Job, ob: ob("threads", ["digits_mlp"]), "jobs must be Job values, e.g. Job('digits_mlp', 50), got "
                                                    "'digits_mlp'"),
    (lambda Job, ob: ob("threads", Job("digits_mlp", 5)), "jobs must be a list of Job values, e.g. "
                                                          "[Job('digits_mlp', 50)], got one Job (of task 'digits_mlp')"),
    (lambda Job, ob: ob("threads", [Job("digits_mlp", 5)], timeout_s=3),
     "backend 'threads' takes no option timeout_s; its options: slice_s"),
    (lambda Job, ob: ob("threads", [Job("digits_mlp", 5)], slice_s=-1),
     "backend 'threads': slice_s must be a finite number of seconds > 0, got -1"),
    (lambda Job, ob: ob("fused", [Job("digits_mlp", 5)], slice_s=float("inf")),
     "backend 'fused': slice_s must be a finite number of seconds > 0, got inf"),
    (lambda Job, ob: ob("processes", [Job("digits_mlp", 5)], timeout_s=float("nan")),
     "backend 'processes': timeout_s must be a finite number of seconds > 0, got nan"),
])
def test_bad_backend_arguments_fail_before_compiling(call, expected):
  from mtfl_jax.backends import Job, open_backend
  t0 = time.perf_counter()
  with pytest.raises(ValueError) as e:
    call(Job, open_backend)
  assert str(e.value) == expected and time.perf_counter() - t0 < 2


def test_bad_shares_and_round_arguments():
  from mtfl_jax.backends import Job, open_backend
  from mtfl_jax.cosched import run_round
  with pytest.raises(ValueError, match="unknown policy 'nope'; valid policies: sequential, equal"):
    run_round([Job("digits_mlp", 5)], policy="nope")
  with pytest.raises(ValueError, match="backend 'threads': slice_s must be a finite number of seconds > 0, got 0"):
    run_round([Job("digits_mlp", 5)], backend="threads", slice_s=0)
  with open_backend("sequential", [Job("digits_mlp", 3)]) as r:
    for shares, match in (({"digits_mlp": True}, "got True"), ({"digits_mlp": float("inf")}, "got inf"),
                          ({"x": 1.0}, r"shares name task\(s\) \['x'\] with no job here")):
      with pytest.raises(ValueError, match=match):
        r.run(shares)


def test_main_called_from_python_gives_back_the_callers_signal_handlers(capsys):
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  assert main(["profile", "--tasks", "nope"]) == 2  # ran past the point where main installs its handler
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
