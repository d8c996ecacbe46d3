"""SD 1.5 key-frame stage on a TPU v5e-64 slice (64 chips x 16 GiB HBM, topology 8x8).

16 GiB per chip is the constraint: all state (f32 theta, phi, Adam moments, EMA) is
sharded 64 ways (FSDP over every chip), activations are rematerialised per block
("full": only block inputs are kept), compute is bf16, and each chip holds one
16-frame clip per step (global batch 64). Check before launching:

  videoldm-compile --config=configs/keyframe_sd15_v5e64.py --topology=v5e:8x8

As of 2026-11-25 this does not fit (compiled with the CPU blocked attention, which
stores less than the TPU program will): libtpu needed 24.02 GiB of temporaries per chip
(15.75 GiB available); with 8 frames per clip the peak was still 18.49 GiB. One clip's
activations (VAE encoding in the step included) are the problem, not the state (0.22
GiB per chip). See README "Scale-out" for what to try next.
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "keyframe_sd15").get_config()
  c.image_model = "sd15"  # videoldm-compile reads the preset; training needs the folder
  c.data.update(batch_size=64)
  c.train.update(remat_policy="full")
  c.mesh = dict(data=1, fsdp=64, tensor=1)
  return c
