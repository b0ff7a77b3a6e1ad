"""Every failure a user can meet says what happened and what to do, in bounded time."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtfl_jax import data
from mtfl_jax.__main__ import main
from mtfl_jax.fleet import Fleet
from mtfl_jax.federated import FedConfig, run_federated
from mtfl_jax.files import BadFileError, OutputPathError, check_writable, read_json, write_json
from mtfl_jax.vresource import VRModel

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = VRModel({"digits_mlp": 1e-3}, {"digits_mlp": 1.0}, {"digits_mlp": 1.0})


def _truncate(path: Path):
  text = path.read_bytes()
  path.write_bytes(text[: len(text) // 2])


# --------------------------------------------------------------------------- network
def test_download_without_network_fails_fast_and_says_how_to_get_the_data(tmp_path):
  # The command a user types, in its own process: this machine has no network, so this is a
  # real, bounded attempt (in-process, tfds' side effects made a later test's subprocess
  # ignore Ctrl-C under pytest's output capture).
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, "-m", "mtfl_jax", "download", "mnist", "--data-dir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert time.perf_counter() - t0 < 30  # interpreter and tfds start-up included
  assert out.returncode == 2 and "Traceback" not in out.stderr
  msg = " ".join(out.stderr.split())
  assert "network is not reachable" in msg and "https://storage.googleapis.com" in msg
  assert f"into {tmp_path}" in msg and "MTFL_DATA_DIR" in msg and "download mnist --data-dir DIR" in msg


def test_download_with_unreachable_probe_never_calls_tfds(tmp_path, monkeypatch, capsys):
  import tensorflow_datasets as tfds
  monkeypatch.setattr(data, "network_reachable", lambda url: "no answer within 5 s")
  monkeypatch.setattr(tfds, "data_source", lambda *a, **k: pytest.fail("tfds called"))
  assert main(["download", "fashion_mnist", "--data-dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: cannot download 'fashion_mnist'") and "no answer within 5 s" in err


def test_probe_is_bounded():
  import socket
  with socket.socket() as server:  # accepts connections, never answers
    server.bind(("127.0.0.1", 0))
    server.listen()
    t0 = time.perf_counter()
    why = data.network_reachable(f"http://127.0.0.1:{server.getsockname()[1]}/", timeout_s=0.5)
  assert why is not None and time.perf_counter() - t0 < 2


# --------------------------------------------------------------------------- JSON reads
def test_read_json_names_the_file_and_the_remedy(tmp_path):
  p = tmp_path / "x.json"
  p.write_text(json.dumps({"a": list(range(1000))}, indent=1))
  _truncate(p)
  with pytest.raises(BadFileError, match=rf"thing {p} is not valid JSON: .* line \d+ .*truncated.*; do this"):
    read_json(p, "thing", "do this")
  with pytest.raises(FileNotFoundError, match=rf"thing {tmp_path / 'no.json'} does not exist; make it"):
    read_json(tmp_path / "no.json", "thing", "do this", missing="make it")
  p.write_text("[1]")
  with pytest.raises(BadFileError, match="holds a JSON list, expected an object with a"):
    read_json(p, "thing", fields=("a",))
  p.write_text("{}")
  with pytest.raises(BadFileError, match="lacks field"):
    read_json(p, "thing", fields=("a",))


def test_truncated_calibration_and_profile_stores(tmp_path):
  from mtfl_jax.calibration import load_or_calibrate
  from mtfl_jax.profiling import load_profiles
  store = tmp_path / "vr_dev.json"
  store.write_text(json.dumps({"device": "d", "mixes": {"a,b": {"solo_step_s": {"a": 1}}}}, indent=1))
  _truncate(store)
  with pytest.raises(BadFileError, match=f"calibration store {store} is not valid JSON.*delete it to re-measure"):
    load_or_calibrate(("a", "b"), path=store)
  prof = tmp_path / "dev.json"
  prof.write_text('{"device": "d", "profiles": [{"task": ')
  with pytest.raises(BadFileError, match=f"profile file {prof} is not valid JSON"):
    load_profiles(prof)
  prof.write_text('{"device": "d", "profiles": [{"task": "x"}]}')
  with pytest.raises(BadFileError, match="not a profile file"):
    load_profiles(prof)


def _recorded_copy(tmp_path) -> Path:
  import shutil
  src = REPO / "data" / "recorded" / "cpu_amd_epyc_2_cores" / "raw"
  if not src.is_dir():
    pytest.skip("no recorded run in this checkout")
  dst = tmp_path / "rec"
  shutil.copytree(src, dst)
  return dst


def test_recorded_run_truncated_or_of_the_wrong_layout(tmp_path, capsys):
  rec = _recorded_copy(tmp_path)
  _truncate(rec / "cosched.json")
  assert main(["reproduce", "--from-recorded", str(rec), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert f"recorded experiment {rec / 'cosched.json'} is not valid JSON" in err and "re-record it" in err
  rec = _recorded_copy(tmp_path / "2")
  doc = json.loads((rec / "evidence.json").read_text())  # the evidence (federated.json is its legacy)
  del doc["scenarios"][0]["best_baseline"]
  (rec / "evidence.json").write_text(json.dumps(doc))
  assert main(["reproduce", "--from-recorded", str(rec), "--out", str(tmp_path / "o2")]) == 2
  err = capsys.readouterr().err
  assert "field 'best_baseline'" in err and "Traceback" not in err
  rec = _recorded_copy(tmp_path / "3")  # a recording made before the evidence experiment still redraws
  (rec / "evidence.json").unlink()
  doc = json.loads((rec / "federated.json").read_text())
  del doc["scenarios"][0]["gain"]
  (rec / "federated.json").write_text(json.dumps(doc))
  assert main(["reproduce", "--from-recorded", str(rec), "--out", str(tmp_path / "o3")]) == 2
  err = capsys.readouterr().err
  assert "field 'gain'" in err and "Traceback" not in err
  assert main(["reproduce", "--from-recorded", str(tmp_path / "none"), "--out", str(tmp_path / "o4")]) == 2
  assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- checkpoints
def _tiny(rounds):
  return FedConfig(tasks=("digits_mlp",), num_clients=4, clients_per_round=2, rounds=rounds, simulator="loop")


def test_truncated_latest_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
  run_federated(_tiny(3), model=TINY_MODEL, workdir=tmp_path, progress=False)
  ckpt = tmp_path / "checkpoints"
  assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["2", "3"]
  biggest = max((p for p in (ckpt / "3").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  _truncate(biggest)
  res = run_federated(_tiny(4), model=TINY_MODEL, workdir=tmp_path, progress=True)
  out = capsys.readouterr()
  assert [h["round"] for h in res.history] == [0, 1, 2, 3]
  assert "skipped the checkpoint of round 3, which cannot be read" in out.out
  assert "resuming from the checkpoint of round 2" in out.out
  assert "Event loop is closed" not in out.err
  assert len(list((tmp_path / "checkpoints.unreadable").iterdir())) == 1  # kept, not deleted


def test_no_readable_checkpoint_names_the_directory(tmp_path):
  from mtfl_jax.federated import CheckpointError
  run_federated(_tiny(2), model=TINY_MODEL, workdir=tmp_path, progress=False)
  for step in ("1", "2"):
    for p in (tmp_path / "checkpoints" / step).rglob("*"):
      if p.is_file() and p.stat().st_size > 100:
        _truncate(p)
  with pytest.raises(CheckpointError, match=f"none of the checkpoints in {tmp_path / 'checkpoints'} can be read"):
    run_federated(_tiny(3), model=TINY_MODEL, workdir=tmp_path, progress=False)


def test_corrupt_workdir_config(tmp_path):
  (tmp_path / "config.json").write_text('{"tasks": [')
  with pytest.raises(BadFileError, match=f"the run's config {tmp_path / 'config.json'} is not valid JSON.*delete it"):
    run_federated(_tiny(1), model=TINY_MODEL, workdir=tmp_path, progress=False)


# --------------------------------------------------------------------------- output paths
def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
  f = tmp_path / "afile"
  f.write_text("x")
  t0 = time.perf_counter()
  assert main(["reproduce", "--out", str(f)]) == 2
  assert f"cannot write --out {f}: it is a file, not a directory" in capsys.readouterr().err
  assert main(["bench", "cosched", "--json", str(f / "c.json")]) == 2
  err = capsys.readouterr().err
  assert f"cannot write --json {f / 'c.json'}: {f} is a file" in err and ".tmp" not in err
  assert main(["profile", "--tasks", "digits_mlp", "--json", str(tmp_path)]) == 2
  assert "it is a directory" in capsys.readouterr().err
  assert time.perf_counter() - t0 < 10  # nothing was measured
  assert check_writable(tmp_path / "new" / "deep" / "r.json", "--json").parent.is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root is never denied by file modes")
def test_unwritable_directory(tmp_path):
  d = tmp_path / "ro"
  d.mkdir()
  d.chmod(0o500)
  with pytest.raises(OutputPathError, match=f"cannot write --json {d / 'c.json'}"):
    check_writable(d / "c.json", "--json")


def test_failed_write_keeps_the_previous_file_and_rescues_the_result(tmp_path, monkeypatch):
  p = tmp_path / "r.json"
  write_json(p, {"v": 1})

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match=rf"could not write {p}: No space left on device.*saved to (\S+) instead") as e:
    write_json(p, {"v": 2})
  monkeypatch.undo()
  assert json.loads(p.read_text()) == {"v": 1}
  assert [q.name for q in tmp_path.iterdir()] == ["r.json"]  # no temporary file left
  rescued = Path(str(e.value).split("saved to ")[1].split(" instead")[0])
  assert json.loads(rescued.read_text()) == {"v": 2}
  rescued.unlink()


# --------------------------------------------------------------------------- data dirs
def test_built_data_reads_without_write_access(monkeypatch):
  built = data.load_dataset("mtfl_digits")  # built (once) where the tests build data
  data._load_cached.cache_clear()

  def denied(data_dir, name):
    raise PermissionError(13, "Permission denied", str(data_dir / f".{name}.lock"))
  monkeypatch.setattr(data, "_lock", denied)
  try:
    assert (data.load_dataset("mtfl_digits").x_train == built.x_train).all()
  finally:
    data._load_cached.cache_clear()


def test_building_in_an_unwritable_data_dir_names_it(tmp_path, monkeypatch):
  f = tmp_path / "afile"
  f.write_text("x")
  monkeypatch.setenv("MTFL_DATA_DIR", str(f / "tfds"))
  with pytest.raises(data.DatasetUnavailableError, match=rf"data dir {f / 'tfds'} \(from MTFL_DATA_DIR\): it is not writable"):
    data.load_dataset("mtfl_digits")
  monkeypatch.setenv("MTFL_DATA_DIR", str(f))
  with pytest.raises(data.DatasetUnavailableError, match=rf"data dir {f} \(from MTFL_DATA_DIR\) is a file"):
    data.load_dataset("mtfl_digits")


# --------------------------------------------------------------------------- fleet traces
@pytest.mark.parametrize("text, match", [
    ("not json", "fleet trace .* is not valid JSON"),
    ('{"speed": 1}', "holds a JSON dict, not a list"),
    ('[{"speed": 1, "bandwidth_bps": 1e6}]', "describes 1 clients, the federation has 2"),
    ('[{"speed": 1, "bandwidth_bps": 1e6}, {"speed": 1}]', "row 1 has no field 'bandwidth_bps'"),
    ('[{"speed": 1, "bandwidth_bps": 1e6}, {"speed": -2, "bandwidth_bps": 1e6}]',
     "row 1, field 'speed': -2 must be a finite number > 0"),
    ('[{"speed": "fast", "bandwidth_bps": 1e6}, {"speed": 1, "bandwidth_bps": 1e6}]',
     "row 0, field 'speed': 'fast' is not a number"),
    ('[{"speed": 1, "bandwidth_bps": Infinity}, {"speed": 1, "bandwidth_bps": 1e6}]',
     "row 0, field 'bandwidth_bps': inf must be a finite"),
    ('[[1, 2], {"speed": 1, "bandwidth_bps": 1e6}]', "row 0 is \\[1, 2\\], not an object"),
])
def test_fleet_trace_rows_are_validated(tmp_path, text, match):
  p = tmp_path / "trace.json"
  p.write_text(text)
  with pytest.raises(BadFileError, match=match):
    Fleet.from_trace(p, 2)


def test_fleet_trace_ok(tmp_path):
  p = tmp_path / "trace.json"
  p.write_text('[{"speed": 1, "bandwidth_bps": 8e6}, {"speed": 2.5, "bandwidth_bps": 16e6}, {"speed": 3, "bandwidth_bps": 1}]')
  f = Fleet.from_trace(p, 2)
  assert list(f.speed) == [1.0, 2.5] and list(f.bandwidth) == [1e6, 2e6]


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("kw, match", [
    (dict(local_epochs=float("inf")), "local_epochs must be a finite number > 0, got inf"),
    (dict(local_epochs="1"), "local_epochs must be a finite number > 0, got '1'"),
    (dict(server_lr=float("nan")), "server_lr must be a finite number > 0, got nan"),
    (dict(deadline_quantile=1.5), r"deadline_quantile must be a finite number > 0 and <= 1, got 1.5"),
    (dict(max_work_scale=float("inf")), "max_work_scale must be a finite number >= 1, got inf"),
    (dict(quantity_sigma=-1.0), "quantity_sigma must be a finite number >= 0, got -1.0"),
    (dict(speed_sigma=float("inf")), "speed_sigma must be a finite number >= 0"),
    (dict(client_timeout_s=0), r"client_timeout_s must be a finite number > 0 \(virtual seconds\) or None"),
    (dict(rounds=2.0), "rounds must be an integer >= 1, got 2.0"),
    (dict(seed=-1), r"seed must be between 0 and 2\*\*32 - 1 \(4294967295\), an integer, got -1"),
    (dict(eval_every=0), "eval_every must be an integer >= 1"),
    (dict(presence=0.0), r"presence must be a finite number > 0 and <= 1"),
    (dict(alpha=float("inf")), "alpha must be a finite number > 0"),
])
def test_config_numbers_are_checked(kw, match):
  with pytest.raises(ValueError, match=match):
    FedConfig(**kw)


# --------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_ends_in_one_line_saying_what_was_kept(tmp_path):
  out = tmp_path / "out"
  (out / "raw").mkdir(parents=True)
  write_json(out / "raw" / "workloads.json", {"device": "d", "repro_mode": "quick", "seed": 0})
  env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
  # -X faulthandler: should the Ctrl-C be lost again, SIGABRT shows where every thread was
  p = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "mtfl_jax", "reproduce", "--out", str(out)],
                       cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in p.stdout:  # wait until it is measuring the second experiment
      if "[cosched]" in line:
        break
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    try:
      _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
      p.send_signal(signal.SIGABRT)
      _, err = p.communicate(timeout=30)
      pytest.fail(f"the run went on 60 s after Ctrl-C; where it was:\n{err[-6000:]}")
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 130, err
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last == (f"interrupted: finished experiments kept in {out / 'raw'} (workloads); "
                  "rerun the same command to resume")


_SWALLOWED_CTRL_C = """
import gc, sys, time
from mtfl_jax.__main__ import _redeliver_swallowed_ctrl_c
if sys.argv[1] == "hook":
  sys.unraisablehook = _redeliver_swallowed_ctrl_c
