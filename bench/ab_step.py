"""A/B of two code variants of one train step, compiled in one process and timed
interleaved, so that both see the same machine: on the shared 2-core host the same
step's time drifts by 10-20% between runs minutes apart (bench/README.md), which hides
any change smaller than that when each variant runs in its own process.

Both steps are compiled, warmed up, then timed in `--rounds` rounds; each round times
`--steps` steps of each variant, in the order AB, BA, AB, ... One JSON line: each
variant's median step time and model FLOPs, the median of the per-round ratios B / A,
and every time. `--mode_b` gives B another mode: temporal-only against full fine-tuning,
the time ratio beside the FLOP ratio, in one run.

  JAX_PLATFORMS=cpu python -m bench.ab_step --workload=W2 --mode=temporal \
      --a=weight_grad=xla+ffn_weight_grad=transposed --b=weight_grad=xla
  JAX_PLATFORMS=cpu python -m bench.ab_step --workload=W1 --mode=full --mode_b=temporal

Variants (`VARIANTS`) switch what a model reads when it is traced; `--a` / `--b` name
one or several joined by '+' (all switched together).
"""

import argparse
import contextlib
import os
import time
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import workloads  # noqa: E402
from bench.common import (emit, peak_host_rss_bytes, refuse_below,  # noqa: E402
                          refuse_unknown)
from bench.train_step import compile_step, step_runner  # noqa: E402
from videoldm_jax import host_memory  # noqa: E402
from videoldm_jax.models import attention, conv, layers, matmul  # noqa: E402
from videoldm_jax.train import flops as flops_lib  # noqa: E402


@contextlib.contextmanager
def _attention(name: str):
  before = attention.implementation()
  attention.set_implementation(name)
  try:
    yield
  finally:
    attention.set_implementation(*before)


def _compiled_with(**options):
  """Every `Lowered.compile` in the context gets XLA debug `options` (the process's
  XLA_FLAGS cannot differ between A and B; a repeated enum option given here replaces
  the whole list with its one value)."""
  compile_ = jax.stages.Lowered.compile

  def compile_with(self, compiler_options=None, **kwargs):
    return compile_(self, compiler_options={**options, **(compiler_options or {})}, **kwargs)

  return mock.patch.object(jax.stages.Lowered, "compile", compile_with)


def _flax_group_norm(num_groups, epsilon, dtype, name):
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                      param_dtype=jnp.float32,
                      scale_init=layers.param_init(layers.ONES, ("norm",)),
                      bias_init=layers.param_init(layers.ZEROS, ("norm",)), name=name)


def _flax_layer_norm(eps, *, name, dtype=jnp.float32):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      scale_init=layers.param_init(layers.ONES, ("norm",)),
                      bias_init=layers.param_init(layers.ZEROS, ("norm",)), name=name)


