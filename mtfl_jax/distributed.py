"""Several devices and processes for the sharded simulator, on JAX's own machinery.

* :func:`use_cpu_devices` makes JAX see ``n`` CPU devices (``jax_num_cpu_devices``), so
  that the ``clients`` mesh of :mod:`mtfl_jax.federated.executors.batched` has ``n`` devices on a CPU.
* :func:`initialize` joins a multi-process run (``jax.distributed.initialize``; CPU
  collectives over gloo, GPU over NCCL), with bounded waits and errors that say what to do.
* :func:`launch_local` starts ``N`` local processes of a ``python -m mtfl_jax`` command joined
  that way (what ``federate --processes N`` and ``bench scale`` use), streams process 0's
  output, and stops every process if one dies.

Across hosts, start one process per host yourself with the same ``--coordinator HOST:PORT``
and ``--processes N`` and its own ``--process-id`` (or the environment variables
``MTFL_COORDINATOR``, ``MTFL_NUM_PROCESSES``, ``MTFL_PROCESS_ID``).

Example::

    from mtfl_jax import distributed
    distributed.use_cpu_devices(2)        # before anything runs on JAX
    run_federated(FedConfig(..., simulator="sharded"))
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

import jax

ENV = ("MTFL_COORDINATOR", "MTFL_NUM_PROCESSES", "MTFL_PROCESS_ID")
# Bounds of the command line's flags: past them a run would not start in any useful time (JAX
# builds every CPU device up front; a join timeout is also how long a dead process goes unnoticed).
MAX_CPU_DEVICES = 1024
MAX_PROCESSES = 4096
MAX_JOIN_TIMEOUT_S = 3600


class DistributedError(RuntimeError):
  """A multi-process run could not start or lost a process."""


def _backend_started() -> bool:
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def use_cpu_devices(n: int) -> None:
  """Makes JAX's CPU backend hold ``n`` devices. Must run before JAX starts its backend (the
  first computation, or ``jax.devices()``); afterwards it only checks, and a different count
  is a ``ValueError`` saying how to set it earlier."""
  if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CPU_DEVICES:
    raise ValueError(f"the number of CPU devices must be an integer between 1 and {MAX_CPU_DEVICES}, got {n!r}")
  if _backend_started():
    have = len(jax.local_devices(backend="cpu"))
    if have != n and jax.default_backend() == "cpu":
      raise ValueError(f"JAX already started with {have} CPU device(s), so {n} cannot be set now; "
                       "call mtfl_jax.distributed.use_cpu_devices before any JAX computation, or start "
                       f"Python with XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return
  jax.config.update("jax_num_cpu_devices", n)


def check_address(coordinator: str) -> tuple[str, int]:
  """``(host, port)`` of a ``HOST:PORT`` coordinator address, or a ``ValueError`` saying the form."""
  m = re.fullmatch(r"\[?([^\]]+?)\]?:(\d+)", str(coordinator or ""))
  if not m or not 0 < int(m.group(2)) < 65536:
    raise ValueError(f"the coordinator address (--coordinator) must be HOST:PORT with a port in 1..65535 "
                     f"(e.g. 10.0.0.1:1234), got {coordinator!r}")
  return m.group(1), int(m.group(2))


def usable_cores() -> int:
  """Cores this process may run on (its affinity), which local processes are pinned to."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _coordinator_answers(coordinator: str, timeout_s: float = 3.0) -> str | None:
  """None when a TCP connection to the coordinator's port opens, else why not."""
  host, port = check_address(coordinator)
  try:
    with socket.create_connection((host, port), timeout=timeout_s):
      return None
  except OSError as e:
    return str(e.strerror or e) if not isinstance(e, socket.timeout) else f"no answer within {timeout_s:g} s"


