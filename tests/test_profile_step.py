"""bench/profile_step.py's reading of a real jax.profiler trace: every XLA op it times
is an instruction of the compiled module, a dot lands in a dot category, and the times
of a traced program's ops are positive and no larger than the traced wall time; and its
timeline arithmetic on events whose overlaps are known."""

import time

import jax
import jax.numpy as jnp

from bench.profile_step import hlo_index, op_events, scope_of, timeline


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
  events = op_events(tmp_path, index)
  assert events, "no trace event named an HLO instruction"
  assert any("dot" in index[name][2] for _, _, name in events), events
  assert all(end > start for start, end, _ in events)
  assert sum(end - start for start, end, _ in events) / 1e9 <= wall
  in_flight, _ = timeline(events, lambda name: index[name][2])
  span = (max(e for _, e, _ in events) - events[0][0]) / 1e9
  assert abs(sum(in_flight.values()) - span) < 1e-6


def test_timeline_counts_overlap_and_idle_gaps():
  ms = 1_000_000
  # a [0, 10] and b [5, 20] overlap for 5 ms; nothing runs in (20, 25); c [25, 30];
  # d [30.05, 31]. Ops in flight: 1 in [0, 5], 2 in [5, 10], 1 in [10, 20], 0 in
  # [20, 25], 1 in [25, 30], 0 in [30, 30.05], 1 in [30.05, 31]:
  # {0: 5 + 0.05, 1: 5 + 10 + 5 + 0.95, 2: 5} ms. The one idle gap of >= 0.1 ms (5 ms)
  # follows b, the op that ended last; the 0.05 ms gap before d is under the threshold.
  events = [(0, 10 * ms, "a"), (5 * ms, 20 * ms, "b"), (25 * ms, 30 * ms, "c"),
            (30 * ms + 50_000, 31 * ms, "d")]
  kind = {"a": "dot", "b": "convolution", "c": "dot", "d": "dot"}
  in_flight, gaps = timeline(events, kind.get)
  assert {k: round(v * 1e3, 6) for k, v in in_flight.items()} == {0: 5.05, 1: 20.95, 2: 5.0}
  assert {k: round(v * 1e3, 6) for k, v in gaps.items()} == {"convolution": 5.0}
  # An op inside another (b [5, 10] within a [0, 20]) does not end the covered time:
  # the 5 ms gap before c follows a, not a 15 ms one after b.
  events = [(0, 20 * ms, "a"), (5 * ms, 10 * ms, "b"), (25 * ms, 26 * ms, "c")]
  _, gaps = timeline(events, {"a": "convolution", "b": "dot", "c": "dot"}.get)
  assert {k: round(v * 1e3, 6) for k, v in gaps.items()} == {"convolution": 5.0}


def test_scope_of_names_the_model_part_and_the_pass():
  # op_name paths as XLA records them for a Flax model under jax.grad (the backward pass
  # is under transpose(jvp(...))); control flow of the blocked attention's loop is no
  # module, and the indices of a level's layers are dropped, the level's own kept.
  fwd = "jit(step)/jvp(VideoUNet)/down_blocks_0/attentions_1/transformer_blocks_0/attn1/dot_general"
  bwd = ("jit(step)/transpose(jvp(VideoUNet))/down_blocks_0/attentions_0/transformer_blocks_0"
         "/attn1/while/body/dot_general")
  assert scope_of(fwd) == "fwd:down_blocks_0/attentions/transformer_blocks/attn1"
  assert scope_of(bwd) == "bwd:down_blocks_0/attentions/transformer_blocks/attn1"
  assert scope_of(bwd, depth=2) == "bwd:down_blocks_0/attentions"
  assert scope_of("jit(step)/add") == "fwd:(top)"
  # The backward pass of a nested jit: transpose( further down the path.
  nested = "jit(step)/jit(inner)/transpose(jvp(VideoUNet))/down_blocks_0/dot_general"
  assert scope_of(nested) == "bwd:down_blocks_0"