# name -> a context manager factory; the step is traced and compiled inside it.
VARIANTS = {
    "default": contextlib.nullcontext,
    "attention=plain": lambda: _attention("plain"),
    # XLA's blocked loop instead of the C++ kernel on CPU.
    "attention=blocked": lambda: _attention("blocked"),
    # The kernel only for long attention (>= MIN_BLOCKED_ELEMENTS logits), as before
    # 2026-12-04: short temporal and cross-attention through XLA's formula.
    "attention=kernel_long_only": lambda: mock.patch.object(attention, "NATIVE_MIN_LOGITS",
                                                            2 ** 62),
    # GEGLU's h * gelu(gate) differentiated by autodiff (its saved intermediates read
    # back), not by gated_gelu's backward that recomputes GELU from gate.
    "geglu=autodiff": lambda: mock.patch.object(
        attention, "gated_gelu", lambda h, gate: h * attention.gelu(gate)),
    # flax's nn.GroupNorm (one reduction over positions and the group's channels,
    # autodiff backward) instead of layers.GroupNorm.
    "group_norm=flax": lambda: mock.patch.object(layers, "GroupNorm", _flax_group_norm),
    # flax's nn.LayerNorm (autodiff backward, fusible with the dot before it) instead
    # of layers.LayerNorm.
    "layer_norm=flax": lambda: mock.patch.object(layers, "layer_norm", _flax_layer_norm),
    # YNNPACK for individual dots only: reductions (and the elementwise producers XLA
    # fuses into them, dots included) back to XLA's own loop fusions.
    "ynn=individual_dot": lambda: _compiled_with(
        xla_cpu_experimental_ynn_fusion_type="LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),
    # layers.LayerNorm's backward fused with the dots before it (no fusion_boundary).
    "layer_norm=fused": lambda: mock.patch.object(layers, "fusion_boundary", lambda x: x),
    # The feed-forward out-projection's dW as one transposed dot, not in row chunks. Only
    # with the C++ weight gradients off (+weight_grad=xla): where the kernel runs, it
    # takes every dense dW, chunked or not, and this alone compiles the default step.
    "ffn_weight_grad=transposed": lambda: mock.patch.dict(
        matmul.WEIGHT_GRADS, {"chunked": matmul.dense_matmul}),
    # Dense layers' weight gradients as XLA dots (transposed / chunked, models/matmul.py)
    # instead of the C++ kernel.
    "weight_grad=xla": lambda: mock.patch.object(matmul, "USE_KERNEL", False),
    # Only the ResBlock convolutions' kernel gradients as XLA's (dense layers keep the
    # C++ kernel).
    "conv_weight_grad=xla": lambda: mock.patch.object(conv, "conv_general_dilated",
                                                      jax.lax.conv_general_dilated),
    # The ResBlock convolutions' forward pass and input gradient as XLA's (Eigen), the
    # temporal layers' (3, 1, 1) convolution as a concatenated matmul, instead of the
    # C++ convolution (kernel gradients stay the C++ ones).
    "conv=xla": lambda: mock.patch.object(conv, "USE_NATIVE_CONV", False),
    # XLA:CPU's memory-optimised scheduler instead of its concurrency-optimised one
    # (fewer ops in flight beside the asynchronous custom calls).
    "scheduler=memory": lambda: _compiled_with(
        xla_cpu_enable_concurrency_optimized_scheduler=False),
}


@contextlib.contextmanager
def variant(spec: str):
  """The context of `spec`: one name of `VARIANTS` or several joined by '+', entered
  in their order (a KeyError names an unknown one)."""
  with contextlib.ExitStack() as stack:
    for name in spec.split("+"):
      stack.enter_context(VARIANTS[name]())
    yield


def interleaved_times(run_a, run_b, rounds: int, steps: int,
                      before_round=None) -> tuple[list, list]:
  """Per-round median seconds of `run_a()` and `run_b()` (each blocks until done),
  `steps` calls of each per round, alternating which goes first; `before_round(r)`, if
  given, runs untimed before round r."""
  per_round = ([], [])
  for r in range(rounds):
    if before_round is not None:
      before_round(r)
    order = (0, 1) if r % 2 == 0 else (1, 0)
    for i in order:
      fn = (run_a, run_b)[i]
      times = []
      for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
      per_round[i].append(float(np.median(times)))
  return per_round


def summary(times_a, times_b, gflop_a: float, gflop_b: float) -> dict:
  """The record's figures from per-round seconds of A and B (`interleaved_times`) and
  each variant's model GFLOP per step: medians, the median / min / max of the per-round
  ratios B / A (a round's two variants ran back to back, so their ratio is the figure
  least moved by the machine's drift), and the FLOP ratio beside them."""
  ratios = [b / a for a, b in zip(times_a, times_b)]
  return dict(a_model_gflop=gflop_a, b_model_gflop=gflop_b,
              flops_b_over_a=gflop_b / gflop_a, a_step_s=float(np.median(times_a)),
              b_step_s=float(np.median(times_b)), b_over_a=float(np.median(ratios)),
              b_over_a_min=float(min(ratios)), b_over_a_max=float(max(ratios)),
              a_round_s=list(times_a), b_round_s=list(times_b))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="W2")
  parser.add_argument("--stage", default="keyframe")
  parser.add_argument("--mode", default="temporal")
  parser.add_argument("--mode_b", default=None,
                      help="B's mode if not --mode: --mode=full --mode_b=temporal times "
                           "temporal-only against full fine-tuning (b_over_a beside the "
                           "FLOP ratio)")
  parser.add_argument("--a", default="default",
                      help=f"a variant or several joined by '+': {', '.join(VARIANTS)}")
  parser.add_argument("--b", default="default", help="as --a")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args()
  refuse_below(parser, args, rounds=1, steps=1, warmup=0)
  for flag in ("a", "b"):
    refuse_unknown(parser, flag, getattr(args, flag).replace("+", ","), VARIANTS)
  host_memory.restart_with_tunables()  # CPU runs: the malloc settings they are timed under

  modes = (args.mode, args.mode_b or args.mode)
  runners, compile_s, gflop = [], [], []
  for name, mode in zip((args.a, args.b), modes):
    with variant(name):
      case = workloads.build(args.workload, args.stage, mode)
      compiled, jitted, state, batch, _, seconds = compile_step(case)
      gflop.append(flops_lib.model_flops(jitted, state, batch) / 1e9)
    compile_s.append(seconds)
    run = step_runner(compiled, state, batch)
    for _ in range(args.warmup):
      run()
    runners.append(run)
  times_a, times_b = interleaved_times(*runners, rounds=args.rounds, steps=args.steps)
  emit(dict(bench="ab_step", workload=args.workload, stage=args.stage, mode=modes[0],
            mode_b=modes[1], a=args.a, b=args.b, **summary(times_a, times_b, *gflop),
            rounds=args.rounds, steps=args.steps,
            a_compile_s=compile_s[0], b_compile_s=compile_s[1],
            peak_host_rss_bytes=peak_host_rss_bytes(), jax=jax.__version__,
            cpus=os.cpu_count()))


if __name__ == "__main__":
  main()
