"""Bad input and faults at the federated entry points end in one clear line, before any work.

``FedConfig`` refuses bad values and settings the run would ignore; ``run_federated`` refuses,
before anything is written, what can only be known once the data and clock are in hand; the
``federate`` command says the same in one ``error:`` line (in-process ``main([...])``; signals
in a subprocess). Every refusal leaves a workdir's files as they were.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtfl_jax import models
from mtfl_jax.__main__ import main
from mtfl_jax.clock import inputs_json
from mtfl_jax.data import Dataset
from mtfl_jax.federated import Callback, FedConfig, MetricsWriter, build_federation, run_federated
from mtfl_jax.files import BadFileError, OutputPathError, write_json
from mtfl_jax.tasks import Task
from mtfl_jax.vresource import VRModel

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
X = RNG.random((48, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 48)


def _tiny(name="fail_tiny", features=(8,), n=48, **kw):
  data = Dataset.from_arrays(f"{name}_data", X[:n], Y[:n], X[:12], Y[:12], **kw)
  return Task(name, models.MLP(features, 3), data, learning_rate=0.1, batch_size=8)


TINY, TINY2 = _tiny(), _tiny("fail_tiny2", (4,), n=32)
MODEL = VRModel({"fail_tiny": 1e-4, "fail_tiny2": 2e-4, "digits_mlp": 2e-4},
                {"fail_tiny": 1.0, "fail_tiny2": 1.0, "digits_mlp": 1.0}, {})
CFG = FedConfig(tasks=(TINY,), num_clients=4, clients_per_round=2, rounds=2, simulator="loop")


def cfg(**kw) -> FedConfig:
  return FedConfig(**{**{k: getattr(CFG, k) for k in ("num_clients", "clients_per_round", "rounds", "simulator")},
                      "tasks": (TINY,), **kw})


def _files(d: Path) -> dict:
  return {p: p.read_bytes() for p in Path(d).rglob("*") if p.is_file()}


def _cli(capsys, *argv) -> str:
  """``main(argv)``'s one-line error (exit code 2)."""
  assert main(list(argv)) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
  return err[len("error: "):]


def _seeded_workdir(path: Path) -> Path:
  """A workdir holding the clock of a run: ``federate`` then needs no calibration."""
  path.mkdir(parents=True, exist_ok=True)
  write_json(path / "clock.json", inputs_json(MODEL, None))
  return path


# --------------------------------------------------------------------------- FedConfig
@pytest.mark.parametrize("kw, expected", [
    (dict(tasks=5), "tasks must be task names and Task values (a tuple or list, or one name), e.g. "
                    "tasks=('digits_mlp', my_task); got int 5"),
    (dict(tasks=None), "tasks must be task names and Task values (a tuple or list, or one name), e.g. "
                       "tasks=('digits_mlp', my_task); got NoneType None"),
    (dict(server_kwargs=[1]), "server_kwargs must be a dict of the server optimizer's keyword arguments, e.g. "
                              "{'momentum': 0.9}; got [1]"),
    (dict(presence={"nope": 0.5}), "presence gives probabilities for ['nope'] but the tasks are ['fail_tiny']: give "
                                   "one per task, e.g. {'fail_tiny': 0.5}, or one number for all"),
    (dict(presence={"fail_tiny": 2}), "presence of task 'fail_tiny' must be a finite number > 0 and <= 1, got 2"),
    (dict(speed_sigma=1e6), "speed_sigma=1000000.0 is too large: a lognormal sigma must be <= 10 (10 already spreads "
                            "values over a factor of about 1e17)"),
    (dict(quantity_sigma=50.0, alpha=None), "quantity_sigma=50.0 is too large: a lognormal sigma must be <= 10 (10 "
                                            "already spreads values over a factor of about 1e17)"),
    (dict(eval_every_s=1e-9, time_budget_s=1e6), "eval_every_s=1e-09 puts 1e+15 evaluations on the grid up to "
                                                 "time_budget_s=1000000.0 (at most 100,000); give eval_every_s >= 10"),
    (dict(trace="Venn"), "trace 'Venn' is neither 'venn' nor an existing file: give trace='venn' (--trace venn) or "
                         "the path of a JSON fleet trace"),
    (dict(availability="Diurnal"), "availability 'Diurnal' is neither 'diurnal' nor an existing file: give "
                                   "availability='diurnal' (--availability diurnal) or the path of a JSON trace of "
                                   "online windows"),
    (dict(policy="fedbuff", buffer_size=3, concurrency=2),
     "buffer_size=3 is more than the clients that train at once, concurrency=2: a server step would wait for clients' "
     "second updates; give buffer_size <= 2, or a concurrency up to num_clients (4)"),
    (dict(policy="fedbuff", clients_per_round=4, concurrency=1),
     "buffer_size=2 (the default: half of clients_per_round) is more than the clients that train at once, "
     "concurrency=1: a server step would wait for clients' second updates; give buffer_size <= 1, or a concurrency "
     "up to num_clients (4)"),
])
def test_bad_config_values(kw, expected):
  with pytest.raises(ValueError) as e:
    cfg(**kw)
  assert str(e.value) == "bad federated config: " + expected


