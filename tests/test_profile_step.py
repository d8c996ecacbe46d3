"""bench/profile_step.py's reading of a real jax.profiler trace: every XLA op it times
is an instruction of the compiled module, a dot lands in a dot category, and the times
of a traced program's ops are positive and no larger than the traced wall time."""

import time

import jax
import jax.numpy as jnp

from bench.profile_step import hlo_index, op_times


def test_trace_ops_map_to_hlo(tmp_path):
  f = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(0))
  x, w = jnp.ones((512, 256)), jnp.ones((256, 512))
  compiled = f.lower(x, w).compile()
  index = hlo_index(compiled.as_text())
  assert index, "no instruction parsed from the HLO text"
  compiled(x, w).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    t0 = time.perf_counter()
    for _ in range(3):
      compiled(x, w).block_until_ready()
    wall = time.perf_counter() - t0
  ops = {k: v for k, v in op_times(tmp_path).items() if k in index}
  assert ops, "no trace event named an HLO instruction"
  assert any("dot" in index[k][2] for k in ops), {k: index[k] for k in ops}
  assert all(v > 0 for v in ops.values())
  assert sum(ops.values()) <= wall