fired = []
def ctrl_c_during_gc(phase, info):  # what a SIGINT landing in JAX's _xla_gc_callback does
  if not fired:
    fired.append(1)
    raise KeyboardInterrupt
gc.callbacks.append(ctrl_c_during_gc)
try:
  gc.collect()
  time.sleep(3)
  print("lost")
except KeyboardInterrupt:
  print("delivered")
"""


_LOST_INTERRUPT = """
import os, signal, sys, threading, time
from mtfl_jax.__main__ import _Interrupts
handler = _Interrupts() if sys.argv[1] == "watchdog" else signal.default_int_handler
signal.signal(signal.SIGINT, handler)
signal.signal(signal.SIGTERM, handler)
sig = signal.SIGTERM if sys.argv[2] == "term" else signal.SIGINT
cleanup_s = float(sys.argv[3])
cleaned = []
try:
  try:
    try:
      threading.Timer(0.2, os.kill, (os.getpid(), sig)).start()
      time.sleep(5)
    except KeyboardInterrupt:
      if cleanup_s == 0:
        pass  # swallowed: what C code that clears errors does to it
      else:
        raise
    finally:
      if cleanup_s:  # a clean-up that takes a while: the interrupt is on its way, not lost
        time.sleep(cleanup_s)
        cleaned.append(1)
    time.sleep(3)
    print("lost")
  except KeyboardInterrupt:
    print("delivered" + (" after the clean-up" if cleaned else ""))
