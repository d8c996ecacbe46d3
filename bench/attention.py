"""The attention of the W1 / W2 steps alone: ours against torch's
`scaled_dot_product_attention` (its CPU flash kernel), timed interleaved.

Cases are the first UNet level's attentions, where the step's attention time goes:
  spatial   every frame's 32 x 32 latent pixels attend to each other: (B*T) sequences
            of 1024 per head, d = 32 (ours: the C++ kernel, models/native_attention.py, or
            with VIDEOLDM_JAX_NATIVE=0 in --ours_env XLA's blocked path,
            models/blocked_attention.py);
  temporal  every pixel's 8 frames attend to each other: (B*1024) sequences of 8 per
            head (ours: the kernel too, since 2026-12-04; XLA's formula without it).
Each is timed forward only and forward + backward (the gradients of q, k, v against a
fixed cotangent). As in `bench.side_by_side`, each side runs in its own worker process
(two thread pools in one process slow each other down: in one process ours ran ~1.3-1.6x
and torch 1.4x slower than alone), ours with the GLIBC_TUNABLES for CPU runs, and the
parent times them AB, BA, ...; the request through the pipe adds 0.07 ms (median) to
each call. FLOPs in torch `FlopCounterMode`'s convention (`attention_flops`): forward
4 L S D per sequence and head, backward 2.5 times that.

  python -m bench.attention --case=W1-spatial,W1-temporal,W2-spatial,W2-temporal
  python -m bench.attention --case=W1-temporal --peer=ours \
      --peer_env=GLIBC_TUNABLES=...,VIDEOLDM_JAX_NATIVE=0   # the kernel against XLA

One JSON line per case and pass: both medians in ms, GFLOP/s, and the median and range
of the per-round speed-ups (the peer's time / ours). Below 1, the peer is faster.
"""

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import side_by_side  # noqa: E402
from bench.ab_step import interleaved_times  # noqa: E402
from bench.common import emit, refuse_below, refuse_unknown  # noqa: E402
from videoldm_jax import host_memory  # noqa: E402
from videoldm_jax.models import attention  # noqa: E402

PASSES = ("forward", "forward+backward")

# name -> (sequences = batch x frames or batch x pixels, heads, length, head dim); the
# first level of the workloads in bench/workloads.py (W1: batch 2, heads 2, width 64;
# W2: batch 1, heads 4, width 128; both 8 frames of 32 x 32 latents).
CASES = {
    "W1-spatial": (2 * 8, 2, 1024, 32),
    "W1-temporal": (2 * 1024, 2, 8, 32),
    "W2-spatial": (1 * 8, 4, 1024, 32),
    "W2-temporal": (1 * 1024, 4, 8, 32),
}


def attention_flops(sequences: int, heads: int, length: int, dim: int,
                    backward: bool) -> int:
  """FLOPs of self-attention (L = S = length), torch FlopCounterMode's SDPA formulas:
  forward 4 L S D per sequence and head (two matmuls); the backward's five matmuls
  (the scores recomputed, dV, dP, dQ, dK) add 2.5 times that."""
  forward = 4 * sequences * heads * length * length * dim
  return forward * 7 // 2 if backward else forward


def _arrays(case: str) -> dict:
  """q, k, v and the cotangent g of `case`, (N, L, H*D) float32 each."""
  n, h, length, d = CASES[case]
  rng = np.random.default_rng(0)
  return {x: rng.standard_normal((n, length, h * d), np.float32) for x in "qkvg"}


def _ours(case: str, backward: bool):
  """A blocking callable: our attention on `case`, forward or forward + backward."""
  heads = CASES[case][1]

  def fwd(q, k, v):
    return attention.dot_product_attention(q, k, v, heads)

  if backward:
    fn = jax.jit(jax.grad(lambda q, k, v, g: jnp.vdot(fwd(q, k, v), g), argnums=(0, 1, 2)))
  else:
    fn = jax.jit(lambda q, k, v, g: fwd(q, k, v))
  args = tuple(jnp.asarray(x) for x in _arrays(case).values())

  def run():
    jax.block_until_ready(fn(*args))  # nothing returned: the worker pipes the result
  return run


