"""patch_convs: convolutions as patches and matmuls, equal to XLA's own convolutions.

Checked against ``lax.conv_general_dilated`` (another implementation of the same sums) on
every kind of convolution a train step holds (strides, padding, negative padding, lhs and
rhs dilation, the dimension numbers autodiff gives the two backward convolutions), and as a
whole train step: several clients, several local steps, vmapped and patched, against a
per-client loop of XLA's own steps, for LeNet (convolutions and pooling), the U-Net
(transposed convolutions, upsampling), the MLP (no convolution), a model with BatchNorm
(mutable batch_stats) and one with Dropout (rngs).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from mtfl_jax.client_layouts import LAYOUTS, clients_program, parse_layout
from mtfl_jax.convpatch import conv_as_matmul, conv_form, conv_report, patch_convs, window_sum_as_slices
from mtfl_jax.data import Dataset
from mtfl_jax.tasks import Task, get_task
from mtfl_jax.train import init_state, make_train_step, synthetic_batches


def _close(a, b, tol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape
    scale = max(1.0, float(np.abs(y).max()) if y.size else 1.0)
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * scale)


def _conv_count(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


# --------------------------------------------------------------------------- one convolution
# (lhs shape, rhs shape, strides, padding, lhs_dilation, rhs_dilation, dimension numbers)
CASES = {
    "nhwc_same": ((2, 9, 9, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC")),
    "nhwc_valid_stride2": ((2, 11, 10, 3), (3, 2, 3, 5), (2, 2), ((0, 0), (0, 0)), (1, 1), (1, 1),
                           ("NHWC", "HWIO", "NHWC")),
    "nchw_rhs_dilated": ((2, 3, 12, 12), (4, 3, 3, 3), (1, 2), ((2, 1), (0, 3)), (1, 1), (2, 2),
                         ("NCHW", "OIHW", "NCHW")),
    "lhs_dilated": ((2, 5, 5, 4), (2, 2, 4, 3), (1, 1), ((1, 1), (1, 1)), (2, 2), (1, 1), ("NHWC", "HWIO", "NHWC")),
    "negative_padding": ((1, 8, 8, 2), (3, 3, 2, 2), (1, 1), ((-1, 2), (1, -2)), (1, 1), (1, 1),
                         ("NHWC", "HWIO", "NHWC")),
    "one_by_one": ((2, 6, 6, 5), (1, 1, 5, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), ("NHWC", "HWIO", "NHWC")),
    "conv1d": ((3, 20, 4), (5, 4, 6), (3,), ((2, 2),), (1,), (1,), ("NWC", "WIO", "NWC")),
    # what autodiff makes of LeNet's second convolution: weight and input gradients
    "weight_grad": ((4, 14, 14, 6), (4, 10, 10, 16), (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1),
                    lax.ConvDimensionNumbers((3, 0, 1, 2), (3, 0, 1, 2), (2, 3, 0, 1))),
    "input_grad": ((4, 10, 10, 16), (5, 5, 6, 16), (1, 1), ((4, 4), (4, 4)), (1, 1), (1, 1),
                   lax.ConvDimensionNumbers((0, 3, 1, 2), (2, 3, 0, 1), (0, 3, 1, 2))),
    # a stride-2 convolution's input gradient: lhs dilation; its weight gradient: rhs dilation
    "strided_input_grad": ((2, 4, 4, 3), (3, 3, 5, 3), (1, 1), ((2, 3), (2, 3)), (2, 2), (1, 1),
                           lax.ConvDimensionNumbers((0, 3, 1, 2), (2, 3, 0, 1), (0, 3, 1, 2))),
    "strided_weight_grad": ((2, 9, 9, 5), (2, 4, 4, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), (2, 2),
                            lax.ConvDimensionNumbers((3, 0, 1, 2), (3, 0, 1, 2), (2, 3, 0, 1))),
}


def _dn(lhs_shape, rhs_shape, dn):
  return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dn) if isinstance(dn[0], str) else dn


@pytest.mark.parametrize("form", ["im2col", "col2im"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_as_matmul_equals_xla_conv(case, form):
  ls, rs, strides, padding, ldil, rdil, dn = CASES[case]
  k1, k2 = jax.random.split(jax.random.PRNGKey(len(case)))
  lhs, rhs = jax.random.normal(k1, ls), jax.random.normal(k2, rs)
  kw = dict(window_strides=strides, padding=padding, lhs_dilation=ldil, rhs_dilation=rdil,
            dimension_numbers=_dn(ls, rs, dn))
  want = lax.conv_general_dilated(lhs, rhs, **kw, precision=lax.Precision.HIGHEST)
  got = jax.jit(functools.partial(conv_as_matmul, form=form, **kw))(lhs, rhs)
  _close(got, want, 1e-5)
  if form == "im2col" and case == "nhwc_same":  # the conv_general_dilated_patches extraction too
    _close(jax.jit(functools.partial(conv_as_matmul, extract="patches", **kw))(lhs, rhs), want, 1e-5)


def test_conv_form_picks_col2im_where_the_output_is_larger():
  params = lambda pad, ld: dict(dimension_numbers=lax.conv_dimension_numbers((1, 10, 10, 16), (5, 5, 16, 6),
                                                                              ("NHWC", "HWIO", "NHWC")),
                                padding=pad, lhs_dilation=ld, window_strides=(1, 1), rhs_dilation=(1, 1))
  assert conv_form((1, 10, 10, 16), (5, 5, 16, 6), params(((4, 4), (4, 4)), (1, 1))) == "col2im"  # input grad
  assert conv_form((1, 10, 10, 16), (5, 5, 16, 6), params(((2, 2), (2, 2)), (1, 1))) == "im2col"  # SAME
  assert conv_form((1, 10, 10, 16), (2, 2, 16, 6), params(((1, 1), (1, 1)), (2, 2))) == "col2im"  # transposed


# --------------------------------------------------------------------------- the interpreter
def test_subjaxprs_are_rewritten_and_other_primitives_kept():
  k = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 2))
  conv = lambda x: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  @jax.custom_jvp
  def custom(x):
    return conv(x)

  custom.defjvp(lambda p, t: (custom(p[0]), conv(t[0])))

  def differentiable(x):
    y = jax.jit(conv)(x)  # jit
    y = jax.checkpoint(conv)(y)  # checkpoint
    y = custom(y)  # custom_jvp_call
    y, _ = lax.scan(lambda c, _: (conv(c), None), y, None, length=2)  # scan
    return lax.cond(y.sum() > 0, conv, lambda v: -v, y)  # cond

  def fn(x):
    y = differentiable(x)
    y = lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, conv(c[1])), (0, y))[1]  # while
    return jnp.tanh(y)

  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 2))
  assert _conv_count(fn, x) >= 6 and _conv_count(patch_convs(fn), x) == 0
  _close(jax.jit(patch_convs(fn))(x), jax.jit(fn)(x), 1e-4)
  # a patched forward function still differentiates (checkpoint and custom_jvp rebuilt or inlined)
  grad = lambda f: jax.jit(jax.grad(lambda v: jnp.tanh(f(v)).sum()))(x)
  _close(grad(patch_convs(differentiable)), grad(differentiable), 1e-4)


def test_grouped_convolutions_fall_back_and_say_why():
  k = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 1, 4))
  fn = lambda x: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          feature_group_count=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 4))
  (row,) = conv_report(fn, x)
  assert not row["rewritten"] and "feature_group_count=4" in row["why"]
  _close(patch_convs(fn)(x), fn(x), 1e-6)


def test_bad_extract_is_refused():
  with pytest.raises(ValueError, match="valid: slices, patches"):
    patch_convs(lambda x: x, extract="im2row")


# --------------------------------------------------------------------------- whole train steps
class _BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(3)(x)


class _DropNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
    x = nn.Dropout(0.3, deterministic=not train)(x.reshape(x.shape[0], -1))
    return nn.Dense(3)(x)


def _small_task(name):
  rng = np.random.default_rng(0)
  ds = Dataset.from_arrays(name, rng.random((64, 8, 8, 2), np.float32), rng.integers(0, 3, 64))
  if name == "bn":
    return Task("bn_cnn", _BNNet(), ds, optimizer=optax.sgd(0.1, 0.9), batch_size=8, mutable=("batch_stats",),
                train_kwargs={"train": True}, eval_kwargs={"train": False})
  return Task("drop_cnn", _DropNet(), ds, optimizer=optax.adam(1e-2), batch_size=8, rngs=("dropout",),
              train_kwargs={"train": True}, eval_kwargs={"train": False})


TASKS = {"mnist_lenet": lambda: get_task("mnist_lenet"), "shapes_unet": lambda: get_task("shapes_unet"),
         "digits_mlp": lambda: get_task("digits_mlp"), "batchnorm": lambda: _small_task("bn"),
         "dropout": lambda: _small_task("drop")}


def _clients(task, clients, steps):
  """Per-client states (each its own seed: params and rng key) and sample ids; the last client
  has one step less."""
  stacked = jax.jit(jax.vmap(lambda seed: init_state(task, seed)))(jnp.arange(clients))  # one compile
  data = synthetic_batches(task, clients * steps, seed=1)
  n = clients * steps * task.batch_size
  x = data["image"].reshape(n, *task.input_shape)
  y = data["label"].reshape(n, *task.label_shape)
  ids = np.arange(n).reshape(clients, steps, task.batch_size)
  mask = np.ones((clients, steps), bool)
  mask[-1, -1] = False  # its last step must leave the state as it was
  return stacked, jnp.asarray(x), jnp.asarray(y), jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_patched_vmapped_clients_equal_the_per_client_loop(name):
  task = TASKS[name]()
  step = make_train_step(task)
  states, x, y, ids, mask = _clients(task, clients=3, steps=2)
  host = jax.tree.map(np.asarray, (states, x, y, ids, mask))  # numpy: no eager op compiles below
  hs, hx, hy, hids, hmask = host
  # the reference: XLA's own convolutions, one client and one jitted step at a time
  one = jax.jit(step)
  ref = []
  for c in range(3):
    s = jax.tree.map(lambda a: a[c], hs)
    for t in range(2):
      if hmask[c, t]:
        s, _ = one(s, {"image": hx[hids[c, t]], "label": hy[hids[c, t]]})
    ref.append(jax.tree.map(np.asarray, s))
  ref = jax.tree.map(lambda *a: np.stack(a), *ref)
  got = jax.tree.map(np.asarray, clients_program(step, "vmap_patch")(states, x, y, ids, mask))
  delta = lambda st: jax.tree.map(np.subtract, st.params, hs.params)
  _close(delta(got), delta(ref), 1e-5)
  _close(got.model_state, ref.model_state, 1e-5)
  np.testing.assert_array_equal(got.step, ref.step)
  assert max(np.abs(a).max() for a in jax.tree.leaves(delta(got))) > 1e-4  # it did train
  if name != "digits_mlp":  # no convolution left to become a grouped one under vmap
    assert _conv_count(jax.vmap(patch_convs(step)), states, {"image": x[ids[:, 0]], "label": y[ids[:, 0]]}) == 0


@pytest.mark.parametrize("layout", [l for l in LAYOUTS if l != "vmap_patch"])
def test_every_layout_gives_the_same_clients(layout):
  task = _small_task("bn")  # a convolution and mutable batch statistics, quick to compile
  step = make_train_step(task)
  states, x, y, ids, mask = _clients(task, clients=2, steps=2)
  want = clients_program(step, "vmap_patch")(states, x, y, ids, mask)
  _close(clients_program(step, layout)(states, x, y, ids, mask), want, 1e-5)


def test_layout_names():
  assert parse_layout("map_patch") == ("map", True) and parse_layout("loop") == ("loop", False)
  with pytest.raises(ValueError, match="valid: loop, loop_patch"):
    parse_layout("pmap")


def test_patched_program_compiles_once():
  task = _small_task("drop")
  traces = []
  step = make_train_step(task)

  def counted(state, batch):
    traces.append(1)
    return step(state, batch)

  states, x, y, ids, mask = _clients(task, clients=2, steps=1)
  program = clients_program(counted, "vmap_patch")
  program(states, x, y, ids, mask)
  program(states, x, y, ids + 1, mask)
  assert len(traces) == 1


@pytest.mark.parametrize("window,strides,padding,base,wdil", [
    ((1, 2, 2, 1), (1, 2, 2, 1), ((0, 0),) * 4, (1,) * 4, (1,) * 4),  # average pooling
    ((1, 3, 3, 1), (1, 2, 1, 1), ((0, 0), (1, 1), (1, 0), (0, 0)), (1,) * 4, (1,) * 4),  # overlapping, padded
    ((1, 2, 2, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0)), (1, 2, 2, 1), (1,) * 4),  # pooling's gradient
    ((1, 2, 2, 1), (1, 1, 1, 1), ((0, 0),) * 4, (1,) * 4, (1, 2, 1, 1)),  # window dilation
])
def test_window_sum_equals_reduce_window(window, strides, padding, base, wdil):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8, 3))
  want = lax.reduce_window(x, 0.0, lax.add, window, strides, padding, base, wdil)
  kw = dict(window_dimensions=window, window_strides=strides, padding=padding, base_dilation=base,
            window_dilation=wdil)
  _close(window_sum_as_slices(x, **kw), want, 1e-6)
