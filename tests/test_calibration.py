"""The calibration service: one place that fits, caches, saves and loads virtual-resource
models (keyed by device, backend and task mix), and reads the store's older layout."""
import json
from pathlib import Path

import pytest

from mtfl_jax import calibration as cal
from mtfl_jax.files import BadFileError
from mtfl_jax.tasks import get_task
from mtfl_jax.vresource import VRModel

REPO = Path(__file__).resolve().parents[1]
M = VRModel({"a": 0.01, "b": 0.02}, {"a": 0.5, "b": 1.5}, {"a": 0.8, "b": 0.6})


def test_model_json_round_trip_and_checks():
  assert VRModel.from_json(json.loads(json.dumps(M.to_json()))) == M
  assert VRModel.from_json({**M.to_json(), "backend": "threads"}) == M  # extra fields ignored
  with pytest.raises(ValueError, match="same tasks"):
    VRModel.from_json({**M.to_json(), "demand": {"a": 1.0}})


def test_store_is_keyed_by_backend_and_mix_and_keeps_other_fields(tmp_path):
  path = tmp_path / "vr_dev.json"
  other = VRModel({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.5})
  cal.save_model(M, ("a", "b"), "processes", path)
  cal.save_model(other, ("a", "b"), "threads", path)
  doc = json.loads(path.read_text())
  assert set(doc["mixes"]) == {"processes|a,b", "threads|a,b"}
  doc["corrections"] = {"a,b": {"factors": {}}}
  path.write_text(json.dumps(doc))
  assert cal.load_model(("a", "b"), "processes", path) == M
  assert cal.load_model(("a", "b"), "threads", path) == other
  assert cal.load_model(("b", "a"), "processes", path) is None  # the order is the jobs'
  cal.save_model(M, ("a",), "fused", path)
  assert json.loads(path.read_text())["corrections"] == {"a,b": {"factors": {}}}


def test_old_layout_loads_as_processes_or_its_backend_field(tmp_path):
  path = tmp_path / "vr_dev.json"
  path.write_text(json.dumps({"device": "d", "mixes": {"a,b": M.to_json(),
                                                       "a,c": {**M.to_json(), "backend": "threads"}}}))
  assert cal.load_model(("a", "b"), "processes", path) == M
  assert cal.load_model(("a", "b"), "threads", path) is None
  assert cal.load_model(("a", "c"), "threads", path) == M


def test_committed_store_still_loads():
  path = REPO / "data" / "profiles" / "vr_cpu_amd_epyc_2_cores.json"
  if not path.exists():
    pytest.skip("no committed store in this checkout")
  model = cal.load_model(("digits_mlp", "mnist_lenet"), "processes", path)
  assert set(model.solo_step_s) == {"digits_mlp", "mnist_lenet"} and model.capacity > 0


def test_bad_entry_names_the_store_and_the_mix(tmp_path):
  path = tmp_path / "vr_dev.json"
  path.write_text(json.dumps({"device": "d", "mixes": {"processes|a,b": {"solo_step_s": {"a": 1}}}}))
  with pytest.raises(BadFileError, match=f"calibration store {path}.*delete it to re-measure"):
    cal.load_model(("a", "b"), "processes", path)


def test_load_or_calibrate_measures_once_then_reads(tmp_path, monkeypatch):
  path = tmp_path / "vr_dev.json"
  calls = []
  monkeypatch.setattr(cal, "calibrate_mix", lambda tasks, backend: calls.append((tuple(tasks), backend)) or M)
  logs = []
  model, source = cal.load_or_calibrate(("a", "b"), "threads", path, log=logs.append)
  assert model == M and source.startswith("measured now") and calls == [(("a", "b"), "threads")]
  assert "one co-run on 'threads'" in logs[0]
  model, source = cal.load_or_calibrate(("a", "b"), "threads", path, log=logs.append)
  assert model == M and source == f"recorded in {path.name}" and len(calls) == 1


def test_calibrate_mix_is_cached_per_process_and_takes_task_objects(monkeypatch):
  seen = []
  monkeypatch.setattr(cal, "solo_step_times", lambda tasks: seen.append(tasks) or {t.name: 0.01 for t in tasks})
  monkeypatch.setattr(cal, "_MIX_MODELS", {})
  one = cal.calibrate_mix(["digits_mlp"], solo_work_s=0.5)
  assert one == VRModel({"digits_mlp": 0.01}, {"digits_mlp": 1.0}, {"digits_mlp": 1.0})
  assert cal.calibrate_mix([get_task("digits_mlp")], solo_work_s=0.5) is one and len(seen) == 1


def test_store_path_is_beside_the_profiles(monkeypatch, tmp_path):
  monkeypatch.setenv("MTFL_PROFILE_DIR", str(tmp_path))
  assert cal.store_path("cpu: X (2 cores)") == tmp_path / "vr_cpu_x_2_cores.json"