def test_scaffold_with_a_task_of_its_own_optimizer_is_refused_in_the_config():
  adam = Task("fail_adam", models.MLP((4,), 3), TINY.data, optimizer=optax.adam(1e-3), batch_size=8)
  with pytest.raises(ValueError, match=r"algorithm 'scaffold' needs tasks trained by \(momentum\) SGD.*task "
                                       r"'fail_adam' has an optimizer of its own: use algorithm 'fedavg' "
                                       r"\(--algorithm fedavg\) or give the task a learning_rate"):
    cfg(tasks=(adam,), algorithm="scaffold")


@pytest.mark.parametrize("kw, expected", [
    (dict(extend=False), "extend=False is used only by policy 'full', and the policy is 'none': leave it out, or set "
                         "policy (--policy full)"),
    (dict(policy="full", overselect=2.0), "overselect=2.0 is used only by policy 'overselect', and the policy is "
                                          "'full': leave it out, or set policy (--policy overselect)"),
    (dict(policy="intra", deadline_quantile=0.8), "deadline_quantile=0.8 is used only by policy 'deadline' and 'full', "
                                                  "and the policy is 'intra'"),
    (dict(buffer_size=2), "buffer_size=2 is used only by policy 'fedbuff', and the policy is 'none'"),
    (dict(policy="fedbuff", client_timeout_s=5.0), "client_timeout_s=5.0 applies to synchronous rounds, and policy "
                                                   "'fedbuff' has none: leave it out"),
    (dict(online_fraction=0.3), "online_fraction=0.3 is used only by availability='diurnal' (--availability diurnal), "
                                "and availability is None: leave it out"),
    (dict(trace="venn", speed_sigma=1.0), "speed_sigma=1.0 is the lognormal fleet's, and trace='venn' gives the "
                                          "devices' speeds: leave it out (or trace=None)"),
    (dict(partition="natural", presence=0.5), "presence=0.5 does not apply to partition='natural', where each client "
                                              "holds its own data: leave it out"),
])
def test_settings_the_run_would_ignore_are_refused(kw, expected):
  with pytest.raises(ValueError) as e:
    cfg(**kw)
  assert str(e.value).startswith("bad federated config: " + expected)


def test_the_same_settings_are_taken_where_they_apply():
  cfg(policy="full", extend=False, deadline_quantile=0.8, max_work_scale=3.0)
  cfg(policy="overselect", overselect=2.0)
  cfg(policy="fedbuff", buffer_size=2, concurrency=2, staleness_exponent=1.0, max_staleness=3)
  cfg(availability="diurnal", online_fraction=0.3, availability_period_s=3600.0)
  cfg(trace="venn", bandwidth_sigma=1.0)
  cfg(alpha=None, quantity_sigma=1.0)
  c = cfg(alpha=np.float32(0.5), seed=np.uint32(3), presence={"fail_tiny": np.float64(0.5)})  # numpy numbers
  assert c.to_json()["alpha"] == 0.5 and c.to_json()["seed"] == 3 and c.to_json()["presence"] == {"fail_tiny": 0.5}
  assert build_federation(c).tasks[0].shards  # numpy's float32 alpha splits as a float


