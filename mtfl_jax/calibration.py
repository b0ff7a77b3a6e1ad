"""Calibration: fitting, caching and storing the virtual-resource model of a task mix.

Every :class:`~mtfl_jax.vresource.VRModel` the package uses is fitted here, from one
equal-share co-run of the mix (:func:`calibrate`), and kept:

* per process (:func:`calibrate_mix`, keyed by the tasks, backend and solo work);
* per machine in a store, ``data/profiles/vr_<device>.json`` (:func:`store_path`), holding
  ``{"device", "mixes": {"<backend>|<task>,<task>": model}}`` (:func:`load_or_calibrate`), and
  measured co-runs of the clients' most frequent workload mixes under equal and competitive
  shares, which correct the virtual clock where they exist (:func:`load_or_measure_corrections`,
  ``{"corrections": {"<task>,<task>": MixCorrections}}``).
  A store written before backends were part of the key (``"<task>,<task>"``) still loads: its
  mixes count as measured on their ``"backend"`` field, else on ``processes``.

Tasks are registered names or :class:`~mtfl_jax.tasks.Task` objects; the store knows them by
name, so a task of your own should have a name of its own.

Example::

    model, source = load_or_calibrate(["digits_mlp", "mnist_lenet"])   # stored, or measured now
    with open_backend("threads", jobs) as runner:
      model = calibrate(runner, warmup=True)
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mtfl_jax.backends import Job, Runner, open_backend
from mtfl_jax.clock import SHARE_RULES, MixCorrections, mix_key
from mtfl_jax.device import device_name
from mtfl_jax.profiling import default_profile_path
from mtfl_jax.files import BadFileError, read_json, reading, write_json
from mtfl_jax.tasks import Task, get_task
from mtfl_jax.vresource import VRModel

_REMEDY = "delete it to re-measure (one co-run per task mix)"


def calibrate(runner: Runner, warmup: bool = False) -> VRModel:
  """Fits the virtual-resource model of a runner's task mix from one equal-share co-run
  (after an untimed one with ``warmup``: first runs fill dispatch caches)."""
  if warmup:
    runner.run(None)
  return VRModel.fit(runner.solo_step_s, runner.run(None))


def solo_step_times(tasks: Sequence[str | Task]) -> dict[str, float]:
  """Solo (pipelined) seconds per step of ``tasks``, measured with the sequential backend."""
  with open_backend("sequential", [Job(t, 8) for t in tasks]) as r:
    return dict(r.solo_step_s)


_MIX_MODELS: dict[tuple, VRModel] = {}


def calibrate_mix(tasks: Sequence[str | Task], backend: str = "processes", solo_work_s: float = 1.0) -> VRModel:
  """The model of a task mix from one equal-share co-run on ``backend``, each task with about
  ``solo_work_s`` of solo work; fitted once per process (a single task is its own model)."""
  tasks = tuple(get_task(t) for t in tasks)
  key = (tasks, backend, float(solo_work_s))
  if key not in _MIX_MODELS:
    solo = solo_step_times(tasks)
    if len(tasks) == 1:
      name = tasks[0].name
      _MIX_MODELS[key] = VRModel(solo, {name: 1.0}, {name: 1.0})
    else:
      jobs = [Job(t, max(2, int(solo_work_s / solo[t.name])), seed=i) for i, t in enumerate(tasks)]
      with open_backend(backend, jobs) as r:
        _MIX_MODELS[key] = calibrate(r, warmup=True)
  return _MIX_MODELS[key]


# --------------------------------------------------------------------------- the store
def store_path(device: str | None = None) -> Path:
  """This device's calibration store, ``vr_<device>.json`` beside its solo profiles."""
  p = default_profile_path(device)
  return p.with_name("vr_" + p.name)


def store_key(tasks: Sequence[str | Task], backend: str = "processes") -> str:
  """``"<backend>|<task>,<task>"``: a mix's key in the store (order matters: it is the jobs')."""
  return f"{backend}|" + ",".join(t.name if isinstance(t, Task) else str(t) for t in tasks)


