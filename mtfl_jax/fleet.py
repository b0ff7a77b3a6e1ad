"""The simulated clients' devices: how fast each computes, how fast it transfers, when it is online.

A :class:`Fleet` holds, per client, a device ``speed`` relative to this machine (2.0: the
client runs a step in half the time this machine takes), a ``bandwidth`` in bytes/s and an
optional :class:`Availability` (when, in virtual seconds, the client is online). The virtual
clock divides a client's measured compute time by its speed and adds model bytes over its
bandwidth; availability and :func:`dropout_draw` decide who can take part in a round and who
drops out during one. Everything here is numpy and seeded: the same arguments give the same
fleet on every machine.

Three fleets:

* :meth:`Fleet.lognormal`: speed ~ lognormal(0, 0.5) and bandwidth ~ lognormal(log 20 Mbit/s,
  0.5), a moderate spread for sweeps (the middle 90% of speeds lie within 0.44x-2.3x);
* :meth:`Fleet.from_trace`: your own fleet, a JSON list of ``{"speed", "bandwidth_bps"}``;
* :meth:`Fleet.from_venn`: devices drawn from a measured table of 952 Android phones and
  tablets (SymbioticLab/Venn, from AI-Benchmark; ``data/traces/venn/SOURCE.md``), whose
  fastest device is 157x faster than its slowest.

Example::

    fleet = Fleet.from_venn(100, seed=0).with_availability(Availability.diurnal(100, seed=0))
    fleet.availability.online(3600.0)          # who is online one virtual hour in
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mtfl_jax.files import BadFileError, read_json

SPEED_SIGMA = 0.5
BANDWIDTH_MEDIAN = 20e6 / 8  # bytes/s (20 Mbit/s)
BANDWIDTH_SIGMA = 0.5
DAY_S = 24 * 3600.0

# Seed streams: numpy's SeedSequence mixes [seed, stream], so each kind of draw has its own
# independent stream for a given seed (7919 is the lognormal fleet's since it first existed).
_LOGNORMAL_STREAM = 7919
_VENN_STREAM = 7927
_DIURNAL_STREAM = 7933

VENN_DIR = Path(__file__).resolve().parent.parent / "data" / "traces" / "venn"


def _readonly(a, dtype=np.float64) -> np.ndarray:
  a = np.array(a, dtype=dtype)
  a.setflags(write=False)
  return a


# --------------------------------------------------------------------------- availability
@dataclasses.dataclass(frozen=True, eq=False)
class Availability:
  """When each client is online, in virtual seconds from the start of the run (t = 0).

  ``windows[c]`` is client c's online windows as an array of ``[start, end)`` rows, sorted,
  disjoint and not touching (touching windows are merged: a client online in ``[0, 10)`` and
  ``[10, 20)`` is online throughout ``[0, 20)``). With ``period_s`` set, the windows lie in
  ``[0, period_s]`` and repeat every period (a window ending at ``period_s`` continues into
  the next period's window starting at 0); without it they are absolute and the client is
  offline after its last window. A client with no windows is never online.

  Build one with :meth:`always`, :meth:`from_trace`, :meth:`diurnal` or :meth:`periodic`.
  The queries take one client (``online`` takes all): :meth:`online`, :meth:`next_online`,
  :meth:`online_until`, :meth:`online_through`.
  """
  windows: tuple
  period_s: float | None = None

  def __post_init__(self):
    p = self.period_s
    if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and p > 0):
      raise ValueError(f"period_s must be a finite number > 0 or None, got {p!r}")
    wins = []
    for c, w in enumerate(self.windows):
      w = np.asarray(w, dtype=np.float64).reshape(-1, 2) if len(w) else np.zeros((0, 2))
      msg = _window_problem(w, p)
      if msg:
        raise ValueError(f"client {c}, {msg}")
      wins.append(_readonly(_merge(w)))
    object.__setattr__(self, "windows", tuple(wins))
    object.__setattr__(self, "period_s", None if p is None else float(p))
    # All clients' windows padded to one (clients, most windows) array, so that online(t) is
    # one vectorised comparison; the padding [inf, inf) holds no time.
    k = max([len(w) for w in wins] + [1])
    pad = np.full((len(wins), k, 2), math.inf)
    for c, w in enumerate(wins):
      pad[c, :len(w)] = w
    object.__setattr__(self, "_padded", pad)

  @property
  def num_clients(self) -> int:
    return len(self.windows)

  # ------------------------------------------------------------------ constructors
  @classmethod
  def always(cls, num_clients: int) -> "Availability":
    """Every client online from t = 0 on."""
    return cls(tuple(np.array([[0.0, math.inf]]) for _ in range(num_clients)))

  @classmethod
  def periodic(cls, windows: Sequence, period_s: float) -> "Availability":
    """Windows within one period, repeated every ``period_s``; a window may wrap past the
    period's end (``[20, 28]`` with a period of 24 is online in ``[20, 24)`` and ``[0, 4)``);
    overlapping windows are joined."""
    out = []
    for c, w in enumerate(windows):
      w = np.asarray(w, dtype=np.float64).reshape(-1, 2) if len(w) else np.zeros((0, 2))
      parts = []
      for j, (a, b) in enumerate(w):
        if not (math.isfinite(a) and math.isfinite(b) and b > a and b - a <= period_s):
          raise ValueError(f"client {c}, window {j}: [{a!r}, {b!r}] must be finite with 0 < end - start <= "
                           f"period_s ({period_s!r})")
        if b - a == period_s:  # online all the time (no rounding of a wrapped window leaves a gap)
          parts.append([0.0, period_s])
          continue
        a0 = a % period_s
        b0 = a0 + (b - a)
        parts += [[a0, min(b0, period_s)]] + ([[0.0, b0 - period_s]] if b0 > period_s else [])
      parts.sort()
      out.append(_merge(np.array(parts).reshape(-1, 2)))
    return cls(tuple(out), period_s)

  @classmethod
  def diurnal(cls, num_clients: int, seed: int, period_s: float = DAY_S,
              online_fraction: float | tuple[float, float] = 0.5) -> "Availability":
    """Each client online once per period (a day by default) for a fraction of it, from a
    seeded random phase: phase ~ uniform[0, period_s), so clients' windows are spread evenly
    around the clock (as for clients in every time zone, each online while charging). A float
    ``online_fraction`` gives every client that duty cycle; a ``(low, high)`` pair draws each
    client's uniformly from it. The fraction of clients online at any time is then, on average,
    the mean duty cycle."""
    lo, hi = (online_fraction, online_fraction) if np.isscalar(online_fraction) else online_fraction
    if not (0 < lo <= hi <= 1):
      raise ValueError(f"online_fraction must be in (0, 1] (or a pair low <= high in it), got {online_fraction!r}")
    rng = np.random.default_rng([seed, _DIURNAL_STREAM])
    phase = rng.uniform(0.0, period_s, num_clients)
    duty = rng.uniform(lo, hi, num_clients) if hi > lo else np.full(num_clients, float(lo))
    return cls.periodic([[[a, a + d * period_s]] for a, d in zip(phase, duty)], period_s)

  @classmethod
  def from_trace(cls, path: str | os.PathLike, num_clients: int) -> "Availability":
    """The first ``num_clients`` clients of a JSON availability trace: a list with, per
    client, a list of ``[start_s, end_s]`` online windows in virtual seconds (absolute,
    sorted, disjoint; ``end_s`` may be ``Infinity``: online from ``start_s`` on), or an object
    ``{"period_s": P, "clients": [...]}`` whose windows lie in ``[0, P]`` and repeat every P
    seconds. Every window is checked; an error names the client, the window and its values."""
    form = ('a JSON list with, per client, a list of [start_s, end_s] online windows (0 <= start_s < end_s, '
            'sorted, disjoint), or {"period_s": P, "clients": [...]} with windows repeating every P seconds')
    doc = read_json(path, what="availability trace", remedy=f"a trace is {form}")

    def bad(msg):
      raise BadFileError(f"availability trace {path}: {msg}; a trace is {form}")
    period = None
    if isinstance(doc, dict):
      if set(doc) != {"period_s", "clients"}:
        bad(f"is an object with keys {sorted(doc)}, not exactly 'period_s' and 'clients'")
      period, doc = doc["period_s"], doc["clients"]
      if isinstance(period, bool) or not isinstance(period, (int, float)) or not (math.isfinite(period) and period > 0):
        bad(f"period_s: {period!r} must be a finite number > 0")
    if not isinstance(doc, list):
      bad(f"holds a JSON {type(doc).__name__}, not a list of clients")
    if len(doc) < num_clients:
      bad(f"describes {len(doc)} clients, the federation has {num_clients}")
    wins = []
    for c, w in enumerate(doc):
      if not isinstance(w, list):
        bad(f"client {c} is {w!r}, not a list of [start_s, end_s] windows")
      for j, x in enumerate(w):
        if not (isinstance(x, list) and len(x) == 2):
          bad(f"client {c}, window {j} is {x!r}, not a pair [start_s, end_s]")
        for v in x:
          if isinstance(v, bool) or not isinstance(v, (int, float)):
            bad(f"client {c}, window {j}: {v!r} is not a number")
      arr = np.array(w, dtype=np.float64).reshape(-1, 2)
      msg = _window_problem(arr, period)
      if msg:
        bad(f"client {c}, {msg}")
      wins.append(arr)
    return cls(tuple(wins[:num_clients]), period)

  # ------------------------------------------------------------------ queries
  def online(self, t: float) -> np.ndarray:
    """Which clients are online at virtual time ``t`` (a bool per client)."""
    x = t % self.period_s if self.period_s is not None else t
    return np.any((self._padded[..., 0] <= x) & (x < self._padded[..., 1]), axis=1)

  def next_online(self, client: int, t: float) -> float:
    """The earliest time >= ``t`` at which ``client`` is online (``t`` itself if it is online
    now; ``inf`` if it never is again)."""
    starts, ends = self._unrolled(client, t)
    i = np.searchsorted(starts, t, side="right")
    if i > 0 and t < ends[i - 1]:
      return float(t)
    return float(starts[i]) if i < len(starts) else math.inf

  def online_until(self, client: int, t: float) -> float:
    """When ``client``, online at ``t``, next goes offline (``inf``: never); ``t`` itself if it
    is offline at ``t``. A round the client starts at ``t`` that would end later is one it
    drops out of."""
    start, end = self._stretch(client, t)
    return end if start <= t else float(t)

  def online_through(self, client: int, start: float, end: float) -> bool:
    """Whether ``client`` is online for the whole of ``[start, end)`` (online at ``start`` and
    not going offline before ``end``): a client that goes offline mid-round drops out."""
    a, b = self._stretch(client, start)
    return a <= start and end <= b

  # ------------------------------------------------------------------ internals
  def _unrolled(self, client: int, t: float) -> tuple[np.ndarray, np.ndarray]:
    """The client's windows as absolute times, merged; for a periodic availability those of
    the periods before, at and after ``t`` (enough: a stretch not covering a whole period is
    shorter than one period, and one covering it is always online)."""
    w = self.windows[client]
    if self.period_s is None or len(w) == 0:
      return w[:, 0], w[:, 1]
    p = self.period_s
    if len(w) == 1 and w[0, 0] == 0 and w[0, 1] == p:
      return np.array([-math.inf]), np.array([math.inf])
    k = math.floor(t / p)
    un = np.concatenate([w + (k + d) * p for d in (-1, 0, 1)])
    keep = un[1:, 0] > un[:-1, 1]  # sorted and disjoint: only windows touching at a period's end join
    return un[np.concatenate([[True], keep]), 0], un[np.concatenate([keep, [True]]), 1]

  def _stretch(self, client: int, t: float) -> tuple[float, float]:
    """The online window ``[a, b)`` holding ``t``, or ``(inf, inf)`` when offline at ``t``."""
    starts, ends = self._unrolled(client, t)
    i = np.searchsorted(starts, t, side="right") - 1
    if i >= 0 and t < ends[i]:
      return float(starts[i]), float(ends[i])
    return math.inf, math.inf


def _window_problem(w: np.ndarray, period: float | None) -> str | None:
  """What is wrong with one client's windows (``None``: nothing): each finite-start, non-empty,
  within the period if there is one, sorted and not overlapping the one before."""
  for j, (a, b) in enumerate(w):
    where = f"window {j}: [{_num(a)}, {_num(b)}]"
    if not (math.isfinite(a) and a >= 0) or math.isnan(b):
      return f"{where} must start at a finite time >= 0"
    if not b > a:
      return f"{where} must end after it starts"
    if period is not None and b > period:
      return f"{where} ends after period_s ({_num(period)}); periodic windows lie within [0, period_s]"
    if j > 0 and a < w[j - 1, 1]:
      return (f"{where} starts before window {j - 1} [{_num(w[j - 1, 0])}, {_num(w[j - 1, 1])}] ends; "
              "windows must be sorted and disjoint")
  return None


def _num(x: float) -> str:
  return repr(int(x)) if math.isfinite(x) and x == int(x) else repr(float(x))


def _merge(w: np.ndarray) -> np.ndarray:
  """Windows sorted by start, overlapping or touching ones joined (``[0, 10), [10, 20)`` -> ``[0, 20)``)."""
  out: list = []
  for a, b in w[np.argsort(w[:, 0], kind="stable")] if len(w) else []:
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return np.array(out, dtype=np.float64).reshape(-1, 2)


def dropout_draw(rng: np.random.Generator, probability: float | np.ndarray, n: int) -> np.ndarray:
  """Which of ``n`` clients drop out of this round (a bool each), each independently with
  ``probability`` (a number, or one per client). Draw for every client of the federation each
  round, from a generator seeded by (seed, round), and index the selected ones: a client's fate
  then does not depend on which others were selected::

      rng = np.random.default_rng([seed, round_index])
      dropped = dropout_draw(rng, 0.1, fleet.num_clients)[selected]
  """
  p = np.broadcast_to(np.asarray(probability, dtype=np.float64), (n,))
  if not np.all((p >= 0) & (p <= 1)):
    raise ValueError(f"dropout probability must lie in [0, 1], got {probability!r}")
  return rng.random(n) < p


# --------------------------------------------------------------------------- the fleet
@dataclasses.dataclass(frozen=True, eq=False)
class Fleet:
  """Per-client device ``speed`` relative to this machine (a client of speed s takes 1/s of
  this machine's compute time), ``bandwidth`` in bytes/s, and ``availability`` (``None``:
  every client always online). ``devices`` names each client's device where the fleet was
  drawn from a device table."""
  speed: np.ndarray
  bandwidth: np.ndarray
  availability: Availability | None = None
  devices: tuple[str, ...] | None = None

  def __post_init__(self):
    speed, bw = _readonly(self.speed).reshape(-1), _readonly(self.bandwidth).reshape(-1)
    if speed.shape != bw.shape:
      raise ValueError(f"speed has {speed.size} clients, bandwidth {bw.size}")
    for name, a in (("speed", speed), ("bandwidth", bw)):
      if not np.all(np.isfinite(a) & (a > 0)):
        c = int(np.flatnonzero(~(np.isfinite(a) & (a > 0)))[0])
        raise ValueError(f"{name} of client {c} is {float(a[c])!r}; it must be a finite number > 0")
    if self.availability is not None and self.availability.num_clients != speed.size:
      raise ValueError(f"availability describes {self.availability.num_clients} clients, the fleet has {speed.size}")
    if self.devices is not None and len(self.devices) != speed.size:
      raise ValueError(f"devices names {len(self.devices)} clients, the fleet has {speed.size}")
    object.__setattr__(self, "speed", speed)
    object.__setattr__(self, "bandwidth", bw)

  @property
  def num_clients(self) -> int:
    return int(self.speed.size)

  def with_availability(self, availability: Availability | None) -> "Fleet":
    """The same devices with ``availability`` (``None``: always online)."""
    return dataclasses.replace(self, availability=availability)

  @classmethod
  def lognormal(cls, num_clients: int, seed: int, speed_sigma: float = SPEED_SIGMA,
                bandwidth_median: float = BANDWIDTH_MEDIAN, bandwidth_sigma: float = BANDWIDTH_SIGMA) -> "Fleet":
    """speed ~ lognormal(0, ``speed_sigma``) (the median client runs at this machine's speed)
    and bandwidth ~ lognormal(log ``bandwidth_median``, ``bandwidth_sigma``) bytes/s, seeded."""
    rng = np.random.default_rng([seed, _LOGNORMAL_STREAM])
    return cls(rng.lognormal(0.0, speed_sigma, num_clients),
               rng.lognormal(math.log(bandwidth_median), bandwidth_sigma, num_clients))

  @classmethod
  def from_trace(cls, path: str | os.PathLike, num_clients: int) -> "Fleet":
    """The first ``num_clients`` rows of a JSON trace ``[{"speed": x, "bandwidth_bps": y}, ...]``
    (x relative to this machine, y in bits/s); every row is checked, and an error names the
    row, field and value."""
    form = ('a JSON list of {"speed": x, "bandwidth_bps": y} (x > 0 relative to this machine, y bits/s > 0), '
            'one per client')
    rows = read_json(path, what="fleet trace", remedy=f"a trace is {form}")

    def bad(msg):
      raise BadFileError(f"fleet trace {path}: {msg}; a trace is {form}")
    if not isinstance(rows, list):
      bad(f"holds a JSON {type(rows).__name__}, not a list")
    if len(rows) < num_clients:
      bad(f"describes {len(rows)} clients, the federation has {num_clients}")
    vals = {"speed": [], "bandwidth_bps": []}
    for i, r in enumerate(rows):
      if not isinstance(r, dict):
        bad(f"row {i} is {r!r}, not an object")
      for f in vals:
        if f not in r:
          bad(f"row {i} has no field '{f}' (it has {', '.join(map(repr, r)) or 'none'})")
        v = r[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
          bad(f"row {i}, field '{f}': {v!r} is not a number")
        if not (math.isfinite(v) and v > 0):
          bad(f"row {i}, field '{f}': {v!r} must be a finite number > 0")
        vals[f].append(float(v))
    return cls(np.array(vals["speed"][:num_clients]), np.array(vals["bandwidth_bps"][:num_clients]) / 8)

  @classmethod
  def from_venn(cls, num_clients: int, seed: int, path: str | os.PathLike | None = None,
                bandwidth_median: float = BANDWIDTH_MEDIAN, bandwidth_sigma: float = BANDWIDTH_SIGMA) -> "Fleet":
    """``num_clients`` devices drawn from Venn's table of 952 measured Android devices
    (:func:`venn_devices`), seeded, without replacement while the table lasts (past 952
    clients, every device is used once before any is used twice, and so on).

    Speeds are relative to the table's median device: **the median device runs at this
    machine's speed**, and a device of latency L ms per sample has speed median(L) / L (the
    table spans 0.042x to 6.6x). The table has no bandwidths, so bandwidth is the lognormal
    model's: exactly :meth:`lognormal`'s bandwidths for the same seed, so that a Venn fleet
    and a lognormal fleet of one seed differ in their speeds only."""
    table = venn_devices(path)
    rng = np.random.default_rng([seed, _VENN_STREAM])
    rows = np.concatenate([rng.permutation(table.num_devices) for _ in range(-(-num_clients // table.num_devices))]
                          or [np.zeros(0, np.int64)])[:num_clients]
    bw = cls.lognormal(num_clients, seed, bandwidth_median=bandwidth_median, bandwidth_sigma=bandwidth_sigma).bandwidth
    return cls(table.relative_speed[rows], bw, devices=tuple(table.device[i] for i in rows))


# --------------------------------------------------------------------------- Venn's device table
@dataclasses.dataclass(frozen=True, eq=False)
class DeviceTable:
  """A table of measured devices, one entry per row: ``device`` (model name), ``latency_ms``
  (the table's ``speed`` field: milliseconds per sample, lower is faster), and the AI-Benchmark
  specs ``cpu_f`` (CPU-F score), ``ram`` (GB), ``fp16_mem`` (FP16 memory score) and
  ``android_os`` (version)."""
  device: tuple[str, ...]
  latency_ms: np.ndarray
  cpu_f: np.ndarray
  ram: np.ndarray
  fp16_mem: np.ndarray
  android_os: np.ndarray

  @property
  def num_devices(self) -> int:
    return len(self.device)

  @property
  def relative_speed(self) -> np.ndarray:
    """Each device's speed relative to the table's median device (median latency / latency)."""
    return np.median(self.latency_ms) / self.latency_ms


def venn_devices(path: str | os.PathLike | None = None) -> DeviceTable:
  """Venn's device table (``data/traces/venn/client_spec_speed.json`` by default; its source,
  licence and fields in ``SOURCE.md`` beside it), every row checked."""
  path = Path(path) if path is not None else VENN_DIR / "client_spec_speed.json"
  fields = ("device", "cpu_f", "ram", "fp16_mem", "android_os", "speed")
  form = "a JSON list of {" + ", ".join(f'"{f}"' for f in fields) + "} rows (data/traces/venn/convert.py writes it)"
  rows = read_json(path, what="device table", remedy=f"a device table is {form}",
                   missing="it ships in the source checkout's data/traces/venn/; pass path= to read a copy")

  def bad(msg):
    raise BadFileError(f"device table {path}: {msg}; a device table is {form}")
  if not isinstance(rows, list) or not rows:
    bad("is not a non-empty JSON list")
  cols: dict = {f: [] for f in fields}
  for i, r in enumerate(rows):
    if not isinstance(r, dict):
      bad(f"row {i} is {r!r}, not an object")
    for f in fields:
      if f not in r:
        bad(f"row {i} has no field '{f}'")
      v = r[f]
      if f == "device":
        if not isinstance(v, str):
          bad(f"row {i}, field 'device': {v!r} is not a string")
      elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (f == "speed" and v <= 0):
        bad(f"row {i}, field '{f}': {v!r} must be a finite number" + (" > 0" if f == "speed" else ""))
      cols[f].append(v)
  return DeviceTable(tuple(cols["device"]), _readonly(cols["speed"]), _readonly(cols["cpu_f"]),
                     _readonly(cols["ram"]), _readonly(cols["fp16_mem"]), _readonly(cols["android_os"]))
