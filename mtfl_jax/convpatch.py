"""Convolutions as patches and matmuls: a function transform that lets ``jax.vmap`` batch clients.

Why: under ``jax.vmap`` over clients, each with its own weights, a convolution becomes one
*grouped* convolution (``feature_group_count`` = clients), which XLA CPU runs slowly, so the
simulator had to run convolutional clients one after another. :func:`patch_convs` rewrites
every ``conv_general_dilated`` of a traced function (the forward convolutions, and the two
that autodiff makes of each: the input gradient, with lhs dilation and swapped kernel
dimensions, and the weight gradient, whose "kernel" is the output gradient) as

    patches = the input's windows, stacked  (strided slices of the padded, dilated input)
    out     = dot_general(kernel, patches)  (contracting input features x window)

(im2col), or, where the output has more positions than the input (an input gradient, a
transposed convolution), as one matmul of every input position with the whole kernel and a
sum of shifted slices (col2im: the padding and dilation zeros never enter the matmul). The
patch extraction has no weights, so vmap folds the clients into it; the weights meet the
data only in ``dot_general``, which vmap turns into a *batched matmul* with the clients as
its batch dimension. Average pooling (``reduce_window_sum``) and its gradient become a
reshape-sum or a sum of slices too (XLA CPU's reduce-window is slow at these sizes).

How: the function is traced to a jaxpr (``jax.make_jaxpr``) and evaluated equation by
equation; ``conv_general_dilated`` and ``reduce_window_sum`` equations are replaced, every
other primitive is bound as it was. Sub-jaxprs (``jit``, ``closed_call``,
``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``, ``scan``, ``cond``, ``while``) that
hold one are evaluated by the same interpreter (call-like ones inlined, ``checkpoint``
rebuilt; control flow rebuilt with ``lax.scan``, ``lax.switch``, ``lax.while_loop``); those
without one are bound unchanged. Inlining a custom-derivative call drops its custom rule:
fine for a train step (already differentiated); for a forward function, the dropped rule is
that of code holding a convolution, whose plain derivative is the same mathematics.

Not rewritten (the original primitive is bound; :func:`conv_report` says which and why):
grouped convolutions (``feature_group_count`` or ``batch_group_count`` > 1, e.g. depthwise
ones); convolutions of integer operands; overlapping pooling windows of more than
:data:`MAX_WINDOW_SLICES` elements.

Two ways of extracting patches (``extract``): ``"slices"`` (default: strided slices, one
spatial dimension at a time) and ``"patches"`` (``lax.conv_general_dilated_patches``: a
convolution with a constant 0/1 kernel, grouped over the input features, so XLA CPU does
``prod(window)`` times the useful work; kept to be measured against). A weight-gradient
convolution, whose window is the whole feature map, always uses slices.

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
EXTRACT = ("slices", "patches")


def _is_literal(v) -> bool:
  return isinstance(v, _Literal)


def _is_drop(v) -> bool:
  return type(v).__name__ == "DropVar"


def _split_closed(j) -> tuple[Any, Sequence]:
  """(open jaxpr, consts) of a ClosedJaxpr or an open Jaxpr (whose consts are none)."""
  return (j.jaxpr, j.consts) if hasattr(j, "consts") else (j, ())


def _scan_operands(params, args) -> tuple[list, list, list]:
  """(consts, initial carry, xs) of a ``scan`` equation's operands: counted by ``num_consts``
  and ``num_carry`` before JAX 0.11, by the flat-tree ``ft_in`` from 0.11 on."""
  if "num_consts" in params:
    nc, ncarry = params["num_consts"], params["num_carry"]
    return list(args[:nc]), list(args[nc:nc + ncarry]), list(args[nc + ncarry:])
  consts, carry, xs = params["ft_in"].update(list(args)).unpack()
  return list(consts), list(carry), list(xs)


def _bind(eqn, invals):
  """The equation's own primitive on ``invals`` (as ``jax.core.eval_jaxpr`` binds it)."""
  bound = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = bound if isinstance(bound, tuple) else ((), bound)  # a (subfuns, params) pair before JAX 0.7
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  with ctx if ctx is not None else contextlib.nullcontext():
    return eqn.primitive.bind(*subfuns, *invals, **params)