def test_trace_files_are_read_when_the_config_is_made(tmp_path):
  av = tmp_path / "av.json"
  av.write_text(json.dumps([[[0, 100]], [[0, 50]]]))
  with pytest.raises(BadFileError, match=f"availability trace {av}: describes 2 clients, the federation has 4"):
    cfg(availability=str(av))
  fleet = tmp_path / "fleet.json"
  fleet.write_text('[{"speed": 1, "bandwidth_bps": 1e6}]')
  with pytest.raises(BadFileError, match=f"fleet trace {fleet}: describes 1 clients, the federation has 4"):
    cfg(trace=str(fleet))
  assert build_federation(cfg(trace="venn", num_clients=1000, clients_per_round=2,
                              tasks=("digits_mlp",), alpha=None)).fleet.num_clients == 1000  # devices reused


# --------------------------------------------------------------------------- build_federation
def test_natural_partition_with_a_huge_num_clients_is_refused_before_splitting():
  task = _tiny("fail_nat", client_ids=np.arange(48) % 3)
  t0 = time.perf_counter()
  with pytest.raises(ValueError) as e:
    build_federation(cfg(tasks=(task,), partition="natural", num_clients=10**9))
  assert str(e.value) == ("bad federated config: partition='natural': num_clients=1000000000 must be the number of "
                          "clients in your data, 3 (its client ids run 0..2; clients 3.. would hold no sample): use "
                          "num_clients (--clients) = 3")
  assert time.perf_counter() - t0 < 5
  assert [len(s) for s in build_federation(cfg(tasks=(task,), partition="natural", num_clients=3)).tasks[0].shards] \
      == [16, 16, 16]


def test_a_partition_that_cannot_be_drawn_names_the_task_and_the_flags():
  with pytest.raises(ValueError, match=r"^bad federated config: task 'fail_tiny' cannot be split over its 40 clients: "
                                       r"after 100 draws .*alpha=0.05.*\(--alpha, --clients\)$"):
    build_federation(cfg(num_clients=40, alpha=0.05))


# --------------------------------------------------------------------------- run_federated
@pytest.mark.parametrize("kw, expected", [
    (dict(server_optimizer="adam", server_kwargs={"b1": "x"}),
     "server_optimizer 'adam' with server_lr=1.0 and server_kwargs={'b1': 'x'} fails on a server step (TypeError: "),
    (dict(server_kwargs={"momentum": float("nan")}),
     "server_optimizer 'sgd' with server_lr=1.0 and server_kwargs={'momentum': nan} steps the model to NaN or inf on a "
     "unit update; lower server_lr (--server-lr) or fix server_kwargs"),
    (dict(server_lr=1e300), "server_optimizer 'sgd' with server_lr=1e+300 and server_kwargs={} steps the model to NaN"),
])
def test_a_server_optimizer_that_cannot_step_is_refused_before_the_run(tmp_path, kw, expected):
  with pytest.raises(ValueError) as e:
    run_federated(cfg(**kw), MODEL, workdir=tmp_path / "w", progress=False)
  assert str(e.value).startswith("bad federated config: " + expected)
  assert not _files(tmp_path)


def test_a_server_step_that_diverges_later_is_named_as_the_servers():
  from mtfl_jax.federated import NonFiniteUpdate
  late_nan = optax.chain(optax.sgd(1.0), optax.scale_by_schedule(lambda n: jnp.where(n >= 2, jnp.nan, 1.0)))
  with pytest.raises(NonFiniteUpdate, match=r"^task 'fail_tiny', round 3: the global model is not finite \(NaN/inf\): "
                                            r"the server optimizer's step diverged. Lower server_lr \(--server-lr\)"):
    run_federated(cfg(rounds=5), MODEL, progress=False, server_optimizer=late_nan)


@pytest.mark.parametrize("kw, expected", [
    (dict(rounds=10**9, time_budget_s=1e-6), r"round 0 would end at virtual second [\d.]+, past time_budget_s=1e-06; "
                                             r"give time_budget_s >= [\d.]+ \(--time-budget\) for it to run"),
    (dict(policy="fedbuff", rounds=10**9, time_budget_s=1e-6),
     r"time_budget_s=1e-06 ends before FedBuff's first server step \(at virtual second [\d.]+, once buffer_size "
     r"updates of a task have arrived\); give a larger time_budget_s \(--time-budget\)"),
    (dict(policy="fedbuff", dropout=0.999999), r"the last 10,000 client updates were all lost before they arrived "
                                               r"\(dropout=0.999999\), so no server step can come; lower the dropout "
                                               r"\(--dropout\) or give clients longer online windows"),
    (dict(eval_every_s=1e-9), r"eval_every_s=1e-09 would put [\d,]+ evaluations on the grid by virtual second [\d.]+, "
                              r"where round 0 ends \(at most 100,000\); give eval_every_s >= [\d.e-]+, or "
                              r"eval_every \(rounds\) instead"),
])
def test_a_run_that_could_not_run_a_round_is_refused_before_anything_is_written(tmp_path, kw, expected):
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match="^bad federated config: " + expected + "$"):
    run_federated(cfg(**kw), MODEL, workdir=tmp_path / "w", progress=False)
  assert not _files(tmp_path) and time.perf_counter() - t0 < 30


