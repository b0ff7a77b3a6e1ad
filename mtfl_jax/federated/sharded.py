"""Clients sharded over devices: one task's sampled clients split along a ``clients`` mesh axis.

The single-device simulator (:mod:`~mtfl_jax.federated.simulator`) returns every client's delta
and leaves averaging to the server. Here the clients of a round are padded to a multiple of
the device count and streamed through the mesh in *chunks* of ``k`` clients per device
(``jax.sharding`` + ``shard_map``): each device trains its ``k`` clients (``vmap``-ed, or one
after another in one program) and adds their weighted deltas to its running sum; at the end of
the round one compiled reduction adds the devices' sums over the ``clients`` axis (``psum``),
so only the aggregate leaves the devices, and the round has one collective per task. With
``p_c`` the server's weight of client ``c`` (FedAvg: ``n_c / sum n``; FedNova: see
:func:`~mtfl_jax.federated.algorithms.client_weights`),

    mean_delta = psum_devices sum_{chunks} sum_{c in the device's part of the chunk} p_c (x_c - x_global)

Memory stays bounded by the chunk, not the round: batches are gathered on the device from the
task's training set (placed once on every device) by index, one step at a time, so a round of
1,000 clients never holds 1,000 clients' batches or states at once.

Compilation: programs depend on the chunk shape only, not on a round's step counts. ``k`` is
fixed by the first round (later rounds with more clients run more chunks, with fewer are
padded), the host loops over steps (masked for clients that are done) and sends the batch
indices in windows of :data:`WINDOW` steps, so a new largest client workload, or a round with
fewer clients, compiles nothing: after the first round a run compiles no more programs.

Multi-process (``jax.distributed``): the mesh spans every process's devices; each process
builds only its own devices' share of the per-client inputs
(``jax.make_array_from_callback``), the collectives run over gloo (CPU) or NCCL (GPU), and
every process gets the same aggregate.

Example::

    sim = ShardedClients(task, fed.datasets["digits_mlp"], client_mesh())
    out = sim.run(params, model_state, works, p=weights, q=sample_weights)
    out.delta            # the weighted sum of the client deltas (numpy, on every process)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtfl_jax.federated.simulator import ClientWork, _batch_ids, client_final, client_init, client_keys
from mtfl_jax.train import has_convolution, make_train_step

CLIENTS = "clients"
INNER = ("vmap", "loop")
# Clients per device per chunk (a cap; fewer when the first round has fewer clients).
K_MAX = {"vmap": 64, "loop": 2}  # loop: 2 measured 10-15% faster than 1 for LeNet on CPU
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


@dataclasses.dataclass
class ShardedResult:
  """One task's round on the mesh: the clients that ran (in the order given), the weighted sum
  of their deltas (``sum p_c delta_c``) and of their final model_states (``sum q_c s_c``), as
  numpy trees, and whether each client's update was finite."""
  clients: list
  delta: Any
  model_state: Any
  finite: dict


