"""Sampling benchmarks: DDIM with the key-frame model, and the whole long-video chain.

1. DDIM (`--workload=W1,W2`): the key-frame UNet of the workload (random weights) samples
   one batch of T = 8-frame latent clips with classifier-free guidance (prompt and
   negative prompt in one UNet call of batch 2B per step) through the library's sampler
   (`diffusion.samplers.sample`, its UNet call jitted once). One JSON line per
   workload: seconds per denoising step (median over the timed runs' per-step times),
   latent frames/s at `--steps`, model FLOPs per step and MFU.
2. The chain (`--chain_work=WORK`, WORK = the folder `launch/demo.sh` trained into):
   `videoldm-generate`'s `generate_video` with the demo's models and its options (key
   frames -> prediction -> x4 interpolation -> temporal decoder -> 4x upsampler -> mp4),
   timed on a second run (the first compiles): wall seconds per generated second of
   video at --fps.

  JAX_PLATFORMS=cpu python -m bench.sample --workload=W1,W2
  JAX_PLATFORMS=cpu python -m bench.sample --workload= --chain_work=work/demo
"""

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import workloads  # noqa: E402
from bench.common import (emit, matmul_peak_flops, peak_host_rss_bytes,  # noqa: E402
                          refuse_below, refuse_unknown)
from videoldm_jax import host_memory  # noqa: E402
from videoldm_jax.diffusion import samplers  # noqa: E402
from videoldm_jax.diffusion.schedules import schedule_from_diffusers_config  # noqa: E402
from videoldm_jax.models.temporal import TemporalConfig  # noqa: E402
from videoldm_jax.train import flops as flops_lib  # noqa: E402
from videoldm_jax.train import loop  # noqa: E402


def ddim(workload: str, steps: int, runs: int, guidance: float, peak: float,
         dtype: str = "float32") -> dict:
  w = workloads.WORKLOADS[workload]
  ldm = workloads.video_ldm(w, TemporalConfig(), dtype, "none")
  unet = ldm.unet()
  params = {"params": ldm.init_unet_params(0)}
  rng = np.random.default_rng(0)
  e = w.unet.cross_attention_dim
  cond = jnp.asarray(rng.standard_normal((w.batch, w.context_len, e), np.float32))
  uncond = jnp.zeros_like(cond)
  apply = jax.jit(unet.apply)
  denoise = samplers.guided_denoise_fn(lambda x, t, c: apply(params, x, t, c),
                                       cond, uncond, guidance)
  schedule, sampling = schedule_from_diffusers_config(workloads.SD_SCHEDULER)
  h, wd = w.latent_hw
  x_T = jnp.asarray(rng.standard_normal((w.batch, w.frames, h, wd, 4), np.float32))

  def run():
    out = samplers.sample(denoise, x_T, schedule, steps, sampler="ddim",
                          key=jax.random.key(0), progress=False,
                          **dataclasses.asdict(sampling))
    return jax.block_until_ready(out)

  t0 = time.perf_counter()
  run()  # compiles the UNet call
  first = time.perf_counter() - t0
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  total = float(np.median(times))
  # One denoise call, as the sampler makes it: batch 2B with guidance, B without
  # (guided_denoise_fn skips the unconditional half at guidance 1).
  flops = flops_lib.model_flops(lambda x: denoise(x, jnp.zeros((w.batch,), jnp.int32)),
                                x_T)
  return dict(bench="sample_ddim", workload=workload, dtype=dtype, batch=w.batch,
              frames=w.frames, latents=w.latent_text,
              steps=steps, guidance_scale=guidance, s_per_step=total / steps,
              frames_per_s=w.batch * w.frames / total, sample_s=total,
              first_run_s=first, model_gflop_per_step=flops / 1e9,
              peak_gflops=peak / 1e9, mfu=flops / (total / steps) / peak,
              peak_host_rss_bytes=peak_host_rss_bytes(),
              device=jax.devices()[0].device_kind, jax=jax.__version__)


def _latest_export(work: Path, stage: str) -> str:
  latest = loop.latest_export(work / stage)
  if latest is None:
    raise FileNotFoundError(f"no export in {work / stage}/export: run launch/demo.sh first "
                            "(or pass the folder it trained into)")
  return str(latest)


def chain(work: Path, seconds: float, fps: float, steps: int) -> dict:
  from videoldm_jax.pipelines import generate
  folders = {f"{s}_model": _latest_export(work, s)
             for s in ("keyframe", "predictor", "interpolator", "decoder", "upsampler")}
  models = generate.load_chain(**folders)
  options = generate.GenerateOptions(
      prompt="a dash-cam view of a road at night", duration=seconds, fps=fps, height=32,
      width=32, steps=steps, interp_passes=1, upsampler_steps=4, gif=False, progress=False,
      # launch/demo.sh's calls, as long as the decoder's and upsampler's training clips
      decode_chunk=2, decode_overlap=1, upsample_chunk=4, upsample_overlap=2)
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "chain.mp4"
    t0 = time.perf_counter()
    generate.generate_video(out, options, models=models, log=None)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = generate.generate_video(out, options, models=models, log=None)
    wall = time.perf_counter() - t0
  video_s = result.num_frames / fps
  return dict(bench="sample_chain", work=str(work), frames=result.num_frames,
              height=result.height, width=result.width, fps=fps, video_seconds=video_s,
              steps=steps, wall_s=wall, first_run_s=first,
              wall_s_per_video_second=wall / video_s, plan=str(result.plan),
              peak_host_rss_bytes=peak_host_rss_bytes())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="W1,W2")
  parser.add_argument("--steps", type=int, default=10, help="DDIM steps per sample")
  parser.add_argument("--runs", type=int, default=3, help="timed samples (median)")
  parser.add_argument("--guidance", type=float, default=7.5)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="compute dtype (parameters stay float32); MFU against a "
                           "matmul of this dtype")
  parser.add_argument("--chain_work", default="", help="launch/demo.sh's work folder")
  parser.add_argument("--chain_seconds", type=float, default=4.0)
  parser.add_argument("--chain_fps", type=float, default=8.0)
  parser.add_argument("--chain_steps", type=int, default=20)
  args = parser.parse_args()
  refuse_below(parser, args, steps=1, runs=1, chain_steps=1)
  if args.workload:  # ('' samples no workload: the chain alone)
    refuse_unknown(parser, "workload", args.workload, workloads.WORKLOADS)
  host_memory.restart_with_tunables()  # CPU runs: the malloc settings they are timed under
  if args.workload:
    peak = matmul_peak_flops(dtype=jnp.dtype(args.dtype))
    for workload in args.workload.split(","):
      emit(ddim(workload, args.steps, args.runs, args.guidance, peak, args.dtype))
  if args.chain_work:
    emit(chain(Path(args.chain_work), args.chain_seconds, args.chain_fps, args.chain_steps))


if __name__ == "__main__":
  main()
