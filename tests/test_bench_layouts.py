"""The client-layout benchmark on a tiny point: every layout's aggregate equals the loop's, and
the JSON holds what the table and the docs read."""
import math

from mtfl_jax.experiments.bench_layouts import bench_layouts, table


def test_tiny_point_runs_and_agrees():
  out = bench_layouts(points=[("digits_mlp", 5, ("loop", "loop_dev", "vmap/2", "map/5"))], steps=2, repeats=1,
                      log=lambda *_: None)
  pts = {p["layout"]: p for p in out["points"]}
  assert set(pts) == {"loop", "loop_dev", "vmap/2", "map/5"}
  assert pts["loop"]["speedup_vs_loop"] == 1.0
  for p in pts.values():
    assert p["max_abs_diff"] < 1e-6  # the same clients, whichever layout ran them
    assert p["client_updates_per_s"] > 0 and 0 < p["mfu"] and p["intensity"] > 0
    assert math.isclose(p["achieved_flops"], p["useful_flops_per_update"] * 5 / p["seconds"])
  assert out["peak_flops"] > 0 and out["bandwidth"] > 0
  assert "digits_mlp" in table(out)
