"""The stride-1, size-keeping convolutions of the W1 / W2 steps alone: XLA's (Eigen)
against the C++ kernels (native/matmul_cpu.cc through models/native_matmul.py), timed
interleaved in one process.

Passes: `forward` (y = x * k), `input_grad` (dx: XLA's transposed convolution against
the kernel's convolution of dy with the flipped, transposed k) and `kernel_grad` (dk:
XLA's convolution over the batch against the kernel's in-place sum over the taps).
Cases are the ResBlocks' 3x3 convolutions of each level (after the up-path's
concatenation too) and the temporal layers' (3, 1, 1) convolution as the (3, 1)
convolution of (B, T, H*W, C) that models/temporal.py runs.

  python -m bench.conv      # restarts itself with the GLIBC_TUNABLES of host_memory.py
  python -m bench.conv --case=W2-l0,W2-l0-temporal --pass=forward

One JSON line per case and pass: both medians in ms and GFLOP/s (2 B H W KH KW I O,
every pass), the median and range of the per-round ratio kernel / XLA (below 1, the
kernel is faster).
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from bench.ab_step import interleaved_times  # noqa: E402
from bench.common import emit, refuse_below, refuse_unknown  # noqa: E402
from videoldm_jax import host_memory  # noqa: E402
from videoldm_jax.models import native_matmul  # noqa: E402

# name -> (B, H, W, I, O, KH, KW): B is batch x frames (8 frames; batch 2 at W1, 1 at W2).
CASES = {
    "W1-l0": (16, 32, 32, 64, 64, 3, 3),
    "W1-l1": (16, 16, 16, 128, 128, 3, 3),
    "W1-l0-temporal": (2, 8, 1024, 64, 64, 3, 1),
    "W2-l0": (8, 32, 32, 128, 128, 3, 3),
    "W2-l0-up": (8, 32, 32, 384, 128, 3, 3),
    "W2-l1": (8, 16, 16, 256, 256, 3, 3),
    "W2-l2": (8, 8, 8, 256, 256, 3, 3),
    "W2-l0-temporal": (1, 8, 1024, 128, 128, 3, 1),
    "W2-l1-temporal": (1, 8, 256, 256, 256, 3, 1),
}
PASSES = ("forward", "input_grad", "kernel_grad")


def _xla_conv(x, k):
  pad = tuple((n // 2, n // 2) for n in k.shape[:2])
  return lax.conv_general_dilated(x, k, (1, 1), pad,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def build(case: str, pass_: str, seed: int = 0):
  """(run XLA's form, run the kernel's form, GFLOP of the pass): each run blocks until
  its result is ready."""
  b, h, w, i, o, kh, kw = CASES[case]
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, h, w, i), np.float32))
  k = jnp.asarray(rng.standard_normal((kh, kw, i, o), np.float32) / np.sqrt(kh * kw * i))
  dy = jnp.asarray(rng.standard_normal((b, h, w, o), np.float32))
  if pass_ == "forward":
    xla, ours, args = _xla_conv, native_matmul.conv_same, (x, k)
  elif pass_ == "input_grad":
    def xla(dy, k):
      return jax.linear_transpose(lambda x_: _xla_conv(x_, k), x)(dy)[0]

    def ours(dy, k):
      return native_matmul.conv_same(dy, jnp.flip(k, (0, 1)).swapaxes(2, 3))
    args = (dy, k)
  else:
    def xla(x, dy):
      return jax.vjp(lambda k_: _xla_conv(x, k_), k)[1](dy)[0]

    def ours(x, dy):
      return native_matmul.conv_weight_grad(x, dy, (kh, kw))
    args = (x, dy)
  xla, ours = jax.jit(xla), jax.jit(ours)
  want, got = np.asarray(xla(*args)), np.asarray(ours(*args))
  err = float(np.abs(got - want).max() / np.abs(want).max())
  if err > 1e-4:
    raise AssertionError(f"{case} {pass_}: the kernel differs from XLA by {err:.1e}")
  gflop = 2 * b * h * w * kh * kw * i * o / 1e9
  return (lambda: xla(*args).block_until_ready(),
          lambda: ours(*args).block_until_ready(), gflop)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", default=",".join(CASES))
  parser.add_argument("--pass", dest="passes", default=",".join(PASSES))
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5, help="calls per side per round")
  args = parser.parse_args()
  refuse_below(parser, args, rounds=1, steps=1)
  refuse_unknown(parser, "case", args.case, CASES)
  refuse_unknown(parser, "pass", args.passes, PASSES)
  host_memory.restart_with_tunables()  # CPU runs: the malloc settings they are timed under
  if not native_matmul.available():
    raise SystemExit("the C++ kernels are not built here: nothing to compare")
  for case in args.case.split(","):
    for pass_ in args.passes.split(","):
      run_xla, run_ours, gflop = build(case, pass_)
      xla_s, ours_s = interleaved_times(run_xla, run_ours, args.rounds, args.steps)
      ratios = np.asarray(ours_s) / np.asarray(xla_s)
      emit({"bench": "conv", "case": case, "pass": pass_, "shape": CASES[case],
            "gflop": gflop, "xla_ms": 1e3 * float(np.median(xla_s)),
            "kernel_ms": 1e3 * float(np.median(ours_s)),
            "xla_gflops": gflop / float(np.median(xla_s)),
            "kernel_gflops": gflop / float(np.median(ours_s)),
            "kernel_over_xla": float(np.median(ratios)),
            "kernel_over_xla_min": float(ratios.min()),
            "kernel_over_xla_max": float(ratios.max())})


if __name__ == "__main__":
  main()