def read_store(path: str | Path | None = None) -> dict:
  """The store at ``path`` (default: this device's), mixes keyed by :func:`store_key`; an
  empty one when there is no file. Other top-level fields are kept as they are."""
  path = Path(path or store_path())
  if not path.exists():
    return {"device": device_name(), "mixes": {}}
  doc = read_json(path, "calibration store", _REMEDY, fields=("mixes",))
  with reading(f"calibration store {path}", _REMEDY):
    # keys without a backend come from stores written before backends were part of the key
    doc["mixes"] = {k if "|" in k else f"{m.get('backend', 'processes')}|{k}": m for k, m in doc["mixes"].items()}
  return doc


def write_store(store: dict, path: str | Path | None = None) -> Path:
  return write_json(Path(path or store_path()), store)


def load_model(tasks: Sequence[str | Task], backend: str = "processes",
               path: str | Path | None = None) -> VRModel | None:
  """The stored model of the mix, or None when the store has none."""
  path = Path(path or store_path())
  entry = read_store(path)["mixes"].get(store_key(tasks, backend))
  if entry is None:
    return None
  with reading(f"calibration store {path}", _REMEDY):
    try:
      return VRModel.from_json(entry)
    except ValueError as e:
      raise BadFileError(f"calibration store {path}, mix {store_key(tasks, backend)!r}: {e}; {_REMEDY}") from None


def save_model(model: VRModel, tasks: Sequence[str | Task], backend: str = "processes",
               path: str | Path | None = None) -> Path:
  """Adds (or replaces) the mix's model in the store, keeping every other entry."""
  path = Path(path or store_path())
  store = read_store(path)
  store["mixes"][store_key(tasks, backend)] = model.to_json()
  return write_store(store, path)


def load_layout(key: str, path: str | Path | None = None) -> dict | None:
  """The client layout chosen for ``key`` (a task on this device, see
  :func:`mtfl_jax.federated.executors.choose_layout`) as stored, or None."""
  return read_store(path).get("layouts", {}).get(key)


def save_layout(key: str, choice: dict, path: str | Path | None = None) -> Path:
  """Keeps a measured layout choice in the store (every other entry kept)."""
  store = read_store(path)
  store.setdefault("layouts", {})[key] = choice
  return write_store(store, path)


def load_or_calibrate(tasks: Sequence[str | Task], backend: str = "processes", path: str | Path | None = None,
                      log=print) -> tuple[VRModel, str]:
  """The mix's model from the store at ``path`` (default: this device's), else measured now
  on ``backend`` (:func:`calibrate_mix`) and added to the store. Returns the model and where
  it came from."""
  path = Path(path or store_path())
  model = load_model(tasks, backend, path)
  if model is not None:
    return model, f"recorded in {path.name}"
  key = store_key(tasks, backend)
  log(f"  calibrating the virtual-resource model of {key.split('|', 1)[1]} (one co-run on '{backend}')")
  model = calibrate_mix(tasks, backend)
  save_model(model, tasks, backend, path)
  return model, f"measured now, stored in {path.name}"


# --------------------------------------------------------------------------- measured corrections
def representative_mixes(workload_vectors, solo_step_s: Mapping[str, float], total_s: float = 0.6,
                         max_mixes: int = 4) -> dict[str, dict[str, int]]:
  """The ``max_mixes`` most frequent buckets (:func:`mix_key`) of multi-task clients among
  ``workload_vectors``, each as the bucket's mean solo-work fractions scaled to ``total_s``
  seconds of solo work (at least 2 steps per task present)."""
  groups: dict = {}
  for wl in workload_vectors:
    if sum(1 for w in wl.values() if w > 0) < 2:
      continue  # a single task has nothing to share the device with
    work = {t: w * solo_step_s[t] for t, w in wl.items()}
    total = sum(work.values())
    groups.setdefault(mix_key(wl, solo_step_s), []).append({t: v / total for t, v in work.items()})
  top = sorted(groups, key=lambda k: (-len(groups[k]), k))[:max_mixes]
  out = {}
  for k in top:
    frac = {t: float(np.mean([g[t] for g in groups[k]])) for t in groups[k][0]}
    out[k] = {t: (max(2, int(round(f * total_s / solo_step_s[t]))) if f > 0 else 0) for t, f in frac.items()}
  return out


