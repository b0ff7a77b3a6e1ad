"""A task's clients batched into one program, over a ``clients`` mesh of one or more devices.

The clients of a round are padded to a multiple of the device count and streamed through the
mesh in *chunks* of ``k`` clients per device (``jax.sharding`` + ``shard_map``): each device
trains its ``k`` clients (``vmap``-ed, or one after another in one program) and adds their
weighted outputs to its running sums; at the end one compiled reduction adds the devices'
sums over the ``clients`` axis (``psum``), so only the aggregate leaves the devices and a round
has one collective per task. With ``w_c`` the server's weight of client ``c`` for an output,

    sum = psum_devices sum_{chunks} sum_{c in the device's part of the chunk} w_c output_c

Memory stays bounded by the chunk, not the round: batches are gathered on the device from the
task's training set (placed once on every device) by index, so a round of 1,000 clients never
holds 1,000 clients' batches or states at once.

Compilation: programs depend on the chunk shape only. ``k`` is fixed by the first round (or
``clients_hint``); the host loops over local steps, masked for clients that are done, and
sends the batch indices in windows of :data:`WINDOW` steps, so a new largest workload, or a
round with fewer clients, compiles nothing: after the first round a run compiles no program.

Multi-process (``jax.distributed``): the mesh spans every process's devices; each process
builds only its own devices' share of the per-client inputs, the collectives run over gloo
(CPU) or NCCL (GPU), and every process gets the same aggregate.

Example::

    ex = BatchedExecutor(fed.tasks[0], fedavg_program(task), client_mesh(2))
    agg = ex.run(broadcast, works, {"delta": p, "model_state": q})
    agg.sums["delta"]     # sum_c p_c delta_c, numpy, on every process
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtfl_jax.convpatch import patch_convs
from mtfl_jax.federated.client import client_keys, masked, work_batch_ids
from mtfl_jax.federated.executors.base import (Aggregate, ClientExecutor, all_finite, check_weights)
from mtfl_jax.train import has_convolution

CLIENTS = "clients"
# How a device runs its clients of a chunk (mtfl_jax.client_layouts' names): one vmapped
# program, the clients one after another in one program, or a lax.map over them; each with
# the step's convolutions as patches and matmuls ("_patch": mtfl_jax.convpatch).
INNER = ("vmap", "unrolled", "map", "vmap_patch", "unrolled_patch", "map_patch")
# Clients per device per chunk (a cap; fewer when the first round has fewer clients).
K_MAX = {"vmap": 64, "unrolled": 2, "map": 25}
# Local steps whose batch indices go to the devices at once.
WINDOW = 16

try:
  _shard_map = jax.shard_map
  _NO_CHECK = {"check_vma": False}
except AttributeError:  # JAX < 0.6
  from jax.experimental.shard_map import shard_map as _shard_map
  _NO_CHECK = {"check_rep": False}


def client_mesh(devices: int | Sequence | None = None) -> Mesh:
  """A 1-D mesh with axis ``clients`` over ``devices``: a count (the first ``devices`` of
  :func:`jax.devices`, which spans every process of a ``jax.distributed`` run), a list of
  devices, or None for all of them. A count above what exists is a ``ValueError`` saying how
  to get more CPU devices."""
  avail = jax.devices()
  if devices is None:
    devs = avail
  elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    if not 1 <= devices <= len(avail):
      raise ValueError(
          f"asked for {devices} devices but JAX sees {len(avail)} ({avail[0].platform}); on a CPU, "
          f"start Python with XLA_FLAGS=--xla_force_host_platform_device_count={devices} (or use "
          "`python -m mtfl_jax federate --devices N`, which sets it)")
    devs = avail[:devices]
  else:
    devs = list(devices)
  if jax.process_count() > 1 and {d.process_index for d in devs} != set(range(jax.process_count())):
    raise ValueError("a multi-process mesh must hold devices of every process; use all devices")
  return Mesh(np.array(devs), (CLIENTS,))


def global_array(host, sharding: NamedSharding) -> jax.Array:
  """A host array as a global ``jax.Array`` with ``sharding``; each process touches only the
  slices its own devices hold."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x) -> np.ndarray:
  """A replicated (global) array as numpy on this process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _pow2(n: int, lo: int = 1) -> int:
  return max(lo, 1 << max(0, int(n) - 1).bit_length())


class BatchedExecutor(ClientExecutor):
  """Runs one task's clients in chunks over a ``clients`` mesh (see the module docstring).

  ``inner``: how a device runs its clients of a chunk (:data:`INNER`): ``"vmap"`` (one batched
  program: good for dense models), ``"unrolled"`` (one client after another in one program,
  each step a plain, unbatched program: XLA CPU turns vmapped convolutions into slow grouped
  ones), ``"map"`` (``lax.map`` over the clients), each optionally ``_patch``ed (convolutions
  as patches and matmuls, which batch). None: on a CPU, ``unrolled`` for a task with
  convolutions, else ``vmap``; on accelerators ``vmap``. ``simulator="auto"`` chooses by
  measurement (:func:`mtfl_jax.calibration.load_or_choose_layout`).
  ``per_device``: cap on clients per device per chunk (memory grows with it). ``unroll``:
  local steps per dispatched program (unrolled; masked past a client's last step).
  ``clients_hint``: the usual number of clients per round, which fixes the chunk size (else
  the first round's count does).
  """

  def __init__(self, fed_task, program, mesh: Mesh | None = None, inner: str | None = None,
               per_device: int | None = None, unroll: int = 1, clients_hint: int | None = None, **options):
    self.program, self.batch_size = program, fed_task.batch_size
    self.mesh = mesh if mesh is not None else client_mesh(1)
    if unroll not in (1, 2, 4, 8, 16):
      raise ValueError(f"unroll must be 1, 2, 4, 8 or 16 (it divides the {WINDOW}-step window), got {unroll!r}")
    self.unroll = unroll
    cpu = self.mesh.devices.flat[0].platform == "cpu"
    self.inner = inner or ("unrolled" if cpu and has_convolution(fed_task.task) else "vmap")
    if self.inner not in INNER:
      raise ValueError(f"unknown inner mode {self.inner!r}; valid: {', '.join(INNER)}")
    self.kind, _, patch = self.inner.partition("_")
    self.patch = bool(patch)
    self.k_max = int(per_device or K_MAX[self.kind])
    if self.k_max < 1:
      raise ValueError(f"per_device must be >= 1, got {per_device!r}")
    self.devices = self.mesh.devices.size
    self.name = f"batched-{self.inner}" + (f" over {self.devices} devices" if self.devices > 1 else "")
    self._rep = NamedSharding(self.mesh, P())
    self._shd = NamedSharding(self.mesh, P(CLIENTS))
    self.x = global_array(fed_task.data.x_train, self._rep)
    self.y = global_array(fed_task.data.y_train, self._rep)
    self._steps: dict = {}
    self.k: int | None = None  # clients per device per chunk, fixed by clients_hint or the first round
    if clients_hint:
      self.chunk_size(int(clients_hint))
    self._programs: dict = {}

  def close(self) -> None:
    self._programs.clear()
    self._steps.clear()
    self.x = self.y = None

  # ------------------------------------------------------------------ programs
  def _program(self, kind: str, k: int):
    key = (kind, k)
    if key not in self._programs:
      self._programs[key] = getattr(self, f"_build_{kind}")(k)
    return self._programs[key]

  def _sm(self, body, in_specs, out_specs, donate=()):
    return jax.jit(_shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, **_NO_CHECK),
                   donate_argnums=donate)

  def _build_init(self, k):
    init = self.program.init

    def body(bc, states, keys):
      return jax.vmap(lambda s, key: init(bc, s, key))(states, keys)
    return self._sm(body, (P(), P(CLIENTS), P(CLIENTS)), P(CLIENTS))

  def _build_step(self, k):
    step = masked(patch_convs(self.program.step) if self.patch else self.program.step)

    def one(carry, x, y, ids, active, s):
      b = jax.lax.dynamic_index_in_dim(ids, s, keepdims=False)
      on = jax.lax.dynamic_index_in_dim(active, s, keepdims=False)
      return step(carry, {"image": x[b], "label": y[b]}, on)

    def steps(carry, x, y, ids, active, s):  # ``unroll`` steps from s, unrolled (XLA CPU runs them fastest)
      for u in range(self.unroll):
        carry = one(carry, x, y, ids, active, s + u)
      return carry

    def body(carries, x, y, ids, active, s):
      if self.kind == "vmap":
        return jax.vmap(steps, in_axes=(0, None, None, 0, 0, None))(carries, x, y, ids, active, s)
      if self.kind == "map":
        return jax.lax.map(lambda a: steps(a[0], x, y, a[1], a[2], s), (carries, ids, active))
      outs = [steps(jax.tree.map(lambda a: a[i], carries), x, y, ids[i], active[i], s) for i in range(k)]
      return jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return self._sm(body, (P(CLIENTS), P(), P(), P(CLIENTS), P(CLIENTS), P()), P(CLIENTS), donate=(0,))

  def _build_final(self, k):
    # A chunk's clients, weighted and summed on each device into that device's running sums
    # (leading axis: one row per device; no communication), each client's finite flag, and
    # its new client state.
    final = self.program.final

    def body(carries, bc, w, acc):
      outputs, states = jax.vmap(lambda c: final(bc, c))(carries)
      ok = jax.vmap(all_finite)(outputs, states)
      acc = {name: jax.tree.map(lambda a, o: a + jnp.tensordot(w[name], o.astype(jnp.float32), axes=1)[None],
                                acc[name], outputs[name]) for name in acc}
      return acc, ok, states
    return self._sm(body, (P(CLIENTS), P(), P(CLIENTS), P(CLIENTS)), (P(CLIENTS), P(CLIENTS), P(CLIENTS)),
                    donate=(3,))

  def _build_zeros(self, k):
    shapes = self._output_shapes

    def body(_):
      return {name: jax.tree.map(lambda a: jnp.zeros((1,) + a.shape, jnp.float32), tree)
              for name, tree in shapes.items()}
    return self._sm(body, (P(),), P(CLIENTS))

  def _build_reduce(self, k):
    # the round's one collective: the devices' running sums added up (psum over ``clients``)
    def body(acc):
      return jax.tree.map(lambda a: jax.lax.psum(a[0], CLIENTS), acc)
    return self._sm(body, (P(CLIENTS),), P())

  def _build_gather(self, k):
    def body(tree):
      return jax.tree.map(lambda a: jax.lax.all_gather(a, CLIENTS, tiled=True), tree)
    return self._sm(body, (P(CLIENTS),), P())

  def _scalar(self, s: int):
    if s not in self._steps:
      self._steps[s] = global_array(np.int32(s), self._rep)
    return self._steps[s]

  def _host(self, tree, k):
    """A sharded per-client tree as numpy on this process (gathered first across processes)."""
    if all(getattr(a, "is_fully_addressable", True) for a in jax.tree.leaves(tree)):
      return jax.tree.map(np.asarray, tree)
    return jax.tree.map(to_host, self._program("gather", k)(tree))

  # ------------------------------------------------------------------ a round
  def chunk_size(self, n: int) -> int:
    """Clients per device in each chunk: fixed by the first round (of ``n`` clients) to a
    power of two, at most ``per_device``."""
    if self.k is None:
      self.k = min(self.k_max, _pow2(-(-n // self.devices)))
    return self.k

  def run(self, broadcast, works: Sequence, weights: Mapping[str, np.ndarray], client_states=None) -> Aggregate:
    works = list(works)
    stateful = self.program.stateful
    if not works:
      return Aggregate((), {}, np.zeros(0, bool), () if stateful else None)
    n, B = len(works), self.batch_size
    bc = jax.tree.map(lambda a: global_array(to_host(a), self._rep), broadcast)
    if not hasattr(self, "_output_shapes"):
      cs0 = client_states[0] if stateful else None
      key = jax.ShapeDtypeStruct((2,), jnp.uint32)
      self._output_shapes = jax.eval_shape(lambda b, c, kk: self.program.final(b, self.program.init(b, c, kk))[0],
                                           broadcast, cs0, key)
      self._state_template = (jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(lambda: cs0))
                              if stateful else None)
    w = check_weights(tuple(self._output_shapes), weights, n)
    k = self.chunk_size(n)
    C = k * self.devices
    order = sorted(range(n), key=lambda i: -works[i].steps)  # similar work in a chunk: less masking
    init, step, final = (self._program(kind, k) for kind in ("init", "step", "final"))
    acc = self._program("zeros", k)(self._scalar(0))
    oks, new_states = [], [None] * n
    for c0 in range(0, n, C):  # dispatched without waiting: the host prepares the next chunk meanwhile
      chunk = order[c0:c0 + C]
      smax = max(works[i].steps for i in chunk)
      S = -(-smax // WINDOW) * WINDOW
      ids = np.zeros((C, S, B), np.int32)
      active = np.zeros((C, S), bool)
      seeds = np.zeros(C, np.uint32)
      wc = {name: np.zeros(C, np.float32) for name in w}
      for r, i in enumerate(chunk):
        wk = works[i]
        ids[r, :wk.steps] = work_batch_ids(wk, B)
        active[r, :wk.steps] = True
        seeds[r] = wk.seed
        for name in w:
          wc[name][r] = w[name][i]
      states_in = None
      if stateful:
        rows = [client_states[i] for i in chunk] + [self._state_template] * (C - len(chunk))
        states_in = jax.tree.map(lambda *a: global_array(np.stack(a), self._shd), *rows)
      carries = init(bc, states_in, global_array(client_keys(seeds), self._shd))  # a fixed-size batch: one program
      for s in range(0, smax, self.unroll):
        if s % WINDOW == 0:
          win = slice(s, s + WINDOW)
          ids_g, act_g = global_array(ids[:, win], self._shd), global_array(active[:, win], self._shd)
        carries = step(carries, self.x, self.y, ids_g, act_g, self._scalar(s % WINDOW))
      acc, ok, states = final(carries, bc, {name: global_array(v, self._shd) for name, v in wc.items()}, acc)
      oks.append((chunk, ok))
      if stateful:
        host = self._host(states, k)
        for r, i in enumerate(chunk):
          new_states[i] = jax.tree.map(lambda a: a[r], host)
    sums = jax.tree.map(to_host, self._program("reduce", k)(acc))
    finite = np.ones(n, bool)
    # Every client's weight is > 0, so a non-finite client makes the sums non-finite: only
    # then are the per-client flags read (in several processes, gathered first).
    if not all(np.isfinite(np.asarray(a, np.float32)).all() for a in jax.tree.leaves(sums)) or stateful:
      for chunk, ok in oks:
        ok = self._host(ok, k)
        for r, i in enumerate(chunk):
          finite[i] = ok[r]
    return Aggregate(tuple(wk.client for wk in works), sums, finite, tuple(new_states) if stateful else None)