# --------------------------------------------------------------------------- the rewrite
# Layout. XLA CPU runs a matmul fastest with its long dimension minor (vectorised) and both
# operands in their natural row-major layout (a transposed operand is copied first). So the
# rewrite works feature-major: the input as [C, N, S...], patches as [K, C, N, O...] (each
# window offset's slice a contiguous block: no gather), and the matmul as
# ``W^T [F, K*C] @ P [K*C, N*O] -> [F, N*O]``; the result is transposed back once. A weight
# gradient then contracts the forward convolution's own patches with the output gradient
# in its natural layout, and XLA computes those patches once for both.
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


def _windows(x, first, firstmul, second, secondmul):
  """``[A, B, S...]`` -> ``[prod(first), A, B, second...]``: for each multi-index i over
  ``first``, the strided slice ``x[..., i * firstmul + j * secondmul]`` over j in ``second``
  (per spatial dimension). The patches of a convolution are ``first`` = window offsets,
  ``second`` = output positions (or the reverse: the same slices).

  One spatial dimension at a time (a 5x5 window: 5 + 5 slices, not 25), each dimension's
  slices stacked on a new leading axis: XLA CPU copies these in contiguous runs, and runs
  this 2-5x faster than one gather or 25 slices stacked at once (measured on LeNet's)."""
  d = len(first)
  for j in range(d):
    parts = []
    for i in range(first[j]):
      start = [0] * x.ndim
      limit, step = list(x.shape), [1] * x.ndim
      a = j + 2 + j  # spatial dimension j: after the j axes stacked so far and A, B
      start[a] = i * firstmul[j]
      limit[a] = start[a] + (second[j] - 1) * secondmul[j] + 1
      step[a] = secondmul[j]
      parts.append(lax.slice(x, start, limit, step))
    x = jnp.stack(parts, axis=j)
  return x.reshape(-1, *x.shape[d:])


def _patches_conv(x, window, strides, rdil):
  """The same ``[K, C, N, O...]`` patches as :func:`_windows` (``first`` = the window) from
  ``lax.conv_general_dilated_patches``: a convolution with a constant 0/1 kernel, grouped over
  the input features."""
  c, n = x.shape[:2]
  p = lax.conv_general_dilated_patches(jnp.swapaxes(x, 0, 1), window, strides, [(0, 0)] * len(window),
                                       None, rdil)  # [N, C*K, O...], C the slowest
  p = p.reshape(n, c, math.prod(window), *p.shape[2:])
  return jnp.transpose(p, (2, 1, 0, *range(3, p.ndim)))


def _shifted_sum(y, padding, dilation, window, strides, rdil):
  """col2im: ``[K..., F, N, S...]`` -> ``[F, N, O...]``, ``out[o] = sum_k yd[k, o * stride + k
  * rdil]`` with ``yd`` = ``y`` padded and dilated along S. With unit strides each window
  offset's term is one pad of a contiguous block (XLA fuses the pads and adds into one loop
  over the output); otherwise ``y`` is padded once and strided slices are summed."""
  d = len(window)
  in_sp = y.shape[d + 2:]
  sp = range(2, d + 2)
  sizes = [(s - 1) * dl + 1 + lo + hi for s, dl, (lo, hi) in zip(in_sp, dilation, padding)]
  out_sp = tuple(_out_size(s, k, st, r) for s, k, st, r in zip(sizes, window, strides, rdil))
  total = None
  for k in itertools.product(*(range(w) for w in window)):
    part = y[k]  # [F, N, S...]
    if all(st == 1 for st in strides):
      pads = [(lo - ki * r, o - ((s - 1) * dl + 1) - (lo - ki * r)) for (lo, _), ki, r, o, s, dl
              in zip(padding, k, rdil, out_sp, in_sp, dilation)]
      part = _pad_dilate(part, sp, pads, dilation)
    else:
      part = _pad_dilate(part, sp, padding, dilation)
      start = (0, 0) + tuple(ki * r for ki, r in zip(k, rdil))
      limit = part.shape[:2] + tuple(s0 + (o - 1) * st + 1 for s0, o, st in zip(start[2:], out_sp, strides))
      part = lax.slice(part, start, limit, (1, 1) + tuple(strides))
    total = part if total is None else total + part
  return total


