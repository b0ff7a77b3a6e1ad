"""The scale benchmark on a tiny point: 8 digits_mlp clients, one steady round, 1 and 2 devices,
each in its own process; the JSON's fields and the aggregate against the single-device reference."""
import json

import pytest

from mtfl_jax.calibration import load_layout
from mtfl_jax.device import device_name
from mtfl_jax.experiments.bench_scale import _modes, bench_scale, scale_federation
from mtfl_jax.federated.executors import best_batched


def test_scale_benchmark_tiny_point(tmp_path):
  path = tmp_path / "scale.json"
  lines = []
  out = bench_scale(configs=[(1, 1), (2, 1)], work=[("digits_mlp", 8)], rounds=1, repeats=1, json_path=path,
                    log=lines.append)
  assert json.loads(path.read_text())["points"] == json.loads(json.dumps(out["points"]))
  assert {(p["devices"], p["processes"], p["executor_kind"]) for p in out["points"]} == {
      (1, 1, "loop"), (1, 1, "batched"), (2, 1, "batched")}  # the loop at the same task and clients
  for p in out["points"]:
    assert "error" not in p, p
    for key in ("devices", "processes", "clients", "task", "client_updates_per_s", "first_round_s",
                "compiles_after_first_round", "peak_rss_mb", "max_abs_diff", "rel_diff", "executor", "mfu"):
      assert p[key] is not None, key
    assert p["task"] == "digits_mlp" and p["clients"] == 8 and p["rounds_steady"] == 1
    assert p["client_updates_per_s"] > 0 and p["first_round_s"] > 0 and p["peak_rss_mb"] > 50
    # XLA's own count: the first round compiles the chunk's programs (zeros, init, step, final,
    # reduce, the clients' keys), later rounds nothing
    assert p["compiles_after_first_round"] == 0 and p["compiles_first_round"] >= 5
    assert p["max_abs_diff"] < 1e-5 and p["rel_diff"] < 1e-5  # against the loop executor
    # MFU recomputed from the point's own numbers: step FLOPs x steps per round / round seconds / peak
    assert p["mfu"] == pytest.approx(p["flops_per_step"] * p["local_steps"] / p["round_s"] / out["peak_flops"],
                                     rel=1e-3)
  assert out["targets"]["aggregate_equal"]["met"] and out["targets"]["no_recompiles"]["met"]
  # the batched layout: chosen once by measurement before the points, kept in the (test's own)
  # calibration store, and run by every batched point of that task and client count
  lay = out["layouts"]["digits_mlp/8"]
  assert lay["source"] in ("measured", "stored") and lay["key"] == "digits_mlp|" + device_name() + "|clients=8"
  assert set(lay["choice"]["seconds"]) == {"loop", "vmap/8", "map/8"}
  assert load_layout(lay["key"]) == lay["choice"]
  assert {p["inner"] for p in out["points"] if p["executor_kind"] == "batched"} == {lay["inner"]}
  table = "\n".join(lines)
  assert "updates/s" in table and "\ndigits_mlp         8    2    1" in table


def test_quick_mode_covers_the_issue_minimum():
  m = _modes(True, cores=2)
  assert {(1, 1), (2, 1), (2, 2)} <= set(m["configs"])
  assert {("digits_mlp", 100), ("digits_mlp", 1000), ("mnist_lenet", 100)} <= set(m["work"])
  assert m["repeats"] >= 2  # interleaved repeats


@pytest.mark.parametrize("clients", [100, 1000])
def test_every_client_holds_data(clients):
  from mtfl_jax.federated import FedConfig, build_federation
  from mtfl_jax.tasks import get_task
  ds, shards, rep = scale_federation(get_task("digits_mlp"), clients)
  assert len(shards) == clients and min(len(s) for s in shards) >= 1
  assert rep == (1 if clients == 100 else 10) and len(ds.y_train) == rep * 1438
  if clients == 100:  # the real federation's shards
    fed = build_federation(FedConfig(tasks=("digits_mlp",), num_clients=100, clients_per_round=100, alpha=0.5))
    assert all((a == b).all() for a, b in zip(shards, fed.tasks[0].shards))


def test_best_batched_is_the_runner_up_when_the_loop_won():
  won = {"inner": "map_patch", "per_device": 5, "seconds": {"loop": 0.4, "map_patch/5": 0.2, "vmap_patch/2": 0.3}}
  assert best_batched(won) == ("map_patch", 5)
  lost = {"inner": "loop", "per_device": None, "seconds": {"loop": 0.1, "vmap/16": 0.3, "map/16": 0.2}}
  assert best_batched(lost) == ("map", 16)
  assert best_batched({"inner": "loop", "per_device": None, "seconds": {"loop": 0.1}}) == (None, None)  # the default
