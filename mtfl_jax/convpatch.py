"""Convolutions as patches and matmuls: a function transform that lets ``jax.vmap`` batch clients.

Why: under ``jax.vmap`` over clients, each with its own weights, a convolution becomes one
*grouped* convolution (``feature_group_count`` = clients), which XLA CPU runs slowly, so the
simulator had to run convolutional clients one after another. :func:`patch_convs` rewrites
every ``conv_general_dilated`` of a traced function (the forward convolutions, and the two
that autodiff makes of each: the input gradient, with lhs dilation and swapped kernel
dimensions, and the weight gradient, whose "kernel" is the output gradient) as

    patches = the input's windows, stacked  (slices of the padded, dilated input)
    out     = dot_general(patches, kernel)  (contracting input features x window)

The patch extraction has no weights, so vmap folds the clients into it; the weights meet the
data only in ``dot_general``, which vmap turns into a *batched matmul* with the clients as
its batch dimension.

How: the function is traced to a jaxpr (``jax.make_jaxpr``) and evaluated equation by
equation; ``conv_general_dilated`` equations are replaced, every other primitive is bound as
it was. Sub-jaxprs (``jit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``,
``checkpoint``, ``scan``, ``cond``, ``while``) that hold a convolution are evaluated by the
same interpreter (call-like ones inlined; control flow rebuilt with ``lax.scan``,
``lax.switch``, ``lax.while_loop``); those without one are bound unchanged. Inlining a
custom-derivative call drops its custom rule: fine for a train step (already
differentiated), and for a forward function the rule being dropped is that of code that
contains a convolution, whose plain derivative is the same mathematics.

Not rewritten (the original primitive is bound, :func:`conv_report` says which and why):
grouped convolutions (``feature_group_count`` or ``batch_group_count`` > 1, e.g. depthwise
ones); convolutions of integer operands.

Two ways of extracting patches: ``"slices"`` (default; one strided slice per window offset
or per output position, whichever is fewer: pure data movement) and ``"patches"``
(``jax.lax.conv_general_dilated_patches``: a convolution with a constant 0/1 kernel, which
XLA CPU runs as a grouped convolution doing ``prod(window)`` times the useful work, and
which for a weight-gradient convolution, whose window is the whole feature map, is
prohibitive; there ``"slices"`` is used whatever is asked).

Example::

    step = make_train_step(task)
    batched = jax.jit(jax.vmap(patch_convs(step)))   # states [C, ...], batches [C, B, ...]
    states, metrics = batched(states, batches)
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# --------------------------------------------------------------------------- JAX internals
# Every use of JAX's internal jaxpr API is here, so that a JAX release that moves it is
# mended in one place (checked on JAX 0.10.2 and 0.11.2).
try:
  from jax.extend.core import Literal as _Literal, jaxprs_in_params as _jaxprs_in_params
except ImportError:  # older JAX
  from jax.core import Literal as _Literal, jaxprs_in_params as _jaxprs_in_params  # type: ignore

_JIT = ("jit", "pjit")  # the jit primitive was called pjit before JAX 0.7
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}
_REMAT = ("checkpoint", "remat", "remat2")  # jax.checkpoint's primitive, by JAX release
EXTRACT = ("gather", "patches")


def _is_literal(v) -> bool:
  return isinstance(v, _Literal)


def _is_drop(v) -> bool:
  return type(v).__name__ == "DropVar"


def _split_closed(j) -> tuple[Any, Sequence]:
  """(open jaxpr, consts) of a ClosedJaxpr or an open Jaxpr (whose consts are none)."""
  return (j.jaxpr, j.consts) if hasattr(j, "consts") else (j, ())


def _bind(eqn, invals):
  """The equation's own primitive on ``invals`` (as ``jax.core.eval_jaxpr`` binds it)."""
  bound = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bound if isinstance(bound, tuple) else ((), bound)  # a (subfuns, params) pair before JAX 0.7
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  with ctx if ctx is not None else contextlib.nullcontext():
    return eqn.primitive.bind(*subfuns, *invals, **params)


# --------------------------------------------------------------------------- the rewrite
def _out_size(n: int, k: int, stride: int, rdil: int) -> int:
  span = (k - 1) * rdil + 1
  return (n - span) // stride + 1 if n >= span else 0


