"""Upsampler stage at toy scale: a few minutes on 2 CPU cores.

A tiny pixel-space video UNet learns to upsample procedural dash-cam clips 4x, from
8x8 to 32x32 frames, training on 16x16 patches (4x4 low-res) and sampling full
frames. There is no pretrained image upsampler at this scale, so the whole UNet
(theta and phi) trains from a random init (mode "full"); the paper's recipe, phi on a
frozen image upsampler, is mode "temporal" with `image_upsampler` set.

  videoldm-train --config=configs/upsampler_tiny.py --workdir=work/upsampler_tiny
"""

import ml_collections

from videoldm_jax.config_files import load_sibling


def get_config() -> ml_collections.ConfigDict:
  c = load_sibling(__file__, "upsampler_base").get_config()
  c.patch_size = 16
  c.unet = dict(block_out_channels=(32, 64), layers_per_block=1,
                attention_levels=(False, False), num_heads=2, transformer_depth=1,
                use_linear_projection=True, norm_num_groups=8)
  c.random_vae = dict(block_out_channels=(32, 32, 64), layers_per_block=1,
                      latent_channels=4, norm_num_groups=8, scaling_factor=0.18215)
  c.data.update(tfds_config="tiny", batch_size=4, num_frames=8, height=32, width=32)
  # 900 steps at 1e-3 (~2 min on 2 cores): after 300 at 3e-4 its outputs kept the input's
  # colours under heavy pixel noise; now they show the horizon and lane markings.
  c.optim.update(lr=1e-3, warmup_steps=20, total_steps=900, ema_decay=0.99)
  c.train.update(num_steps=900, log_every=25, ckpt_every=300, compute_dtype="float32")
  c.sample.update(every=300, num_clips=2, num_frames=8, steps=20)
  return c
