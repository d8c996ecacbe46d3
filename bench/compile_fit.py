"""Ahead-of-time fit of the SD 1.5 key-frame configs on TPU topologies (libtpu on this
CPU machine, no TPU): one JSON line per (config, topology) with per-chip memory, FLOPs
per step and the verdict, plus an FSDP sweep on v5p showing per-chip memory shrinking.
The 8 x H100 config is compiled for 8 CPU devices (a proxy; compile_check.GPU_MEMORY).

  JAX_PLATFORMS=cpu python -m bench.compile_fit            # everything (slow: ~minutes
                                                          # per compile on 2 cores)
  JAX_PLATFORMS=cpu python -m bench.compile_fit --only=v5e64
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # the h100:8 proxy compiles for 8 CPU devices

from bench.common import emit, refuse_unknown  # noqa: E402
from videoldm_jax import compile_check  # noqa: E402
from videoldm_jax.config_files import load_sibling  # noqa: E402

CONFIGS = Path(__file__).parents[1] / "configs" / "_"
CASES = {
    "v5e64": ("keyframe_sd15_v5e64", "v5e:8x8", None),
    "v5p128": ("keyframe_sd15_v5p128", "v5p:4x4x4", None),
    # 8 x H100: XLA cannot compile for absent GPUs; 8 CPU devices traced as for GPUs.
    "h100x8": ("keyframe_sd15_8xh100", "h100:8", None),
    # FSDP sweep: the v5p-128 config on 8, 16 and 64 chips, all FSDP, 1 clip per chip.
    "fsdp8": ("keyframe_sd15_v5p128", "v5p:2x2x2", dict(data=1, fsdp=8, tensor=1)),
    "fsdp16": ("keyframe_sd15_v5p128", "v5p:2x2x4", dict(data=1, fsdp=16, tensor=1)),
    "fsdp64": ("keyframe_sd15_v5p128", "v5p:4x4x4", dict(data=1, fsdp=64, tensor=1)),
}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", default="", help="comma-separated case names")
  args = parser.parse_args()
  if args.only:
    refuse_unknown(parser, "only", args.only, CASES)
  for name, (config_name, topology, mesh) in CASES.items():
    if args.only and name not in args.only.split(","):
      continue
    c = load_sibling(str(CONFIGS), config_name).get_config()
    if mesh is not None:
      c.mesh = mesh
      c.data.batch_size = mesh["fsdp"]
    r = compile_check.fit_report(c, topology)
    emit(dict(bench="compile_fit", case=name, config=config_name,
              batch_size=c.data.batch_size, **r.to_json()))


if __name__ == "__main__":
  main()
