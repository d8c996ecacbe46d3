"""The PyTorch reference: diffusers' `UNetSpatioTemporalConditionModel` (the SVD UNet)
trained on the W1 / W2 workloads, timed exactly as `bench/train_step.py` times ours.

One step = forward, epsilon-MSE loss, backward, AdamW update (foreach), zero_grad.
'temporal' mode freezes every spatial parameter (requires_grad=False, so autograd takes
no weight gradient for them, as ours); 'full' trains the whole UNet. FLOPs are counted
with `torch.utils.flop_counter.FlopCounterMode` over one forward + backward (taught the
CPU flash-attention kernel, see `flop_counter`). Threads:
torch.get_num_threads() (all cores by default, as XLA uses).

  python -m bench.peer_torch --workload=W1,W2 --mode=temporal,full
"""

import argparse
import os
import platform
import time

import numpy as np
import torch
from diffusers import UNetSpatioTemporalConditionModel
from torch.utils.flop_counter import FlopCounterMode

from bench.common import emit, peak_host_rss_bytes, refuse_below, refuse_unknown
from bench.workloads import MODES, WORKLOADS, Workload

# Parameters of SVD's temporal layers (the counterpart of our phi).
TEMPORAL_MARKERS = ("temporal_", "time_mixer", "time_pos_embed")


def svd_unet(w: Workload) -> UNetSpatioTemporalConditionModel:
  """The SVD UNet with the workload's levels, widths, heads and attention placement."""
  u = w.unet
  down = tuple("CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal"
               for a in u.attention_levels)
  up = tuple("CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal"
             for a in reversed(u.attention_levels))
  return UNetSpatioTemporalConditionModel(
      sample_size=w.latent_size, in_channels=u.in_channels, out_channels=u.out_channels,
      down_block_types=down, up_block_types=up, block_out_channels=u.block_out_channels,
      addition_time_embed_dim=32, projection_class_embeddings_input_dim=96,
      layers_per_block=u.layers_per_block, cross_attention_dim=u.cross_attention_dim,
      num_attention_heads=u.heads_per_level(), num_frames=w.frames)


def flop_counter() -> FlopCounterMode:
  """torch's FlopCounterMode, taught the CPU flash-attention kernels it has no formula for
  (torch 2.13 counts `_scaled_dot_product_flash_attention` but not its `_for_cpu`
  variant, so attention would count as zero). The GPU kernel's formulas apply: the
  same (batch, heads, L, S, D) arithmetic, backward with the recomputed scores."""
  from torch.utils import flop_counter as fc
  aten = torch.ops.aten

  def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

  def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
               **kwargs):
    return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

  mapping = {}
  for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                   ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
    if hasattr(aten, name) and getattr(aten, name) not in fc.flop_registry:
      mapping[getattr(aten, name)] = fn
  return FlopCounterMode(display=False, custom_mapping=mapping)


def is_temporal(name: str) -> bool:
  return any(m in name for m in TEMPORAL_MARKERS)


def build(workload: str, mode: str):
  """(step, info) for the SVD UNet on `workload` in `mode`: `step()` runs one training
  step and returns the loss tensor; `info` holds the FLOPs of one forward + backward
  (FlopCounterMode) and the parameter counts."""
  w = WORKLOADS[workload]
  torch.manual_seed(0)
  model = svd_unet(w)
  model.train()
  for name, p in model.named_parameters():
    p.requires_grad_(mode == "full" or is_temporal(name))
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01, foreach=True)
  h, wd = w.latent_hw  # (SD15's latents are 40 x 64)
  x0 = torch.randn(w.batch, w.frames, w.unet.in_channels, h, wd)
  ctx = torch.randn(w.batch, w.context_len, w.unet.cross_attention_dim)
  added = torch.zeros(w.batch, 3)

  def fwd_bwd():
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (w.batch,))
    pred = model(x0 + noise, t, ctx, added, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(pred, noise)
    loss.backward()
    return loss

  def step():
    loss = fwd_bwd()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  counter = flop_counter()
  with counter:
    fwd_bwd()
  opt.zero_grad(set_to_none=True)
  info = dict(batch=w.batch, model_gflop=counter.get_total_flops() / 1e9,
              params=sum(p.numel() for p in model.parameters()),
              trainable_params=sum(p.numel() for p in trainable))
  return step, info


def run(workload: str, mode: str, steps: int, warmup: int) -> dict:
  step, info = build(workload, mode)
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  t = float(np.median(times))
  return dict(bench="peer_torch", model="diffusers.UNetSpatioTemporalConditionModel",
              workload=workload, mode=mode, dtype="float32", step_s=t,
              step_s_min=float(np.min(times)), samples_per_s=info["batch"] / t,
              loss=float(loss), steps=steps, peak_host_rss_bytes=peak_host_rss_bytes(),
              threads=torch.get_num_threads(), torch=torch.__version__,
              cpus=os.cpu_count(), machine=platform.machine(), **info)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="W1,W2")
  parser.add_argument("--mode", default="temporal,full")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args()
  # As bench.train_step, before anything is built: --steps=0 failed on an empty list
  # after the model and its FLOP count were made, an unknown workload was a KeyError.
  if args.steps < 5:
    parser.error("--steps must be >= 5 (the median of at least 5 timed steps)")
  refuse_below(parser, args, warmup=0)
  refuse_unknown(parser, "workload", args.workload, WORKLOADS)
  refuse_unknown(parser, "mode", args.mode, MODES)
  for workload in args.workload.split(","):
    for mode in args.mode.split(","):
      emit(run(workload, mode, args.steps, args.warmup))


if __name__ == "__main__":
  main()