@pytest.mark.parametrize("policy", ["none", "fedbuff"])
def test_a_federation_where_no_client_is_ever_online_is_refused(tmp_path, policy):
  av = tmp_path / "av.json"
  av.write_text(json.dumps([[], [], [], []]))
  with pytest.raises(ValueError, match=rf"^bad federated config: no client is online at virtual second 0 or later "
                                       rf"\(availability='{av}'\), so .*; check the availability trace$"):
    run_federated(cfg(availability=str(av), policy=policy), MODEL, workdir=tmp_path / "w", progress=False)
  assert not (tmp_path / "w").exists() or not _files(tmp_path / "w")


def test_grid_points_between_two_rounds_are_evaluated_once(monkeypatch):
  from mtfl_jax.federated import callbacks
  calls = []
  real = callbacks.evaluate_tasks
  monkeypatch.setattr(callbacks, "evaluate_tasks", lambda run, state: calls.append(1) or real(run, state))
  res = run_federated(cfg(eval_every_s=1e-5, eval_every=10**6, rounds=2), MODEL, progress=False)
  assert len(res.evaluations) > 50 and len(calls) <= 2 + 1  # one per round (and the last one's row)


@pytest.mark.parametrize("kw, expected", [
    (dict(seeds=[]), "seeds must be distinct integers between 0 and 2**32 - 1 (at least one), got []; e.g. "
                     "seeds=range(5)"),
    (dict(seeds=[1, 1]), "seeds must be distinct integers between 0 and 2**32 - 1 (at least one), got [1, 1]"),
    (dict(seeds=[-1]), "seeds must be distinct integers between 0 and 2**32 - 1 (at least one), got [-1]"),
    (dict(seeds=[0], workers=0), "workers must be an integer >= 1 (processes) or None (one per free core), got 0"),
])
def test_bad_seed_sweeps_are_refused_before_any_run(tmp_path, kw, expected):
  from mtfl_jax.federated.sweep import run_seeds
  with pytest.raises(ValueError) as e:
    run_seeds(CFG, workdir=tmp_path, model=MODEL, log=lambda m: None, **kw)
  assert str(e.value).startswith("run_seeds: " + expected) and not _files(tmp_path)


class _Kill(Callback):
  """Ctrl-C after ``n`` rounds, before the n-th round is checkpointed (as a kill mid-round)."""

  def __init__(self, n):
    self.n = n

  def after_round(self, run, row):
    if len(run.history) >= self.n:
      raise KeyboardInterrupt


@pytest.mark.parametrize("kw", [dict(policy="fedbuff", buffer_size=2, concurrency=3, clients_per_round=3),
                                dict(algorithm="scaffold", prox_mu=0.1)])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, kw):
  # two tasks: FedBuff's schedule interleaves their server steps (and keeps the versions that
  # updates still training started from); SCAFFOLD keeps every client's control variate
  c = cfg(tasks=(TINY, TINY2), rounds=4, **kw)
  ref = run_federated(c, MODEL, progress=False)
  with pytest.raises(KeyboardInterrupt):
    run_federated(c, MODEL, workdir=tmp_path, progress=False, callbacks=[_Kill(3)])
  assert not list((tmp_path / "checkpoints").glob("*tmp*"))
  res = run_federated(c, MODEL, workdir=tmp_path, progress=False)
  assert res.history == ref.history and len(ref.history) == (8 if c.policy == "fedbuff" else 4)
  jax.tree.map(np.testing.assert_array_equal, res.state.models, ref.state.models)