finally:
  if isinstance(handler, _Interrupts):
    handler.stop()
"""


@pytest.mark.parametrize("handler, sig, cleanup_s, expected", [
    ("default", "int", 0, "lost"),  # the loss is real without the watchdog
    ("watchdog", "int", 0, "delivered"),
    ("watchdog", "term", 0, "delivered"),
    ("watchdog", "int", 1.5, "delivered after the clean-up"),  # a long finally is not interrupted again
])
def test_an_interrupt_swallowed_anywhere_is_raised_again(handler, sig, cleanup_s, expected):
  # CI lost a Ctrl-C of test_ctrl_c_ends_in_one_line_saying_what_was_kept a second time, not in
  # a gc callback: any place that swallows the KeyboardInterrupt loses it without the watchdog.
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  r = subprocess.run([sys.executable, "-c", _LOST_INTERRUPT, handler, sig, str(cleanup_s)], env=env,
                     capture_output=True, text=True, timeout=60)
  assert r.stdout.strip() == expected, (r.stdout, r.stderr)


@pytest.mark.parametrize("hook, expected", [("default", "lost"), ("hook", "delivered")])
def test_a_ctrl_c_swallowed_by_a_gc_callback_is_delivered_again(hook, expected):
  # CI once lost the Ctrl-C of the test above this way: the KeyboardInterrupt was raised inside
  # a gc callback, Python printed "Exception ignored" and the run went on. "default" shows the
  # loss is real without the hook.
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  r = subprocess.run([sys.executable, "-c", _SWALLOWED_CTRL_C, hook], env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.stdout.strip() == expected, r.stderr
