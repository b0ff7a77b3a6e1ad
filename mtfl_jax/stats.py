"""Small-sample statistics for paired comparisons: medians with 95% bootstrap intervals.

Every claim the package reports over seeds or repeats goes through here, so that they all
mean the same thing: the median over units (seeds, or interleaved repeats), and a percentile
bootstrap interval obtained by resampling the units with replacement (paired: a resample
keeps a unit's values together across the things compared).

A value that never happened (a target not reached) is ``None``: a time ratio with a
``None`` in it is ``+inf`` (the baseline never got there) or ``0`` (the policy never did);
the summary counts them. JSON has no infinity: an infinite median or bound is written as the
string ``"inf"`` (:func:`as_float` reads it back), an undefined one as ``None``.

Example::

    paired_ratio([10.0, 12.0, 9.0, 11.0, 10.5], [5.0, 6.5, 4.0, 6.0, 5.0])
    # {'median': 2.0, 'ci95': [1.85, 2.25], 'n': 5, 'per_unit': [...], ...}
    excludes_one(_)   # True: faster, with 95% confidence
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

N_BOOT = 10_000


def _finite_or_none(x: float) -> float | str | None:
  if x is None or math.isnan(x):
    return None
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return round(float(x), 6)


def as_float(x) -> float:
  """A value written by this module back as a float (``"inf"`` -> inf, ``None`` -> nan)."""
  if x is None:
    return math.nan
  return float(x)


def bootstrap_ci(values: Sequence[float], stat: Callable = np.median, level: float = 0.95,
                 n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of ``stat`` over ``values`` (units resampled with
  replacement, ``n_boot`` times, seeded). One value gives a zero-width interval."""
  v = np.asarray(values, float)
  if v.size == 0:
    raise ValueError("bootstrap_ci needs at least one value")
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, v.size, (n_boot, v.size))
  with np.errstate(invalid="ignore"):
    boots = np.apply_along_axis(stat, 1, v[idx]) if stat not in (np.median, np.mean) else stat(v[idx], axis=1)
  a = (1.0 - level) / 2
  # no interpolation between order statistics: an infinite ratio (a target never reached)
  # must not turn a bound into nan
  return float(np.quantile(boots, a, method="inverted_cdf")), float(np.quantile(boots, 1 - a, method="inverted_cdf"))


def summarize(values: Sequence[float | None], level: float = 0.95, seed: int = 0) -> dict:
  """``{"median", "ci95", "n", "values"}`` of per-unit values (``None``: missing, left out
  and counted in ``"missing"``)."""
  vals = [float(v) for v in values if v is not None]
  out = {"n": len(vals), "missing": len(values) - len(vals), "values": [_finite_or_none(v) for v in values]}
  if not vals:
    return {**out, "median": None, "ci95": [None, None]}
  lo, hi = bootstrap_ci(vals, level=level, seed=seed)
  return {**out, "median": _finite_or_none(float(np.median(vals))), "ci95": [_finite_or_none(lo), _finite_or_none(hi)]}


def ratio(num: float | None, den: float | None) -> float:
  """``num / den`` where ``None`` means "never": never/x = inf, x/never = 0, never/never = nan."""
  if num is None and den is None:
    return math.nan
  if num is None:
    return math.inf
  if den is None:
    return 0.0
  if den == 0:
    return math.inf if num > 0 else math.nan
  return float(num) / float(den)


def paired_ratio(num: Sequence[float | None], den: Sequence[float | None], level: float = 0.95,
                 seed: int = 0) -> dict:
  """Median over units of ``num[u] / den[u]`` and its bootstrap interval (units resampled as
  pairs). For times, ``paired_ratio(baseline_times, policy_times)`` is the policy's speedup:
  above 1 is faster. Units where both are ``None`` are left out (``"undefined"``)."""
  if len(num) != len(den):
    raise ValueError(f"paired_ratio needs one value of each per unit, got {len(num)} and {len(den)}")
  r = [ratio(a, b) for a, b in zip(num, den)]
  keep = [x for x in r if not math.isnan(x)]
  out = {"n": len(keep), "undefined": len(r) - len(keep), "per_unit": [_finite_or_none(x) for x in r],
         "infinite": sum(1 for x in keep if math.isinf(x)), "zero": sum(1 for x in keep if x == 0.0)}
  if not keep:
    return {**out, "median": None, "ci95": [None, None]}
  lo, hi = bootstrap_ci(keep, level=level, seed=seed)
  return {**out, "median": _finite_or_none(float(np.median(keep))), "ci95": [_finite_or_none(lo), _finite_or_none(hi)]}


def excludes_one(summary: dict) -> bool:
  """Whether a ratio's interval lies wholly above 1."""
  return as_float(summary["ci95"][0]) > 1.0


def verdict(summary: dict, better: str = "faster", worse: str = "slower") -> str:
  """``better`` / ``worse`` where the interval excludes 1 on that side, "no difference
  shown" where it holds 1, "undefined" where there is no interval."""
  lo, hi = (as_float(v) for v in summary["ci95"])
  if math.isnan(lo) or math.isnan(hi):
    return "undefined"
  if lo > 1.0:
    return better
  if hi < 1.0:
    return worse
  return "no difference shown"