def test_extending_a_multi_task_fedbuff_run_whose_task_stopped_early_is_refused(tmp_path):
  c = cfg(tasks=(TINY, TINY2), rounds=6, policy="fedbuff", buffer_size=2, concurrency=3, clients_per_round=3,
          presence={"fail_tiny": 1.0, "fail_tiny2": 0.5})  # fail_tiny's server steps come faster
  run_federated(dataclasses.replace(c, rounds=3), MODEL, workdir=tmp_path, progress=False)
  before = _files(tmp_path)
  with pytest.raises(ValueError, match=r"^this FedBuff run cannot go on to rounds=6: its task 'fail_tiny' had finished "
                                       r"its 3 server steps while the other tasks went on, .*; rerun it with rounds=3, "
                                       r"or use another workdir for a longer run \(nothing was changed\)$"):
    run_federated(c, MODEL, workdir=tmp_path, progress=False)
  assert _files(tmp_path) == before


def test_a_changed_model_under_the_same_name_is_refused_before_anything_is_written(tmp_path):
  run_federated(CFG, MODEL, workdir=tmp_path, progress=False)
  before = _files(tmp_path)
  wider = cfg(tasks=(_tiny(features=(16,)),), rounds=3)
  with pytest.raises(ValueError) as e:
    run_federated(wider, MODEL, workdir=tmp_path, progress=False)
  assert str(e.value) == (f"{tmp_path} holds checkpoints of another model for task 'fail_tiny' (['Dense_0']['bias']: "
                          "(8,) in the checkpoint, (16,) now): the task's model changed under the same name; use "
                          "another workdir (nothing there was changed)")
  assert _files(tmp_path) == before


