"""The reference executor: one client after another, one jitted local step at a time, batches
gathered on the host (what the per-client loops of FL simulators do)."""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtfl_jax.federated.client import client_keys, work_batch_ids
from mtfl_jax.federated.executors.base import Aggregate, ClientExecutor, all_finite, as_float32, check_weights


@jax.jit
def _add(sums, outputs, w):
  return {k: jax.tree.map(lambda a, b: a + w[k] * b, sums[k], as_float32(outputs[k])) for k in sums}


@jax.jit
def _zeros(outputs):
  return {k: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), v) for k, v in outputs.items()}


_finite = jax.jit(all_finite)


class LoopExecutor(ClientExecutor):
  """Runs a task's clients one after another (see the module docstring)."""
  name = "loop"

  def __init__(self, fed_task, program, **options):
    self.program, self.x, self.y, self.batch_size = program, fed_task.data.x_train, fed_task.data.y_train, \
        fed_task.batch_size
    # jit caches by function: a program shared by runs (it is kept on its task) compiles once
    self._init = jax.jit(program.init)
    self._step = jax.jit(program.step)
    self._final = jax.jit(program.final)

  def run(self, broadcast, works: Sequence, weights: Mapping[str, np.ndarray], client_states=None) -> Aggregate:
    works = list(works)
    if not works:
      return Aggregate((), {}, np.zeros(0, bool), () if self.program.stateful else None)
    keys = client_keys([w.seed for w in works])
    sums, oks, states, w = None, [], [], None
    for k, work in enumerate(works):
      cs = client_states[k] if client_states is not None else None
      ids = work_batch_ids(work, self.batch_size)
      carry = self._init(broadcast, cs, keys[k])
      for j in range(work.steps):
        carry = self._step(carry, {"image": self.x[ids[j]], "label": self.y[ids[j]]})
      outputs, new_state = self._final(broadcast, carry)
      if sums is None:
        w = check_weights(tuple(outputs), weights, len(works))
        sums = _zeros(outputs)
      sums = _add(sums, outputs, {name: v[k] for name, v in w.items()})
      oks.append(_finite(outputs, new_state))
      states.append(new_state)
    host = jax.tree.map(np.asarray, sums)
    finite = np.array([bool(o) for o in oks])
    client_out = tuple(jax.tree.map(np.asarray, s) for s in states) if self.program.stateful else None
    return Aggregate(tuple(w_.client for w_ in works), host, finite, client_out)