class ShardedClients:
  """Runs one task's clients over a ``clients`` mesh (see the module docstring).

  ``inner``: how a device runs its clients of a chunk, ``"vmap"`` (one batched program: good
  for dense models) or ``"loop"`` (one client at a time, each step a plain, unbatched program:
  XLA CPU turns vmapped convolutions into slow grouped ones). None: on a CPU, ``loop`` for a
  task with convolutions, else ``vmap``; on accelerators ``vmap``.
  ``per_device``: cap on clients per device per chunk (memory grows with it). ``unroll``:
  local steps per dispatched program (unrolled; masked past a client's last step).
  ``clients_hint``: the usual number of clients per round, which fixes the chunk size (else
  the first round's count does: a first round with few clients would keep chunks small).
  """

  def __init__(self, task, ds, mesh: Mesh | None = None, inner: str | None = None, per_device: int | None = None,
               unroll: int = 1, clients_hint: int | None = None):
    self.task, self.mesh = task, mesh if mesh is not None else client_mesh()
    if unroll not in (1, 2, 4, 8, 16):
      raise ValueError(f"unroll must be 1, 2, 4, 8 or 16 (it divides the {WINDOW}-step window), got {unroll!r}")
    self.unroll = unroll
    cpu = self.mesh.devices.flat[0].platform == "cpu"
    self.inner = inner or ("loop" if cpu and has_convolution(task) else "vmap")
    if self.inner not in INNER:
      raise ValueError(f"unknown inner mode {self.inner!r}; valid: {', '.join(INNER)}")
    self.k_max = int(per_device or K_MAX[self.inner])
    if self.k_max < 1:
      raise ValueError(f"per_device must be >= 1, got {per_device!r}")
    self.devices = self.mesh.devices.size
    self._rep = NamedSharding(self.mesh, P())
    self._shd = NamedSharding(self.mesh, P(CLIENTS))
    self.x = global_array(ds.x_train, self._rep)
    self.y = global_array(ds.y_train, self._rep)
    self._steps: dict = {}
    self.k: int | None = None  # clients per device per chunk, fixed by clients_hint or the first round
    if clients_hint:
      self.chunk_size(int(clients_hint))
    self.compiles = 0  # programs built (tests check that later rounds build none)
    self._programs: dict = {}

  # ------------------------------------------------------------------ programs
  def _program(self, kind: str, k: int):
    key = (kind, k)
    if key not in self._programs:
      self._programs[key] = getattr(self, f"_build_{kind}")(k)
      self.compiles += 1
    return self._programs[key]

  def _sm(self, body, in_specs, out_specs, donate=()):
    return jax.jit(_shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, **_NO_CHECK),
                   donate_argnums=donate)

  def _build_init(self, k):
    task = self.task

    def body(gp, ms, keys):
      return jax.vmap(lambda key: client_init(task, gp, ms, key))(keys)
    return self._sm(body, (P(), P(), P(CLIENTS)), P(CLIENTS))

  def _build_step(self, k):
    step = make_train_step(self.task)
    vmap = self.inner == "vmap"

    def one(state, x, y, ids, active, s):
      b = jax.lax.dynamic_index_in_dim(ids, s, keepdims=False)
      new, _ = step(state, {"image": x[b], "label": y[b]})
      on = jax.lax.dynamic_index_in_dim(active, s, keepdims=False)
      return jax.tree.map(lambda a, o: jnp.where(on, a, o), new, state)

    def steps(state, x, y, ids, active, s):  # ``unroll`` steps from s, unrolled (XLA CPU runs them fastest)
      for u in range(self.unroll):
        state = one(state, x, y, ids, active, s + u)
      return state

    def body(states, x, y, ids, active, s):
      if vmap:
        return jax.vmap(steps, in_axes=(0, None, None, 0, 0, None))(states, x, y, ids, active, s)
      outs = [steps(jax.tree.map(lambda a: a[i], states), x, y, ids[i], active[i], s) for i in range(k)]
      return jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return self._sm(body, (P(CLIENTS), P(), P(), P(CLIENTS), P(CLIENTS), P()), P(CLIENTS), donate=(0,))

  def _build_final(self, k):
    # A chunk's clients, weighted and summed on each device into that device's running sums
    # (leading axis: one row per device; no communication), and each client's finite flag.
    def body(states, gp, p, q, poison, dacc, macc):
      deltas, ms = jax.vmap(lambda st: client_final(gp, st))(states)
      deltas = jax.tree.map(lambda d: jnp.where(poison.reshape((-1,) + (1,) * (d.ndim - 1)), jnp.nan, d), deltas)
      ok = jnp.ones(p.shape, bool)
      for leaf in jax.tree.leaves((deltas, ms)):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
          ok &= jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
      dacc = jax.tree.map(lambda a, d: a + jnp.tensordot(p, d, axes=1)[None], dacc, deltas)
      macc = jax.tree.map(lambda a, s: a + jnp.tensordot(q, s.astype(jnp.float32), axes=1)[None], macc, ms)
      return dacc, macc, ok
    return self._sm(body, (P(CLIENTS), P(), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(CLIENTS), P(CLIENTS)),
                    (P(CLIENTS), P(CLIENTS), P(CLIENTS)), donate=(5, 6))

  def _build_zeros(self, k):
    def body(gp, ms):
      zero = lambda a: jnp.zeros((1,) + a.shape, jnp.float32)
      return jax.tree.map(zero, gp), jax.tree.map(zero, ms)
    return self._sm(body, (P(), P()), (P(CLIENTS), P(CLIENTS)))

  def _build_reduce(self, k):
    # the round's one collective: the devices' running sums added up (psum over ``clients``)
    def body(dacc, macc):
      return jax.tree.map(lambda a: jax.lax.psum(a[0], CLIENTS), (dacc, macc))
    return self._sm(body, (P(CLIENTS), P(CLIENTS)), (P(), P()))

  def _build_gather(self, k):
    def body(ok):
      return jax.lax.all_gather(ok, CLIENTS, tiled=True)
    return self._sm(body, (P(CLIENTS),), P())

  def _scalar(self, s: int):
    if s not in self._steps:
      self._steps[s] = global_array(np.int32(s), self._rep)
    return self._steps[s]

  # ------------------------------------------------------------------ a round
  def chunk_size(self, n: int) -> int:
    """Clients per device in each chunk: fixed by the first round (of ``n`` clients) to a
    power of two, at most ``per_device``."""
    if self.k is None:
      self.k = min(self.k_max, _pow2(-(-n // self.devices)))
    return self.k

  def run(self, global_params, model_state, works: Sequence[ClientWork], p, q=None, poison=None) -> ShardedResult:
    """Trains ``works`` (one :class:`~mtfl_jax.federated.simulator.ClientWork` per client, the
    same batches and keys as the single-device simulator) and returns the ``p``-weighted sum
    of their deltas and the ``q``-weighted sum of their final model_states (``q``: ``p`` when
    None). ``poison`` marks clients whose delta is replaced by NaN (fault injection in tests)."""
    works = list(works)
    if not works:
      return ShardedResult([], None, None, {})
    n, B = len(works), self.task.batch_size
    p = np.asarray(p, np.float32)
    q = p if q is None else np.asarray(q, np.float32)
    poison = np.zeros(n, bool) if poison is None else np.asarray(poison, bool)
    if p.shape != (n,) or q.shape != (n,) or poison.shape != (n,):
      raise ValueError(f"p, q and poison need one entry per client ({n})")
    k = self.chunk_size(n)
    C = k * self.devices
    order = sorted(range(n), key=lambda i: -works[i].steps)  # similar work in a chunk: less masking
    gp = jax.tree.map(lambda a: global_array(a, self._rep), jax.tree.map(to_host, global_params))
    ms = jax.tree.map(lambda a: global_array(a, self._rep), jax.tree.map(to_host, model_state or {}))
    init, step, final = (self._program(kind, k) for kind in ("init", "step", "final"))
    dacc, macc = self._program("zeros", k)(gp, ms)
    oks = []
    for c0 in range(0, n, C):  # dispatched without waiting: the host prepares the next chunk meanwhile
      chunk = order[c0:c0 + C]
      smax = max(works[i].steps for i in chunk)
      S = -(-smax // WINDOW) * WINDOW
      ids = np.zeros((C, S, B), np.int32)
      active = np.zeros((C, S), bool)
      seeds = np.zeros(C, np.uint32)
      pc, qc, bad = np.zeros(C, np.float32), np.zeros(C, np.float32), np.zeros(C, bool)
      for r, i in enumerate(chunk):
        w = works[i]
        ids[r, :w.steps] = _batch_ids(w, B)
        active[r, :w.steps] = True
        seeds[r] = w.seed
        pc[r], qc[r], bad[r] = p[i], q[i], poison[i]
      states = init(gp, ms, global_array(client_keys(seeds), self._shd))  # a fixed-size batch: one program
      for s in range(0, smax, self.unroll):
        if s % WINDOW == 0:
          win = slice(s, s + WINDOW)
          ids_g, act_g = global_array(ids[:, win], self._shd), global_array(active[:, win], self._shd)
        states = step(states, self.x, self.y, ids_g, act_g, self._scalar(s % WINDOW))
      dacc, macc, ok = final(states, gp, *(global_array(a, self._shd) for a in (pc, qc, bad)), dacc, macc)
      oks.append((chunk, ok))
    dsum, msum = self._program("reduce", k)(dacc, macc)
    delta = jax.tree.map(to_host, dsum)
    msum = jax.tree.map(to_host, msum)  # float32 sums: checked below before any cast
    mstate = jax.tree.map(lambda s, ref: s.astype(np.asarray(ref).dtype), msum,
                          jax.tree.map(to_host, model_state or {}))
    finite = np.ones(n, bool)
    # Every client's weight is > 0, so a non-finite client makes the sums non-finite: only
    # then are the per-client flags read (in several processes, gathered first).
    if not all(np.isfinite(np.asarray(a, np.float32)).all() for a in jax.tree.leaves((delta, msum))):
      for chunk, ok in oks:
        ok = to_host(ok if ok.is_fully_addressable else self._program("gather", k)(ok))
        for r, i in enumerate(chunk):
          finite[i] = ok[r]
    return ShardedResult([w.client for w in works], delta, mstate,
                         {w.client: bool(finite[i]) for i, w in enumerate(works)})
