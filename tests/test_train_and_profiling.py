import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtfl_jax as mt
from mtfl_jax.profiling import op_breakdown, op_equations, step_equations, xla_costs


def _batches(task, steps, seed=0):
  ds = mt.load_dataset(mt.get_task(task).dataset)
  return mt.sample_batches(ds.x_train, ds.y_train, np.arange(len(ds.x_train)),
                           mt.get_task(task).batch_size, steps, seed)


def test_train_step_does_not_recompile():
  traces = []
  step = mt.make_train_step("digits_mlp")

  def counted(state, batch):
    traces.append(1)
    return step(state, batch)

  f = jax.jit(counted)
  state = mt.init_state("digits_mlp", 0)
  b = _batches("digits_mlp", 4)
  for i in range(4):
    state, metrics = f(state, jax.tree.map(lambda a: a[i], b))
  assert len(traces) == 1
  assert int(state.step) == 4 and np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("mode", ["unroll", "scan"])
def test_local_update_equals_single_steps(mode):
  task = "mnist_lenet"
  b = _batches(task, 3)
  step = jax.jit(mt.make_train_step(task))
  ref = mt.init_state(task, 1)
  for i in range(3):
    ref, _ = step(ref, jax.tree.map(lambda a: a[i], b))
  fn = mt.make_local_update(task, 3, mode)
  out, metrics = fn(mt.init_state(task, 1), b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), ref.params, out.params)
  assert set(metrics) == {"loss", "accuracy"}
  fn(out, _batches(task, 3, seed=1))
  assert fn._cache_size() == 1  # a second call with new data reuses the compiled program


def _scripted_times(monkeypatch, script):
  """Replaces train.time_calls by one that returns the next list of ``script`` (and records how
  many calls were timed): the mode choice is then a known function of known timings."""
  calls = []

  def fake(fn, repeats=3, warmup=1):
    calls.append(repeats)
    return script.pop(0)

  monkeypatch.setattr(mt.train, "time_calls", fake)
  return calls


@pytest.mark.parametrize("script,expected,timed", [
    # unroll's best 1.0; scan's first 0.5 (< 1.5x): measured again, best 0.5 -> scan
    ([[1.0, 1.2, 1.1], [0.5], [0.6, 0.55]], "scan", 3),
    # scan's first run 2.0 >= 1.5 x 1.0: settled after one run -> unroll
    ([[1.0, 1.2, 1.1], [2.0]], "unroll", 2),
    # scan close (1.2), measured again, its best 1.05 still slower than 1.0 -> unroll
    ([[1.0, 1.2, 1.1], [1.2], [1.05, 1.3]], "unroll", 3),
])
def test_auto_mode_picks_the_faster_by_the_timings(monkeypatch, script, expected, timed):
  calls = _scripted_times(monkeypatch, script)
  task = mt.get_task("digits_mlp").replace()  # a new task: its own (empty) cache of choices
  assert mt.train.choose_local_mode(task, 3, repeats=3) == expected
  assert len(calls) == timed and script == []
  assert mt.train.choose_local_mode(task, 3, repeats=3) == expected and len(calls) == timed  # kept on the task


def test_auto_mode_on_real_timings_is_the_faster_one(monkeypatch):
  # the real measurement, watched: the first timed call is unroll's, the others scan's
  real, seen = mt.train.time_calls, []

  def spy(fn, repeats=3, warmup=1):
    t = real(fn, repeats, warmup)
    seen.append(min(t))
    return t

  monkeypatch.setattr(mt.train, "time_calls", spy)
  got = mt.train.choose_local_mode(mt.get_task("mnist_lenet").replace(), 3, repeats=2)
  assert got == ("scan" if min(seen[1:]) < seen[0] else "unroll"), seen
  with pytest.raises(ValueError, match="unknown mode"):
    mt.make_local_update("digits_mlp", 2, "vmap")
  with pytest.raises(ValueError, match="num_steps must be a positive integer"):
    mt.make_local_update("digits_mlp", 0)


def test_digits_mlp_really_learns():
  task = mt.get_task("digits_mlp")
  ds = mt.load_dataset(task.dataset)
  fn = mt.make_local_update(task, 50, "scan")
  state = mt.init_state(task, 0)
  before = mt.evaluate(task, state.params, ds.x_test, ds.y_test)["accuracy"]
  for r in range(4):
    state, _ = fn(state, mt.sample_batches(ds.x_train, ds.y_train, np.arange(len(ds.x_train)), 32, 50, r))
  after = mt.evaluate(task, state.params, ds.x_test, ds.y_test)["accuracy"]
  assert before < 0.3 and after > 0.85


