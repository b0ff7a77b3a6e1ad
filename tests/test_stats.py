"""mtfl_jax.stats against references: exact bootstrap enumeration, hand-made cases."""
import itertools
import math

import numpy as np
import pytest

from mtfl_jax.stats import as_float, bootstrap_ci, paired_ratio, ratio, summarize, verdict


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
  v = [1.0, 2.0, 4.0, 7.0]
  # every resample of 4 units is equally likely: 4^4 of them
  meds = sorted(np.median([v[i] for i in idx]) for idx in itertools.product(range(4), repeat=4))
  exact_lo = meds[int(np.ceil(0.025 * len(meds))) - 1]
  exact_hi = meds[int(np.ceil(0.975 * len(meds))) - 1]
  lo, hi = bootstrap_ci(v, n_boot=40_000)
  assert (lo, hi) == (exact_lo, exact_hi)


def test_paired_ratio_is_a_speedup_and_resamples_pairs():
  base = [10.0, 20.0, 30.0, 40.0, 50.0]
  pol = [5.0, 10.0, 15.0, 20.0, 25.0]   # exactly 2x faster on every seed, seeds very different
  s = paired_ratio(base, pol)
  assert s["median"] == 2.0 and s["ci95"] == [2.0, 2.0]  # paired: seed spread does not widen it
  assert verdict(s) == "faster"
  assert verdict(paired_ratio(pol, base)) == "slower"


def test_never_reached_counts_as_infinite_or_zero():
  assert ratio(None, 3.0) == math.inf and ratio(3.0, None) == 0.0 and math.isnan(ratio(None, None))
  s = paired_ratio([None, 4.0, 4.0], [2.0, 2.0, None])
  assert s["per_unit"] == ["inf", 2.0, 0.0] and s["infinite"] == 1 and s["zero"] == 1
  assert s["ci95"][0] == 0.0 and as_float(s["ci95"][1]) == math.inf
  assert verdict(s) == "no difference shown"
  assert paired_ratio([None], [None])["median"] is None


def test_summarize_leaves_missing_values_out():
  s = summarize([0.5, None, 0.7, 0.6])
  assert s["n"] == 3 and s["missing"] == 1 and s["median"] == 0.6
  assert s["ci95"][0] >= 0.5 and s["ci95"][1] <= 0.7
  with pytest.raises(ValueError, match="one value of each"):
    paired_ratio([1.0], [1.0, 2.0])
