"""mtfl_jax.fleet: the three fleets, availability windows and dropout, against hand-computed
values, an independent brute force over a time grid, and the original Venn pickle."""
import ast
import hashlib
import importlib.util
import json
import math
import re

import numpy as np
import pytest

from mtfl_jax.fleet import VENN_DIR, Availability, Fleet, dropout_draw, venn_devices
from mtfl_jax.files import BadFileError


def test_fleet_and_what_it_imports_are_numpy_only():
  # the clock reads fleets on the host; fleet.py and its one package import need no JAX
  import mtfl_jax.fleet
  import mtfl_jax.files
  for mod in (mtfl_jax.fleet, mtfl_jax.files):
    tree = ast.parse(open(mod.__file__).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {n for n in names if n.split(".")[0] in ("jax", "flax", "optax")}, mod.__name__
    assert {n for n in names if n.startswith("mtfl_jax")} <= {"mtfl_jax.files"}


# --------------------------------------------------------------------------- lognormal
@pytest.mark.parametrize("seed, n, kw", [(0, 5, {}), (3, 100, {}),
                                         (7, 10, dict(speed_sigma=1.2, bandwidth_median=1e6, bandwidth_sigma=0.1))])
def test_lognormal_is_the_clock_fleet_of_before(seed, n, kw):
  # a copy of mtfl_jax.clock.Fleet.lognormal's formula as it stood when fleet.py was split out
  sigma, median = kw.get("speed_sigma", 0.5), kw.get("bandwidth_median", 20e6 / 8)
  bw_sigma = kw.get("bandwidth_sigma", 0.5)
  rng = np.random.default_rng([seed, 7919])
  speed = rng.lognormal(0, sigma, n)
  bw = rng.lognormal(math.log(median), bw_sigma, n)
  f = Fleet.lognormal(n, seed, **kw)
  np.testing.assert_array_equal(f.speed, speed)
  np.testing.assert_array_equal(f.bandwidth, bw)
  assert f.availability is None and f.num_clients == n


def test_fleet_arrays_are_checked_and_frozen():
  f = Fleet([1.0, 2.0], [1e6, 2e6])
  with pytest.raises(ValueError):
    f.speed[0] = 3.0  # read-only: a frozen fleet cannot be edited in place
  with pytest.raises(ValueError, match="speed has 2 clients, bandwidth 1"):
    Fleet([1.0, 2.0], [1e6])
  with pytest.raises(ValueError, match="bandwidth of client 1 is 0.0"):
    Fleet([1.0, 2.0], [1e6, 0.0])
  with pytest.raises(ValueError, match="availability describes 3 clients, the fleet has 2"):
    f.with_availability(Availability.always(3))
  assert f.with_availability(Availability.always(2)).availability.num_clients == 2


# --------------------------------------------------------------------------- JSON fleet trace
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


def test_fleet_trace_reads_bits_per_second(tmp_path):
  p = tmp_path / "trace.json"
  p.write_text('[{"speed": 1, "bandwidth_bps": 8e6}, {"speed": 2.5, "bandwidth_bps": 16e6}, '
               '{"speed": 3, "bandwidth_bps": 1}]')
  f = Fleet.from_trace(p, 2)
  assert list(f.speed) == [1.0, 2.5] and list(f.bandwidth) == [1e6, 2e6]


# --------------------------------------------------------------------------- Venn's device table
def _convert_module():
  spec = importlib.util.spec_from_file_location("venn_convert", VENN_DIR / "convert.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_venn_table_is_the_original_pickle():
  text = (VENN_DIR / "SOURCE.md").read_text()
  recorded = re.search(r"sha256 `([0-9a-f]{64})`", text).group(1)
  assert hashlib.sha256((VENN_DIR / "client_spec_speed").read_bytes()).hexdigest() == recorded
  table = _convert_module().read_pickle()
  rows = json.loads((VENN_DIR / "client_spec_speed.json").read_text())
  assert len(rows) == len(table) == 952
  for r in rows:
    assert {k: v for k, v in r.items() if k != "id"} == table[r["id"]]
  assert "MIT License" in (VENN_DIR / "LICENSE").read_text()


def test_venn_table_facts():
  t = venn_devices()
  assert t.num_devices == 952
  assert t.latency_ms.min() == 9.5 and t.latency_ms.max() == 1495.0
  assert t.latency_ms.max() / t.latency_ms.min() == pytest.approx(157.37, abs=0.01)  # as SOURCE.md says
  assert t.device[int(np.argmin(t.latency_ms))] == "Asus ROG 6D Ultimate"
  assert t.device[int(np.argmax(t.latency_ms))] == "Asus Fonepad 7"
  # the median device (63 ms) runs at this machine's speed; the fastest at 63 / 9.5
  assert np.median(t.relative_speed) == 1.0
  assert t.relative_speed.max() == pytest.approx(63 / 9.5) and t.relative_speed.min() == pytest.approx(63 / 1495)
  assert len(set(t.device)) == 909


def test_from_venn_draws_are_seeded_and_without_replacement():
  t = venn_devices()
  a, b, c = Fleet.from_venn(50, seed=4), Fleet.from_venn(50, seed=4), Fleet.from_venn(50, seed=5)
  np.testing.assert_array_equal(a.speed, b.speed)
  assert a.devices == b.devices and not np.array_equal(a.speed, c.speed)
  # the whole table once each: the same multiset of speeds as the table
  whole = Fleet.from_venn(952, seed=1)
  np.testing.assert_array_equal(np.sort(whole.speed), np.sort(t.relative_speed))
  # past the table: the first 952 clients are every device once, then a new round of devices
  big = Fleet.from_venn(2000, seed=1)
  np.testing.assert_array_equal(np.sort(big.speed[:952]), np.sort(t.relative_speed))
  np.testing.assert_array_equal(np.sort(big.speed[952:1904]), np.sort(t.relative_speed))
  # a prefix of a larger draw is the smaller draw (one permutation, cut)
  np.testing.assert_array_equal(Fleet.from_venn(10, seed=1).speed, whole.speed[:10])
  # each client's speed is its named device's
  lat = {}
  for d, l in zip(t.device, t.latency_ms):
    lat.setdefault(d, set()).add(float(l))
  for d, s in zip(a.devices, a.speed):
    assert any(s == pytest.approx(63.0 / l) for l in lat[d])


def test_from_venn_bandwidth_is_the_lognormal_fleets():
  np.testing.assert_array_equal(Fleet.from_venn(30, seed=2).bandwidth, Fleet.lognormal(30, seed=2).bandwidth)


def test_venn_table_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data/traces/venn"):
    venn_devices(tmp_path / "absent.json")
  p = tmp_path / "t.json"
  p.write_text('[{"device": "a", "cpu_f": 1, "ram": 1, "fp16_mem": 1, "android_os": 9, "speed": 0}]')
  with pytest.raises(BadFileError, match="row 0, field 'speed': 0 must be a finite number > 0"):
    venn_devices(p)


# --------------------------------------------------------------------------- availability by hand
def test_trace_windows_by_hand(tmp_path):
  p = tmp_path / "avail.json"
  p.write_text("[[[0, 10], [20, 30]], [[0, 10], [10, 20]], [], [[5, Infinity]]]")
  av = Availability.from_trace(p, 4)
  assert list(av.online(0.0)) == [True, True, False, False]
  assert list(av.online(10.0)) == [False, True, False, True]  # windows are [start, end)
  assert list(av.online(25.0)) == [True, False, False, True]
  assert [av.next_online(0, t) for t in (5, 10, 15, 30, 99)] == [5, 20, 20, math.inf, math.inf]
  assert av.next_online(3, 0) == 5 and av.next_online(2, 0) == math.inf
  assert av.online_until(0, 5) == 10 and av.online_until(0, 12) == 12  # offline: t itself
  assert av.online_until(1, 5) == 20  # touching windows are one stretch
  assert av.online_until(3, 1e9) == math.inf
  assert av.online_through(0, 0, 10) and not av.online_through(0, 5, 12) and av.online_through(0, 20, 25)
  assert not av.online_through(0, 15, 22)  # offline at the start
  assert av.online_through(1, 5, 15) and av.online_through(3, 6, 1e12)


def test_periodic_window_wrapping_midnight():
  # period 24 h, online 20:00-04:00 (wraps), and a second client online 09:00-17:00
  av = Availability.periodic([[[20, 28]], [[9, 17]]], period_s=24)
  np.testing.assert_array_equal(av.windows[0], [[0, 4], [20, 24]])
  assert list(av.online(22)) == [True, False] and list(av.online(2)) == [True, False]
  assert list(av.online(4)) == [False, False] and list(av.online(26)) == [True, False]
  assert list(av.online(24 * 7 + 10)) == [False, True]
  assert av.next_online(0, 5) == 20 and av.next_online(0, 30) == 44 and av.next_online(1, 17) == 33
  assert av.online_until(0, 22) == 28 and av.online_until(0, 25) == 28 and av.online_until(1, 10) == 17
  assert av.online_through(0, 22, 27) and av.online_through(0, 22, 28) and not av.online_through(0, 22, 29)
  assert not av.online_through(1, 16, 18)


def test_always_and_full_duty():
  av = Availability.always(3)
  assert av.online(0).all() and av.online(1e9).all() and av.online_until(2, 5) == math.inf
  full = Availability.periodic([[[7, 31]]], period_s=24)  # online the whole period
  assert full.online_until(0, 1e6) == math.inf and full.next_online(0, 3) == 3


def _grid_member(raw, period):
  """Independent membership: t online iff some raw window holds it (mod the period)."""
  def member(t):
    if period is None:
      return any(a <= t < b for a, b in raw)
    return any((t - a) % period < (b - a) for a, b in raw)
  return member


@pytest.mark.parametrize("period", [None, 24.0])
def test_queries_match_a_brute_force_over_a_grid(period):
  rng = np.random.default_rng(0)
  horizon, step = 80.0, 0.5
  grid = np.arange(0, horizon + 3 * 24, step)
  raws, wins = [], []
  for _ in range(12):
    if period is None:
      cuts = np.sort(rng.choice(np.arange(1, 60), size=2 * rng.integers(0, 4), replace=False)).astype(float)
      raw = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]
    else:
      a = float(rng.integers(0, 24))
      raw = [(a, a + float(rng.integers(1, 24)))]
    raws.append(raw)
    wins.append([list(w) for w in raw])
  av = Availability(tuple(np.array(w).reshape(-1, 2) for w in wins)) if period is None else \
      Availability.periodic(wins, period)
  for c, raw in enumerate(raws):
    member = _grid_member(raw, period)
    on = np.array([member(t) for t in grid])
    for i, t in enumerate(grid[grid < horizon]):
      assert av.online(t)[c] == on[i]
      later = np.flatnonzero(on[i:])
      assert av.next_online(c, t) == (grid[i + later[0]] if len(later) else math.inf)
      off = np.flatnonzero(~on[i:])
      until = grid[i + off[0]] if len(off) else math.inf
      if not on[i]:
        assert av.online_until(c, t) == t
      else:
        assert av.online_until(c, t) == until
      for d in (0.5, 3.0, 11.5):
        through = on[i] and all(on[i:i + int(d / step)])
        assert av.online_through(c, t, t + d) == through, (c, t, d)


# --------------------------------------------------------------------------- diurnal model
def test_diurnal_duty_cycles_and_fraction_online():
  day = 86400.0
  n = 4000
  av = Availability.diurnal(n, seed=3, period_s=day, online_fraction=0.3)
  lengths = np.array([np.sum(w[:, 1] - w[:, 0]) for w in av.windows])
  np.testing.assert_allclose(lengths, 0.3 * day, rtol=1e-12)
  # random phases: at any time about 30% of clients are online (binomial sd 0.0072; 5 sd)
  for t in (0.0, 0.25 * day, 0.6 * day, 3.9 * day):
    assert abs(av.online(t).mean() - 0.3) < 0.036
  again = Availability.diurnal(n, seed=3, period_s=day, online_fraction=0.3)
  assert all(np.array_equal(a, b) for a, b in zip(av.windows, again.windows))
  other = Availability.diurnal(n, seed=4, period_s=day, online_fraction=0.3)
  assert not all(np.array_equal(a, b) for a, b in zip(av.windows, other.windows))


def test_diurnal_duty_cycle_range():
  av = Availability.diurnal(4000, seed=0, period_s=100.0, online_fraction=(0.2, 0.8))
  duty = np.array([np.sum(w[:, 1] - w[:, 0]) for w in av.windows]) / 100.0
  assert duty.min() >= 0.2 and duty.max() <= 0.8
  assert abs(duty.mean() - 0.5) < 5 * 0.6 / math.sqrt(12 * 4000)
  with pytest.raises(ValueError, match="online_fraction must be in"):
    Availability.diurnal(3, seed=0, online_fraction=1.5)


# --------------------------------------------------------------------------- availability trace errors
@pytest.mark.parametrize("text, match", [
    ("{", "availability trace .* is not valid JSON"),
    ("[[[0, 10]]]", "describes 1 clients, the federation has 2"),
    ('"x"', "holds a JSON str, not a list of clients"),
    ("[[[0, 10]], 5]", "client 1 is 5, not a list"),
    ("[[[0, 10]], [[1, 2, 3]]]", r"client 1, window 0 is \[1, 2, 3\], not a pair"),
    ('[[[0, 10]], [[1, "x"]]]', "client 1, window 0: 'x' is not a number"),
    ("[[[0, 10]], [[5, 5]]]", r"client 1, window 0: \[5, 5\] must end after it starts"),
    ("[[[-1, 10]], []]", r"client 0, window 0: \[-1, 10\] must start at a finite time >= 0"),
    ("[[[0, 10], [5, 20]], []]", r"client 0, window 1: \[5, 20\] starts before window 0 \[0, 10\] ends"),
    ("[[[20, 30], [0, 10]], []]", r"client 0, window 1: \[0, 10\] starts before window 0 \[20, 30\] ends"),
    ('{"period_s": 24, "clients": [[[20, 28]], []]}', r"client 0, window 0: \[20, 28\] ends after period_s \(24\)"),
    ('{"period_s": 0, "clients": [[], []]}', "period_s: 0 must be a finite number > 0"),
    ('{"clients": [[], []]}', "not exactly 'period_s' and 'clients'"),
])
def test_availability_trace_errors_name_client_and_window(tmp_path, text, match):
  p = tmp_path / "avail.json"
  p.write_text(text)
  with pytest.raises(BadFileError, match=match):
    Availability.from_trace(p, 2)


def test_periodic_trace_file(tmp_path):
  p = tmp_path / "avail.json"
  p.write_text('{"period_s": 24, "clients": [[[0, 4], [20, 24]], [[9, 17]], []]}')
  av = Availability.from_trace(p, 2)
  assert av.num_clients == 2 and av.period_s == 24
  assert av.online_until(0, 22) == 28 and av.next_online(1, 18) == 33


# --------------------------------------------------------------------------- dropout
def test_dropout_draw():
  d1 = dropout_draw(np.random.default_rng([1, 2]), 0.25, 100_000)
  d2 = dropout_draw(np.random.default_rng([1, 2]), 0.25, 100_000)
  np.testing.assert_array_equal(d1, d2)
  assert abs(d1.mean() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 100_000)
  rng = np.random.default_rng(0)
  assert not dropout_draw(rng, 0.0, 1000).any() and dropout_draw(rng, 1.0, 1000).all()
  assert list(dropout_draw(rng, [0, 1, 0, 1], 4)) == [False, True, False, True]
  with pytest.raises(ValueError, match="dropout probability must lie in"):
    dropout_draw(rng, 1.5, 3)
