"""How far bf16 compute is from float32: the key-frame UNet of a workload (random
weights, every parameter perturbed, float32 master weights) on one random batch,
computed in float32 with XLA's attention formula (the reference) and in bf16 with the
`--attention` implementation (on GPUs `auto` is cuDNN's fused attention). One JSON
line per workload: ||bf16 - f32|| / ||f32|| of the UNet output and of the temporal
parameters' gradient of the epsilon loss. bf16 keeps 8 bits of mantissa (2^-9 = 2e-3
relative rounding per operation), and the errors add up with depth: on W1 on a CPU
(2026-12-04) the output is 1.8e-2 off and the temporal gradient 3.6e-2, the same with
XLA's attention formula in bf16, so they come from the convolutions and dense layers,
not the attention. NaN or more than MAX_RELATIVE_ERROR exits non-zero.

  JAX_PLATFORMS=cpu python -m bench.bf16_check --workload=W1
  JAX_PLATFORMS=cuda python -m bench.bf16_check --workload=W2,SD15   # bench/gpu_run.sh
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import workloads  # noqa: E402
from bench.common import emit, refuse_unknown  # noqa: E402
from videoldm_jax.models import attention, partition  # noqa: E402
from videoldm_jax.models.temporal import TemporalConfig  # noqa: E402

# Beyond this relative error bf16 is not rounding any more but a bug (a path that
# overflows, a missing float32 upcast in a softmax or a norm).
MAX_RELATIVE_ERROR = 0.1


def _relative(a, b) -> float:
  a, b = (np.asarray(jax.device_get(x), np.float64) for x in (a, b))
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(workload: str, implementation: str, seed: int = 0) -> dict:
  w = workloads.WORKLOADS[workload]
  rng = np.random.default_rng(seed)
  batch = workloads.latent_batch(w, rng)
  x, context = jnp.asarray(batch["latents"]), jnp.asarray(batch["context"])
  t = jnp.asarray(rng.integers(0, 1000, (w.batch,)), jnp.int32)
  eps = jnp.asarray(rng.standard_normal(x.shape, np.float32))
  ldm32 = workloads.video_ldm(w, TemporalConfig(), "float32", "none")
  params = ldm32.init_unet_params(seed)
  # Perturbed away from the initialisation (zero-initialised outputs of the temporal
  # blocks would leave their gradients trivially equal).
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [
      p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])

  def outputs(dtype: str, impl: str):
    attention.set_implementation(impl)
    try:
      unet = workloads.video_ldm(w, TemporalConfig(), dtype, "none").unet()

      def loss(p):
        out = unet.apply({"params": p}, x, t, context).astype(jnp.float32)
        return jnp.mean((out - eps) ** 2), out

      grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
      g = jnp.concatenate([v.ravel() for v in
                           jax.tree_util.tree_leaves(partition.split(grads)[1])])
      return jax.block_until_ready((out, g))
    finally:
      attention.set_implementation("auto")

  out32, g32 = outputs("float32", "plain")
  out16, g16 = outputs("bfloat16", implementation)
  return dict(bench="bf16_check", workload=workload, attention=implementation,
              latents=w.latent_text, output_rel_err=_relative(out16, out32),
              temporal_grad_rel_err=_relative(g16, g32), temporal_grad_size=int(g32.size),
              device=jax.devices()[0].device_kind, jax=jax.__version__)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="W1")
  parser.add_argument("--attention", default="auto")
  args = parser.parse_args()
  refuse_unknown(parser, "workload", args.workload, workloads.WORKLOADS)
  worst = 0.0
  for workload in args.workload.split(","):
    record = check(workload, args.attention)
    emit(record)
    errors = (record["output_rel_err"], record["temporal_grad_rel_err"])
    worst = max(worst, *(e if np.isfinite(e) else np.inf for e in errors))
  if worst > MAX_RELATIVE_ERROR:
    print(f"bf16 differs from float32 by {worst:.3g} > {MAX_RELATIVE_ERROR}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