def test_a_metrics_log_dir_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
  f = tmp_path / "afile"
  f.write_text("x")
  with pytest.raises(OutputPathError, match=f"cannot write MetricsWriter log_dir {f}: it is a file, not a directory"):
    run_federated(CFG, MODEL, workdir=tmp_path / "w", progress=False, callbacks=[MetricsWriter(f)])
  assert _files(tmp_path) == {f: b"x"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root is never denied by file modes")
def test_a_read_only_workdir_is_refused_before_any_work(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  with pytest.raises(OutputPathError, match=f"cannot write workdir {ro}"):
    run_federated(CFG, MODEL, workdir=ro, progress=False)


# --------------------------------------------------------------------------- the federate command
@pytest.mark.parametrize("source, expected", [
    ("def f(:\n", r"--import fail_mod: importing module 'fail_mod' failed with SyntaxError: .* \(at .*fail_mod.py:1\); "
                  r"fix the module"),
    ("x = undefined_name\n", r"--import fail_mod: importing module 'fail_mod' failed with NameError: name "
                             r"'undefined_name' is not defined \(at .*fail_mod.py:1\); fix the module"),
    ("raise RuntimeError('no GPU here')\n", r"--import fail_mod: importing module 'fail_mod' failed with RuntimeError: "
                                            r"no GPU here \(at .*fail_mod.py:1\); fix the module"),
    ("import fail_not_installed\n", r"--import fail_mod: module 'fail_mod' imports 'fail_not_installed', which cannot "
                                    r"be imported \(No module named 'fail_not_installed'\); install it or fix the module"),
])
def test_a_broken_import_module_is_one_line_naming_where(tmp_path, monkeypatch, capsys, source, expected):
  (tmp_path / "fail_mod.py").write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  import re
  err = _cli(capsys, "federate", "--workdir", str(tmp_path / "w"), "--import", "fail_mod")
  assert re.fullmatch(expected, err), err
  sys.modules.pop("fail_mod", None)


@pytest.mark.parametrize("flags, expected", [
    (["--import", "fail_missing_mod"], "--import fail_missing_mod: cannot import module 'fail_missing_mod' (No module "
                                       "named 'fail_missing_mod'); check the module name and that its folder is on "
                                       "PYTHONPATH (or run from that folder)"),
    (["--tasks", "json:dumps"], "--tasks json:dumps: json.dumps is function, not a mtfl_jax Task"),
    (["--tasks", "json:nope"], "--tasks json:nope: json.nope is missing, not a mtfl_jax Task"),
    (["--tasks", ":x"], "--tasks :x: give a task of your own as module:attribute, e.g. mytasks:my_task (the module's "
                        "Task value my_task)"),
    (["--seeds", "4-2"], "--seeds: '4-2' is not a seed or a range like 0-4 (give e.g. --seeds 0-4 or --seeds 1,3,7)"),
    (["--seeds", "0-100000"], "--seeds names 100001 seeds; at most 1000 in one sweep"),
    (["--seeds", "1,1"], "--seeds must name distinct seeds between 0 and 2**32 - 1, got '1,1'"),
    (["--seeds", "0-1", "--processes", "2"], "--seeds runs each seed in a process of its own; leave out "
                                             "--processes/--process-id"),
    (["--seeds", "0-1", "--seed", "3"], "--seed and --seeds: give one of them"),
    (["--seeds", "0-1", "--devices", "2"], "--seeds runs each seed in a process of its own, on one core and one "
                                           "device: leave out --devices"),
    (["--seeds", "0-1", "--log-dir", "L"], "--log-dir streams the metrics of one run; with --seeds leave it out (each "
                                           "seed's run is kept in WORKDIR/seed<k>/ and summary.json sums them up)"),
    (["--trace", "nope.json"], "bad federated config: trace 'nope.json' is neither 'venn' nor an existing file: give "
                               "trace='venn' (--trace venn) or the path of a JSON fleet trace"),
    (["--clients", "100000"], "bad federated config: num_clients=100000 but the tasks hold 1438 training samples in "
                              "all (digits_mlp: 1438); every client needs a sample: use num_clients (--clients) <= "
                              "1438"),
    (["--server-optimizer", "adam", "--server-lr", "1e300"],
     "bad federated config: server_optimizer 'adam' with server_lr=1e+300 and server_kwargs={} steps the model to NaN "
     "or inf on a unit update; lower server_lr (--server-lr) or fix server_kwargs"),
])
def test_federate_mistakes_are_one_line_before_any_work(tmp_path, capsys, flags, expected):
  w = tmp_path / "w"
  t0 = time.perf_counter()
  assert _cli(capsys, "federate", "--workdir", str(w), *flags) == expected
  assert time.perf_counter() - t0 < 20 and not _files(tmp_path)  # no calibration, nothing written


@pytest.mark.parametrize("doc, flags, expected", [
    ({"tasks": 5}, [], "bad federated config: tasks must be task names and Task values (a tuple or list, or one "
                       "name), e.g. tasks=('digits_mlp', my_task); got int 5"),
    ({"task_defs": []}, [], "unknown settings ['task_defs']; valid: tasks, num_clients, "),
    ({"partition": "natural"}, ["--alpha", "0.3"], "--alpha 0.3 does not apply to partition 'natural', where each "
                                                   "client holds its own data: leave --alpha out"),
    ({"policy": "fedbuff", "buffer_size": 50}, [], "bad federated config: buffer_size=50 is more than the clients that "
                                                   "train at once, concurrency=10 (the default: clients_per_round)"),
])
def test_config_file_mistakes_are_one_line(tmp_path, capsys, doc, flags, expected):
  f = tmp_path / "cfg.json"
  f.write_text(json.dumps(doc))
  assert expected in _cli(capsys, "federate", "--workdir", str(tmp_path / "w"), "--config", str(f), *flags)


def test_a_log_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
  f = tmp_path / "afile"
  f.write_text("x")
  assert _cli(capsys, "federate", "--workdir", str(tmp_path / "w"), "--log-dir", str(f)) == (
      f"cannot write --log-dir {f}: it is a file, not a directory; choose another path (nothing was run)")


# --------------------------------------------------------------------------- signals
def _env(**extra):
  return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}


def _children(pid: int) -> list[int]:
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


def _sigterm_when(p: subprocess.Popen, ready, timeout: float = 120) -> tuple[list, str]:
  kids = []
  try:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None and not ready():
      time.sleep(0.2)
    assert p.poll() is None and ready(), p.communicate()[1][-3000:]
    kids = [k for k in _children(p.pid) for k in [k, *_children(k)]]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
  finally:
    for pid in [*kids, p.pid]:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    p.wait()
  return kids, err


def _steps(ckpt: Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit()) if ckpt.is_dir() else []


def test_an_interrupt_during_a_checkpoint_save_waits_for_the_save_then_acts_as_it_would_have():
  from mtfl_jax.federated.callbacks import _interrupts_after
  before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
  seen = []
  signal.signal(signal.SIGTERM, lambda signum, frame: seen.append((signum, list(finished))))
  try:
    finished = []
    with _interrupts_after():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)  # delivered here, and held
      finished.append(True)
    assert seen == [(signal.SIGTERM, [True])]  # its handler ran once, after the block
    finished.clear()
    with pytest.raises(KeyboardInterrupt):
      with _interrupts_after():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        finished.append(True)
    assert finished == [True] and signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
  finally:
    signal.signal(signal.SIGTERM, before[signal.SIGTERM])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the child processes in /proc")