def _pad_dilate(x, axes, padding, dilation):
  """``x`` zero-padded by ``padding`` (lo, hi pairs, may be negative) and dilated by ``dilation``
  (``dilation - 1`` zeros between elements) along ``axes``."""
  cfg = [(0, 0, 0)] * x.ndim
  for a, (lo, hi), dl in zip(axes, padding, dilation):
    cfg[a] = (lo, hi, dl - 1)
  if all(c == (0, 0, 0) for c in cfg):
    return x
  return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _positions(grid, first, firstmul, second, secondmul):
  """Flat positions in a row-major spatial ``grid`` of ``i * firstmul + j * secondmul`` (per
  dimension) for every multi-index i over ``first`` then j over ``second``: shape
  ``first + second``."""
  d = len(grid)
  pos = np.zeros(tuple(first) + tuple(second), np.int32)
  stride = 1
  for ax in reversed(range(d)):
    shape = [1] * (2 * d)
    i = np.arange(first[ax]).reshape(shape[:ax] + [-1] + shape[ax + 1:]) * firstmul[ax]
    j = np.arange(second[ax]).reshape(shape[:d + ax] + [-1] + shape[d + ax + 1:]) * secondmul[ax]
    pos = pos + (i + j) * stride
    stride *= grid[ax]
  return pos


def _take(x, pos):
  """``x[:, pos, :]`` on a ``[A, S_flat, B]`` array: one gather of contiguous rows."""
  # the positions are in bounds by construction: no clamping or fill in the gather
  rows = x.at[:, pos.reshape(-1)].get(mode="promise_in_bounds")
  return rows.reshape(x.shape[0], *pos.shape, x.shape[2])


def _window_sum(y, axes, window_axes, window, strides, rdil, out_sp):
  """``sum_k y[..., o * stride + k * rdil (on axes), k (on window_axes), ...]``: the sum over
  the window of strided slices; the window axes are dropped."""
  total = None
  for k in itertools.product(*(range(w) for w in window)):
    start, limit, step = [0] * y.ndim, list(y.shape), [1] * y.ndim
    for a, ki, st, r, o in zip(axes, k, strides, rdil, out_sp):
      start[a], limit[a], step[a] = ki * r, ki * r + (o - 1) * st + 1, st
    for a, ki in zip(window_axes, k):
      start[a], limit[a] = ki, ki + 1
    part = lax.slice(y, start, limit, step)
    part = part.reshape([n for a, n in enumerate(part.shape) if a not in window_axes])
    total = part if total is None else total + part
  return total


def _shifted_sum(y, padding, dilation, window, strides, rdil):
  """``[N, S..., K..., F]`` -> ``[N, O..., F]``: ``out[o] = sum_k yd[o * stride + k * rdil, k]``,
  ``yd`` being ``y`` padded and dilated along S (col2im). With unit strides each window
  offset's term is one pad (XLA fuses the pads and adds into one loop over the output);
  otherwise ``y`` is padded once and strided slices are summed."""
  d = len(window)
  sp, sizes = range(1, d + 1), [(s - 1) * dl + 1 + lo + hi for s, dl, (lo, hi) in zip(y.shape[1:d + 1], dilation,
                                                                                        padding)]
  out_sp = tuple(_out_size(s, k, st, r) for s, k, st, r in zip(sizes, window, strides, rdil))
  if any(st != 1 for st in strides):
    yd = _pad_dilate(y, sp, padding, dilation)
    return _window_sum(yd, sp, range(d + 1, 2 * d + 1), window, strides, rdil, out_sp)
  total = None
  for k in itertools.product(*(range(w) for w in window)):
    part = y[(slice(None),) * (d + 1) + k]  # [N, S..., F]
    pads = [(lo - ki * r, o - ((s - 1) * dl + 1) - (lo - ki * r)) for (lo, _), ki, r, o, s, dl
            in zip(padding, k, rdil, out_sp, y.shape[1:d + 1], dilation)]
    part = _pad_dilate(part, sp, pads, dilation)
    total = part if total is None else total + part
  return total


def conv_form(lhs_shape, rhs_shape, params) -> str:
  """How :func:`conv_as_matmul` computes a convolution: ``"im2col"`` (gather the input's
  windows, then one matmul) or ``"col2im"`` (one matmul of every input position with the
  whole kernel, then a sum of shifted slices). col2im skips the zeros of padding and of lhs
  dilation in the matmul, so it wins where the output has more positions than the input
  (an input-gradient convolution, a transposed convolution); otherwise im2col."""
  lhs_spec, rhs_spec, _ = params["dimension_numbers"]
  in_sp = [lhs_shape[a] for a in lhs_spec[2:]]
  window = [rhs_shape[a] for a in rhs_spec[2:]]
  sizes = [(s - 1) * ld + 1 + lo + hi for s, ld, (lo, hi) in zip(in_sp, params["lhs_dilation"], params["padding"])]
  out_sp = [_out_size(s, k, st, r) for s, k, st, r in zip(sizes, window, params["window_strides"],
                                                           params["rhs_dilation"])]
  return "col2im" if math.prod(in_sp) < math.prod(out_sp) else "im2col"


