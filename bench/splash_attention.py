"""Splash attention vs XLA's attention on a TPU, compiled ahead of time on any host.

  python -m bench.splash_attention [--topology=v5e:2x2] [--devices=1,4]

For SD 1.5's self-attention at its two levels that take the kernel at 320 x 512
(level 0: 40 x 64 = 2560 tokens, head dim 40; level 1: 20 x 32 = 640 tokens, head dim
80; 8 heads, a 16-frame clip, bf16), compiles forward + backward of one attention for
the topology from libtpu's description (no TPU needed) with each path of
models/attention.py that runs there: splash (the kernel in a shard_map), formula
(XLA's einsum + softmax) and blocked (XLA's loop over query blocks), batch split over
the devices. One JSON line per (level, devices, path): temporary and argument bytes per
device from `memory_analysis()`, all-gathers in the compiled program, and model FLOPs
(train/flops.py: what the kernel executes, its backward's logit recomputation
included). Timing needs a TPU; none has been lent yet.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bench.common import emit
from videoldm_jax import compile_check
from videoldm_jax.models import attention as attention_lib
from videoldm_jax.train import flops

# (name, tokens, head dim) of SD 1.5's self-attention levels at 320 x 512 (40 x 64 latents).
LEVELS = (("level0", 40 * 64, 40), ("level1", 20 * 32, 80))
HEADS, FRAMES = 8, 16


def measure(topology: str, devices: int, level: str, tokens: int, head_dim: int,
            implementation: str) -> dict:
  """Compiles d(sum(attention^2))/d(q, k, v) for `topology`'s first `devices` devices."""
  all_devices, _ = compile_check.topology_devices(topology)
  mesh = Mesh(np.array(all_devices[:devices]).reshape(devices, 1, 1),
              ("data", "fsdp", "tensor"))
  width = HEADS * head_dim
  spec = jax.ShapeDtypeStruct((FRAMES, tokens, width), jnp.bfloat16,
                              sharding=NamedSharding(mesh, P("data")))
  previous = attention_lib.implementation()
  attention_lib.set_implementation(implementation, "tpu")
  try:
    def loss(q, k, v):
      out = attention_lib.dot_product_attention(q, k, v, HEADS)
      return jnp.sum(out.astype(jnp.float32) ** 2)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    # A TPU host's default (bf16 passes; the tests' "highest" would keep the formula).
    with jax.default_matmul_precision("default"), attention_lib.partitioned(
        mesh, ("data", "fsdp"), ("tensor",)):
      path = attention_lib.attention_path(tokens, tokens, jnp.bfloat16, head_dim)
      compiled = jax.jit(grad).lower(spec, spec, spec).compile()
      model_flops = flops.model_flops(grad, spec, spec, spec)
  finally:
    attention_lib.set_implementation(*previous)
  m = compiled.memory_analysis()
  return dict(bench="splash_attention", topology=topology, devices=devices, level=level,
              tokens=tokens, head_dim=head_dim, heads=HEADS, frames=FRAMES, dtype="bfloat16",
              implementation=implementation, path=path,
              temp_bytes_per_device=int(m.temp_size_in_bytes),
              argument_bytes_per_device=int(m.argument_size_in_bytes),
              all_gathers=compiled.as_text().count("all-gather-start")
              + compiled.as_text().count(" all-gather("),
              model_flops=int(model_flops),
              attention_flops_forward=4 * FRAMES * HEADS * tokens * tokens * head_dim)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--devices", default="1,4", help="comma-separated device counts")
  args = parser.parse_args()
  for level, tokens, head_dim in LEVELS:
    for n in (int(d) for d in args.devices.split(",")):
      for implementation in ("splash", "plain", "blocked"):
        emit(measure(args.topology, n, level, tokens, head_dim, implementation))


if __name__ == "__main__":
  main()