def test_sigterm_mid_run_keeps_finished_rounds_a_rerun_resumes_and_bad_reruns_change_nothing(tmp_path, capsys):
  w, tmp = _seeded_workdir(tmp_path / "w"), tmp_path / "tmp"
  tmp.mkdir()
  run = ["federate", "--workdir", str(w), "--tasks", "digits_mlp", "--clients", "2", "--simulator", "loop"]
  p = subprocess.Popen([sys.executable, "-m", "mtfl_jax", *run, "--rounds", "10000"], cwd=REPO,
                       env=_env(TMPDIR=str(tmp)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _, err = _sigterm_when(p, lambda: len(_steps(w / "checkpoints")) >= 1 and _steps(w / "checkpoints")[-1] >= 3)
  assert p.returncode == 143, err[-3000:]
  assert "Traceback" not in err and err.strip().splitlines()[-1] == (
      f"interrupted: the checkpoints of finished rounds are kept in {w / 'checkpoints'}; rerun the same command to "
      "resume")
  assert not list(w.rglob("*tmp*")) and not list(tmp.iterdir())  # no unfinished save, no temporary files
  done = _steps(w / "checkpoints")[-1]
  assert main([*run, "--rounds", str(done + 1)]) == 0  # the same command (one more round, to be quick)
  out = capsys.readouterr().out
  assert f"resuming {w} after round {done} of {done + 1}" in out
  assert len(json.loads((w / "history.json").read_text())["history"]) == done + 1
  # reruns refused: fewer rounds than done, a damaged clock; the workdir's files stay as they are
  before = _files(w)
  assert _cli(capsys, *run, "--rounds", "1") == (
      f"{w} holds a run of {done + 1} finished round(s) but rounds=1 (--rounds 1); give rounds >= {done + 1} to resume "
      "it, or use another workdir (nothing there was changed)")
  clock = w / "clock.json"
  for damaged, why in (('{"vr_model": {', "is not valid JSON"), ('{"vr_model": 5}', "not the layout this version")):
    clock.write_text(damaged)
    err = _cli(capsys, *run, "--rounds", str(done + 2))
    assert err.startswith(f"the run's clock {clock}") and why in err
    assert err.endswith("; delete it (and checkpoints/) to start over, or use another workdir")
    assert _files(w) == {**before, clock: damaged.encode()}


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or len(os.sched_getaffinity(0)) < 2,
                    reason="finds the child processes in /proc; a sweep runs seeds in parallel on 2 cores")
def test_sigterm_stops_a_seed_sweep_and_its_worker_processes(tmp_path):
  w = tmp_path / "w"
  for s in (0, 1):
    _seeded_workdir(w / f"seed{s}")
  p = subprocess.Popen([sys.executable, "-m", "mtfl_jax", "federate", "--workdir", str(w), "--tasks", "digits_mlp",
                        "--clients", "2", "--simulator", "loop", "--rounds", "10000", "--seeds", "0-1"], cwd=REPO,
                       env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  t0 = [None]

  def running():  # both seeds' runs have started
    if all((w / f"seed{s}" / "config.json").exists() for s in (0, 1)):
      t0[0] = t0[0] or time.monotonic()
      return True
    return False
  kids, err = _sigterm_when(p, running, timeout=180)
  assert p.returncode == 143, err[-3000:]
  assert err.strip().splitlines()[-1] == (f"interrupted: the checkpoints of finished rounds are kept in "
                                          f"{w / 'seed<k>' / 'checkpoints'}; rerun the same command to resume")
  assert time.monotonic() - t0[0] < 30  # the workers were stopped, not awaited
  time.sleep(0.5)
  assert len(kids) >= 2 and not [k for k in kids if _alive(k)]