def conv_as_matmul(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   precision=None, preferred_element_type=None, extract: str = "gather", form: str | None = None):
  """``lax.conv_general_dilated`` (``feature_group_count = batch_group_count = 1``, explicit
  padding) as a gather of patches and one ``dot_general`` (im2col), or as one ``dot_general``
  and a sum of shifted slices (col2im); ``form`` None picks by :func:`conv_form`."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  d = len(lhs_spec) - 2
  params = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers)
  form = form or conv_form(lhs.shape, rhs.shape, params)
  window = tuple(rhs.shape[a] for a in rhs_spec[2:])
  n_ax, c_ax, sp_ax = lhs_spec[0], lhs_spec[1], tuple(lhs_spec[2:])
  dot = functools.partial(lax.dot_general, precision=precision, preferred_element_type=preferred_element_type)
  if form == "col2im":
    w = jnp.transpose(rhs, (rhs_spec[1], *rhs_spec[2:], rhs_spec[0]))  # [C, K..., F]
    x = jnp.transpose(lhs, (n_ax, *sp_ax, c_ax))  # [N, S..., C]
    y = dot(x, w, (((d + 1,), (0,)), ((), ())))  # [N, S..., K..., F]
    out = _shifted_sum(y, padding, lhs_dilation, window, window_strides, rhs_dilation)
    layout = (0, d + 1, *range(1, d + 1))  # [N, O..., F] -> [N, F, O...]
  else:
    # The gather reads rows that are contiguous in memory: channels-last when the batch
    # axis comes first, else batch-last. The latter is a weight-gradient convolution (its
    # "batch" is the input feature axis, its "features" the batch, its window the output's
    # size): it then gathers the very patches of the forward convolution, which XLA computes
    # once, and contracts them over their leading (major) axes with the output gradient as
    # the first operand, so that only that small operand is transposed.
    batch_last = n_ax > c_ax
    x = jnp.transpose(lhs, (c_ax, *sp_ax, n_ax) if batch_last else (n_ax, *sp_ax, c_ax))
    x = _pad_dilate(x, range(1, d + 1), padding, lhs_dilation)
    grid = x.shape[1:d + 1]
    out_sp = tuple(_out_size(s, k, st, r) for s, k, st, r in zip(grid, window, window_strides, rhs_dilation))
    one = math.prod(window) == 1 and all(s == 1 for s in window_strides) and tuple(grid) == tuple(out_sp)
    if batch_last:
      w = jnp.transpose(rhs, (rhs_spec[1], *rhs_spec[2:], rhs_spec[0]))  # [C, K..., F]
      if one:  # a 1x1 convolution is a matmul already
        p = x.reshape(x.shape[0], *([1] * d), *x.shape[1:])
      else:
        pos = _positions(grid, window, rhs_dilation, out_sp, window_strides)  # [K..., O...]
        p = _take(x.reshape(x.shape[0], -1, x.shape[-1]), pos)  # [C, K..., O..., N]
      out = dot(w, p, ((tuple(range(d + 1)), tuple(range(d + 1))), ((), ())))  # [F, O..., N]
      layout = (d + 1, 0, *range(1, d + 1))
    else:
      w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # [K..., C, F]
      if one:
        p = x.reshape(*x.shape[:d + 1], *([1] * d), x.shape[-1])
      elif extract == "patches":
        # columns of conv_general_dilated_patches: feature-major (C slowest), then the window
        p = lax.conv_general_dilated_patches(jnp.moveaxis(x, -1, 1), window, window_strides, [(0, 0)] * d, None,
                                             rhs_dilation, precision=precision)  # [N, C*K, O...]
        p = jnp.moveaxis(p.reshape(p.shape[0], x.shape[-1], *window, *out_sp), 1, -1)
        p = jnp.moveaxis(p, range(1, d + 1), range(d + 1, 2 * d + 1))  # [N, O..., K..., C]
      else:
        pos = _positions(grid, out_sp, window_strides, window, rhs_dilation)  # [O..., K...]
        p = _take(x.reshape(x.shape[0], -1, x.shape[-1]), pos)  # [N, O..., K..., C]
      out = dot(p, w, ((tuple(range(d + 1, 2 * d + 2)), tuple(range(d + 1))), ((), ())))  # [N, O..., F]
      layout = (0, d + 1, *range(1, d + 1))
  canon = jnp.transpose(out, layout)  # [N, F, O...]
  return jnp.transpose(canon, np.argsort(out_spec))


def _unsupported(params, lhs, rhs) -> str | None:
  """Why a convolution stays a convolution (None: it is rewritten)."""
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    return (f"grouped (feature_group_count={params['feature_group_count']}, "
            f"batch_group_count={params['batch_group_count']})")
  if not (jnp.issubdtype(lhs.dtype, jnp.floating) and jnp.issubdtype(rhs.dtype, jnp.floating)):
    return f"non-float operands ({lhs.dtype}, {rhs.dtype})"
  return None


def _conv_rule(eqn, invals, extract):
  p = eqn.params
  lhs, rhs = invals
  if _unsupported(p, lhs, rhs):
    return _bind(eqn, invals)
  out = conv_as_matmul(lhs, rhs, window_strides=p["window_strides"], padding=p["padding"],
                       lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
                       dimension_numbers=p["dimension_numbers"], precision=p.get("precision"),
                       preferred_element_type=p.get("preferred_element_type"), extract=extract)
  return out.astype(eqn.outvars[0].aval.dtype)


# --------------------------------------------------------------------------- the interpreter
@functools.lru_cache(maxsize=4096)
def _has_conv(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      return True
    if any(_has_conv(sub) for sub in _jaxprs_in_params(eqn.params)):
      return True
  return False


def _eval_jaxpr(jaxpr, consts, args, extract):
  env: dict = {}

  def read(v):
    return v.val if _is_literal(v) else env[v]

  def write(v, x):
    if not _is_drop(v):
      env[v] = x

  for v, x in zip(jaxpr.constvars, consts):
    write(v, x)
  for v, x in zip(jaxpr.invars, args):
    write(v, x)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    outs = _eval_eqn(eqn, invals, extract)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      write(v, x)
  return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, invals, extract):
  name = eqn.primitive.name
  if name == "conv_general_dilated":
    return _conv_rule(eqn, invals, extract)
  subs = list(_jaxprs_in_params(eqn.params))
  if not subs or not any(_has_conv(s) for s in subs):
    return _bind(eqn, invals)
  ev = functools.partial(_eval_closed, extract=extract)
  if name in _CALLS and _CALLS[name] in eqn.params:
    return ev(eqn.params[_CALLS[name]], invals)
  if name in _REMAT:  # rebuilt, so that a later differentiation still rematerialises
    p = eqn.params
    return jax.checkpoint(lambda *a: ev(p["jaxpr"], a), prevent_cse=p.get("prevent_cse", True),
                          policy=p.get("policy"))(*invals)
  if name == "scan":
    return _scan(eqn, invals, ev)
  if name == "cond":
    branches = eqn.params["branches"]
    return lax.switch(invals[0], [functools.partial(lambda b, *ops: ev(b, ops), b) for b in branches], *invals[1:])
  if name == "while":
    return _while(eqn, invals, ev)
  raise NotImplementedError(f"patch_convs: a convolution inside primitive {name!r} is not supported")


def _eval_closed(closed, args, extract):
  jaxpr, consts = _split_closed(closed)
  return _eval_jaxpr(jaxpr, consts, list(args), extract)


def _scan(eqn, invals, ev):
  p = eqn.params
  nc, ncarry = p["num_consts"], p["num_carry"]
  consts, init, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]

  def body(carry, x):
    out = ev(p["jaxpr"], [*consts, *carry, *x])
    return out[:ncarry], out[ncarry:]

  carry, ys = lax.scan(body, init, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
  return [*carry, *ys]


def _while(eqn, invals, ev):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  return lax.while_loop(lambda c: ev(p["cond_jaxpr"], [*cconsts, *c])[0],
                        lambda c: ev(p["body_jaxpr"], [*bconsts, *c]), init)


def patch_convs(fn: Callable, extract: str = "gather") -> Callable:
  """``fn`` with every (ungrouped, floating-point) convolution it traces, forward and
  backward, computed as patch extraction plus a matmul (see the module docstring).

  The result takes the same positional pytree arguments, returns the same pytree and is
  equal to ``fn`` to float rounding (the sums run in another order). Compose it with
  ``jax.vmap`` (inside) and ``jax.jit`` (outside) as any function; it traces ``fn`` at
  each trace of its own. ``extract``: ``"slices"`` or ``"patches"`` (see the module
  docstring).

  Example::

      fast = jax.jit(jax.vmap(patch_convs(make_train_step(task))))
  """
  if extract not in EXTRACT:
    raise ValueError(f"unknown extract {extract!r}; valid: {', '.join(EXTRACT)}")

  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out = _eval_jaxpr(closed.jaxpr, closed.consts, jax.tree.leaves(args), extract)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped


def conv_report(fn: Callable, *args) -> list[dict]:
  """Every convolution ``fn(*args)`` traces: shapes, and whether :func:`patch_convs`
  rewrites it (``"why"``: the reason where it does not)."""
  rows = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval for v in eqn.invars)
        why = _unsupported(eqn.params, lhs, rhs)
        rows.append({"lhs": tuple(lhs.shape), "rhs": tuple(rhs.shape), "out": tuple(eqn.outvars[0].aval.shape),
                     "rewritten": why is None, "why": why})
      for sub in _jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return rows