def join_failure(process_id: int, num_processes: int, coordinator: str, timeout_s: float,
                 coordinator_answers: str | None = None) -> str:
  """What a process that could not join within ``timeout_s`` tells its user: who never joined,
  as far as this process can tell, and what to check. ``coordinator_answers`` (processes other
  than 0): None when process 0's port accepts connections, else why not."""
  n, i = num_processes, process_id
  head = f"process {i} of {n}" + (" (this process, which coordinates the run)" if i == 0 else "")
  failed = f"{head} could not join the run coordinated at {coordinator} within {timeout_s:g}s"
  start = (f"each process runs: python -m mtfl_jax federate ... --processes {n} --process-id I "
           f"--coordinator {coordinator}")
  if i == 0:
    missing = "process 1" if n == 2 else f"at least one of processes 1..{n - 1} (JAX does not say which)"
    return (f"{failed}: {missing} never joined. Check that every other process was started with the same "
            f"--processes {n}, --coordinator {coordinator} and its own --process-id, that it can reach port "
            f"{check_address(coordinator)[1]} of this host by that address (a firewall?), and that it started "
            f"within --join-timeout (raise it if the others start later); {start}")
  if coordinator_answers is not None:
    return (f"{failed}: the coordinator does not answer there ({coordinator_answers}). Check that process 0 runs "
            f"on that host (--process-id 0 --coordinator {coordinator}), that its port is reachable from this "
            f"host (a firewall?), and that every process was given the same --processes")
  others = [j for j in range(1, n) if j != i]
  if not others:
    return (f"{failed}: process 0 answers there, but the run did not form. Check that every process was started "
            f"with the same --processes {n} (process 0 may expect more) and that {coordinator} is the address "
            "of process 0, not of another program")
  missing = f"process {others[0]}" if len(others) == 1 else "one of processes " + ", ".join(map(str, others))
  return (f"{failed}: process 0 answers there, but {missing} never joined. Check that every process was started "
          f"with the same --processes {n} and its own --process-id, and that it started within --join-timeout "
          f"(raise it if some start later); {start}")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 60) -> None:
  """Joins this process to a ``jax.distributed`` run (arguments default to the environment
  variables ``MTFL_COORDINATOR``, ``MTFL_NUM_PROCESSES``, ``MTFL_PROCESS_ID``).

  Every process waits at most ``timeout_s`` for the others; then it ends with one ``error:``
  line naming the coordinator and what to check, and exit code 2 (JAX cannot abandon a join: it
  would abort the process with a stack dump). Processes given different ``num_processes``
  raise a :class:`DistributedError` saying so. A process that stops answering is noticed by
  the others within ``timeout_s`` too (JAX's heartbeat). JAX's preemption service is turned
  off, so that SIGTERM stops a process (as the launcher does) instead of being caught."""
  pin_from_env()
  coordinator = coordinator or os.environ.get("MTFL_COORDINATOR")
  num_processes = int(num_processes if num_processes is not None else os.environ.get("MTFL_NUM_PROCESSES", 1))
  process_id = int(process_id if process_id is not None else os.environ.get("MTFL_PROCESS_ID", 0))
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"the process id (--process-id) must be in 0..{num_processes - 1} for {num_processes} "
                     f"processes (--processes), got {process_id}")
  if num_processes == 1:
    return
  check_address(coordinator)
  if not isinstance(timeout_s, (int, float)) or not 1 <= timeout_s <= MAX_JOIN_TIMEOUT_S:
    raise ValueError(f"the join timeout (--join-timeout) must be between 1 and {MAX_JOIN_TIMEOUT_S} seconds, "
                     f"got {timeout_s!r}")
  if _backend_started():
    raise ValueError("JAX already started its backend in this process; join the multi-process run "
                     "(mtfl_jax.distributed.initialize) before any JAX computation")
  failed = (f"process {process_id} of {num_processes} could not join the run coordinated at {coordinator} "
            f"within {timeout_s}s")
  remedy = ("Check that process 0 runs on that host and port, that every process was given the same "
            "--processes, and that the port is reachable")
  # JAX ends a process whose join fails (coordinator unreachable, a process missing) with a
  # fatal C++ error (SIGABRT and a stack dump) when its own timeout expires, never raising: this
  # watchdog ends it first, with one line and exit code 2 (the CLI's code for a user error). Every
  # process blocks in the join until all have arrived, and JAX cannot be asked who has: process 0
  # knows the others are missing, another process learns whether process 0 answers by connecting.
  joined = threading.Event()

  def watchdog():
    if not joined.wait(timeout_s):
      answers = None if process_id == 0 else _coordinator_answers(coordinator)
      print(f"error: {join_failure(process_id, num_processes, coordinator, timeout_s, answers)}",
            file=sys.stderr, flush=True)
      os._exit(2)
  threading.Thread(target=watchdog, daemon=True, name="mtfl-join-watchdog").start()
  try:  # JAX's preemption service catches SIGTERM: the launcher could not stop a process at once
    jax.config.update("jax_enable_preemption_service", False)
  except (AttributeError, KeyError, ValueError):  # a JAX without it
    pass
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=int(timeout_s) + 60,
                               heartbeat_timeout_seconds=max(10, int(timeout_s)))
    declared = _declared_process_counts(process_id, num_processes, timeout_s)
  except Exception as e:  # noqa: BLE001 - JAX raises several kinds; all mean the same to the user
    why = " ".join(str(e).split())[:300]
    raise DistributedError(f"{failed} ({type(e).__name__}: {why}). {remedy}") from None
  finally:
    joined.set()
  if any(n != num_processes for n in declared.values()):
    raise DistributedError(
        f"the processes of the run coordinated at {coordinator} were started with different --processes ("
        + ", ".join(f"process {i}: {n}" for i, n in sorted(declared.items()))
        + "); start every process with the same --processes")