def test_evaluate_matches_a_hand_count_with_a_padded_last_batch():
  task = mt.get_task("digits_mlp")
  ds = mt.load_dataset(task.dataset)
  params = mt.init_state(task, 0).params
  logits = task.model.apply({"params": params}, ds.x_test)
  expected = float((np.argmax(logits, -1) == ds.y_test).mean())
  got = mt.evaluate(task, params, ds.x_test, ds.y_test, batch_size=100)  # 359 = 3*100 + 59
  assert got["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_segmentation_metrics_include_miou():
  task = mt.get_task("shapes_unet")
  ds = mt.load_dataset(task.dataset)
  m = mt.evaluate(task, mt.init_state(task).params, ds.x_test[:20], ds.y_test[:20], batch_size=8)
  assert set(m) == {"accuracy", "loss", "miou"} and 0 <= m["miou"] <= 1


def test_workload_steps():
  assert mt.train.workload_steps(100, 32, 1) == 4
  assert mt.train.workload_steps(100, 32, 2.5) == 10
  assert mt.train.workload_steps(0, 32, 1) == 0


def test_dense_layer_flops_match_hand_count():
  w = jnp.ones((64, 10))
  x = jnp.ones((32, 64))
  # forward 2*32*64*10; backward: dW = x^T g (2*64*32*10) and dx = g W^T (2*32*10*64)
  loss = lambda w, x: jnp.sum(x @ w)
  rows = op_breakdown(jax.grad(loss, argnums=(0, 1)), w, x)
  assert sum(r["flops"] for r in rows) == 3 * 2 * 32 * 64 * 10
  compiled = jax.jit(lambda w, x: x @ w).lower(w, x).compile()
  assert xla_costs(compiled)["flops"] == 2 * 32 * 64 * 10


def test_conv_flops_match_hand_count():
  x = jnp.ones((8, 28, 28, 1))
  k = jnp.ones((5, 5, 1, 6))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  rows = op_breakdown(conv, x, k)
  assert rows[0]["flops"] == 2 * 8 * 28 * 28 * 6 * 5 * 5 * 1


def test_op_equations_name_each_backward_convolution():
  # a VALID 5x5 conv, 14x14x6 -> 10x10x16: the weight gradient costs what the forward does; the
  # input gradient is a "full" convolution of the 10x10 cotangent padded by 4 on every side:
  # 14x14 outputs x 5x5x16 taps each, half of them on padding zeros
  x, k = jnp.ones((4, 14, 14, 6)), jnp.ones((5, 5, 6, 16))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  rows = op_equations(jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1)), x, k)
  by_role = {r["role"]: r for r in rows}
  assert set(by_role) == {"forward", "weight gradient", "input gradient"}
  forward = 2 * 4 * 10 * 10 * 16 * 5 * 5 * 6
  assert by_role["forward"]["flops"] == by_role["weight gradient"]["flops"] == forward
  assert by_role["input gradient"]["flops"] == 2 * 4 * 14 * 14 * 6 * 5 * 5 * 16
  assert by_role["input gradient"]["padding"] == ((4, 4), (4, 4)) and by_role["input gradient"]["output"] == (4, 14, 14, 6)


def test_step_equations_of_lenet():
  rows = step_equations("mnist_lenet")
  roles = lambda layer: sorted(r["role"] for r in rows if r["layer"] == layer)
  # the first convolution's input is the data: no input gradient is computed for it
  assert roles("Conv_0") == ["forward", "weight gradient"]
  assert roles("Conv_1") == roles("Dense_0") == ["forward", "input gradient", "weight gradient"]
  assert sum(r["flops"] for r in rows) == sum(r["flops"] for r in mt.profiling.op_breakdown(
      mt.make_train_step("mnist_lenet"), mt.init_state("mnist_lenet"),
      {"image": jnp.zeros((32, 28, 28, 1)), "label": jnp.zeros((32,), jnp.int32)}))


def test_profile_task_and_json_roundtrip(tmp_path):
  p = mt.profile_task("digits_mlp", warmup=1, repeats=3)
  assert p.step_time_s > 0 and p.flops_per_step > 2 * 32 * 64 * 128  # at least the first layer forward
  assert 0 < p.peak_fraction < 1 and p.memory_bytes > 0 and p.compile_s > 0
  assert p.ops and p.ops[0]["flops"] >= p.ops[-1]["flops"]
  path = mt.profiling.save_profiles([p], tmp_path / "dev.json")
  q = mt.profile_task("mnist_lenet", warmup=1, repeats=2)
  mt.profiling.save_profiles([q], path)  # merges: the first profile is kept
  loaded = {x.task: x for x in mt.profiling.load_profiles(path)}
  assert set(loaded) == {"digits_mlp", "mnist_lenet"} and loaded["digits_mlp"] == p
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="not a profile file"):
    mt.profiling.load_profiles(tmp_path / "bad.json")
  with pytest.raises(FileNotFoundError, match="python -m mtfl_jax profile"):
    mt.profiling.load_profiles(tmp_path / "missing.json")


def test_profile_cli_writes_the_documented_json(tmp_path):
  from mtfl_jax.__main__ import main
  out = tmp_path / "p.json"
  assert main(["profile", "--tasks", "digits_mlp", "--json", str(out), "--repeats", "2"]) == 0
  doc = json.loads(out.read_text())
  t = doc["tasks"][0]
  for key in ("task", "step_time_s", "flops_per_step", "bytes_per_step", "peak_fraction", "memory_bytes", "device"):
    assert key in t
  assert main(["profile", "--tasks", "nope"]) == 2


def test_has_convolution():
  assert mt.train.has_convolution("mnist_lenet") and not mt.train.has_convolution("digits_mlp")


def test_unroll_or_scan_rule_is_one_function():
  rule = lambda t, k: mt.train.choose_local_mode(t, k, measure=False)  # noqa: E731
  n = mt.train.UNROLL_MAX
  assert rule("digits_mlp", n) == "unroll" and rule("digits_mlp", n + 1) == "scan"
  assert rule("mnist_lenet", 10 * n) == "unroll"  # convolutions: scanned steps are slow on XLA CPU


def test_time_calls_compiles_untimed_then_times_each_call():
  from mtfl_jax.timing import time_calls
  calls = []
  times = time_calls(lambda: calls.append(1) or jax.numpy.zeros(3), repeats=4, warmup=2)
  assert len(times) == 4 and len(calls) == 6 and all(t >= 0 for t in times)
  with pytest.raises(ValueError, match="repeats >= 1"):
    time_calls(lambda: 0, repeats=0)
