"""Runs a small federated job in a subprocess (for the kill-and-resume tests).

usage: fed_run_script.py WORKDIR OUT.npz [KILL_ROUND] [--user] [--policy P]
With KILL_ROUND, the process SIGKILLs itself in that round, after its first task trained (a
wrapping client executor of the test's own: faults stay out of the package). With --user, the
job is test_federated_user_task's own tasks (Dropout, BatchNorm, adam) under ``full``.
OUT.npz gets the whole server state, OUT.npz.json the history.
"""
import dataclasses
import json
import os
import signal
import sys
import warnings

import jax
import numpy as np

from mtfl_jax.federated import ClientExecutor, FedConfig, register_executor, run_federated
from mtfl_jax.federated.executors import LoopExecutor
from mtfl_jax.vresource import VRModel

CFG = FedConfig(tasks=("digits_mlp", "mnist_lenet"), num_clients=4, clients_per_round=2, rounds=4,
                local_epochs=0.25, alpha=1.0, simulator="loop", seed=3)
MODEL = VRModel({"digits_mlp": 2e-4, "mnist_lenet": 4e-3}, {"digits_mlp": 0.4, "mnist_lenet": 0.8}, {})
CALLS = []


class KillAfter(ClientExecutor):
  """The loop executor; the process kills itself after the ``kill_at``-th task run."""
  name = "loop"

  def __init__(self, fed_task, program, kill_at=None, **options):
    self.inner, self.kill_at = LoopExecutor(fed_task, program), kill_at

  def run(self, *args, **kw):
    out = self.inner.run(*args, **kw)
    CALLS.append(1)
    if self.kill_at is not None and len(CALLS) == self.kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return out


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if not a.startswith("--")]
  workdir, out = args[0], args[1]
  kill = int(args[2]) if len(args) > 2 else None
  if "--user" in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_federated_user_task as user
    CFG, MODEL = dataclasses.replace(user.CFG, rounds=3, policy="full"), user.MODEL
    warnings.filterwarnings("ignore", "task 'fed_dropbn': client optimizer is not")
  # tasks run one after another in a round: the first task of round k is call k * tasks + 1
  register_executor("kill_after", KillAfter)
  cfg = dataclasses.replace(CFG, simulator="kill_after")
  res = run_federated(cfg, MODEL, workdir=workdir if workdir != "-" else None, progress=False,
                      executor_options={"kill_at": None if kill is None else kill * len(cfg.tasks) + 1})
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(res.state)}
  np.savez(out, **flat)
  with open(out + ".json", "w") as f:
    json.dump(res.history, f)