def _declared_process_counts(process_id: int, num_processes: int, timeout_s: int) -> dict:
  """Every joined process's own ``num_processes``, by process id (through the coordinator's
  key-value store): a process started with a larger count than the coordinator's joins without
  any error from JAX, and would run in a run of another size than it was told."""
  from jax._src import distributed as jd
  client = getattr(jd.global_state, "client", None)
  if client is None or not hasattr(client, "key_value_dir_get"):
    return {}
  client.key_value_set(f"mtfl_jax/processes/{process_id}", str(num_processes))
  client.wait_at_barrier("mtfl_jax/joined", int(timeout_s * 1000))
  return {int(k.rsplit("/", 1)[-1]): int(v) for k, v in client.key_value_dir_get("mtfl_jax/processes/")}


def core_share(i: int, n: int) -> list[int] | None:
  """Process ``i`` of ``n`` local processes: its share of this process's CPU cores (None when
  there are fewer cores than processes). Each process pinned to its own cores runs truly in
  parallel; unpinned, every process's XLA thread pool spreads over all cores and they contend
  (measured on a 2-core CPU: two pinned processes 1.5x one process, unpinned slower than one)."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if len(cores) < n:
    return None
  return cores[i * len(cores) // n:(i + 1) * len(cores) // n]


def pin_from_env() -> None:
  """Pins this process to the cores in ``MTFL_CPU_CORES`` (comma-separated; set by
  :func:`launch_local`), before JAX starts its thread pools."""
  cores = os.environ.get("MTFL_CPU_CORES")
  if cores and hasattr(os, "sched_setaffinity") and not _backend_started():
    os.sched_setaffinity(0, {int(c) for c in cores.split(",")})


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_local(args: Sequence[str], num_processes: int, devices_per_process: int = 1, timeout_s: int = 60,
                 env: dict | None = None) -> int:
  """Runs ``python -m mtfl_jax ARGS --processes N --process-id I --coordinator localhost:PORT
  --devices-per-process D`` for I in 0..N-1 and returns process 0's exit code.

  Each process is pinned to its own share of the cores (:func:`core_share`). Process 0's
  output goes to this process's stdout/stderr; the others' output is kept and shown
  only if they fail. If any process exits with an error, the others are stopped (at once) and a
  :class:`DistributedError` names it and shows the end of its output. Ctrl-C or SIGTERM to
  this process stops them all, and they die with it if it is killed (Linux: parent-death
  signal, :func:`die_with_parent`). ``env`` adds environment variables for every process."""
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ValueError(f"--processes must be an integer >= 1, got {num_processes!r}")
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
    raise ValueError(f"--join-timeout must be an integer >= 1 (seconds), got {timeout_s!r}")
  coord = f"127.0.0.1:{free_port()}"
  # each process dies with this one, and keeps SIGTERM's default action (see __main__)
  base = {**child_environ(env), LAUNCHER_ENV: str(os.getpid())}
  procs, tails = [], []
  for i in range(num_processes):
    cmd = [sys.executable, "-m", "mtfl_jax", *args, "--processes", str(num_processes), "--process-id", str(i),
           "--coordinator", coord, "--devices-per-process", str(devices_per_process),
           "--join-timeout", str(int(timeout_s))]
    out = None if i == 0 else subprocess.PIPE
    cores = core_share(i, num_processes)
    env = {**base, "MTFL_CPU_CORES": ",".join(map(str, cores))} if cores else base
    procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if i else None, text=True))
    tails.append([])
  for i, p in enumerate(procs[1:], 1):  # keep the others' pipes drained (their last lines kept)
    threading.Thread(target=_drain, args=(p.stdout, tails[i]), daemon=True).start()
  def on_term(signum, frame):  # SIGTERM to the launcher: stop the run as Ctrl-C does
    raise KeyboardInterrupt
  # (the command line's own handler, when there is one, does the same and sets the exit code)
  previous = (signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) else None)
  done_at, stragglers, first = None, False, {}
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      first = {i: codes[i] for i in failed}  # the failures seen first: the cause, not its echoes
      if failed or all(c is not None for c in codes):
        break
      if codes[0] == 0:  # process 0 finished: the others get a grace period to end too
        done_at = done_at or time.monotonic()
        if time.monotonic() - done_at > timeout_s:
          failed, stragglers = [i for i, c in enumerate(codes) if c is None], True
          break
      time.sleep(0.2)
    if failed and procs[0].poll() is None:  # a user error: process 0 says it in one line itself
      try:
        procs[0].wait(timeout=3)
      except subprocess.TimeoutExpired:
        pass
  except KeyboardInterrupt:
    stop_processes(procs)
    raise
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  if failed:
    stop_processes(procs)
    i = failure_to_name(first, procs[0].returncode, failed)
    if i is None:
      return 2  # process 0 printed its own one-line error (the others end with it)
    code = procs[i].returncode
    how = ("did not end after process 0 finished" if stragglers
           else f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
    tail = "".join(tails[i][-8:]).strip()
    raise DistributedError(f"process {i} of {num_processes} {how}; the other processes were stopped"
                           + (f". Its last output:\n{tail}" if tail else ""))
  return procs[0].returncode


def failure_to_name(first: dict[int, int], code0: int | None, failed: Sequence[int]) -> int | None:
  """Which process a failed run's error names: None when process 0 said it itself.

  ``first``: the exit codes of the processes seen failed first (the cause, not its echoes);
  ``code0``: process 0's exit code once stopped; ``failed``: every failed process. A user error
  (exit code 2) is said by process 0 in one line and the others end with it. A process that
  died first (killed, crashed) is named even when process 0 then printed one line of its own
  about the lost peer (gloo's "Connection refused"): that line is the echo, not the cause."""
  if code0 == 2 and all(c == 2 for c in first.values()):
    return None
  cause = [i for i, c in first.items() if c != 2]
  return cause[0] if cause else failed[0]


LAUNCHER_ENV = "MTFL_LAUNCHED"  # in a launched process: the launcher's pid


def die_with_parent(parent_pid: int | None = None) -> None:
  """First thing in a launched process: end (SIGTERM) when the launcher ends (Linux), so that a
  launcher killed outright (SIGKILL runs none of its handlers) leaves no process behind; with
  ``parent_pid``, a launcher that already died before this call ends this process at once.

  Called by the launched process itself rather than as ``Popen(preexec_fn=...)``: Python code
  between fork and exec of a multi-threaded process (JAX's) can deadlock, and JAX warns of it."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # not Linux: the launcher's own handlers still stop them
    pass
  if parent_pid is not None and os.getppid() != parent_pid:
    os._exit(1)


def _drain(stream, keep: list) -> None:
  for line in stream:
    keep.append(line)
    del keep[:-50]


def child_environ(extra: dict | None = None) -> dict:
  """This process's environment (plus ``extra``) for a process that sets its own device count:
  without XLA_FLAGS' ``--xla_force_host_platform_device_count``."""
  env = {**os.environ, **(extra or {})}
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
  return env


def stop_processes(procs) -> None:
  """SIGTERM to the processes still running; SIGKILL to those not ended 10 s later."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + 10
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def is_main_process() -> bool:
  """Whether this process writes the run's files (checkpoints, history, figures): process 0."""
  return jax.process_index() == 0


def broadcast_json(obj):
  """``obj`` (JSON-able) as process 0 has it, on every process (a no-op in one process)."""
  if jax.process_count() == 1:
    return obj
  import json

  import numpy as np
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj, default=float).encode(), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.int64(raw.size)))
  buf = np.zeros(n, np.uint8)
  buf[:raw.size] = raw[:n]
  out = multihost_utils.broadcast_one_to_all(buf)
  return json.loads(np.asarray(out).tobytes().decode())
