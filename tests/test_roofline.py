"""roofline: MFU and arithmetic intensity of a compiled program, checked on matmuls whose FLOPs
and bytes are known in closed form (2 n^3 FLOPs; three n x n float32 arrays moved)."""
import jax
import jax.numpy as jnp
import pytest

from mtfl_jax.roofline import Roofline, measure_bandwidth, utilisation


@pytest.mark.parametrize("n", [32, 64])
def test_matmul_utilisation_against_closed_form(n):
  a = jnp.ones((n, n), jnp.float32)
  compiled = jax.jit(jnp.matmul).lower(a, a).compile()
  roof = Roofline(peak_flops=1e9, bandwidth=1e8)  # ridge at 10 FLOP/byte
  u = utilisation(compiled, seconds=0.5, calls=4, roofline=roof)
  flops, nbytes = 2.0 * n ** 3, 3 * 4.0 * n * n
  assert u.flops == pytest.approx(4 * flops) and u.bytes == pytest.approx(4 * nbytes)
  assert u.achieved_flops == pytest.approx(4 * flops / 0.5)
  assert u.mfu == pytest.approx(4 * flops / 0.5 / 1e9)
  assert u.intensity == pytest.approx(n / 6)  # 2 n^3 / (12 n^2)
  assert u.bound == ("memory" if n / 6 < 10 else "compute")
  assert u.roofline_fraction == pytest.approx(u.achieved_flops / min(1e9, n / 6 * 1e8))
  assert set(u.to_json()) >= {"mfu", "intensity", "bound", "roofline_fraction"}


def test_roofline_ridge_and_cap():
  roof = Roofline(peak_flops=2e11, bandwidth=2e10)
  assert roof.ridge == pytest.approx(10.0)
  assert roof.attainable(1.0) == pytest.approx(2e10) and roof.attainable(100.0) == pytest.approx(2e11)


def test_costs_override_and_bad_arguments():
  u = utilisation(None, seconds=2.0, costs={"flops": 10.0, "bytes": 5.0}, roofline=Roofline(10.0, 1.0))
  assert u.mfu == pytest.approx(0.5) and u.intensity == pytest.approx(2.0)
  with pytest.raises(ValueError, match="seconds > 0"):
    utilisation(None, seconds=0.0, costs={"flops": 1.0, "bytes": 1.0}, roofline=Roofline(1.0, 1.0))


def test_bandwidth_is_measured():
  bw = measure_bandwidth(8, 2)
  assert 1e8 < bw < 1e13  # bytes/s: between a floppy disk's dream and a GPU's HBM
