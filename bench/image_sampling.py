r"""Denoising-step time of the image LDM's UNet (CFG batch of 2B), as JSON lines.

  python -m bench.image_sampling                       # tiny demo UNet
  python -m bench.image_sampling --unet=sd15 --latent=32 --batch=1

Each line: seconds per denoising step (median of >= 5 after compile + 2 warm-ups),
images/s, model FLOPs per step (train/flops.py: 2 x MACs of matmuls and convolutions,
what the C++ kernels run included) and XLA's own count (which leaves the kernels' custom
calls out), MFU of the model FLOPs against a float32 matmul measured in the same
process, compile seconds, peak host memory.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from bench import common
from videoldm_jax import host_memory
from videoldm_jax.convert.presets import PRESETS
from videoldm_jax.models import params as params_lib
from videoldm_jax.models.unet import UNet, UNetConfig
from videoldm_jax.train import flops as flops_lib

TINY = UNetConfig(block_out_channels=(32, 64), layers_per_block=1,
                  attention_levels=(True, True), num_heads=2, cross_attention_dim=64,
                  norm_num_groups=8)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--unet", choices=["tiny", "sd15", "sd21"], default="tiny")
  ap.add_argument("--latent", type=int, default=16, help="latent height = width")
  ap.add_argument("--batch", type=int, default=1, help="images per step (x2 for CFG)")
  ap.add_argument("--steps", type=int, default=5)
  args = ap.parse_args()
  if args.steps < 5:
    ap.error("--steps must be >= 5 (the median of at least 5 timed steps)")
  host_memory.restart_with_tunables()  # CPU runs: the malloc settings they are timed under
  config = TINY if args.unet == "tiny" else PRESETS[args.unet].unet
  model = UNet(config)
  b = 2 * args.batch
  x = jnp.zeros((b, args.latent, args.latent, config.in_channels))
  t = jnp.full((b,), 500, jnp.int32)
  ctx = jnp.zeros((b, 77, config.cross_attention_dim))
  params = params_lib.init_params(model, 0, x[:1], t[:1], ctx[:1])
  step = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  t0 = time.perf_counter()
  compiled = step.lower(params, x, t, ctx).compile()
  compile_s = time.perf_counter() - t0
  seconds = common.time_fn(lambda: compiled(params, x, t, ctx).block_until_ready(),
                           steps=args.steps)
  flops = flops_lib.model_flops(step, params, x, t, ctx)
  peak = common.matmul_peak_flops()
  common.emit({
      "bench": "image_sampling", "unet": args.unet, "latent": args.latent,
      "batch_cfg": b, "device": jax.devices()[0].device_kind,
      "seconds_per_step": seconds, "images_per_s": args.batch / seconds,
      "model_flops_per_step": flops,
      "xla_flops_per_step": common.compiled_flops(compiled), "matmul_peak_flops": peak,
      "mfu": flops / seconds / peak, "compile_s": compile_s,
      "params": sum(p.size for p in jax.tree_util.tree_leaves(params)),
      "peak_host_bytes": common.peak_host_rss_bytes()})


if __name__ == "__main__":
  main()