def measure_corrections(model: VRModel, mixes: Mapping[str, Mapping[str, int]], backend: str = "threads",
                        repeats: int = 3, log=print) -> MixCorrections:
  """Runs each mix on ``backend`` under equal and competitive shares (after one warm-up run;
  ``repeats`` interleaved runs of each, their median kept: single runs of a short co-run
  differed by up to 1.8x on a loaded 2-core CPU) and compares the measured makespans with the
  model's prediction for the same workloads."""
  from mtfl_jax.backends import Job, open_backend
  factors, detail = {}, {}
  for key, wl in mixes.items():
    wl = {t: int(w) for t, w in wl.items() if w > 0}
    jobs = [Job(t, w, seed=i) for i, (t, w) in enumerate(sorted(wl.items()))]
    alloc = {k: rule(model, wl) for k, rule in SHARE_RULES.items()}
    with open_backend(backend, jobs) as r:
      r.run(alloc["equal"])  # warm-up: first calls fill dispatch caches
      runs = {k: [] for k in alloc}
      for _ in range(repeats):  # interleaved, so that drift hits both policies alike
        for k, a in alloc.items():
          runs[k].append(r.run(a).makespan_s)
      meas = {k: float(np.median(v)) for k, v in runs.items()}
      solo_meas = sum(w * r.solo_step_s[t] for t, w in wl.items())
    pred = {k: model.predict(wl, a).makespan_s for k, a in alloc.items()}
    solo_pred = sum(w * model.solo_step_s[t] for t, w in wl.items())
    # Compared relative to each side's own sequential time: the correction is the sharing
    # efficiency the model got wrong, not a drift of the solo step times since calibration.
    factors[key] = {k: round((meas[k] / solo_meas) / (pred[k] / solo_pred), 4) for k in alloc}
    detail[key] = {"workloads": wl, "measured_makespan_s": {k: round(v, 4) for k, v in meas.items()},
                   "measured_runs_s": {k: [round(x, 4) for x in v] for k, v in runs.items()},
                   "predicted_makespan_s": {k: round(v, 4) for k, v in pred.items()},
                   "sequential_s": {"measured": round(solo_meas, 4), "predicted": round(solo_pred, 4)},
                   "model_error": {k: round(1 / factors[key][k] - 1, 4) for k in alloc},
                   "competitive_vs_equal_measured": round(meas["equal"] / meas["competitive"], 4),
                   "competitive_vs_equal_predicted": round(pred["equal"] / pred["competitive"], 4)}
    log(f"    mix {key}: measured equal/competitive {meas['equal']:.3f}/{meas['competitive']:.3f}s, "
        f"model {pred['equal']:.3f}/{pred['competitive']:.3f}s")
  return MixCorrections(factors, backend, detail)


def load_or_measure_corrections(tasks: Sequence[str], model: VRModel, workload_vectors, path: str | Path | None = None,
                                max_mixes: int = 3, log=print) -> tuple[MixCorrections, str]:
  """Measured corrections for the ``max_mixes`` most frequent client mixes among
  ``workload_vectors`` (:func:`representative_mixes`), from the store where
  recorded, else measured now on ``threads`` and added to it."""
  path = Path(path or store_path())
  key = ",".join(tasks)
  store = read_store(path)
  known = store.setdefault("corrections", {}).get(key, {"factors": {}, "backend": "threads", "detail": {}})
  mixes = representative_mixes(workload_vectors, model.solo_step_s, max_mixes=max_mixes)
  todo = {k: v for k, v in mixes.items() if k not in known["factors"]}
  if todo:
    log(f"  measuring {len(todo)} client mix(es) of {key} under equal and competitive shares on 'threads'")
    new = measure_corrections(model, todo, "threads", log=log)
    known["factors"].update(new.factors)
    known["detail"].update(new.detail)
    store["corrections"][key] = known
    write_store(store, path)
  where = f"measured now, stored in {path.name}" if todo else f"recorded in {path.name}"
  return MixCorrections({k: known["factors"][k] for k in mixes},
                        known.get("backend", "threads"), {k: known["detail"][k] for k in mixes}), where