def _torch(case: str, backward: bool):
  """The same with torch's SDPA on (N, H, L, D) tensors."""
  import torch
  import torch.nn.functional as F

  heads = CASES[case][1]

  def heads_first(x):
    n, length, c = x.shape
    return (torch.from_numpy(x).reshape(n, length, heads, c // heads).transpose(1, 2)
            .contiguous())

  q, k, v, g = (heads_first(x) for x in _arrays(case).values())
  if not backward:
    def run():
      with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v)
    return run
  for t in (q, k, v):
    t.requires_grad_(True)

  def run_backward():
    q.grad = k.grad = v.grad = None
    F.scaled_dot_product_attention(q, k, v).backward(g)
  return run_backward


def build(side: str, case: str, passes: str):
  """`side_by_side.Side`'s builder: (step, peak, info) of one side's attention."""
  backward = passes == "forward+backward"
  if side == "ours":
    length, dim = CASES[case][2:]
    return _ours(case, backward), None, dict(
        jax=jax.__version__,
        implementation=attention.attention_path(length, length, jnp.float32, dim))
  import torch
  return _torch(case, backward), None, dict(torch=torch.__version__,
                                            threads=torch.get_num_threads())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--case", default=",".join(CASES))
  parser.add_argument("--passes", default=",".join(PASSES))
  parser.add_argument("--ours_env", default=f"GLIBC_TUNABLES={host_memory.GLIBC_TUNABLES}",
                      help="NAME=VALUE,... for our worker (as in bench.side_by_side)")
  parser.add_argument("--peer", default="torch", choices=("torch", "ours"),
                      help="the other side: torch's SDPA, or ours again with --peer_env "
                           "(an A/B of the environment, e.g. VIDEOLDM_JAX_NATIVE=0)")
  parser.add_argument("--peer_env", default="", help="NAME=VALUE,... for the peer's worker")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=3, help="calls per side per round")
  args = parser.parse_args()
  refuse_below(parser, args, rounds=1, steps=1)
  peer = "torch" if args.peer == "torch" else "peer"  # the JSON keys of the other side
  refuse_unknown(parser, "case", args.case, CASES)
  refuse_unknown(parser, "passes", args.passes, PASSES)
  for name in args.case.split(","):
    n, h, length, d = CASES[name]
    for passes in args.passes.split(","):
      sides = []
      try:
        for side, env in ((args.peer, side_by_side.parse_env(args.peer_env)),
                          ("ours", side_by_side.parse_env(args.ours_env))):
          sides.append(side_by_side.Side(side, name, passes, warmup=2, env=env,
                                         build=build))
        a, b = interleaved_times(lambda: sides[1].request("step"),
                                 lambda: sides[0].request("step"), args.rounds, args.steps)
      finally:
        for side in sides:
          side.close()
      speedups = [t / o for o, t in zip(a, b)]
      flops = attention_flops(n, h, length, d, passes == "forward+backward")
      emit(dict(bench="attention", case=name, sequences=n, heads=h, length=length,
                head_dim=d, passes=passes, ours_ms=1e3 * float(np.median(a)),
                **{f"{peer}_ms": 1e3 * float(np.median(b))},
                ours_gflops=flops / float(np.median(a)) / 1e9,
                **{f"{peer}_gflops": flops / float(np.median(b)) / 1e9},
                speedup=float(np.median(speedups)), speedup_min=min(speedups),
                speedup_max=max(speedups), rounds=args.rounds, steps=args.steps,
                ours=sides[1].info, **{peer: sides[0].info}, cpus=os.cpu_count()))


if __name__ == "__main__":
  main()