def conv_form(lhs_shape, rhs_shape, params) -> str:
  """How :func:`conv_as_matmul` computes a convolution: ``"im2col"`` (the input's windows as
  patches, then one matmul) or ``"col2im"`` (one matmul of every input position with the whole
  kernel, then a sum of shifted slices). col2im skips the zeros of padding and of lhs
  dilation in the matmul, so it wins where the output has more positions than the input (an
  input-gradient convolution, a transposed convolution); otherwise im2col."""
  lhs_spec, rhs_spec, _ = params["dimension_numbers"]
  in_sp = [lhs_shape[a] for a in lhs_spec[2:]]
  window = [rhs_shape[a] for a in rhs_spec[2:]]
  sizes = [(s - 1) * ld + 1 + lo + hi for s, ld, (lo, hi) in zip(in_sp, params["lhs_dilation"], params["padding"])]
  out_sp = [_out_size(s, k, st, r) for s, k, st, r in zip(sizes, window, params["window_strides"],
                                                           params["rhs_dilation"])]
  return "col2im" if math.prod(in_sp) < math.prod(out_sp) else "im2col"


def conv_as_matmul(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   precision=None, preferred_element_type=None, extract: str = "slices", form: str | None = None):
  """``lax.conv_general_dilated`` (``feature_group_count = batch_group_count = 1``, explicit
  padding) as patches and one ``dot_general`` (im2col), or one ``dot_general`` and a sum of
  shifted slices (col2im); ``form`` None picks by :func:`conv_form`. ``extract``: patches by
  ``"slices"`` or by ``lax.conv_general_dilated_patches`` (``"patches"``)."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  d = len(lhs_spec) - 2
  params = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers)
  form = form or conv_form(lhs.shape, rhs.shape, params)
  window = tuple(rhs.shape[a] for a in rhs_spec[2:])
  n_ax, c_ax, sp_ax = lhs_spec[0], lhs_spec[1], tuple(lhs_spec[2:])
  sp = range(2, d + 2)
  dot = functools.partial(lax.dot_general, precision=precision, preferred_element_type=preferred_element_type)
  if form == "col2im":
    x = jnp.transpose(lhs, (c_ax, n_ax, *sp_ax))  # [C, N, S...]
    w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[0], rhs_spec[1]))  # [K..., F, C]
    y = dot(w, x, (((d + 1,), (0,)), ((), ())))  # [K..., F, N, S...]
    out = _shifted_sum(y, padding, lhs_dilation, window, window_strides, rhs_dilation)  # [F, N, O...]
    canon = jnp.swapaxes(out, 0, 1)
  elif n_ax < c_ax:  # the batch axis before the features: a forward-like convolution
    x = _pad_dilate(jnp.transpose(lhs, (c_ax, n_ax, *sp_ax)), sp, padding, lhs_dilation)  # [C, N, S...]
    out_sp = tuple(_out_size(s, k, st, r) for s, k, st, r in zip(x.shape[2:], window, window_strides, rhs_dilation))
    if extract == "patches":
      p = _patches_conv(x, window, window_strides, rhs_dilation)
    else:
      p = _windows(x, window, rhs_dilation, out_sp, window_strides)  # [K, C, N, O...]
    w = jnp.transpose(rhs, (rhs_spec[0], *rhs_spec[2:], rhs_spec[1]))  # [F, K..., C]
    w = w.reshape(w.shape[0], -1, w.shape[-1])
    out = dot(w, p, (((1, 2), (0, 1)), ((), ())))  # [F, N, O...]
    canon = jnp.swapaxes(out, 0, 1)
  else:
    # The batch axis after the features: a weight gradient (its "batch" is the input's
    # feature axis, its "features" the batch, its window the output's size, its output
    # positions the kernel's). Its windows are the forward convolution's patches: the same
    # transpose, pad and slices (window offsets and output positions swap roles), which XLA
    # then computes once for both.
    x = _pad_dilate(jnp.transpose(lhs, (n_ax, c_ax, *sp_ax)), sp, padding, lhs_dilation)  # [N, C, S...]
    out_sp = tuple(_out_size(s, k, st, r) for s, k, st, r in zip(x.shape[2:], window, window_strides, rhs_dilation))
    p = _windows(x, out_sp, window_strides, window, rhs_dilation)  # [O, N, C, K...]
    w = jnp.transpose(rhs, (rhs_spec[1], *rhs_spec[2:], rhs_spec[0]))  # [C, K..., F]
    out = dot(p, w, ((tuple(range(2, d + 3)), tuple(range(d + 1))), ((), ())))  # [O, N, F]
    out = out.reshape(*out_sp, *out.shape[1:])  # [O..., N, F]
    canon = jnp.transpose(out, (d, d + 1, *range(d)))
  return jnp.transpose(canon, np.argsort(out_spec))  # canon: [N, F, O...]


def window_sum_as_slices(x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation):
  """``lax.reduce_window`` with ``add`` (``reduce_window_sum``: average pooling and its
  gradient) without XLA's reduce-window: non-overlapping windows as a reshape and a sum,
  others as the sum of the window's strided slices of the padded, dilated input."""
  d = x.ndim
  if (tuple(window_dimensions) == tuple(window_strides) and all(lo == hi == 0 for lo, hi in padding)
      and all(b == 1 for b in base_dilation) and all(w == 1 for w in window_dilation)
      and all(n % w == 0 for n, w in zip(x.shape, window_dimensions))):
    split = [v for n, w in zip(x.shape, window_dimensions) for v in (n // w, w)]
    return x.reshape(split).sum(axis=tuple(range(1, 2 * d, 2)))
  xp = _pad_dilate(x, range(d), padding, base_dilation)
  out = tuple(_out_size(n, w, st, r) for n, w, st, r in zip(xp.shape, window_dimensions, window_strides,
                                                           window_dilation))
  total = None
  for k in itertools.product(*(range(w) for w in window_dimensions)):
    start = tuple(ki * r for ki, r in zip(k, window_dilation))
    limit = tuple(s0 + (o - 1) * st + 1 for s0, o, st in zip(start, out, window_strides))
    part = lax.slice(xp, start, limit, tuple(window_strides))
    total = part if total is None else total + part
  return total


# windows of more elements stay XLA's reduce-window (the slices' sum would grow with them)
MAX_WINDOW_SLICES = 16


def _window_sum_rule(eqn, invals):
  p = eqn.params
  (x,) = invals
  overlapping = tuple(p["window_dimensions"]) != tuple(p["window_strides"])
  if overlapping and math.prod(p["window_dimensions"]) > MAX_WINDOW_SLICES:
    return _bind(eqn, invals)
  return window_sum_as_slices(x, window_dimensions=p["window_dimensions"], window_strides=p["window_strides"],
                              padding=p["padding"], base_dilation=p["base_dilation"],
                              window_dilation=p["window_dilation"]).astype(eqn.outvars[0].aval.dtype)


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
    if eqn.primitive.name in ("conv_general_dilated", "reduce_window_sum"):
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
  if name == "reduce_window_sum":
    return _window_sum_rule(eqn, invals)
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
  consts, init, xs = _scan_operands(p, invals)
  ncarry = len(init)

  def body(carry, x):
    out = ev(p["jaxpr"], [*consts, *carry, *x])  # the body's outputs: the carry, then ys
    return out[:ncarry], out[ncarry:]

  carry, ys = lax.scan(body, init, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
  return [*carry, *ys]


def _while(eqn, invals, ev):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  return lax.while_loop(lambda c: ev(p["cond_jaxpr"], [*cconsts, *c])[0],
                        lambda c: ev(p["body_jaxpr"], [*bconsts, *c]), init)


def patch_convs(fn: Callable, extract: str = "slices") -> Callable:
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
