"""A fused slice puts each task's whole part on its own stream as ONE annotated call (read
from the lowered StableHLO), not as hundreds of separately annotated ops."""
import re

import jax
import numpy as np
import pytest

import mtfl_jax as mt
from mtfl_jax import streams
from mtfl_jax.backends.fused import make_fused_slice

COUNTED = ("stablehlo.dot_general", "stablehlo.convolution")


def _functions(text: str) -> dict[str, list[str]]:
  """``{function name: its body lines}`` of a lowered module."""
  funcs, name = {}, None
  for line in text.splitlines():
    m = re.match(r"\s*func\.func (?:public |private )?@([\w.$-]+)\(", line)
    if m:
      name = m.group(1)
      funcs[name] = []
    elif name is not None:
      funcs[name].append(line)
  return funcs


def _callees(lines):
  return re.findall(r"\bcall @([\w.$-]+)\(", "\n".join(lines))


def _reachable(funcs, root):
  seen, todo = set(), [root]
  while todo:
    f = todo.pop()
    if f not in seen:
      seen.add(f)
      todo += _callees(funcs[f])
  return seen


def _count_ops(funcs, names):
  return {op: sum(len(re.findall(re.escape(op) + r"[ (]", line)) for f in names for line in funcs[f])
          for op in COUNTED}


def _lower(tasks, counts, use_streams):
  states = tuple(mt.init_state(t) for t in tasks)
  batches = tuple(jax.tree.map(lambda a: a[:k], mt.train.synthetic_batches(t, max(k, 1)))
                  for t, k in zip(tasks, counts))
  return jax.jit(make_fused_slice(tasks, counts, use_streams)).lower(states, batches).as_text()


@pytest.mark.skipif(not streams.streams_available(), reason="no compute_on transform in this JAX")
def test_each_task_is_one_annotated_call_holding_its_ops():
  tasks = [mt.get_task("digits_mlp"), mt.get_task("mnist_lenet"), mt.get_task("shapes_unet")]
  counts = (3, 2, 1)
  funcs = _functions(_lower(tasks, counts, True))
  main = funcs["main"]
  annotated = [line for line in main if streams.STREAM_ANNOTATION in line]
  # no op of main carries the annotation except the one call per task
  assert all(re.search(r"\bcall @", line) for line in annotated), annotated[:3]
  calls = {}
  for line in annotated:
    stream = re.search(streams.STREAM_ANNOTATION + r' = "(\d+)"', line).group(1)
    calls.setdefault(int(stream), []).append(re.search(r"call @([\w.$-]+)\(", line).group(1))
  assert sorted(calls) == [1, 2, 3] and all(len(v) == 1 for v in calls.values()), calls
  # nothing outside the annotated calls computes: main's own ops hold no dot/conv
  assert _count_ops(funcs, ["main"]) == {op: 0 for op in COUNTED}
  bodies = {s: _reachable(funcs, c[0]) for s, c in calls.items()}
  for s, task in enumerate(tasks, start=1):
    # the call of stream s holds exactly task s's matmuls and convolutions, those of its
    # part lowered alone without streams
    alone = _functions(_lower([task], (counts[s - 1],), False))
    expected = _count_ops(alone, _reachable(alone, "main"))
    assert _count_ops(funcs, bodies[s]) == expected, (task.name, expected)
    assert sum(expected.values()) > 0
    for other in set(bodies) - {s}:
      assert not bodies[s] & bodies[other]  # no function shared across streams
  # and every op inside a stream's call is on that stream (none on another)
  for s, names in bodies.items():
    tags = {int(t) for f in names for t in re.findall(streams.STREAM_ANNOTATION + r' = "(\d+)"', "\n".join(funcs[f]))}
    assert tags <= {s}


def test_no_streams_no_annotation_and_same_numbers():
  tasks = [mt.get_task("digits_mlp"), mt.get_task("mnist_lenet")]
  assert streams.STREAM_ANNOTATION not in _lower(tasks, (2, 1), False)
  states = tuple(mt.init_state(t) for t in tasks)
  batches = tuple(jax.tree.map(lambda a: a[:k], mt.train.synthetic_batches(t, k)) for t, k in zip(tasks, (2, 1)))
  if streams.streams_available():
    # the annotated program runs on CPU and computes the same to float rounding (not
    # bitwise: XLA fuses the ops of a non-inlined call differently; measured ~1e-8)
    a = jax.jit(make_fused_slice(tasks, (2, 1), True))(states, batches)
    b = jax.jit(make_fused_slice(tasks, (2, 1), False))(states, batches)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_on_stream_refuses_stream_zero():
  if streams.streams_available():
    with pytest.raises(ValueError, match="stream index must be >= 1"):
      streams.on_stream(lambda x: x, 0)
  assert streams.on_stream(abs, None) is abs
